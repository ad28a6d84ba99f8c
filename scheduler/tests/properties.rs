//! Property tests of the scheduler's token checks, the two parsers that take a client's JWT:
//! agents' cluster tokens (`/v1/jobs/{cluster}…`) and Screwdriver API tokens (the registry,
//! builds, intake). A token valid but for one character, a forged header (`none`, HMAC keyed
//! with the public key, another algorithm), any text at all, or claims outside the rules are
//! refused, and no refusal repeats more than a bounded amount of the token.
//!
//! proptest's case count per property (256, or `PROPTEST_CASES`); `fuzz/` goes further.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use sd_protocol::{Cluster, NewCluster};
use sd_scheduler::auth::{ApiVerifier, TokenPolicy};
use sd_scheduler::cluster_auth::{ClusterAuthError, ClusterVerifier, EnvLookup};
use sd_testkit::{ClusterKeys, RsaKeys, shared_keys, unix_now};
use serde_json::{Value, json};

const CLUSTER: &str = "alpha";
/// The longest refusal: a refusal that quoted the token could carry any text into logs.
const MAX_REASON: usize = 400;

struct Fixture {
    clusters: ClusterVerifier,
    env: EnvLookup,
    record: Cluster,
    cluster_keys: ClusterKeys,
    api: ApiVerifier,
    api_keys: RsaKeys,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cluster_keys = ClusterKeys::generate(jsonwebtoken::Algorithm::ES256);
        let public = cluster_keys.public_pem.clone();
        let env: EnvLookup = Arc::new(move |name| match name {
            "SD_CLUSTER_ALPHA_PUBLIC_KEY" => Some(public.clone()),
            "SD_CLUSTER_ALPHA_SIGN" => Some(r#"{"algorithm":"ES256","expiresIn":300}"#.into()),
            _ => None,
        });
        let fields = NewCluster::from_json(
            json!({
                "name": CLUSTER, "scmContext": "github:github.com", "authKey": "SD_CLUSTER_ALPHA_PUBLIC_KEY",
                "signOption": "SD_CLUSTER_ALPHA_SIGN", "managedBy": "screwdriver",
                "managedByEmail": "ops@example.com",
            })
            .as_object()
            .expect("an object")
            .clone(),
        )
        .expect("a valid record");
        let api_keys = shared_keys("api");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (_, api_public) = api_keys.write(dir.path(), "api");
        let api = ApiVerifier::from_file(
            &api_public,
            TokenPolicy {
                max_lifetime: Duration::from_secs(3600),
                issuer: None,
                audience: None,
                environment: None,
            },
        )
        .expect("the API key loads");
        Fixture {
            clusters: ClusterVerifier::default(),
            env,
            record: Cluster { id: 1, fields },
            cluster_keys,
            api,
            api_keys,
        }
    })
}

/// The cluster verifier's answer to `token` for [`CLUSTER`].
fn cluster_verdict(token: &str) -> Result<(), ClusterAuthError> {
    let f = fixture();
    f.clusters
        .verify(&f.env, CLUSTER, &[&f.record], token)
        .map(|_| ())
}

fn api_verdict(token: &str) -> Result<(), String> {
    fixture()
        .api
        .verify(token)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,600}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A header as an attacker writes it: any algorithm name (or none), key hints, anything.
fn forged_header() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec![
            "none", "None", "HS256", "HS512", "RS256", "ES256", "ES384", "EdDSA", "PS256", "",
        ])),
        prop::collection::btree_map(
            prop::sample::select(vec!["kid", "jku", "x5u", "typ", "crit", "jwk", "cty"]),
            any_json(),
            0..3,
        ),
    )
        .prop_map(|(alg, rest)| {
            let mut header: serde_json::Map<String, Value> =
                rest.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if let Some(alg) = alg {
                header.insert("alg".into(), alg.into());
            }
            Value::Object(header)
        })
}

fn assert_bounded(reason: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        reason.chars().count() <= MAX_REASON && !reason.chars().any(char::is_control),
        "refusal too long or unprintable ({} chars): {reason:.200}",
        reason.chars().count()
    );
    Ok(())
}

proptest! {
    /// A valid token with any one character changed is refused by both verifiers.
    #[test]
    fn a_token_changed_in_one_character_is_refused(
        at in any::<prop::sample::Index>(),
        with in prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.".chars().collect::<Vec<_>>(),
        ),
    ) {
        let f = fixture();
        let tokens = [
            (f.cluster_keys.token(CLUSTER, 60), true),
            (f.api_keys.api_token(&["user"]), false),
        ];
        for (token, cluster) in tokens {
            let verdict = |t: &str| if cluster { cluster_verdict(t).map_err(|e| e.to_string()) } else { api_verdict(t) };
            prop_assert!(verdict(&token).is_ok(), "the unchanged token must pass");
            let mut chars: Vec<char> = token.chars().collect();
            let i = at.index(chars.len());
            prop_assume!(chars[i] != with);
            chars[i] = with;
            let changed: String = chars.into_iter().collect();
            let refused = verdict(&changed);
            prop_assert!(refused.is_err(), "accepted with character {i} changed: {changed}");
            assert_bounded(&refused.unwrap_err())?;
        }
    }

    /// Three segments with a forged header and any signature bytes, or signed with HMAC keyed
    /// by the public key (the algorithm-confusion attack), are refused.
    #[test]
    fn a_forged_header_is_refused(header in forged_header(), signature in prop::collection::vec(any::<u8>(), 0..80), hmac in any::<bool>()) {
        let f = fixture();
        let now = unix_now();
        let claims = json!({"buildCluster": CLUSTER, "username": "x", "scope": ["user"], "iat": now, "exp": now + 60});
        let body = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let token = if hmac {
            let key = jsonwebtoken::EncodingKey::from_secret(f.cluster_keys.public_pem.as_bytes()).expect("an HMAC key");
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            h.kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
            jsonwebtoken::encode(&h, &claims, &key).expect("HMAC signs")
        } else {
            format!("{body}.{}", b64(&signature))
        };
        let refused = cluster_verdict(&token);
        prop_assert!(refused.is_err(), "forged token accepted: {header}");
        assert_bounded(&refused.unwrap_err().to_string())?;
        let refused = api_verdict(&token);
        prop_assert!(refused.is_err(), "forged API token accepted: {header}");
        assert_bounded(&refused.unwrap_err())?;
    }

    /// Any text at all is refused, briefly.
    #[test]
    fn any_text_is_refused(text in prop_oneof![
        "\\PC{0,2000}",
        ("[A-Za-z0-9_-]{0,400}", "[A-Za-z0-9_-]{0,400}", "[A-Za-z0-9_=+/-]{0,200}")
            .prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        (any_json(), any_json()).prop_map(|(h, c)| format!("{}.{}.", b64(h.to_string().as_bytes()), b64(c.to_string().as_bytes()))),
    ]) {
        let refused = cluster_verdict(&text);
        prop_assert!(refused.is_err());
        assert_bounded(&refused.unwrap_err().to_string())?;
        let refused = api_verdict(&text);
        prop_assert!(refused.is_err());
        assert_bounded(&refused.unwrap_err())?;
    }

    /// Correctly signed claims pass only within the rules: this cluster, issued no later than
    /// now (with 30 s of skew), expiring no later than the cluster's expiresIn allows.
    #[test]
    fn signed_claims_pass_only_within_the_rules(
        cluster in prop_oneof![Just(Value::from(CLUSTER)), Just(Value::from("beta")), any_json()],
        iat in prop_oneof![Just(None), (-400_i64..400).prop_map(Some)],
        lifetime in prop_oneof![Just(None), (-100_i64..1000).prop_map(Some)],
        extra in any_json(),
    ) {
        let f = fixture();
        let now = unix_now() as i64;
        let mut claims = json!({"buildCluster": cluster, "extra": extra});
        if let Some(iat) = iat {
            claims["iat"] = (now + iat).into();
        }
        if let Some(lifetime) = lifetime {
            claims["exp"] = (now + iat.unwrap_or(0) + lifetime).into();
        }
        let token = f.cluster_keys.sign_as(f.cluster_keys.algorithm, &claims);
        match cluster_verdict(&token) {
            Ok(()) => {
                let (iat, lifetime) = (iat.expect("iat is required"), lifetime.expect("exp is required"));
                prop_assert_eq!(&claims["buildCluster"], &Value::from(CLUSTER));
                prop_assert!(iat <= 30, "issued {iat} s in the future");
                prop_assert!(lifetime <= 330, "lives {lifetime} s");
                prop_assert!(iat + lifetime >= -30, "expired {} s ago", -(iat + lifetime));
            }
            Err(e) => assert_bounded(&e.to_string())?,
        }
    }
}

/// Found by `a_forged_header_is_refused`: a header value of the wrong type came back quoted in
/// the refusal (jsonwebtoken's message), carrying the client's text into answers and logs.
#[test]
fn a_malformed_header_is_not_quoted_back() {
    let secret = "Zq".repeat(300);
    let header = json!({"alg": "ES256", "crit": secret});
    let claims = json!({"buildCluster": CLUSTER});
    let token = format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(b"sig")
    );
    let cluster = cluster_verdict(&token).unwrap_err().to_string();
    assert!(!cluster.contains("ZqZq"), "{cluster}");
    assert!(
        cluster.contains("malformed: the header or the claims hold a value of the wrong type"),
        "{cluster}"
    );
    let api = api_verdict(&token).unwrap_err();
    assert!(!api.contains("ZqZq"), "{api}");
}
