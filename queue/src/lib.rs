//! The build queues of sd-buildcluster in Redis: one set of keys per cluster, every operation
//! one Lua script, every key under one hash tag so a Redis Cluster keeps a script in one slot.
//! The scheduler's master queues use the tag `sd`; an agent's local queue uses `sd-agent` in
//! its cluster's own Redis — the same scripts, the same guarantees.
//!
//! Architecture invariant: only this crate knows the key layout and the scripts. A build is in
//! at most one cluster's queue at a time (`{tag}:where` is checked inside the enqueue script),
//! and a build that was delivered and acknowledged is never queued again (`{tag}:acked`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

mod connection;
pub mod doorbell;
pub mod due;
mod holders;
pub mod markers;
pub mod outbox;
pub mod status;
mod target;
pub use connection::Connection;
pub use doorbell::{Doorbell, Listener};
pub use due::DueSet;
pub use target::{AccessError, RedisTarget, risky_settings};

/// Every timed script's first lines: Redis's clock as `now` (ms). Shared, so no script reads
/// time another way.
const CLOCK: &str = include_str!("clock.lua");

/// A script that starts from Redis's clock (`now`, in milliseconds). Every script of the
/// project that needs the time is built through here, from a `.lua` file of this crate.
pub fn timed_script(body: &str) -> Script {
    Script::new(&format!("{CLOCK}{body}"))
}

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
    /// id → the instance that leased it (`holders`).
    pub holders: String,
    /// Agent instance → Redis time (ms) of its last poll.
    pub agents: String,
    /// Agent instance → its last report of itself (JSON; empty for an agent too old to report).
    pub reports: String,
    /// Deliveries per minute over the last hour: `minute % 60` → `minute:count`.
    pub dispatched: String,
}

/// Every key name under one hash tag.
pub struct Keys {
    tag: String,
    /// Tombstones of acknowledged messages.
    pub acked: String,
    /// id → the cluster whose queue holds it.
    pub where_: String,
    /// jobId → the build delivered for it and not yet finished.
    pub running: String,
    /// jobId → the newest buildId queued for it (collapse).
    pub newest: String,
    /// jobId → JSON list of `cluster\tid` deferred behind that job.
    pub blocked: String,
    /// Counter behind the fencing tokens of leases.
    pub lease_seq: String,
    /// cluster → Redis time (ms) of its last authenticated poll.
    pub heartbeat: String,
    /// instance → Redis time (ms) of its last beat (`holders`).
    pub instances: String,
    /// The doorbell channel (not a key): scripts publish a cluster's name on it when work
    /// becomes ready there.
    pub bell: String,
}

impl Keys {
    pub fn new(tag: &str) -> Self {
        let key = |name: &str| format!("{{{tag}}}:{name}");
        Self {
            tag: tag.to_owned(),
            acked: key("acked"),
            where_: key("where"),
            running: key("running"),
            newest: key("newest"),
            blocked: key("blocked"),
            lease_seq: key("lease-seq"),
            heartbeat: key("heartbeat"),
            instances: key("instances"),
            bell: doorbell::channel(tag),
        }
    }

    pub fn cluster(&self, cluster: &str) -> ClusterKeys {
        let tag = &self.tag;
        let key = |suffix: &str| format!("{{{tag}}}:q:{cluster}:{suffix}");
        ClusterKeys {
            ready: key("ready"),
            leased: key("leased"),
            delayed: key("delayed"),
            jobs: key("jobs"),
            meta: key("meta"),
            dead: key("dead"),
            holders: key("holders"),
            agents: key("agents"),
            reports: key("reports"),
            dispatched: key("dispatched"),
        }
    }
}

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

/// How a start message waits for others (Screwdriver's blockedBy and collapse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    /// Job ids whose running build holds this one back.
    pub blockers: Vec<u64>,
    /// Drop this build (COLLAPSED) when it is blocked and a newer build of its job waits.
    pub collapse: bool,
    /// Re-check delay when only its own job blocks it (`blockedBySameJobWaitTime`).
    pub same_job_wait: Duration,
}

/// Lease and retry settings of the master queues.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    pub visibility_timeout: Duration,
    pub max_attempts: u32,
    pub blocked_recheck: Duration,
    pub nack_backoff: Duration,
    pub nack_backoff_max: Duration,
}

/// One leased message.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The queue id: a build id, or `stop:<buildId>`.
    pub id: String,
    pub token: String,
    pub attempt: u32,
    pub message: String,
}

impl Lease {
    /// The opaque id the agent acknowledges with: `<id>@<token>`.
    pub fn delivery_id(&self) -> String {
        format!("{}@{}", self.id, self.token)
    }
}

/// Splits a delivery id into (queue id, token).
pub fn parse_delivery_id(delivery_id: &str) -> Option<(&str, &str)> {
    let (id, token) = delivery_id.rsplit_once('@')?;
    (!id.is_empty() && !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()))
        .then_some((id, token))
}

/// What one fetch did.
#[derive(Debug, Default)]
pub struct Fetched {
    pub leases: Vec<Lease>,
    /// (id, message) dead-lettered after too many deliveries.
    pub dead: Vec<(String, String)>,
    /// (id, message, blocking job) deferred for the first time.
    pub blocked: Vec<(String, String, String)>,
    /// (id, message) dropped because a newer build of their job waits.
    pub collapsed: Vec<(String, String)>,
    /// Time until the next delayed message is due or a lease lapses.
    pub next_due_in: Option<Duration>,
}

/// What an agent does with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// The transfer succeeded: remove the message, leave a tombstone.
    Ack,
    /// Give it back now, with back-off.
    Nack,
    /// Keep it longer.
    Renew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The lease was current and the operation applied.
    Done,
    /// Not the current lease: nothing changed.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moved {
    Moved,
    /// An agent holds a lease on it: it stays.
    Leased,
    /// Re-queued (forced) after its cluster acknowledged it: that cluster's agent may still hold
    /// or run it, so it stays on that cluster.
    Pinned,
    Elsewhere(String),
    Absent,
}

/// Handle on the master queues; cheap to clone.
#[derive(Clone)]
pub struct Queues {
    conn: Connection,
    client: Client,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    holders: Arc<holders::HolderScripts>,
}

struct Scripts {
    enqueue: Script,
    cancel: Script,
    fetch: Script,
    ack: Script,
    nack: Script,
    renew: Script,
    release: Script,
    promote: Script,
    moves: Script,
    heartbeat: Script,
    status: Script,
    dead_forget: Script,
}

impl Queues {
    /// Connects lazily (a service starts, and reports not ready, while Redis is down); every key
    /// lives under the hash tag `{tag}`.
    pub fn connect(url: &str, tag: &str) -> Result<Self, QueueError> {
        Self::connect_to(&RedisTarget::new(url), tag)
    }

    /// As [`connect`](Self::connect), trusting `target`'s CA for `rediss://`.
    pub fn connect_to(target: &RedisTarget, tag: &str) -> Result<Self, QueueError> {
        let client = target.client()?;
        let conn = Connection::open(target, tag)?;
        Ok(Self {
            conn,
            client,
            keys: Arc::new(Keys::new(tag)),
            scripts: Arc::new(Scripts {
                enqueue: timed_script(include_str!("enqueue.lua")),
                cancel: Script::new(include_str!("cancel.lua")),
                fetch: timed_script(include_str!("fetch.lua")),
                ack: timed_script(include_str!("ack.lua")),
                nack: timed_script(include_str!("nack.lua")),
                renew: timed_script(include_str!("renew.lua")),
                release: Script::new(include_str!("release.lua")),
                promote: Script::new(include_str!("promote.lua")),
                moves: Script::new(include_str!("move.lua")),
                heartbeat: timed_script(include_str!("heartbeat.lua")),
                status: timed_script(include_str!("status.lua")),
                dead_forget: Script::new(include_str!("dead_forget.lua")),
            }),
            holders: Arc::default(),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection, for callers that keep records of their own next to the queue.
    pub fn connection(&self) -> Connection {
        self.conn.clone()
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

    /// Queues a start message; `force` re-queues a build delivered before (reconciler).
    pub async fn enqueue(
        &self,
        cluster: &str,
        build_id: u64,
        job_id: u64,
        message: &QueueMessage,
        holds: &Holds,
        force: bool,
    ) -> Result<Enqueued, QueueError> {
        self.enqueue_id(
            cluster,
            &build_id.to_string(),
            &job_id.to_string(),
            message,
            holds,
            force,
        )
        .await
    }

    async fn enqueue_id(
        &self,
        cluster: &str,
        id: &str,
        job_id: &str,
        message: &QueueMessage,
        holds: &Holds,
        force: bool,
    ) -> Result<Enqueued, QueueError> {
        let keys = self.keys.cluster(cluster);
        let body = serde_json::to_string(message)?;
        let blockers = serde_json::to_string(
            &holds
                .blockers
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>(),
        )?;
        let mut conn = self.conn.clone();
        let (code, owner): (i64, String) = self
            .scripts
            .enqueue
            .key(&keys.ready)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(&self.keys.acked)
            .key(&self.keys.where_)
            .key(&self.keys.newest)
            .key(&keys.dead)
            .arg(id)
            .arg(body)
            .arg(0)
            .arg(job_id)
            .arg(cluster)
            .arg(blockers)
            .arg(if holds.collapse { "1" } else { "0" })
            .arg(u64::try_from(holds.same_job_wait.as_millis()).unwrap_or(u64::MAX))
            .arg(if force { "1" } else { "0" })
            .arg(&self.keys.bell)
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

    /// Queues a `stop` for the cluster whose agent holds the build (id `stop:<buildId>`).
    pub async fn enqueue_stop(
        &self,
        cluster: &str,
        build_id: u64,
        message: &QueueMessage,
    ) -> Result<(), QueueError> {
        let id = format!("stop:{build_id}");
        match self
            .enqueue_id(cluster, &id, "", message, &Holds::default(), false)
            .await?
        {
            Enqueued::QueuedElsewhere(owner) => Err(QueueError::Reply(format!(
                "stop for build {build_id} is already queued on {owner}"
            ))),
            _ => Ok(()),
        }
    }

    /// Removes a waiting message; tells the caller when an agent already holds it.
    pub async fn cancel(&self, cluster: &str, build_id: u64) -> Result<Cancelled, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let reply: String = self
            .scripts
            .cancel
            .key(&keys.ready)
            .key(&keys.delayed)
            .key(&keys.leased)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(&self.keys.where_)
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

    /// Leases up to `max` messages of `cluster` (see `fetch.lua`).
    pub async fn fetch(
        &self,
        cluster: &str,
        max: u32,
        settings: &QueueSettings,
    ) -> Result<Fetched, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let (leases, dead, blocked, collapsed, next_due): (
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            i64,
        ) = self
            .scripts
            .fetch
            .key(&keys.ready)
            .key(&keys.leased)
            .key(&keys.delayed)
            .key(&keys.jobs)
            .key(&keys.meta)
            .key(&keys.dead)
            .key(&self.keys.running)
            .key(&self.keys.where_)
            .key(&self.keys.newest)
            .key(&self.keys.lease_seq)
            .key(&self.keys.blocked)
            .key(&self.keys.acked)
            .key(&keys.dispatched)
            .arg(max)
            .arg(millis(settings.visibility_timeout))
            .arg(settings.max_attempts)
            .arg(millis(settings.blocked_recheck))
            .arg(cluster)
            .invoke_async(&mut conn)
            .await?;
        let mut fetched = Fetched {
            next_due_in: u64::try_from(next_due).ok().map(Duration::from_millis),
            ..Fetched::default()
        };
        for chunk in leases.chunks_exact(4) {
            fetched.leases.push(Lease {
                id: chunk[0].clone(),
                token: chunk[1].clone(),
                attempt: chunk[2]
                    .parse()
                    .map_err(|_| QueueError::Reply(format!("attempt {:?}", chunk[2])))?,
                message: chunk[3].clone(),
            });
        }
        fetched.dead = pairs(dead);
        fetched.collapsed = pairs(collapsed);
        fetched.blocked = blocked
            .chunks_exact(3)
            .map(|c| (c[0].clone(), c[1].clone(), c[2].clone()))
            .collect();
        Ok(fetched)
    }

    /// Acknowledges, gives back or renews one lease, checked against its fencing token.
    pub async fn settle_lease(
        &self,
        op: LeaseOp,
        cluster: &str,
        id: &str,
        token: &str,
        settings: &QueueSettings,
    ) -> Result<LeaseOutcome, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut invocation = match op {
            LeaseOp::Ack => self.scripts.ack.prepare_invoke(),
            LeaseOp::Nack => self.scripts.nack.prepare_invoke(),
            LeaseOp::Renew => self.scripts.renew.prepare_invoke(),
        };
        invocation.key(&keys.leased);
        match op {
            LeaseOp::Ack => invocation
                .key(&keys.jobs)
                .key(&keys.meta)
                .key(&self.keys.where_)
                .key(&self.keys.acked)
                .arg(id)
                .arg(token),
            LeaseOp::Nack => invocation
                .key(&keys.delayed)
                .key(&keys.meta)
                .key(&self.keys.running)
                .arg(id)
                .arg(token)
                .arg(millis(settings.nack_backoff))
                .arg(millis(settings.nack_backoff_max)),
            LeaseOp::Renew => invocation
                .key(&keys.meta)
                .arg(id)
                .arg(token)
                .arg(millis(settings.visibility_timeout)),
        };
        let mut conn = self.conn.clone();
        let reply: String = invocation.invoke_async(&mut conn).await?;
        let done = match op {
            LeaseOp::Ack => "acked",
            LeaseOp::Nack => "nacked",
            LeaseOp::Renew => "renewed",
        };
        if reply == done {
            Ok(LeaseOutcome::Done)
        } else if reply == "stale" {
            Ok(LeaseOutcome::Stale)
        } else {
            Err(QueueError::Reply(reply))
        }
    }

    /// A build of `job_id` finished: release the job and promote what waited on it. Returns
    /// how many deferred builds were promoted.
    pub async fn release(&self, job_id: u64, build_id: u64) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let waiting: Vec<String> = self
            .scripts
            .release
            .key(&self.keys.running)
            .key(&self.keys.blocked)
            .arg(job_id)
            .arg(build_id)
            .invoke_async(&mut conn)
            .await?;
        let mut by_cluster: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (cluster, id) in pairs(waiting) {
            by_cluster.entry(cluster).or_default().push(id);
        }
        let mut promoted = 0;
        for (cluster, ids) in by_cluster {
            let keys = self.keys.cluster(&cluster);
            let mut invocation = self.scripts.promote.prepare_invoke();
            invocation
                .key(&keys.delayed)
                .key(&keys.ready)
                .key(&keys.meta)
                .arg(&self.keys.bell)
                .arg(&cluster);
            for id in &ids {
                invocation.arg(id);
            }
            let moved: usize = invocation.invoke_async(&mut conn).await?;
            promoted += moved;
        }
        Ok(promoted)
    }

    /// Moves a waiting message from `src` to `dst` (HA re-routing).
    pub async fn move_waiting(&self, id: &str, src: &str, dst: &str) -> Result<Moved, QueueError> {
        let (s, d) = (self.keys.cluster(src), self.keys.cluster(dst));
        let mut conn = self.conn.clone();
        let (what, name): (String, String) = self
            .scripts
            .moves
            .key(&s.ready)
            .key(&s.delayed)
            .key(&s.leased)
            .key(&s.jobs)
            .key(&s.meta)
            .key(&d.ready)
            .key(&d.jobs)
            .key(&d.meta)
            .key(&self.keys.where_)
            .arg(id)
            .arg(src)
            .arg(dst)
            .arg(&self.keys.bell)
            .invoke_async(&mut conn)
            .await?;
        Ok(match what.as_str() {
            "moved" => Moved::Moved,
            "leased" => Moved::Leased,
            "pinned" => Moved::Pinned,
            "elsewhere" => Moved::Elsewhere(name),
            _ => Moved::Absent,
        })
    }

    /// Records an authenticated poll and the polling agent's report of itself (`None`: an
    /// agent too old to report); returns Redis time (ms).
    pub async fn heartbeat(
        &self,
        cluster: &str,
        report: Option<&sd_protocol::AgentReport>,
    ) -> Result<i64, QueueError> {
        let keys = self.keys.cluster(cluster);
        let (instance, json) = match report {
            Some(report) => (report.instance.as_str(), serde_json::to_string(report)?),
            None => ("", String::new()),
        };
        let mut conn = self.conn.clone();
        let now: i64 = self
            .scripts
            .heartbeat
            .key(&self.keys.heartbeat)
            .key(&keys.agents)
            .key(&keys.reports)
            .arg(cluster)
            .arg(instance)
            .arg(json)
            .arg(millis(status::AGENTS_KEPT))
            .arg(status::MOST_AGENTS)
            .invoke_async(&mut conn)
            .await?;
        Ok(now)
    }

    /// `cluster`'s queue and agents as an operator sees them (see `status.lua`).
    pub async fn status(&self, cluster: &str) -> Result<status::QueueStatus, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let reply: redis::Value = self
            .scripts
            .status
            .key(&keys.ready)
            .key(&keys.leased)
            .key(&keys.delayed)
            .key(&keys.meta)
            .key(&keys.dead)
            .key(&keys.agents)
            .key(&keys.reports)
            .key(&keys.dispatched)
            .key(&self.keys.running)
            .key(&self.keys.heartbeat)
            .arg(status::MOST_SCANNED)
            .arg(millis(status::AGENTS_KEPT))
            .arg(cluster)
            .invoke_async(&mut conn)
            .await?;
        status::QueueStatus::from_reply(reply)
    }

    /// Last poll (Redis ms) per cluster, and Redis time now.
    pub async fn heartbeats(
        &self,
    ) -> Result<(std::collections::HashMap<String, i64>, i64), QueueError> {
        let mut conn = self.conn.clone();
        let beats: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(&self.keys.heartbeat)
            .query_async(&mut conn)
            .await?;
        Ok((beats, self.now_ms().await?))
    }

    /// Redis's clock, the one every script uses.
    pub async fn now_ms(&self) -> Result<i64, QueueError> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Holds this process's doorbell subscription until `stop` resolves (see [`Doorbell::run`]).
    pub async fn relay_doorbell(&self, doorbell: &Doorbell, stop: impl Future<Output = ()>) {
        doorbell
            .run(self.client.clone(), self.keys.bell.clone(), stop)
            .await;
    }

    /// Sizes of a cluster's ready, leased, delayed and dead sets (one round trip).
    pub async fn depths(&self, cluster: &str) -> Result<[u64; 4], QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let (ready, leased, delayed, dead): (u64, u64, u64, u64) = redis::pipe()
            .zcard(&keys.ready)
            .zcard(&keys.leased)
            .zcard(&keys.delayed)
            .zcard(&keys.dead)
            .query_async(&mut conn)
            .await?;
        Ok([ready, leased, delayed, dead])
    }

    /// [`depths`](Self::depths) of every cluster whose queue holds anything, found by scanning
    /// for the sets that exist (Redis deletes an empty set): a cluster absent from the answer
    /// has every depth 0. Costs a few commands plus one per non-empty set, however many
    /// clusters there are, where asking each cluster costs four per cluster even when all are
    /// idle. A set created or emptied during the scan may be missed until the next call.
    pub async fn depths_all(&self) -> Result<HashMap<String, [u64; 4]>, QueueError> {
        const SETS: [&str; 4] = ["ready", "leased", "delayed", "dead"];
        let prefix = format!("{{{}}}:q:", self.keys.tag);
        let pattern = format!("{}*", glob_escape(&prefix));
        let mut conn = self.conn.clone();
        let mut found: Vec<(String, usize, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                let Some((cluster, set)) = key
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.rsplit_once(':'))
                else {
                    continue;
                };
                // SCAN may return a key twice.
                if let Some(i) = SETS.iter().position(|s| *s == set)
                    && seen.insert(key.clone())
                {
                    found.push((cluster.to_owned(), i, key));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut depths: HashMap<String, [u64; 4]> = HashMap::new();
        if found.is_empty() {
            return Ok(depths);
        }
        let mut pipe = redis::pipe();
        for (_, _, key) in &found {
            pipe.zcard(key);
        }
        let sizes: Vec<u64> = pipe.query_async(&mut conn).await?;
        for ((cluster, i, _), n) in found.into_iter().zip(sizes) {
            depths.entry(cluster).or_default()[i] = n;
        }
        Ok(depths)
    }

    /// Ids waiting on a cluster's ready queue, oldest first (for inspection and tests).
    pub async fn ready(&self, cluster: &str) -> Result<Vec<String>, QueueError> {
        self.zrange(&self.keys.cluster(cluster).ready).await
    }

    /// Ids deferred (blocked, backing off) on a cluster's queue.
    pub async fn delayed(&self, cluster: &str) -> Result<Vec<String>, QueueError> {
        self.zrange(&self.keys.cluster(cluster).delayed).await
    }

    /// Ids leased to an agent and not yet acknowledged.
    pub async fn leased(&self, cluster: &str) -> Result<Vec<String>, QueueError> {
        self.zrange(&self.keys.cluster(cluster).leased).await
    }

    /// Dead-lettered ids of a cluster.
    pub async fn dead(&self, cluster: &str) -> Result<Vec<String>, QueueError> {
        self.zrange(&self.keys.cluster(cluster).dead).await
    }

    async fn zrange(&self, key: &str) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?)
    }

    /// A cluster's dead letters, the latest first, at most `max`: (id, when it died in Redis
    /// ms, its message) — the message is `None` when it was dropped meanwhile. Also the count
    /// of all of them.
    pub async fn dead_letters(
        &self,
        cluster: &str,
        max: usize,
    ) -> Result<(Vec<(String, i64, Option<String>)>, u64), QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let stop = isize::try_from(max).unwrap_or(isize::MAX).saturating_sub(1);
        let (newest, total): (Vec<(String, i64)>, u64) = redis::pipe()
            .zrevrange_withscores(&keys.dead, 0, stop)
            .zcard(&keys.dead)
            .query_async(&mut conn)
            .await?;
        if newest.is_empty() {
            return Ok((Vec::new(), total));
        }
        let ids: Vec<&str> = newest.iter().map(|(id, _)| id.as_str()).collect();
        let messages: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&keys.jobs)
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        let letters = newest
            .into_iter()
            .zip(messages)
            .map(|((id, at), message)| (id, at, message))
            .collect();
        Ok((letters, total))
    }

    /// One dead letter of a cluster: when it died (Redis ms) and its message (`None` when it
    /// was dropped meanwhile); `None` when `id` is not a dead letter there.
    pub async fn dead_letter(
        &self,
        cluster: &str,
        id: &str,
    ) -> Result<Option<(i64, Option<String>)>, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let (at, message): (Option<i64>, Option<String>) = redis::pipe()
            .zscore(&keys.dead, id)
            .hget(&keys.jobs, id)
            .query_async(&mut conn)
            .await?;
        Ok(at.map(|at| (at, message)))
    }

    /// Dead letters of a cluster that died more than `age` ago on Redis's clock, the oldest
    /// first, at most `max`.
    pub async fn dead_before(
        &self,
        cluster: &str,
        age: Duration,
        max: usize,
    ) -> Result<Vec<String>, QueueError> {
        let cutoff = self
            .now_ms()
            .await?
            .saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let mut conn = self.conn.clone();
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(&self.keys.cluster(cluster).dead)
            .arg("-inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(&mut conn)
            .await?)
    }

    /// Drops a dead letter and its message (see `dead_forget.lua`); `false` when `id` was not
    /// a dead letter of `cluster`.
    pub async fn forget_dead(&self, cluster: &str, id: &str) -> Result<bool, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let forgotten: i64 = self
            .scripts
            .dead_forget
            .key(&keys.dead)
            .key(&keys.jobs)
            .key(&keys.meta)
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(forgotten == 1)
    }

    /// The message stored for `id` on a cluster's queue.
    pub async fn message(
        &self,
        cluster: &str,
        id: &str,
    ) -> Result<Option<QueueMessage>, QueueError> {
        let mut conn = self.conn.clone();
        let body: Option<String> = redis::cmd("HGET")
            .arg(self.keys.cluster(cluster).jobs)
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(match body {
            Some(b) => Some(serde_json::from_str(&b)?),
            None => None,
        })
    }

    /// Which cluster's queue holds `id`, if any.
    pub async fn owner(&self, id: &str) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(&self.keys.where_)
            .arg(id)
            .query_async(&mut conn)
            .await?)
    }
}

/// A duration as the milliseconds every script takes (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `text` as a Redis glob pattern matching itself only (`*`, `?`, `[`, `]` and `\\` escaped).
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn pairs(flat: Vec<String>) -> Vec<(String, String)> {
    flat.chunks_exact(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_delivery_id;

    #[test]
    fn delivery_ids_round_trip() {
        assert_eq!(parse_delivery_id("8609@12"), Some(("8609", "12")));
        assert_eq!(parse_delivery_id("stop:5@3"), Some(("stop:5", "3")));
        assert_eq!(parse_delivery_id("8609"), None);
        assert_eq!(parse_delivery_id("@1"), None);
        assert_eq!(parse_delivery_id("1@x"), None);
    }
}
