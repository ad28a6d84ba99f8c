//! Build intake: route, record, enqueue. Also re-routes held builds and stops builds.
//!
//! Order of writes, and why: the database row first (the source of truth), then the queue.
//! If the queue write fails the caller gets 503 and Screwdriver's client retries; the retry
//! finds the row and re-runs the idempotent enqueue, so no accepted build is left behind.

use std::sync::Arc;

use sd_protocol::{FieldError, JobKind, QueueMessage, StartMessage, StopRequest};
use serde_json::Value;

use crate::auth::LauncherTokens;
use crate::builds::{BuildRow, BuildState, Builds};
use crate::db::DbError;
use crate::queue::{Cancelled, Enqueued, QueueError, Queues};
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
    Mint(#[from] jsonwebtoken::errors::Error),
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

pub struct Intake {
    cache: ClusterCache,
    builds: Builds,
    queues: Queues,
    tokens: Option<LauncherTokens>,
}

impl Intake {
    pub fn new(
        cache: ClusterCache,
        builds: Builds,
        queues: Queues,
        tokens: Option<LauncherTokens>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cache,
            builds,
            queues,
            tokens,
        })
    }

    /// Accepts a build: idempotent per `buildId`.
    pub async fn start(&self, msg: StartMessage) -> Result<Accepted, IntakeError> {
        if let Some(row) = self.builds.get(msg.build_id).await? {
            return self.repeat(row).await;
        }
        if msg.token.is_none() && self.tokens.is_none() {
            return Err(IntakeError::NoTokenKey);
        }
        let decision = self.route(&msg)?;
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
            // Another request for the same build won the race.
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
            self.enqueue(cluster, &msg).await?;
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
        // Cluster health (heartbeats) is not tracked yet: every registered cluster counts as
        // healthy until the worker protocol reports otherwise.
        routing::route(&self.cache.snapshot(), |_| true, &facts, &mut rand::rng())
    }

    async fn enqueue(&self, cluster: &str, msg: &StartMessage) -> Result<(), IntakeError> {
        let mut with_token = msg.clone();
        if with_token.token.is_none() {
            let tokens = self.tokens.as_ref().ok_or(IntakeError::NoTokenKey)?;
            with_token.token = Some(tokens.mint(msg)?);
        }
        let message = QueueMessage {
            job: JobKind::Start,
            build_config: serde_json::to_value(&with_token)
                .map_err(|e| FieldError::new("body", e.to_string()))?,
        };
        match self
            .queues
            .enqueue(cluster, msg.build_id, msg.job_id, &message)
            .await?
        {
            Enqueued::Queued | Enqueued::AlreadyQueued | Enqueued::AlreadyDelivered => Ok(()),
            Enqueued::QueuedElsewhere(other) => {
                // The exclusivity check in the script held; record where the build really is.
                tracing::error!(build_id = msg.build_id, wanted = cluster, queued_on = %other, "build already queued on another cluster");
                Ok(())
            }
        }
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
            (state, _) => Ok(stopped(state, "none")),
        }
    }

    async fn queue_stop(&self, cluster: &str, req: &StopRequest) -> Result<(), IntakeError> {
        let message = QueueMessage {
            job: JobKind::Stop,
            build_config: serde_json::to_value(req)
                .map_err(|e| FieldError::new("body", e.to_string()))?,
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

    pub fn builds(&self) -> &Builds {
        &self.builds
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
