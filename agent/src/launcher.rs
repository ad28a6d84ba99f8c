//! Local queue → executor. Takes jobs with a lease of its own (a crashed replica's work is
//! reclaimed when the lease lapses), launches or stops builds, and settles the local job only
//! once the executor has done its part. Launch is idempotent per buildId, so a job taken again
//! after a crash is never launched twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use sd_protocol::{FieldError, JobKind, QueueMessage};
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

    /// Takes local jobs while fewer than `launch_concurrency` are being handled (a rolling
    /// window: a slow launch holds one slot, not a whole batch), and handles them concurrently,
    /// build by build: a job whose build already has one in hand waits behind it, so a stop
    /// never overtakes its start. Each job is settled by its own `handle`, after the executor
    /// did its part. At `stop`, what was taken is finished.
    async fn launch_until(&self, stop: &CancellationToken) {
        let mut bell = self.local.listen();
        let mut window = Window::default();
        while !stop.is_cancelled() {
            // Armed before looking: a push while we look rings this bell.
            bell.arm();
            // Jobs in hand count against the room before their launch shows in `in_flight`
            // (one already launched is counted twice for a moment: the safe side).
            let busy = self.executor.in_flight() + window.running.len();
            let room = (self.max_in_flight as usize).saturating_sub(busy);
            let free = (self.launch_concurrency as usize).saturating_sub(window.running.len());
            let want = room.min(free);
            let leases = if want == 0 {
                Ok(Vec::new())
            } else {
                self.local.take(u32::try_from(want).unwrap_or(1)).await
            };
            let pause = match leases {
                Ok(leases) if !leases.is_empty() => {
                    for lease in leases {
                        window.admit(lease, |lease| self.handle_for(lease));
                    }
                    continue;
                }
                // Nothing to do (or full): wait for a slot, a push, or re-check shortly.
                Ok(_) => Duration::from_secs(2),
                Err(e) => {
                    tracing::warn!(error = %e, "local queue unavailable");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                Some(build) = window.running.next(), if !window.running.is_empty() => {
                    window.finished(&build, |lease| self.handle_for(lease));
                }
                _ = bell.rung(pause) => {}
                () = stop.cancelled() => break,
            }
        }
        while let Some(build) = window.running.next().await {
            window.finished(&build, |lease| self.handle_for(lease));
        }
    }

    /// [`handle`](Self::handle), answering with the build the job was about.
    fn handle_for(&self, lease: Lease) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let build = build_of(&lease).to_owned();
            self.handle(lease).await;
            build
        })
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
        let build = message.start();
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

/// The build a local job is about: `<id>` for its start, `stop:<id>` for its stop.
fn build_of(lease: &Lease) -> &str {
    lease.id.strip_prefix("stop:").unwrap_or(&lease.id)
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The jobs being handled, at most one per build, and those waiting behind their build's.
#[derive(Default)]
struct Window<'a> {
    running: futures::stream::FuturesUnordered<BoxFuture<'a, String>>,
    /// Builds with a job in hand → their later jobs, in the order taken.
    behind: HashMap<String, VecDeque<Lease>>,
}

impl<'a> Window<'a> {
    /// Starts `lease` now, or queues it behind its build's job in hand.
    fn admit(&mut self, lease: Lease, start: impl FnOnce(Lease) -> BoxFuture<'a, String>) {
        match self.behind.get_mut(build_of(&lease)) {
            Some(queue) => queue.push_back(lease),
            None => {
                self.behind
                    .insert(build_of(&lease).to_owned(), VecDeque::new());
                self.running.push(start(lease));
            }
        }
    }

    /// `build`'s job is done: starts the next one behind it, if any.
    fn finished(&mut self, build: &str, start: impl FnOnce(Lease) -> BoxFuture<'a, String>) {
        match self.behind.get_mut(build).and_then(VecDeque::pop_front) {
            Some(next) => self.running.push(start(next)),
            None => {
                self.behind.remove(build);
            }
        }
    }
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

    #[tokio::test]
    async fn a_builds_later_jobs_wait_behind_the_one_in_hand() {
        let started = std::sync::Mutex::new(Vec::new());
        let start = |lease: Lease| -> BoxFuture<'_, String> {
            started.lock().unwrap().push(lease.id.clone());
            let build = build_of(&lease).to_owned();
            Box::pin(async move { build })
        };
        let mut window = Window::default();
        for id in ["7", "8", "stop:7", "stop:9"] {
            window.admit(lease(id), start);
        }
        assert_eq!(
            *started.lock().unwrap(),
            ["7", "8", "stop:9"],
            "stop:7 waits"
        );
        window.finished("8", start);
        assert_eq!(started.lock().unwrap().len(), 3, "nothing waited behind 8");
        window.finished("7", start);
        assert_eq!(
            started.lock().unwrap().last().map(String::as_str),
            Some("stop:7")
        );
        window.finished("7", start);
        window.finished("9", start);
        assert!(window.behind.is_empty(), "no build left in hand");
    }
}
