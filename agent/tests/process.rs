//! The process executor against a real `redis-server` and real processes: shell scripts in a
//! temp dir stand in for the launcher.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd_agent::config::{ProcessConfig, ScrewdriverConfig};
use sd_agent::executor::process::{self, Marker, MarkerState, Owner, ProcessExecutor};
use sd_agent::executor::{BuildEvent, BuildStatus, ExecError, Launched};
use sd_agent::outbox::Outbox;
use sd_protocol::StartMessage;
use sd_testkit::launcher::{Launcher, OnTerm, Run};
use sd_testkit::{RedisServer, eventually};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "secret-token-0f9e8d";

/// The launcher stand-in `launcher` at `dir/name`, leaving its files (`env-<id>`,
/// `leader-<id>`…) in `dir`.
fn script(dir: &Path, name: &str, launcher: Launcher) -> PathBuf {
    launcher.files_in(dir).write(&dir.join(name))
}

/// Writes its environment, says hello, exits with the `test/exit` annotation (default 0).
fn env_script() -> Launcher {
    Launcher::new()
        .dump_env()
        .say("hello from build $SD_BUILD_ID")
        .exit_as_annotated()
}

/// Counts its runs.
fn count_script() -> Launcher {
    Launcher::new().count_runs()
}

/// Leaves a grandchild in its group and waits: both pids go to files.
fn sleep_script() -> Launcher {
    Launcher::new().hang()
}

fn build(id: u64, annotations: Value) -> StartMessage {
    serde_json::from_value(json!({
        "buildId": id,
        "jobId": 77,
        "eventId": 55,
        "jobName": "main",
        "pipeline": {"id": 42, "name": "org/repo", "scmContext": "github:github.com"},
        "apiUri": "https://api.sd.example",
        "container": "node:20",
        "annotations": annotations,
        "token": TOKEN,
        "causeMessage": "Started by test",
    }))
    .unwrap()
}

/// Events of one executor, kept so builds can be awaited in any order.
struct Events {
    rx: mpsc::UnboundedReceiver<BuildEvent>,
    seen: Vec<BuildEvent>,
}

impl Events {
    fn of(&self, id: u64) -> Vec<BuildStatus> {
        self.seen
            .iter()
            .filter(|e| e.build_id == id)
            .map(|e| e.status.clone())
            .collect()
    }

    /// Drains what has been sent so far.
    fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.seen.push(e);
        }
    }

    /// The final status of `id` (after `Running`), waiting for it.
    async fn end(&mut self, id: u64) -> BuildStatus {
        loop {
            self.drain();
            if let Some(status) = self.of(id).into_iter().find(|s| *s != BuildStatus::Running) {
                return status;
            }
            let event = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no end event for build {id}"))
                .expect("events channel open");
            self.seen.push(event);
        }
    }
}

async fn executor(
    redis: &RedisServer,
    work: &Path,
    command: Vec<String>,
) -> (ProcessExecutor, Events) {
    try_executor(redis, work, command).await.unwrap()
}

async fn try_executor(
    redis: &RedisServer,
    work: &Path,
    command: Vec<String>,
) -> Result<(ProcessExecutor, Events), ExecError> {
    try_executor_with(redis, &config(work, command), &screwdriver()).await
}

/// The default config (90-minute timeout, 30 s grace, 10-minute margin) in `work`, builds run
/// as the test's own user (the stand-in launchers are trusted).
fn config(work: &Path, command: Vec<String>) -> ProcessConfig {
    ProcessConfig {
        command,
        work_dir: Some(work.join("work")),
        allow_agent_user: true,
        ..ProcessConfig::default()
    }
}

/// A config whose backstop comes `margin` after the timeout plus `grace`.
fn quick_config(
    work: &Path,
    command: Vec<String>,
    grace: Duration,
    margin: Duration,
) -> ProcessConfig {
    ProcessConfig {
        termination_grace_period: grace,
        timeout_margin: margin,
        ..config(work, command)
    }
}

fn screwdriver() -> ScrewdriverConfig {
    ScrewdriverConfig {
        store_uri: "https://store.sd.example".into(),
        ui_uri: "https://ui.sd.example".into(),
        ..Default::default()
    }
}

async fn executor_with(
    redis: &RedisServer,
    config: &ProcessConfig,
    screwdriver: &ScrewdriverConfig,
) -> (ProcessExecutor, Events) {
    try_executor_with(redis, config, screwdriver).await.unwrap()
}

async fn try_executor_with(
    redis: &RedisServer,
    config: &ProcessConfig,
    screwdriver: &ScrewdriverConfig,
) -> Result<(ProcessExecutor, Events), ExecError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let executor = ProcessExecutor::new(config, screwdriver, &redis.url(), tx).await?;
    Ok((
        executor,
        Events {
            rx,
            seen: Vec::new(),
        },
    ))
}

fn argv(path: &Path) -> Vec<String> {
    vec![path.display().to_string()]
}

fn marker(redis: &RedisServer, id: u64) -> Option<(String, Marker)> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(process::LAUNCHES_KEY)
        .arg(id)
        .query(&mut redis.conn())
        .unwrap();
    raw.map(|r| {
        let m = serde_json::from_str(&r).unwrap();
        (r, m)
    })
}

fn is_active(redis: &RedisServer, id: u64) -> bool {
    redis::cmd("SISMEMBER")
        .arg(process::ACTIVE_KEY)
        .arg(id)
        .query(&mut redis.conn())
        .unwrap()
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Alive and not a zombie (killed grandchildren may wait for a reaper that never comes).
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f[0].as_str(), "Z" | "X"))
}

fn start_time(pid: u32) -> u64 {
    stat_fields(pid).unwrap()[19].parse().unwrap()
}

async fn pid_file(path: PathBuf) -> u32 {
    eventually(WAIT, || {
        let path = path.clone();
        async move {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        }
    })
    .await
    .unwrap_or_else(|| panic!("{} never appeared", path.display()))
}

async fn all_dead(pids: &[u32]) -> bool {
    eventually(WAIT, || async {
        pids.iter().all(|&p| !alive(p)).then_some(())
    })
    .await
    .is_some()
}

fn env_file(dir: &Path, id: u64) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join(format!("env-{id}")))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn var<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_and_exit_codes() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "env.sh", env_script());
    let sd = ScrewdriverConfig {
        pushgateway_url: "https://push.sd.example:9091".into(),
        ..screwdriver()
    };
    let (exec, mut events) = executor_with(&redis, &config(dir.path(), argv(&cmd)), &sd).await;

    assert_eq!(
        exec.launch(&build(101, json!({}))).await.unwrap(),
        Launched::Created
    );
    let failing = build(102, json!({"test/exit": "3", "screwdriver.cd/timeout": 5}));
    assert_eq!(exec.launch(&failing).await.unwrap(), Launched::Created);

    assert_eq!(events.end(101).await, BuildStatus::Finished);
    assert_eq!(events.of(101)[0], BuildStatus::Running);
    match events.end(102).await {
        BuildStatus::Failed {
            reason,
            report: true,
        } => assert!(reason.contains("status 3"), "{reason}"),
        other => panic!("build 102: {other:?}"),
    }
    assert_eq!(exec.in_flight(), 0);

    let env = env_file(dir.path(), 101);
    for (key, value) in [
        ("SD_BUILD_ID", "101"),
        ("SD_JOB_ID", "77"),
        ("SD_EVENT_ID", "55"),
        ("SD_PIPELINE_ID", "42"),
        ("SD_JOB_NAME", "main"),
        ("SD_TOKEN", TOKEN),
        ("SD_API_URI", "https://api.sd.example"),
        ("SD_STORE_URI", "https://store.sd.example"),
        ("SD_UI_URI", "https://ui.sd.example"),
        ("SD_TIMEOUT", "90"),
        ("SD_TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("SD_IMAGE", "node:20"),
        ("CONTAINER_IMAGE", "node:20"),
        ("NODE_ID", hostname().as_str()),
        ("SD_PUSHGATEWAY_URL", "https://push.sd.example:9091"),
    ] {
        assert_eq!(var(&env, key), Some(value), "{key}");
    }
    assert!(var(&env, process::LAUNCH_ID_VAR).is_some_and(|v| v.starts_with("101-")));
    assert_eq!(
        var(&env, "SD_BUILD_CONFIG"),
        None,
        "the config is in a file"
    );
    let config_file = var(&env, "SD_BUILD_CONFIG_FILE").unwrap();
    assert!(
        !Path::new(config_file).exists(),
        "the build's directory goes once it ended"
    );
    let config = std::fs::read_to_string(dir.path().join("config-101")).unwrap();
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["buildId"], 101);
    assert_eq!(config["causeMessage"], "Started by test");
    assert!(
        config.get("token").is_none(),
        "the token is in SD_TOKEN only"
    );
    assert_eq!(var(&env_file(dir.path(), 102), "SD_TIMEOUT"), Some("5"));

    // The launcher's output lands in the build's log; the token is in no file of ours.
    let log = std::fs::read_to_string(exec.log_path(101)).unwrap();
    assert!(log.contains("hello from build 101"), "{log}");
    assert!(exec.log_path(101).starts_with(dir.path().join("work")));
    let (raw, m) = marker(&redis, 101).unwrap();
    assert!(!raw.contains(TOKEN));
    assert_eq!(m.state, MarkerState::Ended);
    assert_eq!(m.outcome.as_deref(), Some("finished"));
    assert!(m.pid.is_some() && m.pgid == m.pid && m.start_time.is_some());
    assert!(!is_active(&redis, 101));
    let (_, m) = marker(&redis, 102).unwrap();
    assert!(m.outcome.unwrap().contains("status 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_at_most_once() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "count.sh", count_script());
    let (exec, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;

    let b = build(201, json!({}));
    let (first, second) = tokio::join!(exec.launch(&b), exec.launch(&b));
    let mut outcomes = [first.unwrap(), second.unwrap()];
    outcomes.sort_by_key(|l| *l == Launched::AlreadyRunning);
    assert_eq!(outcomes, [Launched::Created, Launched::AlreadyRunning]);
    assert_eq!(events.end(201).await, BuildStatus::Finished);

    // Ended, and still refused: by this executor and by another one on the same Redis.
    assert_eq!(exec.launch(&b).await.unwrap(), Launched::AlreadyRunning);
    let (other, mut other_events) = executor(&redis, dir.path(), argv(&cmd)).await;
    assert_eq!(other.launch(&b).await.unwrap(), Launched::AlreadyRunning);

    // Two executors racing for one build: one of them runs it.
    let b = build(202, json!({}));
    let (mine, theirs) = tokio::join!(exec.launch(&b), other.launch(&b));
    let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
    assert_ne!(mine, theirs, "exactly one Created");
    let winner = if mine == Launched::Created {
        &mut events
    } else {
        &mut other_events
    };
    assert_eq!(winner.end(202).await, BuildStatus::Finished);

    // Everything that could have run has ended by now: one run each.
    for id in [201, 202] {
        let count = std::fs::read_to_string(dir.path().join(format!("count-{id}"))).unwrap();
        assert_eq!(count.lines().count(), 1, "build {id}");
    }
    events.drain();
    other_events.drain();
    assert_eq!(
        events.of(201),
        vec![BuildStatus::Running, BuildStatus::Finished]
    );
    assert!(other_events.of(201).is_empty());
    assert_eq!(events.of(202).len() + other_events.of(202).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_executor_refuses_a_running_build_and_can_stop_it() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let (a, mut a_events) = executor(&redis, dir.path(), argv(&cmd)).await;
    let (b, mut b_events) = executor(&redis, dir.path(), argv(&cmd)).await;

    assert_eq!(
        a.launch(&build(301, json!({}))).await.unwrap(),
        Launched::Created
    );
    let leader = pid_file(dir.path().join("leader-301")).await;
    let grandchild = pid_file(dir.path().join("grandchild-301")).await;
    assert_eq!(
        b.launch(&build(301, json!({}))).await.unwrap(),
        Launched::AlreadyRunning
    );
    assert_eq!((a.in_flight(), b.in_flight()), (1, 0));
    assert!(alive(leader) && alive(grandchild));

    // B does not run it, but shares the host and the Redis: its stop reaches A's build.
    assert!(b.stop(301).await.unwrap());
    assert_eq!(a_events.end(301).await, BuildStatus::Stopped);
    assert!(all_dead(&[leader, grandchild]).await);
    assert_eq!(a.in_flight(), 0);
    b_events.drain();
    assert!(b_events.seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_the_whole_process_group() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let (exec, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;

    assert!(!exec.stop(401).await.unwrap(), "unknown build");
    assert_eq!(
        exec.launch(&build(401, json!({}))).await.unwrap(),
        Launched::Created
    );
    let leader = pid_file(dir.path().join("leader-401")).await;
    let grandchild = pid_file(dir.path().join("grandchild-401")).await;
    assert_eq!(exec.in_flight(), 1);

    assert!(exec.stop(401).await.unwrap());
    assert_eq!(events.end(401).await, BuildStatus::Stopped);
    assert!(
        all_dead(&[leader, grandchild]).await,
        "leader and grandchild are killed"
    );
    assert_eq!(exec.in_flight(), 0);
    assert!(!exec.stop(401).await.unwrap(), "already ended");
    let (_, m) = marker(&redis, 401).unwrap();
    assert_eq!(m.state, MarkerState::Ended);
    assert_eq!(m.outcome.as_deref(), Some(process::STOP_REASON));
}

/// The agent's backstop: the launcher (which never ends by itself here) did not end the build at
/// its timeout, so the agent kills the group after the timeout, the grace and the margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_group_and_is_reported() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let config = quick_config(
        dir.path(),
        argv(&cmd),
        Duration::from_secs(1),
        Duration::ZERO,
    );
    let (exec, mut events) = executor_with(&redis, &config, &screwdriver()).await;

    // 0.01 minutes (0.6 s; the launcher gets 1 minute) + 1 s grace + no margin: 1.6 s.
    let b = build(501, json!({"screwdriver.cd/timeout": "0.01"}));
    let launched = Instant::now();
    assert_eq!(exec.launch(&b).await.unwrap(), Launched::Created);
    let leader = pid_file(dir.path().join("leader-501")).await;
    let grandchild = pid_file(dir.path().join("grandchild-501")).await;
    let reason = "build timed out: the launcher did not end it at its 1-minute timeout, so the agent ended it after 0.03 minutes";
    assert_eq!(
        events.end(501).await,
        BuildStatus::Failed {
            reason: reason.into(),
            report: true
        }
    );
    assert!(reason.contains("timed out"));
    assert_eq!(
        reason,
        process::backstop_reason(1, Duration::from_millis(1600))
    );
    assert!(
        launched.elapsed() >= Duration::from_millis(1500),
        "ended at the backstop, not at the timeout: {:?}",
        launched.elapsed()
    );
    assert!(all_dead(&[leader, grandchild]).await);
    assert_eq!(exec.in_flight(), 0);
    let (_, m) = marker(&redis, 501).unwrap();
    assert_eq!(m.outcome.as_deref(), Some(reason));
    assert_eq!(
        (m.timeout_s, m.backstop_ms, m.grace_ms),
        (Some(0), Some(1600), Some(1000))
    );
}

/// Run.sh at its timeout: aborts the step, runs teardown, reports the timeout and exits
/// non-zero. Here: 1.5 s, after the build's 1.2 s timeout and before the agent's backstop. A
/// SIGTERM would leave a file (`termed-<id>`).
fn times_out_itself_script() -> Launcher {
    Launcher::new()
        .on_sigterm(OnTerm::Note)
        .sleep(Duration::from_millis(1500))
        .say("build timed out after $SD_TIMEOUT minutes: aborting, teardown, reported")
        .exit(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launchers_timeout_comes_first() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "times-out.sh", times_out_itself_script());
    // Backstop: 1.2 s + 1 s grace + 3 s margin = 5.2 s.
    let config = quick_config(
        dir.path(),
        argv(&cmd),
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    let (exec, mut events) = executor_with(&redis, &config, &screwdriver()).await;

    let launched = Instant::now();
    let b = build(511, json!({"screwdriver.cd/timeout": "0.02"}));
    assert_eq!(exec.launch(&b).await.unwrap(), Launched::Created);
    assert_eq!(
        events.end(511).await,
        BuildStatus::Failed {
            reason: "launcher exited with status 3".into(),
            report: true
        },
        "the launcher's own result, not the agent's timed-out reason"
    );
    assert!(
        launched.elapsed() < Duration::from_millis(5200),
        "{:?}",
        launched.elapsed()
    );
    assert!(
        !dir.path().join("termed-511").exists(),
        "the agent signalled nothing"
    );
    assert_eq!(exec.in_flight(), 0);
    let (_, m) = marker(&redis, 511).unwrap();
    assert_eq!(m.outcome.as_deref(), Some("launcher exited with status 3"));
    assert_eq!((m.backstop_ms, m.grace_ms), (Some(5200), Some(1000)));
    let log = std::fs::read_to_string(exec.log_path(511)).unwrap();
    assert!(log.contains("build timed out after 1 minutes"), "{log}");
}

/// Traps SIGTERM as run.sh does: sleeps (2.4 s for build 901, else 1 s), then leaves a file and
/// exits; build 904 ignores SIGTERM. Its environment goes to a file; `leader-<id>` once trapped.
fn grace_script() -> Launcher {
    Launcher::new()
        .dump_env()
        .on_sigterm(OnTerm::Flush(Duration::from_secs(1)))
        .hang()
        .for_build(
            901,
            Run::new()
                .on_sigterm(OnTerm::Flush(Duration::from_millis(2400)))
                .hang(),
        )
        .for_build(904, Run::new().on_sigterm(OnTerm::Ignore).hang())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_builds_launcher_gets_its_grace_period() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "grace.sh", grace_script());
    let config = quick_config(
        dir.path(),
        argv(&cmd),
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    let (exec, mut events) = executor_with(&redis, &config, &screwdriver()).await;

    let grace = "screwdriver.cd/terminationGracePeriodSeconds";
    let builds = [
        (901, json!({grace: "3"}), "3"), // raised above the 2 s default
        (902, json!({format!("beta.{grace}"): 1}), "2"), // below it: the default
        (903, json!({}), "2"),
        (904, json!({}), "2"),
    ];
    let mut leaders = Vec::new();
    for (id, annotations, _) in &builds {
        assert_eq!(
            exec.launch(&build(*id, annotations.clone())).await.unwrap(),
            Launched::Created
        );
    }
    for (id, _, _) in &builds {
        leaders.push(pid_file(dir.path().join(format!("leader-{id}"))).await);
    }
    let stopped_at = Instant::now();
    for (id, _, _) in &builds {
        assert!(exec.stop(*id).await.unwrap());
    }
    // SIGKILL comes at the build's grace period (2 s), not before, and not 10 s later.
    assert_eq!(events.end(904).await, BuildStatus::Stopped);
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    for (id, _, seen) in &builds {
        assert_eq!(events.end(*id).await, BuildStatus::Stopped, "build {id}");
        let env = env_file(dir.path(), *id);
        assert_eq!(
            var(&env, "SD_TERMINATION_GRACE_PERIOD_SECONDS"),
            Some(*seen),
            "build {id}"
        );
        assert_eq!(var(&env, "SD_PUSHGATEWAY_URL"), None, "not configured");
    }
    // Not SIGKILLed before the trap was done: 901 needed more than the default grace.
    for id in [901, 902, 903] {
        let flushed = std::fs::read_to_string(dir.path().join(format!("trapped-{id}")));
        assert_eq!(flushed.ok().as_deref(), Some("flushed\n"), "build {id}");
    }
    assert!(all_dead(&leaders).await);
    assert_eq!(exec.in_flight(), 0);
    let (_, m) = marker(&redis, 901).unwrap();
    assert_eq!(m.grace_ms, Some(3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_executor_adopts_a_build_still_running_and_can_stop_it() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let (crashed, mut crashed_events) = executor(&redis, dir.path(), argv(&cmd)).await;
    assert_eq!(
        crashed.launch(&build(601, json!({}))).await.unwrap(),
        Launched::Created
    );
    let leader = pid_file(dir.path().join("leader-601")).await;
    let grandchild = pid_file(dir.path().join("grandchild-601")).await;

    // Dropping it is the crash: its build keeps running, unwatched.
    drop(crashed);
    assert!(alive(leader) && alive(grandchild));
    crashed_events.drain();
    assert_eq!(crashed_events.of(601), vec![BuildStatus::Running]);

    let (restarted, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    events.drain();
    assert!(
        events.of(601).is_empty(),
        "adopted, not ended: {:?}",
        events.of(601)
    );
    assert!(alive(leader) && alive(grandchild), "the build goes on");
    assert_eq!(restarted.in_flight(), 1);
    let (_, m) = marker(&redis, 601).unwrap();
    assert_eq!(m.state, MarkerState::Running);
    assert_ne!(m.agent.instance, "", "owned by the restarted executor");
    assert_eq!(
        restarted.launch(&build(601, json!({}))).await.unwrap(),
        Launched::AlreadyRunning
    );

    // A third executor on the host sees a live owner and leaves it alone.
    let (_third, mut third_events) = executor(&redis, dir.path(), argv(&cmd)).await;
    third_events.drain();
    assert!(third_events.seen.is_empty());

    assert!(restarted.stop(601).await.unwrap());
    assert_eq!(events.end(601).await, BuildStatus::Stopped);
    assert!(all_dead(&[leader, grandchild]).await, "stopped: killed");
    let (_, m) = marker(&redis, 601).unwrap();
    assert_eq!(m.state, MarkerState::Ended);
    assert!(!is_active(&redis, 601));
    assert_eq!(restarted.in_flight(), 0);
}

/// An adopting executor keeps the backstop the launching one recorded (its own config would
/// give 10 minutes more); a marker of the previous version (only `timeout_s`) keeps its meaning:
/// the agent ends the run at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_build_keeps_the_backstop_its_marker_records() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let quick = quick_config(
        dir.path(),
        argv(&cmd),
        Duration::from_secs(1),
        Duration::ZERO,
    );
    let (crashed, _) = executor_with(&redis, &quick, &screwdriver()).await;
    for id in [621, 622] {
        let b = build(id, json!({"screwdriver.cd/timeout": "0.01"}));
        assert_eq!(crashed.launch(&b).await.unwrap(), Launched::Created);
    }
    let leaders = [
        pid_file(dir.path().join("leader-621")).await,
        pid_file(dir.path().join("leader-622")).await,
    ];
    drop(crashed);
    // 622's marker as the previous version wrote it.
    let (raw, _) = marker(&redis, 622).unwrap();
    let mut old: Value = serde_json::from_str(&raw).unwrap();
    let fields = old.as_object_mut().unwrap();
    fields.remove("backstop_ms").unwrap();
    fields.remove("grace_ms").unwrap();
    fields.insert("timeout_s".into(), json!(1));
    let () = redis::cmd("HSET")
        .arg(process::LAUNCHES_KEY)
        .arg(622)
        .arg(old.to_string())
        .query(&mut redis.conn())
        .unwrap();

    let (adopting, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    assert_eq!(adopting.in_flight(), 2);
    let failed = |reason: String| BuildStatus::Failed {
        reason,
        report: true,
    };
    assert_eq!(
        events.end(621).await,
        failed(process::backstop_reason(1, Duration::from_millis(1600)))
    );
    assert_eq!(
        events.end(622).await,
        failed("build timed out after 0.02 minutes".into())
    );
    assert!(all_dead(&leaders).await);
    assert_eq!(adopting.in_flight(), 0);
}

/// Ends as the launcher chooses by build id: 61x sleeps 1 s and exits x, 62x sleeps 0.3 s and
/// exits x, 630 sleeps 0.3 s and is killed by SIGTERM.
fn outcome_script() -> Launcher {
    let (long, short) = (Duration::from_secs(1), Duration::from_millis(300));
    Launcher::new()
        .for_build(610, Run::new().sleep(long).exit(0))
        .for_build(613, Run::new().sleep(long).exit(3))
        .for_build(620, Run::new().sleep(short).exit(0))
        .for_build(625, Run::new().sleep(short).exit(5))
        .for_build(630, Run::new().sleep(short).kill_itself("TERM"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_executor_reports_the_real_result_of_builds_it_did_not_watch() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "outcome.sh", outcome_script());

    // Still running when the next executor starts: adopted, followed to their ends.
    let (crashed, _) = executor(&redis, dir.path(), argv(&cmd)).await;
    for id in [610, 613] {
        crashed.launch(&build(id, json!({}))).await.unwrap();
    }
    drop(crashed);
    let (adopting, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    assert_eq!(adopting.in_flight(), 2);
    assert_eq!(events.end(610).await, BuildStatus::Finished);
    assert_eq!(
        events.end(613).await,
        BuildStatus::Failed {
            reason: "launcher exited with status 3".into(),
            report: true
        }
    );
    drop(adopting);

    // Ended while no executor ran: their parent shell left the status.
    let (crashed, _) = executor(&redis, dir.path(), argv(&cmd)).await;
    for id in [620, 625, 630] {
        crashed.launch(&build(id, json!({}))).await.unwrap();
    }
    drop(crashed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_next, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    let failed = |reason: &str| BuildStatus::Failed {
        reason: reason.into(),
        report: true,
    };
    assert_eq!(events.end(620).await, BuildStatus::Finished);
    assert_eq!(
        events.end(625).await,
        failed("launcher exited with status 5")
    );
    assert_eq!(
        events.end(630).await,
        failed("launcher was killed by signal 15 (SIGTERM)")
    );
    for id in [610, 613, 620, 625, 630] {
        let (_, m) = marker(&redis, id).unwrap();
        assert_eq!(m.state, MarkerState::Ended, "build {id}");
        assert!(
            !m.exit_file.unwrap().exists(),
            "build {id}'s status file is cleaned up"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builds_of_a_host_that_is_gone_are_ended_from_another_host_but_a_live_one_is_left() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let (elsewhere, _events) = executor(&redis, dir.path(), argv(&cmd)).await;
    for id in [701, 702] {
        assert_eq!(
            elsewhere.launch(&build(id, json!({}))).await.unwrap(),
            Launched::Created
        );
    }
    let leaders = [
        pid_file(dir.path().join("leader-701")).await,
        pid_file(dir.path().join("leader-702")).await,
    ];
    let groups = [701, 702].map(|id| marker(&redis, id).unwrap().1.pgid.unwrap());
    drop(elsewhere);
    // Make the two runs another machine's: one host silent past the limit, one seen just now.
    let now_ms: u64 = {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut redis.conn()).unwrap();
        secs * 1000 + micros / 1000
    };
    for (id, host, seen) in [
        (
            701,
            "gone-host",
            now_ms - process::HOST_GONE_AFTER.as_millis() as u64 - 60_000,
        ),
        (702, "busy-host", now_ms - 30_000),
    ] {
        let (_, mut m) = marker(&redis, id).unwrap();
        m.host = host.into();
        m.boot_id = format!("boot-of-{host}");
        let _: () = redis::cmd("HSET")
            .arg(process::LAUNCHES_KEY)
            .arg(id)
            .arg(serde_json::to_string(&m).unwrap())
            .query(&mut redis.conn())
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg(process::HOSTS_KEY)
            .arg(host)
            .arg(seen)
            .query(&mut redis.conn())
            .unwrap();
    }

    let (_here, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    events.drain();
    assert_eq!(
        events.of(701),
        vec![BuildStatus::Failed {
            reason: process::host_gone_reason("gone-host"),
            report: true
        }]
    );
    assert!(
        events.of(702).is_empty(),
        "a host seen recently keeps its build"
    );
    assert_eq!(marker(&redis, 701).unwrap().1.state, MarkerState::Ended);
    assert_eq!(marker(&redis, 702).unwrap().1.state, MarkerState::Running);
    assert!(
        leaders.iter().all(|pid| alive(*pid)),
        "processes of another host are never signalled from here"
    );
    for pgid in groups {
        unsafe { libc::killpg(pgid as i32, libc::SIGKILL) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_kept_before_the_crash_is_reported_not_contradicted() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "sleep.sh", sleep_script());
    let outbox = {
        let client = redis::Client::open(redis.url()).unwrap();
        Outbox::new(sd_queue::Connection::lazy(client).unwrap())
    };
    let (crashed, mut crashed_events) = executor(&redis, dir.path(), argv(&cmd)).await;
    crashed.launch(&build(603, json!({}))).await.unwrap();
    let leader = pid_file(dir.path().join("leader-603")).await;
    // It died right after keeping the build's end, before ending the marker.
    outbox
        .record(&BuildEvent {
            build_id: 603,
            status: BuildStatus::Finished,
        })
        .await
        .unwrap();
    drop(crashed);
    crashed_events.drain();

    let (_restarted, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    events.drain();
    assert_eq!(events.of(603), vec![BuildStatus::Finished]);
    assert!(all_dead(&[leader]).await);
    let (_, m) = marker(&redis, 603).unwrap();
    assert_eq!(m.state, MarkerState::Ended);

    // A normal end is kept in the outbox before the marker ends.
    let quick = script(dir.path(), "count.sh", count_script());
    let (normal, mut normal_events) = executor(&redis, dir.path(), argv(&quick)).await;
    normal.launch(&build(604, json!({}))).await.unwrap();
    let end = eventually(Duration::from_secs(10), || async {
        outbox.end_of(604).await.unwrap()
    })
    .await;
    assert_eq!(end, Some(BuildStatus::Finished));
    normal_events.drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_seen_while_redis_is_down_is_kept_before_the_marker_ends() {
    let mut redis = RedisServer::start_with_aof().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(
        dir.path(),
        "short.sh",
        Launcher::new().sleep(Duration::from_secs(1)),
    );
    let (exec, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    exec.launch(&build(605, json!({}))).await.unwrap();
    redis.kill(); // the build ends while the local Redis is away
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().unwrap();
    // Reported directly meanwhile (nothing durable to lean on)...
    assert_eq!(events.end(605).await, BuildStatus::Finished);
    // ...and kept in the outbox before the marker ended, so a crash now loses nothing.
    let outbox = {
        let client = redis::Client::open(redis.url()).unwrap();
        Outbox::new(sd_queue::Connection::lazy(client).unwrap())
    };
    let ended = eventually(Duration::from_secs(20), || async {
        marker(&redis, 605).filter(|(_, m)| m.state == MarkerState::Ended)
    })
    .await;
    assert!(ended.is_some(), "the marker ends once Redis is back");
    assert_eq!(
        outbox.end_of(605).await.unwrap(),
        Some(BuildStatus::Finished)
    );
}

/// Markers as an agent process that died (kill -9) would have left them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_a_dead_agent_process_are_killed_but_never_a_reused_pid() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = hostname();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_owned();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dead_agent = Owner {
        pid: gone.id(),
        start_time: Some(1),
        instance: "crashed".into(),
    };

    let sleeper = |launch_id: &str| {
        std::process::Command::new("sleep")
            .arg("300")
            .env(process::LAUNCH_ID_VAR, launch_id)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut running = sleeper("701-a"); // recorded with its true start time: killed
    let mut reused = sleeper("702-b"); // its pid, but another start time: a stranger, spared
    let mut starting = sleeper("703-c"); // no pid recorded, found by its launch id: killed
    let plant =
        |id: u64, host: &str, launch_id: &str, state: MarkerState, child: Option<(u32, u64)>| {
            let m = Marker {
                host: host.to_owned(),
                boot_id: boot_id.clone(),
                agent: dead_agent.clone(),
                launch_id: launch_id.to_owned(),
                state,
                pid: child.map(|c| c.0),
                pgid: child.map(|c| c.0),
                start_time: child.map(|c| c.1),
                started_at: 1,
                ended_at: None,
                outcome: None,
                // As an older agent left them: no exit status to learn, so never adopted.
                timeout_s: None,
                backstop_ms: None,
                grace_ms: None,
                exit_file: None,
            };
            let mut conn = redis.conn();
            let () = redis::cmd("HSET")
                .arg(process::LAUNCHES_KEY)
                .arg(id)
                .arg(serde_json::to_string(&m).unwrap())
                .query(&mut conn)
                .unwrap();
            let () = redis::cmd("SADD")
                .arg(process::ACTIVE_KEY)
                .arg(id)
                .query(&mut conn)
                .unwrap();
        };
    plant(
        701,
        &host,
        "701-a",
        MarkerState::Running,
        Some((running.id(), start_time(running.id()))),
    );
    plant(
        702,
        &host,
        "702-x",
        MarkerState::Running,
        Some((reused.id(), start_time(reused.id()) + 12_345)),
    );
    plant(703, &host, "703-c", MarkerState::Starting, None);
    plant(
        704,
        "some-other-host",
        "704-d",
        MarkerState::Running,
        Some((reused.id(), start_time(reused.id()))),
    );

    let cmd = script(dir.path(), "env.sh", env_script());
    let (exec, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;
    events.drain();
    let restart = BuildStatus::Failed {
        reason: process::RESTART_REASON.into(),
        report: true,
    };
    for id in [701, 702, 703] {
        assert_eq!(events.of(id), vec![restart.clone()], "build {id}");
        assert!(!is_active(&redis, id));
        assert_eq!(
            exec.launch(&build(id, json!({}))).await.unwrap(),
            Launched::AlreadyRunning
        );
    }
    assert!(
        events.of(704).is_empty(),
        "another host's build is its agent's business"
    );
    assert!(is_active(&redis, 704));

    assert!(all_dead(&[running.id(), starting.id()]).await);
    assert!(
        alive(reused.id()),
        "a pid whose start time differs is not the build"
    );
    let _ = reused.kill();
    for child in [&mut running, &mut reused, &mut starting] {
        let _ = child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_to_fix() {
    let mut redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let (exec, _events) = executor(
        &redis,
        dir.path(),
        vec!["sh".into(), "-c".into(), "exit 0".into()],
    )
    .await;
    let ok = exec.check().await.unwrap();
    assert!(ok.contains("/sh"), "resolved through PATH: {ok}");

    let missing = dir.path().join("no-such-launcher");
    let (exec, _events) = executor(&redis, dir.path(), argv(&missing)).await;
    let err = exec.check().await.unwrap_err().to_string();
    assert!(
        err.contains("no-such-launcher") && err.contains("executor.process.command"),
        "{err}"
    );
    // Nothing started, so nothing is recorded: the build can be launched once fixed.
    assert!(matches!(
        exec.launch(&build(801, json!({}))).await,
        Err(ExecError::Launcher(_))
    ));
    assert!(marker(&redis, 801).is_none());
    assert!(!is_active(&redis, 801));
    assert_eq!(exec.in_flight(), 0);

    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (exec, _events) = executor(&redis, dir.path(), argv(&plain)).await;
    let err = exec.check().await.unwrap_err().to_string();
    assert!(err.contains("chmod +x"), "{err}");
    let config = ProcessConfig {
        command: argv(&plain),
        ..ProcessConfig::default()
    };
    assert!(process::check_command(&config).is_err());
    let good = ProcessConfig {
        command: vec!["sh".into()],
        work_dir: Some(dir.path().join("fresh-work")),
        ..ProcessConfig::default()
    };
    let ok = process::check_command(&good).unwrap();
    assert!(ok.contains("fresh-work is writable"), "{ok}");
    // A work dir the agent cannot make (a file is in the way; root ignores permissions).
    let in_the_way = ProcessConfig {
        work_dir: Some(plain.clone()),
        ..good
    };
    let err = process::check_command(&in_the_way).unwrap_err().to_string();
    assert!(err.contains("executor.process.work_dir"), "{err}");

    let (exec, _events) = executor(&redis, dir.path(), vec!["sd-no-such-launcher".into()]).await;
    let err = exec.check().await.unwrap_err().to_string();
    assert!(err.contains("PATH"), "{err}");

    assert!(matches!(
        try_executor(&redis, dir.path(), vec![]).await,
        Err(ExecError::Rejected(_))
    ));

    let (exec, _events) = executor(&redis, dir.path(), vec!["sh".into()]).await;
    redis.kill();
    let err = exec.check().await.unwrap_err().to_string();
    assert!(err.contains("Redis"), "{err}");
}

/// What one build of the isolation test may try against the agent and a build running beside
/// it; each line of its report is `<what> denied` or `<what> ALLOWED`.
const PROBE: &str = r#"#!/bin/sh
out="$OUT"
if [ "$SD_BUILD_ID" = 901 ]; then
  # The victim: leaves where its secrets are, then waits to be told to end.
  printf '%s\n%s\n' "$$" "$SD_BUILD_CONFIG_FILE" > "$out/victim.tmp"
  chmod 644 "$out/victim.tmp" && mv "$out/victim.tmp" "$out/victim"
  while [ ! -e "$out/end" ]; do sleep 0.05; done
  exit 0
fi
while [ ! -e "$out/victim" ]; do sleep 0.05; done
victim_pid=$(sed -n 1p "$out/victim")
victim_config=$(sed -n 2p "$out/victim")
try() { what=$1; shift; if "$@" >/dev/null 2>&1; then echo "$what ALLOWED"; else echo "$what denied"; fi; }
{
  echo "uid $(id -u)"
  try key cat "$KEY"
  try config cat "$AGENT_CONFIG"
  try victim-environ cat "/proc/$victim_pid/environ"
  try victim-config cat "$victim_config"
  try signal-agent kill -0 "$AGENT_PID"
  try signal-victim kill -0 "$victim_pid"
  try list-work-dir ls "$WORK"
  try write-work-dir touch "$WORK/planted"
  try own-config cat "$SD_BUILD_CONFIG_FILE"
  case "$SD_TOKEN" in ?*) echo "own-token present";; *) echo "own-token missing";; esac
  [ -z "$SD_AGENT_SECRET" ] && echo "agent-env denied" || echo "agent-env ALLOWED"
} > "$out/report.tmp" 2>&1
chmod 644 "$out/report.tmp"; mv "$out/report.tmp" "$out/report"
"#;

/// Builds run as uids of their own (as root here, the agent can switch): a build cannot read
/// the agent's key or config, another running build's environment (its token) or config, the
/// agent's environment, nor signal the agent or the other build; it reads its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_cannot_reach_the_agents_secrets_or_another_build() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs root (CI runs as root)");
        return;
    }
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The way in is open to the builds' uids; the secrets are the agent's alone.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secrets = root.join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let key = secrets.join("cluster.key.pem");
    let agent_config = secrets.join("agent.toml");
    for file in [&key, &agent_config] {
        std::fs::write(file, "secret").unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = root.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let probe = root.join("probe.sh");
    std::fs::write(&probe, PROBE).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = root.join("work");
    // The probe learns the paths through variables the allow-list lets through.
    let vars = [
        ("OUT", out.display().to_string()),
        ("KEY", key.display().to_string()),
        ("AGENT_CONFIG", agent_config.display().to_string()),
        ("AGENT_PID", std::process::id().to_string()),
        ("WORK", work.display().to_string()),
    ];
    for (name, value) in &vars {
        // SAFETY: set before the executor (and its threads) start; no other test of this
        // binary reads these names.
        unsafe { std::env::set_var(name, value) };
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("SD_AGENT_SECRET", "agent-only") };
    let config = ProcessConfig {
        command: argv(&probe),
        work_dir: Some(work.clone()),
        uid_range: Some("64100-64163".parse().unwrap()),
        group: Some("64100".into()),
        env_allow: ["PATH", "OUT", "KEY", "AGENT_CONFIG", "AGENT_PID", "WORK"]
            .map(String::from)
            .to_vec(),
        ..ProcessConfig::default()
    };
    let (exec, mut events) = executor_with(&redis, &config, &screwdriver()).await;
    assert!(exec.check().await.unwrap().contains("each as its own uid"));

    assert_eq!(
        exec.launch(&build(901, json!({}))).await.unwrap(),
        Launched::Created
    );
    assert_eq!(
        exec.launch(&build(902, json!({}))).await.unwrap(),
        Launched::Created
    );
    assert_eq!(events.end(902).await, BuildStatus::Finished);
    let report = std::fs::read_to_string(out.join("report")).unwrap();
    std::fs::write(out.join("end"), "").unwrap();
    assert_eq!(events.end(901).await, BuildStatus::Finished);

    let uid: u32 = report
        .lines()
        .find_map(|l| l.strip_prefix("uid "))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!((64100..=64163).contains(&uid), "{report}");
    for what in [
        "key",
        "config",
        "victim-environ",
        "victim-config",
        "signal-agent",
        "signal-victim",
        "list-work-dir",
        "write-work-dir",
        "agent-env",
    ] {
        assert!(
            report.lines().any(|l| l == format!("{what} denied")),
            "{what} must be denied:\n{report}"
        );
    }
    assert!(report.contains("own-config ALLOWED"), "{report}");
    assert!(report.contains("own-token present"), "{report}");
    assert!(!work.join("planted").exists());
    // Each build's directory went with its end; nothing of theirs is left in the work dir.
    let left: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("run-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A start message of 300 KiB starts (its config is a file; in a variable the kernel refuses
/// it); a job name longer than the kernel lets one variable be can never start: a permanent
/// error, so the launcher fails the build with the reason instead of retrying it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_build_starts_and_one_the_kernel_refuses_is_a_permanent_error() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "env.sh", env_script());
    let (exec, mut events) = executor(&redis, dir.path(), argv(&cmd)).await;

    let blob = "x".repeat(300 * 1024);
    let large = build(801, json!({"test/blob": blob}));
    assert_eq!(exec.launch(&large).await.unwrap(), Launched::Created);
    assert_eq!(events.end(801).await, BuildStatus::Finished);
    let config = std::fs::read_to_string(dir.path().join("config-801")).unwrap();
    assert!(config.len() > 300 * 1024 && config.contains(&blob));

    let mut refused = build(802, json!({}));
    refused.job_name = Some("j".repeat(200 * 1024));
    let err = exec.launch(&refused).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("too large"), "{err}");
    assert!(err.to_string().len() < 300, "the reason is short: {err}");
    assert!(!dir.path().join("env-802").exists(), "nothing started");
    // Nothing is left claiming the build: no marker, no directory.
    assert!(marker(&redis, 802).is_none());
    assert_eq!(exec.in_flight(), 0);
}
