//! Verification of the JWTs cluster agents present on `/v1/jobs/{buildCluster}…`.
//!
//! Architecture invariant: the algorithm comes from the cluster's sign options, never from the
//! token's header, and the `buildCluster` claim must equal the cluster in the path. Only after
//! this succeeds does a handler touch that cluster's queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sd_protocol::error::FieldError;
use sd_protocol::{Cluster, ClusterClaims, NewCluster, SignOptions, SigningAlgorithm};

use crate::auth::{pem_blocks, refusal, unix_now};

/// Looks up environment variables; a trait object so tests pass a map.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The process environment.
pub fn process_env() -> EnvLookup {
    Arc::new(|name| std::env::var(name).ok())
}

/// Accepted clock skew, seconds.
const LEEWAY: u64 = 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterAuthError {
    /// 401
    #[error("missing Authorization: Bearer token")]
    Missing,
    /// 404
    #[error("no build cluster named {0} is registered")]
    UnknownCluster(String),
    /// 401
    #[error("invalid token for build cluster {cluster}: {reason}")]
    Invalid { cluster: String, reason: String },
    /// 403
    #[error("this token belongs to build cluster {claimed}, not {cluster}")]
    WrongCluster { cluster: String, claimed: String },
    /// 500: the scheduler is missing what it needs to verify this cluster.
    #[error("the scheduler cannot verify build cluster {cluster}: {reason}")]
    Misconfigured { cluster: String, reason: String },
}

/// The keys parsed from one variable, with the value they were parsed from.
type ParsedKeys = (String, Arc<Vec<DecodingKey>>);

/// Parsed keys per environment variable, re-parsed only when the variable's value changes.
/// Only variables under `prefix` are ever read: a record naming `PATH` or a cloud secret reads
/// nothing, whoever registered it.
pub struct ClusterVerifier {
    prefix: String,
    keys: Mutex<HashMap<String, ParsedKeys>>,
}

/// The default `registry.variable_prefix`, the one `sd-agent keygen` spells names with.
pub const DEFAULT_PREFIX: &str = "SD_CLUSTER_";

impl Default for ClusterVerifier {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl ClusterVerifier {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// At registration: both variables a record names are under the prefix, set on this
    /// replica, and parse (keys for the record's algorithm). The error names the field and the
    /// variable, never its value.
    pub fn check_record(&self, env: &EnvLookup, record: &NewCluster) -> Result<(), FieldError> {
        let options = self.sign_options(env, record.sign_option.as_deref())?;
        self.keys(env, &record.auth_key, jwt_algorithm(options.algorithm))
            .map(|_| ())
    }

    /// A variable's value, if `var` is under the prefix and set.
    fn read(&self, env: &EnvLookup, field: &str, var: &str) -> Result<String, FieldError> {
        if !var.starts_with(&self.prefix) {
            return Err(FieldError::new(
                field,
                format!(
                    "{var} is not a cluster key variable: their names start with {} (registry.variable_prefix)",
                    self.prefix
                ),
            ));
        }
        env(var).ok_or_else(|| {
            FieldError::new(
                field,
                format!(
                    "{var} is not set on this scheduler replica (its environment or a file in registry.key_dir); set it on every replica first"
                ),
            )
        })
    }
    /// Verifies `token` for the cluster named in the path. `records` are the registry records
    /// with that name (one per scmContext); any of them may verify it.
    pub fn verify(
        &self,
        env: &EnvLookup,
        cluster: &str,
        records: &[&Cluster],
        token: &str,
    ) -> Result<ClusterClaims, ClusterAuthError> {
        if records.is_empty() {
            return Err(ClusterAuthError::UnknownCluster(cluster.to_owned()));
        }
        let mut last = None;
        for record in records {
            match self.verify_with(env, cluster, record, token) {
                Ok(claims) => return Ok(claims),
                Err(
                    e @ (ClusterAuthError::WrongCluster { .. }
                    | ClusterAuthError::Misconfigured { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClusterAuthError::UnknownCluster(cluster.to_owned())))
    }

    /// The steps of the design brief's "Cluster JWT verification", in its order: the
    /// cluster's sign options and keys, the algorithm (the cluster's, never the token's), the
    /// signature under any of its keys, then the claims.
    fn verify_with(
        &self,
        env: &EnvLookup,
        cluster: &str,
        record: &Cluster,
        token: &str,
    ) -> Result<ClusterClaims, ClusterAuthError> {
        let misconfigured = |reason: String| ClusterAuthError::Misconfigured {
            cluster: cluster.to_owned(),
            reason,
        };
        let invalid = |reason: String| ClusterAuthError::Invalid {
            cluster: cluster.to_owned(),
            reason,
        };
        let options = self
            .sign_options(env, record.fields.sign_option.as_deref())
            .map_err(|e| misconfigured(e.to_string()))?;
        let algorithm = jwt_algorithm(options.algorithm);
        let keys = self
            .keys(env, &record.fields.auth_key, algorithm)
            .map_err(|e| misconfigured(e.to_string()))?;

        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(format!("malformed: {}", refusal(&e))))?;
        if header.alg != algorithm {
            return Err(invalid(format!(
                "signed with {:?}, but this cluster signs with {:?}",
                header.alg, options.algorithm
            )));
        }
        let validation = validation(&options, algorithm);
        let mut last = String::from("signature does not match the cluster's public key(s)");
        for key in keys.iter() {
            match jsonwebtoken::decode::<ClusterClaims>(token, key, &validation) {
                Ok(data) => return check_claims(data.claims, cluster, &options, unix_now()),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::InvalidSignature => {}
                        ErrorKind::ExpiredSignature => return Err(invalid("expired".into())),
                        _ => last = refusal(&e),
                    }
                }
            }
        }
        Err(invalid(last))
    }

    /// The cluster's sign options: the JSON in the variable its `signOption` names, else the
    /// defaults (RS256, 300 s).
    fn sign_options(&self, env: &EnvLookup, var: Option<&str>) -> Result<SignOptions, FieldError> {
        let Some(var) = var else {
            return Ok(SignOptions::default());
        };
        let text = self.read(env, "signOption", var)?;
        SignOptions::from_json(&text).map_err(|e| {
            FieldError::new(
                "signOption",
                format!("{var} holds no valid sign options: {e}"),
            )
        })
    }

    fn keys(
        &self,
        env: &EnvLookup,
        var: &str,
        algorithm: Algorithm,
    ) -> Result<Arc<Vec<DecodingKey>>, FieldError> {
        let value = self.read(env, "authKey", var)?;
        let cache_key = format!("{var}/{algorithm:?}");
        let mut cache = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, keys)) = cache.get(&cache_key)
            && *seen == value
        {
            return Ok(Arc::clone(keys));
        }
        let blocks = pem_blocks(&value);
        if blocks.is_empty() {
            return Err(FieldError::new(
                "authKey",
                format!("{var} holds no PEM public key"),
            ));
        }
        let keys = blocks
            .iter()
            .map(|pem| decoding_key(pem, algorithm))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                FieldError::new(
                    "authKey",
                    format!("{var} holds no public key usable with {algorithm:?} ({e})"),
                )
            })?;
        let keys = Arc::new(keys);
        cache.insert(cache_key, (value, Arc::clone(&keys)));
        Ok(keys)
    }
}

fn decoding_key(
    pem: &str,
    algorithm: Algorithm,
) -> Result<DecodingKey, jsonwebtoken::errors::Error> {
    match algorithm {
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
        _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
    }
}

/// The verifier's algorithm: one of the asymmetric ones sign options allow.
pub fn jwt_algorithm(a: SigningAlgorithm) -> Algorithm {
    // Every SigningAlgorithm name is a jsonwebtoken name; the fallback is unreachable.
    a.as_str().parse().unwrap_or(Algorithm::RS256)
}

/// What the signature check requires: `exp` and `iat` always, `aud`/`iss` when the cluster
/// sets them.
fn validation(options: &SignOptions, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY;
    let mut required = vec!["exp", "iat"];
    if options.audience.is_some() {
        required.push("aud");
    }
    if options.issuer.is_some() {
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation.validate_aud = options.audience.is_some();
    if let Some(aud) = &options.audience {
        validation.set_audience(&[aud]);
    }
    if let Some(iss) = &options.issuer {
        validation.set_issuer(&[iss]);
    }
    validation
}

/// The claims of a token whose signature holds: not from the future, no longer-lived than
/// the cluster allows, and for the cluster in the path (cluster A never pulls B's jobs).
fn check_claims(
    claims: ClusterClaims,
    cluster: &str,
    options: &SignOptions,
    now: u64,
) -> Result<ClusterClaims, ClusterAuthError> {
    let invalid = |reason: String| ClusterAuthError::Invalid {
        cluster: cluster.to_owned(),
        reason,
    };
    if claims.iat > now + LEEWAY {
        return Err(invalid(
            "issued in the future (iat); check the agent's clock".into(),
        ));
    }
    let lifetime = claims.exp.saturating_sub(claims.iat);
    if lifetime > options.expires_in + LEEWAY {
        return Err(invalid(format!(
            "lifetime {lifetime}s exceeds this cluster's expiresIn of {}s",
            options.expires_in
        )));
    }
    if claims.build_cluster != cluster {
        return Err(ClusterAuthError::WrongCluster {
            cluster: cluster.to_owned(),
            claimed: claims.build_cluster,
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signing_algorithm_maps_to_itself() {
        use SigningAlgorithm as S;
        for a in [
            S::RS256,
            S::RS384,
            S::RS512,
            S::PS256,
            S::PS384,
            S::PS512,
            S::ES256,
            S::ES384,
            S::EdDSA,
        ] {
            assert_eq!(format!("{:?}", jwt_algorithm(a)), a.as_str());
        }
    }
}
