//! `sd-bench polls`: what waiting long-polls cost a scheduler replica. Registers CLUSTERS
//! clusters, holds 0, then each of COUNTS polls waiting over them (a poll that returns is sent
//! again at once), and reads with each count: the scheduler's resident memory, the Redis
//! connections it holds, and intake throughput while the polls wait (as a ratio to the same
//! run's figure with none waiting).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_testkit::RsaKeys;
use serde_json::json;

use super::{Load, Phase, phase};

pub struct Args {
    pub url: String,
    pub keys: std::path::PathBuf,
    pub clusters: usize,
    pub counts: Vec<usize>,
    pub concurrency: usize,
    pub duration: Duration,
    pub scheduler_pid: u32,
    pub redis_url: String,
}

/// One row of the report.
struct Row {
    waiting: usize,
    rss_kib: u64,
    open_files: usize,
    redis_clients: u64,
    intake: Phase,
}

/// The name of poll cluster `i`, and the variable its key is in (scripts/bench exports them).
fn poll_cluster(i: usize) -> (String, String) {
    (
        format!("poll-{i}"),
        format!("SD_CLUSTER_POLL_{i}_PUBLIC_KEY"),
    )
}

pub async fn run(args: Args) -> Result<()> {
    sd_http::raise_open_files_limit().context("raising the open-files limit")?;
    let api = RsaKeys {
        private_pem: std::fs::read_to_string(args.keys.join("api.key.pem"))
            .context("api.key.pem")?,
        public_pem: String::new(),
    };
    let cluster_key = RsaKeys {
        private_pem: std::fs::read_to_string(args.keys.join("cluster.key.pem"))
            .context("cluster.key.pem")?,
        public_pem: String::new(),
    };
    let (admin, sdapi) = (api.api_token(&["admin"]), api.api_token(&["sdapi"]));
    let http = reqwest::Client::new();
    let url = &args.url;

    eprintln!("registering {} clusters …", args.clusters + 1);
    // Every build goes to the sink (the only cluster with weight): no poll is answered early.
    let mut records = vec![(
        "poll-sink".to_owned(),
        "SD_CLUSTER_POLL_SINK_PUBLIC_KEY".to_owned(),
        100,
    )];
    records.extend((0..args.clusters).map(|i| {
        let (name, var) = poll_cluster(i);
        (name, var, 0)
    }));
    for (name, var, weight) in &records {
        crate::calls::register(&http, url, &admin, name, var, *weight).await?;
    }
    // A token per poll, as every agent signs its own (the scheduler caps polls per token).
    let now = sd_testkit::unix_now();
    let sign = |poll: usize| {
        let cluster = poll_cluster(poll % args.clusters).0;
        cluster_key
            .sign(&json!({"buildCluster": cluster, "iat": now, "exp": now + 300, "poll": poll}))
    };

    let next_build = AtomicU64::new(5_000_000_000 + u64::from(rand::random::<u32>()));
    let mut polls = tokio::task::JoinSet::new();
    let mut rows = Vec::new();
    for &count in std::iter::once(&0).chain(&args.counts) {
        while polls.len() < count {
            let i = polls.len();
            let poll = format!(
                "{url}/v1/jobs/{}?wait=60&max=1",
                poll_cluster(i % args.clusters).0
            );
            let (http, token) = (http.clone(), sign(i));
            polls.spawn(async move {
                loop {
                    // Answered polls go out again at once, so the count stays waiting; refused
                    // ones after a pause.
                    match http.get(&poll).bearer_auth(&token).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                        }
                        _ => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            });
        }
        wait_until_waiting(&http, url, count).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let load = Load {
            concurrency: args.concurrency,
            duration: args.duration,
            scheduler_pid: Some(args.scheduler_pid),
        };
        let intake = phase("POST /v1/queue/message", &http, load, |http| {
            let id = next_build.fetch_add(1, Ordering::Relaxed);
            http.post(format!("{url}/v1/queue/message"))
                .bearer_auth(&sdapi)
                .json(&json!({
                    "buildId": id, "jobId": id, "eventId": 1, "jobName": "main", "annotations": {},
                    "blockedBy": [id], "pipeline": {"id": 1, "name": "bench/repo", "scmContext": "github:github.com"},
                    "apiUri": "https://api.example", "container": "node:22", "isPR": false,
                }))
        })
        .await;
        rows.push(Row {
            waiting: count,
            rss_kib: rss_kib(args.scheduler_pid)?,
            open_files: std::fs::read_dir(format!("/proc/{}/fd", args.scheduler_pid))?.count(),
            redis_clients: redis_clients(&args.redis_url)?,
            intake,
        });
    }
    polls.abort_all();
    report(&rows, args.clusters);
    if rows.iter().any(|r| r.intake.errors > 0) {
        bail!("some builds were refused while polls waited");
    }
    Ok(())
}

/// Waits until the scheduler counts `count` polls waiting (its `sd_scheduler_polls_waiting`).
async fn wait_until_waiting(http: &reqwest::Client, url: &str, count: usize) -> Result<()> {
    eprintln!("opening {count} waiting polls …");
    let started = Instant::now();
    loop {
        let waiting = crate::calls::gauge(
            http,
            &format!("{url}/metrics"),
            "sd_scheduler_polls_waiting",
        )
        .await?
        .unwrap_or(0.0) as usize;
        if waiting >= count {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {waiting} of {count} polls waiting after 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is --scheduler-pid right?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// Clients Redis counts, less this probe's own connection.
fn redis_clients(url: &str) -> Result<u64> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let info: String = redis::cmd("INFO").arg("clients").query(&mut conn)?;
    let n: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .context("connected_clients")?;
    Ok(n.saturating_sub(1))
}

fn report(rows: &[Row], clusters: usize) {
    let base = rows.first().map_or(1.0, |r| r.intake.rps());
    println!();
    println!(
        "{:<16} {:>9} {:>11} {:>14} {:>10} {:>9} {:>9} {:>10}",
        "waiting polls",
        "RSS MiB",
        "open files",
        "Redis clients",
        "intake/s",
        "p50 ms",
        "p99 ms",
        "vs none"
    );
    for r in rows {
        println!(
            "{:<16} {:>9.1} {:>11} {:>14} {:>10.0} {:>9.2} {:>9.2} {:>9.3}x",
            r.waiting,
            r.rss_kib as f64 / 1024.0,
            r.open_files,
            r.redis_clients,
            r.intake.rps(),
            r.intake.percentile(0.5).as_secs_f64() * 1e3,
            r.intake.percentile(0.99).as_secs_f64() * 1e3,
            r.intake.rps() / base
        );
    }
    let json: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"waitingPolls": r.waiting, "clusters": clusters, "rssKiB": r.rss_kib, "openFiles": r.open_files,
                "redisClients": r.redis_clients, "intakePerSecond": r.intake.rps().round(),
                "intakeVsNone": ((r.intake.rps() / base) * 1000.0).round() / 1000.0})
        })
        .collect();
    println!("\nJSON {}", json!({"polls": json}));
}
