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

struct Cached {
    token: String,
    iat: u64,
    renew_at: u64,
}

pub struct Signer {
    cluster: String,
    algorithm: SigningAlgorithm,
    ttl: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    key: EncodingKey,
    /// The current token, when it was signed and when to replace it.
    cached: Mutex<Option<Cached>>,
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
        self.token_at(now)
    }

    /// [`token`](Self::token) as of `now` (Unix seconds).
    fn token_at(&self, now: u64) -> Result<String, SignerError> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A clock stepped back past `iat` would make the cached token one "from the future",
        // which the scheduler refuses: sign a new one then too.
        if let Some(c) = cached.as_ref()
            && c.iat <= now
            && now < c.renew_at
        {
            return Ok(c.token.clone());
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
        *cached = Some(Cached {
            token: token.clone(),
            iat: now,
            renew_at: now + ttl * 2 / 3,
        });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn signer(
        algorithm: SigningAlgorithm,
        iss: Option<&str>,
        aud: Option<&str>,
    ) -> (Signer, String) {
        let generated = crate::keygen::generate(algorithm).unwrap();
        let signer = Signer::from_pem(
            "ios-farm",
            algorithm,
            Duration::from_secs(300),
            iss.map(str::to_owned),
            aud.map(str::to_owned),
            generated.private_pem.as_bytes(),
        )
        .unwrap();
        (signer, generated.public_pem)
    }

    fn claims(token: &str, public_pem: &str, algorithm: SigningAlgorithm) -> serde_json::Value {
        let key = match algorithm {
            SigningAlgorithm::ES256 => DecodingKey::from_ec_pem(public_pem.as_bytes()),
            SigningAlgorithm::EdDSA => DecodingKey::from_ed_pem(public_pem.as_bytes()),
            _ => DecodingKey::from_rsa_pem(public_pem.as_bytes()),
        }
        .unwrap();
        let mut validation = Validation::new(crate::jwt_algorithm(algorithm));
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn claims_name_the_cluster_with_issuer_and_audience_when_set() {
        let (s, public) = signer(
            SigningAlgorithm::ES256,
            Some("sd-agent"),
            Some("sd-scheduler"),
        );
        let c = claims(
            &s.token_at(1_000_000).unwrap(),
            &public,
            SigningAlgorithm::ES256,
        );
        assert_eq!(c["buildCluster"], "ios-farm");
        assert_eq!(c["iat"], 1_000_000);
        assert_eq!(c["exp"], 1_000_300);
        assert_eq!(c["iss"], "sd-agent");
        assert_eq!(c["aud"], "sd-scheduler");

        let (s, public) = signer(SigningAlgorithm::EdDSA, None, None);
        let c = claims(
            &s.token_at(1_000_000).unwrap(),
            &public,
            SigningAlgorithm::EdDSA,
        );
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["buildCluster", "exp", "iat"],
            "no empty iss/aud claims"
        );
    }

    #[test]
    fn the_token_is_reused_then_re_signed_with_a_third_of_its_life_left() {
        let (s, public) = signer(SigningAlgorithm::ES256, None, None);
        let first = s.token_at(1_000_000).unwrap();
        assert_eq!(s.token_at(1_000_199).unwrap(), first, "reused while fresh");
        let second = s.token_at(1_000_200).unwrap();
        assert_ne!(second, first, "re-signed 100 s before expiry");
        let c = claims(&second, &public, SigningAlgorithm::ES256);
        assert_eq!(c["iat"], 1_000_200);
        assert_eq!(c["exp"], 1_000_500);
        // The clock steps back: the cached token would be from the future.
        let third = s.token_at(1_000_100).unwrap();
        assert_eq!(
            claims(&third, &public, SigningAlgorithm::ES256)["iat"],
            1_000_100
        );
    }

    #[test]
    fn a_key_of_another_algorithm_is_refused_at_load() {
        let rsa = crate::keygen::generate(SigningAlgorithm::RS256).unwrap();
        let err = Signer::from_pem(
            "ios-farm",
            SigningAlgorithm::ES256,
            Duration::from_secs(300),
            None,
            None,
            rsa.private_pem.as_bytes(),
        )
        .err()
        .unwrap();
        assert!(matches!(err, SignerError::Key { .. }), "{err}");
    }
}
