//! The master queues in the scheduler's Redis: one set of keys per cluster, every operation one
//! Lua script, every key under the `{sd}` hash tag so a Redis Cluster keeps a script in one slot.
//!
//! Architecture invariant: only this module knows the key layout and the scripts. A build is in
//! at most one cluster's queue at a time (`{sd}:where` is checked inside the enqueue script), and
//! a build that was delivered and acknowledged is never queued again (`{sd}:acked` tombstones).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use sd_protocol::QueueMessage;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("queue message could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("unexpected reply from queue script: {0}")]
    Reply(String),
}

/// The keys of one cluster's queue.
pub struct ClusterKeys {
    pub ready: String,
    pub leased: String,
    pub delayed: String,
    pub jobs: String,
    pub meta: String,
    pub dead: String,
    pub wake: String,
}

impl ClusterKeys {
    pub fn new(cluster: &str) -> Self {
        let key = |suffix: &str| format!("{{sd}}:q:{cluster}:{suffix}");
        Self {
            ready: key("ready"),
            leased: key("leased"),
            delayed: key("delayed"),
            jobs: key("jobs"),
            meta: key("meta"),
            dead: key("dead"),
            wake: key("wake"),
        }
    }
}

/// Tombstones of acknowledged builds.
pub const ACKED: &str = "{sd}:acked";
/// buildId → the cluster whose queue holds it.
pub const WHERE: &str = "{sd}:where";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Placed on the queue now.
    Queued,
    /// Already on this cluster's queue; nothing changed.
    AlreadyQueued,
    /// On another cluster's queue; nothing changed.
    QueuedElsewhere(String),
    /// Delivered and acknowledged before; nothing changed.
    AlreadyDelivered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    Removed,
    Leased,
    Absent,
}

/// Handle on the master queues; cheap to clone.
#[derive(Clone)]
pub struct Queues {
    conn: ConnectionManager,
    enqueue: Script,
    cancel: Script,
}

impl Queues {
    /// Connects lazily: the scheduler starts (and reports not ready) while Redis is down.
    pub fn connect(url: &str) -> Result<Self, QueueError> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            enqueue: Script::new(include_str!("enqueue.lua")),
            cancel: Script::new(include_str!("cancel.lua")),
        })
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Publishes on a pub/sub channel (registry invalidation).
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn enqueue(
        &self,
        cluster: &str,
        build_id: u64,
        job_id: u64,
        message: &QueueMessage,
    ) -> Result<Enqueued, QueueError> {
        let keys = ClusterKeys::new(cluster);
        let body = serde_json::to_string(message)?;
        let mut conn = self.conn.clone();
        let (code, owner): (i64, String) = self
            .enqueue
            .key(&keys.ready)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(&keys.wake)
            .key(ACKED)
            .key(WHERE)
            .arg(build_id)
            .arg(body)
            .arg(0)
            .arg(job_id)
            .arg(cluster)
            .invoke_async(&mut conn)
            .await?;
        match code {
            1 => Ok(Enqueued::Queued),
            0 => Ok(Enqueued::AlreadyQueued),
            -1 => Ok(Enqueued::QueuedElsewhere(owner)),
            -2 => Ok(Enqueued::AlreadyDelivered),
            other => Err(QueueError::Reply(format!("enqueue returned {other}"))),
        }
    }

    /// Removes a waiting build; tells the caller when an agent already holds it.
    pub async fn cancel(&self, cluster: &str, build_id: u64) -> Result<Cancelled, QueueError> {
        let keys = ClusterKeys::new(cluster);
        let mut conn = self.conn.clone();
        let reply: String = self
            .cancel
            .key(&keys.ready)
            .key(&keys.delayed)
            .key(&keys.leased)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(WHERE)
            .arg(build_id)
            .invoke_async(&mut conn)
            .await?;
        match reply.as_str() {
            "removed" => Ok(Cancelled::Removed),
            "leased" => Ok(Cancelled::Leased),
            "absent" => Ok(Cancelled::Absent),
            other => Err(QueueError::Reply(format!("cancel returned {other}"))),
        }
    }

    /// Queues a `stop` for the cluster whose agent holds the build (id `stop:<buildId>`).
    pub async fn enqueue_stop(
        &self,
        cluster: &str,
        build_id: u64,
        message: &QueueMessage,
    ) -> Result<(), QueueError> {
        let keys = ClusterKeys::new(cluster);
        let body = serde_json::to_string(message)?;
        let mut conn = self.conn.clone();
        let id = format!("stop:{build_id}");
        let (code, owner): (i64, String) = self
            .enqueue
            .key(&keys.ready)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(&keys.wake)
            .key(ACKED)
            .key(WHERE)
            .arg(&id)
            .arg(body)
            .arg(0)
            .arg(0)
            .arg(cluster)
            .invoke_async(&mut conn)
            .await?;
        match code {
            1 | 0 | -2 => Ok(()),
            _ => Err(QueueError::Reply(format!(
                "stop for build {build_id} is already queued on {owner}"
            ))),
        }
    }

    /// Ids waiting on a cluster's ready queue, oldest first (for inspection and tests).
    pub async fn ready(&self, cluster: &str) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(ClusterKeys::new(cluster).ready)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        Ok(ids)
    }

    /// The message stored for `id` on a cluster's queue.
    pub async fn message(
        &self,
        cluster: &str,
        id: &str,
    ) -> Result<Option<QueueMessage>, QueueError> {
        let mut conn = self.conn.clone();
        let body: Option<String> = redis::cmd("HGET")
            .arg(ClusterKeys::new(cluster).jobs)
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(match body {
            Some(b) => Some(serde_json::from_str(&b)?),
            None => None,
        })
    }
}
