//! Re-queueing builds the database says are waiting or dispatched but that no cluster started
//! within `reconciler.grace` — Redis is fast, not the source of truth, and a failover or a lost
//! cluster Redis can drop what it held. Queue idempotency keeps this from ever queueing a build
//! twice. The schedule is `reconciler::run`'s; what is written, and in which order, is here.

use std::time::Duration;

use super::{Intake, IntakeError};
use crate::builds::{BuildRow, BuildState};
use crate::db::now_ms;
use crate::queue::Enqueued;

impl Intake {
    /// One reconciler pass; returns how many builds were queued again.
    pub async fn reconcile(&self, grace: Duration) -> Result<usize, IntakeError> {
        let before = now_ms() - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut requeued = 0;
        for row in self.builds.stale(BuildState::Queued, before, 500).await? {
            if self.requeue_missing(&row).await? {
                requeued += 1;
            }
        }
        for row in self
            .builds
            .stale(BuildState::Dispatched, before, 500)
            .await?
        {
            if self.requeue_unstarted(&row).await? {
                requeued += 1;
            }
        }
        metrics::counter!("sd_scheduler_reconciled_total").increment(requeued as u64);
        Ok(requeued)
    }

    /// A build `queued` for longer than the grace: back on its queue if Redis lost it, or
    /// marked dispatched if its cluster had acknowledged it and only the row missed that.
    /// Returns whether it was queued again.
    async fn requeue_missing(&self, row: &BuildRow) -> Result<bool, IntakeError> {
        match self.requeue(row, false).await? {
            Some(Enqueued::Queued) => {
                tracing::warn!(
                    build_id = row.build_id,
                    cluster = row.cluster.as_deref().unwrap_or(""),
                    "build missing from its queue: queued again"
                );
                self.builds
                    .set_reason(row.build_id, "queued again by the reconciler")
                    .await?;
                Ok(true)
            }
            Some(Enqueued::AlreadyDelivered) => {
                // Acknowledged, but the row missed it (a crash between the two writes).
                self.builds
                    .transition_keep_cluster(
                        row.build_id,
                        BuildState::Queued,
                        BuildState::Dispatched,
                        "transferred to its cluster",
                    )
                    .await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// A build `dispatched` but not started within the grace: queued again on the same
    /// cluster, pinned there (its agent may still hold it, and only that agent's
    /// de-duplication by buildId can keep it from running twice), and its row back to
    /// `queued`. Returns whether it was queued again.
    async fn requeue_unstarted(&self, row: &BuildRow) -> Result<bool, IntakeError> {
        let queued = matches!(self.requeue(row, true).await?, Some(Enqueued::Queued));
        if queued {
            tracing::warn!(
                build_id = row.build_id,
                cluster = row.cluster.as_deref().unwrap_or(""),
                "dispatched build never started: queued again"
            );
        }
        self.builds
            .transition_keep_cluster(
                row.build_id,
                BuildState::Dispatched,
                BuildState::Queued,
                "queued again: dispatched but not started in time",
            )
            .await?;
        Ok(queued)
    }
}
