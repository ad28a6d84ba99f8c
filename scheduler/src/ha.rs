//! Cluster health from worker heartbeats: which clusters routing should avoid.
//!
//! The rule is the pure [`assess`]; [`Health`] holds this replica's last verdict (routing and
//! polls read it), and [`Health::run`] feeds the rule from Redis every `ha.check_interval`.
//! Heartbeats live in Redis and are timed by Redis's clock, so every replica reaches the same
//! verdict whichever replica a cluster's agent polled. Moving builds off unhealthy clusters is
//! not done here but by `Intake::rebalance`, which owns the order of writes; this module only
//! rings the bell it waits on. The health check also sets the queue-depth gauges, from one
//! scan of the queues that exist rather than a question per cluster.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::HaConfig;
use crate::queue::Queues;
use crate::registry::ClusterCache;

/// The clusters a health check finds unhealthy: those whose last poll is more than
/// `dead_after` before `redis_now`, and those never seen polling for more than `dead_after`
/// since this replica first saw them registered (an agent gets that long for its first start).
///
/// Pure, so the rule is tested without Redis or sleeping: `beats` (cluster → last poll) and
/// `redis_now` are both on Redis's clock, in ms, so replica clock skew cannot matter; a beat
/// "after" `redis_now` counts as silence zero. `first_seen` is this replica's memory of
/// never-polled clusters, timed by its own clock (`now`); it gains the clusters seen for the
/// first time and forgets those no longer registered.
pub fn assess(
    registered: &BTreeSet<String>,
    beats: &HashMap<String, i64>,
    redis_now: i64,
    first_seen: &mut HashMap<String, Instant>,
    now: Instant,
    dead_after: Duration,
) -> HashSet<String> {
    let mut unhealthy = HashSet::new();
    for name in registered {
        let quiet = match beats.get(name) {
            Some(at) => {
                Duration::from_millis(u64::try_from(redis_now.saturating_sub(*at)).unwrap_or(0))
            }
            None => now.duration_since(*first_seen.entry(name.clone()).or_insert(now)),
        };
        if quiet > dead_after {
            unhealthy.insert(name.clone());
        }
    }
    first_seen.retain(|name, _| registered.contains(name));
    unhealthy
}

// === impl Health ===

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

    /// Applies [`assess`] to every registered cluster and keeps the verdict; returns the
    /// clusters that just became unhealthy.
    pub fn evaluate(
        &self,
        registered: &BTreeSet<String>,
        beats: &HashMap<String, i64>,
        redis_now: i64,
        dead_after: Duration,
    ) -> Vec<String> {
        let unhealthy = {
            let mut first_seen = self
                .first_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            assess(
                registered,
                beats,
                redis_now,
                &mut first_seen,
                Instant::now(),
                dead_after,
            )
        };
        let mut current = self
            .unhealthy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let newly: Vec<String> = unhealthy.difference(&current).cloned().collect();
        for name in &newly {
            tracing::warn!(cluster = %name, "no poll for longer than ha.cluster_dead_after: unhealthy");
        }
        metrics::gauge!("sd_scheduler_clusters_unhealthy").set(unhealthy.len() as f64);
        // Per registered cluster (names the registry validated), for alerts on one cluster's
        // silence: `time() - sd_scheduler_cluster_last_poll_timestamp_seconds`.
        for name in registered {
            if let Some(at) = beats.get(name) {
                metrics::gauge!("sd_scheduler_cluster_last_poll_timestamp_seconds", "cluster" => name.clone())
                    .set(*at as f64 / 1000.0);
            }
        }
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

    /// Evaluates cluster health from the heartbeats every replica records in Redis, every
    /// `config.check_interval` until `shutdown`, and rings `on_change` whenever the set of
    /// unhealthy clusters changed, so their waiting builds are re-routed at once.
    pub async fn run(
        self: Arc<Self>,
        queues: Queues,
        cache: ClusterCache,
        config: HaConfig,
        on_change: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(config.check_interval);
        let mut was_unhealthy = Vec::new();
        let mut depths = QueueDepths::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let (beats, now) = match queues.heartbeats().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read heartbeats; cluster health unchanged");
                    continue;
                }
            };
            let registered = registered(&cache);
            self.evaluate(&registered, &beats, now, config.cluster_dead_after);
            depths.record(&queues, &registered).await;
            let unhealthy = self.unhealthy();
            if unhealthy != was_unhealthy {
                was_unhealthy = unhealthy;
                on_change.notify_one();
            }
        }
    }
}

/// The names in the registry (one per name, whatever the scmContexts).
fn registered(cache: &ClusterCache) -> BTreeSet<String> {
    cache
        .snapshot()
        .iter()
        .map(|c| c.fields.name.clone())
        .collect()
}

/// The `sd_scheduler_queue_depth` gauges, as last set. They ride the health check, which runs
/// every `ha.check_interval` anyway, but must not cost work per registered cluster when the
/// queues are idle: with a thousand clusters, asking each one's four set sizes was 800 Redis
/// commands a second and most of an idle scheduler's CPU. So the depths are read with
/// [`Queues::depths_all`] (a few commands plus one per non-empty set), and a gauge is set only
/// when its value changed.
#[derive(Default)]
struct QueueDepths {
    last: HashMap<String, [u64; 4]>,
}

impl QueueDepths {
    /// Sets the gauges of every registered cluster whose depths changed (a cluster without a
    /// queue has depth 0). When the depths cannot be read, every gauge keeps its last value.
    async fn record(&mut self, queues: &Queues, registered: &BTreeSet<String>) {
        let found = match queues.depths_all().await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read queue depths; gauges unchanged");
                return;
            }
        };
        for name in registered {
            let depths = found.get(name).copied().unwrap_or_default();
            if self.last.get(name) == Some(&depths) {
                continue;
            }
            for (set, n) in ["ready", "leased", "delayed", "dead"].iter().zip(depths) {
                metrics::gauge!("sd_scheduler_queue_depth", "cluster" => name.clone(), "set" => *set)
                    .set(n as f64);
            }
            self.last.insert(name.clone(), depths);
        }
        self.last.retain(|name, _| registered.contains(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD_AFTER: Duration = Duration::from_secs(30);

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn beats(list: &[(&str, i64)]) -> HashMap<String, i64> {
        list.iter().map(|(n, at)| ((*n).to_owned(), *at)).collect()
    }

    fn sorted(set: HashSet<String>) -> Vec<String> {
        let mut v: Vec<String> = set.into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn a_cluster_silent_for_longer_than_dead_after_is_unhealthy() {
        let now_ms = 1_000_000;
        let mut first_seen = HashMap::new();
        let verdict = assess(
            &names(&["fresh", "edge", "silent"]),
            &beats(&[
                ("fresh", now_ms - 1_000),
                // Exactly dead_after: not yet.
                ("edge", now_ms - 30_000),
                ("silent", now_ms - 30_001),
            ]),
            now_ms,
            &mut first_seen,
            Instant::now(),
            DEAD_AFTER,
        );
        assert_eq!(sorted(verdict), vec!["silent"]);
        assert!(
            first_seen.is_empty(),
            "only never-polled clusters are remembered"
        );
    }

    #[test]
    fn a_heartbeat_ahead_of_the_clock_counts_as_just_now() {
        let mut first_seen = HashMap::new();
        let verdict = assess(
            &names(&["a"]),
            &beats(&[("a", 2_000_000)]),
            1_000_000,
            &mut first_seen,
            Instant::now(),
            DEAD_AFTER,
        );
        assert!(verdict.is_empty());
    }

    #[test]
    fn a_never_polled_cluster_gets_dead_after_from_first_sight() {
        let start = Instant::now();
        let mut first_seen = HashMap::new();
        let registered = names(&["new"]);
        let no_beats = HashMap::new();
        let check = |first_seen: &mut HashMap<String, Instant>, at: Instant| {
            sorted(assess(
                &registered,
                &no_beats,
                0,
                first_seen,
                at,
                DEAD_AFTER,
            ))
        };
        assert!(check(&mut first_seen, start).is_empty());
        assert_eq!(first_seen.get("new"), Some(&start));
        assert!(check(&mut first_seen, start + DEAD_AFTER).is_empty());
        assert_eq!(
            check(
                &mut first_seen,
                start + DEAD_AFTER + Duration::from_millis(1)
            ),
            vec!["new"]
        );
        // Its first poll is what counts from then on.
        let polled = assess(
            &registered,
            &beats(&[("new", 5_000)]),
            6_000,
            &mut first_seen,
            start + DEAD_AFTER * 10,
            DEAD_AFTER,
        );
        assert!(polled.is_empty());
    }

    #[test]
    fn only_registered_clusters_are_judged_and_remembered() {
        let start = Instant::now();
        let mut first_seen = HashMap::from([("deleted".to_owned(), start)]);
        let verdict = assess(
            &names(&["kept"]),
            &beats(&[("kept", 10_000), ("gone", 0)]),
            10_000,
            &mut first_seen,
            start + DEAD_AFTER * 2,
            DEAD_AFTER,
        );
        assert!(
            verdict.is_empty(),
            "beats of unregistered clusters are ignored"
        );
        assert!(
            first_seen.is_empty(),
            "a deleted cluster's first sighting is forgotten"
        );
    }

    #[test]
    fn evaluate_keeps_the_verdict_and_a_poll_clears_it_at_once() {
        let health = Health::default();
        let registered = names(&["a", "b"]);
        let silent = beats(&[("a", 0), ("b", 100_000)]);
        assert_eq!(
            health.evaluate(&registered, &silent, 100_000, DEAD_AFTER),
            vec!["a"]
        );
        assert!(!health.is_healthy("a") && health.is_healthy("b"));
        assert!(
            health
                .evaluate(&registered, &silent, 100_000, DEAD_AFTER)
                .is_empty(),
            "only newly unhealthy clusters are returned"
        );
        health.alive("a");
        assert!(health.is_healthy("a"));
        assert!(health.unhealthy().is_empty());
    }
}
