//! The launch markers: the durable record in the local Redis that decides who runs a build, and
//! lets the next executor take over what one that is gone left. [`Markers`] owns the keys and
//! their scripts, as [`crate::outbox::Outbox`] does for build events.
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
//! - `{sd-agent}:launches:hosts` — HASH host → when its executor last looked at the markers
//!   (Redis clock, ms), so the runs of a host that went silent can be ended elsewhere.
//!
//! A leaf: it knows Redis and the marker's shape, nothing of processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_queue::Connection;
use sd_queue::markers::MarkerScripts;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::local::{Durability, LocalError};

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
/// Ended markers are kept this long, so a late redelivery of the build is still refused.
pub const MARKER_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Environment variable carrying the launch's id ([`Marker::launch_id`]), inherited by
/// everything the build spawns: it finds a build's processes after a crash even when no pid was
/// recorded.
pub const LAUNCH_ID_VAR: &str = "SD_AGENT_LAUNCH_ID";
/// Between SIGTERM and SIGKILL where no build's grace period is known (the orphan of an agent
/// that wrote no `grace_ms`), and the most given to what a launcher left in its group once it
/// has ended (it has reported already: its end is not held up for the whole grace period).
pub(super) const SHORT_GRACE: Duration = Duration::from_secs(10);

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
    /// Where the launcher's parent shell writes its exit status (`spawn::EXIT_WRAPPER`). Runs
    /// without one (older agents) cannot be adopted: an orphan of theirs is ended instead.
    #[serde(default)]
    pub exit_file: Option<PathBuf>,
}

impl Marker {
    /// SIGTERM to SIGKILL for this run: its build's grace period, else [`SHORT_GRACE`].
    pub(super) fn grace(&self) -> Duration {
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

// === impl Markers ===

/// A launch marker could not be read or written. Worth retrying (see
/// [`ExecError::is_permanent`](crate::executor::ExecError::is_permanent)): Redis may answer
/// again, and a marker is ours to encode.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("local Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("launch marker cannot be encoded: {0}")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, MarkerError>;

/// What [`Markers::create`] found.
pub(super) enum Created {
    /// The marker was written: the build is ours to start.
    New,
    /// A marker of the build was there already (`None`: it is unreadable).
    Exists(Option<Box<Marker>>),
}

/// What replacing a marker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Updated {
    /// Replaced; with whether a stop was requested for the build by an executor that does not
    /// own it.
    Ours { stop_requested: bool },
    /// Left as it was: another executor owns it, or it has ended (or is gone).
    NotOurs,
}

/// The launch markers of one local Redis.
pub(super) struct Markers {
    conn: Connection,
    /// The marker must be on disk before the process starts, or a Redis crash could forget it.
    durability: Durability,
    scripts: std::sync::Arc<MarkerScripts>,
}

impl Markers {
    pub(super) fn new(conn: Connection) -> Self {
        Self {
            conn,
            durability: Durability::default(),
            scripts: std::sync::Arc::new(MarkerScripts::default()),
        }
    }

    /// The local Redis answers.
    pub(super) async fn ping(&self) -> std::result::Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }

    /// Records that `host` is alive; returns the Redis clock (ms), which every host shares.
    pub(super) async fn beat(&self, host: &str) -> Result<u64> {
        let mut conn = self.conn.clone();
        Ok(self
            .scripts
            .beat
            .key(HOSTS_KEY)
            .arg(host)
            .invoke_async(&mut conn)
            .await?)
    }

    /// host → when it last beat (Redis clock, ms).
    pub(super) async fn beats(&self) -> Result<HashMap<String, u64>> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGETALL")
            .arg(HOSTS_KEY)
            .query_async(&mut conn)
            .await?)
    }

    /// The builds whose marker has not ended.
    pub(super) async fn active(&self) -> Result<Vec<u64>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(ACTIVE_KEY)
            .query_async(&mut conn)
            .await?;
        Ok(ids.into_iter().filter_map(|id| id.parse().ok()).collect())
    }

    /// The marker of build `id`; `None` when there is none, or it is unreadable (that is logged
    /// and the marker left as it is).
    pub(super) async fn get(&self, id: u64) -> Result<Option<Marker>> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(LAUNCHES_KEY)
            .arg(id)
            .query_async(&mut conn)
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str::<Marker>(&raw) {
            Ok(marker) => Ok(Some(marker)),
            Err(e) => {
                warn!(build_id = id, error = %e, "unreadable launch marker; leaving it");
                Ok(None)
            }
        }
    }

    /// Writes `marker` for build `id` unless the build has one: the step that decides who runs
    /// it.
    pub(super) async fn create(&self, id: u64, marker: &Marker) -> Result<Created> {
        let mut conn = self.conn.clone();
        let existing: Option<String> = self
            .scripts
            .create
            .key(LAUNCHES_KEY)
            .key(ACTIVE_KEY)
            .arg(id)
            .arg(serde_json::to_string(marker)?)
            .invoke_async(&mut conn)
            .await?;
        Ok(match existing {
            None => Created::New,
            Some(raw) => Created::Exists(serde_json::from_str(&raw).ok().map(Box::new)),
        })
    }

    /// Returns once what was written (the marker just created) is on the server's disk, where
    /// the server can say so.
    pub(super) async fn confirm(&self) -> std::result::Result<(), LocalError> {
        let mut conn = self.conn.clone();
        self.durability.confirm(&mut conn).await
    }

    /// Replaces the marker of build `id` with `marker` while executor `owner` owns it and it
    /// has not ended (`marker` may name another owner: that is how a run is taken over).
    pub(super) async fn update(&self, owner: &str, id: u64, marker: &Marker) -> Result<Updated> {
        self.replace(owner, id, marker, None).await
    }

    /// As [`Markers::update`], with `marker` the run's end (at `ended_at`, ms): it leaves the
    /// active set and its stop request, and is pruned after [`MARKER_RETENTION`].
    pub(super) async fn end(
        &self,
        owner: &str,
        id: u64,
        marker: &Marker,
        ended_at: u64,
    ) -> Result<Updated> {
        self.replace(owner, id, marker, Some(ended_at)).await
    }

    /// Deletes the marker of a launch whose spawn failed (nothing ran), while executor
    /// `instance` owns it and it is still starting; whether it did.
    pub(super) async fn abandon(&self, id: u64, instance: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let deleted: i64 = self
            .scripts
            .abandon
            .key(LAUNCHES_KEY)
            .key(ACTIVE_KEY)
            .arg(id)
            .arg(instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(deleted == 1)
    }

    /// Records a stop request for a build of `host` that has not ended, for its owner to
    /// see; its marker, or `None` when there is nothing to stop (or it is unreadable).
    pub(super) async fn stop(&self, id: u64, host: &str) -> Result<Option<Marker>> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = self
            .scripts
            .stop
            .key(LAUNCHES_KEY)
            .key(STOP_KEY)
            .arg(id)
            .arg(host)
            .invoke_async(&mut conn)
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Whether a stop was requested for build `id` by an executor that does not own it.
    pub(super) async fn stop_requested(&self, id: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("SISMEMBER")
            .arg(STOP_KEY)
            .arg(id)
            .query_async(&mut conn)
            .await?)
    }

    async fn replace(
        &self,
        owner: &str,
        id: u64,
        marker: &Marker,
        ended_at: Option<u64>,
    ) -> Result<Updated> {
        let prune_before = unix_ms().saturating_sub(millis(MARKER_RETENTION));
        let mut conn = self.conn.clone();
        let reply: i64 = self
            .scripts
            .update
            .key(LAUNCHES_KEY)
            .key(ACTIVE_KEY)
            .key(ENDED_KEY)
            .key(STOP_KEY)
            .arg(id)
            .arg(owner)
            .arg(serde_json::to_string(marker)?)
            .arg(ended_at.map(|t| t.to_string()).unwrap_or_default())
            .arg(prune_before)
            .invoke_async(&mut conn)
            .await?;
        Ok(if reply < 0 {
            Updated::NotOurs
        } else {
            Updated::Ours {
                stop_requested: reply == 1,
            }
        })
    }
}

/// Unix time in ms, as markers record it.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `d` in whole ms, as markers record durations.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
