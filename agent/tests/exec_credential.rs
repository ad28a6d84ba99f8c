//! The Kubernetes executor authenticating as on Amazon EKS from outside the cluster: a
//! kubeconfig whose user runs an exec credential plugin (`aws eks get-token` there; a small
//! script here, handing out `tok-1`, `tok-2`… that expire in 11 s). The test API server
//! accepts only those tokens (401 otherwise, as kube-apiserver); the agent creates pods with
//! them, and asks the plugin again once its credential is about to expire.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sd_agent::config::{KubernetesConfig, ScrewdriverConfig};
use sd_agent::executor::Launched;
use sd_agent::executor::kubernetes::{KubernetesExecutor, WatchOptions};
use sd_testkit::kube_api::FakeKube;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// An ExecCredential plugin: each run hands out the next token, expiring in 11 s (the client
/// refreshes a credential with under 10 s left).
const PLUGIN: &str = r#"#!/bin/sh
set -eu
dir=$(dirname "$0")
n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$dir/count"
expires=$(date -u -d '+11 seconds' +%Y-%m-%dT%H:%M:%SZ)
printf '{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","status":{"token":"tok-%s","expirationTimestamp":"%s"}}\n' "$n" "$expires"
"#;

fn kubeconfig(dir: &std::path::Path, server: &str) -> KubernetesConfig {
    let plugin = dir.join("get-token.sh");
    std::fs::write(&plugin, PLUGIN).unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: eks, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: agent, user: {{exec: {{apiVersion: client.authentication.k8s.io/v1beta1, \
             command: \"{}\", interactiveMode: Never}}}}}}]\n\
             contexts: [{{name: eks, context: {{cluster: eks, user: agent}}}}]\ncurrent-context: eks\n",
            plugin.display()
        ),
    )
    .unwrap();
    KubernetesConfig {
        kubeconfig: Some(path),
        ..common::kube_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_plugins_token_creates_pods_and_is_refreshed_before_it_expires() {
    let kube = FakeKube::start().await;
    kube.require_tokens((1..=100).map(|n| format!("tok-{n}")));
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), &kube.url);
    let (tx, _rx) = mpsc::unbounded_channel();
    let options = WatchOptions {
        check_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        cancel: CancellationToken::new(),
    };
    let executor = KubernetesExecutor::connect(&config, &ScrewdriverConfig::default(), tx, options)
        .await
        .unwrap();
    let build = |id: u64| {
        let mut message = common::start_message(json!({}));
        message.build_id = id;
        message
    };

    assert_eq!(executor.launch(&build(1)).await.unwrap(), Launched::Created);
    let token_of = |pod: &str| {
        kube.requests()
            .into_iter()
            .find(|r| {
                r.method == "POST"
                    && r.body
                        .as_ref()
                        .is_some_and(|b| b["metadata"]["name"] == pod)
            })
            .and_then(|r| r.bearer)
    };
    let first = token_of("sd-1").expect("the create carried the plugin's token");

    // Past the point where under 10 s of the credential are left: the plugin runs again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(executor.launch(&build(2)).await.unwrap(), Launched::Created);
    let second = token_of("sd-2").expect("the create carried the plugin's token");
    assert_ne!(first, second, "the expiring credential was not refreshed");
    assert!(kube.pod("sd-1").is_some() && kube.pod("sd-2").is_some());

    // Every request was authenticated with a token the plugin handed out.
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.bearer.as_deref().is_some_and(|t| t.starts_with("tok-"))),
        "a request went without the plugin's token"
    );
    let runs: u32 = std::fs::read_to_string(dir.path().join("count"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(runs >= 2, "the plugin ran {runs} time(s)");
}
