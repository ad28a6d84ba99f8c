//! Local queue → executor. Takes jobs with a lease of its own (a crashed replica's work is
//! reclaimed when the lease lapses), launches or stops builds, and settles the local job only
//! once the executor has done its part. Launch is idempotent per buildId, so a job taken again
//! after a crash is never launched twice.

use std::sync::Arc;
use std::time::Duration;

use sd_protocol::{FieldError, JobKind, QueueMessage, StartMessage};
use sd_queue::{Cancelled, Lease};
use sd_screwdriver::ApiUris;
use tokio_util::sync::CancellationToken;

use crate::executor::{BuildEvent, BuildStatus, Executor, Launched};
use crate::local::LocalQueue;
use crate::outbox::EventSink;

pub struct Launcher {
    pub local: LocalQueue,
    pub executor: Arc<Executor>,
    /// Where the launcher's own events go (a build it cannot start, one it stopped).
    pub events: EventSink,
    pub max_in_flight: u32,
    /// Jobs handled at once (`executor.launch_concurrency`).
    pub launch_concurrency: u32,
    /// Silence after which another agent's local jobs are taken over (`executor.takeover_after`).
    pub takeover_after: Duration,
    /// The Screwdriver APIs a build may name: its token goes to its `apiUri`.
    pub apis: ApiUris,
}

impl Launcher {
    /// Launches local jobs until `stop`; meanwhile holds the local doorbell's subscription and
    /// beats (taking over the jobs of agents that stopped beating).
    pub async fn run(self, stop: CancellationToken) {
        let relay = self.local.relay_doorbell(stop.clone().cancelled_owned());
        let alive = self.local.keep_alive(self.takeover_after, stop.clone());
        tokio::join!(relay, alive, self.launch_until(&stop));
    }

    async fn launch_until(&self, stop: &CancellationToken) {
        let mut bell = self.local.listen();
        while !stop.is_cancelled() {
            // Armed before looking: a push while we look rings this bell.
            bell.arm();
            let room = (self.max_in_flight as usize).saturating_sub(self.executor.in_flight());
            let batch = room.min(self.launch_concurrency as usize);
            let leases = if batch == 0 {
                Ok(Vec::new())
            } else {
                self.local.take(u32::try_from(batch).unwrap_or(1)).await
            };
            match leases {
                Ok(leases) if !leases.is_empty() => self.handle_all(leases).await,
                Ok(_) => {
                    // Nothing to do (or full): wait for a push, or re-check shortly.
                    tokio::select! {
                        _ = bell.rung(Duration::from_secs(2)) => {}
                        () = stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "local queue unavailable");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Handles a batch concurrently, build by build: the jobs of one build (its start, its
    /// stop) run one after the other in the order taken, so a stop never overtakes its start;
    /// different builds run at once. Each job is settled by its own `handle`, after the
    /// executor did its part.
    async fn handle_all(&self, leases: Vec<Lease>) {
        use futures::StreamExt;
        futures::stream::iter(by_build(leases))
            .for_each_concurrent(self.launch_concurrency as usize, |jobs| async move {
                for lease in jobs {
                    self.handle(lease).await;
                }
            })
            .await;
    }

    async fn handle(&self, lease: Lease) {
        let message: QueueMessage = match serde_json::from_str(&lease.message) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(id = %lease.id, error = %e, "undecodable local message dropped");
                let _ = self.local.done(&lease).await;
                return;
            }
        };
        let settled = match message.job {
            JobKind::Start => self.start(&message).await,
            JobKind::Stop => self.stop(&message, lease.attempt).await,
        };
        let result = if settled {
            self.local.done(&lease).await.map(|_| ())
        } else {
            self.local.retry(&lease).await
        };
        if let Err(e) = result {
            tracing::warn!(id = %lease.id, error = %e, "could not settle the local job; its lease will lapse and it is retried");
        }
    }

    /// `true` when the job is settled (launched, already running, or refused for good).
    async fn start(&self, message: &QueueMessage) -> bool {
        let build = match &message.build_config {
            serde_json::Value::Object(map) => StartMessage::from_json(map.clone()),
            _ => Err(FieldError::new("buildConfig", "must be a JSON object")),
        };
        // Checked before the build is recorded or launched: the launcher would send its token
        // to this address, and so would a FAILURE report.
        let build = build.and_then(|b| match self.apis.check(&b.api_uri) {
            Ok(_) => Ok(b),
            Err(e) => Err(FieldError::new("apiUri", e.to_string())),
        });
        let build = match build {
            Ok(b) => b,
            Err(e) => return self.refuse(message, &e.to_string()).await,
        };
        if let Err(e) = self.local.remember(&build).await {
            tracing::warn!(build_id = build.build_id, error = %e, "cannot record the build; retrying");
            return false;
        }
        match self.executor.launch(&build).await {
            Ok(Launched::Created) => {
                metrics::counter!("sd_agent_builds_launched_total").increment(1);
                let now = sd_protocol::queue::unix_ms();
                if let Some(at) = message.received_at {
                    metrics::histogram!("sd_agent_queue_wait_seconds")
                        .record(now.saturating_sub(at) as f64 / 1000.0);
                }
                if let Some(at) = message.queued_at {
                    // Across two hosts' clocks: keep them in sync (NTP) for this to mean much.
                    metrics::histogram!("sd_agent_start_latency_seconds")
                        .record(now.saturating_sub(at) as f64 / 1000.0);
                }
                tracing::info!(build_id = build.build_id, "build launched");
                true
            }
            Ok(Launched::AlreadyRunning) => {
                tracing::info!(
                    build_id = build.build_id,
                    "build already launched; not launching again"
                );
                true
            }
            Err(why) if !why.is_permanent() => {
                metrics::counter!("sd_agent_executor_errors_total").increment(1);
                tracing::warn!(build_id = build.build_id, error = %why, "launch failed; will retry");
                false
            }
            Err(why) => {
                metrics::counter!("sd_agent_builds_failed_total").increment(1);
                tracing::warn!(build_id = build.build_id, error = %why, "build cannot be launched");
                let event = BuildEvent {
                    build_id: build.build_id,
                    status: BuildStatus::Failed {
                        reason: format!("Build could not be started: {why}"),
                        report: true,
                    },
                };
                // Settled only once the failure is kept for reporting; else tried again.
                self.keep_and_send(event).await
            }
        }
    }

    /// A start message that cannot be used (the scheduler validated it, so the local Redis or
    /// a mismatched scheduler version changed it, or it names an API this agent does not
    /// allow): the build fails with the reason rather than vanishing. The scheduler hears it;
    /// Screwdriver too, where the build's own fields say, when that is an allowed API.
    /// Without a build id nothing can be said.
    async fn refuse(&self, message: &QueueMessage, why: &str) -> bool {
        let config = &message.build_config;
        let Some(build_id) = config.get("buildId").and_then(serde_json::Value::as_u64) else {
            tracing::error!(error = %why, "start message without a build id; dropped");
            return true;
        };
        tracing::error!(build_id, error = %why, "start message is not usable");
        metrics::counter!("sd_agent_builds_failed_total").increment(1);
        let text = |key: &str| config.get(key).and_then(serde_json::Value::as_str);
        let allowed_api = text("apiUri").filter(|uri| self.apis.check(uri).is_ok());
        if let Some(api_uri) = allowed_api {
            let record = crate::local::BuildRecord {
                job_id: config
                    .get("jobId")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                api_uri: api_uri.to_owned(),
                token: text("token").map(str::to_owned),
            };
            if let Err(e) = self.local.remember_record(build_id, &record).await {
                tracing::warn!(build_id, error = %e, "cannot record the build; retrying");
                return false;
            }
        }
        self.keep_and_send(BuildEvent {
            build_id,
            status: BuildStatus::Failed {
                reason: format!("Build could not be started: its queue message is invalid: {why}"),
                report: allowed_api.is_some(),
            },
        })
        .await
    }

    /// Keeps an event the launcher itself produced (its job is about to be settled, so nothing
    /// else would bring it back), then hands it to the reporter.
    async fn keep_and_send(&self, event: BuildEvent) -> bool {
        self.events.record(event).await
    }

    async fn stop(&self, message: &QueueMessage, attempt: u32) -> bool {
        let Some(build_id) = message
            .build_config
            .get("buildId")
            .and_then(serde_json::Value::as_u64)
        else {
            return true;
        };
        let cancelled = self.local.cancel(build_id).await;
        match cancelled {
            Ok(Cancelled::Removed) => {
                tracing::info!(build_id, "stopped before launch");
                self.keep_and_send(BuildEvent {
                    build_id,
                    status: BuildStatus::Stopped,
                })
                .await;
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(build_id, error = %e, "local queue unavailable for a stop; retrying");
                return false;
            }
        }
        match self.executor.stop(build_id).await {
            // Its start is being launched right now (leased here or by another replica): try
            // again shortly so the stop lands once the build exists.
            Ok(false) if matches!(cancelled, Ok(Cancelled::Leased)) && attempt < 10 => false,
            Ok(found) => {
                tracing::info!(build_id, found, "stop handled");
                true
            }
            Err(e) => {
                tracing::warn!(build_id, error = %e, "stop failed; retrying");
                false
            }
        }
    }
}

/// Leases grouped by the build they are about (`<id>` and `stop:<id>` together), groups and
/// the jobs within each in the order taken.
fn by_build(leases: Vec<Lease>) -> Vec<Vec<Lease>> {
    let mut groups: Vec<Vec<Lease>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for lease in leases {
        let build = lease
            .id
            .strip_prefix("stop:")
            .unwrap_or(&lease.id)
            .to_owned();
        match index.get(&build) {
            Some(&i) => groups[i].push(lease),
            None => {
                index.insert(build, groups.len());
                groups.push(vec![lease]);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str) -> Lease {
        Lease {
            id: id.to_owned(),
            token: "1".into(),
            attempt: 1,
            message: String::new(),
        }
    }

    #[test]
    fn a_builds_start_and_stop_stay_together_and_in_order() {
        let ids = |groups: Vec<Vec<Lease>>| -> Vec<Vec<String>> {
            groups
                .into_iter()
                .map(|g| g.into_iter().map(|l| l.id).collect())
                .collect()
        };
        let taken = ["7", "8", "stop:7", "stop:9", "10", "stop:8"].map(lease);
        assert_eq!(
            ids(by_build(taken.to_vec())),
            [
                vec!["7", "stop:7"],
                vec!["8", "stop:8"],
                vec!["stop:9"],
                vec!["10"]
            ]
        );
    }
}
