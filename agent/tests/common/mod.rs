//! Pieces several agent test files build the same way.

#![allow(dead_code)] // each test file uses only some of them

use std::sync::Arc;
use std::time::Duration;

use sd_agent::config::KubernetesConfig;
use sd_agent::scheduler_client::SchedulerClient;
use sd_agent::signer::Signer;
use sd_protocol::SigningAlgorithm;
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
    SchedulerClient::new(url, cluster, Arc::new(signer), None, Duration::from_secs(5)).unwrap()
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
