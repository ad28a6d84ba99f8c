//! Re-queues builds the database says are waiting or dispatched but that no cluster has
//! started within `reconciler.grace` — Redis is fast, not the source of truth, and a failover
//! or a lost cluster Redis can drop what it held. Queue idempotency keeps this from ever
//! queueing a build twice.

use std::time::Duration;

use crate::builds::BuildState;
use crate::db::now_ms;
use crate::intake::{Intake, IntakeError};
use crate::queue::Enqueued;

/// One pass; returns how many builds were queued again.
pub async fn reconcile(intake: &Intake, grace: Duration) -> Result<usize, IntakeError> {
    let before = now_ms() - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut requeued = 0;
    for row in intake
        .builds()
        .stale(BuildState::Queued, before, 500)
        .await?
    {
        match intake.requeue(&row, false).await? {
            Some(Enqueued::Queued) => {
                tracing::warn!(
                    build_id = row.build_id,
                    cluster = row.cluster.as_deref().unwrap_or(""),
                    "build missing from its queue: queued again"
                );
                requeued += 1;
                intake
                    .builds()
                    .set_reason(row.build_id, "queued again by the reconciler")
                    .await?;
            }
            Some(Enqueued::AlreadyDelivered) => {
                // Acknowledged, but the row missed it (a crash between the two writes).
                intake
                    .builds()
                    .transition_keep_cluster(
                        row.build_id,
                        BuildState::Queued,
                        BuildState::Dispatched,
                        "transferred to its cluster",
                    )
                    .await?;
            }
            _ => {}
        }
    }
    for row in intake
        .builds()
        .stale(BuildState::Dispatched, before, 500)
        .await?
    {
        if let Some(Enqueued::Queued) = intake.requeue(&row, true).await? {
            tracing::warn!(
                build_id = row.build_id,
                cluster = row.cluster.as_deref().unwrap_or(""),
                "dispatched build never started: queued again"
            );
            requeued += 1;
        }
        intake
            .builds()
            .transition_keep_cluster(
                row.build_id,
                BuildState::Dispatched,
                BuildState::Queued,
                "queued again: dispatched but not started in time",
            )
            .await?;
    }
    metrics::counter!("sd_scheduler_reconciled_total").increment(requeued as u64);
    Ok(requeued)
}
