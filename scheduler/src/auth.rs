//! Tokens of the Screwdriver API side: verifying the API's and admins' tokens (scopes, and the
//! claims [`TokenPolicy`] asks for), and minting the launcher token each build carries to its
//! cluster.
//!
//! What Screwdriver puts in its tokens (its auth plugin's `generateProfile`/`generateToken`):
//! RS256; `username`, `scmContext`, `scope` (a list: `user`, `admin`, `sdapi`, `temporal`,
//! `build`, `pipeline`, and `guest` for its read-only guest logins, which carry `user` too);
//! `environment` when the API's `jwtEnvironment` is set; `iat`, `exp` (2 h for users, 12 h for
//! the `sdapi` token it hands the queue with each build) and a `jti` (a UUID). No `iss`, `aud`
//! or `nbf`; they are checked only when configured (`nbf` whenever present).
//!
//! Tokens are never logged; errors say what is wrong with a token, not what it contains.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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

/// Why a request's token was refused: 401, but 403 for [`TokenError::Guest`].
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
    /// A valid token of Screwdriver's read-only guest login: it carries `user` too, but a
    /// guest has no business reading the registry or any build.
    #[error("guest tokens (scope guest) are not accepted here; log in to Screwdriver")]
    Guest,
}

/// Leeway for the clocks of the API and this host (`exp`, `nbf`, `iat`).
const LEEWAY: u64 = 30;

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
    iat: u64,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    /// Screwdriver's `jwtEnvironment` (e.g. `prod`, `beta`), when its API sets one.
    #[serde(default)]
    environment: Option<String>,
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

// === impl TokenPolicy ===

/// What an API token must carry besides a good signature and an `exp` still ahead (`[auth]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    /// `exp - iat` at most this: a leaked long-lived token stays useful for long.
    pub max_lifetime: Duration,
    /// `iss` must be this, when set.
    pub issuer: Option<String>,
    /// `aud` must hold this, when set.
    pub audience: Option<String>,
    /// Screwdriver's `environment` claim must be this, when set: a `beta` API's tokens are
    /// refused by a `prod` scheduler that trusts the same key.
    pub environment: Option<String>,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_secs(12 * 3600),
            issuer: None,
            audience: None,
            environment: None,
        }
    }
}

impl TokenPolicy {
    /// What the signature check itself enforces: RS256, `exp` and `iat` present, `exp` ahead,
    /// `iss`/`aud` when configured.
    fn validation(&self) -> Validation {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY;
        // Checked in `check_claims`, with the rest of the time claims.
        validation.validate_nbf = false;
        let mut required = vec!["exp", "iat"];
        if let Some(iss) = &self.issuer {
            required.push("iss");
            validation.set_issuer(&[iss]);
        }
        validation.validate_aud = self.audience.is_some();
        if let Some(aud) = &self.audience {
            required.push("aud");
            validation.set_audience(&[aud]);
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// The claims of a token whose signature, `exp`, `iss` and `aud` hold (pure: `now` is
    /// passed in): not usable before `nbf` or issued in the future, no longer-lived than
    /// allowed, of the configured environment, and not a guest's.
    fn check_claims(&self, claims: ApiClaims, now: u64) -> Result<Caller, TokenError> {
        let invalid = |reason: String| Err(TokenError::Invalid(reason));
        if let Some(nbf) = claims.nbf
            && nbf > now + LEEWAY
        {
            return invalid("not valid yet (nbf is in the future)".into());
        }
        if claims.iat > now + LEEWAY {
            return invalid("issued in the future (iat); check the clocks".into());
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if lifetime > self.max_lifetime.as_secs() {
            return invalid(format!(
                "lifetime {lifetime}s (exp - iat) exceeds auth.max_token_lifetime ({}s)",
                self.max_lifetime.as_secs()
            ));
        }
        if let Some(want) = &self.environment
            && claims.environment.as_deref() != Some(want.as_str())
        {
            return invalid(format!(
                "environment claim is not {want:?} (auth.environment)"
            ));
        }
        let scopes = match claims.scope {
            ScopeClaim::List(list) => list,
            ScopeClaim::One(one) => vec![one],
        };
        if scopes.iter().any(|s| s == "guest") {
            return Err(TokenError::Guest);
        }
        let username = claims.username.map(|u| match u {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        });
        Ok(Caller { scopes, username })
    }
}

// === impl ApiVerifier ===

/// Verifies RS256 tokens issued by the Screwdriver API (several keys: a rotation window).
#[derive(Clone, Default)]
pub struct ApiVerifier {
    keys: Vec<DecodingKey>,
    policy: TokenPolicy,
}

impl ApiVerifier {
    pub fn from_file(path: &Path, policy: TokenPolicy) -> Result<Self, KeyError> {
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
        Ok(Self { keys, policy })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NotConfigured);
        }
        let validation = self.policy.validation();
        let mut last = String::from("signature does not match any configured key");
        for key in &self.keys {
            match jsonwebtoken::decode::<ApiClaims>(token, key, &validation) {
                Ok(data) => return self.policy.check_claims(data.claims, unix_now()),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::InvalidSignature => {}
                        ErrorKind::ExpiredSignature => {
                            return Err(TokenError::Invalid("expired".into()));
                        }
                        ErrorKind::InvalidIssuer => {
                            return Err(TokenError::Invalid(
                                "wrong issuer (iss; auth.issuer)".into(),
                            ));
                        }
                        ErrorKind::InvalidAudience => {
                            return Err(TokenError::Invalid(
                                "wrong audience (aud; auth.audience)".into(),
                            ));
                        }
                        _ => last = refusal(&e),
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
    /// Screwdriver's `jwtEnvironment`, as its queue-service puts it in the tokens it mints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub iat: u64,
    pub exp: u64,
    /// A fresh UUID per token, as Screwdriver's minted tokens carry: each one can be told
    /// apart (logs, revocation lists).
    pub jti: String,
}

/// Why a launcher token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the token's claims could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("RSA signing failed")]
    Sign(#[source] aws_lc_rs::error::Unspecified),
}

/// Mints launcher tokens with the scheduler's RSA key, which the Screwdriver API trusts.
///
/// The key is parsed once, here: `jsonwebtoken::encode` parses (and checks) the DER key again
/// for every signature, which cost about three quarters of intake's CPU per build.
#[derive(Clone)]
pub struct LauncherTokens {
    key: Arc<aws_lc_rs::signature::RsaKeyPair>,
    ttl_secs: u64,
    environment: Option<String>,
}

impl LauncherTokens {
    /// Tokens living `ttl`, carrying `environment` when set (`auth.environment`).
    pub fn from_file(
        path: &Path,
        ttl: Duration,
        environment: Option<String>,
    ) -> Result<Self, KeyError> {
        let text = read(path)?;
        let parse_error = |reason: String| KeyError::Parse {
            path: path.display().to_string(),
            reason,
        };
        let pem = EncodingKey::from_rsa_pem(text.as_bytes())
            .map_err(|e| parse_error(format!("not an RSA private key in PEM: {e}")))?;
        let key = aws_lc_rs::signature::RsaKeyPair::from_der(pem.as_bytes())
            .map_err(|e| parse_error(format!("not a usable RSA private key: {e}")))?;
        Ok(Self {
            key: Arc::new(key),
            ttl_secs: ttl.as_secs(),
            environment,
        })
    }

    pub fn mint(&self, build: &StartMessage) -> Result<String, MintError> {
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
            environment: self.environment.clone(),
            iat: now,
            exp: now + self.ttl_secs,
            jti: uuid_v4(rand::random()),
        };
        self.sign(&claims)
    }

    /// `header.claims.signature`, RS256, each part base64url without padding (RFC 7515).
    fn sign(&self, claims: &LauncherClaims) -> Result<String, MintError> {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = serde_json::to_vec(&Header::new(Algorithm::RS256))?;
        let message = format!("{}.{}", b64(&header), b64(&serde_json::to_vec(claims)?));
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .map_err(MintError::Sign)?;
        Ok(format!("{message}.{}", b64(&signature)))
    }
}

/// `bytes` as a version 4 (random) UUID, the form Screwdriver's `jti` has.
fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
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

/// Why a token was refused, in words of our own: jsonwebtoken's messages quote the token (a
/// header or claim value of any length), and refusals reach the client and the logs.
pub fn refusal(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    let claim = |name: &str| {
        if name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric()) {
            name.to_owned()
        } else {
            "a".to_owned()
        }
    };
    match e.kind() {
        K::InvalidToken => "not a JWT (three base64url segments)".into(),
        K::Base64(_) => "a segment is not base64url".into(),
        K::Utf8(_) => "a segment is not UTF-8".into(),
        K::Json(json) => {
            // serde names a missing field by our own struct's name: safe to repeat.
            let text = json.to_string();
            let missing = text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next());
            match (json.classify(), missing) {
                (_, Some(name)) => format!("the {} claim is required", claim(name)),
                (serde_json::error::Category::Data, None) => {
                    "the header or the claims hold a value of the wrong type".into()
                }
                _ => "the header or the claims are not a JSON object".into(),
            }
        }
        K::InvalidSignature => "signature does not match".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
            "signed with an algorithm this key does not verify".into()
        }
        K::MissingRequiredClaim(name) => format!("the {} claim is required", claim(name)),
        K::InvalidClaimFormat(name) => format!("the {} claim has the wrong format", claim(name)),
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidIssuer => "wrong issuer (iss)".into(),
        K::InvalidAudience => "wrong audience (aud)".into(),
        K::InvalidSubject => "wrong subject (sub)".into(),
        _ => "cannot be verified".into(),
    }
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

    const NOW: u64 = 1_800_000_000;

    fn claims(scope: &[&str], iat: u64, exp: u64) -> ApiClaims {
        ApiClaims {
            scope: ScopeClaim::List(scope.iter().map(|s| (*s).to_owned()).collect()),
            username: Some(serde_json::json!("alice")),
            iat,
            exp,
            nbf: None,
            environment: None,
        }
    }

    fn policy() -> TokenPolicy {
        TokenPolicy {
            max_lifetime: Duration::from_secs(7200),
            ..TokenPolicy::default()
        }
    }

    fn refusal(policy: &TokenPolicy, claims: ApiClaims) -> String {
        match policy.check_claims(claims, NOW) {
            Err(TokenError::Invalid(reason)) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_token_within_the_rules_is_a_caller() {
        let caller = policy()
            .check_claims(claims(&["user", "admin"], NOW, NOW + 7200), NOW)
            .unwrap();
        assert!(caller.has_any(&[Scope::Admin]));
        assert_eq!(caller.username.as_deref(), Some("alice"));
    }

    #[test]
    fn guests_are_refused_whatever_else_they_hold() {
        for scope in [&["user", "guest"][..], &["guest"], &["admin", "guest"]] {
            assert_eq!(
                policy()
                    .check_claims(claims(scope, NOW, NOW + 60), NOW)
                    .unwrap_err(),
                TokenError::Guest,
                "{scope:?}"
            );
        }
    }

    #[test]
    fn not_before_and_issued_at_must_not_be_ahead() {
        let mut early = claims(&["user"], NOW, NOW + 600);
        early.nbf = Some(NOW + 300);
        assert!(refusal(&policy(), early).contains("nbf"));
        let mut within_leeway = claims(&["user"], NOW, NOW + 600);
        within_leeway.nbf = Some(NOW + LEEWAY);
        assert!(policy().check_claims(within_leeway, NOW).is_ok());
        let future = claims(&["user"], NOW + 300, NOW + 600);
        assert!(refusal(&policy(), future).contains("iat"));
    }

    #[test]
    fn lifetimes_over_the_cap_are_refused() {
        assert!(
            policy()
                .check_claims(claims(&["sdapi"], NOW, NOW + 7200), NOW)
                .is_ok()
        );
        let reason = refusal(&policy(), claims(&["sdapi"], NOW, NOW + 7201));
        assert!(reason.contains("auth.max_token_lifetime"), "{reason}");
        // Issued long ago and valid for years: refused although `exp` is ahead.
        let reason = refusal(
            &policy(),
            claims(&["admin"], NOW - 3600, NOW + 10 * 365 * 86400),
        );
        assert!(reason.contains("lifetime"), "{reason}");
    }

    #[test]
    fn the_environment_is_checked_only_when_configured() {
        let mut beta = claims(&["sdapi"], NOW, NOW + 60);
        beta.environment = Some("beta".into());
        assert!(
            policy().check_claims(beta, NOW).is_ok(),
            "unset: not checked"
        );
        let prod = TokenPolicy {
            environment: Some("prod".into()),
            ..policy()
        };
        let mut beta = claims(&["sdapi"], NOW, NOW + 60);
        beta.environment = Some("beta".into());
        assert!(refusal(&prod, beta).contains("auth.environment"));
        assert!(refusal(&prod, claims(&["sdapi"], NOW, NOW + 60)).contains("environment"));
        let mut good = claims(&["sdapi"], NOW, NOW + 60);
        good.environment = Some("prod".into());
        assert!(prod.check_claims(good, NOW).is_ok());
    }

    #[test]
    fn uuids_are_version_4() {
        let id = uuid_v4([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
        assert_ne!(uuid_v4(rand::random()), uuid_v4(rand::random()));
    }

    #[test]
    fn unconfigured_verifier_refuses_everything() {
        assert_eq!(
            ApiVerifier::default().verify("x.y.z").unwrap_err(),
            TokenError::NotConfigured
        );
    }
}
