//! The agent's real pieces end to end, without the scheduler: jobs on the local queue (a real
//! redis-server) → `Launcher` → `KubernetesExecutor` (the real `kube` client against the fake
//! pods API) → `Reporter` → `Outbox` → a recording scheduler events endpoint and
//! `FakeScrewdriver`, with two replicas watching the same pods and one started late. For every
//! reason a build cannot start, exactly one FAILURE reaches Screwdriver, naming the reason (and
//! the pod's events); a healthy build sends none.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use jsonwebtoken::Algorithm;
use sd_agent::config::{KubernetesConfig, ScrewdriverConfig};
use sd_agent::executor::Executor;
use sd_agent::executor::kubernetes::{KubernetesExecutor, WatchOptions};
use sd_agent::launcher::Launcher;
use sd_agent::local::LocalQueue;
use sd_agent::outbox::Outbox;
use sd_agent::reporter::Reporter;
use sd_protocol::{JobKind, QueueMessage};
use sd_testkit::kube_api::FakeKube;
use sd_testkit::{
    BuildUpdate, ClusterKeys, CountingServer, FakeScrewdriver, RedisServer, eventually,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use common::HOUR;

const CLUSTER: &str = "k8s-east";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.launcher.signature";
const WAIT: Duration = Duration::from_secs(20);

/// One build event the scheduler stub received.
#[derive(Debug, Clone)]
struct SchedulerEvent {
    cluster: String,
    build_id: u64,
    event: String,
    message: Option<String>,
}

/// The scheduler stub's state: the events it received, how many requests it has open now and
/// at most, and how long it takes to answer (a busy scheduler).
#[derive(Default)]
struct Stub {
    seen: Mutex<Vec<SchedulerEvent>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
    answer_after_ms: AtomicU64,
}

/// `POST /v1/jobs/{cluster}/events`, recorded.
async fn scheduler_stub() -> (String, Arc<Stub>) {
    async fn event(
        State(stub): State<Arc<Stub>>,
        Path(cluster): Path<String>,
        axum::Json(body): axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        let open = stub.open.fetch_add(1, Ordering::SeqCst) + 1;
        stub.most_open.fetch_max(open, Ordering::SeqCst);
        let delay = stub.answer_after_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        stub.seen.lock().unwrap().push(SchedulerEvent {
            cluster,
            build_id: body["buildId"].as_u64().unwrap_or(0),
            event: body["event"].as_str().unwrap_or_default().to_owned(),
            message: body["statusMessage"].as_str().map(str::to_owned),
        });
        stub.open.fetch_sub(1, Ordering::SeqCst);
        (StatusCode::OK, axum::Json(json!({})))
    }
    let stub = Arc::new(Stub::default());
    let app = axum::Router::new()
        .route("/v1/jobs/{cluster}/events", axum::routing::post(event))
        .with_state(Arc::clone(&stub));
    let (url, _task) = sd_testkit::serve(app).await;
    (url, stub)
}

/// The agent's launch-and-report half, wired as `app::run` wires it.
struct Agent {
    kube: FakeKube,
    screwdriver: FakeScrewdriver,
    scheduler: Arc<Stub>,
    scheduler_url: String,
    keys: ClusterKeys,
    config: KubernetesConfig,
    local: LocalQueue,
    outbox: Outbox,
    stop: CancellationToken,
    redis: RedisServer,
    /// Each replica's `executor.max_in_flight`.
    max_in_flight: u32,
}

impl Agent {
    /// The shared pieces (local Redis, pods API, Screwdriver, scheduler stub) and `replicas`
    /// agents on them, each watching every build pod.
    async fn start(config: KubernetesConfig, replicas: usize) -> Self {
        Self::start_with(config, replicas, 50).await
    }

    async fn start_with(config: KubernetesConfig, replicas: usize, max_in_flight: u32) -> Self {
        let redis = RedisServer::start().unwrap();
        let kube = FakeKube::start().await;
        let screwdriver = FakeScrewdriver::start().await;
        let (scheduler_url, scheduler) = scheduler_stub().await;
        let local = LocalQueue::connect(&redis.url(), CLUSTER, Duration::from_secs(30))
            .await
            .unwrap();
        let agent = Self {
            outbox: Outbox::new(local.queues().connection()),
            kube,
            screwdriver,
            scheduler,
            scheduler_url,
            keys: ClusterKeys::generate(Algorithm::ES256),
            config,
            local,
            stop: CancellationToken::new(),
            redis,
            max_in_flight,
        };
        for _ in 0..replicas {
            agent.replica().await;
        }
        agent
    }

    /// Starts one more agent replica on the same local Redis: executor, launcher and watcher,
    /// wired as `app::run` wires them; returns once its executor watches the pods.
    async fn replica(&self) {
        let client = common::scheduler_client(&self.scheduler_url, CLUSTER, &self.keys.private_pem);
        let local = LocalQueue::connect(&self.redis.url(), CLUSTER, Duration::from_secs(30))
            .await
            .unwrap();
        let watches = || self.kube.requests().iter().filter(|r| r.is_watch()).count();
        let watching = watches();

        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let kube_client =
            kube::Client::try_from(kube::Config::new(self.kube.url.parse().unwrap())).unwrap();
        let executor = KubernetesExecutor::with_client_options(
            kube_client,
            &self.config,
            &ScrewdriverConfig {
                store_uri: "https://store.sd.example".into(),
                ui_uri: "https://cd.sd.example".into(),
                ..Default::default()
            },
            events_tx.clone(),
            WatchOptions {
                check_interval: Duration::from_millis(20),
                request_timeout: Duration::from_secs(5),
                cancel: self.stop.clone(),
            },
        );
        let executor = Arc::new(Executor::Kubernetes(executor));
        tokio::spawn(
            Launcher {
                local: local.clone(),
                executor: Arc::clone(&executor),
                events: sd_agent::outbox::EventSink::new(
                    Outbox::new(local.queues().connection()),
                    events_tx,
                ),
                max_in_flight: self.max_in_flight,
                launch_concurrency: 8,
                takeover_after: Duration::from_secs(5),
                apis: common::apis(&[&self.screwdriver.url]),
            }
            .run(self.stop.clone()),
        );
        // The watcher ends with its events channel: once launcher and executor are gone.
        tokio::spawn(
            Reporter {
                client,
                outbox: Outbox::new(local.queues().connection()),
                local,
                updates: common::updates(&[&self.screwdriver.url]),
                capacity: Arc::new(Notify::new()),
            }
            .run(events_rx),
        );
        eventually(WAIT, || async { (watches() > watching).then_some(()) })
            .await
            .expect("the executor opens a watch on build pods");
    }

    /// Puts a start message on the local queue, as the fetcher does after a poll.
    async fn submit(&self, id: u64) {
        self.submit_to(id, &self.screwdriver.url).await;
    }

    /// As [`submit`](Self::submit), for a build naming `api` as its Screwdriver API.
    async fn submit_to(&self, id: u64, api: &str) {
        let message = QueueMessage {
            job: JobKind::Start,
            build_config: json!({
                "buildId": id, "jobId": 1000 + id, "eventId": 775, "jobName": "main",
                "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com"},
                "apiUri": api, "container": "node:20",
                "annotations": {}, "token": TOKEN,
            }),
            queued_at: None,
            received_at: None,
        };
        self.local.push(&message).await.unwrap();
    }

    async fn wait_pod(&self, id: u64) -> String {
        let name = format!("sd-{id}");
        eventually(WAIT, || async { self.kube.pod(&name).map(|_| ()) })
            .await
            .unwrap_or_else(|| panic!("the launcher created no pod for build {id}"));
        name
    }

    /// The status updates (FAILURE) Screwdriver received for `id`; stats updates aside.
    fn failures(&self, id: u64) -> Vec<BuildUpdate> {
        self.screwdriver
            .updates()
            .into_iter()
            .filter(|u| u.build_id == id && u.body.get("status").is_some())
            .collect()
    }

    /// The build's `stats` updates Screwdriver received.
    fn stats(&self, id: u64) -> Vec<BuildUpdate> {
        self.screwdriver
            .updates()
            .into_iter()
            .filter(|u| u.build_id == id && u.body.get("stats").is_some())
            .collect()
    }

    /// The FAILURE Screwdriver received for `id` (waits for one).
    async fn wait_failure(&self, id: u64) -> String {
        let update = eventually(WAIT, || async { self.failures(id).into_iter().next() })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no FAILURE reached Screwdriver for build {id}; scheduler saw {:?}",
                    self.events_of(id)
                )
            });
        assert_eq!(update.body["status"], "FAILURE", "{:?}", update.body);
        assert_eq!(update.authorization, format!("Bearer {TOKEN}"));
        update.body["statusMessage"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn events_of(&self, id: u64) -> Vec<SchedulerEvent> {
        self.scheduler
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.build_id == id)
            .cloned()
            .collect()
    }

    /// A healthy build through the whole path: launched, running, finished, both reported.
    /// Everything the watch saw before it has been handled by then.
    async fn healthy(&self, id: u64) {
        self.submit(id).await;
        let pod = self.wait_pod(id).await;
        self.kube.set_phase(&pod, "Running");
        self.wait_event(id, "running").await;
        self.kube.terminate(&pod, 0);
        self.wait_event(id, "finished").await;
    }

    async fn wait_event(&self, id: u64, event: &str) {
        eventually(WAIT, || async {
            self.events_of(id)
                .iter()
                .any(|e| e.event == event)
                .then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the scheduler never heard {event} for build {id}: {:?}",
                self.events_of(id)
            )
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn config() -> KubernetesConfig {
    common::kube_config()
}

/// A build naming a Screwdriver API this agent does not allow would hand its token to that
/// address (the launcher's command line, a FAILURE report): it is refused before it is
/// recorded or launched, the scheduler hears `failed` with the reason, and nothing at all is
/// sent to the address it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_naming_an_api_not_allowed_is_refused_and_nothing_is_sent_there() {
    let agent = Agent::start(config(), 1).await;
    let foreign = CountingServer::start().await;
    let lookalike = format!(
        "{}@{}",
        agent.screwdriver.url,
        foreign.url.trim_start_matches("http://")
    );
    agent.submit_to(70, &foreign.url).await;
    agent.submit_to(71, &lookalike).await;
    for id in [70, 71] {
        agent.wait_event(id, "failed").await;
        let events = agent.events_of(id);
        let reason = events[0].message.as_deref().unwrap_or_default();
        assert!(reason.contains("apiUri"), "build {id}: {reason}");
        assert!(
            agent.kube.pod(&format!("sd-{id}")).is_none(),
            "build {id} launched"
        );
    }
    // Everything before a healthy build has been handled once it is through.
    agent.healthy(1).await;
    let drained = eventually(WAIT, || async {
        (agent.outbox.pending().await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "every report leaves the outbox");
    assert_eq!(foreign.hits(), 0, "something was sent to the foreign API");
    let sent: Vec<u64> = agent
        .screwdriver
        .updates()
        .iter()
        .map(|u| u.build_id)
        .collect();
    assert!(!sent.contains(&70) && !sent.contains(&71), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reason_a_build_cannot_start_reaches_screwdriver_once_and_a_healthy_build_never() {
    // Two replicas, both watching every pod: each failure is seen twice, reported once.
    let agent = Agent::start(config(), 2).await;
    // Reasons reported: (build, what the test did, what the FAILURE must say).
    let mut expected: Vec<(u64, &str, Vec<String>)> = Vec::new();

    // The pod spec is rejected on create (422 Invalid, 400 BadRequest): no pod, one FAILURE.
    for (id, code, message) in [
        (
            80,
            422,
            "Pod \"sd-80\" is invalid: spec.containers[0].image: Invalid value: \"NOPE::\"",
        ),
        (
            81,
            400,
            "the body of the request was not valid: spec.volumes[0] is malformed",
        ),
    ] {
        agent.kube.fail_next("POST", "/pods", code, message);
        agent.submit(id).await;
        agent.wait_failure(id).await;
        assert!(agent.kube.pod(&format!("sd-{id}")).is_none());
        expected.push((
            id,
            "rejected on create",
            vec![
                "Build could not be started".into(),
                format!("Kubernetes rejected pod sd-{id}"),
                message.into(),
            ],
        ));
    }

    // Containers that cannot start: fatal at once, with the pod's events.
    for (id, container, reason, message) in sd_testkit::kube_api::CANNOT_START {
        agent.submit(id).await;
        let pod = agent.wait_pod(id).await;
        agent
            .kube
            .add_event(&pod, "Failed", &format!("Error: {reason} for {pod}"));
        agent.kube.set_waiting(&pod, container, reason, message);
        expected.push((
            id,
            reason,
            vec![
                format!("Build failed to start: {reason} ("),
                message.into(),
                format!("Pod events: Failed: Error: {reason} for {pod}"),
            ],
        ));
    }

    // ImagePullBackOff is tolerated for the grace (1 h), then reported.
    agent.submit(31).await;
    let backoff = agent.wait_pod(31).await;
    agent.kube.add_event(
        &backoff,
        "Failed",
        "Failed to pull image \"node:20\": not found",
    );
    agent.kube.set_waiting(
        &backoff,
        "build",
        "ImagePullBackOff",
        "Back-off pulling image \"node:20\"",
    );
    // Left Pending with no news: fails when pending_timeout (1 h) has passed.
    agent.submit(41).await;
    let pending = agent.wait_pod(41).await;
    agent.kube.add_event(
        &pending,
        "FailedScheduling",
        "0/3 nodes are available: 3 Insufficient cpu.",
    );
    // A healthy build end to end; once it is through, everything before it was seen.
    agent.healthy(1).await;
    for id in [31, 41] {
        assert!(
            agent.failures(id).is_empty(),
            "build {id} failed before its time: {:?}",
            agent.failures(id)
        );
        assert!(agent.kube.pod(&format!("sd-{id}")).is_some());
    }
    agent.kube.backdate(&backoff, 2 * HOUR);
    agent.kube.backdate(&pending, 2 * HOUR);
    expected.push((
        31,
        "ImagePullBackOff past the grace",
        vec![
            "Build failed to start: ImagePullBackOff (image \"node:20\"): Back-off pulling image \"node:20\"".into(),
            "Pod events: Failed: Failed to pull image \"node:20\": not found".into(),
        ],
    ));
    expected.push((
        41,
        "pending timeout",
        vec![
            "Build failed to start: pod sd-41 still Pending after 3600s (pending_timeout)".into(),
            "Pod events: FailedScheduling: 0/3 nodes are available: 3 Insufficient cpu.".into(),
        ],
    ));

    for (id, case, needles) in &expected {
        let text = agent.wait_failure(*id).await;
        for needle in needles {
            assert!(
                text.contains(needle.as_str()),
                "build {id} ({case}): FAILURE {text:?} lacks {needle:?}"
            );
        }
        assert!(
            !text.contains(TOKEN),
            "build {id}: the token leaked: {text}"
        );
    }

    // Give a duplicate every chance: the outbox drains, then an agent restarted now lists every
    // pod left (the healthy build's) and reports what it sees, and another build goes through.
    let drained = eventually(WAIT, || async {
        (agent.outbox.pending().await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "every report leaves the outbox");
    agent.replica().await;
    agent.healthy(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    for (id, case, _) in &expected {
        let failures = agent.failures(*id);
        assert_eq!(
            failures.len(),
            1,
            "build {id} ({case}): exactly one FAILURE: {failures:?}"
        );
        let events = agent.events_of(*id);
        let ends: Vec<_> = events.iter().filter(|e| e.event != "running").collect();
        assert_eq!(ends.len(), 1, "build {id} ({case}): {events:?}");
        assert_eq!(ends[0].event, "failed", "build {id} ({case})");
        assert_eq!(ends[0].cluster, CLUSTER);
        assert_eq!(
            ends[0].message.as_deref(),
            failures[0].body["statusMessage"].as_str(),
            "build {id} ({case}): the scheduler hears the same reason"
        );
        assert!(
            agent.kube.pod(&format!("sd-{id}")).is_none(),
            "build {id} ({case}): its pod is deleted"
        );
    }
    for id in [1, 2] {
        assert!(
            agent.failures(id).is_empty(),
            "healthy build {id} sent a FAILURE: {:?}",
            agent.failures(id)
        );
        let events: Vec<String> = agent.events_of(id).into_iter().map(|e| e.event).collect();
        assert_eq!(events, ["running", "finished"], "healthy build {id}");
    }
    let total = agent.screwdriver.updates().len();
    assert_eq!(total, expected.len(), "{:?}", agent.screwdriver.updates());
}

/// Once a build's pod is placed, Screwdriver hears the node and when the image pull started
/// (`PUT /v4/builds/{id}` `{"stats": {"hostname", "imagePullStartTime"}}`, with the build's
/// token), as from its own executor; the build's status is left to the launcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_build_sends_its_node_to_screwdriver() {
    let agent = Agent::start(config(), 2).await;
    agent.submit(90).await;
    let pod = agent.wait_pod(90).await;
    agent.kube.update_pod(&pod, |p| {
        p["spec"]["nodeName"] = json!("ip-10-0-1-7.ec2.internal");
        p["status"]["conditions"] = json!([{
            "type": "PodScheduled", "status": "True",
            "lastTransitionTime": "2026-12-02T12:00:00Z",
        }]);
    });
    let update = eventually(WAIT, || async { agent.stats(90).into_iter().next() })
        .await
        .expect("the build's stats reach Screwdriver");
    assert_eq!(
        update.body,
        json!({"stats": {"hostname": "ip-10-0-1-7.ec2.internal", "imagePullStartTime": "2026-12-02T12:00:00Z"}})
    );
    assert_eq!(update.authorization, format!("Bearer {TOKEN}"));
    agent.kube.set_phase(&pod, "Running");
    agent.wait_event(90, "running").await;
    agent.kube.terminate(&pod, 0);
    agent.wait_event(90, "finished").await;
    // Each replica watching the pod may send it; every copy says the same.
    let stats = agent.stats(90);
    assert!(
        stats.len() <= 2 && stats.iter().all(|u| u.body == update.body),
        "{stats:?}"
    );
    assert!(
        agent.failures(90).is_empty(),
        "a healthy build sends no status"
    );
}

/// A real API server takes tens of milliseconds per pod create, so the launcher creates pods
/// for different builds at once — never more than `launch_concurrency` (8 here), each build's
/// pod exactly once — and a stop taken in the same batch as its start runs after it: the pod
/// is created, then deleted, and the build ends `stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_run_at_once_each_once_and_a_stop_follows_its_start() {
    let agent = Agent::start(config(), 1).await;
    agent.kube.set_create_latency(Duration::from_millis(300));
    let builds: Vec<u64> = (200..224).collect();
    for &id in &builds {
        agent.submit(id).await;
    }
    agent.submit(300).await;
    let stop = QueueMessage {
        job: JobKind::Stop,
        build_config: json!({"buildId": 300}),
        queued_at: None,
        received_at: None,
    };
    agent.local.push(&stop).await.unwrap();

    for &id in &builds {
        agent.wait_pod(id).await;
    }
    agent.wait_event(300, "stopped").await;
    let most = agent.kube.max_concurrent_creates();
    assert!(
        (2..=8).contains(&most),
        "{most} pod creates at once; want several, at most launch_concurrency"
    );
    let creates = |name: String| {
        let path = format!("/api/v1/namespaces/{}/pods", config().namespace);
        agent
            .kube
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == path)
            .filter(|r| {
                r.body
                    .as_ref()
                    .is_some_and(|b| b["metadata"]["name"] == name)
            })
            .count()
    };
    for id in builds.iter().copied().chain([300]) {
        assert_eq!(creates(format!("sd-{id}")), 1, "build {id}");
    }
    let gone = eventually(WAIT, || async {
        agent.kube.pod("sd-300").is_none().then_some(())
    });
    assert!(gone.await.is_some(), "the stopped build's pod is deleted");
}

/// Jobs taken but not yet launched count against `max_in_flight`: with pod creates slow to
/// answer, a launcher allowed 8 at once but 4 in flight creates 4 pods, not 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_hand_count_against_max_in_flight() {
    let agent = Agent::start_with(config(), 1, 4).await;
    agent.kube.set_create_latency(Duration::from_millis(300));
    for id in 400..410 {
        agent.submit(id).await;
    }
    eventually(WAIT, || async {
        (agent.kube.pods().len() == 4).then_some(())
    })
    .await
    .expect("four pods created");
    // Nothing ends (no kubelet here), so no room opens: the count stays at the cap.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        agent.kube.pods().len(),
        4,
        "more launched than max_in_flight"
    );
}

/// A burst of builds starting is a burst of `running` events: the reporter keeps a bounded
/// number of them open on a slow scheduler (32) instead of one request per build, which would
/// fill the scheduler's `http.max_in_flight` and shed every other client; all still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_keeps_a_bounded_number_of_requests_open() {
    let agent = Agent::start_with(config(), 1, 500).await;
    agent.scheduler.answer_after_ms.store(100, Ordering::SeqCst);
    let ids: Vec<u64> = (1000..1200).collect();
    for &id in &ids {
        agent.submit(id).await;
    }
    eventually(WAIT, || async {
        (agent.kube.pods().len() == ids.len()).then_some(())
    })
    .await
    .expect("every build launched");
    for &id in &ids {
        agent.kube.set_phase(&format!("sd-{id}"), "Running");
    }
    eventually(Duration::from_secs(60), || async {
        let running = agent
            .scheduler
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.event == "running")
            .count();
        (running >= ids.len()).then_some(())
    })
    .await
    .expect("every running event reaches the scheduler");
    let most = agent.scheduler.most_open.load(Ordering::SeqCst);
    assert!(
        most <= 32,
        "{most} event requests open on the scheduler at once"
    );
    assert!(most > 1, "the reports went one at a time ({most})");
}
