//! The reconciler's schedule: every `reconciler.interval`, one [`Intake::reconcile`] pass
//! re-queues builds the database says are waiting or dispatched but that no cluster started
//! within `reconciler.grace` — Redis is fast, not the source of truth, and a failover or a lost
//! cluster Redis can drop what it held. What a pass writes, and in which order, is `Intake`'s.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ReconcilerConfig;
use crate::intake::Intake;

/// Runs a pass every `config.interval`, the first one an interval after start, until
/// `shutdown`. A failed pass is logged and the next one retries.
pub async fn run(intake: Arc<Intake>, config: ReconcilerConfig, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(config.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = intake.reconcile(config.grace).await {
            tracing::warn!(error = %e, "reconciler pass failed; will retry");
        }
    }
}
