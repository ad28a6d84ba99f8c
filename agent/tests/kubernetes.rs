//! The Kubernetes executor with the real `kube` client against a fake API server
//! (`sd_testkit::kube_api`): pod shape, idempotent launch, rejections, lifecycle events,
//! fail-fast reasons, stop, finished-pod GC, and `check`.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sd_agent::config::{KubernetesConfig, ScrewdriverConfig, Toleration};
use sd_agent::executor::kubernetes::{KubernetesExecutor, WatchOptions};
use sd_agent::executor::{BuildEvent, BuildStatus, ExecError, Launched};
use sd_protocol::StartMessage;
use sd_testkit::eventually;
use sd_testkit::kube_api::FakeKube;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use common::HOUR;

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.launcher.signature";

fn config() -> KubernetesConfig {
    common::kube_config()
}

fn screwdriver() -> ScrewdriverConfig {
    ScrewdriverConfig {
        store_uri: "https://store.sd.example".into(),
        ui_uri: "https://cd.sd.example".into(),
        ..Default::default()
    }
}

fn build(id: u64, annotations: Value) -> StartMessage {
    let Value::Object(m) = json!({
        "buildId": id, "jobId": 1234, "eventId": 775, "jobName": "main",
        "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com"},
        "apiUri": "https://api.sd.example", "container": "node:20",
        "annotations": annotations, "token": TOKEN,
    }) else {
        unreachable!()
    };
    StartMessage::from_json(m).unwrap()
}

fn client(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

/// An executor watching a fake API server, with the events it sent.
struct Harness {
    kube: FakeKube,
    executor: KubernetesExecutor,
    rx: Mutex<mpsc::UnboundedReceiver<BuildEvent>>,
    seen: Mutex<Vec<BuildEvent>>,
    cancel: CancellationToken,
}

impl Harness {
    async fn start(config: KubernetesConfig) -> Self {
        let kube = FakeKube::start().await;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let options = WatchOptions {
            check_interval: Duration::from_millis(20),
            request_timeout: Duration::from_secs(5),
            cancel: cancel.clone(),
        };
        let executor = KubernetesExecutor::with_client_options(
            client(&kube.url),
            &config,
            &screwdriver(),
            tx,
            options,
        );
        // Let the watcher list and open its watch, so every test starts from a live watch.
        eventually(WAIT, || async {
            kube.requests().iter().any(|r| r.is_watch()).then_some(())
        })
        .await
        .expect("the executor opens a watch on build pods");
        Self {
            kube,
            executor,
            rx: Mutex::new(rx),
            seen: Mutex::new(Vec::new()),
            cancel,
        }
    }

    fn events(&self) -> Vec<BuildEvent> {
        let mut seen = self.seen.lock().unwrap();
        while let Ok(e) = self.rx.lock().unwrap().try_recv() {
            seen.push(e);
        }
        seen.clone()
    }

    fn statuses(&self, build_id: u64) -> Vec<BuildStatus> {
        self.events()
            .into_iter()
            .filter(|e| e.build_id == build_id)
            .map(|e| e.status)
            .collect()
    }

    /// Waits for a status of `build_id` that `pick` accepts.
    async fn wait_for<T>(&self, build_id: u64, pick: impl Fn(&BuildStatus) -> Option<T>) -> T {
        eventually(WAIT, || async {
            self.statuses(build_id).iter().find_map(&pick)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "build {build_id}: no such event; got {:?}",
                self.statuses(build_id)
            )
        })
    }

    async fn wait_running(&self, build_id: u64) {
        self.wait_for(build_id, |s| (*s == BuildStatus::Running).then_some(()))
            .await;
    }

    /// The reason of the build's reported (`report: true`) failure.
    async fn wait_reported_failure(&self, build_id: u64) -> String {
        self.wait_for(build_id, |s| match s {
            BuildStatus::Failed {
                reason,
                report: true,
            } => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    async fn launch(&self, build_id: u64) {
        let launched = self
            .executor
            .launch(&build(build_id, json!({})))
            .await
            .unwrap();
        assert_eq!(launched, Launched::Created);
    }

    /// Everything the watcher saw before a fresh build started running has been handled:
    /// watch events are processed in order.
    async fn sync(&self, marker: u64) {
        self.launch(marker).await;
        self.kube.set_phase(&format!("sd-{marker}"), "Running");
        self.wait_running(marker).await;
    }

    async fn wait_gone(&self, pod: &str) {
        eventually(WAIT, || async {
            self.kube.pod(pod).is_none().then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("pod {pod} was not deleted"));
    }

    fn deletes_of(&self, pod: &str) -> usize {
        let path = format!("/api/v1/namespaces/builds/pods/{pod}");
        self.kube
            .requests()
            .iter()
            .filter(|r| r.method == "DELETE" && r.path == path)
            .count()
    }
}

fn typed(pod: Value) -> Pod {
    serde_json::from_value(pod).unwrap()
}

#[tokio::test]
async fn pod_follows_the_launcher_contract() {
    let mut cfg = config();
    cfg.node_selector = BTreeMap::from([("pool".into(), "builds".into())]);
    cfg.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("builds".into()),
        effect: Some("NoSchedule".into()),
    }];
    cfg.service_account = Some("sd-build".into());
    cfg.image_pull_secrets = vec!["regcred".into()];
    cfg.extra_labels = BTreeMap::from([("team".into(), "ios".into())]);
    let h = Harness::start(cfg).await;
    let annotations = json!({"screwdriver.cd/cpu": "high", "screwdriver.cd/ram": 64, "screwdriver.cd/timeout": 30});
    assert_eq!(
        h.executor.launch(&build(8609, annotations)).await.unwrap(),
        Launched::Created
    );

    let create = h
        .kube
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(create.path, "/api/v1/namespaces/builds/pods");
    let pod = typed(h.kube.pod("sd-8609").expect("pod created"));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("builds"));
    let labels = pod.metadata.labels.as_ref().unwrap();
    for (k, v) in [
        ("app", "screwdriver"),
        ("tier", "builds"),
        ("sdbuild", "sd-8609"),
        ("screwdriver.cd/pipeline", "mobile.app"),
        ("screwdriver.cd/job", "main"),
        ("sd-buildcluster/pipeline-id", "42"),
        ("sd-buildcluster/job-id", "1234"),
        ("team", "ios"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let spec = pod.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    // A backstop after the launcher's 30 minutes, its 30 s grace period and the margin.
    assert_eq!(spec.active_deadline_seconds, Some(30 * 60 + 30 + 600));
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.image.as_deref(), Some("screwdrivercd/launcher:v6"));
    assert_eq!(
        init.command.as_ref().unwrap()[..2],
        ["/bin/sh".to_owned(), "-c".to_owned()]
    );
    assert!(init.command.as_ref().unwrap()[2].contains("cp -a /opt/sd/. /opt/launcher/"));
    let volume = &init.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(volume.mount_path, "/opt/launcher");
    assert!(
        spec.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == volume.name && v.empty_dir.is_some())
    );

    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("node:20"));
    assert!(
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == volume.name && m.mount_path == "/opt/sd")
    );
    assert_eq!(
        c.command.as_ref().unwrap(),
        &["/opt/sd/launcher_entrypoint.sh".to_owned()]
    );
    assert_eq!(
        c.args.as_ref().unwrap()[0],
        format!(
            "/opt/sd/run.sh \"{TOKEN}\" \"https://api.sd.example\" \"https://store.sd.example\" \"30\" \"8609\" \"https://cd.sd.example\""
        )
    );
    let resources = c.resources.as_ref().unwrap();
    for quantities in [
        resources.limits.as_ref().unwrap(),
        resources.requests.as_ref().unwrap(),
    ] {
        assert_eq!(quantities["cpu"].0, "6000m");
        assert_eq!(
            quantities["memory"].0, "16Gi",
            "64 GiB asked, capped at ram.max"
        );
    }
    assert_eq!(spec.node_selector.unwrap()["pool"], "builds");
    let t = &spec.tolerations.unwrap()[0];
    assert_eq!(
        (
            t.key.as_deref(),
            t.operator.as_deref(),
            t.value.as_deref(),
            t.effect.as_deref()
        ),
        (
            Some("dedicated"),
            Some("Equal"),
            Some("builds"),
            Some("NoSchedule")
        )
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("sd-build"));
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    assert_eq!(h.executor.in_flight(), 1);
}

#[tokio::test]
async fn launching_twice_makes_one_pod() {
    let h = Harness::start(config()).await;
    let b = build(7, json!({}));
    assert_eq!(h.executor.launch(&b).await.unwrap(), Launched::Created);
    assert_eq!(
        h.executor.launch(&b).await.unwrap(),
        Launched::AlreadyRunning
    );

    // A second replica (its own executor, same namespace) agrees.
    let (tx, _rx) = mpsc::unbounded_channel();
    let other = KubernetesExecutor::with_client(client(&h.kube.url), &config(), &screwdriver(), tx);
    assert_eq!(other.launch(&b).await.unwrap(), Launched::AlreadyRunning);

    assert_eq!(h.kube.pods().len(), 1);
    assert_eq!(h.executor.in_flight(), 1);
}

#[tokio::test]
async fn rejected_specs_are_rejected_without_the_token() {
    let h = Harness::start(config()).await;
    h.kube.fail_next(
        "POST",
        "/pods",
        422,
        &format!("Pod \"sd-9\" is invalid: spec.containers[0].command: Invalid value: \"{TOKEN}\""),
    );
    match h.executor.launch(&build(9, json!({}))).await {
        Err(ExecError::Rejected(m)) => {
            assert!(m.contains("is invalid"), "{m}");
            assert!(!m.contains(TOKEN), "the token leaked: {m}");
        }
        other => panic!("{other:?}"),
    }

    // An invalid annotation never reaches the API.
    let posts = h
        .kube
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    match h
        .executor
        .launch(&build(10, json!({"screwdriver.cd/cpu": "lots"})))
        .await
    {
        Err(ExecError::Rejected(m)) => assert!(m.contains("screwdriver.cd/cpu"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.kube
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        posts
    );
    assert!(h.kube.pods().is_empty());
    assert_eq!(h.executor.in_flight(), 0);
}

#[tokio::test]
async fn server_errors_are_transient() {
    let h = Harness::start(config()).await;
    // (kube itself retries 429/503/504; a 500 reaches the executor.)
    h.kube.fail_next("POST", "/pods", 500, "etcd is sad");
    let r = h.executor.launch(&build(11, json!({}))).await;
    assert!(
        matches!(&r, Err(ExecError::Transient(m)) if m.contains("etcd is sad")),
        "{r:?}"
    );
    assert_eq!(
        h.executor.launch(&build(11, json!({}))).await.unwrap(),
        Launched::Created
    );

    // No API at all.
    let (tx, _rx) = mpsc::unbounded_channel();
    let down = KubernetesExecutor::with_client(
        client(&format!("http://127.0.0.1:{}", sd_testkit::free_port())),
        &config(),
        &screwdriver(),
        tx,
    );
    assert!(matches!(
        down.launch(&build(12, json!({}))).await,
        Err(ExecError::Transient(_))
    ));
}

#[tokio::test]
async fn running_and_finished_are_reported_once() {
    let h = Harness::start(config()).await;
    h.launch(1).await;
    assert_eq!(h.executor.in_flight(), 1);
    h.kube.set_phase("sd-1", "Running");
    h.wait_running(1).await;
    h.kube.update_pod("sd-1", |p| {
        p["metadata"]["labels"]["touched"] = json!("yes")
    });
    h.kube.terminate("sd-1", 0);
    h.wait_for(1, |s| (*s == BuildStatus::Finished).then_some(()))
        .await;
    h.kube.update_pod("sd-1", |p| {
        p["metadata"]["labels"]["touched"] = json!("again")
    });
    h.sync(2).await;

    assert_eq!(
        h.statuses(1),
        vec![BuildStatus::Running, BuildStatus::Finished]
    );
    assert_eq!(
        h.executor.in_flight(),
        1,
        "only the marker build is still running"
    );
    assert!(
        h.kube.pod("sd-1").is_some(),
        "a finished pod stays until its TTL"
    );
}

#[tokio::test]
async fn a_failed_launcher_run_is_not_reported_again() {
    let h = Harness::start(config()).await;
    h.launch(3).await;
    h.kube.set_phase("sd-3", "Running");
    h.kube.terminate("sd-3", 2);
    let report = h
        .wait_for(3, |s| match s {
            BuildStatus::Failed { report, .. } => Some(*report),
            _ => None,
        })
        .await;
    assert!(!report, "the launcher reported its own failure");
}

#[tokio::test]
async fn a_pod_past_its_deadline_is_reported() {
    let h = Harness::start(config()).await;
    h.launch(4).await;
    h.kube.set_phase("sd-4", "Running");
    h.kube.update_pod("sd-4", |p| {
        p["status"]["phase"] = json!("Failed");
        p["status"]["reason"] = json!("DeadlineExceeded");
        p["status"]["message"] =
            json!("Pod was active on the node longer than the specified deadline");
    });
    let reason = h.wait_reported_failure(4).await;
    assert!(reason.contains("DeadlineExceeded"), "{reason}");
}

#[tokio::test]
async fn pods_that_cannot_start_fail_at_once_with_their_events() {
    let h = Harness::start(config()).await;
    for (id, container, reason, message) in sd_testkit::kube_api::CANNOT_START {
        let pod = format!("sd-{id}");
        h.launch(id).await;
        h.kube
            .add_event(&pod, "Failed", &format!("Error: {reason} for {pod}"));
        h.kube.set_waiting(&pod, container, reason, message);
        let text = h.wait_reported_failure(id).await;
        assert!(
            text.starts_with(&format!("Build failed to start: {reason} (")),
            "{text}"
        );
        assert!(text.contains(message), "{text}");
        assert!(
            text.contains(&format!("Pod events: Failed: Error: {reason} for {pod}")),
            "{text}"
        );
        if container == "launcher" {
            assert!(
                text.contains("container launcher, image \"screwdrivercd/launcher:v6\""),
                "{text}"
            );
        } else {
            assert!(text.contains("(image \"node:20\")"), "{text}");
        }
        assert!(!text.contains(TOKEN));
        h.wait_gone(&pod).await;
        let events_query = h
            .kube
            .requests()
            .into_iter()
            .filter(|r| r.path == "/api/v1/namespaces/builds/events")
            .filter_map(|r| r.param("fieldSelector"))
            .any(|f| f == format!("involvedObject.name={pod}"));
        assert!(events_query, "events of {pod} were listed");
    }
    h.sync(29).await;
    for (id, ..) in sd_testkit::kube_api::CANNOT_START {
        let failures = h
            .statuses(id)
            .into_iter()
            .filter(|s| matches!(s, BuildStatus::Failed { .. }))
            .count();
        assert_eq!(h.statuses(id).len(), 1, "build {id}: {:?}", h.statuses(id));
        assert_eq!(failures, 1);
        assert_eq!(h.deletes_of(&format!("sd-{id}")), 1, "build {id}");
    }
    assert_eq!(h.executor.in_flight(), 1, "only the marker build");
}

#[tokio::test]
async fn image_pull_backoff_waits_for_the_grace() {
    let h = Harness::start(config()).await; // grace: 1h
    h.launch(31).await;
    h.kube.add_event(
        "sd-31",
        "Failed",
        "Failed to pull image \"node:20\": not found",
    );
    h.kube.set_waiting(
        "sd-31",
        "build",
        "ImagePullBackOff",
        "Back-off pulling image \"node:20\"",
    );
    h.sync(32).await;
    assert!(h.statuses(31).is_empty(), "{:?}", h.statuses(31));
    assert!(h.kube.pod("sd-31").is_some());
    assert_eq!(h.executor.in_flight(), 2);

    // The same pod, two hours old.
    h.kube.backdate("sd-31", 2 * HOUR);
    let reason = h.wait_reported_failure(31).await;
    assert_eq!(
        reason,
        "Build failed to start: ImagePullBackOff (image \"node:20\"): Back-off pulling image \"node:20\". Pod events: Failed: Failed to pull image \"node:20\": not found"
    );
    h.wait_gone("sd-31").await;
}

#[tokio::test]
async fn image_pull_backoff_fails_once_the_grace_runs_out_without_news() {
    // No pod change after the back-off starts: only the periodic check can notice.
    let cfg = KubernetesConfig {
        image_pull_grace: Duration::from_secs(2),
        ..config()
    };
    let h = Harness::start(cfg).await;
    h.launch(33).await;
    h.kube.set_waiting(
        "sd-33",
        "build",
        "ImagePullBackOff",
        "Back-off pulling image \"node:20\"",
    );
    let reason = h.wait_reported_failure(33).await;
    assert!(
        reason.starts_with("Build failed to start: ImagePullBackOff (image \"node:20\")"),
        "{reason}"
    );
    h.wait_gone("sd-33").await;
}

#[tokio::test]
async fn pending_too_long_fails_but_running_pods_do_not() {
    let cfg = KubernetesConfig {
        pending_timeout: Duration::from_secs(2),
        ..config()
    };
    let h = Harness::start(cfg).await;
    h.launch(41).await;
    h.launch(42).await;
    h.kube.set_phase("sd-42", "Running");
    h.wait_running(42).await;
    h.kube.add_event(
        "sd-41",
        "FailedScheduling",
        "0/3 nodes are available: 3 Insufficient cpu.",
    );
    let reason = h.wait_reported_failure(41).await;
    assert!(
        reason.starts_with("Build failed to start: pod sd-41 still Pending after 2s"),
        "{reason}"
    );
    assert!(
        reason.ends_with(
            "Pod events: FailedScheduling: 0/3 nodes are available: 3 Insufficient cpu."
        ),
        "{reason}"
    );
    h.wait_gone("sd-41").await;
    assert_eq!(h.statuses(42), vec![BuildStatus::Running]);
    assert!(h.kube.pod("sd-42").is_some());
    assert_eq!(h.statuses(41).len(), 1);
}

#[tokio::test]
async fn stop_deletes_the_pod_and_reports_it_stopped() {
    let h = Harness::start(config()).await;
    h.launch(51).await;
    h.kube.set_phase("sd-51", "Running");
    h.wait_running(51).await;
    assert!(h.executor.stop(51).await.unwrap());
    assert!(h.kube.pod("sd-51").is_none());
    assert_eq!(h.deletes_of("sd-51"), 1);
    assert!(!h.executor.stop(51).await.unwrap(), "nothing left to stop");
    assert!(!h.executor.stop(404).await.unwrap());
    h.sync(52).await;
    assert_eq!(
        h.statuses(51),
        vec![BuildStatus::Running, BuildStatus::Stopped],
        "a stop is reported as such, not as a failure"
    );
    assert_eq!(h.executor.in_flight(), 1);
}

#[tokio::test]
async fn finished_pods_are_deleted_after_the_ttl() {
    let cfg = KubernetesConfig {
        finished_pod_ttl: Duration::from_millis(300),
        ..config()
    };
    let h = Harness::start(cfg).await;
    h.launch(61).await;
    h.launch(62).await;
    h.kube.set_phase("sd-61", "Running");
    h.kube.set_phase("sd-62", "Running");
    h.kube.terminate("sd-61", 0);
    h.wait_for(61, |s| (*s == BuildStatus::Finished).then_some(()))
        .await;
    h.wait_gone("sd-61").await;
    assert_eq!(h.deletes_of("sd-61"), 1);
    h.sync(63).await;
    assert!(
        h.kube.pod("sd-62").is_some(),
        "running pods are never collected"
    );
    assert_eq!(
        h.statuses(61),
        vec![BuildStatus::Running, BuildStatus::Finished]
    );
}

#[tokio::test]
async fn check_reaches_the_api_or_says_what_to_fix() {
    let h = Harness::start(config()).await;
    assert_eq!(
        h.executor.check().await.unwrap(),
        "Kubernetes API reachable, namespace builds"
    );
    let list = h
        .kube
        .requests()
        .into_iter()
        .rfind(|r| r.method == "GET" && !r.is_watch())
        .unwrap();
    assert_eq!(list.path, "/api/v1/namespaces/builds/pods");
    assert_eq!(list.param("limit").as_deref(), Some("1"));

    h.kube.fail_next(
        "GET",
        "limit=1",
        403,
        "pods is forbidden: User \"system:serviceaccount:sd:agent\" cannot list resource \"pods\"",
    );
    let Err(ExecError::Transient(m)) = h.executor.check().await else {
        panic!()
    };
    assert!(
        m.contains("RBAC") && m.contains("watch") && m.contains("forbidden"),
        "{m}"
    );

    let (tx, _rx) = mpsc::unbounded_channel();
    let down = KubernetesExecutor::with_client(
        client(&format!("http://127.0.0.1:{}", sd_testkit::free_port())),
        &config(),
        &screwdriver(),
        tx,
    );
    let Err(ExecError::Transient(m)) = down.check().await else {
        panic!()
    };
    assert!(
        m.contains("cannot list pods in namespace builds") && m.contains("kubeconfig"),
        "{m}"
    );
}

#[tokio::test]
async fn the_watch_recovers_and_notices_pods_that_went_meanwhile() {
    let h = Harness::start(config()).await;
    h.launch(71).await;
    h.launch(72).await;
    h.kube.set_phase("sd-71", "Running");
    h.wait_running(71).await;
    let lists = || {
        h.kube
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/pods") && !r.is_watch())
            .count()
    };
    let before = lists();

    // A pod goes while the watch cannot tell, and the history is compacted: 410, relist.
    assert!(h.kube.delete_unwatched("sd-71"));
    h.kube.compact();
    let reason = h
        .wait_for(71, |s| match s {
            BuildStatus::Failed {
                reason,
                report: false,
            } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        reason,
        "build pod sd-71 disappeared before the build finished"
    );
    assert!(lists() > before, "the watcher listed again");

    // Still watching.
    h.kube.close_watches();
    h.kube.set_phase("sd-72", "Running");
    h.wait_running(72).await;
    h.kube.terminate("sd-72", 0);
    h.wait_for(72, |s| (*s == BuildStatus::Finished).then_some(()))
        .await;
    assert_eq!(h.statuses(71).len(), 2, "{:?}", h.statuses(71));
    assert_eq!(h.executor.in_flight(), 0);
}

#[tokio::test]
async fn pods_present_before_start_are_followed() {
    let h = Harness::start(config()).await;
    h.launch(81).await;
    h.kube.set_phase("sd-81", "Running");
    // Same labels, another prefix (another agent's, or executor-k8s's): not ours.
    let (tx, _rx) = mpsc::unbounded_channel();
    let foreign = KubernetesConfig {
        prefix: "other-".into(),
        ..config()
    };
    let other = KubernetesExecutor::with_client(client(&h.kube.url), &foreign, &screwdriver(), tx);
    assert_eq!(
        other.launch(&build(82, json!({}))).await.unwrap(),
        Launched::Created
    );
    h.kube.set_phase("other-82", "Running");

    // A restarted agent finds its pod by listing and reports where it stands.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = WatchOptions {
        check_interval: Duration::from_millis(20),
        ..WatchOptions::default()
    };
    let restarted = KubernetesExecutor::with_client_options(
        client(&h.kube.url),
        &config(),
        &screwdriver(),
        tx,
        options,
    );
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        BuildEvent {
            build_id: 81,
            status: BuildStatus::Running
        }
    );
    assert_eq!(restarted.in_flight(), 1, "other-82 is not counted");
    assert_eq!(
        restarted.launch(&build(81, json!({}))).await.unwrap(),
        Launched::AlreadyRunning
    );
    h.kube.terminate("sd-81", 0);
    let next = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next,
        BuildEvent {
            build_id: 81,
            status: BuildStatus::Finished
        }
    );
    assert_eq!(restarted.in_flight(), 0);
}

#[tokio::test]
async fn the_watch_stops_with_the_executor() {
    let h = Harness::start(config()).await;
    assert!(h.kube.open_watches() >= 1);
    h.cancel.cancel();
    eventually(WAIT, || async {
        (h.kube.open_watches() == 0).then_some(())
    })
    .await
    .expect("cancelling closes the watch");

    let h = Harness::start(config()).await;
    let Harness { kube, executor, .. } = h;
    drop(executor);
    eventually(WAIT, || async { (kube.open_watches() == 0).then_some(()) })
        .await
        .expect("dropping the executor closes the watch");
}

/// The launcher's SIGTERM trap waits `SD_TERMINATION_GRACE_PERIOD_SECONDS - 1` to abort the
/// step, run teardown and report: a stopped build's pod must give it exactly that long.
#[tokio::test]
async fn a_stopped_builds_launcher_gets_its_grace_period() {
    let h = Harness::start(config()).await;
    for (id, annotations, grace) in [
        (21, json!({}), 30),
        (
            22,
            json!({"screwdriver.cd/terminationGracePeriodSeconds": 90}),
            90,
        ),
        // Screwdriver's rule: the larger of the annotation and the default.
        (
            23,
            json!({"beta.screwdriver.cd/terminationGracePeriodSeconds": "5"}),
            30,
        ),
    ] {
        h.executor.launch(&build(id, annotations)).await.unwrap();
        let name = format!("sd-{id}");
        let pod = typed(h.kube.pod(&name).unwrap());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(grace), "{name}");
        let env = spec.containers[0].env.clone().unwrap();
        let var = env
            .iter()
            .find(|e| e.name == "SD_TERMINATION_GRACE_PERIOD_SECONDS")
            .expect("the launcher's grace period is in its environment");
        assert_eq!(var.value, Some(grace.to_string()), "{name}");
        h.kube.set_phase(&name, "Running");
        h.wait_running(id).await;

        assert!(h.executor.stop(id).await.unwrap());
        let delete = h
            .kube
            .requests()
            .into_iter()
            .rfind(|r| r.method == "DELETE" && r.path.ends_with(&format!("/pods/{name}")))
            .expect("the pod is deleted");
        // No shorter grace period on the delete: the pod's own applies.
        let asked = delete.param("gracePeriodSeconds").or_else(|| {
            delete
                .body
                .as_ref()
                .and_then(|b| b.get("gracePeriodSeconds"))
                .map(Value::to_string)
        });
        assert_eq!(asked, None, "{name}: the delete overrides the grace period");
    }
}

/// The launcher owns the timeout: at it, it ends the build itself and reports it (the build
/// container exits non-zero, and the agent does not report over it). The pod's deadline comes
/// only after the timeout, the grace period and the margin: the backstop for a launcher that
/// could not end the build, reported by the agent.
#[tokio::test]
async fn a_timed_out_build_fails_with_the_launchers_timeout_before_the_backstop() {
    let h = Harness::start(config()).await;
    let timed =
        json!({"screwdriver.cd/timeout": 60, "screwdriver.cd/terminationGracePeriodSeconds": 90});
    h.executor.launch(&build(31, timed.clone())).await.unwrap();
    let pod = typed(h.kube.pod("sd-31").unwrap());
    let spec = pod.spec.unwrap();
    let run = &spec.containers[0].args.as_ref().unwrap()[0];
    assert!(
        run.contains("\"60\" \"31\""),
        "run.sh gets the 60-minute timeout: {run}"
    );
    let deadline = spec.active_deadline_seconds.unwrap();
    assert!(
        deadline >= 60 * 60 + 90,
        "the backstop ({deadline} s) comes after the timeout and the grace period"
    );
    assert_eq!(deadline, 60 * 60 + 90 + 600);

    // The launcher's timeout: it reported the build itself and exited non-zero.
    h.kube.set_phase("sd-31", "Running");
    h.wait_running(31).await;
    h.kube.terminate("sd-31", 1);
    let ended = h
        .wait_for(31, |s| match s {
            BuildStatus::Failed { reason, report } => Some((reason.clone(), *report)),
            _ => None,
        })
        .await;
    assert!(
        !ended.1,
        "the launcher reported its timeout; the agent adds nothing: {ended:?}"
    );

    // The backstop: a launcher that never ended the build; Kubernetes did, and the agent says so.
    h.executor.launch(&build(32, timed)).await.unwrap();
    h.kube.set_phase("sd-32", "Running");
    h.wait_running(32).await;
    h.kube.update_pod("sd-32", |p| {
        p["status"]["phase"] = json!("Failed");
        p["status"]["reason"] = json!("DeadlineExceeded");
        p["status"]["message"] =
            json!("Pod was active on the node longer than the specified deadline");
    });
    let reason = h.wait_reported_failure(32).await;
    assert!(
        reason.contains("the launcher did not end it") && reason.contains("DeadlineExceeded"),
        "{reason}"
    );
}

/// Once its pod is placed on a node, a build's node and the start of its image pull are
/// reported (Screwdriver's `stats`), once, with the time the API server recorded.
#[tokio::test]
async fn a_scheduled_pod_reports_its_node_once() {
    let h = Harness::start(config()).await;
    h.launch(41).await;
    h.kube.update_pod("sd-41", |p| {
        p["spec"]["nodeName"] = json!("ip-10-0-1-7.ec2.internal");
        p["status"]["conditions"] = json!([{
            "type": "PodScheduled", "status": "True",
            "lastTransitionTime": "2026-12-02T12:00:00Z",
        }]);
    });
    let (node, at) = h
        .wait_for(41, |s| match s {
            BuildStatus::Scheduled { node, at } => Some((node.clone(), at.clone())),
            _ => None,
        })
        .await;
    assert_eq!(node, "ip-10-0-1-7.ec2.internal");
    assert_eq!(at, "2026-12-02T12:00:00Z");
    h.kube.set_phase("sd-41", "Running");
    h.wait_running(41).await;
    let scheduled = h
        .statuses(41)
        .into_iter()
        .filter(|s| matches!(s, BuildStatus::Scheduled { .. }))
        .count();
    assert_eq!(scheduled, 1);
}
