//! Crash takeover: the local jobs an agent took and did not settle are taken over by another
//! agent sharing the local Redis as soon as the first stops beating — seconds, not the whole
//! launch lease. The dead one's late settle is refused (its fencing token is stale), and what
//! it settled before it died is not taken again.
//!
//! With an instance file, the same host's restarted agent does not wait for the lapse at all: the
//! file's lock proves its previous run dead. The tests drop the first run's [`InstanceLock`],
//! which is what the kernel does to the lock when a process dies.

use std::time::{Duration, Instant};

use sd_agent::instance::{InstanceError, InstanceLock};
use sd_agent::local::LocalQueue;
use sd_protocol::{JobKind, QueueMessage};
use sd_testkit::{RedisServer, eventually};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "c1";
/// The launch lease: what a takeover would wait for without the heartbeats.
const LEASE: Duration = Duration::from_secs(120);
const LAPSE: Duration = Duration::from_secs(1);

fn start(id: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Start,
        build_config: json!({"buildId": id, "jobId": 100 + id}),
        queued_at: None,
        received_at: None,
    }
}

fn beating(local: &LocalQueue) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    beating_for(local, LAPSE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agents_jobs_are_taken_over_in_seconds_and_its_late_settle_is_stale() {
    let redis = RedisServer::start().unwrap();
    let a = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
        .await
        .unwrap();
    let b = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
        .await
        .unwrap();
    assert_ne!(a.instance(), b.instance());
    for id in 1..=3 {
        a.push(&start(id)).await.unwrap();
    }
    let (a_stop, a_task) = beating(&a);
    let (b_stop, b_task) = beating(&b);
    let taken = a.take(10).await.unwrap();
    assert_eq!(taken.len(), 3);

    // While A beats, its jobs stay its own.
    tokio::time::sleep(LAPSE * 3).await;
    assert!(
        b.take(10).await.unwrap().is_empty(),
        "taken from a live agent"
    );

    // A settles one job, then stops beating, as a kill -9 leaves it.
    assert!(a.done(&taken[0]).await.unwrap());
    a_stop.cancel();
    a_task.await.unwrap();
    let silent = Instant::now();
    let again = eventually(Duration::from_secs(30), || async {
        let leases = b.take(10).await.unwrap();
        (!leases.is_empty()).then_some(leases)
    })
    .await
    .expect("B takes A's jobs over long before the launch lease would lapse");
    let mut ids: Vec<_> = again.iter().map(|l| l.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["2", "3"], "what A settled stays settled");
    println!("taken over {:?} after the last beat", silent.elapsed());

    // A's late settle is refused; B's is the one that counts.
    assert!(!a.done(&taken[1]).await.unwrap(), "a dead holder settled");
    for lease in &again {
        assert!(b.done(lease).await.unwrap());
    }
    // Settled leases leave the holders' record at the next beat: it does not grow per build.
    let holders = b.queues().keys().cluster(CLUSTER).holders;
    let emptied = eventually(Duration::from_secs(10), || async {
        let mut conn = b.queues().connection();
        let held: u64 = redis::cmd("HLEN")
            .arg(&holders)
            .query_async(&mut conn)
            .await
            .unwrap();
        (held == 0).then_some(())
    })
    .await;
    assert!(emptied.is_some(), "settled jobs stay in {holders}");
    b_stop.cancel();
    b_task.await.unwrap();
}

/// A lapse no test waits out: what comes back comes back because of the instance file.
const LONG_LAPSE: Duration = Duration::from_secs(60);

fn beating_for(
    local: &LocalQueue,
    lapse: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (local, stop) = (local.clone(), stop.clone());
        async move { local.keep_alive(lapse, stop).await }
    });
    (stop, task)
}

/// An agent run as `sd-agent run` starts one with `executor.instance_file`: the lock first,
/// then the local queue, then the previous run's jobs taken back.
async fn start_run(redis: &RedisServer, file: &std::path::Path) -> (InstanceLock, LocalQueue, u64) {
    let mut lock = InstanceLock::acquire(file).unwrap();
    let local = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
        .await
        .unwrap();
    let taken = local.take_back_previous_run(&mut lock).await.unwrap();
    (lock, local, taken)
}

fn sorted_ids(leases: &[sd_queue::Lease]) -> Vec<String> {
    let mut ids: Vec<_> = leases.iter().map(|l| l.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_takes_back_its_previous_runs_jobs_at_once() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instance");
    let (first_lock, first, taken) = start_run(&redis, &file).await;
    assert_eq!(taken, 0, "a first run has nothing to take back");
    for id in 1..=3 {
        first.push(&start(id)).await.unwrap();
    }
    let (first_stop, first_task) = beating_for(&first, LONG_LAPSE);
    let held = first.take(10).await.unwrap();
    assert_eq!(held.len(), 3);

    // The first run dies (kill -9): it beats no more, and the kernel drops its lock.
    first_stop.cancel();
    first_task.await.unwrap();
    drop(first_lock);
    let died = Instant::now();

    let (lock, second, taken) = start_run(&redis, &file).await;
    assert_eq!(lock.previous(), Some(first.instance()));
    assert_eq!(taken, 3);
    let again = second.take(10).await.unwrap();
    let waited = died.elapsed();
    assert_eq!(sorted_ids(&again), ["1", "2", "3"]);
    assert!(
        waited < Duration::from_secs(2),
        "taken back after {waited:?}: the lapse is {LONG_LAPSE:?}, the lease {LEASE:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        second.instance(),
        "the file names the run that holds it"
    );

    // The previous run's late settle is stale; the new run's counts.
    for lease in &held {
        assert!(
            !first.done(lease).await.unwrap(),
            "a dead run settled {}",
            lease.id
        );
    }
    for lease in &again {
        assert!(second.done(lease).await.unwrap());
    }
}

#[tokio::test]
async fn a_second_agent_on_a_held_instance_file_refuses_to_start_naming_it() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instance");
    let (_lock, first, _) = start_run(&redis, &file).await;

    let err = InstanceLock::acquire(&file).unwrap_err();
    assert!(matches!(err, InstanceError::Held { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&file.display().to_string()) && message.contains("another running"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        first.instance(),
        "the refused agent wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_take_back_leaves_other_live_agents_jobs_alone() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instance");
    // Another agent sharing the local Redis, with its own instance file.
    let (_other_lock, other, _) = start_run(&redis, &dir.path().join("other")).await;
    let (other_stop, other_task) = beating_for(&other, LONG_LAPSE);
    let (first_lock, first, _) = start_run(&redis, &file).await;
    let (first_stop, first_task) = beating_for(&first, LONG_LAPSE);
    for id in 1..=4 {
        first.push(&start(id)).await.unwrap();
    }
    let held = first.take(2).await.unwrap();
    let others = other.take(2).await.unwrap();
    assert_eq!((held.len(), others.len()), (2, 2));

    first_stop.cancel();
    first_task.await.unwrap();
    drop(first_lock);
    let (_lock, second, taken) = start_run(&redis, &file).await;
    assert_eq!(taken, 2, "only the previous run's jobs");
    assert_eq!(
        sorted_ids(&second.take(10).await.unwrap()),
        sorted_ids(&held)
    );
    for lease in &others {
        assert!(
            other.done(lease).await.unwrap(),
            "{} was taken from a live agent",
            lease.id
        );
    }
    let mut conn = other.queues().connection();
    let beat: Option<f64> = redis::cmd("ZSCORE")
        .arg(&other.queues().keys().instances)
        .arg(other.instance())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(beat.is_some(), "the live agent was forgotten");
    other_stop.cancel();
    other_task.await.unwrap();
}

/// The real binary: a `sd-agent` process with an instance file, killed with SIGKILL, and the
/// same host's next `sd-agent` on the same file.
mod binary {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use sd_agent::local::LocalQueue;
    use sd_protocol::{JobKind, QueueMessage};
    use sd_testkit::{AgentConfig, RedisServer, eventually, free_port, launcher};
    use serde_json::json;

    use super::{CLUSTER, LEASE, sorted_ids};

    const AGENT: &str = env!("CARGO_BIN_EXE_sd-agent");
    /// The Screwdriver API the builds name (nothing listens there; the agent allows it).
    const DEAD_API: &str = "http://127.0.0.1:9";

    struct Host {
        dir: tempfile::TempDir,
        config: PathBuf,
        instance_file: PathBuf,
        runs: PathBuf,
    }

    impl Host {
        fn new(redis: &RedisServer) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let key = dir.path().join("private.pem");
            let keys = sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
            std::fs::write(&key, &keys.private_pem).unwrap();
            let runs = dir.path().join("runs.log");
            let script = launcher::recording(&runs).write(&dir.path().join("launch.sh"));
            // No scheduler answers: the agent only works its local queue here.
            let config = AgentConfig::new(CLUSTER, DEAD_API, &key)
                .redis(&redis.url())
                .launch_lease(LEASE)
                .launcher(&script)
                .work_dir(&dir.path().join("work"))
                .screwdriver_api(DEAD_API)
                .log_format("json")
                .write(&dir.path().join("agent.toml"));
            Self {
                instance_file: dir.path().join("instance"),
                dir,
                config,
                runs,
            }
        }

        /// An agent on this host: `takeover_after` far longer than the test, so nothing it
        /// takes back comes from the lapse.
        fn spawn(&self, log: &str) -> Child {
            let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
            Command::new(AGENT)
                .arg("--config")
                .arg(&self.config)
                .arg("run")
                .env_remove("SD_AGENT_CONFIG")
                .env("SD_AGENT_EXECUTOR_INSTANCE_FILE", &self.instance_file)
                .env("SD_AGENT_EXECUTOR_TAKEOVER_AFTER", "60s")
                .env(
                    "SD_AGENT_HEALTH_LISTEN",
                    format!("127.0.0.1:{}", free_port()),
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        }

        fn log(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
        }

        /// The instance the file names, once it names one that beats in the local Redis: the
        /// agent is past its start-up and running its loops.
        async fn running_instance(&self, local: &LocalQueue) -> Option<String> {
            eventually(Duration::from_secs(30), || async {
                let name = std::fs::read_to_string(&self.instance_file).ok()?;
                let name = name.trim().to_owned();
                let mut conn = local.queues().connection();
                let beat: Option<f64> = redis::cmd("ZSCORE")
                    .arg(&local.queues().keys().instances)
                    .arg(&name)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                beat.map(|_| name)
            })
            .await
        }
    }

    fn build(id: u64) -> QueueMessage {
        QueueMessage {
            job: JobKind::Start,
            build_config: json!({
                "buildId": id, "jobId": 100 + id, "apiUri": DEAD_API, "container": "node:22",
                "pipeline": {"id": 1, "name": "web/site", "scmContext": "github:github.com"},
            }),
            queued_at: None,
            received_at: None,
        }
    }

    fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ran(runs: &Path, ids: &[u64]) -> bool {
        let runs = launcher::runs(runs);
        ids.iter().all(|id| runs.contains_key(id))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_agents_next_run_takes_back_its_jobs_at_once_and_a_second_one_refuses() {
        let redis = RedisServer::start().unwrap();
        let host = Host::new(&redis);
        let local = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
            .await
            .unwrap();
        let mut first = host.spawn("first.log");
        let dead = host
            .running_instance(&local)
            .await
            .unwrap_or_else(|| panic!("the first agent did not start: {}", host.log("first.log")));
        first.kill().unwrap();
        first.wait().unwrap();

        // What the first agent had taken and not launched when it was killed: leases named as
        // its own, its last beat only just now (the lapse alone would keep them a minute).
        for id in 1..=3 {
            local.push(&build(id)).await.unwrap();
        }
        let held = local.take(10).await.unwrap();
        assert_eq!(sorted_ids(&held), ["1", "2", "3"]);
        local.queues().hold(CLUSTER, &dead, &held).await.unwrap();

        let restarted = Instant::now();
        let mut second = host.spawn("second.log");
        let launched = eventually(Duration::from_secs(30), || async {
            ran(&host.runs, &[1, 2, 3]).then_some(())
        })
        .await;
        let waited = restarted.elapsed();
        assert!(
            launched.is_some(),
            "not launched: {}",
            host.log("second.log")
        );
        assert!(
            waited < Duration::from_secs(15),
            "launched {waited:?} after the restart: the lapse is 60s, the lease {LEASE:?}"
        );
        let log = host.log("second.log");
        assert!(
            log.contains("took back the local jobs of this host's previous run")
                && log.contains(&dead)
                && log.contains("\"jobs\":3"),
            "{log}"
        );
        for lease in &held {
            assert!(
                !local.done(lease).await.unwrap(),
                "a dead run settled {}",
                lease.id
            );
        }

        // A third agent given the same file while the second runs refuses to start.
        let mut third = host.spawn("third.log");
        let status = wait_exit(&mut third, Duration::from_secs(30)).expect("the third agent ran");
        assert_eq!(status.code(), Some(1), "{}", host.log("third.log"));
        let log = host.log("third.log");
        assert!(
            log.contains("is locked by another running sd-agent")
                && log.contains(&host.instance_file.display().to_string()),
            "{log}"
        );
        assert!(
            second.try_wait().unwrap().is_none(),
            "the running agent stopped"
        );
        second.kill().unwrap();
        second.wait().unwrap();
    }
}
