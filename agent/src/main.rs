use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sd_agent::config::{CONFIG_ENV, Config, DEFAULT_PATH};
use sd_agent::keygen::{parse_algorithm, parse_cluster_name};
use sd_agent::{app, check, keygen, systemd};
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
    /// Verify config, key, scheduler authentication, Redis, the instance file and executor
    /// access; one line each.
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

/// Exit code for an unusable configuration (as sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Keygen {
            cluster,
            algorithm,
            out,
            expires_in,
        } => match keygen::create(&cluster, algorithm, &out, expires_in) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sd-agent keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check => run_check(&cli.config).await,
        Command::Run => run_agent(cli.config).await,
    }
}

/// `sd-agent check`: one line per check, exit 0 only when all passed.
async fn run_check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let lines = check::run(&config, path).await;
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

/// `sd-agent run`: refuses a bad configuration with exit 64 before binding anything, then runs
/// until SIGTERM/SIGINT; exit 1 when the agent could not start or a loop of it died.
async fn run_agent(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = match app::preflight(&config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sd-agent: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    sd_telemetry::init_logging(&config.log);
    systemd::start_watchdog();
    match app::run(path, config, client, systemd::notify).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sd-agent stopped");
            eprintln!("sd-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file with `SD_AGENT_*` overrides, or exit 64 naming what is wrong.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, sd_agent::config::env_overrides()).map_err(|e| {
        eprintln!("sd-agent: invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}
