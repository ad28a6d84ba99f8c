//! Build events waiting to be reported, kept in the cluster's local Redis (a transactional
//! outbox) so a report survives the agent that produced it and is made once across replicas.
//!
//! - `{sd-agent}:events` — HASH buildId → [`Entry`] JSON: the build's latest unreported event
//!   (an end supersedes `running`; the first end recorded wins).
//! - `{sd-agent}:events:due` — ZSET buildId → when the entry may be claimed: now when recorded,
//!   then claim time + lease, so a reporter that died releases it by doing nothing.
//! - `{sd-agent}:events:done` — ZSET `buildId:status` → when it was reported: the same event
//!   seen again (another replica's pod watch, a relist after a restart) is not reported twice.
//!   Pruned after [`DONE_RETENTION`].

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::executor::{BuildEvent, BuildStatus};

const EVENTS_KEY: &str = "{sd-agent}:events";
const DUE_KEY: &str = "{sd-agent}:events:due";
const DONE_KEY: &str = "{sd-agent}:events:done";
/// Longer than any redelivery or finished-pod TTL, so late sightings of a build stay silent.
pub const DONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// KEYS: events, due, done. ARGV: id, status, entry JSON, retention ms.
/// Returns 1 recorded, 2 already pending, 0 already reported.
const RECORD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, status = ARGV[1], ARGV[2]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
if redis.call('ZSCORE', KEYS[3], id .. ':' .. status) then return 0 end
local ended = redis.call('ZSCORE', KEYS[3], id .. ':finished') or redis.call('ZSCORE', KEYS[3], id .. ':failed')
  or redis.call('ZSCORE', KEYS[3], id .. ':stopped')
if ended then return 0 end
local current = redis.call('HGET', KEYS[1], id)
if current then
  local pending = cjson.decode(current).status
  if pending == status or pending ~= 'running' or status == 'running' then return 2 end
end
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('ZADD', KEYS[2], now, id)
return 1
";

/// KEYS: events, due. ARGV: max, lease ms. Returns id, entry, id, entry…
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[1], id)
  if entry then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
    out[#out + 1] = id
    out[#out + 1] = entry
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
";

/// KEYS: events, due, done. ARGV: id, status, entry JSON (empty: reported, drop the entry),
/// retry delay ms (empty: keep the claim). Changes nothing when the pending entry is no longer
/// this status (an end superseded it).
const SETTLE: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or cjson.decode(current).status ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1]) end
  return 1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1] .. ':' .. ARGV[2])
return 1
";

/// KEYS: events, due. ARGV: lease ms, then id, status pairs. Pushes back the due time of entries
/// still pending with that status (a reporter at work keeps its claim).
const EXTEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and cjson.decode(current).status == ARGV[i + 1] then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
  end
end
return 1
";

/// One build's unreported event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub build_id: u64,
    /// `running`, `finished`, `failed` or `stopped` (the scheduler's event names).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Screwdriver must be told FAILURE by the agent (see [`BuildStatus::Failed`]).
    #[serde(default)]
    pub report: bool,
    /// The scheduler accepted the event; only the Screwdriver report is left.
    #[serde(default)]
    pub scheduler_done: bool,
    /// Failed report rounds so far.
    #[serde(default)]
    pub attempts: u32,
}

impl Entry {
    pub fn of(event: &BuildEvent) -> Self {
        let (status, reason, report) = match &event.status {
            BuildStatus::Running => ("running", None, false),
            BuildStatus::Finished => ("finished", None, false),
            BuildStatus::Failed { reason, report } => ("failed", Some(reason.clone()), *report),
            BuildStatus::Stopped => ("stopped", None, false),
            // The watcher sends it directly; were it recorded, it would rank as an end.
            BuildStatus::Scheduled { .. } => ("scheduled", None, false),
        };
        Self {
            build_id: event.build_id,
            status: status.to_owned(),
            reason,
            report,
            scheduler_done: false,
            attempts: 0,
        }
    }

    pub fn is_end(&self) -> bool {
        self.status != "running"
    }

    /// The executor status this entry stands for.
    pub fn build_status(&self) -> BuildStatus {
        match self.status.as_str() {
            "running" => BuildStatus::Running,
            "finished" => BuildStatus::Finished,
            "stopped" => BuildStatus::Stopped,
            _ => BuildStatus::Failed {
                reason: self.reason.clone().unwrap_or_else(|| "failed".to_owned()),
                report: self.report,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("local Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("build event encoding: {0}")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, OutboxError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// New: it will be reported.
    New,
    /// The same (or an earlier) end is already waiting to be reported.
    Pending,
    /// Already reported: nothing to do.
    Reported,
}

#[derive(Clone)]
pub struct Outbox {
    conn: ConnectionManager,
    record: Script,
    claim: Script,
    settle: Script,
    extend: Script,
}

impl Outbox {
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            record: Script::new(RECORD),
            claim: Script::new(CLAIM),
            settle: Script::new(SETTLE),
            extend: Script::new(EXTEND),
        }
    }

    /// Keeps the event until it is reported; idempotent per build and status.
    pub async fn record(&self, event: &BuildEvent) -> Result<Recorded> {
        let entry = Entry::of(event);
        let body = serde_json::to_string(&entry)?;
        let mut conn = self.conn.clone();
        let reply: i64 = self
            .record
            .key(EVENTS_KEY)
            .key(DUE_KEY)
            .key(DONE_KEY)
            .arg(entry.build_id)
            .arg(&entry.status)
            .arg(body)
            .arg(millis(DONE_RETENTION))
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply {
            1 => Recorded::New,
            2 => Recorded::Pending,
            _ => Recorded::Reported,
        })
    }

    /// Takes up to `max` entries that are due, for `lease`: nobody else claims them meanwhile.
    pub async fn claim(&self, max: usize, lease: Duration) -> Result<Vec<Entry>> {
        let mut conn = self.conn.clone();
        let flat: Vec<String> = self
            .claim
            .key(EVENTS_KEY)
            .key(DUE_KEY)
            .arg(max)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await?;
        let mut entries = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            match serde_json::from_str::<Entry>(&pair[1]) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    tracing::error!(build_id = %pair[0], error = %e, "unreadable build event in the outbox; dropping it");
                    self.drop_raw(&pair[0]).await?;
                }
            }
        }
        Ok(entries)
    }

    /// Keeps the claims of entries still being reported, `(build id, status)`, for `lease`.
    pub async fn extend(&self, claims: &[(u64, String)], lease: Duration) -> Result<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let mut invocation = self.extend.prepare_invoke();
        invocation.key(EVENTS_KEY).key(DUE_KEY).arg(millis(lease));
        for (id, status) in claims {
            invocation.arg(*id).arg(status);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// The event was reported (or cannot ever be): drop it and remember it as done.
    pub async fn reported(&self, entry: &Entry) -> Result<()> {
        self.settle(entry, String::new(), None).await
    }

    /// Saves the entry's progress (`scheduler_done`, `attempts`); with `retry_in`, it is due
    /// again then instead of when its claim lapses.
    pub async fn update(&self, entry: &Entry, retry_in: Option<Duration>) -> Result<()> {
        self.settle(entry, serde_json::to_string(entry)?, retry_in)
            .await
    }

    /// How the build ended, if an end was recorded (pending or reported): a recovering
    /// executor must not contradict it.
    pub async fn end_of(&self, build_id: u64) -> Result<Option<BuildStatus>> {
        let mut conn = self.conn.clone();
        type Ends = (Option<String>, Option<f64>, Option<f64>, Option<f64>);
        let (pending, finished, failed, stopped): Ends = redis::pipe()
            .hget(EVENTS_KEY, build_id)
            .zscore(DONE_KEY, format!("{build_id}:finished"))
            .zscore(DONE_KEY, format!("{build_id}:failed"))
            .zscore(DONE_KEY, format!("{build_id}:stopped"))
            .query_async(&mut conn)
            .await?;
        if let Some(entry) = pending.and_then(|p| serde_json::from_str::<Entry>(&p).ok())
            && entry.is_end()
        {
            return Ok(Some(entry.build_status()));
        }
        Ok(if finished.is_some() {
            Some(BuildStatus::Finished)
        } else if stopped.is_some() {
            Some(BuildStatus::Stopped)
        } else if failed.is_some() {
            Some(BuildStatus::Failed {
                reason: "failed".to_owned(),
                report: false,
            })
        } else {
            None
        })
    }

    /// Entries waiting (claimed or not), for `/metrics`.
    pub async fn pending(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HLEN")
            .arg(EVENTS_KEY)
            .query_async(&mut conn)
            .await?)
    }

    async fn settle(&self, entry: &Entry, body: String, retry_in: Option<Duration>) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .settle
            .key(EVENTS_KEY)
            .key(DUE_KEY)
            .key(DONE_KEY)
            .arg(entry.build_id)
            .arg(&entry.status)
            .arg(body)
            .arg(
                retry_in
                    .map(millis)
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            )
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn drop_raw(&self, id: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .hdel(EVENTS_KEY, id)
            .ignore()
            .zrem(DUE_KEY, id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
