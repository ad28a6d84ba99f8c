//! `sd-agent keygen`: a cluster key pair and the registration that goes with it.

use std::path::Path;

use sd_protocol::SigningAlgorithm;

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{0} exists; refusing to overwrite a key (move it away first)")]
    Exists(String),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not supported by keygen; use RS256, ES256 or EdDSA")]
    Algorithm(String),
}

/// `sd-agent keygen`: generates the pair, writes the private key to `out` (never over an
/// existing file) and returns the text to print. Nothing is written when generation fails.
pub fn create(
    cluster: &str,
    algorithm: SigningAlgorithm,
    out: &Path,
    expires_in: u64,
) -> Result<String, KeygenError> {
    let generated = generate(algorithm)?;
    write_private(out, &generated.private_pem)?;
    Ok(instructions(
        cluster,
        algorithm,
        expires_in,
        &generated.public_pem,
        out,
    ))
}

/// `--cluster`: the registry's cluster-name rule, checked before a key is made for a name the
/// scheduler would refuse.
pub fn parse_cluster_name(text: &str) -> Result<String, String> {
    sd_protocol::check_cluster_name(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.reason)
}

/// `--algorithm`: the algorithms keygen can make keys for.
pub fn parse_algorithm(text: &str) -> Result<SigningAlgorithm, String> {
    match text {
        "RS256" => Ok(SigningAlgorithm::RS256),
        "ES256" => Ok(SigningAlgorithm::ES256),
        "EdDSA" => Ok(SigningAlgorithm::EdDSA),
        other => Err(format!("{other}: use RS256, ES256 or EdDSA")),
    }
}

/// A generated key pair.
pub struct Generated {
    pub private_pem: String,
    pub public_pem: String,
}

pub fn generate(algorithm: SigningAlgorithm) -> Result<Generated, KeygenError> {
    let alg: &'static rcgen::SignatureAlgorithm = match algorithm {
        SigningAlgorithm::RS256 => &rcgen::PKCS_RSA_SHA256,
        SigningAlgorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        SigningAlgorithm::EdDSA => &rcgen::PKCS_ED25519,
        other => return Err(KeygenError::Algorithm(format!("{other:?}"))),
    };
    let pair =
        rcgen::KeyPair::generate_for(alg).map_err(|e| KeygenError::Generate(e.to_string()))?;
    Ok(Generated {
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
    })
}

/// Writes the private key with mode 0600, never over an existing file.
pub fn write_private(path: &Path, pem: &str) -> Result<(), KeygenError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists(path.display().to_string()),
            _ => KeygenError::Write {
                path: path.display().to_string(),
                source,
            },
        })?;
    file.write_all(pem.as_bytes())
        .map_err(|source| KeygenError::Write {
            path: path.display().to_string(),
            source,
        })
}

/// Names of the scheduler-side variables for a cluster: (`authKey`, `signOption`).
/// The registry refuses a second name with the same stem, so these never collide.
pub fn variable_names(cluster: &str) -> (String, String) {
    let stem = sd_protocol::cluster::cluster_name_key(cluster);
    (
        format!("SD_CLUSTER_{stem}_PUBLIC_KEY"),
        format!("SD_CLUSTER_{stem}_SIGN_OPTIONS"),
    )
}

/// The text `keygen` prints: what to export on the scheduler and what to POST.
pub fn instructions(
    cluster: &str,
    algorithm: SigningAlgorithm,
    ttl_secs: u64,
    public_pem: &str,
    private_path: &Path,
) -> String {
    let (auth_key, sign_option) = variable_names(cluster);
    let sign = serde_json::json!({"algorithm": algorithm, "expiresIn": ttl_secs}).to_string();
    let registration = serde_json::json!({
        "name": cluster,
        "scmContext": "github:github.com",
        "managedBy": "external",
        "scmOrganizations": ["YOUR-ORG"],
        "managedByEmail": "you@example.com",
        "authKey": auth_key,
        "signOption": sign_option,
        "weightage": 100,
        "group": "default",
        "description": format!("{cluster} build cluster"),
    });
    format!(
        "Private key written to {private}. Keep it on the agent host only (auth.private_key_file).\n\n\
         1. On every scheduler replica, export (e.g. in /etc/sd-scheduler/env):\n\n\
         {auth_key}='{public}'\n{sign_option}='{sign}'\n\n\
         2. Register the cluster (an admin token of the Screwdriver API; adjust scmContext,\n   \
         scmOrganizations, managedBy, email). The scheduler refuses it (409) when another cluster\n   \
         has a name that differs only in case or '-', '.', '_' (it would share these variables):\n\n\
         curl -X POST \"$SCHEDULER/v4/buildclusters\" -H \"Authorization: Bearer $ADMIN_TOKEN\" \\\n     \
         -H 'Content-Type: application/json' -d '{registration}'\n\n\
         3. Point the agent at it (agent.toml: cluster.name = \"{cluster}\", auth.algorithm = \"{alg}\") and run\n   \
         `sd-agent check`.\n\n\
         Public key:\n{public_raw}",
        private = private_path.display(),
        public = public_pem.trim(),
        alg = serde_json::to_value(algorithm)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        public_raw = public_pem,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_and_verify_for_each_algorithm() {
        for (alg, jwt) in [
            (SigningAlgorithm::RS256, jsonwebtoken::Algorithm::RS256),
            (SigningAlgorithm::ES256, jsonwebtoken::Algorithm::ES256),
            (SigningAlgorithm::EdDSA, jsonwebtoken::Algorithm::EdDSA),
        ] {
            let keys = generate(alg).unwrap();
            let signer = crate::signer::Signer::from_pem(
                "c1",
                alg,
                std::time::Duration::from_secs(60),
                None,
                None,
                keys.private_pem.as_bytes(),
            )
            .unwrap();
            let token = signer.token().unwrap();
            let decoding = match jwt {
                jsonwebtoken::Algorithm::ES256 => {
                    jsonwebtoken::DecodingKey::from_ec_pem(keys.public_pem.as_bytes())
                }
                jsonwebtoken::Algorithm::EdDSA => {
                    jsonwebtoken::DecodingKey::from_ed_pem(keys.public_pem.as_bytes())
                }
                _ => jsonwebtoken::DecodingKey::from_rsa_pem(keys.public_pem.as_bytes()),
            }
            .unwrap();
            let claims = jsonwebtoken::decode::<sd_protocol::ClusterClaims>(
                &token,
                &decoding,
                &jsonwebtoken::Validation::new(jwt),
            )
            .unwrap()
            .claims;
            assert_eq!(claims.build_cluster, "c1");
            assert_eq!(claims.exp - claims.iat, 60);
        }
        assert!(generate(SigningAlgorithm::PS256).is_err());
    }

    #[test]
    fn create_writes_the_key_and_returns_the_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let text = create("c1", SigningAlgorithm::ES256, &path, 60).unwrap();
        assert!(text.contains("SD_CLUSTER_C1_PUBLIC_KEY="));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        assert!(matches!(
            create("c1", SigningAlgorithm::ES256, &path, 60),
            Err(KeygenError::Exists(_))
        ));
        assert!(matches!(
            create(
                "c1",
                SigningAlgorithm::PS256,
                &dir.path().join("other.pem"),
                60
            ),
            Err(KeygenError::Algorithm(_))
        ));
        assert!(!dir.path().join("other.pem").exists());
    }

    #[test]
    fn argument_parsers_accept_what_keygen_supports() {
        assert_eq!(parse_algorithm("EdDSA"), Ok(SigningAlgorithm::EdDSA));
        assert!(parse_algorithm("PS256").is_err());
        assert_eq!(parse_cluster_name("ios-farm"), Ok("ios-farm".to_owned()));
        assert!(parse_cluster_name("bad name!").is_err());
    }

    #[test]
    fn private_key_is_never_overwritten_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_private(&path, "x").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            write_private(&path, "y"),
            Err(KeygenError::Exists(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
    }

    #[test]
    fn instructions_carry_the_variable_names_and_a_valid_registration() {
        let text = instructions(
            "ios-farm",
            SigningAlgorithm::ES256,
            300,
            "PEM",
            Path::new("/k.pem"),
        );
        assert!(text.contains("SD_CLUSTER_IOS_FARM_PUBLIC_KEY='PEM'"));
        assert!(text.contains(
            r#"SD_CLUSTER_IOS_FARM_SIGN_OPTIONS='{"algorithm":"ES256","expiresIn":300}'"#
        ));
        let json_start = text.find("-d '").unwrap() + 4;
        let json_end = text[json_start..].find('\'').unwrap() + json_start;
        let body: serde_json::Value = serde_json::from_str(&text[json_start..json_end]).unwrap();
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&body) else {
            panic!()
        };
        sd_protocol::NewCluster::from_json(map).unwrap();
    }
}
