//! The build-event outbox on a real redis-server, and watchers reporting from it to a recording
//! scheduler events endpoint and a fake Screwdriver API: an end kept by an agent that died is
//! reported by the next one, and replicas seeing the same end report it once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use jsonwebtoken::Algorithm;
use sd_agent::executor::{BuildEvent, BuildStatus};
use sd_agent::local::LocalQueue;
use sd_agent::outbox::{Outbox, Recorded};
use sd_agent::reporter::Reporter;
use sd_protocol::StartMessage;
use sd_testkit::{ClusterKeys, FakeScrewdriver, RedisServer, eventually};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

const CLUSTER: &str = "east";

async fn outbox(redis: &RedisServer) -> Outbox {
    let client = redis::Client::open(redis.url()).unwrap();
    Outbox::new(sd_queue::Connection::lazy(client).unwrap())
}

fn ended(id: u64) -> BuildEvent {
    BuildEvent {
        build_id: id,
        status: BuildStatus::Finished,
    }
}

fn failed(id: u64, reason: &str, report: bool) -> BuildEvent {
    BuildEvent {
        build_id: id,
        status: BuildStatus::Failed {
            reason: reason.into(),
            report,
        },
    }
}

#[tokio::test]
async fn an_event_is_kept_once_claimed_once_and_never_again_after_it_was_reported() {
    let redis = RedisServer::start().unwrap();
    let a = outbox(&redis).await;
    let b = outbox(&redis).await; // a replica on the same local Redis

    let running = BuildEvent {
        build_id: 1,
        status: BuildStatus::Running,
    };
    assert_eq!(a.record(&running).await.unwrap(), Recorded::New);
    assert_eq!(b.record(&running).await.unwrap(), Recorded::Pending);
    // The end supersedes the pending `running`; the first end recorded wins.
    assert_eq!(a.record(&ended(1)).await.unwrap(), Recorded::New);
    assert_eq!(
        b.record(&failed(1, "other", true)).await.unwrap(),
        Recorded::Pending
    );

    let first = a.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].status, sd_protocol::Event::Finished);
    assert!(
        b.claim(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );

    a.reported(&first[0]).await.unwrap();
    assert_eq!(a.pending().await.unwrap(), 0);
    // Seen again later (a relist after a restart, another replica's watch): silent.
    assert_eq!(b.record(&ended(1)).await.unwrap(), Recorded::Reported);
    assert_eq!(b.record(&running).await.unwrap(), Recorded::Reported);
    assert_eq!(
        b.record(&failed(1, "late", true)).await.unwrap(),
        Recorded::Reported
    );
    assert_eq!(
        a.end_of(1).await.unwrap(),
        Some(BuildStatus::Finished),
        "a recovering executor learns how the build ended"
    );
    assert_eq!(a.end_of(2).await.unwrap(), None);
}

#[tokio::test]
async fn a_claim_that_lapses_is_claimed_again_and_a_superseded_report_changes_nothing() {
    let redis = RedisServer::start().unwrap();
    let a = outbox(&redis).await;
    let b = outbox(&redis).await;
    a.record(&BuildEvent {
        build_id: 7,
        status: BuildStatus::Running,
    })
    .await
    .unwrap();
    let claimed = a.claim(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // The claimer dies; once its claim lapses, the replica takes over.
    assert!(
        b.claim(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let taken = b.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(taken, claimed);

    // The build ends meanwhile: a late "reported" of the old `running` must not drop the end.
    b.record(&failed(7, "exit 3", false)).await.unwrap();
    a.reported(&claimed[0]).await.unwrap();
    assert_eq!(
        a.end_of(7).await.unwrap(),
        Some(BuildStatus::Failed {
            reason: "exit 3".into(),
            report: false
        })
    );
    assert_eq!(a.pending().await.unwrap(), 1);
}

/// A scheduler `POST /v1/jobs/{cluster}/events` that records what it receives.
#[derive(Default)]
struct Received {
    events: Mutex<Vec<(String, u64, String)>>,
    /// How long `running` events take to be answered.
    slow_running: Mutex<Duration>,
}

async fn fake_scheduler() -> (String, Arc<Received>) {
    async fn event(
        State(state): State<Arc<Received>>,
        Path(cluster): Path<String>,
        axum::Json(body): axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        if body["event"] == "running" {
            let pause = *state.slow_running.lock().unwrap();
            tokio::time::sleep(pause).await;
        }
        state.events.lock().unwrap().push((
            cluster,
            body["buildId"].as_u64().unwrap_or(0),
            body["event"].as_str().unwrap_or_default().to_owned(),
        ));
        (StatusCode::OK, axum::Json(json!({"state": "finished"})))
    }
    let state = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/v1/jobs/{cluster}/events", axum::routing::post(event))
        .with_state(Arc::clone(&state));
    let (url, _task) = sd_testkit::serve(app).await;
    (url, state)
}

async fn watcher(
    scheduler: &str,
    redis: &RedisServer,
    screwdriver: &str,
) -> (
    mpsc::UnboundedSender<BuildEvent>,
    tokio::task::JoinHandle<()>,
) {
    let keys = ClusterKeys::generate(Algorithm::ES256);
    let client = common::scheduler_client(scheduler, CLUSTER, &keys.private_pem);
    let local = LocalQueue::connect(&redis.url(), CLUSTER, Duration::from_secs(30))
        .await
        .unwrap();
    let watcher = Reporter {
        client,
        outbox: Outbox::new(local.queues().connection()),
        local,
        updates: common::updates(&[screwdriver]),
        capacity: Arc::new(Notify::new()),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, tokio::spawn(watcher.run(rx)))
}

fn build(id: u64, api: &str) -> StartMessage {
    serde_json::from_value(json!({
        "buildId": id,
        "jobId": 3,
        "eventId": 4,
        "jobName": "main",
        "pipeline": {"id": 5, "name": "org/repo", "scmContext": "github:github.com"},
        "apiUri": api,
        "container": "node:20",
        "token": "build-token",
    }))
    .unwrap()
}

#[tokio::test]
async fn an_end_kept_by_an_agent_that_died_is_reported_by_the_next_one_once() {
    let redis = RedisServer::start().unwrap();
    let screwdriver = FakeScrewdriver::start().await;
    let (scheduler, received) = fake_scheduler().await;

    // The dead agent's last acts: the build's record, its end in the outbox, then nothing.
    let local = LocalQueue::connect(&redis.url(), CLUSTER, Duration::from_secs(30))
        .await
        .unwrap();
    local.remember(&build(41, &screwdriver.url)).await.unwrap();
    let dead = outbox(&redis).await;
    dead.record(&failed(41, "image does not exist", true))
        .await
        .unwrap();

    let (_tx, task) = watcher(&scheduler, &redis, &screwdriver.url).await;
    let update = screwdriver
        .wait_for(41, Duration::from_secs(10))
        .await
        .expect("FAILURE reported to Screwdriver");
    assert_eq!(update.body["status"], "FAILURE");
    assert_eq!(update.body["statusMessage"], "image does not exist");
    assert_eq!(update.authorization, "Bearer build-token");
    let drained = eventually(Duration::from_secs(5), || async {
        (dead.pending().await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(
        drained.is_some(),
        "the entry leaves the outbox once reported"
    );
    assert_eq!(
        *received.events.lock().unwrap(),
        vec![(CLUSTER.to_owned(), 41, "failed".to_owned())]
    );
    assert_eq!(local.recall(41).await.unwrap(), None, "record dropped");
    task.abort();
}

#[tokio::test]
async fn replicas_seeing_the_same_ends_report_each_once() {
    let redis = RedisServer::start().unwrap();
    let screwdriver = FakeScrewdriver::start().await;
    let (scheduler, received) = fake_scheduler().await;
    let local = LocalQueue::connect(&redis.url(), CLUSTER, Duration::from_secs(30))
        .await
        .unwrap();
    let (a, task_a) = watcher(&scheduler, &redis, &screwdriver.url).await;
    let (b, task_b) = watcher(&scheduler, &redis, &screwdriver.url).await;
    let ids: Vec<u64> = (100..150).collect();
    for id in &ids {
        local.remember(&build(*id, &screwdriver.url)).await.unwrap();
    }
    // Both replicas watch every pod: each sees every build start and end.
    for id in &ids {
        for tx in [&a, &b] {
            tx.send(BuildEvent {
                build_id: *id,
                status: BuildStatus::Running,
            })
            .unwrap();
            let end = if id % 2 == 0 {
                ended(*id)
            } else {
                failed(*id, "CrashLoopBackOff", true)
            };
            tx.send(end).unwrap();
        }
    }
    let all_ended = eventually(Duration::from_secs(20), || async {
        let events = received.events.lock().unwrap().clone();
        let ends = events.iter().filter(|(_, _, e)| e != "running").count();
        (ends >= ids.len()).then_some(())
    })
    .await;
    assert!(all_ended.is_some(), "every end reported");
    // Give a duplicate every chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = received.events.lock().unwrap().clone();
    for id in &ids {
        let ends: Vec<_> = events
            .iter()
            .filter(|(_, b, e)| b == id && e != "running")
            .collect();
        assert_eq!(ends.len(), 1, "build {id}: {ends:?}");
        assert!(
            events
                .iter()
                .filter(|(_, b, e)| b == id && e == "running")
                .count()
                <= 1,
            "build {id} reported running twice"
        );
    }
    let failures = screwdriver.updates();
    assert_eq!(failures.len(), ids.len() / 2, "{failures:?}");
    task_a.abort();
    task_b.abort();
}

#[tokio::test]
async fn an_end_arriving_while_running_is_being_reported_follows_right_after_it() {
    let redis = RedisServer::start().unwrap();
    let (scheduler, received) = fake_scheduler().await;
    *received.slow_running.lock().unwrap() = Duration::from_secs(2);
    let (tx, task) = watcher(&scheduler, &redis, "https://api.sd.example").await;
    tx.send(BuildEvent {
        build_id: 9,
        status: BuildStatus::Running,
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // `running` is on its way
    tx.send(ended(9)).unwrap();
    // Not when a claim lapses (30 s): as soon as the `running` report is done.
    let both = eventually(Duration::from_secs(8), || async {
        let events = received.events.lock().unwrap().clone();
        (events.len() == 2).then_some(events)
    })
    .await
    .expect("running, then finished, well before a claim lapses");
    assert_eq!(both[0].2, "running");
    assert_eq!(both[1].2, "finished");
    task.abort();
}

#[tokio::test]
async fn a_start_message_the_agent_cannot_use_is_reported_failed_with_the_reason() {
    let redis = RedisServer::start().unwrap();
    let screwdriver = FakeScrewdriver::start().await;
    let (scheduler, received) = fake_scheduler().await;
    let (events, task) = watcher(&scheduler, &redis, &screwdriver.url).await;
    let local = LocalQueue::connect(&redis.url(), CLUSTER, Duration::from_secs(30))
        .await
        .unwrap();
    // What a damaged local Redis or a mismatched scheduler could leave: no pipeline.
    let message: sd_protocol::QueueMessage = serde_json::from_value(json!({
        "job": "start",
        "buildConfig": {"buildId": 55, "jobId": 3, "apiUri": screwdriver.url, "token": "build-token"},
    }))
    .unwrap();
    local.push(&message).await.unwrap();

    let work = tempfile::tempdir().unwrap();
    let ran = work.path().join("ran");
    let executor = sd_agent::executor::process::ProcessExecutor::new(
        &sd_agent::config::ProcessConfig {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("touch {}", ran.display()),
            ],
            work_dir: Some(work.path().join("work")),
            allow_agent_user: true,
            ..Default::default()
        },
        &Default::default(),
        &redis.url(),
        events.clone(),
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let launcher = tokio::spawn(
        sd_agent::launcher::Launcher {
            local: local.clone(),
            executor: Arc::new(sd_agent::executor::Executor::Process(executor)),
            events: sd_agent::outbox::EventSink::new(
                Outbox::new(local.queues().connection()),
                events,
            ),
            max_in_flight: 5,
            launch_concurrency: 4,
            takeover_after: std::time::Duration::from_secs(5),
            apis: common::apis(&[&screwdriver.url]),
        }
        .run(stop.clone()),
    );

    let update = screwdriver
        .wait_for(55, Duration::from_secs(10))
        .await
        .expect("FAILURE reported to Screwdriver");
    assert_eq!(update.body["status"], "FAILURE");
    let text = update.body["statusMessage"].as_str().unwrap();
    assert!(
        text.contains("invalid") && text.contains("pipeline"),
        "names the field: {text}"
    );
    assert_eq!(update.authorization, "Bearer build-token");
    let settled = eventually(Duration::from_secs(5), || async {
        (local.pending().await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the local job is settled, not retried forever"
    );
    assert!(
        received
            .events
            .lock()
            .unwrap()
            .contains(&(CLUSTER.to_owned(), 55, "failed".to_owned())),
        "the scheduler hears it failed"
    );
    assert!(!ran.exists(), "nothing was launched for it");
    stop.cancel();
    let _ = launcher.await;
    task.abort();
}
