//! HA re-routing: waiting builds leave clusters that cannot take them (unhealthy, paused,
//! deleted) for the cluster routing picks now.
//!
//! Architecture invariant: a build moves between queues only through the `move` script, which
//! takes it out of one queue and into the other atomically and never touches a leased build.
//! The queue moves first and the row follows; a crash in between is repaired by the next pass,
//! which finds the build already on its new queue (`Moved::Elsewhere`).

use super::{Intake, IntakeError};
use crate::builds::{BuildRow, BuildState};
use crate::queue::{Cancelled, Moved};
use crate::routing::Decision;

impl Intake {
    /// Moves waiting builds off every cluster that cannot take them now. Returns how many moved.
    pub async fn rebalance(&self) -> Result<usize, IntakeError> {
        let snapshot = self.cache.snapshot();
        let mut moved = 0;
        for cluster in self.builds.queued_clusters().await? {
            let registered = snapshot.iter().any(|c| c.fields.name == cluster);
            let eligible = snapshot
                .iter()
                .any(|c| c.fields.name == cluster && c.fields.is_active)
                && self.health.is_healthy(&cluster);
            if eligible {
                continue;
            }
            for row in self.builds.queued_on(&cluster, 500).await? {
                if self.move_off(&row, &cluster, registered).await? {
                    moved += 1;
                }
            }
        }
        Ok(moved)
    }

    /// One waiting build of a cluster that cannot take it: to the cluster routing picks, or,
    /// when its cluster was deleted and nothing else is eligible, held as unroutable (never
    /// dropped). Paused or silent with nothing else eligible: it waits in its queue. Returns
    /// whether it moved.
    async fn move_off(
        &self,
        row: &BuildRow,
        cluster: &str,
        registered: bool,
    ) -> Result<bool, IntakeError> {
        match self.route_stored(row).ok() {
            Some(Decision::Cluster(dst)) if dst != cluster => {
                self.move_to(row, cluster, &dst).await
            }
            _ if !registered => {
                self.hold_orphan(row, cluster).await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Moves the build's queue entry from `from` to `to`, then its row. Returns whether it
    /// moved now.
    async fn move_to(&self, row: &BuildRow, from: &str, to: &str) -> Result<bool, IntakeError> {
        let id = row.build_id.to_string();
        match self.queues.move_waiting(&id, from, to).await? {
            Moved::Moved => {
                let reason = format!("re-routed from {from}");
                self.builds
                    .reassign(row.build_id, from, to, &reason)
                    .await?;
                tracing::info!(build_id = row.build_id, from = %from, to = %to, "build re-routed");
                metrics::counter!("sd_scheduler_builds_rerouted_total").increment(1);
                Ok(true)
            }
            Moved::Elsewhere(owner) if !owner.is_empty() => {
                // The queue moved it before a crash kept the row from following.
                self.builds
                    .reassign(row.build_id, from, &owner, "re-routed")
                    .await?;
                Ok(false)
            }
            // Pinned: the reconciler put back a build this cluster acknowledged; its agent may
            // still launch it, so another cluster must not.
            Moved::Leased | Moved::Pinned | Moved::Elsewhere(_) | Moved::Absent => Ok(false),
        }
    }

    /// The build's cluster was deleted and no other cluster can take it: off the queue (if it
    /// is still waiting there) and held as unroutable, to be routed when a cluster qualifies.
    async fn hold_orphan(&self, row: &BuildRow, cluster: &str) -> Result<(), IntakeError> {
        if self.queues.cancel(cluster, row.build_id).await? != Cancelled::Removed {
            return Ok(());
        }
        let reason =
            format!("build cluster {cluster} was deleted and no other cluster can take the build");
        self.builds
            .transition(
                row.build_id,
                BuildState::Queued,
                BuildState::Unroutable,
                None,
                Some(&reason),
            )
            .await?;
        tracing::warn!(build_id = row.build_id, cluster = %cluster, "held: its cluster was deleted");
        Ok(())
    }
}
