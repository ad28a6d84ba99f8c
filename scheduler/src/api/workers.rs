//! `/v1/jobs/{buildCluster}…`: the endpoints cluster agents call, each behind the cluster's JWT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use sd_protocol::workers::{AckBody, LeaseReport, NackBody};
pub use sd_protocol::workers::{EventBody, Jobs};
use sd_protocol::{AgentReport, ErrorBody};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, JsonObject, bearer, doc, unavailable};
use crate::AppState;
use crate::builds::BuildState;
use crate::cluster_auth::ClusterAuthError;
use crate::workers::WorkerError;

/// A request authenticated as the cluster named in its path.
pub struct ClusterCaller(pub String);

impl FromRequestParts<Arc<AppState>> for ClusterCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        let cluster = params.get("cluster").cloned().unwrap_or_default();
        // Checked before it reaches a log line, a metric or a lookup; echoed only escaped.
        if let Err(e) = sd_protocol::check_cluster_name(&cluster) {
            tracing::debug!(cluster = ?cluster, "refused a worker call for an impossible cluster name");
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no build cluster can be named so ({})", e.reason),
            ));
        }
        let result = match bearer(&parts.headers) {
            None => Err(ClusterAuthError::Missing),
            Some(token) => {
                let snapshot = state.cache.snapshot();
                let records: Vec<_> = snapshot
                    .iter()
                    .filter(|c| c.fields.name == cluster)
                    .collect();
                state
                    .cluster_verifier
                    .verify(&state.env, &cluster, &records, token)
            }
        };
        match result {
            Ok(_) => Ok(ClusterCaller(cluster)),
            Err(e) => {
                let (status, label) = match &e {
                    ClusterAuthError::Missing | ClusterAuthError::Invalid { .. } => {
                        (StatusCode::UNAUTHORIZED, "invalid")
                    }
                    ClusterAuthError::WrongCluster { .. } => {
                        (StatusCode::FORBIDDEN, "wrong_cluster")
                    }
                    ClusterAuthError::UnknownCluster(_) => {
                        (StatusCode::NOT_FOUND, "unknown_cluster")
                    }
                    ClusterAuthError::Misconfigured { .. } => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "misconfigured")
                    }
                };
                // The reason, never the token; the configuration's details for the operator only.
                tracing::warn!(cluster = %cluster, error = %e, "refused cluster worker");
                metrics::counter!("sd_scheduler_worker_auth_refused_total", "reason" => label)
                    .increment(1);
                let message = match e {
                    ClusterAuthError::Misconfigured { cluster, .. } => format!(
                        "the scheduler cannot verify tokens of build cluster {cluster}: its registration names key variables this replica cannot use (the operator finds why in the scheduler's log)"
                    ),
                    other => other.to_string(),
                };
                Err(ApiError::new(status, message))
            }
        }
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::UnknownBuild(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            WorkerError::NotYours { .. } => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
            WorkerError::Db(ref inner) => unavailable("database", inner),
            WorkerError::Queue(ref inner) => unavailable("queue (Redis)", inner),
            WorkerError::DeadLetter(inner) => inner.into(),
        }
    }
}

/// How long a poll turned away for a cap is told to wait: long enough for waiting polls to
/// answer, short enough that builds do not wait on it.
const POLL_RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PollQuery {
    /// Seconds to wait when no job is ready (0–`queue.max_wait`, default 30).
    #[param(value_type = u64, required = false, minimum = 0, maximum = 300)]
    wait: Option<String>,
    /// Most jobs to return (1–100, default 10).
    #[param(value_type = u64, required = false, minimum = 1, maximum = 100)]
    max: Option<String>,
}

/// Long-poll: leases up to `max` ready jobs of the cluster, waiting up to `wait` seconds for
/// one. Not bounded by `http.max_in_flight`/`http.request_timeout` (it waits by design); its
/// bounds are `queue.max_polls_per_cluster` and `queue.max_polls_per_token`.
#[utoipa::path(get, path = "/v1/jobs/{cluster}", tag = "workers", params(("cluster" = String, Path), PollQuery,
        ("sd-agent-instance" = Option<String>, Header, description = "The agent's report of itself, kept for the operator's view: this run's id (1 to 128 of letters, digits, `.-_:`). Without it the poll works as from an older agent, shown as unknown; with it, the version, executor, in-flight and capacity headers are required."),
        ("sd-agent-host" = Option<String>, Header, description = "The machine or pod the agent runs on (as the instance)."),
        ("sd-agent-version" = Option<String>, Header, description = "The agent's version (1 to 64 of letters, digits, `.+-_`)."),
        ("sd-agent-executor" = Option<String>, Header, description = "`kubernetes` or `process`."),
        ("sd-agent-in-flight" = Option<u32>, Header, description = "Builds the agent holds now."),
        ("sd-agent-capacity" = Option<u32>, Header, description = "Most builds it holds at once.")),
    responses(
        (status = 200, body = Jobs, description = "The jobs leased (none when `wait` ran out)."),
        (status = 400, body = ErrorBody, description = "The path or the query cannot be read (invalid percent-encoding, a parameter given twice)."),
        (status = 401, body = ErrorBody, description = doc::CLUSTER_UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token is another cluster's."),
        (status = 404, body = ErrorBody, description = doc::CLUSTER_NOT_FOUND),
        (status = 422, body = ErrorBody, description = "`wait` is not an integer from 0 to `queue.max_wait` (seconds), or `max` not one from 1 to 100; or the agent's report of itself (`sd-agent-*` headers) is incomplete or breaks a rule (the message names the header)."),
        (status = 429, body = ErrorBody, description = "Too many long-polls of this cluster or of this token wait on this replica (`queue.max_polls_per_cluster`, `queue.max_polls_per_token`); `Retry-After` says when to come back.",
            headers(("Retry-After" = u32, description = "Seconds to wait before polling again."))),
        (status = 500, body = ErrorBody, description = doc::CLUSTER_MISCONFIGURED),
        (status = 503, body = ErrorBody, description = "The scheduler's Redis or database is unavailable; retry."),
    ))]
pub async fn poll(
    State(state): State<Arc<AppState>>,
    ClusterCaller(cluster): ClusterCaller,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<PollQuery>,
) -> Result<Json<Jobs>, ApiError> {
    let wait = bounded(
        "wait",
        query.wait.as_deref(),
        30,
        0,
        state.max_wait.as_secs(),
    )?;
    let max = bounded("max", query.max.as_deref(), 10, 1, 100)?;
    let report = AgentReport::from_headers(|name| headers.get(name)?.to_str().ok())?;
    // Held until the poll answers: the place of one waiting poll.
    let _slot = state
        .poll_limits
        .enter(&cluster, bearer(&headers).unwrap_or_default())
        .map_err(|refused| {
            metrics::counter!("sd_scheduler_polls_refused_total", "cap" => refused.label())
                .increment(1);
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, refused.to_string())
                .retry_after(POLL_RETRY_AFTER_SECS)
        })?;
    let jobs = state
        .workers
        .poll(
            &cluster,
            report.as_ref(),
            Duration::from_secs(wait),
            u32::try_from(max).unwrap_or(100),
            &state.shutdown,
        )
        .await?;
    Ok(Json(Jobs { jobs }))
}

fn bounded(
    name: &str,
    value: Option<&str>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let Some(text) = value else {
        return Ok(default);
    };
    text.parse::<u64>()
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{name}: must be an integer from {min} to {max}"),
            )
        })
}

/// Acknowledges deliveries: these transfers succeeded.
#[utoipa::path(post, path = "/v1/jobs/{cluster}/ack", tag = "workers", params(("cluster" = String, Path)),
    request_body = AckBody,
    responses(
        (status = 200, body = LeaseReport, description = "Which ids were the current lease (`done`) and which not (`stale`)."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::CLUSTER_UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token is another cluster's."),
        (status = 404, body = ErrorBody, description = doc::CLUSTER_NOT_FOUND),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "The body breaks a rule of `AckBody` (the message names the field)."),
        (status = 500, body = ErrorBody, description = doc::CLUSTER_MISCONFIGURED),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
pub async fn ack(
    State(state): State<Arc<AppState>>,
    ClusterCaller(cluster): ClusterCaller,
    JsonObject(body): JsonObject,
) -> Result<Json<LeaseReport>, ApiError> {
    let body = AckBody::from_json(body)?;
    Ok(Json(state.workers.ack(&cluster, &body.delivery_ids).await?))
}

/// Gives leases back now (redelivered after a back-off).
#[utoipa::path(post, path = "/v1/jobs/{cluster}/nack", tag = "workers", params(("cluster" = String, Path)),
    request_body = NackBody,
    responses(
        (status = 200, body = LeaseReport, description = "Which ids were the current lease (`done`) and which not (`stale`)."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::CLUSTER_UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token is another cluster's."),
        (status = 404, body = ErrorBody, description = doc::CLUSTER_NOT_FOUND),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "The body breaks a rule of `NackBody` (the message names the field)."),
        (status = 500, body = ErrorBody, description = doc::CLUSTER_MISCONFIGURED),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
pub async fn nack(
    State(state): State<Arc<AppState>>,
    ClusterCaller(cluster): ClusterCaller,
    JsonObject(body): JsonObject,
) -> Result<Json<LeaseReport>, ApiError> {
    let body = NackBody::from_json(body)?;
    Ok(Json(
        state
            .workers
            .nack(&cluster, &body.delivery_ids, &body.reason)
            .await?,
    ))
}

/// Extends leases by the visibility timeout.
#[utoipa::path(post, path = "/v1/jobs/{cluster}/renew", tag = "workers", params(("cluster" = String, Path)),
    request_body = AckBody,
    responses(
        (status = 200, body = LeaseReport, description = "Which ids were the current lease (`done`) and which not (`stale`)."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::CLUSTER_UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token is another cluster's."),
        (status = 404, body = ErrorBody, description = doc::CLUSTER_NOT_FOUND),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "The body breaks a rule of `AckBody` (the message names the field)."),
        (status = 500, body = ErrorBody, description = doc::CLUSTER_MISCONFIGURED),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
pub async fn renew(
    State(state): State<Arc<AppState>>,
    ClusterCaller(cluster): ClusterCaller,
    JsonObject(body): JsonObject,
) -> Result<Json<LeaseReport>, ApiError> {
    let body = AckBody::from_json(body)?;
    Ok(Json(
        state.workers.renew(&cluster, &body.delivery_ids).await?,
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventAnswer {
    build_id: u64,
    state: BuildState,
}

/// Reports a build's lifecycle event: running, finished, failed, stopped.
#[utoipa::path(post, path = "/v1/jobs/{cluster}/events", tag = "workers", params(("cluster" = String, Path)), request_body = EventBody,
    responses(
        (status = 200, body = EventAnswer, description = "The build's state after the event."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::CLUSTER_UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token is another cluster's, or the build is assigned to another cluster."),
        (status = 404, body = ErrorBody, description = "No cluster of this name is registered (or can be named so), or no build of this `buildId` is known."),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "The body breaks a rule of `EventBody` (the message names the field)."),
        (status = 500, body = ErrorBody, description = doc::CLUSTER_MISCONFIGURED),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    ClusterCaller(cluster): ClusterCaller,
    JsonObject(body): JsonObject,
) -> Result<Json<EventAnswer>, ApiError> {
    let event = EventBody::from_json(body)?;
    let state_now = state
        .workers
        .event(
            &cluster,
            event.build_id,
            event.event,
            event.status_message.as_deref(),
        )
        .await?;
    Ok(Json(EventAnswer {
        build_id: event.build_id,
        state: state_now,
    }))
}
