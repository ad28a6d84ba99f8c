//! The cluster-worker protocol: long-poll delivery with leases, ack / nack / renew, and build
//! lifecycle events. HTTP lives in `api::workers`; this is the logic behind it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_protocol::{Delivery, QueueMessage};
use tokio_util::sync::CancellationToken;

use crate::builds::{BuildState, Builds};
use crate::db::DbError;
use crate::dead_letters::{DeadLetterError, DeadLetterOffice};
use crate::ha::Health;
use crate::queue::{
    Doorbell, Fetched, LeaseOp, LeaseOutcome, QueueError, QueueSettings, Queues, parse_delivery_id,
};
use crate::registry::ClusterCache;
use crate::reporter::{ReportTarget, Reporter};

/// Longest single wait on the doorbell; a poll re-fetches at least this often, which also
/// catches due delayed messages and lapsed leases of its cluster, and bounds what a ring lost
/// while the doorbell's subscription reconnects can cost.
const DOORBELL_SLICE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error("no build {0} is known to the scheduler")]
    UnknownBuild(u64),
    #[error("build {build_id} is not assigned to cluster {cluster}")]
    NotYours { build_id: u64, cluster: String },
}

/// The lifecycle events an agent reports and the result of a batch: the wire contract's.
pub use sd_protocol::workers::{Event, LeaseReport};

pub struct Workers {
    pub queues: Queues,
    /// Wakes waiting polls when their cluster's queue gets work (one subscription per replica).
    pub doorbell: Doorbell,
    pub builds: Builds,
    pub cache: ClusterCache,
    pub health: Arc<Health>,
    pub reporter: Reporter,
    pub settings: QueueSettings,
    /// Where dead letters go, and what operators requeue or fail.
    pub dead_letters: Arc<DeadLetterOffice>,
}

impl Workers {
    /// Long-poll: returns as soon as jobs are leased, or empty after `wait`. `report` is the
    /// agent's account of itself (`None` from an agent too old to give one).
    pub async fn poll(
        &self,
        cluster: &str,
        report: Option<&sd_protocol::AgentReport>,
        wait: Duration,
        max: u32,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>, WorkerError> {
        self.health.alive(cluster);
        if let Err(e) = self.queues.heartbeat(cluster, report).await {
            tracing::warn!(cluster, error = %e, "could not record heartbeat");
        }
        let deadline = Instant::now() + wait;
        let mut bell = self.doorbell.listen(cluster);
        loop {
            // Armed before the fetch: work made ready while it runs rings this bell.
            bell.arm();
            let mut next_due = None;
            if self.is_active(cluster) {
                let fetched = self.queues.fetch(cluster, max, &self.settings).await?;
                next_due = fetched.next_due_in;
                let deliveries = self.apply_fetch(cluster, fetched).await?;
                if !deliveries.is_empty() {
                    return Ok(deliveries);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(Vec::new());
            }
            let mut slice = remaining.min(DOORBELL_SLICE);
            if let Some(due) = next_due {
                slice = slice.min(due.max(Duration::from_millis(10)));
            }
            tokio::select! {
                _ = bell.rung(slice) => {}
                () = shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// A paused (inactive) cluster may poll but receives nothing.
    fn is_active(&self, cluster: &str) -> bool {
        self.cache
            .snapshot()
            .iter()
            .any(|c| c.fields.name == cluster && c.fields.is_active)
    }

    /// Applies what a fetch decided besides leases: dead letters go to the dead-letter office;
    /// collapses end builds and are reported; first-time blocks are reported as BLOCKED.
    async fn apply_fetch(
        &self,
        cluster: &str,
        fetched: Fetched,
    ) -> Result<Vec<Delivery>, WorkerError> {
        for (id, raw) in fetched.dead {
            self.dead_letters.take(cluster, &id, &raw).await?;
        }
        for (id, raw) in fetched.collapsed {
            tracing::info!(id = %id, cluster, "collapsed into a newer build of its job");
            metrics::counter!("sd_scheduler_collapsed_total").increment(1);
            self.end(
                &id,
                &raw,
                BuildState::Collapsed,
                "COLLAPSED",
                "collapsed into a newer build of the same job".into(),
            )
            .await?;
        }
        for (id, raw, job) in fetched.blocked {
            if let Some(target) = ReportTarget::from_message(&raw) {
                self.reporter
                    .report(
                        target,
                        "BLOCKED",
                        format!("Blocked by a running build of job {job}"),
                    )
                    .await;
            }
            if let Ok(build_id) = id.parse() {
                self.builds
                    .set_reason(
                        build_id,
                        &format!("blocked by a running build of job {job}"),
                    )
                    .await?;
            }
        }
        let mut deliveries = Vec::with_capacity(fetched.leases.len());
        for lease in fetched.leases {
            match serde_json::from_str::<QueueMessage>(&lease.message) {
                Ok(message) => deliveries.push(Delivery {
                    delivery_id: lease.delivery_id(),
                    attempt: lease.attempt,
                    message,
                }),
                // Only this module's scripts write messages; a corrupt one is a bug to see.
                Err(e) => {
                    tracing::error!(id = %lease.id, error = %e, "undecodable queue message left leased")
                }
            }
        }
        metrics::counter!("sd_scheduler_deliveries_total", "cluster" => cluster.to_owned())
            .increment(deliveries.len() as u64);
        Ok(deliveries)
    }

    async fn end(
        &self,
        id: &str,
        raw: &str,
        state: BuildState,
        status: &'static str,
        reason: String,
    ) -> Result<(), WorkerError> {
        let Ok(build_id) = id.parse::<u64>() else {
            return Ok(()); // a stop message: nothing to report
        };
        for from in [BuildState::Queued, BuildState::Dispatched] {
            if self
                .builds
                .transition_keep_cluster(build_id, from, state, &reason)
                .await?
            {
                break;
            }
        }
        match ReportTarget::from_message(raw) {
            Some(target) => self.reporter.report(target, status, reason).await,
            // Intake gives every message a token and an apiUri: only a damaged one lacks them.
            None => tracing::error!(
                build_id,
                status,
                %reason,
                "cannot tell Screwdriver: the queue message has no apiUri or token"
            ),
        }
        Ok(())
    }

    /// Applies `op` to each delivery; returns the report and the queue ids it applied to.
    async fn settle(
        &self,
        op: LeaseOp,
        cluster: &str,
        delivery_ids: &[String],
    ) -> Result<(LeaseReport, Vec<String>), WorkerError> {
        let mut report = LeaseReport::default();
        let mut applied = Vec::new();
        for delivery_id in delivery_ids {
            let outcome = match parse_delivery_id(delivery_id) {
                Some((id, token)) => {
                    let outcome = self
                        .queues
                        .settle_lease(op, cluster, id, token, &self.settings)
                        .await?;
                    if outcome == LeaseOutcome::Done {
                        applied.push(id.to_owned());
                    }
                    outcome
                }
                None => LeaseOutcome::Stale,
            };
            match outcome {
                LeaseOutcome::Done => report.done.push(delivery_id.clone()),
                LeaseOutcome::Stale => report.stale.push(delivery_id.clone()),
            }
        }
        Ok((report, applied))
    }

    pub async fn ack(
        &self,
        cluster: &str,
        delivery_ids: &[String],
    ) -> Result<LeaseReport, WorkerError> {
        let (report, acked) = self.settle(LeaseOp::Ack, cluster, delivery_ids).await?;
        let dispatched: Vec<u64> = acked.iter().filter_map(|id| id.parse().ok()).collect();
        // The queue is authoritative for the transfer, and the agent must learn that its acks
        // landed: should this write fail, the reconciler finds the builds acknowledged (their
        // tombstones) and marks them dispatched.
        if let Err(e) = self.builds.mark_dispatched(cluster, &dispatched).await {
            tracing::warn!(cluster, error = %e, "acknowledged builds not yet marked dispatched; the reconciler will");
        }
        metrics::counter!("sd_scheduler_acks_total", "cluster" => cluster.to_owned())
            .increment(report.done.len() as u64);
        Ok(report)
    }

    pub async fn nack(
        &self,
        cluster: &str,
        delivery_ids: &[String],
        reason: &str,
    ) -> Result<LeaseReport, WorkerError> {
        let (report, _) = self.settle(LeaseOp::Nack, cluster, delivery_ids).await?;
        if !report.done.is_empty() {
            tracing::warn!(
                cluster,
                reason,
                count = report.done.len(),
                "deliveries given back"
            );
        }
        Ok(report)
    }

    pub async fn renew(
        &self,
        cluster: &str,
        delivery_ids: &[String],
    ) -> Result<LeaseReport, WorkerError> {
        Ok(self.settle(LeaseOp::Renew, cluster, delivery_ids).await?.0)
    }

    /// A build started or ended on `cluster`; an end releases the builds its job held back.
    pub async fn event(
        &self,
        cluster: &str,
        build_id: u64,
        event: Event,
        message: Option<&str>,
    ) -> Result<BuildState, WorkerError> {
        let row = self
            .builds
            .get(build_id)
            .await?
            .ok_or(WorkerError::UnknownBuild(build_id))?;
        if row.cluster.as_deref() != Some(cluster) {
            return Err(WorkerError::NotYours {
                build_id,
                cluster: cluster.to_owned(),
            });
        }
        let (to, from): (BuildState, &[BuildState]) = match event {
            Event::Running => (
                BuildState::Running,
                &[BuildState::Queued, BuildState::Dispatched],
            ),
            Event::Finished => (
                BuildState::Finished,
                &[
                    BuildState::Queued,
                    BuildState::Dispatched,
                    BuildState::Running,
                ],
            ),
            Event::Failed => (
                BuildState::Failed,
                &[
                    BuildState::Queued,
                    BuildState::Dispatched,
                    BuildState::Running,
                ],
            ),
            Event::Stopped => (
                BuildState::Stopped,
                &[
                    BuildState::Queued,
                    BuildState::Dispatched,
                    BuildState::Running,
                ],
            ),
        };
        let reason = message.unwrap_or(match event {
            Event::Running => "running",
            Event::Finished => "finished",
            Event::Failed => "failed",
            Event::Stopped => "stopped on request",
        });
        let mut state = row.state;
        for from in from {
            if self
                .builds
                .transition_keep_cluster(build_id, *from, to, reason)
                .await?
            {
                state = to;
                break;
            }
        }
        if event != Event::Running {
            let promoted = self.queues.release(row.job_id, build_id).await?;
            if promoted > 0 {
                tracing::info!(
                    build_id,
                    job_id = row.job_id,
                    promoted,
                    "blocked builds released"
                );
            }
        }
        Ok(state)
    }
}
