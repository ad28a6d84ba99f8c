//! What every request handler shares: [`AppState`]. Built by `Scheduler::start` (in `lib.rs`)
//! and read by `api`, which names it `crate::AppState` (re-exported at the crate root). Kept
//! out of `lib.rs` so that `api` depends on this module, not on the wiring that starts it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::ApiVerifier;
use crate::cluster_auth::{ClusterVerifier, EnvLookup};
use crate::db::Db;
use crate::ha::Health;
use crate::intake::Intake;
use crate::poll_limits::PollLimits;
use crate::queue::Queues;
use crate::registry::{ClusterCache, Registry};
use crate::registry_sync::RegistrySync;
use crate::workers::Workers;

/// Everything a request handler needs.
pub struct AppState {
    pub db: Db,
    pub registry: Registry,
    pub cache: ClusterCache,
    pub queues: Queues,
    pub intake: Arc<Intake>,
    pub verifier: ApiVerifier,
    pub workers: Workers,
    pub health: Arc<Health>,
    pub cluster_verifier: ClusterVerifier,
    /// Where cluster public keys and sign options are read from (named by each record).
    pub env: EnvLookup,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Cancelled at shutdown: long-polls return early.
    pub shutdown: CancellationToken,
    /// Longest long-poll a worker may ask for.
    pub max_wait: Duration,
    /// Caps on the long-polls waiting at once, per cluster and per token.
    pub poll_limits: Arc<PollLimits>,
    /// Requests in flight (long-polls aside) and how long each may take.
    pub http: crate::config::HttpConfig,
    /// Reloads the cache after a registry write and tells the other replicas.
    pub registry_sync: Arc<RegistrySync>,
    /// A cluster silent for longer is unhealthy (`ha.cluster_dead_after`).
    pub dead_after: Duration,
    /// The status pages need no token (`ui.open`).
    pub ui_open: bool,
    /// The scheduler serves HTTPS itself (`listen_tls`): the pages' cookie is `Secure`.
    pub tls_listening: bool,
}

impl AppState {
    /// A registered cluster's name and whether it is active, from this replica's cache.
    pub(crate) fn cluster(&self, name: &str) -> Option<(String, bool)> {
        self.cache
            .snapshot()
            .iter()
            .find(|c| c.fields.name == name)
            .map(|c| (c.fields.name.clone(), c.fields.is_active))
    }

    /// Every registered cluster (name, active), by name.
    pub(crate) fn clusters(&self) -> Vec<(String, bool)> {
        let mut all: Vec<(String, bool)> = self
            .cache
            .snapshot()
            .iter()
            .map(|c| (c.fields.name.clone(), c.fields.is_active))
            .collect();
        all.sort();
        all
    }

    /// After a registry write: reload this replica's cache now, tell the other replicas, and
    /// give held builds a chance to route.
    pub(crate) async fn registry_changed(&self) {
        self.registry_sync.written_here().await;
    }
}
