//! Pieces several agent test files build the same way.

#![allow(dead_code)] // each test file uses only some of them

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_agent::config::KubernetesConfig;
use sd_agent::scheduler_client::SchedulerClient;
use sd_agent::signer::Signer;
use sd_protocol::{SigningAlgorithm, StartMessage};
use sd_screwdriver::{ApiUris, BuildUpdates};

pub const HOUR: Duration = Duration::from_secs(3600);

/// The Kubernetes executor's settings in tests: namespace `builds`, pods `sd-{buildId}`.
/// Age-based rules (pending timeout, image pull grace, finished-pod TTL) are an hour, so they
/// fire only when a test backdates a pod, never by waiting.
pub fn kube_config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: "builds".into(),
        prefix: "sd-".into(),
        launcher_image: "screwdrivercd/launcher:v6".into(),
        pending_timeout: HOUR,
        image_pull_grace: HOUR,
        finished_pod_ttl: HOUR,
        ..Default::default()
    }
}

/// The Screwdriver APIs an agent under test allows (plain HTTP allowed, as the fakes speak it).
pub fn apis(urls: &[&str]) -> ApiUris {
    ApiUris::new(urls, true).unwrap()
}

/// The reporter's client for the Screwdriver APIs at `urls`.
pub fn updates(urls: &[&str]) -> BuildUpdates {
    BuildUpdates::new(apis(urls), Duration::from_secs(10), "sd-agent-test").unwrap()
}

/// A scheduler client for `cluster` at `url`, signing ES256 tokens with `private_pem`.
pub fn scheduler_client(url: &str, cluster: &str, private_pem: &str) -> SchedulerClient {
    let signer = Signer::from_pem(
        cluster,
        SigningAlgorithm::ES256,
        Duration::from_secs(300),
        None,
        None,
        private_pem.as_bytes(),
    )
    .unwrap();
    SchedulerClient::new(
        url,
        cluster,
        Arc::new(signer),
        &sd_agent::scheduler_client::ClientTls::default(),
        Duration::from_secs(5),
    )
    .unwrap()
}

/// A Kubernetes config whose `kubeconfig` (written into `dir`) points at `server`, as an
/// operator's would: the agent's own connection path, not a client handed to it.
pub fn kubeconfig_for(dir: &std::path::Path, server: &str) -> KubernetesConfig {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\n\
             current-context: x\n"
        ),
    )
    .unwrap();
    KubernetesConfig {
        kubeconfig: Some(kubeconfig),
        ..kube_config()
    }
}

/// The workspace's root (the agent crate sits in it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate sits in the workspace")
        .to_path_buf()
}

/// The manifests of `deploy/kubernetes/`, sorted.
pub fn deploy_manifests() -> Vec<PathBuf> {
    let dir = workspace().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// A start message as the scheduler delivers it, with these job annotations.
pub fn start_message(annotations: serde_json::Value) -> StartMessage {
    let serde_json::Value::Object(m) = serde_json::json!({
        "buildId": 8609, "jobId": 1234, "eventId": 775, "jobName": "main",
        "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com"},
        "apiUri": "https://api.sd.example", "container": "node:20",
        "annotations": annotations, "token": "eyJhbGciOiJSUzI1NiJ9.eyJidWlsZElkIjo4NjA5fQ.c2ln",
    }) else {
        unreachable!()
    };
    StartMessage::from_json(m).expect("a valid start message")
}
