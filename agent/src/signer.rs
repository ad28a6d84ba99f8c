//! Signs the JWT the agent presents to the scheduler, and re-signs it before it expires.
//! The key is reloaded on SIGHUP (rotation) by building a new `Signer`.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use sd_protocol::{ClusterClaims, SigningAlgorithm};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a {algorithm:?} private key in PEM ({reason})")]
    Key {
        path: String,
        algorithm: SigningAlgorithm,
        reason: String,
    },
    #[error("signing failed: {0}")]
    Sign(String),
}

pub struct Signer {
    cluster: String,
    algorithm: SigningAlgorithm,
    ttl: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    key: EncodingKey,
    /// The current token and when to replace it.
    cached: Mutex<Option<(String, u64)>>,
}

impl Signer {
    pub fn from_file(
        cluster: &str,
        algorithm: SigningAlgorithm,
        ttl: Duration,
        issuer: Option<String>,
        audience: Option<String>,
        path: &Path,
    ) -> Result<Self, SignerError> {
        let pem = std::fs::read(path).map_err(|source| SignerError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(cluster, algorithm, ttl, issuer, audience, &pem).map_err(|e| match e {
            SignerError::Key {
                algorithm, reason, ..
            } => SignerError::Key {
                path: path.display().to_string(),
                algorithm,
                reason,
            },
            other => other,
        })
    }

    pub fn from_pem(
        cluster: &str,
        algorithm: SigningAlgorithm,
        ttl: Duration,
        issuer: Option<String>,
        audience: Option<String>,
        pem: &[u8],
    ) -> Result<Self, SignerError> {
        let key = match algorithm {
            SigningAlgorithm::ES256 | SigningAlgorithm::ES384 => EncodingKey::from_ec_pem(pem),
            SigningAlgorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .map_err(|e| SignerError::Key {
            path: "key".into(),
            algorithm,
            reason: e.to_string(),
        })?;
        let signer = Self {
            cluster: cluster.to_owned(),
            algorithm,
            ttl,
            issuer,
            audience,
            key,
            cached: Mutex::new(None),
        };
        // A key of the wrong type only fails when used: find out now.
        signer.token()?;
        Ok(signer)
    }

    /// A valid token, re-signed once a third of its lifetime remains.
    pub fn token(&self) -> Result<String, SignerError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, renew_at)) = cached.as_ref()
            && now < *renew_at
        {
            return Ok(token.clone());
        }
        let ttl = self.ttl.as_secs();
        let claims = ClusterClaims {
            build_cluster: self.cluster.clone(),
            iat: now,
            exp: now + ttl,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let token = jsonwebtoken::encode(
            &Header::new(crate::jwt_algorithm(self.algorithm)),
            &claims,
            &self.key,
        )
        .map_err(|e| SignerError::Sign(e.to_string()))?;
        *cached = Some((token.clone(), now + ttl * 2 / 3));
        Ok(token)
    }
}
