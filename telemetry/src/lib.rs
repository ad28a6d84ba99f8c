//! Logs (text or JSON) and the Prometheus recorder, set up the same way in both binaries: the
//! `[log]` section means the same in `scheduler.toml` and `agent.toml`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `sd_agent=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// `level` as `tracing` directives: a level, or `target=level`, comma-separated. Checked
    /// at start-up because the filter parser takes a misspelt level for a target name and then
    /// logs nothing.
    pub fn check_level(&self) -> Result<(), String> {
        use std::str::FromStr;
        use tracing_subscriber::filter::LevelFilter;
        for directive in self.level.split(',').map(str::trim) {
            let level = match directive.rsplit_once('=') {
                Some((target, level)) if !target.is_empty() => level,
                Some(_) => return Err(format!("{directive:?} has no target before '='")),
                None => directive,
            };
            if LevelFilter::from_str(level).is_err() {
                return Err(format!(
                    "{level:?} is not a level (use trace, debug, info, warn, error or off, optionally as target=level)"
                ));
            }
        }
        Ok(())
    }
}

/// Installs the global log subscriber on stderr; `RUST_LOG` overrides `level`.
pub fn init_logging(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Histogram buckets for `*_seconds` metrics: they aggregate across processes, summaries do
/// not.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The process-wide Prometheus recorder, installed on first use (a test process that starts
/// several instances shares it). With `buckets`, `*_seconds` metrics are histograms.
pub fn metrics_handle(buckets: Option<&[f64]>) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = match buckets {
                Some(b) => PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), b)
                    .unwrap_or_else(|_| PrometheusBuilder::new()),
                None => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked() {
        let config = |level: &str| LogConfig {
            level: level.into(),
            ..LogConfig::default()
        };
        for ok in [
            "warn",
            "info,sd_agent=debug",
            "off",
            "sd_agent::fetcher=trace",
        ] {
            assert!(config(ok).check_level().is_ok(), "{ok}");
        }
        for bad in ["inf", "info,hyper=loud", "=debug"] {
            assert!(config(bad).check_level().is_err(), "{bad}");
        }
    }
}
