//! The reporter: build events → the scheduler (`running` / `finished` / `failed`) and, for failures the
//! launcher could not report itself, FAILURE to the Screwdriver API with the build's token.
//!
//! Every event goes through the [`Outbox`] first: it is reported from there, by whichever
//! replica claims it, and stays until both reports went through — an agent killed between
//! seeing a build end and reporting it leaves the report to the next one, and the same end
//! seen by several replicas (or again after a restart) is reported once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Notify, Semaphore, mpsc};

use sd_screwdriver::{BuildTarget, BuildUpdates};

use sd_protocol::Event;

use crate::events::{BuildEvent, BuildStatus};
use crate::local::LocalQueue;
use crate::outbox::{Entry, Outbox, Recorded};
use crate::scheduler_client::{ClientError, SchedulerClient};

/// A claimed entry is left alone by other replicas this long; its reporter extends the claim
/// every sweep while at work, so after a crash the next agent takes over within this.
const CLAIM_LEASE: Duration = Duration::from_secs(30);

/// How soon an entry whose report failed is tried again.
const RETRY_IN: Duration = Duration::from_secs(15);
/// How often entries left by others (or by failed rounds) are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const CLAIM_BATCH: usize = 64;
/// Reports at work at once, and stats updates sent at once. A burst of builds starting (1,000
/// `running` events) must not become 1,000 requests open on the scheduler at the same moment:
/// that fills its `http.max_in_flight` and every other client (intake, polls) is shed.
const REPORTS_AT_ONCE: usize = 32;
/// Report rounds after which the scheduler refusing an event (404/403: it does not know the
/// build, or the build is no longer this cluster's) is taken as final.
const REFUSALS_BEFORE_GIVING_UP: u32 = 20;

/// Build id → the status this agent is reporting for it right now.
type Reporting = Arc<Mutex<HashMap<u64, Event>>>;

pub struct Reporter {
    pub client: SchedulerClient,
    pub local: LocalQueue,
    pub outbox: Outbox,
    /// `PUT {apiUri}/v4/builds/{id}`, to allowed APIs only.
    pub updates: BuildUpdates,
    /// Rung when a build ends: the fetcher may have room again.
    pub capacity: Arc<Notify>,
}

/// Whether one report round is over for an entry.
enum Round {
    Done,
    Again,
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(4)
        .with_jitter()
}

impl Reporter {
    pub async fn run(self, mut events: mpsc::UnboundedReceiver<BuildEvent>) {
        let this = Arc::new(self);
        let reporting: Reporting = Arc::new(Mutex::new(HashMap::new()));
        let stats_slots = Arc::new(Semaphore::new(REPORTS_AT_ONCE));
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        // Rung when a report ends: a newer event of that build may be waiting behind it.
        let finished_one = Arc::new(Notify::new());
        loop {
            tokio::select! {
                () = finished_one.notified() => {}
                event = events.recv() => {
                    let Some(event) = event else { return };
                    this.accept(event, &stats_slots).await;
                    while let Ok(event) = events.try_recv() {
                        this.accept(event, &stats_slots).await;
                    }
                }
                _ = sweep.tick() => {
                    let claims: Vec<(u64, Event)> =
                        lock(&reporting).iter().map(|(id, s)| (*id, *s)).collect();
                    if let Err(e) = this.outbox.extend(&claims, CLAIM_LEASE).await {
                        tracing::debug!(error = %e, "cannot extend the claims of reports at work");
                    }
                    if let Ok(n) = this.outbox.pending().await {
                        metrics::gauge!("sd_agent_events_unreported").set(n as f64);
                    }
                }
            }
            this.drain(&reporting, &finished_one).await;
        }
    }

    async fn accept(self: &Arc<Self>, event: BuildEvent, stats_slots: &Arc<Semaphore>) {
        let build_id = event.build_id;
        if let BuildStatus::Scheduled { node, at } = event.status {
            let this = Arc::clone(self);
            let slots = Arc::clone(stats_slots);
            let stats = serde_json::json!({"stats": {"hostname": node, "imagePullStartTime": at}});
            tokio::spawn(async move {
                // The semaphore is never closed, so the permit always comes.
                let _slot = slots.acquire_owned().await;
                this.send_stats(build_id, stats).await
            });
            return;
        }
        if event.status != BuildStatus::Running {
            self.capacity.notify_one();
            let result = match event.status {
                BuildStatus::Finished => "finished",
                BuildStatus::Stopped => "stopped",
                _ => "failed",
            };
            metrics::counter!("sd_agent_builds_ended_total", "result" => result).increment(1);
        }
        match self.outbox.record(&event).await {
            Ok(Recorded::New | Recorded::NotKept) => {}
            Ok(Recorded::Pending) => {
                tracing::debug!(build_id, "build event already waiting to be reported")
            }
            Ok(Recorded::Reported) => {
                tracing::debug!(build_id, "build event already reported; not again")
            }
            Err(e) => {
                // The local Redis is down: report straight away rather than not at all.
                tracing::warn!(build_id, error = %e, "cannot keep the build event; reporting it directly");
                let this = Arc::clone(self);
                if let Some(entry) = Entry::of(&event) {
                    tokio::spawn(async move { this.report(entry, false).await });
                }
            }
        }
    }

    /// Claims the entries that are due, as many as there is room for at work
    /// ([`REPORTS_AT_ONCE`]), and reports each in its own task; the rest stay unclaimed in the
    /// outbox until a report ends (which rings `finished_one` and drains again).
    async fn drain(self: &Arc<Self>, reporting: &Reporting, finished_one: &Arc<Notify>) {
        let room = REPORTS_AT_ONCE.saturating_sub(lock(reporting).len());
        if room == 0 {
            return;
        }
        let entries = match self.outbox.claim(room.min(CLAIM_BATCH), CLAIM_LEASE).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the build events outbox");
                return;
            }
        };
        for entry in entries {
            let id = entry.build_id;
            let busy = {
                let mut at_work = lock(reporting);
                match at_work.get(&id) {
                    Some(status) => Some(*status),
                    None => {
                        at_work.insert(id, entry.status);
                        None
                    }
                }
            };
            if let Some(status) = busy {
                // Still reporting this build's previous event (an end superseded `running`):
                // hand the claim back; the drain after that report ends takes it.
                if status != entry.status {
                    let _ = self.outbox.update(&entry, Some(Duration::ZERO)).await;
                }
                continue;
            }
            let this = Arc::clone(self);
            let reporting = Arc::clone(reporting);
            let finished_one = Arc::clone(finished_one);
            tokio::spawn(async move {
                this.report(entry, true).await;
                lock(&reporting).remove(&id);
                finished_one.notify_one();
            });
        }
    }

    /// Reports an entry. Kept in the outbox (`durable`), a failed round leaves it there for
    /// later; reporting directly (the local Redis is down), rounds are repeated here.
    async fn report(&self, mut entry: Entry, durable: bool) {
        loop {
            if let Round::Done = self.round(&mut entry, durable).await {
                break;
            }
            entry.attempts += 1;
            if durable {
                if let Err(e) = self.outbox.update(&entry, Some(RETRY_IN)).await {
                    tracing::debug!(build_id = entry.build_id, error = %e, "cannot save the report's progress; its claim will lapse instead");
                }
                return;
            }
            if entry.attempts >= REFUSALS_BEFORE_GIVING_UP {
                tracing::error!(
                    build_id = entry.build_id,
                    "giving up reporting the build event"
                );
                return;
            }
            tokio::time::sleep(RETRY_IN).await;
        }
        let build_id = entry.build_id;
        if durable && let Err(e) = self.outbox.reported(&entry).await {
            tracing::warn!(build_id, error = %e, "build event reported but not marked so; it may be reported again");
        }
        if entry.is_end()
            && let Err(e) = self.local.forget(build_id).await
        {
            tracing::warn!(build_id, error = %e, "could not drop the build's record");
        }
    }

    /// One round: the scheduler first, then Screwdriver; progress is saved so a round that
    /// fails halfway resumes where it stopped.
    async fn round(&self, entry: &mut Entry, durable: bool) -> Round {
        if !entry.scheduler_done {
            if let Round::Again = self.tell_scheduler(entry).await {
                return Round::Again;
            }
            entry.scheduler_done = true;
            if entry.report && durable {
                let _ = self.outbox.update(entry, None).await;
            }
        }
        match (entry.report, entry.reason.clone()) {
            (true, Some(reason)) => self.report_failure(entry.build_id, &reason).await,
            _ => Round::Done,
        }
    }

    async fn tell_scheduler(&self, entry: &Entry) -> Round {
        let (build_id, event) = (entry.build_id, entry.status.as_str());
        let sent = (|| self.client.event(build_id, entry.status, entry.reason.as_deref()))
            .retry(retry_policy())
            .when(|e| matches!(e, ClientError::Unavailable { .. }))
            .notify(|e, after| tracing::warn!(build_id, event, error = %e, retry_in = ?after, "build event not accepted yet"))
            .await;
        match sent {
            Ok(()) => {
                tracing::info!(build_id, event, "build event reported");
                Round::Done
            }
            Err(e @ ClientError::Rejected { .. }) => {
                tracing::error!(build_id, event, error = %e, "the scheduler rejected the build event; dropping it");
                Round::Done
            }
            Err(
                e @ ClientError::Refused {
                    status: 403 | 404, ..
                },
            ) if entry.attempts + 1 >= REFUSALS_BEFORE_GIVING_UP => {
                tracing::error!(build_id, event, attempts = entry.attempts + 1, error = %e, "the scheduler keeps refusing the build event; dropping it");
                Round::Done
            }
            Err(e) => {
                metrics::counter!("sd_agent_scheduler_errors_total").increment(1);
                tracing::warn!(build_id, event, error = %e, retry_in = ?RETRY_IN, "could not report the build event; will try again");
                Round::Again
            }
        }
    }

    /// `PUT {apiUri}/v4/builds/{id}` `{status: FAILURE, statusMessage}` with the build's token.
    async fn report_failure(&self, build_id: u64, reason: &str) -> Round {
        let body = serde_json::json!({"status": "FAILURE", "statusMessage": reason});
        match self.put_build(build_id, &body).await {
            Ok(()) => {
                metrics::counter!("sd_agent_failures_reported_total").increment(1);
                tracing::info!(build_id, "FAILURE reported to Screwdriver");
                Round::Done
            }
            Err(Put::Later(e)) => {
                tracing::warn!(build_id, error = %e, retry_in = ?RETRY_IN, "could not report FAILURE to Screwdriver yet");
                Round::Again
            }
            Err(Put::Never(e)) => {
                // The scheduler still hears the failure (`failed` event); Screwdriver cannot.
                tracing::error!(build_id, %reason, error = %e, "cannot report FAILURE to Screwdriver; dropping it");
                Round::Done
            }
        }
    }

    /// The build's node and image pull start, as Screwdriver's executor sends them once the pod
    /// is placed. Informational: a few tries, then given up.
    async fn send_stats(&self, build_id: u64, stats: serde_json::Value) {
        match self.put_build(build_id, &stats).await {
            Ok(()) => tracing::debug!(build_id, "build stats sent to Screwdriver"),
            Err(Put::Later(e) | Put::Never(e)) => {
                tracing::info!(build_id, error = %e, "build stats not sent to Screwdriver")
            }
        }
    }

    /// `PUT {apiUri}/v4/builds/{id}` with `body` and the build's own token (from its local
    /// record), retried a few times on outages.
    async fn put_build(&self, build_id: u64, body: &serde_json::Value) -> Result<(), Put> {
        let record = match self.local.recall(build_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(Put::Never(
                    "no record of where to report this build to Screwdriver".into(),
                ));
            }
            Err(e) => return Err(Put::Later(format!("cannot read the build's record: {e}"))),
        };
        let Some(token) = record.token else {
            return Err(Put::Never("the build carries no token".into()));
        };
        let target = BuildTarget {
            build_id,
            api_uri: record.api_uri,
            token,
        };
        let send = || async {
            self.updates.put(&target, body).await.map_err(|e| {
                if e.retryable {
                    Put::Later(e.message)
                } else {
                    Put::Never(e.message)
                }
            })
        };
        send.retry(retry_policy())
            .when(|e| matches!(e, Put::Later(_)))
            .await
    }
}

/// Why a `PUT /v4/builds/{id}` did not go through: worth another round later, or not.
enum Put {
    Later(String),
    Never(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
