use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sd_agent::config::{CONFIG_ENV, Config, DEFAULT_PATH};
use sd_protocol::SigningAlgorithm;

/// The sd-buildcluster agent, one per build cluster.
///
/// It signs a JWT with its cluster's private key, long-polls the scheduler for the cluster's
/// builds, moves them into the cluster's own Redis (acknowledging only what landed there), and
/// runs them on Kubernetes or as local processes. Configuration: one TOML file (see
/// config/agent.toml for every key); any key can be overridden by an environment variable
/// SD_AGENT_<SECTION>_<KEY>, e.g. SD_AGENT_REDIS_URL.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file.
    #[arg(long, short, env = CONFIG_ENV, default_value = DEFAULT_PATH, global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Verify config, key, scheduler authentication, Redis and executor access; one line each.
    Check,
    /// Create the cluster's key pair and print what to register with the scheduler.
    Keygen {
        /// The cluster's name in the scheduler's registry.
        #[arg(long, value_parser = parse_cluster_name)]
        cluster: String,
        #[arg(long, default_value = "RS256", value_parser = parse_algorithm)]
        algorithm: SigningAlgorithm,
        /// Where to write the private key (never overwritten).
        #[arg(long, default_value = "private.pem")]
        out: PathBuf,
        /// Token lifetime to put in the sign options (seconds).
        #[arg(long, default_value_t = 300)]
        expires_in: u64,
    },
}

fn parse_cluster_name(text: &str) -> Result<String, String> {
    sd_protocol::check_cluster_name(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.reason)
}

fn parse_algorithm(text: &str) -> Result<SigningAlgorithm, String> {
    match text {
        "RS256" => Ok(SigningAlgorithm::RS256),
        "ES256" => Ok(SigningAlgorithm::ES256),
        "EdDSA" => Ok(SigningAlgorithm::EdDSA),
        other => Err(format!("{other}: use RS256, ES256 or EdDSA")),
    }
}

const EXIT_CONFIG: u8 = 64;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, sd_agent::config::env_overrides()).map_err(|e| {
        eprintln!("sd-agent: invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Keygen {
            cluster,
            algorithm,
            out,
            expires_in,
        } => {
            let generated = match sd_agent::keygen::generate(algorithm) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("sd-agent keygen: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = sd_agent::keygen::write_private(&out, &generated.private_pem) {
                eprintln!("sd-agent keygen: {e}");
                return ExitCode::FAILURE;
            }
            println!(
                "{}",
                sd_agent::keygen::instructions(
                    &cluster,
                    algorithm,
                    expires_in,
                    &generated.public_pem,
                    &out
                )
            );
            ExitCode::SUCCESS
        }
        Command::Check => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let lines = sd_agent::check::run(&config, &cli.config).await;
            for l in &lines {
                println!("{l}");
            }
            if lines.iter().all(|l| l.ok) {
                println!("all checks passed");
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let client = match sd_agent::app::preflight(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sd-agent: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            sd_agent::telemetry::init_logging(&config.log);
            let notify = |state: &str| {
                let s = match state {
                    "READY" => sd_notify::NotifyState::Ready,
                    "RELOADING" => sd_notify::NotifyState::Reloading,
                    _ => sd_notify::NotifyState::Stopping,
                };
                let _ = sd_notify::notify(&[s]);
            };
            if let Some(every) = sd_notify::watchdog_enabled() {
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every / 2);
                    loop {
                        tick.tick().await;
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                });
            }
            match sd_agent::app::run(cli.config, config, client, notify).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "sd-agent stopped");
                    eprintln!("sd-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
