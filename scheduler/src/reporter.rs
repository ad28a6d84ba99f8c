//! Status reports to the Screwdriver API: `PUT {apiUri}/v4/builds/{id}` with the build's own
//! token, for builds the scheduler ends or holds itself (dead-lettered, collapsed, blocked).
//! Each report runs in its own task with jittered exponential back-off, so a slow API never
//! delays a long-poll.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sd_protocol::QueueMessage;
use serde_json::{Value, json};

/// Where and as whom to report about one build.
#[derive(Debug, Clone)]
pub struct ReportTarget {
    pub build_id: u64,
    pub api_uri: String,
    pub token: String,
}

impl ReportTarget {
    /// Taken from a queued start message; `None` for stops or messages without a token.
    pub fn from_message(raw: &str) -> Option<Self> {
        let msg: QueueMessage = serde_json::from_str(raw).ok()?;
        let cfg = &msg.build_config;
        Some(Self {
            build_id: cfg.get("buildId")?.as_u64()?,
            api_uri: cfg
                .get("apiUri")?
                .as_str()?
                .trim_end_matches('/')
                .to_owned(),
            token: cfg.get("token")?.as_str()?.to_owned(),
        })
    }
}

#[derive(Clone)]
pub struct Reporter {
    http: reqwest::Client,
    attempts: u32,
}

impl Reporter {
    pub fn new(timeout: Duration, attempts: u32) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("sd-scheduler/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self { http, attempts }
    }

    /// Sends `{status, statusMessage}` in the background, retrying failures.
    pub fn report(&self, target: ReportTarget, status: &'static str, message: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let body = json!({"status": status, "statusMessage": message});
            let send = || this.send(&target, &body);
            let result = send
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(10))
                        .with_max_times(this.attempts.saturating_sub(1) as usize)
                        .with_jitter(),
                )
                .when(|e: &ReportError| e.retryable)
                .await;
            match result {
                Ok(()) => {
                    metrics::counter!("sd_scheduler_status_reports_total", "status" => status, "result" => "ok").increment(1);
                    tracing::info!(
                        build_id = target.build_id,
                        status,
                        "status reported to Screwdriver"
                    );
                }
                Err(e) => {
                    metrics::counter!("sd_scheduler_status_reports_total", "status" => status, "result" => "failed").increment(1);
                    tracing::error!(build_id = target.build_id, status, error = %e.message, "could not report status to Screwdriver");
                }
            }
        });
    }

    async fn send(&self, target: &ReportTarget, body: &Value) -> Result<(), ReportError> {
        let url = format!("{}/v4/builds/{}", target.api_uri, target.build_id);
        let resp = self
            .http
            .put(&url)
            .bearer_auth(&target.token)
            .json(body)
            .send()
            .await
            .map_err(|e| ReportError {
                retryable: true,
                message: e.without_url().to_string(),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        Err(ReportError {
            // 4xx other than throttling will not improve by retrying.
            retryable: status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408,
            message: format!("{url} answered {status}"),
        })
    }
}

#[derive(Debug)]
struct ReportError {
    retryable: bool,
    message: String,
}
