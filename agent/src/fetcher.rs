//! Scheduler → local queue. Long-polls for this cluster's jobs, pushes each into the local
//! Redis, and acknowledges exactly the ones that landed; the rest are given back (nack), so a
//! failed transfer leaves the job on the master queue where HA can still move it.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use sd_protocol::AgentReport;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::local::LocalQueue;
use crate::scheduler_client::{ClientError, SchedulerClient};
use crate::status::Status;

pub struct Fetcher {
    pub client: SchedulerClient,
    pub local: LocalQueue,
    pub executor: Arc<Executor>,
    pub status: Arc<Status>,
    pub wait: Duration,
    pub max_jobs: u32,
    pub max_in_flight: u32,
    /// Rung when a build ends, so a full agent resumes polling at once.
    pub capacity: Arc<Notify>,
    /// Who this agent is, sent with every poll; the counts are filled in each time.
    pub report: AgentReport,
}

impl Fetcher {
    /// Runs until `stop` is cancelled. A transfer in progress (push + ack) is always finished
    /// before returning, so a drain never strands a delivered job between the two Redis.
    pub async fn run(self, stop: CancellationToken) {
        let mut acks = JoinSet::new();
        self.fetch_until(&stop, &mut acks).await;
        while acks.join_next().await.is_some() {}
    }

    /// The poll loop. The ack of one poll's jobs goes out while the next poll waits (they are
    /// on the local queue already, and the scheduler delivers only what is not leased), with
    /// at most [`ACKS_AT_ONCE`] outstanding.
    async fn fetch_until(&self, stop: &CancellationToken, acks: &mut JoinSet<()>) {
        let mut backoff = new_backoff();
        // The first poll returns at once, so readiness is known right after start.
        let mut wait = Duration::ZERO;
        while !stop.is_cancelled() {
            while acks.len() >= ACKS_AT_ONCE {
                acks.join_next().await;
            }
            let (busy, room) = match self.load().await {
                Ok((_, 0)) => {
                    self.status.set_at_capacity(true);
                    tokio::select! {
                        () = self.capacity.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
                Ok(load) => {
                    self.status.set_at_capacity(false);
                    load
                }
                Err(e) => {
                    self.status.redis_failed(&e.to_string());
                    tracing::warn!(error = %e, "local Redis unavailable; not polling");
                    if pause(&mut backoff, None, stop).await {
                        return;
                    }
                    continue;
                }
            };
            let report = AgentReport {
                in_flight: busy,
                capacity: self.max_in_flight,
                ..self.report.clone()
            };
            let polled = tokio::select! {
                r = self.client.poll(wait, room.min(self.max_jobs), &report) => r,
                () = stop.cancelled() => return,
            };
            match polled {
                Ok(deliveries) => {
                    self.status.scheduler_ok();
                    wait = self.wait;
                    backoff = new_backoff();
                    if !deliveries.is_empty() {
                        let (landed, failed) = self.transfer(deliveries).await;
                        acks.spawn(settle(self.client.clone(), landed, failed));
                    }
                }
                Err(e) => {
                    let hint = match &e {
                        ClientError::Refused { .. } => {
                            " — check cluster.name, the key registered with the scheduler, and this host's clock"
                        }
                        _ => "",
                    };
                    tracing::warn!(error = %e, "poll failed{hint}");
                    self.status.scheduler_failed(&format!("{e}{hint}"));
                    metrics::counter!("sd_agent_scheduler_errors_total").increment(1);
                    if pause(&mut backoff, e.retry_after(), stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// How many jobs this agent holds (taken, launched and not ended), and how many more it
    /// may take now.
    async fn load(&self) -> Result<(u32, u32), crate::local::LocalError> {
        let pending = self.local.pending().await?;
        let busy = pending.saturating_add(self.executor.in_flight() as u64);
        metrics::gauge!("sd_agent_local_pending").set(pending as f64);
        let room = u64::from(self.max_in_flight).saturating_sub(busy);
        Ok((
            u32::try_from(busy).unwrap_or(u32::MAX),
            u32::try_from(room).unwrap_or(0),
        ))
    }

    /// Pushes each delivered job to the local queue: which landed (to ack) and which did not
    /// (to give back).
    async fn transfer(&self, deliveries: Vec<sd_protocol::Delivery>) -> (Vec<String>, Vec<String>) {
        let mut landed = Vec::new();
        let mut failed = Vec::new();
        for delivery in deliveries {
            metrics::counter!("sd_agent_jobs_fetched_total").increment(1);
            let message = sd_protocol::QueueMessage {
                received_at: Some(sd_protocol::queue::unix_ms()),
                ..delivery.message
            };
            match self.local.push(&message).await {
                Ok(()) => landed.push(delivery.delivery_id),
                Err(e) => {
                    tracing::warn!(delivery = %delivery.delivery_id, error = %e, "local push failed; giving the job back");
                    self.status.redis_failed(&e.to_string());
                    failed.push(delivery.delivery_id);
                }
            }
        }
        (landed, failed)
    }
}

/// Acks at once: one poll's ack may still be on its way while the next poll waits.
const ACKS_AT_ONCE: usize = 2;

/// Acknowledges the jobs that landed on the local queue and gives back the rest.
async fn settle(client: SchedulerClient, landed: Vec<String>, failed: Vec<String>) {
    if !landed.is_empty() {
        // Retried a few times: an ack lost here only means the scheduler redelivers after
        // the lease, and the idempotent push makes that harmless.
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=4 {
            match client.ack(&landed).await {
                Ok(report) => {
                    metrics::counter!("sd_agent_jobs_acked_total")
                        .increment(report.done.len() as u64);
                    if !report.stale.is_empty() {
                        tracing::info!(
                            stale = report.stale.len(),
                            "acks for leases that were already redelivered"
                        );
                    }
                    break;
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(error = %e, attempt, "ack failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ack failed; the scheduler will redeliver after the lease")
                }
            }
        }
    }
    if !failed.is_empty()
        && let Err(e) = client
            .nack(&failed, "the agent could not write to its local Redis")
            .await
    {
        tracing::warn!(error = %e, "nack failed; the lease will lapse instead");
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The longest `Retry-After` obeyed: a misconfigured proxy must not park the agent for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long to wait: the scheduler's `Retry-After` (capped, and spread by up to a quarter so
/// agents told the same value do not come back together), else the next back-off step, which
/// always advances so failures keep escalating. `spread` is in `0.0..1.0`.
fn delay(step: Option<Duration>, retry_after: Option<Duration>, spread: f64) -> Duration {
    let step = step.unwrap_or(Duration::from_secs(30));
    match retry_after {
        Some(asked) => asked.min(MAX_RETRY_AFTER).mul_f64(1.0 + spread / 4.0),
        None => step,
    }
}

/// Sleeps the next back-off step (or what the scheduler asked for); `true` when stopping.
async fn pause(
    backoff: &mut impl Iterator<Item = Duration>,
    retry_after: Option<Duration>,
    stop: &CancellationToken,
) -> bool {
    let delay = delay(backoff.next(), retry_after, rand::random::<f64>());
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_and_spread() {
        let step = Some(Duration::from_millis(200));
        assert_eq!(
            delay(step, Some(Duration::from_secs(10)), 0.0),
            Duration::from_secs(10)
        );
        assert_eq!(
            delay(step, Some(Duration::from_secs(10)), 0.999).as_millis(),
            12_497
        );
        assert_eq!(
            delay(step, Some(Duration::from_secs(86_400)), 0.0),
            MAX_RETRY_AFTER
        );
        assert_eq!(delay(step, None, 0.5), Duration::from_millis(200));
        assert_eq!(delay(None, None, 0.5), Duration::from_secs(30));
    }

    #[test]
    fn backoff_grows_with_jitter_to_its_cap_and_never_ends() {
        let steps: Vec<Duration> = new_backoff().take(40).collect();
        assert_eq!(steps.len(), 40);
        assert!(steps[0] >= Duration::from_millis(200) && steps[0] < Duration::from_millis(400));
        assert!(steps.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(steps[20..].iter().all(|d| *d >= Duration::from_secs(30)));
    }
}
