//! Executor events → the scheduler (`running` / `finished` / `failed`) and, for failures the
//! launcher could not report itself, FAILURE to the Screwdriver API with the build's token.
//! Each report is retried with back-off in its own task; the build's record is dropped once
//! its end is reported.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Notify, mpsc};

use crate::executor::{BuildEvent, BuildStatus};
use crate::local::LocalQueue;
use crate::scheduler_client::SchedulerClient;

pub struct Watcher {
    pub client: SchedulerClient,
    pub local: LocalQueue,
    pub http: reqwest::Client,
    /// Rung when a build ends: the fetcher may have room again.
    pub capacity: Arc<Notify>,
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(20))
        .with_max_times(8)
        .with_jitter()
}

impl Watcher {
    pub async fn run(self, mut events: mpsc::UnboundedReceiver<BuildEvent>) {
        let this = Arc::new(self);
        while let Some(event) = events.recv().await {
            let this = Arc::clone(&this);
            tokio::spawn(async move { this.handle(event).await });
        }
    }

    async fn handle(&self, event: BuildEvent) {
        let build_id = event.build_id;
        let (name, message, failure) = match &event.status {
            BuildStatus::Running => ("running", None, None),
            BuildStatus::Finished => ("finished", None, None),
            BuildStatus::Failed { reason, report } => (
                "failed",
                Some(reason.as_str()),
                report.then_some(reason.as_str()),
            ),
        };
        if event.status != BuildStatus::Running {
            self.capacity.notify_one();
            metrics::counter!("sd_agent_builds_ended_total", "result" => name).increment(1);
        }
        let sent = (|| self.client.event(build_id, name, message))
            .retry(retry_policy())
            .when(|e| !matches!(e, crate::scheduler_client::ClientError::Rejected { .. }))
            .notify(|e, after| tracing::warn!(build_id, event = name, error = %e, retry_in = ?after, "build event not accepted yet"))
            .await;
        match sent {
            Ok(()) => tracing::info!(build_id, event = name, "build event reported"),
            Err(e) => {
                tracing::warn!(build_id, event = name, error = %e, "could not report the build event")
            }
        }
        // After the scheduler heard of it: a slow Screwdriver API must not hold back blockedBy.
        if let Some(reason) = failure {
            self.report_failure(build_id, reason).await;
        }
        if event.status != BuildStatus::Running
            && let Err(e) = self.local.forget(build_id).await
        {
            tracing::warn!(build_id, error = %e, "could not drop the build's record");
        }
    }

    /// `PUT {apiUri}/v4/builds/{id}` `{status: FAILURE, statusMessage}` with the build's token.
    async fn report_failure(&self, build_id: u64, reason: &str) {
        let record = match self.local.recall(build_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!(
                    build_id,
                    "no record of where to report this build's failure"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(build_id, error = %e, "cannot read the build's record");
                return;
            }
        };
        let Some(token) = record.token else {
            tracing::warn!(
                build_id,
                "the build carries no token; cannot report its failure"
            );
            return;
        };
        let url = format!(
            "{}/v4/builds/{build_id}",
            record.api_uri.trim_end_matches('/')
        );
        let body = serde_json::json!({"status": "FAILURE", "statusMessage": reason});
        let send = || async {
            let r = self
                .http
                .put(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .map_err(|e| (true, e.without_url().to_string()))?;
            let status = r.status();
            if status.is_success() {
                Ok(())
            } else {
                Err((
                    status.is_server_error() || status.as_u16() == 429,
                    format!("answered {status}"),
                ))
            }
        };
        match send
            .retry(retry_policy())
            .when(|(retryable, _)| *retryable)
            .await
        {
            Ok(()) => {
                metrics::counter!("sd_agent_failures_reported_total").increment(1);
                tracing::info!(build_id, "FAILURE reported to Screwdriver");
            }
            Err((_, e)) => {
                tracing::error!(build_id, error = %e, "could not report FAILURE to Screwdriver")
            }
        }
    }
}
