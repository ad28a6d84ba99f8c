use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sd_scheduler::admin::{self, AdminClient, AdminError};
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
///
/// With a command, it is instead a client of a running scheduler for its operators: list the
/// clusters and their health, pause, resume or drain one, list, requeue or fail its dead
/// letters.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (see config/scheduler.toml for every key).
    #[arg(long, short, env = "SD_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How an admin command reaches the scheduler.
#[derive(clap::Args)]
struct Remote {
    /// The scheduler's base URL.
    #[arg(
        long,
        env = "SD_SCHEDULER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// A file holding a Screwdriver API token (scope admin; user is enough for clusters and
    /// dead-letters). Without it, SD_SCHEDULER_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https URL, beside the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every cluster: health (and why, when not healthy), agents, builds in flight against
    /// capacity, queue, oldest waiting build, dispatches in the last hour.
    Clusters {
        #[command(flatten)]
        remote: Remote,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop routing builds to a cluster; its agents get nothing until it is resumed, and its
    /// waiting builds move to other clusters that may take them.
    Pause {
        /// The cluster's name (as registered).
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Route builds to a paused cluster again.
    Resume {
        /// The cluster's name (as registered).
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Pause a cluster, then wait until nothing of it waits or is being handed over (its
    /// dead letters aside), printing its queue as it empties. Exits 1 if --timeout passes
    /// first; the cluster stays paused either way (resume it to undo).
    Drain {
        /// The cluster's name (as registered).
        name: String,
        #[command(flatten)]
        remote: Remote,
        /// How long to wait, e.g. 10m.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// A cluster's dead letters: messages given up after queue.max_attempts deliveries
    /// without an acknowledgement, held (still QUEUED in Screwdriver) until
    /// queue.dead_letter_hold passes. Lists them; `requeue` or `fail` acts on some or all.
    DeadLetters {
        /// The cluster's name (as registered).
        name: String,
        #[command(flatten)]
        remote: Remote,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<LetterAction>,
    },
}

#[derive(clap::Subcommand)]
enum LetterAction {
    /// Put dead letters back on the cluster's queue, their deliveries counted from 1 (fix
    /// what made them fail first: they go to the same cluster).
    Requeue(Letters),
    /// Fail held builds now (reported FAILURE to Screwdriver); drop stop messages.
    Fail(Letters),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Letters {
    /// Build ids, or stop:<buildId> for a stop message.
    ids: Vec<String>,
    /// Every dead letter listed now (the latest 100).
    #[arg(long)]
    all: bool,
}

/// Exit code for an unusable configuration (EX_CONFIG-style, as sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return admin(command).await;
    }
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

/// Runs an admin command against a running scheduler; exit 1 with the reason on failure.
async fn admin(command: Command) -> ExitCode {
    match run_admin(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sd-scheduler: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_admin(command: Command) -> Result<(), AdminError> {
    let client = |remote: Remote| {
        AdminClient::new(
            &remote.url,
            std::env::var("SD_SCHEDULER_TOKEN").ok(),
            remote.token_file,
            remote.ca_file,
        )
    };
    match command {
        Command::Clusters { remote, json } => {
            let all = client(remote)?.statuses().await?;
            if json {
                println!("{all:#}");
            } else {
                print!("{}", admin::clusters_table(&all));
            }
        }
        Command::Pause { name, remote } => {
            admin::check_name(&name)?;
            client(remote)?.set_active(&name, false).await?;
            println!(
                "{name} paused: no builds go to it; its waiting builds move to other clusters that may take them"
            );
        }
        Command::Resume { name, remote } => {
            admin::check_name(&name)?;
            client(remote)?.set_active(&name, true).await?;
            println!("{name} resumed: builds are routed to it again");
        }
        Command::Drain {
            name,
            remote,
            timeout,
        } => {
            admin::check_name(&name)?;
            let client = client(remote)?;
            println!(
                "{name} paused; waiting until its queue is empty (at most {})",
                humantime::format_duration(timeout)
            );
            let mut last = None;
            client
                .drain(
                    &name,
                    timeout,
                    std::time::Duration::from_secs(2),
                    |status| {
                        let left = admin::remaining(status);
                        if last != Some(left) {
                            println!(
                                "  {left} left ({} ready, {} leased, {} deferred, {} blocked)",
                                status["queue"]["ready"],
                                status["queue"]["leased"],
                                status["queue"]["deferred"],
                                status["queue"]["blocked"]
                            );
                            last = Some(left);
                        }
                    },
                )
                .await?;
            println!("{name} is drained and stays paused (sd-scheduler resume {name} to undo)");
        }
        Command::DeadLetters {
            name,
            remote,
            json,
            action: None,
        } => {
            admin::check_name(&name)?;
            let dead = client(remote)?.dead_letters(&name).await?;
            if json {
                println!("{dead:#}");
            } else {
                print!("{}", admin::dead_letters_table(&name, &dead));
            }
        }
        Command::DeadLetters {
            name,
            remote,
            action: Some(action),
            ..
        } => {
            admin::check_name(&name)?;
            let (verb, letters) = match action {
                LetterAction::Requeue(letters) => (admin::LetterVerb::Requeue, letters),
                LetterAction::Fail(letters) => (admin::LetterVerb::Fail, letters),
            };
            let ids = admin::check_letter_ids(&letters.ids)?;
            let client = client(remote)?;
            let ids = if letters.all {
                admin::letter_ids(&client.dead_letters(&name).await?)
            } else {
                ids
            };
            if ids.is_empty() {
                println!("{name} has no dead letters");
            }
            let mut refused = 0;
            for id in &ids {
                match client.resolve_dead_letter(&name, id, verb).await {
                    Ok(done) => println!("{id}: {}", done["action"].as_str().unwrap_or("done")),
                    Err(e) => {
                        refused += 1;
                        println!("{id}: not {}: {e}", verb.past());
                    }
                }
            }
            if refused > 0 {
                return Err(admin::AdminError::Partly {
                    refused,
                    of: ids.len(),
                });
            }
        }
    }
    Ok(())
}
