//! The cluster's local queue: sd-queue's scripts under the tag `{sd-agent}` in the cluster's
//! own Redis, plus a record per launched build (where to report it) that survives restarts.
//!
//! Architecture invariant: the fetcher acknowledges a delivery to the scheduler only after
//! `push` returned Ok — the message is then in the local Redis (and, where the server offers
//! WAITAOF, on its disk).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use sd_protocol::{JobKind, QueueMessage, StartMessage};
use sd_queue::Connection;
use sd_queue::{
    Cancelled, Doorbell, Enqueued, Holds, Lease, LeaseOp, LeaseOutcome, Listener, QueueError,
    QueueSettings, Queues,
};
use tokio_util::sync::CancellationToken;

use crate::instance::InstanceLock;

pub const TAG: &str = "sd-agent";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("local Redis: {0}")]
    Queue(#[from] QueueError),
    #[error("local Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("queue message is not usable: {0}")]
    Message(String),
    #[error("local Redis did not confirm the write on disk (WAITAOF)")]
    NotDurable,
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
}

/// Where and as whom to report about a launched build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRecord {
    pub job_id: u64,
    pub api_uri: String,
    pub token: Option<String>,
}

#[derive(Clone)]
pub struct LocalQueue {
    queues: Queues,
    cluster: String,
    settings: QueueSettings,
    durability: Durability,
    records: String,
    /// Rung by every push (one subscription to the local Redis, held by the launcher).
    doorbell: Doorbell,
    /// This agent process among those sharing the local Redis: it names itself on what it takes
    /// and beats, so the others take its work over soon after it dies.
    instance: Arc<str>,
}

/// Whether the local Redis can confirm a write on disk (WAITAOF: Redis ≥ 7.2 with appendonly
/// on). Found out on first use and again after any error, not once at start-up: the agent may
/// start while Redis is down, and the server behind the URL may be replaced by another.
#[derive(Clone, Default)]
pub struct Durability(Arc<AtomicU8>);

const UNKNOWN: u8 = 0;
const WAITAOF: u8 = 1;
const NO_WAITAOF: u8 = 2;

impl Durability {
    /// Returns once what was written on `conn` is on the server's disk, where the server can
    /// say so; an error means it may not be, and nothing may be acknowledged on its strength.
    pub async fn confirm(&self, conn: &mut Connection) -> Result<(), LocalError> {
        let result = self.wait(conn).await;
        if result.is_err() {
            self.forget();
        }
        result
    }

    /// After a failed write: the next confirmation looks at the server again.
    pub fn forget(&self) {
        self.0.store(UNKNOWN, Ordering::Relaxed);
    }

    async fn wait(&self, conn: &mut Connection) -> Result<(), LocalError> {
        let mode = match self.0.load(Ordering::Relaxed) {
            UNKNOWN => {
                let mode = if detect_waitaof(conn).await? {
                    WAITAOF
                } else {
                    NO_WAITAOF
                };
                if self.0.swap(mode, Ordering::Relaxed) != mode && mode == NO_WAITAOF {
                    tracing::warn!(
                        "local Redis cannot confirm writes on disk (WAITAOF needs Redis ≥ 7.2 with appendonly yes): run it with appendonly yes and appendfsync always so acknowledged jobs survive a crash"
                    );
                }
                mode
            }
            mode => mode,
        };
        if mode == NO_WAITAOF {
            return Ok(());
        }
        // Below the connection's 2 s response timeout, so a slow disk is an answer, not an error.
        let (local, _replicas): (i64, i64) = redis::cmd("WAITAOF")
            .arg(1)
            .arg(0)
            .arg(1500)
            .query_async(conn)
            .await?;
        if local < 1 {
            return Err(LocalError::NotDurable);
        }
        Ok(())
    }
}

async fn detect_waitaof(conn: &mut Connection) -> Result<bool, LocalError> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("0")
        .trim()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (7, 2) {
        return Ok(false);
    }
    // WAITAOF is refused outright when appendonly is off (common on managed Redis).
    let persistence: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(conn)
        .await?;
    Ok(persistence.lines().any(|l| l.trim() == "aof_enabled:1"))
}

impl LocalQueue {
    /// Connects (lazily: a Redis that is down now is retried on each use).
    pub async fn connect(
        redis: impl Into<sd_queue::RedisTarget>,
        cluster: &str,
        lease: Duration,
    ) -> Result<Self, LocalError> {
        let queues = Queues::connect_to(&redis.into(), TAG)?;
        let settings = QueueSettings {
            visibility_timeout: lease,
            max_attempts: u32::MAX,
            blocked_recheck: Duration::from_secs(60),
            nack_backoff: Duration::from_secs(1),
            nack_backoff_max: Duration::from_secs(30),
        };
        let records = format!("{{{TAG}}}:builds");
        let local = Self {
            queues,
            cluster: cluster.to_owned(),
            settings,
            durability: Durability::default(),
            records,
            doorbell: Doorbell::default(),
            instance: format!(
                "agent-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            )
            .into(),
        };
        // Finds out about durability now when Redis is up, so the warning comes at start-up.
        let _ = local
            .durability
            .confirm(&mut local.queues.connection())
            .await;
        Ok(local)
    }

    pub async fn ping(&self) -> Result<(), LocalError> {
        Ok(self.queues.ping().await?)
    }

    /// Puts a delivered message on the local queue, idempotently: already queued or already
    /// taken by the launcher counts as done. Ok means it is on the server's disk where the
    /// server can confirm that.
    pub async fn push(&self, message: &QueueMessage) -> Result<(), LocalError> {
        let result = self.enqueue(message).await;
        match result {
            Ok(()) => self.durability.confirm(&mut self.queues.connection()).await,
            Err(e) => {
                self.durability.forget();
                Err(e)
            }
        }
    }

    async fn enqueue(&self, message: &QueueMessage) -> Result<(), LocalError> {
        let build_id = message
            .build_config
            .get("buildId")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| LocalError::Message("buildConfig.buildId is missing".into()))?;
        match message.job {
            JobKind::Start => {
                let job_id = message
                    .build_config
                    .get("jobId")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let outcome = self
                    .queues
                    .enqueue(
                        &self.cluster,
                        build_id,
                        job_id,
                        message,
                        &Holds::default(),
                        false,
                    )
                    .await?;
                if let Enqueued::QueuedElsewhere(other) = outcome {
                    return Err(LocalError::Message(format!(
                        "build {build_id} is queued for {other} in this Redis"
                    )));
                }
            }
            JobKind::Stop => {
                self.queues
                    .enqueue_stop(&self.cluster, build_id, message)
                    .await?
            }
        }
        Ok(())
    }

    /// Leases up to `max` local messages for the launcher.
    pub async fn take(&self, max: u32) -> Result<Vec<Lease>, LocalError> {
        let leases = self
            .queues
            .fetch(&self.cluster, max, &self.settings)
            .await?
            .leases;
        // Not naming itself only costs the quick takeover: the lease still lapses.
        if let Err(e) = self
            .queues
            .hold(&self.cluster, &self.instance, &leases)
            .await
        {
            tracing::warn!(error = %e, "could not name this agent as the holder of its local jobs");
        }
        Ok(leases)
    }

    /// This agent's instance name (what it holds local jobs as).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Start-up with an instance file: its lock proves this host's previous run dead, so the
    /// local jobs it held are taken back now rather than after `executor.takeover_after`; then
    /// this run is named in the file for the next. Returns how many jobs were taken back.
    ///
    /// Call it before taking any job. A file that cannot be written is an error; a Redis that
    /// cannot be reached is one too, but then the previous run's jobs still lapse as any silent
    /// agent's do, and this run is named in the file all the same.
    pub async fn take_back_previous_run(&self, lock: &mut InstanceLock) -> Result<u64, LocalError> {
        let previous = lock
            .previous()
            .filter(|name| *name != self.instance())
            .map(str::to_owned);
        let taken = match &previous {
            Some(name) => self.queues.reclaim_instance(&self.cluster, name).await,
            None => Ok(0),
        };
        lock.record(self.instance())?;
        let taken = taken?;
        if let Some(previous) = previous {
            tracing::info!(
                jobs = taken,
                previous = %previous,
                file = %lock.path().display(),
                "took back the local jobs of this host's previous run"
            );
        }
        metrics::counter!("sd_agent_jobs_taken_over_total").increment(taken);
        Ok(taken)
    }

    /// Until `stop`: beats every `lapse / 5`, and takes back at once the local jobs of any
    /// instance silent for longer than `lapse` (a killed agent, this host's previous run).
    pub async fn keep_alive(&self, lapse: Duration, stop: CancellationToken) {
        let every = lapse / 5;
        while !stop.is_cancelled() {
            if let Err(e) = self.queues.beat(&self.instance).await {
                tracing::warn!(error = %e, "could not beat in the local Redis");
            }
            match self.queues.reclaim(&self.cluster, lapse).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        jobs = n,
                        "took over the local jobs of an agent that stopped beating"
                    );
                    metrics::counter!("sd_agent_jobs_taken_over_total").increment(n);
                }
                Err(e) => tracing::warn!(error = %e, "could not look for silent agents"),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// The launcher handled the message.
    pub async fn done(&self, lease: &Lease) -> Result<bool, LocalError> {
        let outcome = self
            .queues
            .settle_lease(
                LeaseOp::Ack,
                &self.cluster,
                &lease.id,
                &lease.token,
                &self.settings,
            )
            .await?;
        Ok(outcome == LeaseOutcome::Done)
    }

    /// Try again later (back-off doubles per attempt).
    pub async fn retry(&self, lease: &Lease) -> Result<(), LocalError> {
        self.queues
            .settle_lease(
                LeaseOp::Nack,
                &self.cluster,
                &lease.id,
                &lease.token,
                &self.settings,
            )
            .await?;
        Ok(())
    }

    /// Drops a build that has not been launched yet.
    pub async fn cancel(&self, build_id: u64) -> Result<Cancelled, LocalError> {
        Ok(self.queues.cancel(&self.cluster, build_id).await?)
    }

    /// An ear on the local doorbell, rung by every push; heard only while
    /// [`relay_doorbell`](Self::relay_doorbell) runs.
    pub fn listen(&self) -> Listener {
        self.doorbell.listen(&self.cluster)
    }

    /// Holds the doorbell's subscription to the local Redis until `stop` resolves.
    pub async fn relay_doorbell(&self, stop: impl Future<Output = ()>) {
        self.queues.relay_doorbell(&self.doorbell, stop).await;
    }

    /// Messages accepted from the scheduler and not yet launched.
    pub async fn pending(&self) -> Result<u64, LocalError> {
        let [ready, leased, delayed, _dead] = self.queues.depths(&self.cluster).await?;
        Ok(ready + leased + delayed)
    }

    /// Keeps where to report a build, until it ends.
    pub async fn remember(&self, build: &StartMessage) -> Result<(), LocalError> {
        let record = BuildRecord {
            job_id: build.job_id,
            api_uri: build.api_uri.clone(),
            token: build.token.clone(),
        };
        self.remember_record(build.build_id, &record).await
    }

    pub async fn remember_record(
        &self,
        build_id: u64,
        record: &BuildRecord,
    ) -> Result<(), LocalError> {
        let body = serde_json::to_string(record).map_err(|e| LocalError::Message(e.to_string()))?;
        let mut conn = self.queues.connection();
        let _: () = conn.hset(&self.records, build_id, body).await?;
        Ok(())
    }

    pub async fn recall(&self, build_id: u64) -> Result<Option<BuildRecord>, LocalError> {
        let mut conn = self.queues.connection();
        let body: Option<String> = conn.hget(&self.records, build_id).await?;
        Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
    }

    pub async fn forget(&self, build_id: u64) -> Result<(), LocalError> {
        let mut conn = self.queues.connection();
        let _: () = conn.hdel(&self.records, build_id).await?;
        Ok(())
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }
}
