//! `sd-agent run`: wires the loops together and handles signals.
//!
//! Shutdown order (SIGTERM/SIGINT): stop polling and launching; the fetcher finishes the
//! transfer it is in (push + ack), everything else stays where it is — on the master queue or
//! in the local Redis — to be picked up again; exit within `shutdown_timeout`. A second signal
//! exits at once. SIGHUP reloads the config file and the private key (rotation).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sd_protocol::AgentReport;
use sd_screwdriver::BuildUpdates;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ExecutorKind};
use crate::executor::{self, Events, Executor};
use crate::fetcher::Fetcher;
use crate::health::{self, HealthState};
use crate::instance::InstanceLock;
use crate::launcher::Launcher;
use crate::local::{LocalError, LocalQueue};
use crate::outbox::{EventSink, Outbox};
use crate::reporter::Reporter;
use crate::scheduler_client::{ClientSetupError, ClientTls, SchedulerClient};
use crate::signer::Signer;
use crate::status::Status;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("scheduler client: {0}")]
    Client(#[from] crate::scheduler_client::ClientSetupError),
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    #[error("executor: {0}")]
    Executor(#[from] executor::ExecError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the {task} {how}")]
    LoopEnded {
        task: &'static str,
        how: &'static str,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Screwdriver(#[from] sd_screwdriver::ClientError),
}

pub fn signer(config: &Config) -> Result<Signer, crate::signer::SignerError> {
    Signer::from_file(
        &config.cluster.name,
        config.auth.algorithm,
        config.auth.token_ttl,
        config.auth.issuer.clone(),
        config.auth.audience.clone(),
        &config.auth.private_key_file,
    )
}

pub fn client(config: &Config, signer: Arc<Signer>) -> Result<SchedulerClient, RunError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| RunError::Read {
            path: path.clone(),
            source,
        })
    };
    let s = &config.scheduler;
    let identity_pem = match (&s.client_cert_file, &s.client_key_file) {
        (Some(cert), Some(key)) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            Some(pem)
        }
        _ => None,
    };
    let tls = ClientTls {
        ca_pem: s.ca_file.as_ref().map(read).transpose()?,
        identity_pem,
    };
    SchedulerClient::new(
        &s.url,
        &config.cluster.name,
        signer,
        &tls,
        s.request_timeout,
    )
    .map_err(RunError::from)
}

/// The Screwdriver API client: to the APIs `screwdriver.api_uris` allows, no redirects.
pub fn build_updates(config: &Config) -> Result<BuildUpdates, RunError> {
    Ok(BuildUpdates::new(
        config.screwdriver.allowed_apis()?,
        Duration::from_secs(10),
        concat!("sd-agent/", env!("CARGO_PKG_VERSION")),
    )?)
}

/// The scheduler client `run` needs, built before anything binds: a private key that does not
/// load, a CA file or kubeconfig that does not parse, a local Redis whose certificate is not
/// trusted or that refuses the password is a configuration error (exit 64), named by its key.
/// A local Redis that does not answer yet is not: the agent starts, not ready.
pub async fn preflight(config: &Config) -> Result<SchedulerClient, ConfigError> {
    check_redis(config).await?;
    if let (ExecutorKind::Kubernetes, Some(path)) =
        (config.executor.kind, &config.executor.kubernetes.kubeconfig)
    {
        kube::config::Kubeconfig::read_from(path).map_err(|e| {
            ConfigError::invalid(
                "executor.kubernetes.kubeconfig",
                format!("{}: {e}", path.display()),
            )
        })?;
    }
    let signer =
        signer(config).map_err(|e| ConfigError::invalid("auth.private_key_file", e.to_string()))?;
    client(config, Arc::new(signer)).map_err(|e| {
        let key = match &e {
            RunError::Client(ClientSetupError::Identity(_)) => "scheduler.client_cert_file",
            RunError::Read { path, .. }
                if Some(path) == config.scheduler.client_cert_file.as_ref() =>
            {
                "scheduler.client_cert_file"
            }
            RunError::Read { path, .. }
                if Some(path) == config.scheduler.client_key_file.as_ref() =>
            {
                "scheduler.client_key_file"
            }
            _ => "scheduler.ca_file",
        };
        ConfigError::invalid(key, e.to_string())
    })
}

async fn check_redis(config: &Config) -> Result<(), ConfigError> {
    use sd_queue::AccessError;
    let target = config.redis.target()?;
    match target.check_access(Duration::from_secs(5)).await {
        Ok(()) => Ok(()),
        Err(e @ AccessError::Tls(_)) => Err(ConfigError::invalid(
            "redis.ca_file",
            format!(
                "{e} (redis.url must be the server's TLS port, rediss://, and redis.ca_file the CA that issued its certificate)"
            ),
        )),
        Err(e @ AccessError::Auth(_)) => Err(ConfigError::invalid(
            if config.redis.password_file.is_some() {
                "redis.password_file"
            } else {
                "redis.url"
            },
            e.to_string(),
        )),
        Err(e @ (AccessError::ClusterMode | AccessError::NotClusterMode)) => {
            Err(ConfigError::invalid("redis.cluster", e.to_string()))
        }
        Err(AccessError::Unreachable(why)) => {
            tracing::warn!(%why, "the local Redis does not answer yet; starting not ready");
            Ok(())
        }
    }
}

/// The executor `executor.kind` selects, with its watchers started.
pub async fn executor(
    config: &Config,
    events: Events,
    stop: CancellationToken,
) -> Result<Executor, RunError> {
    Ok(match config.executor.kind {
        ExecutorKind::Kubernetes => Executor::Kubernetes(
            executor::kubernetes::KubernetesExecutor::new(
                &config.executor.kubernetes,
                &config.screwdriver,
                events,
                stop,
            )
            .await?,
        ),
        ExecutorKind::Process => Executor::Process(
            executor::process::ProcessExecutor::new(
                &config.executor.process,
                &config.screwdriver,
                config.redis.target()?,
                events,
            )
            .await?,
        ),
    })
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    client: SchedulerClient,
    ready: impl Fn(&str),
) -> Result<(), RunError> {
    // Registered before anything is served: a SIGTERM that arrives once /healthz answers must
    // drain gracefully, not kill the process with the default action.
    let mut signals = Signals::new();
    let updates = build_updates(&config)?;
    // Held until this function returns, i.e. for the process's life: the kernel releases it
    // when the process dies, which is what lets the next run take back this run's jobs at once.
    // A second agent on the same file fails here, before it touches any build.
    let mut instance_lock = config
        .executor
        .instance_file
        .as_deref()
        .map(InstanceLock::acquire)
        .transpose()?;
    // Bind first: a second agent on the same port must fail before it touches any build.
    let listener = tokio::net::TcpListener::bind(config.health.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.health.listen,
            source,
        })?;
    let local = LocalQueue::connect(
        config.redis.target()?,
        &config.cluster.name,
        config.executor.launch_lease,
    )
    .await?;
    if let Some(lock) = &mut instance_lock {
        match local.take_back_previous_run(lock).await {
            Ok(_) => {}
            Err(LocalError::Instance(e)) => return Err(e.into()),
            Err(e) => tracing::warn!(
                error = %e,
                "could not take back the local jobs of this host's previous run now; they lapse after executor.takeover_after"
            ),
        }
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let background = CancellationToken::new();
    let executor = Arc::new(executor(&config, events_tx.clone(), background.clone()).await?);
    let status = Arc::new(Status::default());
    let health = HealthState::new(
        Arc::clone(&status),
        local.clone(),
        Arc::clone(&executor),
        sd_telemetry::metrics_handle(Some(sd_telemetry::LATENCY_BUCKETS)),
    );
    // The health port's clients are probes and Prometheus: a few connections are plenty.
    let limits = sd_http::Limits {
        max_connections: 64,
        ..sd_http::Limits::default()
    };
    let server = tokio::spawn(sd_http::serve(
        listener,
        health::router(health),
        limits,
        None,
        background.clone(),
    ));
    let mut loops = Loops::start(
        &config,
        &client,
        &local,
        &executor,
        &status,
        (events_tx, events_rx),
        updates,
    );
    tracing::info!(cluster = %config.cluster.name, scheduler = %config.scheduler.url, health = %config.health.listen, "sd-agent running");
    ready("READY");

    // A loop that ends on its own (a panic) would leave an agent that answers /healthz but
    // moves no builds: exit instead, and let systemd or the DaemonSet restart it.
    let died = tokio::select! {
        () = signals.wait_for_shutdown(&config_path, &config, &client, &ready) => None,
        died = loops.first_to_end() => Some(died),
    };
    ready("STOPPING");
    if let Some((task, how)) = died {
        tracing::error!(
            task,
            how,
            "a loop of the agent ended; exiting so it is restarted"
        );
        loops.abort();
        background.cancel();
        return Err(RunError::LoopEnded { task, how });
    }
    loops
        .drain(config.shutdown_timeout, signals.next_stop())
        .await;
    background.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    // Last: the next run may take back whatever this one still holds.
    drop(instance_lock);
    Ok(())
}

/// The agent's three loops: fetcher (scheduler → local queue), launcher (local queue →
/// executor) and reporter (events → scheduler and Screwdriver).
struct Loops {
    fetcher: JoinHandle<()>,
    launcher: JoinHandle<()>,
    reporter: JoinHandle<()>,
    /// Stops the fetcher's polls.
    fetching: CancellationToken,
    /// Stops the launcher taking local jobs.
    launching: CancellationToken,
}

impl Loops {
    fn start(
        config: &Config,
        client: &SchedulerClient,
        local: &LocalQueue,
        executor: &Arc<Executor>,
        status: &Arc<Status>,
        (events_tx, events_rx): (Events, mpsc::UnboundedReceiver<crate::events::BuildEvent>),
        updates: BuildUpdates,
    ) -> Self {
        let capacity = Arc::new(Notify::new());
        // Beside sd_agent_in_flight, for "at capacity" alerts and dashboards.
        metrics::gauge!("sd_agent_capacity").set(f64::from(config.executor.max_in_flight));
        let fetching = CancellationToken::new();
        let fetcher = tokio::spawn(
            Fetcher {
                client: client.clone(),
                local: local.clone(),
                executor: Arc::clone(executor),
                status: Arc::clone(status),
                wait: config.poll.wait,
                max_jobs: config.poll.max_jobs,
                max_in_flight: config.executor.max_in_flight,
                capacity: Arc::clone(&capacity),
                report: AgentReport {
                    instance: local.instance().to_owned(),
                    host: host_name(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    executor: config.executor.kind.as_str().to_owned(),
                    in_flight: 0,
                    capacity: config.executor.max_in_flight,
                },
            }
            .run(fetching.clone()),
        );
        // One outbox: the launcher keeps the events it makes itself, the reporter all others.
        let outbox = Outbox::new(local.queues().connection());
        let sink = EventSink::new(outbox.clone(), events_tx);
        let launching = CancellationToken::new();
        let launcher = tokio::spawn(
            Launcher {
                local: local.clone(),
                executor: Arc::clone(executor),
                events: sink,
                max_in_flight: config.executor.max_in_flight,
                launch_concurrency: config.executor.launch_concurrency,
                takeover_after: config.executor.takeover_after,
                apis: updates.allowed().clone(),
            }
            .run(launching.clone()),
        );
        let reporter = tokio::spawn(
            Reporter {
                client: client.clone(),
                local: local.clone(),
                outbox,
                updates,
                capacity,
            }
            .run(events_rx),
        );
        Self {
            fetcher,
            launcher,
            reporter,
            fetching,
            launching,
        }
    }

    /// Waits for any loop to end on its own (they only end when stopped): which one, and how.
    async fn first_to_end(&mut self) -> (&'static str, &'static str) {
        let handles = [&mut self.fetcher, &mut self.launcher, &mut self.reporter];
        let (result, index, _) = futures::future::select_all(handles).await;
        let how = match result {
            Err(e) if e.is_panic() => "panicked",
            _ => "stopped on its own",
        };
        (["fetcher", "launcher", "reporter"][index], how)
    }

    fn abort(&self) {
        self.fetching.cancel();
        self.launching.cancel();
        for handle in [&self.fetcher, &self.launcher, &self.reporter] {
            handle.abort();
        }
    }

    /// SIGTERM: no new polls, transfers and launches in flight finish, within `timeout` or
    /// until a second signal; the reporter stops last (what it has not sent stays in the
    /// outbox for the next agent).
    async fn drain(self, timeout: Duration, second_signal: impl Future<Output = ()>) {
        tracing::info!(timeout = ?timeout, "draining: no new polls; finishing transfers in flight");
        self.fetching.cancel();
        self.launching.cancel();
        let drain = async {
            let _ = self.fetcher.await;
            let _ = self.launcher.await;
        };
        tokio::select! {
            () = drain => tracing::info!("drained"),
            () = tokio::time::sleep(timeout) => tracing::warn!("shutdown_timeout reached; exiting with work in flight (it will be redelivered)"),
            () = second_signal => tracing::warn!("second signal: exiting at once"),
        }
        self.reporter.abort();
    }
}

/// SIGTERM, SIGINT and SIGHUP, registered once so a second signal is seen too.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
        match signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn next_stop(&mut self) {
        tokio::select! {
            () = Self::recv(&mut self.term) => {}
            () = Self::recv(&mut self.int) => {}
        }
    }

    /// Waits for SIGTERM/SIGINT; reloads the config and key on each SIGHUP meanwhile.
    async fn wait_for_shutdown(
        &mut self,
        path: &std::path::Path,
        config: &Config,
        client: &SchedulerClient,
        notify: &impl Fn(&str),
    ) {
        loop {
            tokio::select! {
                () = Self::recv(&mut self.term) => return,
                () = Self::recv(&mut self.int) => return,
                () = Self::recv(&mut self.hup) => {
                    notify("RELOADING");
                    reload(path, config, client);
                    notify("READY");
                }
            }
        }
    }
}

/// SIGHUP: re-read the config file and the private key; the next call uses the new key. Keys
/// other than `auth.*` need a restart to take effect.
fn reload(path: &std::path::Path, current: &Config, client: &SchedulerClient) {
    let fresh = match Config::load(path, crate::config::env_overrides()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: invalid config; keeping the running one");
            return;
        }
    };
    if fresh.cluster.name != current.cluster.name {
        tracing::error!("reload refused: cluster.name changed; restart the agent for that");
        return;
    }
    match signer(&fresh) {
        Ok(s) => {
            client.set_signer(Arc::new(s));
            tracing::info!(key = %fresh.auth.private_key_file.display(), "reloaded: new private key in use");
            let pending = current.changed_sections(&fresh);
            if !pending.is_empty() {
                tracing::warn!(
                    sections = ?pending,
                    "the file also changes settings a reload does not apply; restart the agent for them"
                );
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the private key does not load; keeping the old one")
        }
    }
}

/// This machine's (or pod's) name for the agent's report, when it is one a report may carry.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim();
    sd_protocol::agent_report::is_name(name).then(|| name.to_owned())
}
