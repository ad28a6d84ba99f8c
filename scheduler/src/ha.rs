//! Cluster health from worker heartbeats, and moving waiting builds off clusters that cannot
//! run them (unhealthy, paused, deleted).
//!
//! Architecture invariant: a build moves between queues only through the `move` script, which
//! takes it out of one queue and into the other atomically and never touches a leased build.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::builds::BuildState;
use crate::intake::{Intake, IntakeError};
use crate::queue::{Cancelled, Moved};
use crate::routing::Decision;

/// Which clusters are healthy, as this replica last evaluated it.
#[derive(Default)]
pub struct Health {
    unhealthy: RwLock<HashSet<String>>,
    /// When this replica first saw a cluster that has never polled (its grace period).
    first_seen: Mutex<HashMap<String, Instant>>,
}

impl Health {
    pub fn is_healthy(&self, cluster: &str) -> bool {
        !self
            .unhealthy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(cluster)
    }

    /// A poll just came in: healthy at once on this replica (others see the heartbeat).
    pub fn alive(&self, cluster: &str) {
        let mut set = self
            .unhealthy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if set.remove(cluster) {
            tracing::info!(cluster, "cluster polled again: healthy");
        }
    }

    /// Re-evaluates every registered cluster; returns those that just became unhealthy.
    /// `silence` is how long each has not polled (`None`: never polled).
    pub fn evaluate(
        &self,
        silence: &HashMap<String, Option<Duration>>,
        dead_after: Duration,
    ) -> Vec<String> {
        let now = Instant::now();
        let mut first_seen = self
            .first_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut unhealthy = HashSet::new();
        for (name, silent) in silence {
            let quiet = match silent {
                Some(d) => *d,
                None => now.duration_since(*first_seen.entry(name.clone()).or_insert(now)),
            };
            if quiet > dead_after {
                unhealthy.insert(name.clone());
            }
        }
        first_seen.retain(|name, _| silence.contains_key(name));
        let mut current = self
            .unhealthy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let newly: Vec<String> = unhealthy.difference(&current).cloned().collect();
        for name in &newly {
            tracing::warn!(cluster = %name, "no poll for longer than ha.cluster_dead_after: unhealthy");
        }
        metrics::gauge!("sd_scheduler_clusters_unhealthy").set(unhealthy.len() as f64);
        *current = unhealthy;
        newly
    }

    pub fn unhealthy(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .unhealthy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Moves waiting builds off every cluster that cannot take them now. Returns how many moved.
pub async fn rebalance(intake: &Intake) -> Result<usize, IntakeError> {
    let snapshot = intake.cache().snapshot();
    let mut moved = 0;
    for cluster in intake.builds().queued_clusters().await? {
        let registered = snapshot.iter().any(|c| c.fields.name == cluster);
        let eligible = snapshot
            .iter()
            .any(|c| c.fields.name == cluster && c.fields.is_active)
            && intake.health().is_healthy(&cluster);
        if eligible {
            continue;
        }
        for row in intake.builds().queued_on(&cluster, 500).await? {
            let decision = intake.route_stored(&row).ok();
            match decision {
                Some(Decision::Cluster(dst)) if dst != cluster => {
                    let id = row.build_id.to_string();
                    match intake.queues().move_waiting(&id, &cluster, &dst).await? {
                        Moved::Moved => {
                            let reason = format!("re-routed from {cluster}");
                            intake
                                .builds()
                                .reassign(row.build_id, &cluster, &dst, &reason)
                                .await?;
                            tracing::info!(build_id = row.build_id, from = %cluster, to = %dst, "build re-routed");
                            metrics::counter!("sd_scheduler_builds_rerouted_total").increment(1);
                            moved += 1;
                        }
                        Moved::Elsewhere(owner) if !owner.is_empty() => {
                            // The queue moved it before a crash kept the row from following.
                            intake
                                .builds()
                                .reassign(row.build_id, &cluster, &owner, "re-routed")
                                .await?;
                        }
                        // Pinned: the reconciler put back a build this cluster acknowledged;
                        // its agent may still launch it, so another cluster must not.
                        Moved::Leased | Moved::Pinned | Moved::Elsewhere(_) | Moved::Absent => {}
                    }
                }
                _ if !registered
                    // Deleted cluster and nowhere else to go: hold the build, never drop it.
                    && intake.queues().cancel(&cluster, row.build_id).await? == Cancelled::Removed =>
                {
                    let reason = format!(
                        "build cluster {cluster} was deleted and no other cluster can take the build"
                    );
                    intake
                        .builds()
                        .transition(
                            row.build_id,
                            BuildState::Queued,
                            BuildState::Unroutable,
                            None,
                            Some(&reason),
                        )
                        .await?;
                    tracing::warn!(build_id = row.build_id, cluster = %cluster, "held: its cluster was deleted");
                }
                // Paused or silent with nothing else eligible: it waits in its queue.
                _ => {}
            }
        }
    }
    Ok(moved)
}
