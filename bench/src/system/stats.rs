//! Figures from samples: percentiles, medians across runs, and what a process uses.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
            samples[i].as_secs_f64() * 1e3
        };
        Self {
            samples: samples.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// The median of `values` (the middle one of three runs).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Resident memory and CPU of a process over a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub rss_mib: f64,
    /// Percent of one core.
    pub cpu_percent: f64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(tick(11) + tick(12))
}

/// CPU seconds (user + system) the process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / USER_HZ)
}

pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

/// Watches `pid` for `window`: its CPU over the window and its resident memory at the end.
pub async fn usage(pid: u32, window: Duration) -> Result<Usage> {
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(window).await;
    let (elapsed, c1) = (t0.elapsed(), cpu_ticks(pid)?);
    Ok(Usage {
        rss_mib: rss_mib(pid)?,
        cpu_percent: (c1 - c0) as f64 / USER_HZ / elapsed.as_secs_f64() * 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let l = Latency::of((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (51.0, 99.0, 100.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_mib(pid).unwrap() > 0.0);
        cpu_ticks(pid).unwrap();
    }
}
