//! The process executor: runs the configured launcher on this host, one process group per build.
//!
//! At most one run per buildId, across agent crashes and several agents sharing the local Redis,
//! rests on a durable launch marker written *before* anything is spawned:
//!
//! - `{sd-agent}:launches` — HASH buildId → [`Marker`] (JSON): host, owning executor, the launch's
//!   pid/pgid and process start time, state, outcome. Creating it is the one atomic step that
//!   decides who runs a build; a build whose marker exists is never started again.
//! - `{sd-agent}:launches:active` — SET of buildIds whose marker has not ended (what a restarted
//!   agent has to look at, without scanning every marker ever written).
//! - `{sd-agent}:launches:ended` — ZSET buildId → end time (ms), to prune ended markers after
//!   [`MARKER_RETENTION`] (longer than the queues' 7-day tombstones).
//! - `{sd-agent}:launches:stop` — SET of buildIds a stop was requested for by an executor that
//!   does not own the run, so the owner reports "stopped" rather than a failure.
//!
//! A marker whose owning executor is gone (its process died, the host rebooted, or it was
//! dropped) is an orphan: the next executor on the host kills what is left of the build (found
//! by the recorded process group, guarded against pid reuse by the start time, and by the
//! `SD_AGENT_LAUNCH_ID` each launch carries in its environment) and reports it failed once.
//!
//! Timeouts: the launcher enforces the build's timeout. It gets it in whole minutes
//! (`SD_TIMEOUT`), and at it aborts the step, runs teardown and reports the timeout to
//! Screwdriver itself. The agent's kill is only a backstop, [`Timing::backstop`] after the start
//! (the timeout, the grace period and `timeout_margin` later), for a launcher that hung; the
//! marker carries it, so an executor adopting the run after a restart keeps the same backstop.
//! A stop, or the backstop, sends SIGTERM to the build's process group and SIGKILL only after
//! the build's grace period ([`Timing::grace`], also the launcher's
//! `SD_TERMINATION_GRACE_PERIOD_SECONDS`): its SIGTERM trap uses it to abort the step, run
//! teardown and flush its status and logs.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sd_protocol::StartMessage;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{BuildEvent, BuildStatus, Events, ExecError, Launched, TimeLimits, Timing};
use crate::config::{ProcessConfig, ScrewdriverConfig};
use crate::local::Durability;
use crate::outbox::Outbox;

/// buildId → [`Marker`] JSON.
pub const LAUNCHES_KEY: &str = "{sd-agent}:launches";
/// buildIds whose marker has not ended.
pub const ACTIVE_KEY: &str = "{sd-agent}:launches:active";
/// buildId → end time (ms) of ended markers, for pruning.
pub const ENDED_KEY: &str = "{sd-agent}:launches:ended";
/// buildIds stopped by an executor that does not own the run.
pub const STOP_KEY: &str = "{sd-agent}:launches:stop";
/// host → when its executor last looked at the markers (Redis clock, ms).
pub const HOSTS_KEY: &str = "{sd-agent}:launches:hosts";
/// Runs on a host silent for this long are ended by an executor elsewhere on the same Redis:
/// the host is gone (or cut off), and its builds can no longer be reported by it.
pub const HOST_GONE_AFTER: Duration = Duration::from_secs(15 * 60);
/// Environment variable carrying the launch's id, inherited by everything the build spawns: it
/// finds a build's processes after a crash even when no pid was recorded.
pub const LAUNCH_ID_VAR: &str = "SD_AGENT_LAUNCH_ID";
/// Ended markers are kept this long, so a late redelivery of the build is still refused.
pub const MARKER_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The launcher's parent: runs it (`"$@"`), then leaves its exit status in the file `$0`
/// names, so an agent that restarts while the build runs can adopt it and still learn how it
/// ended. It mirrors the launcher's status (128 + N when a signal N ended it).
const EXIT_WRAPPER: &str =
    r#""$@"; status=$?; printf '%s\n' "$status" > "$0.tmp" && mv -f "$0.tmp" "$0"; exit "$status""#;
/// How often an adopted run (not a child of ours, so not awaitable) is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Reported for a build whose owning agent went away while it ran.
pub const RESTART_REASON: &str = "the agent restarted while the build ran; its result is unknown";
/// Reported (without telling Screwdriver, which asked for it) for a stopped build.
pub const STOP_REASON: &str = "stopped on request";

/// Between SIGTERM and SIGKILL where no build's grace period is known (the orphan of an agent
/// that wrote no `grace_ms`), and the most given to what a launcher left in its group once it
/// has ended (it has reported already: its end is not held up for the whole grace period).
const SHORT_GRACE: Duration = Duration::from_secs(10);
/// How often orphans of executors that died while this one runs are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How long ending a marker is retried while the local Redis is unreachable.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(600);

/// Records that this host is alive; returns the Redis clock (ms), which every host shares.
const BEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
return now
";

/// Creates a marker unless one exists. KEYS: launches, active. ARGV: id, marker.
/// Returns nil when created, else the existing marker.
const CREATE_LUA: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
";

/// Replaces a marker while `instance` owns it and it has not ended; an ending marker leaves the
/// active set, is indexed for pruning, and markers past retention are pruned (bounded work).
/// KEYS: launches, active, ended, stop. ARGV: id, instance, marker, ended_at ('' unless ending),
/// prune_before. Returns -1 when not applied, else 1 when a stop was requested, 0 otherwise.
const UPDATE_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return -1 end
local m = cjson.decode(cur)
if m.state == 'ended' or type(m.agent) ~= 'table' or m.agent.instance ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local stop = redis.call('SISMEMBER', KEYS[4], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[5], 'LIMIT', 0, 100)
  for _, old_id in ipairs(old) do
    redis.call('HDEL', KEYS[1], old_id)
    redis.call('ZREM', KEYS[3], old_id)
  end
end
return stop
";

/// Deletes a marker whose spawn failed (nothing ran), while `instance` owns it and it is still
/// starting. KEYS: launches, active. ARGV: id, instance.
const ABANDON_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local m = cjson.decode(cur)
if m.state ~= 'starting' or type(m.agent) ~= 'table' or m.agent.instance ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
";

/// Records a stop request for a build of `host` that has not ended. KEYS: launches, stop.
/// ARGV: id, host. Returns the marker, or nil when there is nothing to stop.
const STOP_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return false end
local m = cjson.decode(cur)
if m.state == 'ended' or m.host ~= ARGV[2] then return false end
redis.call('SADD', KEYS[2], ARGV[1])
return cur
";

/// The durable record of one launch (`{sd-agent}:launches` field buildId). Public for tooling
/// and tests that inspect or plant markers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Hostname of the machine the build runs on; only executors there may act on it.
    pub host: String,
    /// Kernel boot id: a marker from an earlier boot has no live processes or owner.
    #[serde(default)]
    pub boot_id: String,
    /// The executor that owns the run (or is ending it).
    pub agent: Owner,
    /// Value of `SD_AGENT_LAUNCH_ID` in the build's environment.
    pub launch_id: String,
    pub state: MarkerState,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pgid: Option<u32>,
    /// The launcher's start time (`/proc/<pid>/stat` field 22): guards against pid reuse.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Unix time (ms) the marker was created.
    pub started_at: u64,
    #[serde(default)]
    pub ended_at: Option<u64>,
    /// `finished`, or the failure reason.
    #[serde(default)]
    pub outcome: Option<String>,
    /// The build's timeout (the launcher's, in whole seconds). In a marker without
    /// `backstop_ms` (written by an older agent) it is also when the agent ends the run.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// When the agent ends the run if the launcher has not (ms after `started_at`): the
    /// backstop, so an executor that adopts the run keeps it.
    #[serde(default)]
    pub backstop_ms: Option<u64>,
    /// The build's grace period between SIGTERM and SIGKILL (ms).
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// Where the launcher's parent writes its exit status ([`EXIT_WRAPPER`]). Runs without
    /// one (older agents) cannot be adopted: an orphan of theirs is ended instead.
    #[serde(default)]
    pub exit_file: Option<PathBuf>,
}

impl Marker {
    /// SIGTERM to SIGKILL for this run: its build's grace period, else [`SHORT_GRACE`].
    fn grace(&self) -> Duration {
        self.grace_ms.map_or(SHORT_GRACE, Duration::from_millis)
    }
}

/// An executor instance: the agent process (pid + start time) and a random instance id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    #[serde(default)]
    pub start_time: Option<u64>,
    pub instance: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkerState {
    /// Marker written, launcher being spawned (no pid yet).
    Starting,
    Running,
    Ended,
}

/// Executor instances alive in this process: an owner sharing our pid is alive only if listed
/// (several executors in one process, or one dropped as a crash would).
static LIVE_INSTANCES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs builds as local processes. Dropping it abandons its builds as a crash would (they keep
/// running); the next executor on this host ends and reports them.
pub struct ProcessExecutor {
    inner: Arc<Inner>,
    sweeper: AbortHandle,
}

struct Inner {
    program: PathBuf,
    args: Vec<String>,
    work_dir: PathBuf,
    store_uri: String,
    ui_uri: String,
    /// `SD_PUSHGATEWAY_URL`, when configured.
    pushgateway_url: Option<String>,
    limits: TimeLimits,
    events: Events,
    redis: ConnectionManager,
    /// The marker must be on disk before the process starts, or a Redis crash could forget it.
    durability: Durability,
    /// Where a build's end is kept before its marker ends, so the report outlives this agent.
    outbox: Outbox,
    scripts: Scripts,
    host: String,
    boot_id: String,
    me: Owner,
    /// Builds launched here and not yet ended.
    runs: Mutex<HashMap<u64, Run>>,
}

struct Scripts {
    beat: Script,
    create: Script,
    update: Script,
    abandon: Script,
    stop: Script,
}

struct Run {
    cancel: CancellationToken,
    task: Option<AbortHandle>,
}

/// How a run came to an end.
enum End {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Stopped,
}

impl ProcessExecutor {
    /// Prepares the work dir, connects to the local Redis and ends what executors that are gone
    /// left running on this host (reported as `Failed { report: true }` on `events`). When Redis
    /// is unreachable now, that clean-up is retried in the background.
    pub async fn new(
        config: &ProcessConfig,
        screwdriver: &ScrewdriverConfig,
        redis_url: &str,
        events: Events,
    ) -> Result<Self, ExecError> {
        let Some((program, args)) = config.command.split_first().filter(|(p, _)| !p.is_empty())
        else {
            return Err(ExecError::Rejected(
                "executor.process.command is empty: set the launcher argv, e.g. [\"/usr/local/bin/sd-launch\"]".into(),
            ));
        };
        let mut program = PathBuf::from(program);
        // The child runs in the work dir: pin a relative path to the agent's own directory.
        if program.components().count() > 1 && program.is_relative() {
            let cwd = std::env::current_dir().map_err(|e| {
                ExecError::Rejected(format!(
                    "cannot resolve launcher {}: {e}",
                    program.display()
                ))
            })?;
            program = cwd.join(program);
        }
        let work_dir = prepare_work_dir(config)?;
        let client = redis::Client::open(redis_url)
            .map_err(|e| ExecError::Rejected(format!("redis.url is not a valid Redis URL: {e}")))?;
        let redis_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let redis = ConnectionManager::new_lazy_with_config(client, redis_config)
            .map_err(|e| ExecError::Rejected(format!("local Redis: {e}")))?;
        let pid = std::process::id();
        let me = Owner {
            pid,
            start_time: proc_stat(pid).map(|s| s.start_time),
            instance: format!("{:016x}", rand::random::<u64>()),
        };
        lock(&LIVE_INSTANCES).push(me.instance.clone());
        let inner = Arc::new(Inner {
            program,
            args: args.to_vec(),
            work_dir,
            store_uri: screwdriver.store_uri.clone(),
            ui_uri: screwdriver.ui_uri.clone(),
            pushgateway_url: Some(screwdriver.pushgateway_url.clone())
                .filter(|url| !url.trim().is_empty()),
            limits: config.limits(),
            events,
            outbox: Outbox::new(redis.clone()),
            redis,
            durability: Durability::default(),
            scripts: Scripts {
                beat: Script::new(BEAT_LUA),
                create: Script::new(CREATE_LUA),
                update: Script::new(UPDATE_LUA),
                abandon: Script::new(ABANDON_LUA),
                stop: Script::new(STOP_LUA),
            },
            host: hostname(),
            boot_id: boot_id(),
            me,
            runs: Mutex::new(HashMap::new()),
        });
        match inner.recover().await {
            Ok(0) => {}
            Ok(n) => info!(builds = n, "took over builds left by an agent that is gone"),
            Err(e) => {
                warn!(error = %e, "cannot look for builds a previous agent left running; will retry")
            }
        }
        let weak = Arc::downgrade(&inner);
        let sweeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = inner.recover().await {
                    warn!(error = %e, "looking for orphaned builds failed");
                }
            }
        })
        .abort_handle();
        Ok(Self { inner, sweeper })
    }

    /// Starts the launcher for `build` unless a marker says it was launched before (anywhere on
    /// this local Redis): then `AlreadyRunning` and nothing starts.
    pub async fn launch(&self, build: &StartMessage) -> Result<Launched, ExecError> {
        self.inner.launch(build).await
    }

    /// Kills the build's process group: SIGTERM, then SIGKILL after the build's grace period
    /// (the launcher's trap aborts the step, runs teardown and reports meanwhile). Also reaches
    /// a build another executor on this host runs, through its marker.
    pub async fn stop(&self, build_id: u64) -> Result<bool, ExecError> {
        self.inner.stop(build_id).await
    }

    /// The launcher is an executable file (through `PATH` for a bare name) and the local Redis
    /// answers.
    pub async fn check(&self) -> Result<String, ExecError> {
        let program = resolve_program(&self.inner.program)?;
        if !self.inner.work_dir.is_dir() {
            return Err(ExecError::Rejected(format!(
                "work dir {} is gone: recreate it or set executor.process.work_dir",
                self.inner.work_dir.display()
            )));
        }
        let mut conn = self.inner.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| {
                ExecError::Transient(format!(
                    "local Redis does not answer ({e}): check redis.url and that redis-server runs"
                ))
            })?;
        Ok(format!(
            "launcher {} is executable, local Redis answers, {} build(s) running",
            program.display(),
            self.in_flight()
        ))
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.inner.runs).len()
    }

    /// Where the launcher's stdout and stderr of `build_id` go.
    pub fn log_path(&self, build_id: u64) -> PathBuf {
        self.inner.log_path(build_id)
    }
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        self.sweeper.abort();
        let runs = std::mem::take(&mut *lock(&self.inner.runs));
        for run in runs.values() {
            if let Some(task) = &run.task {
                task.abort();
            }
        }
        lock(&LIVE_INSTANCES).retain(|i| *i != self.inner.me.instance);
    }
}

impl Inner {
    fn log_path(&self, build_id: u64) -> PathBuf {
        self.work_dir.join(format!("build-{build_id}.log"))
    }

    fn exit_path(&self, launch_id: &str) -> PathBuf {
        self.work_dir.join(format!("exit-{launch_id}"))
    }

    async fn launch(self: &Arc<Self>, build: &StartMessage) -> Result<Launched, ExecError> {
        let id = build.build_id;
        let cancel = CancellationToken::new();
        {
            let mut runs = lock(&self.runs);
            if runs.contains_key(&id) {
                return Ok(Launched::AlreadyRunning);
            }
            runs.insert(
                id,
                Run {
                    cancel: cancel.clone(),
                    task: None,
                },
            );
        }
        let started = match self.start(build, &cancel).await {
            Ok(Some(started)) => started,
            other => {
                lock(&self.runs).remove(&id);
                return other.map(|_| Launched::AlreadyRunning);
            }
        };
        let (child, marker, timing) = started;
        let task = tokio::spawn(Arc::clone(self).watch(id, child, marker, timing, cancel));
        if let Some(run) = lock(&self.runs).get_mut(&id) {
            run.task = Some(task.abort_handle());
        }
        Ok(Launched::Created)
    }

    /// Writes the marker and spawns; `None` when the build was launched before.
    async fn start(
        &self,
        build: &StartMessage,
        cancel: &CancellationToken,
    ) -> Result<Option<(Child, Marker, Timing)>, ExecError> {
        let id = build.build_id;
        let timing = Timing::of(build, &self.limits);
        let mut marker = Marker {
            host: self.host.clone(),
            boot_id: self.boot_id.clone(),
            agent: self.me.clone(),
            launch_id: format!("{id}-{:016x}", rand::random::<u64>()),
            state: MarkerState::Starting,
            pid: None,
            pgid: None,
            start_time: None,
            started_at: unix_ms(),
            ended_at: None,
            outcome: None,
            timeout_s: Some(timing.timeout.as_secs()),
            backstop_ms: Some(millis(timing.backstop)),
            grace_ms: Some(millis(timing.grace)),
            exit_file: None,
        };
        marker.exit_file = Some(self.exit_path(&marker.launch_id));
        let mut conn = self.redis.clone();
        let existing: Option<String> = self
            .scripts
            .create
            .key(LAUNCHES_KEY)
            .key(ACTIVE_KEY)
            .arg(id)
            .arg(to_json(&marker)?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if let Some(existing) = existing {
            match serde_json::from_str::<Marker>(&existing) {
                // Ours, still starting, and no launch of it in progress here: an earlier attempt
                // wrote it but its reply was lost, or it could not be removed after a failed
                // spawn. Nothing was started for it: carry on with it.
                Ok(m)
                    if m.agent.instance == self.me.instance && m.state == MarkerState::Starting =>
                {
                    info!(
                        build_id = id,
                        "resuming a launch whose marker an earlier attempt wrote"
                    );
                    marker = m;
                }
                _ => {
                    info!(
                        build_id = id,
                        "build was launched before; not starting it again"
                    );
                    return Ok(None);
                }
            }
        }
        // Not on disk: start nothing. The marker stays ours and `Starting`, so the retry of this
        // launch resumes it.
        self.durability.confirm(&mut conn).await.map_err(|e| {
            ExecError::Transient(format!(
                "launch marker of build {id} is not confirmed on disk yet: {e}"
            ))
        })?;
        let child = match self.spawn(build, &timing, &marker.launch_id) {
            Ok(child) => child,
            Err(e) => {
                let abandoned: Result<i64, _> = self
                    .scripts
                    .abandon
                    .key(LAUNCHES_KEY)
                    .key(ACTIVE_KEY)
                    .arg(id)
                    .arg(&self.me.instance)
                    .invoke_async(&mut conn)
                    .await;
                if let Err(re) = abandoned {
                    warn!(build_id = id, error = %re, "cannot remove the marker of a launch that did not start");
                }
                return Err(e);
            }
        };
        let pid = child.id();
        marker.pid = pid;
        marker.pgid = pid;
        marker.start_time = pid.and_then(proc_stat).map(|s| s.start_time);
        marker.state = MarkerState::Running;
        info!(
            build_id = id,
            pid,
            log = %self.log_path(id).display(),
            timeout_min = timing.minutes,
            backstop_s = timing.backstop.as_secs(),
            grace_s = whole_seconds(timing.grace),
            "launcher started"
        );
        match self.update(&self.me.instance, id, &marker, None).await {
            Ok(Some(true)) => {
                info!(build_id = id, "a stop was requested while it started");
                cancel.cancel();
            }
            Ok(Some(false)) => {}
            Ok(None) => warn!(build_id = id, "launch marker is no longer ours"),
            // The run goes on; a restarted agent finds it through its launch id.
            Err(e) => warn!(build_id = id, error = %e, "cannot record the launcher's pid"),
        }
        self.send(id, BuildStatus::Running);
        Ok(Some((child, marker, timing)))
    }

    fn spawn(
        &self,
        build: &StartMessage,
        timing: &Timing,
        launch_id: &str,
    ) -> Result<Child, ExecError> {
        let id = build.build_id;
        // The shell would start even without a launcher: find out here, while the launch can
        // still be retried (the marker is dropped) instead of failing the build.
        resolve_program(&self.program).map_err(|e| ExecError::Transient(e.to_string()))?;
        let exit_file = self.exit_path(launch_id);
        let _ = std::fs::remove_file(&exit_file);
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| {
                ExecError::Transient(format!("cannot open build log {}: {e}", log_path.display()))
            })?;
        let stderr = log.try_clone().map_err(|e| {
            ExecError::Transient(format!("cannot open build log {}: {e}", log_path.display()))
        })?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(EXIT_WRAPPER)
            .arg(&exit_file)
            .arg(&self.program)
            .args(&self.args)
            .current_dir(&self.work_dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(false);
        // The agent's own settings (SD_AGENT_*, possibly secrets) and stale SD_* values stay out.
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"SD_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.build_env(build, timing, launch_id)?);
        cmd.spawn().map_err(|e| {
            ExecError::Transient(format!(
                "cannot start launcher {}: {e} (fix executor.process.command)",
                self.program.display()
            ))
        })
    }

    /// The launcher's environment: its `SD_*` variables, and what Screwdriver's Kubernetes
    /// executor also gives it (`NODE_ID`, the host it reports as the build's; `CONTAINER_IMAGE`).
    /// The token is in `SD_TOKEN` only: `SD_BUILD_CONFIG` leaves it out, so dumping the config
    /// does not leak it.
    fn build_env(
        &self,
        build: &StartMessage,
        timing: &Timing,
        launch_id: &str,
    ) -> Result<Vec<(&'static str, String)>, ExecError> {
        let mut config = serde_json::to_value(build).map_err(|e| {
            ExecError::Rejected(format!("build {} cannot be encoded: {e}", build.build_id))
        })?;
        if let Some(object) = config.as_object_mut() {
            object.remove("token");
        }
        let event_id = build.event_id.or_else(|| {
            build
                .extra
                .get("build")
                .and_then(|b| b.get("eventId"))
                .and_then(serde_json::Value::as_u64)
        });
        let mut env = vec![
            ("SD_BUILD_ID", build.build_id.to_string()),
            ("SD_JOB_ID", build.job_id.to_string()),
            (
                "SD_EVENT_ID",
                event_id.map(|e| e.to_string()).unwrap_or_default(),
            ),
            ("SD_PIPELINE_ID", build.pipeline_id().to_string()),
            ("SD_JOB_NAME", build.job_name.clone().unwrap_or_default()),
            ("SD_TOKEN", build.token.clone().unwrap_or_default()),
            ("SD_API_URI", build.api_uri.clone()),
            ("SD_STORE_URI", self.store_uri.clone()),
            ("SD_UI_URI", self.ui_uri.clone()),
            // The launcher's own timeout (whole minutes): it ends the build at it.
            ("SD_TIMEOUT", timing.minutes.to_string()),
            // Its SIGTERM trap sleeps one second less before giving up.
            (
                "SD_TERMINATION_GRACE_PERIOD_SECONDS",
                whole_seconds(timing.grace).to_string(),
            ),
            ("SD_IMAGE", build.container.clone()),
            ("CONTAINER_IMAGE", build.container.clone()),
            ("NODE_ID", self.host.clone()),
            ("SD_BUILD_CONFIG", config.to_string()),
            (LAUNCH_ID_VAR, launch_id.to_owned()),
        ];
        if let Some(url) = &self.pushgateway_url {
            env.push(("SD_PUSHGATEWAY_URL", url.clone()));
        }
        Ok(env)
    }

    /// Follows one run to its end, kills what is left of its group, records and reports it. The
    /// launcher ends the build at its timeout; only a launcher still there at the backstop is
    /// killed, and reported timed out by the agent.
    async fn watch(
        self: Arc<Self>,
        id: u64,
        mut child: Child,
        mut marker: Marker,
        timing: Timing,
        cancel: CancellationToken,
    ) {
        let end = tokio::select! {
            status = child.wait() => End::Exited(status),
            () = tokio::time::sleep(timing.backstop) => End::TimedOut,
            () = cancel.cancelled() => End::Stopped,
        };
        let pgid = marker.pgid;
        let status = match end {
            End::Exited(result) => {
                // The launcher is gone; anything it left in its group goes too.
                if let Some(pgid) = pgid
                    && group_alive(pgid)
                {
                    terminate(&[pgid], &[], None, timing.grace.min(SHORT_GRACE)).await;
                }
                match result {
                    Ok(status) if status.success() => BuildStatus::Finished,
                    Ok(status) if self.stop_requested(id).await => {
                        debug!(build_id = id, %status, "launcher ended after a stop request");
                        stopped()
                    }
                    Ok(status) => BuildStatus::Failed {
                        reason: describe(status),
                        report: true,
                    },
                    Err(e) => BuildStatus::Failed {
                        reason: format!("lost track of the launcher: {e}"),
                        report: true,
                    },
                }
            }
            End::TimedOut => {
                warn!(
                    build_id = id,
                    timeout_min = timing.minutes,
                    "the launcher did not end the build at its timeout; killing its process group"
                );
                terminate(pgid.as_slice(), &[], Some(&mut child), timing.grace).await;
                BuildStatus::Failed {
                    reason: backstop_reason(timing.minutes, timing.backstop),
                    report: true,
                }
            }
            End::Stopped => {
                info!(build_id = id, "stopping build; killing its process group");
                terminate(pgid.as_slice(), &[], Some(&mut child), timing.grace).await;
                stopped()
            }
        };
        lock(&self.runs).remove(&id);
        self.finish(id, &mut marker, status).await;
    }

    /// Follows a run adopted from an agent that is gone: not our child, so it is looked at
    /// every [`FOLLOW_EVERY`] until its launcher is gone, the backstop its marker records passes
    /// or a stop comes; its result is the exit status its parent shell left.
    async fn follow(self: Arc<Self>, id: u64, mut marker: Marker, cancel: CancellationToken) {
        enum Seen {
            Gone,
            TimedOut,
            Stopped,
        }
        let grace = marker.grace();
        let (end_after, timed_out) = match marker.backstop_ms {
            Some(backstop_ms) => {
                let backstop = Duration::from_millis(backstop_ms);
                let timeout_min = marker
                    .timeout_s
                    .unwrap_or(self.limits.default_timeout.as_secs())
                    .div_ceil(60)
                    .max(1);
                (backstop, backstop_reason(timeout_min, backstop))
            }
            // Written by an agent that ended runs at the timeout itself: it still does.
            None => {
                let timeout = marker
                    .timeout_s
                    .map_or(self.limits.default_timeout, Duration::from_secs);
                (
                    timeout,
                    format!("build timed out after {} minutes", minutes(timeout)),
                )
            }
        };
        let ends_at = marker.started_at.saturating_add(millis(end_after));
        let deadline = Instant::now() + Duration::from_millis(ends_at.saturating_sub(unix_ms()));
        let seen = loop {
            if !marker
                .pid
                .is_some_and(|pid| identity_matches(pid, marker.start_time))
            {
                break Seen::Gone;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
                () = tokio::time::sleep_until(deadline) => break Seen::TimedOut,
                () = cancel.cancelled() => break Seen::Stopped,
            }
        };
        let pgid = marker.pgid;
        let status = match seen {
            Seen::Gone => {
                if let Some(pgid) = pgid
                    && group_alive(pgid)
                {
                    terminate(&[pgid], &[], None, grace.min(SHORT_GRACE)).await;
                }
                self.result_of(id, &marker, RESTART_REASON).await
            }
            Seen::TimedOut => {
                warn!(
                    build_id = id,
                    "the launcher of an adopted build did not end it at its timeout; killing its process group"
                );
                terminate(pgid.as_slice(), &[], None, grace).await;
                BuildStatus::Failed {
                    reason: timed_out,
                    report: true,
                }
            }
            Seen::Stopped => {
                info!(
                    build_id = id,
                    "stopping adopted build; killing its process group"
                );
                terminate(pgid.as_slice(), &[], None, grace).await;
                stopped()
            }
        };
        lock(&self.runs).remove(&id);
        self.finish(id, &mut marker, status).await;
    }

    /// How a run that ended unwatched went: the exit status its parent shell left (on this
    /// host), a stop asked for it, else `fallback` as a failure.
    async fn result_of(&self, id: u64, marker: &Marker, fallback: &str) -> BuildStatus {
        let code = marker
            .exit_file
            .as_deref()
            .filter(|_| marker.host == self.host)
            .and_then(read_exit_status);
        match code {
            Some(0) => BuildStatus::Finished,
            _ if self.stop_requested(id).await => stopped(),
            Some(code) => BuildStatus::Failed {
                reason: describe_code(code),
                report: true,
            },
            None => BuildStatus::Failed {
                reason: fallback.to_owned(),
                report: true,
            },
        }
    }

    /// Ends the marker (retrying while Redis is unreachable) and sends the final event; the
    /// event does not wait for a long Redis outage. Once the marker is ended, the exit status
    /// file is removed (never before: an agent dying in between leaves it to the next one).
    async fn finish(&self, id: u64, marker: &mut Marker, status: BuildStatus) {
        let now = unix_ms();
        marker.state = MarkerState::Ended;
        marker.ended_at = Some(now);
        marker.outcome = Some(match &status {
            BuildStatus::Failed { reason, .. } => reason.clone(),
            BuildStatus::Stopped => STOP_REASON.to_owned(),
            _ => "finished".to_owned(),
        });
        info!(
            build_id = id,
            outcome = marker.outcome.as_deref().unwrap_or_default(),
            "build ended"
        );
        let give_up = Instant::now() + FINISH_RETRY_FOR;
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0;
        let mut kept = false;
        let end = BuildEvent {
            build_id: id,
            status: status.clone(),
        };
        let mut pending = Some(status);
        let ended = loop {
            // The end goes to the outbox before the marker ends: once the marker says ended,
            // nobody else will report this build, so its report must already be durable. Sent
            // directly meanwhile (Redis down), it is still kept once Redis is back: the direct
            // report may not outlive this agent.
            let failed = if kept {
                None
            } else {
                match self.outbox.record(&end).await {
                    Ok(_) => {
                        kept = true;
                        None
                    }
                    Err(e) => Some(("cannot keep the build's end", e.to_string())),
                }
            };
            let (what, error) = match failed {
                Some(failed) => failed,
                None => match self
                    .update(&marker.agent.instance, id, marker, Some(now))
                    .await
                {
                    Ok(Some(_)) => break true,
                    Ok(None) => {
                        debug!(build_id = id, "marker was already ended");
                        break true;
                    }
                    Err(e) => ("cannot record the build's end", e.to_string()),
                },
            };
            attempts += 1;
            warn!(build_id = id, error = %error, attempts, "{what}");
            if attempts >= 3
                && let Some(status) = pending.take()
            {
                self.send(id, status);
            }
            if Instant::now() >= give_up {
                error!(
                    build_id = id,
                    "giving up recording the build's end; its marker stays running"
                );
                break false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        };
        if ended && let Some(path) = &marker.exit_file {
            let _ = std::fs::remove_file(path);
        }
        if let Some(status) = pending {
            self.send(id, status);
        }
    }

    fn send(&self, build_id: u64, status: BuildStatus) {
        if self.events.send(BuildEvent { build_id, status }).is_err() {
            debug!(build_id, "build event dropped: nobody listens");
        }
    }

    /// Replaces the marker if `owner` still owns it: `None` when it does not (or it ended),
    /// else whether a stop was requested for the build.
    async fn update(
        &self,
        owner: &str,
        id: u64,
        marker: &Marker,
        ended_at: Option<u64>,
    ) -> Result<Option<bool>, ExecError> {
        let prune_before = unix_ms()
            .saturating_sub(u64::try_from(MARKER_RETENTION.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.redis.clone();
        let reply: i64 = self
            .scripts
            .update
            .key(LAUNCHES_KEY)
            .key(ACTIVE_KEY)
            .key(ENDED_KEY)
            .key(STOP_KEY)
            .arg(id)
            .arg(owner)
            .arg(to_json(marker)?)
            .arg(ended_at.map(|t| t.to_string()).unwrap_or_default())
            .arg(prune_before)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok((reply >= 0).then_some(reply == 1))
    }

    async fn stop_requested(&self, id: u64) -> bool {
        let mut conn = self.redis.clone();
        redis::cmd("SISMEMBER")
            .arg(STOP_KEY)
            .arg(id)
            .query_async::<bool>(&mut conn)
            .await
            .unwrap_or(false)
    }

    async fn stop(&self, id: u64) -> Result<bool, ExecError> {
        if let Some(run) = lock(&self.runs).get(&id) {
            run.cancel.cancel();
            return Ok(true);
        }
        // Another executor on this host (sharing the local Redis) may run it.
        let mut conn = self.redis.clone();
        let raw: Option<String> = self
            .scripts
            .stop
            .key(LAUNCHES_KEY)
            .key(STOP_KEY)
            .arg(id)
            .arg(&self.host)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(marker) = raw.and_then(|r| serde_json::from_str::<Marker>(&r).ok()) else {
            return Ok(false);
        };
        info!(build_id = id, owner = %marker.agent.instance, "stopping a build another executor runs");
        // Its owner reports it (stopped) when its launcher dies; a starting one stops once its
        // pid is recorded; an orphan's is reported by the clean-up.
        if let (Some(pid), Some(pgid)) = (marker.pid, marker.pgid)
            && identity_matches(pid, marker.start_time)
        {
            let start_time = marker.start_time;
            let grace = marker.grace();
            tokio::spawn(async move {
                if identity_matches(pid, start_time) {
                    terminate(&[pgid], &[], None, grace).await;
                }
            });
        }
        Ok(true)
    }

    /// Takes over the builds of executors on this host that are gone (adopting those still
    /// running, ending the rest) and ends those of hosts that are gone; returns how many. Also
    /// tells the other hosts that this one is alive.
    async fn recover(self: &Arc<Self>) -> Result<usize, ExecError> {
        let mut conn = self.redis.clone();
        let now: u64 = self
            .scripts
            .beat
            .key(HOSTS_KEY)
            .arg(&self.host)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let beats: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(HOSTS_KEY)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(ACTIVE_KEY)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut taken = 0;
        let mut orphans = Vec::new();
        for raw_id in ids {
            let Ok(id) = raw_id.parse::<u64>() else {
                continue;
            };
            if lock(&self.runs).contains_key(&id) {
                continue;
            }
            let raw: Option<String> = redis::cmd("HGET")
                .arg(LAUNCHES_KEY)
                .arg(id)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let Some(raw) = raw else { continue };
            let marker = match serde_json::from_str::<Marker>(&raw) {
                Ok(m) => m,
                Err(e) => {
                    warn!(build_id = id, error = %e, "unreadable launch marker; leaving it");
                    continue;
                }
            };
            if marker.state == MarkerState::Ended {
                continue;
            }
            let reason = if marker.host == self.host {
                if self.owner_alive(&marker) {
                    continue;
                }
                // A kept end means its owner saw the launcher end: nothing to follow.
                if self.adoptable(&marker) && self.known_end(id).await?.is_none() {
                    if self.adopt(id, marker).await? {
                        taken += 1;
                    }
                    continue;
                }
                RESTART_REASON.to_owned()
            } else {
                // A host that never beat ran an older agent: leave its markers to it.
                match beats.get(&marker.host) {
                    Some(seen)
                        if now.saturating_sub(*seen) > HOST_GONE_AFTER.as_millis() as u64 =>
                    {
                        host_gone_reason(&marker.host)
                    }
                    _ => continue,
                }
            };
            orphans.push((id, marker, reason));
        }
        // Together: each may wait for its build's grace period before its SIGKILL.
        let ended =
            futures::future::join_all(orphans.into_iter().map(|(id, marker, reason)| async move {
                self.recover_one(id, marker, &reason).await
            }))
            .await;
        for result in ended {
            if result? {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Takes an orphaned marker over (so a crash of ours now leaves it to the next executor),
    /// kills what is left of the build (SIGKILL after the grace period its marker records) and
    /// reports it once.
    async fn recover_one(&self, id: u64, marker: Marker, reason: &str) -> Result<bool, ExecError> {
        let mut claimed = marker.clone();
        claimed.agent = self.me.clone();
        let Some(stop_requested) = self
            .update(&marker.agent.instance, id, &claimed, None)
            .await?
        else {
            return Ok(false); // another executor took it first
        };
        warn!(
            build_id = id,
            pid = marker.pid,
            host = %marker.host,
            "build left by an agent that is gone; ending it"
        );
        // Only this host's processes can be reached; nothing of an earlier boot runs any more,
        // and its pids mean other processes now.
        if marker.host == self.host && (marker.boot_id.is_empty() || marker.boot_id == self.boot_id)
        {
            kill_orphan(&marker).await;
        }
        // Its owner may have kept the end before dying between that and ending the marker.
        let known_end = self.known_end(id).await?;
        let status = match known_end {
            Some(end) => end,
            None if stop_requested => stopped(),
            None => self.result_of(id, &marker, reason).await,
        };
        self.finish(id, &mut claimed, status).await;
        Ok(true)
    }

    async fn known_end(&self, id: u64) -> Result<Option<BuildStatus>, ExecError> {
        self.outbox
            .end_of(id)
            .await
            .map_err(|e| ExecError::Transient(format!("local Redis: {e}")))
    }

    /// An orphan of this host and boot whose launcher still runs under the parent shell that
    /// will leave its exit status: it can be followed to its end instead of killed.
    fn adoptable(&self, marker: &Marker) -> bool {
        marker.host == self.host
            && !marker.boot_id.is_empty()
            && marker.boot_id == self.boot_id
            && marker.exit_file.is_some()
            && marker
                .pid
                .is_some_and(|pid| identity_matches(pid, marker.start_time))
    }

    /// Makes a still-running orphan ours and follows it; `false` when another executor took it
    /// first.
    async fn adopt(self: &Arc<Self>, id: u64, marker: Marker) -> Result<bool, ExecError> {
        let cancel = CancellationToken::new();
        {
            let mut runs = lock(&self.runs);
            if runs.contains_key(&id) {
                return Ok(false);
            }
            runs.insert(
                id,
                Run {
                    cancel: cancel.clone(),
                    task: None,
                },
            );
        }
        let mut claimed = marker.clone();
        claimed.agent = self.me.clone();
        let stop_requested = match self
            .update(&marker.agent.instance, id, &claimed, None)
            .await
        {
            Ok(Some(stop_requested)) => stop_requested,
            other => {
                lock(&self.runs).remove(&id);
                return other.map(|_| false);
            }
        };
        info!(
            build_id = id,
            pid = marker.pid,
            "adopted a build its agent left running; following it to its end"
        );
        if stop_requested {
            cancel.cancel();
        }
        let task = tokio::spawn(Arc::clone(self).follow(id, claimed, cancel));
        if let Some(run) = lock(&self.runs).get_mut(&id) {
            run.task = Some(task.abort_handle());
        }
        Ok(true)
    }

    /// Whether the executor owning `marker` (on this host) still runs.
    fn owner_alive(&self, marker: &Marker) -> bool {
        let owner = &marker.agent;
        if owner.instance == self.me.instance {
            return true;
        }
        if !marker.boot_id.is_empty() && !self.boot_id.is_empty() && marker.boot_id != self.boot_id
        {
            return false;
        }
        if owner.pid == self.me.pid && owner.start_time == self.me.start_time {
            return lock(&LIVE_INSTANCES).contains(&owner.instance);
        }
        identity_matches(owner.pid, owner.start_time)
    }
}

/// Reported for a build whose host stopped answering while it ran.
pub fn host_gone_reason(host: &str) -> String {
    format!(
        "the agent on host {host} has not been heard from for over {} minutes while the build ran; its result is unknown",
        HOST_GONE_AFTER.as_secs() / 60
    )
}

fn stopped() -> BuildStatus {
    BuildStatus::Stopped
}

/// Reported when the agent's backstop ended a build: the launcher should have ended it (and
/// reported the timeout itself) at its `timeout_min`-minute timeout; `after` is the backstop.
pub fn backstop_reason(timeout_min: u64, after: Duration) -> String {
    format!(
        "build timed out: the launcher did not end it at its {timeout_min}-minute timeout, so the agent ended it after {} minutes",
        minutes(after)
    )
}

/// Kills an orphan's processes: the recorded group when its leader is still the same process,
/// and the group of every process carrying its launch id; SIGKILL after the grace period its
/// marker records, else [`SHORT_GRACE`].
async fn kill_orphan(marker: &Marker) {
    let mut groups = BTreeSet::new();
    let mut pids = BTreeSet::new();
    if let Some(pid) = marker.pid
        && identity_matches(pid, marker.start_time)
    {
        match proc_stat(pid).map(|s| s.pgid).or(marker.pgid) {
            Some(pgid) if killable_group(pgid) => groups.insert(pgid),
            _ => pids.insert(pid),
        };
    }
    for (pid, pgid) in processes_with_env(LAUNCH_ID_VAR, &marker.launch_id) {
        if killable_group(pgid) {
            groups.insert(pgid);
        } else {
            pids.insert(pid);
        }
    }
    let groups: Vec<u32> = groups.into_iter().collect();
    let pids: Vec<u32> = pids.into_iter().collect();
    if !groups.is_empty() || !pids.is_empty() {
        terminate(&groups, &pids, None, marker.grace()).await;
    }
}

/// SIGTERM to the groups and pids, then SIGKILL to what is still there after `grace`; reaps
/// `child` (the leader of the first group) when given.
async fn terminate(groups: &[u32], pids: &[u32], mut child: Option<&mut Child>, grace: Duration) {
    for &g in groups {
        signal_group(g, libc::SIGTERM);
    }
    for &p in pids {
        signal_pid(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    if let Some(child) = child.as_deref_mut()
        && groups.is_empty()
    {
        let _ = child.start_kill();
    }
    if let Some(child) = child.as_deref_mut() {
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    let remaining = || groups.iter().any(|&g| group_alive(g)) || pids.iter().any(|&p| pid_alive(p));
    while remaining() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if remaining() {
        for &g in groups {
            signal_group(g, libc::SIGKILL);
        }
        for &p in pids {
            signal_pid(p, libc::SIGKILL);
        }
    }
    if let Some(child) = child {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return describe_code(code);
    }
    match status.signal() {
        Some(signal) => killed_by(signal),
        None => format!("launcher ended: {status}"),
    }
}

/// The launcher's exit status as its parent shell reports it: 128 + N for a signal N.
fn describe_code(code: i32) -> String {
    match code {
        129..=192 => killed_by(code - 128),
        _ => format!("launcher exited with status {code}"),
    }
}

fn killed_by(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGQUIT => " (SIGQUIT)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    };
    format!("launcher was killed by signal {signal}{name}")
}

/// The status [`EXIT_WRAPPER`] left, if it got to write one.
fn read_exit_status(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Minutes for messages: "90", or "0.5" for short test timeouts.
fn minutes(d: Duration) -> f64 {
    (d.as_secs_f64() / 60.0 * 100.0).round() / 100.0
}

/// `d` in whole seconds, rounded up (the launcher's trap sleeps one second less).
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `sd-agent check` without a running executor: the launcher the config names exists and is
/// executable (through `PATH` for a bare name).
pub fn check_command(config: &ProcessConfig) -> Result<String, ExecError> {
    let Some(program) = config.command.first().filter(|p| !p.is_empty()) else {
        return Err(ExecError::Rejected(
            "executor.process.command is empty: set the launcher argv, e.g. [\"/usr/local/bin/sd-launch\"]".into(),
        ));
    };
    let program = resolve_program(Path::new(program))?;
    let work_dir = prepare_work_dir(config)?;
    // Build logs and the launcher's files go there: find out now whether the agent may write.
    let probe = work_dir.join(format!(".sd-agent-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| {
            ExecError::Rejected(format!(
                "work dir {} is not writable by this user ({e}): fix its owner or set executor.process.work_dir",
                work_dir.display()
            ))
        })?;
    Ok(format!(
        "launcher {} is executable; work dir {} is writable",
        program.display(),
        work_dir.display()
    ))
}

/// `executor.process.work_dir` (default: a folder under the system temp dir), created private
/// to the agent's user when missing.
fn prepare_work_dir(config: &ProcessConfig) -> Result<PathBuf, ExecError> {
    let work_dir = config
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("sd-agent-process"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&work_dir)
        .map_err(|e| {
            ExecError::Rejected(format!(
                "cannot create work dir {} (executor.process.work_dir): {e}",
                work_dir.display()
            ))
        })?;
    Ok(work_dir)
}

/// The program to run: `program` itself when it names a path, else the first executable match
/// in `PATH`. The error says what to fix.
fn resolve_program(program: &Path) -> Result<PathBuf, ExecError> {
    if program.components().count() > 1 {
        return check_executable(program).map(|()| program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| check_executable(candidate).is_ok())
        .ok_or_else(|| {
            ExecError::Rejected(format!(
                "launcher {} is not found in PATH ({}): install it or set executor.process.command to its absolute path",
                program.display(),
                path.to_string_lossy()
            ))
        })
}

fn check_executable(path: &Path) -> Result<(), ExecError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        ExecError::Rejected(format!(
            "launcher {} cannot be used ({e}): fix executor.process.command",
            path.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(ExecError::Rejected(format!(
            "launcher {} is not a file: fix executor.process.command",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(ExecError::Rejected(format!(
            "launcher {} is not executable: chmod +x it",
            path.display()
        )));
    }
    Ok(())
}

fn redis_err(e: redis::RedisError) -> ExecError {
    ExecError::Transient(format!("local Redis: {e}"))
}

fn to_json(marker: &Marker) -> Result<String, ExecError> {
    serde_json::to_string(marker)
        .map_err(|e| ExecError::Transient(format!("launch marker cannot be encoded: {e}")))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// === host and processes ===
//
// Linux `/proc` gives the pid-reuse guard (start times), group membership and the launch-id scan;
// without it (other Unixes) liveness falls back to `kill(pid, 0)` and the scan finds nothing.

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, which gethostname respects.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn have_proc() -> bool {
    Path::new("/proc/self/stat").exists()
}

struct ProcStat {
    state: char,
    pgid: u32,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field n is fields[n - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn is_live(stat: &ProcStat) -> bool {
    !matches!(stat.state, 'Z' | 'X' | 'x')
}

fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// `pid` is alive (not a zombie) and is the process that started at `start_time`. With `/proc`
/// a missing start time never matches: better to leave a process than to kill a stranger.
fn identity_matches(pid: u32, start_time: Option<u64>) -> bool {
    if have_proc() {
        return match (proc_stat(pid), start_time) {
            (Some(stat), Some(start)) => is_live(&stat) && stat.start_time == start,
            _ => false,
        };
    }
    signal_probe(1, pid)
}

fn pid_alive(pid: u32) -> bool {
    if have_proc() {
        return proc_stat(pid).is_some_and(|s| is_live(&s));
    }
    signal_probe(1, pid)
}

fn group_alive(pgid: u32) -> bool {
    if have_proc() {
        return proc_pids()
            .into_iter()
            .filter_map(proc_stat)
            .any(|s| s.pgid == pgid && is_live(&s));
    }
    signal_probe(-1, pgid)
}

/// Processes whose environment holds `name=value`, with their process group.
fn processes_with_env(name: &str, value: &str) -> Vec<(u32, u32)> {
    let needle = format!("{name}={value}");
    proc_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|entry| entry == needle.as_bytes())
            })
        })
        .filter_map(|pid| proc_stat(pid).filter(is_live).map(|s| (pid, s.pgid)))
        .collect()
}

/// Never signal init, "every process" (0/-1), or the agent's own group.
fn killable_group(pgid: u32) -> bool {
    // SAFETY: getpgrp has no preconditions.
    let own = unsafe { libc::getpgrp() };
    libc::pid_t::try_from(pgid).is_ok_and(|g| g > 1 && g != own)
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    if !killable_group(pgid) {
        return;
    }
    if let Ok(g) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill has no memory preconditions; `-g` (g > 1) addresses exactly group g.
        unsafe { libc::kill(-g, signal) };
    }
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    if p <= 1 || pid == std::process::id() {
        return;
    }
    // SAFETY: kill has no memory preconditions; p > 1 addresses exactly one process.
    unsafe { libc::kill(p, signal) };
}

/// `kill(sign * id, 0)`: whether the process (sign 1) or group (sign -1) exists.
fn signal_probe(sign: libc::pid_t, id: u32) -> bool {
    let Ok(id) = libc::pid_t::try_from(id) else {
        return false;
    };
    if id <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(sign * id, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
