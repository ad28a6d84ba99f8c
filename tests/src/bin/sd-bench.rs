//! Load generator behind `scripts/bench`. Measures a running scheduler over HTTP and reports
//! each phase as requests/s and latency, and as a ratio to the `/healthz` baseline measured in
//! the same run (so figures compare across machines).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sd_testkit::RsaKeys;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark a running sd-scheduler (used by scripts/bench)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write an API key pair (api.key.pem/api.pub.pem) and a launcher key pair into DIR.
    Keys { dir: PathBuf },
    /// Run the phases against URL.
    Run {
        #[arg(long)]
        url: String,
        /// Directory the `keys` command wrote.
        #[arg(long)]
        keys: PathBuf,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

struct Phase {
    name: &'static str,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Keys { dir } => {
            std::fs::create_dir_all(&dir)?;
            RsaKeys::generate().write(&dir, "api");
            RsaKeys::generate().write(&dir, "launcher");
            Ok(())
        }
        Cmd::Run {
            url,
            keys,
            concurrency,
            seconds,
        } => run(url, keys, concurrency, Duration::from_secs(seconds)).await,
    }
}

async fn run(url: String, keys: PathBuf, concurrency: usize, duration: Duration) -> Result<()> {
    let api = RsaKeys {
        private_pem: std::fs::read_to_string(keys.join("api.key.pem")).context("api.key.pem")?,
        public_pem: std::fs::read_to_string(keys.join("api.pub.pem")).context("api.pub.pem")?,
    };
    let admin = api.api_token(&["admin"]);
    let sdapi = api.api_token(&["sdapi"]);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;

    for (name, weight) in [("bench-a", 50), ("bench-b", 50)] {
        let resp = http
            .post(format!("{url}/v4/buildclusters"))
            .bearer_auth(&admin)
            .json(&json!({"name": name, "scmContext": "github:github.com", "managedBy": "screwdriver",
                "managedByEmail": "bench@example.com", "authKey": "BENCH_KEY", "weightage": weight}))
            .send()
            .await?;
        if !(resp.status().is_success() || resp.status() == reqwest::StatusCode::CONFLICT) {
            bail!("registering {name}: {}", resp.status());
        }
    }

    let next_build = Arc::new(AtomicU64::new(1_000_000 + u64::from(rand::random::<u32>())));
    let mut phases = Vec::new();
    phases.push(
        phase(
            "GET /healthz (baseline)",
            &http,
            concurrency,
            duration,
            |http| http.get(format!("{url}/healthz")),
        )
        .await,
    );
    phases.push(
        phase(
            "GET /v4/buildclusters",
            &http,
            concurrency,
            duration,
            |http| {
                http.get(format!("{url}/v4/buildclusters"))
                    .bearer_auth(&admin)
            },
        )
        .await,
    );
    let start_build = |token: Option<&str>| {
        let id = next_build.fetch_add(1, Ordering::Relaxed);
        let mut body = json!({
            "buildId": id, "jobId": id, "eventId": 1, "jobName": "main", "annotations": {},
            "blockedBy": [id], "pipeline": {"id": 1, "name": "bench/repo", "scmContext": "github:github.com"},
            "apiUri": "https://api.example", "container": "node:22", "isPR": false,
        });
        if let Some(token) = token {
            body["token"] = json!(token);
        }
        http.post(format!("{url}/v1/queue/message"))
            .bearer_auth(&sdapi)
            .json(&body)
    };
    // The scheduler mints an RS256 launcher token per build; with a token in the body it does not.
    phases.push(
        phase(
            "POST /v1/queue/message",
            &http,
            concurrency,
            duration,
            |_| start_build(None),
        )
        .await,
    );
    phases.push(
        phase(
            "  same, token in body",
            &http,
            concurrency,
            duration,
            |_| start_build(Some("bench-token")),
        )
        .await,
    );

    let baseline = phases[0].rps();
    println!();
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>8} {:>12}",
        "phase", "requests", "req/s", "p50 ms", "p99 ms", "errors", "vs baseline"
    );
    for p in &phases {
        println!(
            "{:<28} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>11.3}x",
            p.name,
            p.requests,
            p.rps(),
            p.percentile(0.5).as_secs_f64() * 1e3,
            p.percentile(0.99).as_secs_f64() * 1e3,
            p.errors,
            p.rps() / baseline
        );
    }
    println!(
        "\nconcurrency {concurrency}, {}s per phase",
        duration.as_secs()
    );
    if phases.iter().any(|p| p.errors > 0) {
        bail!("some requests failed");
    }
    Ok(())
}

/// Runs `concurrency` workers sending requests built by `make` for `duration`.
async fn phase<F>(
    name: &'static str,
    http: &reqwest::Client,
    concurrency: usize,
    duration: Duration,
    make: F,
) -> Phase
where
    F: Fn(&reqwest::Client) -> reqwest::RequestBuilder + Sync,
{
    eprintln!("running {name} …");
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..concurrency).map(|_| async {
        let mut latencies = Vec::new();
        let mut errors = 0u64;
        while Instant::now() < deadline {
            let t = Instant::now();
            match make(http).send().await {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                }
                _ => errors += 1,
            }
            latencies.push(t.elapsed());
        }
        (latencies, errors)
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut errors = 0;
    for (l, e) in results {
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    Phase {
        name,
        requests: latencies.len() as u64,
        errors,
        elapsed,
        latencies,
    }
}
