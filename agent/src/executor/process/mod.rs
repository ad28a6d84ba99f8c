//! The process executor: runs the configured launcher on this host, one process group per build.
//!
//! At most one run per buildId, across agent crashes and several agents sharing the local Redis,
//! rests on a durable launch marker written *before* anything is spawned (`markers`: the keys,
//! their scripts and the [`Marker`] shape).
//!
//! A marker whose owning executor is gone (its process died, the host rebooted, or it was
//! dropped) is an orphan: the next executor on the host adopts the run when its launcher still
//! runs (the parent shell it runs under leaves its exit status), and otherwise kills what is
//! left of the build (found by the recorded process group, guarded against pid reuse by the
//! start time, and by the `SD_AGENT_LAUNCH_ID` each launch carries in its environment) and
//! reports it once.
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
//!
//! [`Timing::backstop`]: super::Timing::backstop
//! [`Timing::grace`]: super::Timing::grace
//!
//! Modules, each using only those listed before it (and this one's `Inner`):
//!
//! | module | what it owns |
//! | --- | --- |
//! | `sys` | `/proc` and libc (the crate's only `unsafe`): host name, boot id, start times, groups, signals, liveness, accounts, dropping privileges |
//! | `account` | whose account builds run as: resolved and checked from the config; a free uid of a range (pure) |
//! | `markers` | the launch markers in the local Redis: keys, Lua scripts, [`Marker`], the `Markers` store |
//! | `outcome` | a run's end in words (pure): exit statuses, [`backstop_reason`], [`STOP_REASON`] |
//! | `recovery` | what to do with a marker no run of ours follows (pure): skip, adopt or end |
//! | `spawn` | starting the launcher: program, work dir, the build's own directory and account, log, environment, the exit-status wrapper; removing the directory after |
//! | `kill` | SIGTERM, grace, SIGKILL; what a launcher left in its group; an orphan's processes |
//! | `runs` | the runs this executor follows; the one way a run (launched or adopted) is registered |
//! | `end` | a run followed to its end (our child or adopted), one end handler, the end kept then reported; stops |
//! | `launch` | marker created and on disk, then spawn, then the pid recorded |
//! | `orphans` | recovery's I/O edge: beat, read the markers, adopt or end |

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sd_protocol::StartMessage;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{Events, ExecError, Launched, TimeLimits};
use crate::config::{ProcessConfig, ScrewdriverConfig};
use crate::outbox::{EventSink, Outbox};

mod account;
mod end;
mod kill;
mod launch;
mod markers;
mod orphans;
mod outcome;
mod recovery;
mod runs;
mod spawn;
mod sys;

pub use account::AccountError;
pub use markers::{
    ACTIVE_KEY, ENDED_KEY, HOSTS_KEY, LAUNCH_ID_VAR, LAUNCHES_KEY, MARKER_RETENTION, Marker,
    MarkerError, MarkerState, Owner, STOP_KEY,
};
pub use outcome::{STOP_REASON, backstop_reason};
pub use recovery::{HOST_GONE_AFTER, RESTART_REASON, host_gone_reason};
pub use spawn::{LauncherError, check_command};

use markers::Markers;
use runs::Runs;
use spawn::Spawner;

/// How often orphans of executors that died while this one runs are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

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

/// What the executor's tasks share; its methods live in the modules named for what they do.
struct Inner {
    spawner: Spawner,
    limits: TimeLimits,
    markers: Markers,
    /// Where build events go: a build's end is kept there before its marker ends, so the
    /// report outlives this agent.
    events: EventSink,
    host: String,
    boot_id: String,
    me: Owner,
    runs: Runs,
}

// === impl ProcessExecutor ===

impl ProcessExecutor {
    /// Prepares the work dir, connects to the local Redis and ends what executors that are gone
    /// left running on this host (reported as `Failed { report: true }` on `events`). When Redis
    /// is unreachable now, that clean-up is retried in the background.
    pub async fn new(
        config: &ProcessConfig,
        screwdriver: &ScrewdriverConfig,
        redis: impl Into<sd_queue::RedisTarget>,
        events: Events,
    ) -> Result<Self, ExecError> {
        let host = sys::hostname();
        let spawner = Spawner::new(config, screwdriver, host.clone())?;
        let redis = connect(&redis.into())?;
        let pid = std::process::id();
        let me = Owner {
            pid,
            start_time: sys::start_time(pid),
            instance: format!("{:016x}", rand::random::<u64>()),
        };
        lock(&LIVE_INSTANCES).push(me.instance.clone());
        let inner = Arc::new(Inner {
            spawner,
            limits: config.limits(),
            // Its own outbox on the executor's Redis connection (short timeouts, see `connect`).
            events: EventSink::new(Outbox::new(redis.clone()), events),
            markers: Markers::new(redis),
            host,
            boot_id: sys::boot_id(),
            me,
            runs: Runs::default(),
        });
        match inner.recover().await {
            Ok(0) => {}
            Ok(n) => info!(builds = n, "took over builds left by an agent that is gone"),
            Err(e) => {
                warn!(error = %e, "cannot look for builds a previous agent left running; will retry")
            }
        }
        let sweeper = sweep(&inner);
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
        let (program, run_as) = self.inner.spawner.check()?;
        self.inner
            .markers
            .ping()
            .await
            .map_err(ExecError::RedisDown)?;
        Ok(format!(
            "launcher {} is executable, local Redis answers, {} build(s) running; {run_as}",
            program.display(),
            self.in_flight()
        ))
    }

    pub fn in_flight(&self) -> usize {
        self.inner.runs.len()
    }

    /// Where the launcher's stdout and stderr of `build_id` go.
    pub fn log_path(&self, build_id: u64) -> PathBuf {
        self.inner.spawner.log_path(build_id)
    }
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        self.sweeper.abort();
        self.inner.runs.abandon_all();
        lock(&LIVE_INSTANCES).retain(|i| *i != self.inner.me.instance);
    }
}

/// The local Redis, connected lazily, with short timeouts (`sd_queue::Connection`): a launch
/// fails fast (and is retried) rather than hanging on an unreachable server.
fn connect(redis: &sd_queue::RedisTarget) -> Result<sd_queue::Connection, ExecError> {
    sd_queue::Connection::open(redis, crate::local::TAG).map_err(|source| ExecError::Redis {
        context: "redis.url is not a valid Redis URL",
        source,
    })
}

/// Looks for orphans every [`SWEEP_INTERVAL`] while the executor lives (it holds no strong
/// reference: a dropped executor's sweeper ends).
fn sweep(inner: &Arc<Inner>) -> AbortHandle {
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            let Some(inner) = weak.upgrade() else { break };
            if let Err(e) = inner.recover().await {
                warn!(error = %e, "looking for orphaned builds failed");
            }
        }
    })
    .abort_handle()
}
