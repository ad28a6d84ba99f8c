//! The cluster's local queue: sd-queue's scripts under the tag `{sd-agent}` in the cluster's
//! own Redis, plus a record per launched build (where to report it) that survives restarts.
//!
//! Architecture invariant: the fetcher acknowledges a delivery to the scheduler only after
//! `push` returned Ok — the message is then in the local Redis (and, where the server offers
//! WAITAOF, on its disk).

use std::time::Duration;

use redis::AsyncCommands;
use sd_protocol::{JobKind, QueueMessage, StartMessage};
use sd_queue::{
    Cancelled, Enqueued, Holds, Lease, LeaseOp, LeaseOutcome, QueueError, QueueSettings, Queues,
};

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
    waitaof: bool,
    records: String,
}

impl LocalQueue {
    /// Connects and finds out whether the server can confirm durability (WAITAOF, Redis ≥ 7.2).
    pub async fn connect(url: &str, cluster: &str, lease: Duration) -> Result<Self, LocalError> {
        let queues = Queues::connect(url, TAG)?;
        let settings = QueueSettings {
            visibility_timeout: lease,
            max_attempts: u32::MAX,
            blocked_recheck: Duration::from_secs(60),
            nack_backoff: Duration::from_secs(1),
            nack_backoff_max: Duration::from_secs(30),
        };
        let records = format!("{{{TAG}}}:builds");
        let mut local = Self {
            queues,
            cluster: cluster.to_owned(),
            settings,
            waitaof: false,
            records,
        };
        local.waitaof = local.detect_waitaof().await.unwrap_or(false);
        if !local.waitaof {
            tracing::warn!(
                "local Redis cannot confirm writes on disk (WAITAOF needs Redis ≥ 7.2 with appendonly yes): run it with appendonly yes and appendfsync always so acknowledged jobs survive a crash"
            );
        }
        Ok(local)
    }

    async fn detect_waitaof(&self) -> Result<bool, LocalError> {
        let mut conn = self.queues.connection();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
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
            .query_async(&mut conn)
            .await?;
        let aof = persistence.lines().any(|l| l.trim() == "aof_enabled:1");
        if !aof {
            tracing::warn!(
                "local Redis runs without appendonly: acknowledged jobs are only as durable as its snapshots; set appendonly yes"
            );
        }
        Ok(aof)
    }

    pub async fn ping(&self) -> Result<(), LocalError> {
        Ok(self.queues.ping().await?)
    }

    /// Puts a delivered message on the local queue, idempotently: already queued or already
    /// taken by the launcher counts as done.
    pub async fn push(&self, message: &QueueMessage) -> Result<(), LocalError> {
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
        self.durable().await
    }

    async fn durable(&self) -> Result<(), LocalError> {
        if !self.waitaof {
            return Ok(());
        }
        let mut conn = self.queues.connection();
        let (local, _replicas): (i64, i64) = redis::cmd("WAITAOF")
            .arg(1)
            .arg(0)
            .arg(2000)
            .query_async(&mut conn)
            .await?;
        if local < 1 {
            return Err(LocalError::NotDurable);
        }
        Ok(())
    }

    /// Leases up to `max` local messages for the launcher.
    pub async fn take(&self, max: u32) -> Result<Vec<Lease>, LocalError> {
        Ok(self
            .queues
            .fetch(&self.cluster, max, &self.settings)
            .await?
            .leases)
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

    /// Waits for the local doorbell (a push) for at most `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Result<(), LocalError> {
        self.queues.wait_doorbell(&self.cluster, timeout).await?;
        Ok(())
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
        let body =
            serde_json::to_string(&record).map_err(|e| LocalError::Message(e.to_string()))?;
        let mut conn = self.queues.connection();
        let _: () = conn.hset(&self.records, build.build_id, body).await?;
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
