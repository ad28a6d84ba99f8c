//! What this machine's Redis can do, measured first in the same run: the yardstick the
//! system's figures are divided by.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::stats::Latency;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ceilings {
    /// `redis-benchmark -c 50 -P 1 -t set`: requests/s.
    pub redis_set_per_s: f64,
    /// Same for `lpush`.
    pub redis_lpush_per_s: f64,
    /// One client's `PING` round trip.
    pub redis_rtt: Latency,
}

/// Runs `redis-benchmark` (50 clients, no pipelining) against the server on `port`, then
/// times `pings` round trips of one connection; leaves the server empty.
pub fn measure(port: u16, requests: u64, pings: usize) -> Result<Ceilings> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-P", "1", "-n", &requests.to_string()])
        .args(["-t", "set,lpush", "--csv"])
        .output()
        .context("running redis-benchmark (apt-get install redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let csv = String::from_utf8_lossy(&out.stdout);
    let rps = |test: &str| -> Result<f64> {
        csv.lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            .with_context(|| format!("no {test} line in redis-benchmark's output:\n{csv}"))
    };
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection()?;
    let mut rtts = Vec::with_capacity(pings);
    for _ in 0..pings {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query(&mut conn)?;
        rtts.push(t.elapsed());
    }
    let _: () = redis::cmd("FLUSHALL").query(&mut conn)?;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut conn)?;
    Ok(Ceilings {
        redis_set_per_s: rps("SET")?,
        redis_lpush_per_s: rps("LPUSH")?,
        redis_rtt: Latency::of(rtts),
    })
}
