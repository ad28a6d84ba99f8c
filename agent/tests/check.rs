//! `sd-agent check`'s Kubernetes line, through a real kubeconfig and the real `kube` client
//! against the fake API server: reachability, then an access review of every permission the
//! executor uses, naming each one missing.

mod common;

use sd_agent::config::KubernetesConfig;
use sd_agent::executor::kubernetes::{PERMISSIONS, check_access};
use sd_testkit::kube_api::FakeKube;

fn config(dir: &std::path::Path, server: &str) -> KubernetesConfig {
    KubernetesConfig {
        namespace: "builds".into(),
        ..common::kubeconfig_for(dir, server)
    }
}

#[tokio::test]
async fn check_reviews_every_permission_the_executor_needs() {
    let kube = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &kube.url);

    let ok = check_access(&config).await.unwrap();
    assert!(
        ok.contains("reachable") && ok.contains("may create, watch and delete"),
        "{ok}"
    );
    let reviewed: Vec<String> = kube
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/selfsubjectaccessreviews"))
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(
        reviewed.len(),
        PERMISSIONS.len(),
        "one review per permission: {reviewed:?}"
    );

    kube.deny("delete", "pods");
    kube.deny("list", "events");
    let err = check_access(&config).await.unwrap_err().to_string();
    assert!(
        err.contains("may not delete pods, list events in namespace builds")
            && err.contains("Role"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_api_is_named_before_any_review() {
    let dir = tempfile::tempdir().unwrap();
    let server = format!("http://127.0.0.1:{}", sd_testkit::free_port());
    let err = check_access(&config(dir.path(), &server))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot list pods in namespace builds"),
        "{err}"
    );
    assert!(err.contains(&server), "names the API's URL: {err}");
}
