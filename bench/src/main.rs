//! Load generator behind `scripts/bench`. Measures a running scheduler over HTTP and reports
//! each phase as requests/s and latency, and as a ratio to the `/healthz` baseline measured in
//! the same run (so figures compare across machines).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod calls;
mod polls;
mod system;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
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
    /// Write the API, launcher and cluster key pairs (`*.key.pem`/`*.pub.pem`) into DIR.
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
        /// The scheduler's process id: each phase then reports its CPU time per request.
        #[arg(long)]
        scheduler_pid: Option<u32>,
    },
    /// Register the `bench-agent` cluster (authKey `SD_CLUSTER_BENCH_AGENT_PUBLIC_KEY`) and submit COUNT builds naming
    /// it, for measuring an agent under load.
    Submit {
        #[arg(long)]
        url: String,
        #[arg(long)]
        keys: PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
    /// What waiting long-polls cost: register CLUSTERS clusters, hold each of COUNTS polls
    /// waiting over them, and read the scheduler's memory, its Redis connections and intake
    /// throughput meanwhile (scripts/bench --polls).
    Polls {
        #[arg(long)]
        url: String,
        #[arg(long)]
        keys: PathBuf,
        #[arg(long, default_value_t = 1000)]
        clusters: usize,
        /// Waiting polls to measure with, in order (0 is always measured first).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        counts: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The scheduler's pid, for its resident memory.
        #[arg(long)]
        scheduler_pid: u32,
        /// The scheduler's Redis, for its connection count.
        #[arg(long)]
        redis_url: String,
    },
    /// The whole system in one run (scripts/bench --system): this machine's Redis ceilings,
    /// then the real scheduler and agent (Kubernetes executor against the fake API) measured
    /// from intake to pod creation; fails only on lost or duplicated builds and errors.
    System(system::Args),
    /// Serve the fake Kubernetes pods API (sd_testkit::kube_api) until killed, writing its URL
    /// to URL_FILE, and play the kubelet: every pod created starts running.
    Kube {
        #[arg(long)]
        url_file: PathBuf,
        /// Milliseconds each pod create takes (a real API server: 10-50).
        #[arg(long, default_value_t = 0)]
        create_latency_ms: u64,
    },
}

struct Phase {
    name: &'static str,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// The scheduler's CPU seconds over the phase, when its pid is known.
    scheduler_cpu: Option<f64>,
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
            RsaKeys::generate().write(&dir, "cluster");
            Ok(())
        }
        Cmd::Run {
            url,
            keys,
            concurrency,
            seconds,
            scheduler_pid,
        } => {
            let load = Load {
                concurrency,
                duration: Duration::from_secs(seconds),
                scheduler_pid,
            };
            run(url, keys, load).await
        }
        Cmd::Submit { url, keys, count } => submit(url, keys, count).await,
        Cmd::Kube {
            url_file,
            create_latency_ms,
        } => kube(url_file, Duration::from_millis(create_latency_ms)).await,
        Cmd::System(args) => system::run(args).await,
        Cmd::Polls {
            url,
            keys,
            clusters,
            counts,
            concurrency,
            seconds,
            scheduler_pid,
            redis_url,
        } => {
            polls::run(polls::Args {
                url,
                keys,
                clusters,
                counts,
                concurrency,
                duration: Duration::from_secs(seconds),
                scheduler_pid,
                redis_url,
            })
            .await
        }
    }
}

async fn kube(url_file: PathBuf, create_latency: Duration) -> Result<()> {
    let api = sd_testkit::kube_api::FakeKube::start().await;
    api.set_create_latency(create_latency);
    // Written whole, then renamed: the script waiting for it never reads half a URL.
    let partial = url_file.with_extension("partial");
    std::fs::write(&partial, &api.url)?;
    std::fs::rename(&partial, &url_file)?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        for pod in api.pods() {
            let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
            if phase == "Pending"
                && let Some(name) = pod["metadata"]["name"].as_str()
            {
                api.set_phase(name, "Running");
            }
        }
    }
}

async fn submit(url: String, keys: PathBuf, count: u64) -> Result<()> {
    let api = RsaKeys {
        private_pem: std::fs::read_to_string(keys.join("api.key.pem")).context("api.key.pem")?,
        public_pem: String::new(),
    };
    let http = reqwest::Client::new();
    calls::register(
        &http,
        &url,
        &api.api_token(&["admin"]),
        "bench-agent",
        "SD_CLUSTER_BENCH_AGENT_PUBLIC_KEY",
        0,
    )
    .await?;
    let sdapi = api.api_token(&["sdapi"]);
    let first = 2_000_000 + u64::from(rand::random::<u16>()) * 10_000;
    let results = futures::stream::iter(first..first + count)
        .map(|id| {
            let request = http
                .post(format!("{url}/v1/queue/message"))
                .bearer_auth(&sdapi)
                .json(&start_body(id));
            async move { request.send().await.map(|r| r.status()) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let refused = results
        .iter()
        .filter(|r| !r.as_ref().is_ok_and(|s| s.is_success()))
        .count();
    if refused > 0 {
        bail!("{refused} of {count} builds were not accepted");
    }
    Ok(())
}

/// The benchmark as a script: register the clusters, run each phase in order, print the
/// table. Longer than other functions on purpose: it reads top to bottom as the run does, and
/// the parts used more than once are functions of their own (`phase`, `wake_latency`).
/// How each phase of `run` loads the scheduler, and whose CPU it reads.
#[derive(Clone, Copy)]
struct Load {
    concurrency: usize,
    duration: Duration,
    scheduler_pid: Option<u32>,
}

async fn run(url: String, keys: PathBuf, load: Load) -> Result<()> {
    let Load {
        concurrency,
        duration,
        ..
    } = load;
    let api = RsaKeys {
        private_pem: std::fs::read_to_string(keys.join("api.key.pem")).context("api.key.pem")?,
        public_pem: std::fs::read_to_string(keys.join("api.pub.pem")).context("api.pub.pem")?,
    };
    let admin = api.api_token(&["admin"]);
    let sdapi = api.api_token(&["sdapi"]);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;

    for (name, key) in [
        ("bench-a", "SD_CLUSTER_BENCH_A_PUBLIC_KEY"),
        ("bench-b", "SD_CLUSTER_BENCH_B_PUBLIC_KEY"),
    ] {
        calls::register(&http, &url, &admin, name, key, 50).await?;
    }

    let next_build = Arc::new(AtomicU64::new(1_000_000 + u64::from(rand::random::<u32>())));
    let mut phases = Vec::new();
    phases.push(
        phase("GET /healthz (baseline)", &http, load, |http| {
            http.get(format!("{url}/healthz"))
        })
        .await,
    );
    phases.push(
        phase("GET /v4/buildclusters", &http, load, |http| {
            http.get(format!("{url}/v4/buildclusters"))
                .bearer_auth(&admin)
        })
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
    phases.push(phase("POST /v1/queue/message", &http, load, |_| start_build(None)).await);
    phases.push(
        phase("  same, token in body", &http, load, |_| {
            start_build(Some("bench-token"))
        })
        .await,
    );

    let cluster = RsaKeys {
        private_pem: std::fs::read_to_string(keys.join("cluster.key.pem"))
            .context("cluster.key.pem")?,
        public_pem: String::new(),
    };
    let agent_token = || {
        let now = sd_testkit::unix_now();
        cluster.sign(&json!({"buildCluster": "bench-agent", "iat": now, "exp": now + 300}))
    };
    // A cluster reached only by name (weightage 0), so its queue holds exactly what the
    // agent phases put there.
    calls::register(
        &http,
        &url,
        &admin,
        "bench-agent",
        "SD_CLUSTER_BENCH_AGENT_PUBLIC_KEY",
        0,
    )
    .await?;
    let cycles =
        fetch_ack_cycles(&http, &url, &sdapi, &agent_token, &next_build, concurrency).await?;
    let wake = wake_latency(&http, &url, &sdapi, &agent_token, &next_build).await?;

    let baseline = phases[0].rps();
    println!();
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>8} {:>12} {:>14}",
        "phase",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "vs baseline",
        "sched CPU ms/req"
    );
    for p in &phases {
        let cpu = p.scheduler_cpu.map_or_else(
            || "-".to_owned(),
            |s| format!("{:.3}", s * 1e3 / p.requests.max(1) as f64),
        );
        println!(
            "{:<28} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>11.3}x {:>14}",
            p.name,
            p.requests,
            p.rps(),
            p.percentile(0.5).as_secs_f64() * 1e3,
            p.percentile(0.99).as_secs_f64() * 1e3,
            p.errors,
            p.rps() / baseline,
            cpu
        );
    }
    println!(
        "{:<28} {:>10} {:>9.0} {:>9} {:>9} {:>8} {:>11.3}x",
        "fetch→ack (10 per poll)",
        cycles.0,
        cycles.1,
        "",
        "",
        0,
        cycles.1 / baseline
    );
    println!(
        "\nlong-poll wake (submit → delivery, {} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        wake.len(),
        pct(&wake, 0.5),
        pct(&wake, 0.99),
        pct(&wake, 1.0)
    );
    println!(
        "concurrency {concurrency}, {}s per phase",
        duration.as_secs()
    );
    if phases.iter().any(|p| p.errors > 0) {
        bail!("some requests failed");
    }
    Ok(())
}

/// Runs `concurrency` workers sending requests built by `make` for `duration`.
async fn phase<F>(name: &'static str, http: &reqwest::Client, load: Load, make: F) -> Phase
where
    F: Fn(&reqwest::Client) -> reqwest::RequestBuilder + Sync,
{
    eprintln!("running {name} …");
    let Load {
        concurrency,
        duration,
        scheduler_pid,
    } = load;
    let cpu = || scheduler_pid.and_then(|pid| system::stats::cpu_seconds(pid).ok());
    let cpu_before = cpu();
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
        scheduler_cpu: cpu().zip(cpu_before).map(|(after, before)| after - before),
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn start_body(id: u64) -> serde_json::Value {
    json!({
        "buildId": id, "jobId": id, "eventId": 1, "jobName": "main",
        "annotations": {"screwdriver.cd/buildCluster": "bench-agent"}, "blockedBy": [],
        "pipeline": {"id": 1, "name": "bench/repo", "scmContext": "github:github.com"},
        "apiUri": "https://api.example", "container": "node:22", "isPR": false, "token": "bench-token",
    })
}

/// Queues builds, then drains them with four agents polling (max 10) and acking: builds/s.
async fn fetch_ack_cycles(
    http: &reqwest::Client,
    url: &str,
    sdapi: &str,
    agent_token: &(dyn Fn() -> String + Sync),
    next_build: &AtomicU64,
    concurrency: usize,
) -> Result<(u64, f64)> {
    let total = 6_000u64;
    eprintln!("queueing {total} builds for the fetch→ack phase …");
    let queued = AtomicU64::new(0);
    let submitters = (0..concurrency).map(|_| async {
        while queued.fetch_add(1, Ordering::Relaxed) < total {
            let id = next_build.fetch_add(1, Ordering::Relaxed);
            let r = http
                .post(format!("{url}/v1/queue/message"))
                .bearer_auth(sdapi)
                .json(&start_body(id))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("submit: {}", r.status());
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    for r in futures::future::join_all(submitters).await {
        r?;
    }
    eprintln!("running fetch→ack …");
    let token = agent_token();
    let started = Instant::now();
    let agents = (0..4).map(|_| async {
        let mut acked = 0u64;
        loop {
            let body: serde_json::Value = http
                .get(format!("{url}/v1/jobs/bench-agent?wait=0&max=10"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            let ids = delivery_ids(&body);
            if ids.is_empty() {
                return Ok::<_, anyhow::Error>(acked);
            }
            let r = http
                .post(format!("{url}/v1/jobs/bench-agent/ack"))
                .bearer_auth(&token)
                .json(&json!({"deliveryIds": ids}))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("ack: {}", r.status());
            }
            acked += ids.len() as u64;
        }
    });
    let mut acked = 0;
    for r in futures::future::join_all(agents).await {
        acked += r?;
    }
    if acked != total {
        bail!("queued {total} builds but acknowledged {acked}");
    }
    Ok((acked, acked as f64 / started.elapsed().as_secs_f64()))
}

fn delivery_ids(body: &serde_json::Value) -> Vec<serde_json::Value> {
    body["jobs"]
        .as_array()
        .map(|jobs| jobs.iter().map(|j| j["deliveryId"].clone()).collect())
        .unwrap_or_default()
}

/// One agent waits in a long-poll; a build is submitted; how long until the poll returns it.
async fn wake_latency(
    http: &reqwest::Client,
    url: &str,
    sdapi: &str,
    agent_token: &(dyn Fn() -> String + Sync),
    next_build: &AtomicU64,
) -> Result<Vec<Duration>> {
    eprintln!("measuring long-poll wake latency …");
    let token = agent_token();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let poll = http
            .get(format!("{url}/v1/jobs/bench-agent?wait=10&max=1"))
            .bearer_auth(&token)
            .send();
        let poll = tokio::spawn(poll);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let id = next_build.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        http.post(format!("{url}/v1/queue/message"))
            .bearer_auth(sdapi)
            .json(&start_body(id))
            .send()
            .await?;
        let body: serde_json::Value = poll.await??.json().await?;
        samples.push(t0.elapsed());
        let ids = delivery_ids(&body);
        if ids.is_empty() {
            bail!("the long-poll returned empty instead of the build");
        }
        http.post(format!("{url}/v1/jobs/bench-agent/ack"))
            .bearer_auth(&token)
            .json(&json!({"deliveryIds": ids}))
            .send()
            .await?;
    }
    samples.sort();
    Ok(samples)
}
