//! `sd-scheduler`: the central service of sd-buildcluster.
//!
//! It keeps the registry of build clusters, routes every build Screwdriver sends to one of them,
//! and holds one master queue per cluster in Redis. See `ARCHITECTURE.md` for the map.

pub mod api;
pub mod auth;
pub mod builds;
pub mod cluster_auth;
pub mod config;
pub mod db;
pub mod ha;
pub mod intake;
/// The master queues: sd-queue under the hash tag `{sd}`.
pub mod queue {
    pub use sd_queue::*;

    /// The scheduler's hash tag.
    pub const TAG: &str = "sd";
}
pub mod reconciler;
pub mod registry;
pub mod reporter;
pub mod routing;
pub mod telemetry;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiVerifier, KeyError, LauncherTokens};
use crate::builds::Builds;
use crate::cluster_auth::{ClusterVerifier, EnvLookup};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::ha::Health;
use crate::intake::Intake;
use crate::queue::{QueueError, QueueSettings, Queues};
use crate::registry::{ClusterCache, INVALIDATION_CHANNEL, Registry, RegistryError};
use crate::reporter::Reporter;
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
    /// Wakes the task that routes held builds and re-routes builds of unusable clusters.
    held_builds: Notify,
}

impl AppState {
    /// After a registry write: reload this replica's cache now, tell the other replicas, and
    /// give held builds a chance to route.
    async fn registry_changed(&self) {
        if let Err(e) = self.cache.reload(&self.registry).await {
            tracing::error!(error = %e, "cluster cache reload failed; the periodic reload will retry");
        }
        if let Err(e) = self.queues.publish(INVALIDATION_CHANNEL, "changed").await {
            tracing::warn!(error = %e, "could not announce the registry change; other replicas pick it up at their periodic reload");
        }
        self.held_builds.notify_one();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running scheduler: its address, and the handle to stop it.
pub struct Scheduler {
    addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Scheduler {
    /// Connects, migrates, loads the cluster cache, binds `config.listen` and starts serving.
    /// Cluster keys are read from the process environment.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with_env(config, cluster_auth::process_env()).await
    }

    /// As [`Scheduler::start`], reading cluster keys and sign options through `env`.
    pub async fn start_with_env(config: Config, env: EnvLookup) -> Result<Self, StartError> {
        let verifier = match &config.auth.api_public_key_file {
            Some(path) => ApiVerifier::from_file(path)?,
            None => {
                tracing::warn!(
                    "auth.api_public_key_file is not set: every authenticated call will be refused with 401"
                );
                ApiVerifier::default()
            }
        };
        let tokens = match &config.auth.private_key_file {
            Some(path) => Some(LauncherTokens::from_file(
                path,
                config.auth.launcher_token_ttl,
            )?),
            None => {
                tracing::warn!(
                    "auth.private_key_file is not set: builds are accepted only when they carry their own token"
                );
                None
            }
        };
        let db = Db::connect(&config.database.url, config.database.max_connections).await?;
        let queues = Queues::connect(&config.redis.url, queue::TAG)?;
        let registry = Registry::new(db.clone());
        let cache = ClusterCache::default();
        cache.reload(&registry).await?;
        let health = Arc::new(Health::default());
        let builds = Builds::new(db.clone());
        let intake = Intake::new(
            cache.clone(),
            builds.clone(),
            queues.clone(),
            Arc::clone(&health),
            tokens,
        );
        let q = &config.queue;
        let workers = Workers {
            queues: queues.clone(),
            builds,
            cache: cache.clone(),
            health: Arc::clone(&health),
            reporter: Reporter::new(
                config.screwdriver.report_timeout,
                config.screwdriver.report_attempts,
                queues.connection(),
            ),
            settings: QueueSettings {
                visibility_timeout: q.visibility_timeout,
                max_attempts: q.max_attempts,
                blocked_recheck: q.blocked_recheck,
                nack_backoff: q.nack_backoff,
                nack_backoff_max: q.nack_backoff_max,
            },
        };
        let shutdown = CancellationToken::new();
        let state = Arc::new(AppState {
            db,
            registry,
            cache,
            queues,
            intake,
            verifier,
            workers,
            health,
            cluster_verifier: ClusterVerifier::default(),
            env,
            metrics: telemetry::metrics_handle(),
            shutdown: shutdown.clone(),
            max_wait: q.max_wait,
            held_builds: Notify::new(),
        });

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut tasks = JoinSet::new();

        let app = api::router(Arc::clone(&state));
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        tasks.spawn(watch_invalidations(
            Arc::clone(&state),
            config.redis.url.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(reload_periodically(
            Arc::clone(&state),
            config.registry.reload_interval,
            shutdown.clone(),
        ));
        tasks.spawn(route_held_builds(
            Arc::clone(&state),
            config.registry.reload_interval,
            shutdown.clone(),
        ));
        tasks.spawn(state.workers.reporter.clone().run(shutdown.clone()));
        tasks.spawn(watch_health(
            Arc::clone(&state),
            config.ha.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(reconcile_periodically(
            Arc::clone(&state),
            config.reconciler.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%addr, database = %sd_protocol::env::redact_url(&config.database.url), "sd-scheduler listening");
        Ok(Self {
            addr,
            state,
            shutdown,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Stops accepting requests, lets in-flight ones finish, and stops the background tasks.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Reloads the cache whenever any replica announces a registry write. Reloads on every
/// (re)subscription too, since announcements made while disconnected are lost.
async fn watch_invalidations(state: Arc<AppState>, url: String, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(INVALIDATION_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::select! { r = subscribed => r, () = shutdown.cancelled() => return } {
            Ok(pubsub) => {
                delay = Duration::from_millis(100);
                reload(&state).await;
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(_) => reload(&state).await,
                            None => break,
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
                tracing::warn!("registry invalidation subscription lost; resubscribing");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot subscribe to registry invalidations");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn reload(state: &AppState) {
    match state.cache.reload(&state.registry).await {
        Ok(()) => state.held_builds.notify_one(),
        Err(e) => tracing::error!(error = %e, "cluster cache reload failed"),
    }
}

async fn reload_periodically(state: Arc<AppState>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => reload(&state).await,
            () = shutdown.cancelled() => return,
        }
    }
}

/// Routes held (unroutable) builds, and moves builds off clusters that cannot take them,
/// whenever the registry or cluster health changes, and periodically.
async fn route_held_builds(state: Arc<AppState>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = state.held_builds.notified() => {}
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match ha::rebalance(&state.intake).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(moved = n, "builds re-routed"),
            Err(e) => tracing::warn!(error = %e, "re-routing failed; will retry"),
        }
        match state.intake.route_held().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(routed = n, "held builds routed"),
            Err(e) => tracing::warn!(error = %e, "routing held builds failed; will retry"),
        }
    }
}

/// Evaluates cluster health from the heartbeats every replica records in Redis.
async fn watch_health(state: Arc<AppState>, ha: config::HaConfig, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ha.check_interval);
    let mut was_unhealthy = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let (beats, now) = match state.queues.heartbeats().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read heartbeats; cluster health unchanged");
                continue;
            }
        };
        let silence = state
            .cache
            .snapshot()
            .iter()
            .map(|c| {
                let quiet = beats
                    .get(&c.fields.name)
                    .map(|at| Duration::from_millis(u64::try_from(now - at).unwrap_or(0)));
                (c.fields.name.clone(), quiet)
            })
            .collect();
        state.health.evaluate(&silence, ha.cluster_dead_after);
        let names: std::collections::BTreeSet<String> = state
            .cache
            .snapshot()
            .iter()
            .map(|c| c.fields.name.clone())
            .collect();
        for name in names {
            if let Ok(depths) = state.queues.depths(&name).await {
                for (set, n) in ["ready", "leased", "delayed", "dead"].iter().zip(depths) {
                    metrics::gauge!("sd_scheduler_queue_depth", "cluster" => name.clone(), "set" => *set).set(n as f64);
                }
            }
        }
        let unhealthy = state.health.unhealthy();
        if unhealthy != was_unhealthy {
            was_unhealthy = unhealthy;
            state.held_builds.notify_one();
        }
    }
}

async fn reconcile_periodically(
    state: Arc<AppState>,
    cfg: config::ReconcilerConfig,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = reconciler::reconcile(&state.intake, cfg.grace).await {
            tracing::warn!(error = %e, "reconciler pass failed; will retry");
        }
    }
}
