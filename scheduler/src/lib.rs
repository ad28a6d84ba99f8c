//! `sd-scheduler`: the central service of sd-buildcluster.
//!
//! It keeps the registry of build clusters, routes every build Screwdriver sends to one of them,
//! and holds one master queue per cluster in Redis. See `ARCHITECTURE.md` for the map.

pub mod api;
pub mod auth;
pub mod builds;
pub mod config;
pub mod db;
pub mod intake;
pub mod queue;
pub mod registry;
pub mod routing;
pub mod telemetry;

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
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::intake::Intake;
use crate::queue::{QueueError, Queues};
use crate::registry::{ClusterCache, INVALIDATION_CHANNEL, Registry, RegistryError};

/// Everything a request handler needs.
pub struct AppState {
    pub db: Db,
    pub registry: Registry,
    pub cache: ClusterCache,
    pub queues: Queues,
    pub intake: Arc<Intake>,
    pub verifier: ApiVerifier,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Wakes the task that routes held builds.
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
    pub async fn start(config: Config) -> Result<Self, StartError> {
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
        let queues = Queues::connect(&config.redis.url)?;
        let registry = Registry::new(db.clone());
        let cache = ClusterCache::default();
        cache.reload(&registry).await?;
        let intake = Intake::new(
            cache.clone(),
            Builds::new(db.clone()),
            queues.clone(),
            tokens,
        );
        let state = Arc::new(AppState {
            db,
            registry,
            cache,
            queues,
            intake,
            verifier,
            metrics: telemetry::metrics_handle(),
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
        let shutdown = CancellationToken::new();
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
        tracing::info!(%addr, database = %db::redact(&config.database.url), "sd-scheduler listening");
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

/// Routes held (unroutable) builds whenever the registry changes, and periodically.
async fn route_held_builds(state: Arc<AppState>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = state.held_builds.notified() => {}
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match state.intake.route_held().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(routed = n, "held builds routed"),
            Err(e) => tracing::warn!(error = %e, "routing held builds failed; will retry"),
        }
    }
}
