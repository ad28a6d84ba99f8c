//! Status reports to the Screwdriver API: `PUT {apiUri}/v4/builds/{id}` with the build's own
//! token, for builds the scheduler ends or holds itself (dead-lettered, collapsed, blocked),
//! and notes that change only the `statusMessage` of a build Screwdriver still shows QUEUED.
//!
//! A report is kept in Redis before it is sent (`{sd}:reports`, HASH `<buildId>:<STATUS>` →
//! [`Pending`]; `{sd}:reports:due`, ZSET → when it may be sent), so a replica that dies with
//! reports unsent leaves them to the others. Any replica's sender claims due reports with a
//! lease, sends each once per round, and reschedules failures with a doubling back-off until
//! `screwdriver.report_attempts` rounds failed. A slow API never delays a long-poll.
use std::time::Duration;

use std::sync::Arc;

use sd_protocol::QueueMessage;
use sd_queue::Connection;
use sd_queue::DueSet;
use sd_screwdriver::{BuildTarget, BuildUpdates, UpdateError};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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

impl ReportTarget {
    /// Taken from a start message as intake stores it; `None` without a token.
    pub fn from_start(msg: &sd_protocol::StartMessage) -> Option<Self> {
        Some(Self {
            build_id: msg.build_id,
            api_uri: msg.api_uri.trim_end_matches('/').to_owned(),
            token: msg.token.clone()?,
        })
    }
}

const REPORTS_KEY: &str = "{sd}:reports";
const DUE_KEY: &str = "{sd}:reports:due";
const CLAIM_BATCH: usize = 50;

/// A report waiting to be sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pending {
    build_id: u64,
    api_uri: String,
    token: String,
    /// Empty for a note: the message alone, the status left as it is.
    status: String,
    message: String,
    #[serde(default)]
    attempts: u32,
}

impl Pending {
    fn field(&self) -> String {
        format!("{}:{}", self.build_id, self.label())
    }

    /// The status sent, or `NOTE` for a note (in logs, metrics and the Redis field).
    fn label(&self) -> &str {
        if self.status.is_empty() {
            "NOTE"
        } else {
            &self.status
        }
    }

    /// A note leaves `status` out: Screwdriver then changes the message alone, whatever the
    /// build's status (a QUEUED → QUEUED update is refused once the build was BLOCKED).
    fn body(&self) -> Value {
        if self.status.is_empty() {
            json!({"statusMessage": self.message})
        } else {
            json!({"status": self.status, "statusMessage": self.message})
        }
    }

    fn target(&self) -> ReportTarget {
        ReportTarget {
            build_id: self.build_id,
            api_uri: self.api_uri.clone(),
            token: self.token.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Reporter {
    updates: BuildUpdates,
    attempts: u32,
    timeout: Duration,
    redis: Connection,
    /// `{sd}:reports` claimed through `{sd}:reports:due`.
    reports: DueSet,
    /// Rung when a report is kept, so it goes out at once.
    kick: Arc<Notify>,
}

impl Reporter {
    /// Sends through `updates` (the allowed APIs, no redirects), each try within `timeout`.
    pub fn new(updates: BuildUpdates, timeout: Duration, attempts: u32, redis: Connection) -> Self {
        Self {
            updates,
            attempts,
            timeout,
            redis,
            reports: DueSet::new(REPORTS_KEY, DUE_KEY),
            kick: Arc::new(Notify::new()),
        }
    }

    /// Keeps `{status, statusMessage}` for the build in Redis; the sender delivers it. When
    /// Redis cannot take it, it is sent from here, once, rather than not at all.
    pub async fn report(&self, target: ReportTarget, status: &'static str, message: String) {
        self.keep(Pending {
            build_id: target.build_id,
            api_uri: target.api_uri,
            token: target.token,
            status: status.to_owned(),
            message,
            attempts: 0,
        })
        .await;
    }

    /// Changes only the build's `statusMessage` (see [`Pending::body`]), kept and sent like a
    /// report.
    pub async fn note(&self, target: ReportTarget, message: String) {
        self.keep(Pending {
            build_id: target.build_id,
            api_uri: target.api_uri,
            token: target.token,
            status: String::new(),
            message,
            attempts: 0,
        })
        .await;
    }

    async fn keep(&self, pending: Pending) {
        let status = pending.label().to_owned();
        match self.store(&pending, Duration::ZERO).await {
            Ok(()) => self.kick.notify_one(),
            Err(e) => {
                tracing::warn!(build_id = pending.build_id, status, error = %e, "cannot keep the status report; sending it directly");
                let this = self.clone();
                tokio::spawn(async move { this.deliver(pending).await });
            }
        }
    }

    /// Sends due reports until `shutdown`; reports in flight then are finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        // Longer than one send, so a report is never sent twice at once.
        let lease = self.timeout + Duration::from_secs(5);
        let mut sending = JoinSet::new();
        loop {
            tokio::select! {
                () = self.kick.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = shutdown.cancelled() => break,
            }
            while sending.try_join_next().is_some() {}
            match self.claim_due(lease).await {
                Ok(due) => {
                    for pending in due {
                        let this = self.clone();
                        sending.spawn(async move { this.deliver(pending).await });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read pending status reports"),
            }
        }
        while sending.join_next().await.is_some() {}
    }

    /// One round for one report: sent (dropped from Redis), rescheduled, or given up.
    async fn deliver(&self, mut pending: Pending) {
        let body = pending.body();
        let status = pending.label().to_owned();
        let result = self.send(&pending.target(), &body).await;
        pending.attempts += 1;
        let outcome = match &result {
            Ok(()) => "ok",
            Err(e) if e.retryable && pending.attempts < self.attempts => {
                let delay = Duration::from_secs(1u64 << pending.attempts.min(6));
                tracing::warn!(build_id = pending.build_id, status, error = %e.message, attempt = pending.attempts, retry_in = ?delay, "status report not accepted yet");
                if let Err(e) = self.store(&pending, delay).await {
                    tracing::warn!(build_id = pending.build_id, error = %e, "cannot reschedule the status report; its claim will lapse instead");
                }
                return;
            }
            Err(_) => "failed",
        };
        metrics::counter!("sd_scheduler_status_reports_total", "status" => status.clone(), "result" => outcome).increment(1);
        match result {
            Ok(()) => tracing::info!(
                build_id = pending.build_id,
                status,
                "status reported to Screwdriver"
            ),
            Err(e) => {
                tracing::error!(build_id = pending.build_id, status, attempts = pending.attempts, error = %e.message, "could not report status to Screwdriver; giving up")
            }
        }
        if let Err(e) = self.forget(&pending).await {
            tracing::warn!(build_id = pending.build_id, error = %e, "status report done but still kept; it may be sent again");
        }
    }

    async fn store(&self, pending: &Pending, delay: Duration) -> Result<(), StoreError> {
        let body = serde_json::to_string(pending)?;
        let mut conn = self.redis.clone();
        self.reports
            .keep(&mut conn, &pending.field(), &body, delay)
            .await?;
        Ok(())
    }

    async fn claim_due(&self, lease: Duration) -> Result<Vec<Pending>, StoreError> {
        let mut conn = self.redis.clone();
        let claimed = self
            .reports
            .claim_json::<Pending>(&mut conn, CLAIM_BATCH, lease)
            .await?;
        for (field, e) in claimed.dropped {
            tracing::error!(report = %field, error = %e, "unreadable status report dropped");
        }
        Ok(claimed.items)
    }

    async fn forget(&self, pending: &Pending) -> Result<(), StoreError> {
        let mut conn = self.redis.clone();
        self.reports.forget(&mut conn, &pending.field()).await?;
        Ok(())
    }

    async fn send(&self, target: &ReportTarget, body: &Value) -> Result<(), UpdateError> {
        self.updates.put(&target.into(), body).await
    }
}

impl From<&ReportTarget> for BuildTarget {
    fn from(t: &ReportTarget) -> Self {
        BuildTarget {
            build_id: t.build_id,
            api_uri: t.api_uri.clone(),
            token: t.token.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("Redis: {0}")]
    Redis(#[from] sd_queue::QueueError),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
}
