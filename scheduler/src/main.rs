use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sd_scheduler::config::{Config, ENV_PREFIX};
use sd_scheduler::{Scheduler, systemd};

/// The central scheduler of sd-buildcluster.
///
/// Keeps the registry of build clusters (/v4/buildclusters), accepts builds from the Screwdriver
/// API (/v1/queue/message), routes each to a cluster and queues it there for that cluster's
/// agent. Without --config it runs on embedded defaults: SQLite file ./sd-scheduler.db, Redis on
/// 127.0.0.1:6379, listening on 127.0.0.1:8080; only the Screwdriver API's URL has no default
/// (SD_SCHEDULER_SCREWDRIVER_API_URIS). Every config key can be overridden with an
/// environment variable SD_SCHEDULER_<SECTION>_<KEY>, e.g. SD_SCHEDULER_REDIS_URL.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (see config/scheduler.toml for every key).
    #[arg(long, short, env = "SD_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// Exit code for an unusable configuration (EX_CONFIG-style, as sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    sd_telemetry::init_logging(&config.log);
    // Registered before anything is served: a SIGTERM that arrives once /readyz answers must
    // shut down gracefully, not kill the process with the default action.
    let stop = shutdown_signal();
    let scheduler = match Scheduler::start(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "sd-scheduler could not start");
            eprintln!("sd-scheduler: {e}");
            return if e.is_configuration() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    systemd::ready();
    scheduler
        .run_until(async {
            stop.await;
            systemd::stopping();
        })
        .await;
    ExitCode::SUCCESS
}

/// The configuration from `--config` and `SD_SCHEDULER_*`, or exit 64 naming what is wrong.
fn load(cli: &Cli) -> Result<Config, ExitCode> {
    let vars =
        std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != "SD_SCHEDULER_CONFIG");
    Config::load(cli.config.as_deref(), vars).map_err(|e| {
        eprintln!("sd-scheduler: invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Registers SIGTERM and SIGINT now; the returned future resolves on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
