//! What the operator's view reads from a cluster's queue in one script (`status.lua`): depths
//! by kind, the oldest waiting message, deliveries in the last hour, and the agents that polled
//! lately with their last report of themselves (written by `heartbeat.lua` on every poll).

use std::time::Duration;

use redis::{FromRedisValue, Value};
use sd_protocol::AgentReport;

use crate::QueueError;

/// How long an agent's report is kept after its last poll.
pub const AGENTS_KEPT: Duration = Duration::from_secs(3600);
/// Most agent instances kept per cluster (the newest); a cluster's many restarts or a hostile
/// agent inventing instance ids cannot grow the record further.
pub const MOST_AGENTS: u32 = 200;
/// Most messages of the ready and the deferred set looked at for the oldest one and the
/// blocked count, so one status read stays short however long the queue.
pub const MOST_SCANNED: u32 = 10_000;

/// A cluster's queue, read at one instant (`now_ms`, Redis's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStatus {
    pub ready: u64,
    pub leased: u64,
    /// Waiting for a retry after a nack.
    pub deferred: u64,
    /// Waiting for a build of a job they are blocked by to end.
    pub blocked: u64,
    pub dead: u64,
    /// The waiting (ready or deferred) message enqueued first, and when (Redis ms).
    pub oldest: Option<(String, i64)>,
    /// Whether every waiting message was looked at for `oldest` and `blocked` (at most
    /// [`MOST_SCANNED`] per set are).
    pub complete: bool,
    pub dispatched_last_hour: u64,
    pub now_ms: i64,
    /// Agents seen within [`AGENTS_KEPT`], the most recent first.
    pub agents: Vec<AgentSeen>,
    /// The cluster's last authenticated poll (Redis ms), by any agent.
    pub last_poll_ms: Option<i64>,
    /// The last 60 minutes, oldest first: builds dispatched in each, and builds waiting (ready
    /// or deferred) after its last fetch (`None`: no agent polled that minute).
    pub last_hour: Vec<(u64, Option<u64>)>,
}

/// An agent instance's last poll and what it said of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSeen {
    pub last_seen_ms: i64,
    /// `None` for an agent too old to report (all such agents of a cluster share one entry),
    /// or a report that no longer reads.
    pub report: Option<AgentReport>,
}

impl QueueStatus {
    /// Reads `status.lua`'s flat answer.
    pub(crate) fn from_reply(reply: Value) -> Result<Self, QueueError> {
        let Value::Array(items) = reply else {
            return Err(QueueError::Reply("status: not an array".into()));
        };
        let item = |i: usize| items.get(i).unwrap_or(&Value::Nil);
        let read = |i: usize| {
            i64::from_redis_value_ref(item(i))
                .map_err(|e| QueueError::Reply(format!("status item {i}: {e}")))
        };
        let count = |i: usize| read(i).map(|n| u64::try_from(n).unwrap_or(0));
        let oldest_at = read(6)?;
        let oldest_id = String::from_redis_value_ref(item(5)).unwrap_or_default();
        let agents = Vec::<Value>::from_redis_value_ref(item(10))
            .map_err(|e| QueueError::Reply(format!("status agents: {e}")))?
            .chunks(3)
            .filter_map(|entry| {
                let [_, seen, report] = entry else {
                    return None;
                };
                let report = String::from_redis_value_ref(report)
                    .ok()
                    .and_then(|json| serde_json::from_str::<AgentReport>(&json).ok());
                Some(AgentSeen {
                    last_seen_ms: i64::from_redis_value_ref(seen).ok()?,
                    report,
                })
            })
            .collect();
        Ok(Self {
            ready: count(0)?,
            leased: count(1)?,
            deferred: count(2)?,
            blocked: count(3)?,
            dead: count(4)?,
            oldest: (oldest_at >= 0).then_some((oldest_id, oldest_at)),
            complete: read(7)? == 1,
            dispatched_last_hour: count(8)?,
            now_ms: read(9)?,
            agents,
            last_poll_ms: Some(read(11)?).filter(|ms| *ms >= 0),
            last_hour: Vec::<i64>::from_redis_value_ref(item(12))
                .map_err(|e| QueueError::Reply(format!("status last hour: {e}")))?
                .chunks(2)
                .map(|pair| {
                    let dispatched = u64::try_from(pair[0]).unwrap_or(0);
                    let waiting = pair.get(1).and_then(|w| u64::try_from(*w).ok());
                    (dispatched, waiting)
                })
                .collect(),
        })
    }
}
