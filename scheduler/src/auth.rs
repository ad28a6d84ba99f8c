//! Tokens of the Screwdriver API side: verifying the API's and admins' tokens (scopes), and
//! minting the launcher token each build carries to its cluster.
//!
//! Tokens are never logged; errors say what is wrong with a token, not what it contains.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sd_protocol::StartMessage;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
}

/// Why a request's token was refused (401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing Authorization: Bearer token")]
    Missing,
    #[error(
        "the scheduler has no auth.api_public_key_file configured, so it cannot verify API tokens"
    )]
    NotConfigured,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Scopes carried by Screwdriver API tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    User,
    SdApi,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::User => "user",
            Scope::SdApi => "sdapi",
        }
    }
}

#[derive(Debug, Deserialize)]
struct ApiClaims {
    #[serde(default)]
    scope: ScopeClaim,
    #[serde(default)]
    username: Option<serde_json::Value>,
}

/// Screwdriver sends a list; a single string is accepted too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    List(Vec<String>),
    One(String),
}

impl Default for ScopeClaim {
    fn default() -> Self {
        ScopeClaim::List(Vec::new())
    }
}

/// An authenticated caller of the Screwdriver-facing API.
#[derive(Debug, Clone)]
pub struct Caller {
    pub scopes: Vec<String>,
    pub username: Option<String>,
}

impl Caller {
    /// Whether the caller holds any of `scopes`.
    pub fn has_any(&self, scopes: &[Scope]) -> bool {
        scopes
            .iter()
            .any(|s| self.scopes.iter().any(|held| held == s.as_str()))
    }

    pub fn describe(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

// === impl ApiVerifier ===

/// Verifies RS256 tokens issued by the Screwdriver API (several keys: a rotation window).
#[derive(Clone, Default)]
pub struct ApiVerifier {
    keys: Vec<DecodingKey>,
}

impl ApiVerifier {
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = read(path)?;
        let blocks = pem_blocks(&text);
        if blocks.is_empty() {
            return Err(KeyError::Parse {
                path: path.display().to_string(),
                reason: "no PEM public key found".into(),
            });
        }
        let keys = blocks
            .iter()
            .map(|pem| {
                DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| KeyError::Parse {
                    path: path.display().to_string(),
                    reason: format!("not an RSA public key: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NotConfigured);
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 30;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        let mut last = String::from("signature does not match any configured key");
        for key in &self.keys {
            match jsonwebtoken::decode::<ApiClaims>(token, key, &validation) {
                Ok(data) => {
                    let scopes = match data.claims.scope {
                        ScopeClaim::List(list) => list,
                        ScopeClaim::One(one) => vec![one],
                    };
                    let username = data.claims.username.map(|u| match u {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    });
                    return Ok(Caller { scopes, username });
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::InvalidSignature => {}
                        ErrorKind::ExpiredSignature => {
                            return Err(TokenError::Invalid("expired".into()));
                        }
                        _ => last = e.to_string(),
                    }
                }
            }
        }
        Err(TokenError::Invalid(last))
    }
}

// === impl LauncherTokens ===

/// Claims of the launcher token, as Screwdriver's queue-service mints it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LauncherClaims {
    pub username: u64,
    pub build_id: u64,
    pub job_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<u64>,
    #[serde(rename = "isPR")]
    pub is_pr: bool,
    pub pipeline_id: u64,
    pub scm_context: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_pipeline_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_parent_job_id: Option<u64>,
    pub scope: Vec<String>,
    pub iat: u64,
    pub exp: u64,
}

/// Mints launcher tokens with the scheduler's RSA key, which the Screwdriver API trusts.
#[derive(Clone)]
pub struct LauncherTokens {
    key: EncodingKey,
    ttl_secs: u64,
}

impl LauncherTokens {
    pub fn from_file(path: &Path, ttl: std::time::Duration) -> Result<Self, KeyError> {
        let text = read(path)?;
        let key = EncodingKey::from_rsa_pem(text.as_bytes()).map_err(|e| KeyError::Parse {
            path: path.display().to_string(),
            reason: format!("not an RSA private key in PEM: {e}"),
        })?;
        Ok(Self {
            key,
            ttl_secs: ttl.as_secs(),
        })
    }

    pub fn mint(&self, build: &StartMessage) -> Result<String, jsonwebtoken::errors::Error> {
        let now = unix_now();
        let claims = LauncherClaims {
            username: build.build_id,
            build_id: build.build_id,
            job_id: build.job_id,
            event_id: build.event_id,
            is_pr: build.is_pr,
            pipeline_id: build.pipeline_id(),
            scm_context: build.pipeline.scm_context.clone(),
            config_pipeline_id: build.pipeline.config_pipeline_id,
            pr_parent_job_id: build.pr_parent_job_id,
            scope: vec!["temporal".into()],
            iat: now,
            exp: now + self.ttl_secs,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
    }
}

// === helpers ===

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Splits text holding several PEM blocks (a key rotation window) into single blocks.
pub fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ")
            && let Some(block) = current.take()
        {
            blocks.push(block);
        }
    }
    blocks
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_split_a_rotation_window() {
        let text = "junk\n-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n\n  -----BEGIN PUBLIC KEY-----\nBBB\n-----END PUBLIC KEY-----\n";
        let blocks = pem_blocks(text);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].contains("BBB"));
        assert!(pem_blocks("nothing").is_empty());
    }

    #[test]
    fn unconfigured_verifier_refuses_everything() {
        assert_eq!(
            ApiVerifier::default().verify("x.y.z").unwrap_err(),
            TokenError::NotConfigured
        );
    }
}
