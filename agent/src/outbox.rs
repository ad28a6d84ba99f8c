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

use sd_queue::Connection;
use sd_queue::outbox::OutboxScripts;
use sd_queue::{DueSet, millis};
use serde::{Deserialize, Serialize};

use sd_protocol::Event;

use crate::events::{BuildEvent, BuildStatus, Events};

const EVENTS_KEY: &str = "{sd-agent}:events";
const DUE_KEY: &str = "{sd-agent}:events:due";
const DONE_KEY: &str = "{sd-agent}:events:done";
/// Longer than any redelivery or finished-pod TTL, so late sightings of a build stay silent.
pub const DONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One build's unreported event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub build_id: u64,
    /// The event the scheduler hears (`running`, `finished`, `failed`, `stopped` in JSON).
    pub status: Event,
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
    /// The entry for an event the scheduler hears; `None` for stats, which are not kept.
    pub fn of(event: &BuildEvent) -> Option<Self> {
        let (reason, report) = match &event.status {
            BuildStatus::Failed { reason, report } => (Some(reason.clone()), *report),
            _ => (None, false),
        };
        Some(Self {
            build_id: event.build_id,
            status: event.status.event()?,
            reason,
            report,
            scheduler_done: false,
            attempts: 0,
        })
    }

    pub fn is_end(&self) -> bool {
        self.status.is_end()
    }

    /// The executor status this entry stands for.
    pub fn build_status(&self) -> BuildStatus {
        match self.status {
            Event::Running => BuildStatus::Running,
            Event::Finished => BuildStatus::Finished,
            Event::Stopped => BuildStatus::Stopped,
            Event::Failed => BuildStatus::Failed {
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
    #[error("local Redis: {0}")]
    Queue(#[from] sd_queue::QueueError),
    #[error("build event encoding: {0}")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, OutboxError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Not an event the scheduler hears (a pod's stats): nothing kept.
    NotKept,
    /// New: it will be reported.
    New,
    /// The same (or an earlier) end is already waiting to be reported.
    Pending,
    /// Already reported: nothing to do.
    Reported,
}

#[derive(Clone)]
pub struct Outbox {
    conn: Connection,
    /// `events` claimed through `due`.
    entries: DueSet,
    scripts: std::sync::Arc<OutboxScripts>,
}

impl Outbox {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn,
            entries: DueSet::new(EVENTS_KEY, DUE_KEY),
            scripts: std::sync::Arc::new(OutboxScripts::default()),
        }
    }

    /// Keeps the event until it is reported; idempotent per build and status.
    pub async fn record(&self, event: &BuildEvent) -> Result<Recorded> {
        let Some(entry) = Entry::of(event) else {
            return Ok(Recorded::NotKept);
        };
        let body = serde_json::to_string(&entry)?;
        let mut conn = self.conn.clone();
        let reply: i64 = self
            .scripts
            .record
            .key(EVENTS_KEY)
            .key(DUE_KEY)
            .key(DONE_KEY)
            .arg(entry.build_id)
            .arg(entry.status.as_str())
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
        let claimed = self
            .entries
            .claim_json::<Entry>(&mut conn, max, lease)
            .await?;
        for (id, e) in claimed.dropped {
            tracing::error!(build_id = %id, error = %e, "unreadable build event in the outbox; dropped it");
        }
        Ok(claimed.items)
    }

    /// Keeps the claims of entries still being reported, `(build id, status)`, for `lease`.
    pub async fn extend(&self, claims: &[(u64, Event)], lease: Duration) -> Result<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let mut invocation = self.scripts.extend.prepare_invoke();
        invocation.key(EVENTS_KEY).key(DUE_KEY).arg(millis(lease));
        for (id, status) in claims {
            invocation.arg(*id).arg(status.as_str());
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
        Ok(self.entries.len(&mut conn).await?)
    }

    async fn settle(&self, entry: &Entry, body: String, retry_in: Option<Duration>) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .scripts
            .settle
            .key(EVENTS_KEY)
            .key(DUE_KEY)
            .key(DONE_KEY)
            .arg(entry.build_id)
            .arg(entry.status.as_str())
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
}

/// The one way into the agent's event path: an event is kept in the outbox (durably, once per
/// build and status) and handed to the reporter, which reports what the outbox holds. Makers
/// that settle a job or end a launch marker next `keep` first and must not go on until it
/// is kept; the Kubernetes watch, which can always see a pod again, only `notify`s, and the
/// reporter keeps it.
#[derive(Clone)]
pub struct EventSink {
    outbox: Outbox,
    reporter: Events,
}

impl EventSink {
    pub fn new(outbox: Outbox, reporter: Events) -> Self {
        Self { outbox, reporter }
    }

    /// Keeps the event in the outbox.
    pub async fn keep(&self, event: &BuildEvent) -> Result<Recorded> {
        self.outbox.record(event).await
    }

    /// Hands the event to the reporter (it keeps it too, so a notification alone is enough
    /// for events that can be seen again).
    pub fn notify(&self, event: BuildEvent) {
        if self.reporter.send(event).is_err() {
            tracing::debug!("build event not handed on: the reporter has stopped");
        }
    }

    /// [`keep`](Self::keep), then [`notify`](Self::notify); whether it was kept.
    pub async fn record(&self, event: BuildEvent) -> bool {
        let kept = match self.keep(&event).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(build_id = event.build_id, error = %e, "cannot keep the build event");
                false
            }
        };
        self.notify(event);
        kept
    }

    /// How the build ended, if an end was kept (see [`Outbox::end_of`]).
    pub async fn end_of(&self, build_id: u64) -> Result<Option<BuildStatus>> {
        self.outbox.end_of(build_id).await
    }
}
