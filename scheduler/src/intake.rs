//! Build intake and every later write that moves a build between queue and row: start, stop,
//! routing held builds, re-routing waiting builds off clusters that cannot take them
//! ([`Intake::rebalance`], in `rebalance.rs`) and re-queueing what Redis lost
//! ([`Intake::reconcile`], in `reconcile.rs`).
//!
//! Order of writes, and why: the database row first (the source of truth), then the queue.
//! If the queue write fails the caller gets 503 and Screwdriver's client retries; the retry
//! finds the row and re-runs the idempotent enqueue, so no accepted build is left behind. The
//! background passes that repair rows and queues live here too, so one module decides that
//! order.

mod rebalance;
mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use sd_protocol::{FieldError, JobKind, QueueMessage, StartMessage, StopRequest};
use sd_screwdriver::ApiUris;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::LauncherTokens;
use crate::builds::{BuildRow, BuildState, Builds};
use crate::db::DbError;
use crate::ha::Health;
use crate::queue::{Cancelled, Enqueued, Holds, QueueError, Queues};
use crate::registry::ClusterCache;
use crate::routing::{self, BuildFacts, Decision, RouteError};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(
        "the request carries no build token and the scheduler has no auth.private_key_file to mint one"
    )]
    NoTokenKey,
    #[error("could not mint the launcher token: {0}")]
    Mint(#[from] crate::auth::MintError),
    #[error("no build {0} is known to the scheduler")]
    UnknownBuild(u64),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// The outcome of a start request.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub build_id: u64,
    /// The chosen cluster; `null` while the build is held as unroutable.
    pub build_cluster_name: Option<String>,
    pub state: BuildState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `false` when this repeated an earlier request for the same build.
    #[serde(skip)]
    pub created: bool,
}

/// The outcome of a stop request.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stopped {
    pub build_id: u64,
    pub state: BuildState,
    /// What was done: `removed` (taken off a queue), `stop queued` (the cluster will stop it),
    /// or `none` (the build had already ended).
    pub action: &'static str,
}

/// Accepts, stops and repairs builds. Shared (`Arc`) by the API handlers and the background
/// passes, so every write to a build's row and queue goes through the same order.
pub struct Intake {
    cache: ClusterCache,
    builds: Builds,
    queues: Queues,
    health: Arc<Health>,
    tokens: Option<LauncherTokens>,
    /// The Screwdriver APIs a build may name as `apiUri` (its token goes there).
    apis: ApiUris,
}

impl Intake {
    pub fn new(
        cache: ClusterCache,
        builds: Builds,
        queues: Queues,
        health: Arc<Health>,
        tokens: Option<LauncherTokens>,
        apis: ApiUris,
    ) -> Arc<Self> {
        Arc::new(Self {
            cache,
            builds,
            queues,
            health,
            tokens,
            apis,
        })
    }

    /// Accepts a build: idempotent per `buildId`. An `apiUri` that is not an allowed API is
    /// refused before anything is read or written. A new build costs one write and no read:
    /// a repeat is found by the insert itself (or, when this attempt could not be routed or
    /// signed, by looking before refusing), and answered with what was decided the first time.
    pub async fn start(&self, msg: StartMessage) -> Result<Accepted, IntakeError> {
        self.apis
            .check(&msg.api_uri)
            .map_err(|e| FieldError::new("apiUri", e.to_string()))?;
        let routed = if msg.token.is_none() && self.tokens.is_none() {
            Err(IntakeError::NoTokenKey)
        } else {
            self.route(&msg).map_err(IntakeError::from)
        };
        let decision = match routed {
            Ok(decision) => decision,
            Err(refusal) => {
                return match self.builds.get(msg.build_id).await? {
                    Some(row) => self.repeat(row).await,
                    None => Err(refusal),
                };
            }
        };
        let (state, cluster, reason) = match &decision {
            Decision::Cluster(name) => (BuildState::Queued, Some(name.clone()), None),
            Decision::Hold(reason) => (BuildState::Unroutable, None, Some(reason.clone())),
        };
        let mut stored = msg.clone();
        let body_token = stored.token.take();
        let row = BuildRow {
            build_id: msg.build_id,
            job_id: msg.job_id,
            pipeline_id: msg.pipeline_id(),
            scm_context: msg.pipeline.scm_context.clone(),
            organization: msg.organization().to_owned(),
            cluster: cluster.clone(),
            state,
            reason: reason.clone(),
            message: serde_json::to_string(&stored)
                .map_err(|e| FieldError::new("body", e.to_string()))?,
            body_token,
            created_at: 0,
            updated_at: 0,
        };
        if !self.builds.insert(&row).await? {
            // A repeat, or another request for the same build won the race.
            let existing = self.builds.get(msg.build_id).await?;
            return match existing {
                Some(row) => self.repeat(row).await,
                None => Err(IntakeError::UnknownBuild(msg.build_id)),
            };
        }
        match &cluster {
            Some(name) => {
                self.enqueue(name, &msg).await?;
                metrics::counter!("sd_scheduler_builds_routed_total", "cluster" => name.clone())
                    .increment(1);
                tracing::info!(build_id = msg.build_id, cluster = %name, "build queued");
            }
            None => {
                metrics::counter!("sd_scheduler_builds_held_total").increment(1);
                tracing::warn!(
                    build_id = msg.build_id,
                    reason = reason.as_deref().unwrap_or(""),
                    "build held as unroutable"
                );
            }
        }
        Ok(Accepted {
            build_id: msg.build_id,
            build_cluster_name: cluster,
            state,
            reason,
            created: true,
        })
    }

    /// A repeated start: report what was decided, and make sure a queued build is on its queue
    /// (the first attempt may have failed after the row was written).
    async fn repeat(&self, row: BuildRow) -> Result<Accepted, IntakeError> {
        if let (BuildState::Queued, Some(cluster)) = (row.state, row.cluster.as_deref()) {
            let msg = stored_message(&row)?;
            self.enqueue_with(cluster, &msg, false).await?;
        }
        Ok(Accepted {
            build_id: row.build_id,
            build_cluster_name: row.cluster,
            state: row.state,
            reason: row.reason,
            created: false,
        })
    }

    fn route(&self, msg: &StartMessage) -> Result<Decision, RouteError> {
        let facts = BuildFacts {
            scm_context: &msg.pipeline.scm_context,
            organization: msg.organization(),
            requested: msg.requested_cluster(),
        };
        routing::route(
            &self.cache.snapshot(),
            |name| self.health.is_healthy(name),
            &facts,
            &mut rand::rng(),
        )
    }

    /// Routes a stored build again (HA re-routing, held builds).
    fn route_stored(&self, row: &BuildRow) -> Result<Decision, IntakeError> {
        Ok(self.route(&stored_message(row)?)?)
    }

    async fn enqueue(&self, cluster: &str, msg: &StartMessage) -> Result<(), IntakeError> {
        self.enqueue_with(cluster, msg, false).await.map(|_| ())
    }

    async fn enqueue_with(
        &self,
        cluster: &str,
        msg: &StartMessage,
        force: bool,
    ) -> Result<Enqueued, IntakeError> {
        let with_token = self.with_token(msg.clone())?;
        let message = QueueMessage {
            job: JobKind::Start,
            build_config: serde_json::to_value(&with_token)
                .map_err(|e| FieldError::new("body", e.to_string()))?,
            queued_at: Some(sd_protocol::queue::unix_ms()),
            received_at: None,
        };
        let outcome = self
            .queues
            .enqueue(
                cluster,
                msg.build_id,
                msg.job_id,
                &message,
                &holds_for(msg),
                force,
            )
            .await?;
        if let Enqueued::QueuedElsewhere(other) = &outcome {
            // The exclusivity check in the script held; the row will follow (see Intake::rebalance).
            tracing::warn!(build_id = msg.build_id, wanted = cluster, queued_on = %other, "build already queued on another cluster");
        }
        Ok(outcome)
    }

    /// `msg` with a token: its own, else a launcher token minted now.
    fn with_token(&self, mut msg: StartMessage) -> Result<StartMessage, IntakeError> {
        if msg.token.is_none() {
            let tokens = self.tokens.as_ref().ok_or(IntakeError::NoTokenKey)?;
            msg.token = Some(tokens.mint(&msg)?);
        }
        Ok(msg)
    }

    /// A stored build's start message as an agent would get it, token included: what a status
    /// report about it is sent with.
    pub(crate) fn launch_message(&self, row: &BuildRow) -> Result<StartMessage, IntakeError> {
        self.with_token(stored_message(row)?)
    }

    /// Queues a stored build again on its cluster (reconciler, dead-letter requeue). `force`
    /// re-queues one that was delivered before; the agent's own de-duplication by buildId
    /// keeps it from running twice.
    pub(crate) async fn requeue(
        &self,
        row: &BuildRow,
        force: bool,
    ) -> Result<Option<Enqueued>, IntakeError> {
        let Some(cluster) = row.cluster.as_deref() else {
            return Ok(None);
        };
        let msg = stored_message(row)?;
        Ok(Some(self.enqueue_with(cluster, &msg, force).await?))
    }

    /// Routes held builds that have become routable; returns how many left the holding state.
    pub async fn route_held(&self) -> Result<usize, IntakeError> {
        let mut routed = 0;
        for row in self.builds.in_state(BuildState::Unroutable, 500).await? {
            let msg = stored_message(&row)?;
            match self.route(&msg) {
                Ok(Decision::Cluster(cluster)) => {
                    let claimed = self
                        .builds
                        .transition(
                            row.build_id,
                            BuildState::Unroutable,
                            BuildState::Queued,
                            Some(&cluster),
                            None,
                        )
                        .await?;
                    if !claimed {
                        continue; // another replica routed it
                    }
                    if let Err(e) = self.enqueue(&cluster, &msg).await {
                        // Give it back so the next pass retries.
                        self.builds
                            .transition(
                                row.build_id,
                                BuildState::Queued,
                                BuildState::Unroutable,
                                None,
                                Some(&e.to_string()),
                            )
                            .await?;
                        return Err(e);
                    }
                    tracing::info!(build_id = row.build_id, cluster = %cluster, "held build routed");
                    metrics::counter!("sd_scheduler_builds_routed_total", "cluster" => cluster)
                        .increment(1);
                    routed += 1;
                }
                Ok(Decision::Hold(reason)) => {
                    if row.reason.as_deref() != Some(reason.as_str()) {
                        self.builds.set_reason(row.build_id, &reason).await?;
                    }
                }
                Err(refused) => {
                    let reason = refused.to_string();
                    if row.reason.as_deref() != Some(reason.as_str()) {
                        self.builds.set_reason(row.build_id, &reason).await?;
                    }
                }
            }
        }
        Ok(routed)
    }

    /// Stops a build: off its queue if still waiting, else a `stop` for its cluster.
    pub async fn stop(&self, req: StopRequest) -> Result<Stopped, IntakeError> {
        let row = self
            .builds
            .get(req.build_id)
            .await?
            .ok_or(IntakeError::UnknownBuild(req.build_id))?;
        let stopped = |state, action| Stopped {
            build_id: row.build_id,
            state,
            action,
        };
        match (row.state, row.cluster.as_deref()) {
            (BuildState::Unroutable, _) | (BuildState::Queued, None) => {
                self.builds
                    .transition(
                        row.build_id,
                        row.state,
                        BuildState::Stopped,
                        None,
                        Some("stopped on request"),
                    )
                    .await?;
                Ok(stopped(BuildState::Stopped, "removed"))
            }
            (BuildState::Queued, Some(cluster)) => {
                match self.queues.cancel(cluster, row.build_id).await? {
                    Cancelled::Removed => {
                        self.builds
                            .transition(
                                row.build_id,
                                BuildState::Queued,
                                BuildState::Stopped,
                                Some(cluster),
                                Some("stopped on request"),
                            )
                            .await?;
                        Ok(stopped(BuildState::Stopped, "removed"))
                    }
                    Cancelled::Leased | Cancelled::Absent => {
                        self.queue_stop(cluster, &req).await?;
                        Ok(stopped(row.state, "stop queued"))
                    }
                }
            }
            (BuildState::Dispatched | BuildState::Running, Some(cluster)) => {
                self.queue_stop(cluster, &req).await?;
                Ok(stopped(row.state, "stop queued"))
            }
            // Held as a dead letter: it must never be requeued now.
            (BuildState::Dead, Some(cluster)) => {
                if self
                    .builds
                    .transition_keep_cluster(
                        row.build_id,
                        BuildState::Dead,
                        BuildState::Stopped,
                        "stopped on request while held as a dead letter",
                    )
                    .await?
                {
                    self.queues
                        .forget_dead(cluster, &row.build_id.to_string())
                        .await?;
                    return Ok(stopped(BuildState::Stopped, "removed"));
                }
                // Requeued or failed meanwhile: stop it as what it is now.
                Box::pin(self.stop(req)).await
            }
            (state, _) => Ok(stopped(state, "none")),
        }
    }

    async fn queue_stop(&self, cluster: &str, req: &StopRequest) -> Result<(), IntakeError> {
        let message = QueueMessage {
            job: JobKind::Stop,
            build_config: serde_json::to_value(req)
                .map_err(|e| FieldError::new("body", e.to_string()))?,
            queued_at: Some(sd_protocol::queue::unix_ms()),
            received_at: None,
        };
        self.queues
            .enqueue_stop(cluster, req.build_id, &message)
            .await?;
        self.builds
            .set_reason(req.build_id, "stop requested")
            .await?;
        tracing::info!(build_id = req.build_id, cluster, "stop queued");
        Ok(())
    }

    /// The builds table, for callers that only read it (tests, counts).
    pub fn builds(&self) -> &Builds {
        &self.builds
    }

    /// The background pass: moves waiting builds off clusters that cannot take them, then
    /// routes held builds, whenever `wake` rings (the registry or cluster health changed) and
    /// every `every` as a safety net, until `shutdown`. A failed pass is logged and retried at
    /// the next wake-up; a compare-and-set on each row lets one replica win.
    pub async fn run(
        self: Arc<Self>,
        wake: Arc<Notify>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            match self.rebalance().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(moved = n, "builds re-routed"),
                Err(e) => tracing::warn!(error = %e, "re-routing failed; will retry"),
            }
            match self.route_held().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(routed = n, "held builds routed"),
                Err(e) => tracing::warn!(error = %e, "routing held builds failed; will retry"),
            }
        }
    }
}

/// Annotation controlling whether builds of the same job block each other (default true).
pub const ANNOTATION_BLOCKED_BY_SAME_JOB: &str = "screwdriver.cd/blockedBySameJob";
/// Minutes between re-checks of a build blocked only by its own job.
pub const ANNOTATION_SAME_JOB_WAIT: &str = "screwdriver.cd/blockedBySameJobWaitTime";
/// Annotation controlling collapse of older waiting builds (default true).
pub const ANNOTATION_COLLAPSE: &str = "screwdriver.cd/collapseBuilds";

/// How a build waits for others, from its `blockedBy` and annotations.
pub fn holds_for(msg: &StartMessage) -> Holds {
    let flag = |key: &str| match msg.annotations.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) => s.parse::<bool>().ok(),
        _ => None,
    };
    let mut blockers = msg.blocked_by.clone();
    if flag(ANNOTATION_BLOCKED_BY_SAME_JOB).unwrap_or(true) {
        blockers.push(msg.job_id);
    } else {
        blockers.retain(|j| *j != msg.job_id);
    }
    blockers.sort_unstable();
    blockers.dedup();
    let minutes = match msg.annotations.get(ANNOTATION_SAME_JOB_WAIT) {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse::<f64>().ok(),
        _ => None,
    };
    let same_job_wait = minutes
        .filter(|m| m.is_finite() && *m > 0.0)
        .map_or(std::time::Duration::ZERO, |m| {
            std::time::Duration::from_secs_f64((m * 60.0).min(86_400.0))
        });
    Holds {
        blockers,
        collapse: flag(ANNOTATION_COLLAPSE).unwrap_or(true),
        same_job_wait,
    }
}

/// The stored payload of a build, with the token it arrived with (if any).
fn stored_message(row: &BuildRow) -> Result<StartMessage, IntakeError> {
    let value: Value = serde_json::from_str(&row.message)
        .map_err(|e| FieldError::new("builds.message", e.to_string()))?;
    let mut msg: StartMessage = sd_protocol::error::from_value(value)?;
    msg.token.clone_from(&row.body_token);
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(annotations: Value, blocked_by: Value) -> StartMessage {
        let v = json!({
            "buildId": 1, "jobId": 10, "pipeline": {"id": 1, "name": "o/r", "scmContext": "github:github.com"},
            "apiUri": "https://api", "container": "c", "annotations": annotations, "blockedBy": blocked_by,
        });
        let Value::Object(m) = v else { unreachable!() };
        StartMessage::from_json(m).unwrap()
    }

    #[test]
    fn builds_block_on_their_own_job_by_default() {
        let h = holds_for(&msg(json!({}), json!([20])));
        assert_eq!(h.blockers, vec![10, 20]);
        assert!(h.collapse);
        assert_eq!(h.same_job_wait, std::time::Duration::ZERO);
    }

    #[test]
    fn annotations_turn_off_same_job_blocking_and_collapse() {
        let h = holds_for(&msg(
            json!({"screwdriver.cd/blockedBySameJob": false, "screwdriver.cd/collapseBuilds": "false",
                   "screwdriver.cd/blockedBySameJobWaitTime": 2}),
            json!([10, 20]),
        ));
        assert_eq!(h.blockers, vec![20]);
        assert!(!h.collapse);
        assert_eq!(h.same_job_wait, std::time::Duration::from_secs(120));
    }
}
