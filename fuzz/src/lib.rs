//! One fuzz target per parser that takes outside input, each a function of the raw bytes.
//!
//! cargo-fuzz runs them under libFuzzer (`scripts/fuzz`, crate `fuzz/libfuzzer`, nightly);
//! `cargo test -p sd-fuzz` runs every file of the checked-in corpus (`fuzz/corpus/<target>/`)
//! through them on stable, so CI replays what earlier fuzzing found. A target panics only when
//! a property breaks: a parser panicking, or an accepted input that does not survive its round
//! trip, or a refused token whose reason quotes the token.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sd_agent::config::KubernetesConfig;
use sd_agent::executor::kubernetes::watch::{Verdict, assess};
use sd_protocol::error::parse_object;
use sd_protocol::{
    AckBody, Cluster, ClusterPatch, EventBody, NackBody, NewCluster, QueueMessage, SignOptions,
    StartMessage, StopRequest,
};
use sd_scheduler::auth::{ApiVerifier, TokenPolicy};
use sd_scheduler::cluster_auth::{ClusterVerifier, EnvLookup};
use serde_json::{Value, json};

/// A fuzz target: the raw bytes of one input.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: &[(&str, Target)] = &[
    ("start_message", start_message),
    ("stop_message", stop_message),
    ("cluster_create", cluster_create),
    ("cluster_update", cluster_update),
    ("worker_bodies", worker_bodies),
    ("queue_message", queue_message),
    ("sign_options", sign_options),
    ("cluster_token", cluster_token),
    ("api_token", api_token),
    ("agent_config", agent_config),
    ("scheduler_config", scheduler_config),
    ("pod_status", pod_status),
];

/// The longest refusal of a token: one that quoted the token could carry any text to logs.
const MAX_REFUSAL: usize = 400;

/// `POST /v1/queue/message`: what is accepted survives the trip to the agent unchanged.
pub fn start_message(data: &[u8]) {
    let Ok(body) = parse_object(data) else { return };
    if let Ok(message) = StartMessage::from_json(body) {
        let Ok(Value::Object(again)) = serde_json::to_value(&message) else {
            panic!("an accepted start message does not serialise to an object");
        };
        assert_eq!(StartMessage::from_json(again).as_ref(), Ok(&message));
    }
}

/// `DELETE /v1/queue/message`.
pub fn stop_message(data: &[u8]) {
    if let Ok(body) = parse_object(data) {
        let _ = StopRequest::from_json(body);
    }
}

/// `POST /v4/buildclusters`: an accepted record is one every rule admits.
pub fn cluster_create(data: &[u8]) {
    let Ok(body) = parse_object(data) else { return };
    if let Ok(record) = NewCluster::from_json(body) {
        assert_eq!(record.clone().validate().as_ref(), Ok(&record));
    }
}

/// `PUT /v4/buildclusters/{name}` on a registered record: the result keeps the name and every
/// rule, or the update is refused.
pub fn cluster_update(data: &[u8]) {
    static CURRENT: OnceLock<NewCluster> = OnceLock::new();
    let current = CURRENT.get_or_init(|| {
        NewCluster::from_json(object(json!({
            "name": "alpha", "scmContext": "github:github.com", "scmOrganizations": ["acme"],
            "authKey": "SD_CLUSTER_ALPHA", "managedBy": "external", "managedByEmail": "ops@example.com",
        })))
        .expect("a valid record")
    });
    let Ok(body) = parse_object(data) else { return };
    if let Ok(next) = ClusterPatch::from_json(body).and_then(|p| p.apply(current)) {
        assert_eq!(next.name, current.name);
        assert_eq!(next.clone().validate().as_ref(), Ok(&next));
    }
}

/// The agents' bodies: build events, acks, nacks.
pub fn worker_bodies(data: &[u8]) {
    let Ok(body) = parse_object(data) else { return };
    let _ = EventBody::from_json(body.clone());
    let _ = AckBody::from_json(body.clone());
    let _ = NackBody::from_json(body);
}

/// A job read back from Redis (master or local queue) by the scheduler or the agent.
pub fn queue_message(data: &[u8]) {
    let Ok(message) = serde_json::from_slice::<QueueMessage>(data) else {
        return;
    };
    let wire = serde_json::to_string(&message).expect("a parsed message serialises");
    let again: QueueMessage = serde_json::from_str(&wire).expect("and parses again");
    assert_eq!(again, message);
    let _ = message.start();
}

/// The JSON a cluster's `signOption` variable holds.
pub fn sign_options(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SignOptions::from_json(text);
    }
}

/// An agent's bearer token on `/v1/jobs/{cluster}`: never accepted (no fuzzer forges ES256),
/// refused in words of our own.
pub fn cluster_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let keys = keys();
    let refused = keys
        .clusters
        .verify(&keys.env, "alpha", &[&keys.record], token)
        .expect_err("a fuzzed cluster token was accepted");
    assert_bounded(&refused.to_string());
}

/// A Screwdriver API token on the registry and intake.
pub fn api_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let refused = keys()
        .api
        .verify(token)
        .expect_err("a fuzzed API token was accepted");
    assert_bounded(&refused.to_string());
}

/// `agent.toml`, as an operator (or a config management tool) writes it.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sd_agent::config::Config::parse(text, "fuzz.toml".as_ref(), []);
    }
}

/// `scheduler.toml`.
pub fn scheduler_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sd_scheduler::config::Config::parse(text, "fuzz.toml".as_ref(), []);
    }
}

/// A pod as the agent's watcher reads it back from the Kubernetes API, judged at an age the
/// first two bytes give: a pod that Succeeded is a finished build, whatever else it says.
pub fn pod_status(data: &[u8]) {
    let (age, json) = data.split_at(data.len().min(2));
    let age = Duration::from_secs(age.iter().fold(0_u64, |a, b| a * 256 + u64::from(*b)));
    let Ok(pod) = serde_json::from_slice::<Pod>(json) else {
        return;
    };
    let verdict = assess(&pod, age, &KubernetesConfig::default());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase == Some("Succeeded") {
        assert!(matches!(verdict, Verdict::Finished { .. }), "{verdict:?}");
    }
}

// === fixtures ===

struct Keys {
    clusters: ClusterVerifier,
    env: EnvLookup,
    record: Cluster,
    api: ApiVerifier,
}

/// Keys made once per process: a cluster's ES256 pair and the API's RSA pair.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let cluster = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("an ES256 key")
            .public_key_pem();
        let env: EnvLookup = Arc::new(move |name| match name {
            "SD_CLUSTER_ALPHA" => Some(cluster.clone()),
            "SD_CLUSTER_ALPHA_SIGN" => Some(r#"{"algorithm":"ES256"}"#.into()),
            _ => None,
        });
        let fields = NewCluster::from_json(object(json!({
            "name": "alpha", "scmContext": "github:github.com", "authKey": "SD_CLUSTER_ALPHA",
            "signOption": "SD_CLUSTER_ALPHA_SIGN", "managedBy": "screwdriver",
            "managedByEmail": "ops@example.com",
        })))
        .expect("a valid record");
        let api = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .expect("an RSA key")
            .public_key_pem();
        let path = std::env::temp_dir().join(format!("sd-fuzz-api-{}.pem", std::process::id()));
        std::fs::write(&path, api).expect("the API key is written");
        let policy = TokenPolicy {
            max_lifetime: Duration::from_secs(3600),
            issuer: None,
            audience: None,
            environment: None,
        };
        let api = ApiVerifier::from_file(&path, policy).expect("the API key loads");
        let _ = std::fs::remove_file(&path);
        Keys {
            clusters: ClusterVerifier::default(),
            env,
            record: Cluster { id: 1, fields },
            api,
        }
    })
}

fn object(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("fixtures are objects"),
    }
}

fn assert_bounded(refusal: &str) {
    assert!(
        refusal.chars().count() <= MAX_REFUSAL && !refusal.chars().any(char::is_control),
        "a refusal quotes the token: {refusal:.200}"
    );
}
