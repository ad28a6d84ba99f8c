//! `sd-scheduler`: the central service of sd-buildcluster.
//!
//! It keeps the registry of build clusters, routes every build Screwdriver sends to one of them,
//! and holds one master queue per cluster in Redis. See `ARCHITECTURE.md` for the map.
//!
//! This file is wiring only: [`Scheduler::start`] builds the parts and spawns each background
//! task's owner (`run(…, shutdown)`); what each task does is in its owner's module.

pub mod admin;
pub mod api;
pub mod auth;
pub mod builds;
pub mod cluster_auth;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod group_commit;
pub mod ha;
pub mod intake;
pub mod key_dir;
pub mod poll_limits;
/// The master queues: sd-queue under the hash tag `{sd}`.
pub mod queue {
    pub use sd_queue::*;

    /// The scheduler's hash tag.
    pub const TAG: &str = "sd";
}
pub mod reconciler;
pub mod registry;
pub mod registry_sync;
pub mod reporter;
pub mod routing;
pub mod state;
pub mod status;
pub mod systemd;
pub mod ui;
pub mod workers;

pub use state::AppState;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiVerifier, KeyError, LauncherTokens, TokenPolicy};
use crate::builds::Builds;
use crate::cluster_auth::{ClusterVerifier, EnvLookup};
use crate::config::{AuthConfig, Config, QueueConfig};
use crate::db::{Db, DbError};
use crate::dead_letters::DeadLetterOffice;
use crate::ha::Health;
use crate::intake::Intake;
use crate::poll_limits::{PollCaps, PollLimits};
use crate::queue::{Doorbell, QueueError, QueueSettings, Queues};
use crate::registry::{ClusterCache, Registry, RegistryError};
use crate::registry_sync::RegistrySync;
use crate::reporter::Reporter;
use crate::workers::Workers;
use sd_screwdriver::BuildUpdates;

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
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Screwdriver(#[from] sd_screwdriver::ClientError),
    #[error(transparent)]
    KeyDir(#[from] key_dir::KeyDirError),
    #[error("listen_tls: {0}")]
    Tls(#[from] sd_http::TlsError),
    /// Redis answered, but this configuration cannot use it (TLS trust, credentials).
    #[error("{setting}: {source}")]
    RedisAccess {
        setting: &'static str,
        source: sd_queue::AccessError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running scheduler: its address, and the handle to stop it.
impl StartError {
    /// Whether the configuration is what is wrong (a setting to fix, not a service to wait
    /// for): the binary exits 64, which systemd does not restart.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::Config(_)
                | StartError::Tls(_)
                | StartError::KeyDir(_)
                | StartError::RedisAccess { .. }
        )
    }
}

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
        let key_dir = match &config.registry.key_dir {
            Some(dir) => Some(key_dir::KeyDir::open(dir)?),
            None => None,
        };
        let env = match &key_dir {
            Some(keys) => keys.behind(env),
            None => env,
        };
        let tls = config
            .listen_tls
            .files()
            .map(sd_http::ServerTls::load)
            .transpose()?;
        let verifier = api_verifier(&config.auth)?;
        let tokens = launcher_tokens(&config.auth)?;
        // Checked by `Config::load` too; a config built in code is held to the same rule.
        let apis = config.screwdriver.allowed_apis()?;
        let updates = BuildUpdates::new(
            apis.clone(),
            config.screwdriver.report_timeout,
            concat!("sd-scheduler/", env!("CARGO_PKG_VERSION")),
        )?;
        let db = Db::connect(&config.database.url, config.database.max_connections).await?;
        let redis = config.redis.target()?;
        check_redis(&redis).await?;
        let queues = Queues::connect_to(&redis, queue::TAG)?;
        let registry = Registry::new(db.clone());
        let cache = ClusterCache::default();
        cache.reload(&registry).await?;
        let health = Arc::new(Health::default());
        let builds = Builds::new(db.clone());
        // Rung when the registry or cluster health changed: intake re-routes at once.
        let reroute = Arc::new(Notify::new());
        let intake = Intake::new(
            cache.clone(),
            builds.clone(),
            queues.clone(),
            Arc::clone(&health),
            tokens,
            apis,
        );
        let reporter = Reporter::new(
            updates,
            config.screwdriver.report_timeout,
            config.screwdriver.report_attempts,
            queues.connection(),
        );
        let workers = Workers {
            queues: queues.clone(),
            doorbell: Doorbell::default(),
            builds,
            cache: cache.clone(),
            health: Arc::clone(&health),
            dead_letters: DeadLetterOffice::new(
                Arc::clone(&intake),
                queues.clone(),
                reporter.clone(),
                config.queue.dead_letter_hold,
                config.queue.max_attempts,
            ),
            reporter,
            settings: queue_settings(&config.queue),
        };
        let registry_sync = Arc::new(RegistrySync::new(
            registry.clone(),
            cache.clone(),
            queues.clone(),
            redis,
            config.registry.reload_interval,
            Arc::clone(&reroute),
        ));
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
            cluster_verifier: ClusterVerifier::new(&config.registry.variable_prefix),
            env,
            metrics: sd_telemetry::metrics_handle(None),
            shutdown: shutdown.clone(),
            max_wait: config.queue.max_wait,
            poll_limits: PollLimits::new(PollCaps {
                per_cluster: config.queue.max_polls_per_cluster,
                per_token: config.queue.max_polls_per_token,
            }),
            http: config.http.clone(),
            registry_sync,
            dead_after: config.ha.cluster_dead_after,
            ui_open: config.ui.open,
            tls_listening: config.listen_tls.files().is_some(),
        });
        // Taken before the port opens: a SIGHUP from the moment the API answers is a reload,
        // never the signal's default action (exit).
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; listen_tls files are still re-read when they change");
                None
            }
        };
        let (listener, addr) = bind(config.listen).await?;
        let mut tasks = spawn_tasks(&state, listener, tls.clone(), &config, reroute, &shutdown);
        tasks.spawn(reload_tls(tls, hangup, shutdown.clone()));
        if let Some(keys) = key_dir {
            tasks.spawn(keys.run(config.registry.reload_interval, shutdown.clone()));
        }
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

/// The HTTP server and every background task, each its owner's `run`, each ending when
/// `shutdown` is cancelled: registry sync, re-routing and held builds (intake), status reports,
/// health checks and the reconciler. `reroute` is how a health change reaches intake (registry
/// sync holds its own handle to the same bell).
fn spawn_tasks(
    state: &Arc<AppState>,
    listener: TcpListener,
    tls: Option<Arc<sd_http::ServerTls>>,
    config: &Config,
    reroute: Arc<Notify>,
    shutdown: &CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    tasks.spawn(serve(
        listener,
        Arc::clone(state),
        config.http.max_connections,
        tls,
        shutdown.clone(),
    ));
    let (queues, doorbell, stop) = (
        state.queues.clone(),
        state.workers.doorbell.clone(),
        shutdown.clone(),
    );
    tasks.spawn(async move {
        queues
            .relay_doorbell(&doorbell, stop.cancelled_owned())
            .await;
    });
    tasks.spawn(Arc::clone(&state.registry_sync).run(shutdown.clone()));
    tasks.spawn(Arc::clone(&state.intake).run(
        Arc::clone(&reroute),
        config.registry.reload_interval,
        shutdown.clone(),
    ));
    tasks.spawn(state.workers.reporter.clone().run(shutdown.clone()));
    tasks.spawn(Arc::clone(&state.workers.dead_letters).run(shutdown.clone()));
    tasks.spawn(Arc::clone(&state.health).run(
        state.queues.clone(),
        state.cache.clone(),
        config.ha.clone(),
        reroute,
        shutdown.clone(),
    ));
    tasks.spawn(reconciler::run(
        Arc::clone(&state.intake),
        config.reconciler.clone(),
        shutdown.clone(),
    ));
    tasks
}

/// Serves the API until `shutdown`, letting requests in flight finish, with a bound on
/// connections and on the time a client may take to send its request headers (a slow client
/// cannot hold the scheduler's connections).
async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    max_connections: usize,
    tls: Option<Arc<sd_http::ServerTls>>,
    shutdown: CancellationToken,
) {
    check_open_files(max_connections);
    let limits = sd_http::Limits {
        max_connections,
        ..sd_http::Limits::default()
    };
    sd_http::serve(listener, api::router(state), limits, tls, shutdown).await;
}

/// Re-reads `listen_tls`'s files on SIGHUP, and when they change (checked every 10 s). A file
/// that does not load leaves the certificate in use, with a warning naming it. Without
/// `listen_tls`, SIGHUP is still taken (and logged): an operator's habitual reload must not
/// kill the process, as the signal's default action would.
async fn reload_tls(
    tls: Option<Arc<sd_http::ServerTls>>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let Some(tls) = &tls else {
            if forced {
                tracing::info!("SIGHUP: nothing to reload (listen_tls is not set)");
            }
            continue;
        };
        let result = if forced {
            tls.reload().map(|()| true)
        } else {
            tls.reload_if_changed()
        };
        match result {
            Ok(true) => tracing::info!(forced, "listen_tls: certificate files re-read"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "listen_tls: cannot re-read the certificate files; still serving the ones read before")
            }
        }
    }
}

/// Raises the open-files limit and warns when it still cannot hold `max_connections` (each
/// connection is a file descriptor; past the limit, accepting fails).
fn check_open_files(max_connections: usize) {
    /// Descriptors the process needs besides connections: Redis, the database, logs.
    const SPARE: u64 = 256;
    match sd_http::raise_open_files_limit() {
        Ok(limit) if limit < max_connections as u64 + SPARE => tracing::warn!(
            limit,
            max_connections,
            "the open-files limit is below http.max_connections; raise it (LimitNOFILE=, ulimit -n) or lower http.max_connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// Binds `listen` and returns the address really bound (port 0 picks a free port: tests).
async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, addr))
}

/// The verifier of Screwdriver-API tokens. Without a key the scheduler still starts (so the
/// workers' side and `/healthz` work) but refuses every authenticated call.
/// A wrong CA or password stops the start with the setting to fix; a Redis that does not answer
/// yet does not (the replica starts, not ready, and connects when Redis comes).
async fn check_redis(redis: &sd_queue::RedisTarget) -> Result<(), StartError> {
    use sd_queue::AccessError;
    match redis.check_access(std::time::Duration::from_secs(5)).await {
        Ok(()) => Ok(()),
        Err(source @ AccessError::Tls(_)) => Err(StartError::RedisAccess {
            setting: "redis.url / redis.ca_file",
            source,
        }),
        Err(source @ AccessError::Auth(_)) => Err(StartError::RedisAccess {
            setting: "redis.url (user and password)",
            source,
        }),
        Err(source @ (AccessError::ClusterMode | AccessError::NotClusterMode)) => {
            Err(StartError::RedisAccess {
                setting: "redis.cluster",
                source,
            })
        }
        Err(AccessError::Unreachable(why)) => {
            tracing::warn!(redis = %sd_protocol::env::redact_url(&redis.url), %why, "Redis does not answer yet; starting not ready");
            Ok(())
        }
    }
}

fn api_verifier(auth: &AuthConfig) -> Result<ApiVerifier, KeyError> {
    let policy = TokenPolicy {
        max_lifetime: auth.max_token_lifetime,
        issuer: auth.issuer.clone(),
        audience: auth.audience.clone(),
        environment: auth.environment.clone(),
    };
    match &auth.api_public_key_file {
        Some(path) => ApiVerifier::from_file(path, policy),
        None => {
            tracing::warn!(
                "auth.api_public_key_file is not set: every authenticated call will be refused with 401"
            );
            Ok(ApiVerifier::default())
        }
    }
}

/// The minter of launcher tokens, when a key is configured; without one, only builds that
/// carry their own token are accepted.
fn launcher_tokens(auth: &AuthConfig) -> Result<Option<LauncherTokens>, KeyError> {
    match &auth.private_key_file {
        Some(path) => Ok(Some(LauncherTokens::from_file(
            path,
            auth.launcher_token_ttl,
            auth.environment.clone(),
        )?)),
        None => {
            tracing::warn!(
                "auth.private_key_file is not set: builds are accepted only when they carry their own token"
            );
            Ok(None)
        }
    }
}

/// The queue's settings from the `[queue]` section (sd-queue does not know our config types).
fn queue_settings(q: &QueueConfig) -> QueueSettings {
    QueueSettings {
        visibility_timeout: q.visibility_timeout,
        max_attempts: q.max_attempts,
        blocked_recheck: q.blocked_recheck,
        nack_backoff: q.nack_backoff,
        nack_backoff_max: q.nack_backoff_max,
    }
}
