//! What a cluster's agent signs and how the scheduler checks it.

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// Claims of the JWT an agent presents on every call to `/v1/jobs/{buildCluster}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterClaims {
    /// Must equal the cluster named in the request path.
    #[serde(rename = "buildCluster")]
    pub build_cluster: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Algorithms a cluster may sign with. Symmetric ones are absent on purpose: the scheduler holds
/// only public keys, and an HS* verifier fed a public key is the classic confusion attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl SigningAlgorithm {
    /// The JOSE name (`"RS256"`, `"EdDSA"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::RS256 => "RS256",
            SigningAlgorithm::RS384 => "RS384",
            SigningAlgorithm::RS512 => "RS512",
            SigningAlgorithm::PS256 => "PS256",
            SigningAlgorithm::PS384 => "PS384",
            SigningAlgorithm::PS512 => "PS512",
            SigningAlgorithm::ES256 => "ES256",
            SigningAlgorithm::ES384 => "ES384",
            SigningAlgorithm::EdDSA => "EdDSA",
        }
    }
}

/// The sign options held in the environment variable a cluster's `signOption` names:
/// `{"algorithm":"RS256","expiresIn":300,"issuer":…,"audience":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignOptions {
    #[serde(default = "SignOptions::default_algorithm")]
    pub algorithm: SigningAlgorithm,
    /// Longest accepted token lifetime, seconds.
    #[serde(default = "SignOptions::default_expires_in")]
    pub expires_in: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

impl SignOptions {
    fn default_algorithm() -> SigningAlgorithm {
        SigningAlgorithm::RS256
    }

    fn default_expires_in() -> u64 {
        300
    }

    /// Parses the JSON a cluster's `signOption` variable holds. The text is a secret's
    /// neighbour and reaches logs and answers only through these errors, so they name what is
    /// wrong (the field, the position) and never quote the text.
    pub fn from_json(text: &str) -> Result<Self, FieldError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            FieldError::new(
                "signOption",
                format!("not JSON (line {}, column {})", e.line(), e.column()),
            )
        })?;
        let options: Self = crate::error::from_value(value).map_err(|e| {
            // An unknown key is the variable's text too: name only the keys that exist.
            let field = match e.field.as_str() {
                "algorithm" | "expiresIn" | "issuer" | "audience" => e.field,
                _ => "signOption".to_owned(),
            };
            FieldError::new(
                field,
                "missing, or not a value sign options accept (algorithm: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA; expiresIn: seconds; issuer, audience: strings)",
            )
        })?;
        if options.expires_in == 0 || options.expires_in > 86_400 {
            return Err(FieldError::new(
                "expiresIn",
                "must be from 1 to 86400 seconds",
            ));
        }
        Ok(options)
    }
}

impl Default for SignOptions {
    fn default() -> Self {
        Self {
            algorithm: Self::default_algorithm(),
            expires_in: Self::default_expires_in(),
            issuer: None,
            audience: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_options_parse_with_defaults() {
        let o = SignOptions::from_json(r#"{"algorithm":"ES256"}"#).unwrap();
        assert_eq!(o.algorithm, SigningAlgorithm::ES256);
        assert_eq!(o.expires_in, 300);
        assert_eq!(
            SignOptions::from_json("{}").unwrap(),
            SignOptions::default()
        );
    }

    /// Found by tests/properties.rs: an unknown key was named as the field, so the error
    /// quoted the variable's text.
    #[test]
    fn an_unknown_sign_option_key_is_not_quoted() {
        let e = SignOptions::from_json(r#"{"AaAa00AAaAaAA0Aa":1}"#).unwrap_err();
        assert_eq!(e.field, "signOption");
        assert!(!e.to_string().contains("AaAa00AAaAaAA0Aa"), "{e}");
    }

    #[test]
    fn sign_options_refuse_symmetric_and_unknown() {
        assert_eq!(
            SignOptions::from_json(r#"{"algorithm":"HS256"}"#)
                .unwrap_err()
                .field,
            "algorithm"
        );
        assert_eq!(
            SignOptions::from_json(r#"{"algorithm":"none"}"#)
                .unwrap_err()
                .field,
            "algorithm"
        );
        assert!(SignOptions::from_json(r#"{"expiresIn":0}"#).is_err());
        assert!(SignOptions::from_json(r#"{"expires":5}"#).is_err());
    }

    #[test]
    fn sign_option_errors_never_quote_the_variable() {
        for text in [
            r#""hunter2-secret""#,
            r#"{"algorithm":"hunter2-secret"}"#,
            r#"{"issuer":["hunter2-secret"]}"#,
            "hunter2-secret",
            r#"{"expiresIn":"hunter2-secret"}"#,
        ] {
            let e = SignOptions::from_json(text).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{text}: {e}");
        }
    }

    #[test]
    fn claims_use_the_wire_name() {
        let c = ClusterClaims {
            build_cluster: "iOS".into(),
            iat: 1,
            exp: 2,
            iss: None,
            aud: None,
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"buildCluster":"iOS","iat":1,"exp":2})
        );
    }
}
