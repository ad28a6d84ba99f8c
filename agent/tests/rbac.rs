//! The agent's RBAC Role grants exactly what its code uses. The executor and `sd-agent check`
//! run through everything they do in a build namespace — launch, watch, relist after 410 Gone,
//! read a pod the relist missed, quote a failing pod's events, delete stopped, failed and
//! finished pods, check access — against the fake API server, connected through a kubeconfig
//! as in production; the verbs the fake's authorizer saw are then compared with the Role in
//! `deploy/kubernetes/agent.yaml` and with what `sd-agent check` reviews.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use sd_agent::executor::kubernetes::{
    KubernetesExecutor, PERMISSIONS, USER_AGENT, WatchOptions, check_access,
};
use sd_agent::executor::{BuildStatus, Launched};
use sd_protocol::StartMessage;
use sd_testkit::eventually;
use sd_testkit::kube_api::FakeKube;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

type Verbs = BTreeSet<(String, String)>;

fn build(id: u64) -> StartMessage {
    let Value::Object(m) = json!({
        "buildId": id, "jobId": 1234, "eventId": 775, "jobName": "main",
        "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com"},
        "apiUri": "https://api.sd.example", "container": "node:22",
        "annotations": {}, "token": "eyJhbGciOiJSUzI1NiJ9.launcher.signature",
    }) else {
        unreachable!()
    };
    StartMessage::from_json(m).unwrap()
}

/// The Role's rules in `deploy/kubernetes/agent.yaml` as (verb, resource[/subresource]). The
/// manifest writes rules in flow style (`resources: ["pods"]`), which is JSON.
fn role_in_manifest() -> Verbs {
    let manifest = include_str!("../../deploy/kubernetes/agent.yaml");
    let role = manifest
        .split("\n---\n")
        .find(|doc| doc.lines().any(|l| l == "kind: Role"))
        .expect("agent.yaml has a Role");
    let list = |line: &str, key: &str| -> Option<Vec<String>> {
        let rest = line.trim().strip_prefix("- ").unwrap_or(line.trim());
        let json = rest.strip_prefix(key)?;
        Some(serde_json::from_str(json.trim()).expect("a flow-style list"))
    };
    let mut granted = Verbs::new();
    let mut resources = Vec::new();
    for line in role.lines() {
        if let Some(r) = list(line, "resources:") {
            resources = r;
        }
        if let Some(verbs) = list(line, "verbs:") {
            for verb in verbs {
                for resource in &resources {
                    granted.insert((verb.clone(), resource.clone()));
                }
            }
        }
    }
    assert!(!granted.is_empty(), "no rules read from the Role:\n{role}");
    granted
}

/// What the fake's authorizer saw, as a Role would name it; self-access reviews need no rule
/// (every authenticated user may create them).
fn used(kube: &FakeKube) -> Verbs {
    kube.verbs_used()
        .into_iter()
        .filter(|(_, resource, _)| resource != "selfsubjectaccessreviews")
        .map(|(verb, resource, sub)| {
            let what = if sub.is_empty() {
                resource
            } else {
                format!("{resource}/{sub}")
            };
            (verb, what)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_grants_exactly_what_the_code_uses() {
    let kube = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sd_agent::config::KubernetesConfig {
        finished_pod_ttl: Duration::ZERO,
        ..common::kubeconfig_for(dir.path(), &kube.url)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let options = WatchOptions {
        check_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        cancel: cancel.clone(),
    };
    let screwdriver = sd_agent::config::ScrewdriverConfig::default();
    let executor = KubernetesExecutor::connect(&config, &screwdriver, tx, options)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut wait = async |id: u64, want: fn(&BuildStatus) -> bool| {
        eventually(WAIT, || {
            while let Ok(e) = rx.try_recv() {
                seen.push(e);
            }
            let found = seen.iter().any(|e| e.build_id == id && want(&e.status));
            async move { found.then_some(()) }
        })
        .await
        .unwrap_or_else(|| panic!("build {id}: no such event"));
    };

    // Launch, run, finish: the finished pod is deleted (TTL 0).
    assert_eq!(executor.launch(&build(1)).await.unwrap(), Launched::Created);
    kube.set_phase("sd-1", "Running");
    wait(1, |s| *s == BuildStatus::Running).await;
    kube.terminate("sd-1", 0);
    wait(1, |s| *s == BuildStatus::Finished).await;
    // A pod that cannot start: its events are quoted, it is deleted.
    executor.launch(&build(2)).await.unwrap();
    kube.set_waiting("sd-2", "build", "ErrImagePull", "not found");
    wait(2, |s| matches!(s, BuildStatus::Failed { .. })).await;
    // A stop deletes the pod.
    executor.launch(&build(3)).await.unwrap();
    assert!(executor.stop(3).await.unwrap());
    // A pod gone while the history was compacted: 410, relist, a read of the one missing.
    executor.launch(&build(4)).await.unwrap();
    kube.set_phase("sd-4", "Running");
    wait(4, |s| *s == BuildStatus::Running).await;
    assert!(kube.delete_unwatched("sd-4"));
    kube.compact();
    wait(4, |s| matches!(s, BuildStatus::Failed { .. })).await;
    // sd-agent check.
    check_access(&config).await.unwrap();
    eventually(WAIT, || async {
        (kube.pod("sd-1").is_none() && kube.pod("sd-2").is_none()).then_some(())
    })
    .await
    .expect("finished and failed pods are deleted");

    let used = used(&kube);
    let granted = role_in_manifest();
    assert_eq!(
        used, granted,
        "the Role in deploy/kubernetes/agent.yaml must grant exactly what the agent's calls use"
    );
    let reviewed: Verbs = PERMISSIONS
        .iter()
        .map(|(verb, resource, sub)| {
            let what = if sub.is_empty() {
                (*resource).to_owned()
            } else {
                format!("{resource}/{sub}")
            };
            ((*verb).to_owned(), what)
        })
        .collect();
    assert_eq!(
        used, reviewed,
        "`sd-agent check` reviews exactly what the agent's calls use"
    );
    cancel.cancel();
}

/// With any one rule of the Role missing, the agent's work fails where it needs it: the fake
/// answers 403 Forbidden as the API server would, and `sd-agent check` names the rule.
#[tokio::test]
async fn a_missing_rule_is_named_by_check() {
    for (verb, resource) in role_in_manifest() {
        let kube = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::kubeconfig_for(dir.path(), &kube.url);
        kube.deny(&verb, &resource);
        let err = check_access(&config).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("{verb} {resource}")) || err.contains("refused to list pods"),
            "{verb} {resource}: {err}"
        );
    }
}

/// Requests name the agent (`User-Agent: sd-agent/<version>`), so API audit logs do.
#[tokio::test]
async fn requests_carry_the_agents_user_agent() {
    let kube = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    check_access(&common::kubeconfig_for(dir.path(), &kube.url))
        .await
        .unwrap();
    let agents: BTreeSet<Option<String>> =
        kube.requests().into_iter().map(|r| r.user_agent).collect();
    assert_eq!(agents, BTreeSet::from([Some(USER_AGENT.to_owned())]));
    assert!(USER_AGENT.starts_with("sd-agent/") && USER_AGENT.len() > "sd-agent/".len());
}
