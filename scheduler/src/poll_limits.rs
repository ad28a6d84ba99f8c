//! How many long-polls may wait at once on this replica, per cluster and per token. A waiting
//! poll costs a connection and a little memory (no Redis connection: see `sd_queue::doorbell`),
//! so one cluster, or one stolen token, must not be able to take every slot.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};

/// The caps; `0` is never configured (config validation refuses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollCaps {
    pub per_cluster: usize,
    pub per_token: usize,
}

/// Why a poll was turned away (429).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PollRefused {
    #[error(
        "this cluster already has {0} long-polls waiting on this scheduler replica; retry later"
    )]
    Cluster(usize),
    #[error("this token already has {0} long-polls waiting; retry later")]
    Token(usize),
}

impl PollRefused {
    /// The series label of the metric counting refusals.
    pub fn label(self) -> &'static str {
        match self {
            PollRefused::Cluster(_) => "cluster",
            PollRefused::Token(_) => "token",
        }
    }
}

/// The live counts; cheap to share.
pub struct PollLimits {
    caps: PollCaps,
    /// Tokens are counted by a keyed hash: the map never holds a token.
    hasher: RandomState,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    clusters: HashMap<String, usize>,
    tokens: HashMap<u64, usize>,
}

/// A poll's place; dropping it gives the place back.
pub struct PollSlot {
    limits: Arc<PollLimits>,
    cluster: String,
    token: u64,
}

impl PollLimits {
    pub fn new(caps: PollCaps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            hasher: RandomState::new(),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a poll of `cluster` with `token`, or says which cap is reached.
    pub fn enter(self: &Arc<Self>, cluster: &str, token: &str) -> Result<PollSlot, PollRefused> {
        let key = self.hasher.hash_one(token);
        let mut counts = self.lock();
        let by_cluster = counts.clusters.get(cluster).copied().unwrap_or(0);
        let by_token = counts.tokens.get(&key).copied().unwrap_or(0);
        admit(self.caps, by_cluster, by_token)?;
        *counts.clusters.entry(cluster.to_owned()).or_default() += 1;
        *counts.tokens.entry(key).or_default() += 1;
        metrics::gauge!("sd_scheduler_polls_waiting").increment(1);
        Ok(PollSlot {
            limits: Arc::clone(self),
            cluster: cluster.to_owned(),
            token: key,
        })
    }

    /// Polls waiting now, on this replica.
    pub fn waiting(&self) -> usize {
        self.lock().clusters.values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether one more poll fits beside `by_cluster` and `by_token` already waiting.
fn admit(caps: PollCaps, by_cluster: usize, by_token: usize) -> Result<(), PollRefused> {
    if by_token >= caps.per_token {
        return Err(PollRefused::Token(caps.per_token));
    }
    if by_cluster >= caps.per_cluster {
        return Err(PollRefused::Cluster(caps.per_cluster));
    }
    Ok(())
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut counts = self.limits.lock();
        metrics::gauge!("sd_scheduler_polls_waiting").decrement(1);
        release(&mut counts.clusters, &self.cluster);
        release(&mut counts.tokens, &self.token);
    }
}

/// One fewer; the entry goes when none is left, so the maps hold only what waits.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: PollCaps = PollCaps {
        per_cluster: 3,
        per_token: 2,
    };

    #[test]
    fn a_token_is_capped_before_its_cluster() {
        let limits = PollLimits::new(CAPS);
        let a = limits.enter("c1", "t1").unwrap();
        let _b = limits.enter("c1", "t1").unwrap();
        assert_eq!(limits.enter("c1", "t1").err(), Some(PollRefused::Token(2)));
        let _c = limits.enter("c1", "t2").unwrap();
        assert_eq!(
            limits.enter("c1", "t3").err(),
            Some(PollRefused::Cluster(3))
        );
        assert!(
            limits.enter("c2", "t3").is_ok(),
            "other clusters unaffected"
        );
        drop(a);
        assert!(
            limits.enter("c1", "t3").is_ok(),
            "a place given back is free"
        );
    }

    #[test]
    fn counts_go_away_with_the_last_poll() {
        let limits = PollLimits::new(CAPS);
        let slots: Vec<_> = (0..3)
            .map(|i| limits.enter(&format!("c{i}"), &format!("t{i}")).unwrap())
            .collect();
        assert_eq!(limits.waiting(), 3);
        drop(slots);
        assert_eq!(limits.waiting(), 0);
        let counts = limits.lock();
        assert!(counts.clusters.is_empty() && counts.tokens.is_empty());
    }
}
