//! The operator's view of a cluster: is it alive and why, which agents poll it, what its queue
//! holds. The verdict is the pure [`assess`]; [`ClusterStatus::new`] assembles the answer from
//! one consistent read of Redis (`Queues::status`) and the cluster's record.
//!
//! Times come from Redis's clock, as the heartbeats do, so every replica gives the same answer.

use std::time::{Duration, UNIX_EPOCH};

use sd_queue::status::QueueStatus;
use serde::Serialize;

/// A cluster's health as the operator's view names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Health {
    /// An agent polled within `ha.cluster_dead_after`.
    Healthy,
    /// No poll for longer than `ha.cluster_dead_after`: routing avoids it and its waiting builds
    /// go to other clusters that may take them.
    Silent,
    /// No agent has polled it yet (or not within the last hour's records).
    NeverPolled,
    /// An admin paused it (`isActive: false`): it gets no builds, whatever its agents do.
    Paused,
}

/// The verdict on one cluster and the sentence that explains it. `last_poll_ms` and `now_ms`
/// are on Redis's clock.
pub fn assess(
    is_active: bool,
    last_poll_ms: Option<i64>,
    now_ms: i64,
    dead_after: Duration,
) -> (Health, String) {
    let silence = last_poll_ms.map(|at| millis_between(at, now_ms));
    match (is_active, silence) {
        (false, Some(quiet)) => (
            Health::Paused,
            format!("paused: gets no builds (last poll {} ago)", human(quiet)),
        ),
        (false, None) => (
            Health::Paused,
            "paused: gets no builds (no agent has polled)".to_owned(),
        ),
        (true, None) => (
            Health::NeverPolled,
            "no agent has polled: check that its agent runs and can reach the scheduler".to_owned(),
        ),
        (true, Some(quiet)) if quiet > dead_after => (
            Health::Silent,
            format!(
                "silent for {}, longer than ha.cluster_dead_after ({}): routing avoids it and its waiting builds move to other clusters",
                human(quiet),
                human(dead_after)
            ),
        ),
        (true, Some(quiet)) => (Health::Healthy, format!("last poll {} ago", human(quiet))),
    }
}

fn millis_between(earlier: i64, later: i64) -> Duration {
    Duration::from_millis(u64::try_from(later.saturating_sub(earlier)).unwrap_or(0))
}

/// A duration as a person reads it: whole seconds ("2m 5s").
pub fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// A Redis time (ms since the epoch) as RFC 3339.
pub(crate) fn timestamp(ms: i64) -> String {
    let since = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(UNIX_EPOCH + since).to_string()
}

/// `GET /v4/buildclusters/{name}/status`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    pub health: Health,
    /// Why, in a sentence.
    pub reason: String,
    /// The last poll by any of its agents (RFC 3339), if any.
    pub last_poll: Option<String>,
    /// Seconds since then.
    pub silent_for_seconds: Option<u64>,
    /// Agents that polled within the last hour, the most recent first.
    pub agents: Vec<AgentStatus>,
    pub queue: QueueDepths,
    /// The build waiting longest (ready, blocked or deferred).
    pub oldest_waiting: Option<OldestWaiting>,
    /// Builds handed to its agents in the last 60 minutes.
    pub dispatched_last_hour: u64,
    /// When this was read (RFC 3339, Redis's clock).
    pub at: String,
    /// Minute by minute over the last hour, oldest first (one cluster's status only; not in
    /// the answer for every cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_hour: Option<Vec<Minute>>,
}

/// One minute of a cluster's last hour.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Minute {
    /// Its start (RFC 3339).
    pub minute: String,
    /// Builds handed to the cluster's agents in it.
    pub dispatched: u64,
    /// Builds waiting (ready or deferred) after its last poll; `null` when no agent polled.
    pub waiting: Option<u64>,
}

/// One agent instance as it last reported itself. An agent too old to report is one entry with
/// every reported field `null` ("unknown").
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub instance: Option<String>,
    pub host: Option<String>,
    pub version: Option<String>,
    pub executor: Option<String>,
    pub in_flight: Option<u32>,
    pub capacity: Option<u32>,
    /// Its last poll (RFC 3339).
    pub last_seen: String,
    pub seconds_since: u64,
}

/// What a cluster's master queue holds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueDepths {
    /// Waiting for an agent to take them.
    pub ready: u64,
    /// Handed to an agent, not yet acknowledged.
    pub leased: u64,
    /// Waiting to be retried after an agent gave them back.
    pub deferred: u64,
    /// Waiting for a running build of a job they are blocked by.
    pub blocked: u64,
    /// Given up after too many deliveries and held for an operator (dead letters).
    pub dead: u64,
    /// `false` when the queue was too long to look at every waiting build: `blocked` and
    /// `oldestWaiting` then cover the first 10,000 of each kind.
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OldestWaiting {
    pub build_id: String,
    pub age_seconds: u64,
}

/// `GET /v4/buildclusters/status`: every cluster, by name.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AllStatus {
    pub clusters: Vec<ClusterStatus>,
}

impl ClusterStatus {
    /// Reads one cluster's status from Redis (one script), with its last hour minute by minute.
    pub async fn read(
        queues: &sd_queue::Queues,
        (name, is_active): (&str, bool),
        dead_after: Duration,
    ) -> Result<Self, sd_queue::QueueError> {
        let read = queues.status(name).await?;
        let last_hour = minutes(&read.last_hour, read.now_ms);
        Ok(Self {
            last_hour: Some(last_hour),
            ..Self::new(name, is_active, read, dead_after)
        })
    }

    /// Every cluster of `clusters` (name, active), in their order, without the minutes: sixty
    /// per cluster would swell the answer.
    pub async fn read_all(
        queues: &sd_queue::Queues,
        clusters: &[(String, bool)],
        dead_after: Duration,
    ) -> Result<AllStatus, sd_queue::QueueError> {
        let mut all = Vec::with_capacity(clusters.len());
        for (name, is_active) in clusters {
            let read = queues.status(name).await?;
            all.push(Self::new(name, *is_active, read, dead_after));
        }
        Ok(AllStatus { clusters: all })
    }

    /// The answer from one read, `last_hour` left out.
    pub fn new(name: &str, is_active: bool, read: QueueStatus, dead_after: Duration) -> Self {
        let now = read.now_ms;
        let (health, reason) = assess(is_active, read.last_poll_ms, now, dead_after);
        let agents = read
            .agents
            .into_iter()
            .map(|seen| {
                let report = seen.report;
                AgentStatus {
                    instance: report.as_ref().map(|r| r.instance.clone()),
                    host: report.as_ref().and_then(|r| r.host.clone()),
                    version: report.as_ref().map(|r| r.version.clone()),
                    executor: report.as_ref().map(|r| r.executor.clone()),
                    in_flight: report.as_ref().map(|r| r.in_flight),
                    capacity: report.as_ref().map(|r| r.capacity),
                    last_seen: timestamp(seen.last_seen_ms),
                    seconds_since: millis_between(seen.last_seen_ms, now).as_secs(),
                }
            })
            .collect();
        Self {
            name: name.to_owned(),
            health,
            reason,
            last_poll: read.last_poll_ms.map(timestamp),
            silent_for_seconds: read
                .last_poll_ms
                .map(|at| millis_between(at, now).as_secs()),
            agents,
            queue: QueueDepths {
                ready: read.ready,
                leased: read.leased,
                deferred: read.deferred,
                blocked: read.blocked,
                dead: read.dead,
                complete: read.complete,
            },
            oldest_waiting: read.oldest.map(|(build_id, at)| OldestWaiting {
                build_id,
                age_seconds: millis_between(at, now).as_secs(),
            }),
            dispatched_last_hour: read.dispatched_last_hour,
            at: timestamp(now),
            last_hour: None,
        }
    }
}

/// The last 60 minutes (oldest first) of `now_ms`'s hour, each with its start.
fn minutes(figures: &[(u64, Option<u64>)], now_ms: i64) -> Vec<Minute> {
    let this_minute = now_ms.div_euclid(60_000);
    figures
        .iter()
        .zip((this_minute - 59)..=this_minute)
        .map(|((dispatched, waiting), minute)| Minute {
            minute: timestamp(minute * 60_000),
            dispatched: *dispatched,
            waiting: *waiting,
        })
        .collect()
}

/// `GET /v4/buildclusters/{name}/deadletters`: the latest dead letters, what each was. Each is
/// held for an operator to requeue or fail (see `dead_letters`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetters {
    /// How many the cluster holds in all.
    pub total: u64,
    /// The latest, at most 100, the latest first.
    pub dead_letters: Vec<DeadLetter>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The queue id: a build id, or `stop:<buildId>` for a stop that never reached the cluster.
    pub id: String,
    /// When it was given up (RFC 3339).
    pub dead_since: String,
    /// When the hold ends (RFC 3339): a build still held then is failed, a stop dropped.
    pub held_until: String,
    pub build_id: Option<u64>,
    pub job_id: Option<u64>,
    /// The pipeline's name (`owner/repo`), when the message names one.
    pub pipeline: Option<String>,
}

impl DeadLetters {
    /// A cluster's latest `max` dead letters and their count; each is held for `hold`.
    pub async fn read(
        queues: &sd_queue::Queues,
        cluster: &str,
        max: usize,
        hold: Duration,
    ) -> Result<Self, sd_queue::QueueError> {
        let (letters, total) = queues.dead_letters(cluster, max).await?;
        Ok(Self {
            total,
            dead_letters: letters
                .into_iter()
                .map(|(id, at, message)| DeadLetter::new(id, at, hold, message.as_deref()))
                .collect(),
        })
    }
}

impl DeadLetter {
    /// From what the queue keeps; the message's token and configuration are not repeated.
    pub fn new(id: String, at_ms: i64, hold: Duration, message: Option<&str>) -> Self {
        let config = message
            .and_then(|m| serde_json::from_str::<sd_protocol::QueueMessage>(m).ok())
            .map(|m| m.build_config)
            .unwrap_or_default();
        let number = |field: &str| {
            let v = &config[field];
            v.as_u64().or_else(|| v.as_str()?.parse().ok())
        };
        Self {
            id,
            dead_since: timestamp(at_ms),
            held_until: timestamp(
                at_ms.saturating_add(i64::try_from(hold.as_millis()).unwrap_or(i64::MAX)),
            ),
            build_id: number("buildId"),
            job_id: number("jobId"),
            pipeline: config["pipeline"]["name"].as_str().map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD_AFTER: Duration = Duration::from_secs(120);

    #[test]
    fn a_cluster_is_silent_only_after_dead_after() {
        let now = 1_000_000_000;
        let (health, reason) = assess(true, Some(now - 5_000), now, DEAD_AFTER);
        assert_eq!(
            (health, reason.as_str()),
            (Health::Healthy, "last poll 5s ago")
        );
        let (health, _) = assess(true, Some(now - 120_000), now, DEAD_AFTER);
        assert_eq!(health, Health::Healthy, "at the limit still healthy");
        let (health, reason) = assess(true, Some(now - 125_000), now, DEAD_AFTER);
        assert_eq!(health, Health::Silent);
        assert!(
            reason.starts_with("silent for 2m 5s, longer than ha.cluster_dead_after (2m)"),
            "{reason}"
        );
    }

    #[test]
    fn paused_wins_and_never_polled_is_its_own_state() {
        let now = 1_000_000_000;
        assert_eq!(assess(false, Some(now), now, DEAD_AFTER).0, Health::Paused);
        assert_eq!(assess(false, None, now, DEAD_AFTER).0, Health::Paused);
        assert_eq!(assess(true, None, now, DEAD_AFTER).0, Health::NeverPolled);
    }

    #[test]
    fn a_beat_after_now_counts_as_no_silence() {
        let (health, reason) = assess(true, Some(2_000), 1_000, DEAD_AFTER);
        assert_eq!(
            (health, reason.as_str()),
            (Health::Healthy, "last poll 0s ago")
        );
    }
}
