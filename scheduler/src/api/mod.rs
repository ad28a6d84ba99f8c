//! The HTTP API: routes, extractors and the mapping of every error to a status and a message
//! a person can act on.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sd_protocol::{
    Cluster, ClusterCreate, ClusterPatch, ClusterUpdate, ErrorBody, FieldError, NewCluster,
    StartMessage, StopRequest,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{Caller, Scope, TokenError};
use crate::builds::BuildState;
use crate::dead_letters::{DeadLetterError, LetterId, Resolution, Verb};
use crate::intake::{Accepted, IntakeError, Stopped};
use crate::registry::RegistryError;
use crate::routing::RouteError;
use crate::status::{AllStatus, ClusterStatus, DeadLetters};

pub mod workers;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    let clusters = Router::new()
        .route("/", get(list_clusters).post(create_cluster))
        .route("/status", get(all_status))
        .route("/{name}/status", get(cluster_status))
        .route("/{name}/deadletters", get(dead_letters))
        .route(
            "/{name}/deadletters/{id}/requeue",
            axum::routing::post(requeue_dead_letter),
        )
        .route(
            "/{name}/deadletters/{id}/fail",
            axum::routing::post(fail_dead_letter),
        )
        .route(
            "/{name}",
            get(get_cluster).put(update_cluster).delete(delete_cluster),
        );
    let slots = Bounds {
        slots: Arc::new(tokio::sync::Semaphore::new(state.http.max_in_flight)),
        timeout: state.http.request_timeout,
    };
    Router::new()
        .nest("/v4/buildclusters", clusters.clone())
        // The seed's paths, kept as aliases.
        .nest("/buildClusters", clusters)
        .route(
            "/v1/queue/message",
            axum::routing::post(start_build).delete(stop_build),
        )
        .route("/v1/builds/{build_id}", get(get_build))
        .route("/v1/jobs/{cluster}/ack", axum::routing::post(workers::ack))
        .route(
            "/v1/jobs/{cluster}/nack",
            axum::routing::post(workers::nack),
        )
        .route(
            "/v1/jobs/{cluster}/renew",
            axum::routing::post(workers::renew),
        )
        .route(
            "/v1/jobs/{cluster}/events",
            axum::routing::post(workers::events),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .merge(crate::ui::router())
        // Every route above: a bounded number at once, each for a bounded time. The long-poll
        // (added below) waits by design; its own bounds are the worker protocol's.
        .route_layer(middleware::from_fn_with_state(slots, bounded))
        .route("/v1/jobs/{cluster}", get(workers::poll))
        .route_layer(middleware::from_fn(track))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

// === errors ===

/// The document's descriptions of responses many operations share: when each is answered.
pub(crate) mod doc {
    pub const UNAUTHORIZED: &str = "No usable Screwdriver API token: missing, not a JWT, expired, not yet valid, signed by another key, failing the configured checks (issuer, audience, environment, lifetime), or the scheduler has no API key to check it with.";
    pub const BAD_BODY: &str =
        "The body is not a JSON object (malformed JSON, another JSON value) or could not be read.";
    pub const TOO_LARGE: &str = "The body is larger than 1 MiB.";
    pub const BUSY: &str = "The scheduler is busy (`http.max_in_flight` requests in flight) or the request outlived `http.request_timeout`, with `Retry-After`.";
    pub const BUSY_OR_DOWN: &str = "The scheduler is busy (`http.max_in_flight` requests in flight) or the request outlived `http.request_timeout`, with `Retry-After`; or its database or Redis is unavailable (no `Retry-After`): retry.";
    pub const CLUSTER_UNAUTHORIZED: &str = "No valid token of this cluster: missing, malformed, expired, too long-lived, or not signed by a key its `authKey` variable holds with its sign options' algorithm.";
    pub const CLUSTER_NOT_FOUND: &str =
        "No cluster of this name is registered, or no cluster can be named so.";
    pub const CLUSTER_MISCONFIGURED: &str = "The scheduler cannot verify this cluster's tokens: a variable its record names is missing or unusable on this replica (the operator finds why in the log).";
}

/// An error response: `{"statusCode","error","message"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds a client should wait before trying again (`Retry-After`), for 429 and 503.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Tells the client to come back after `secs` seconds.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            status_code: self.status.as_u16(),
            error: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }
}

impl From<TokenError> for ApiError {
    /// 401: no usable token; 403: a valid token of a caller who may not (a guest), as a
    /// missing scope is answered.
    fn from(e: TokenError) -> Self {
        let status = match e {
            TokenError::Guest => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NameTaken { .. } | RegistryError::AuthKeyTaken { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            other => unavailable("database", &other),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Invalid(f) => f.into(),
            IntakeError::Route(r @ RouteError::OrganizationRefused { .. }) => {
                ApiError::new(StatusCode::FORBIDDEN, r.to_string())
            }
            IntakeError::Route(r @ RouteError::UnknownCluster { .. }) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, r.to_string())
            }
            IntakeError::UnknownBuild(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            IntakeError::NoTokenKey | IntakeError::Mint(_) => {
                tracing::error!(error = %e, "cannot issue launcher token");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            IntakeError::Db(ref inner) => unavailable("database", inner),
            IntakeError::Queue(ref inner) => unavailable("queue (Redis)", inner),
        }
    }
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        match e {
            DeadLetterError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            DeadLetterError::NotHeld(_) | DeadLetterError::TokenExpiring { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            DeadLetterError::Intake(inner) => inner.into(),
            DeadLetterError::Db(ref inner) => unavailable("database", inner),
            DeadLetterError::Queue(ref inner) => unavailable("queue (Redis)", inner),
        }
    }
}

/// A dependency failed: 503, so Screwdriver's client retries.
pub(crate) fn unavailable(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what} unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the scheduler's {what} is unavailable; retry shortly"),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; GET /openapi.json lists them",
    )
}

// === extractors ===

/// The request body as a JSON object; refuses oversize (413) and malformed (400) bodies.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
            }
        })?;
        sd_protocol::error::parse_object(&bytes)
            .map(JsonObject)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

/// [`Path`], refused as every other error is: an [`ErrorBody`] (400 for a parameter that
/// cannot be read, e.g. invalid percent-encoding), not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|e| ApiError::new(e.status(), e.body_text()))
    }
}

/// [`Query`], refused as every other error is: an [`ErrorBody`] (400 for a query string that
/// cannot be read, e.g. a parameter given twice).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|e| ApiError::new(e.status(), e.body_text()))
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(TokenError::Missing)?;
        let caller = state.verifier.verify(token).inspect_err(|e| {
            tracing::info!(error = %e, path = %parts.uri.path(), "refused API token");
        })?;
        Ok(caller)
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

fn require(caller: &Caller, scopes: &[Scope]) -> Result<(), ApiError> {
    if caller.has_any(scopes) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this call needs a token with scope {}; the token has [{}]",
            Caller::describe(scopes),
            caller.scopes.join(", ")
        ),
    ))
}

// === cluster registry ===

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ClusterQuery {
    /// Optional: when given, the record must be of this SCM context.
    #[param(value_type = String, required = false)]
    scm_context: Option<String>,
}

/// Lists the registered clusters.
///
/// Also served at `/buildClusters`, the seed's path.
#[utoipa::path(get, path = "/v4/buildclusters", tag = "registry",
    responses(
        (status = 200, body = [Cluster], description = "Every registered cluster."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has neither scope `user` nor `admin`, or is a guest's."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn list_clusters(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<Cluster>>, ApiError> {
    require(&caller, &[Scope::User, Scope::Admin])?;
    Ok(Json(state.registry.list().await?))
}

/// Registers a cluster.
///
/// Also served at `/buildClusters`, the seed's path.
#[utoipa::path(post, path = "/v4/buildclusters", tag = "registry", request_body = ClusterCreate,
    responses(
        (status = 201, body = Cluster, description = "Registered."),
        (status = 400, body = ErrorBody, description = doc::BAD_BODY),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has no scope `admin`, or is a guest's."),
        (status = 409, body = ErrorBody, description = "A cluster of this name (or of a name sharing its key variables) exists, or another cluster uses this `authKey`."),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "A field breaks a rule of `ClusterCreate` (the message names it), or a variable it names is not usable on the scheduler."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn create_cluster(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<Cluster>), ApiError> {
    require(&caller, &[Scope::Admin])?;
    let record = NewCluster::from_json(body)?;
    state.cluster_verifier.check_record(&state.env, &record)?;
    let created = state.registry.insert(&record).await?;
    tracing::info!(cluster = %created.fields.name, scm_context = %created.fields.scm_context, by = caller.username.as_deref().unwrap_or("?"), "cluster registered");
    state.registry_changed().await;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The record a name designates (names are unique across scmContexts); `?scmContext=`, when
/// given, must match it.
async fn find_one(state: &AppState, name: &str, query: &ClusterQuery) -> Result<Cluster, ApiError> {
    let found = state.registry.by_name(name).await?.into_iter().find(|c| {
        query
            .scm_context
            .as_ref()
            .is_none_or(|ctx| &c.fields.scm_context == ctx)
    });
    found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            match &query.scm_context {
                Some(ctx) => format!("no build cluster named {name} for scmContext {ctx}"),
                None => format!("no build cluster named {name}"),
            },
        )
    })
}

/// One cluster.
///
/// Also served at `/buildClusters/{name}`, the seed's path.
#[utoipa::path(get, path = "/v4/buildclusters/{name}", tag = "registry", params(("name" = String, Path), ClusterQuery),
    responses(
        (status = 200, body = Cluster, description = "The cluster."),
        (status = 400, body = ErrorBody, description = "The path or the query cannot be read (invalid percent-encoding, `scmContext` given twice)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has neither scope `user` nor `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No cluster of this name (of this `scmContext`, when given)."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn get_cluster(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ClusterQuery>,
) -> Result<Json<Cluster>, ApiError> {
    require(&caller, &[Scope::User, Scope::Admin])?;
    Ok(Json(find_one(&state, &name, &query).await?))
}

/// One cluster as an operator sees it: alive or not and why, its agents, its queue.
///
/// Also served at `/buildClusters/{name}/status`.
#[utoipa::path(get, path = "/v4/buildclusters/{name}/status", tag = "status", params(("name" = String, Path)),
    responses(
        (status = 200, body = ClusterStatus, description = "The cluster's health, agents and queue, read at one instant."),
        (status = 400, body = ErrorBody, description = "The path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has neither scope `user` nor `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No cluster of this name."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn cluster_status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ClusterStatus>, ApiError> {
    require(&caller, &[Scope::User, Scope::Admin])?;
    let (name, is_active) = registered(&state, &name)?;
    let status = ClusterStatus::read(&state.queues, (&name, is_active), state.dead_after)
        .await
        .map_err(|e| unavailable("Redis", &e))?;
    Ok(Json(status))
}

/// A cluster's dead letters: builds given up after `queue.max_attempts` deliveries without an
/// acknowledgement, the latest 100 first.
///
/// Also served at `/buildClusters/{name}/deadletters`.
#[utoipa::path(get, path = "/v4/buildclusters/{name}/deadletters", tag = "status", params(("name" = String, Path)),
    responses(
        (status = 200, body = DeadLetters, description = "The latest dead letters and how many there are."),
        (status = 400, body = ErrorBody, description = "The path cannot be read (invalid percent-encoding)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has neither scope `user` nor `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No cluster of this name."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn dead_letters(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<DeadLetters>, ApiError> {
    require(&caller, &[Scope::User, Scope::Admin])?;
    let (name, _) = registered(&state, &name)?;
    let dead = DeadLetters::read(&state.queues, &name, 100, state.workers.dead_letters.hold())
        .await
        .map_err(|e| unavailable("Redis", &e))?;
    Ok(Json(dead))
}

/// What an operator's requeue or fail of a dead letter did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterAction {
    pub cluster: String,
    /// The queue id: a build id, or `stop:<buildId>`.
    pub id: String,
    pub action: Resolution,
}

/// Puts a held dead letter back on its cluster's queue, its deliveries counted from 1. A start
/// can be requeued while it is held (`queue.dead_letter_hold`); a stop, until it is dropped.
///
/// Also served at `/buildClusters/{name}/deadletters/{id}/requeue`.
#[utoipa::path(post, path = "/v4/buildclusters/{name}/deadletters/{id}/requeue", tag = "status",
    params(("name" = String, Path), ("id" = String, Path, description = "A build id, or `stop:<buildId>`.")),
    responses(
        (status = 200, body = DeadLetterAction, description = "Requeued."),
        (status = 400, body = ErrorBody, description = "The id is neither a build id nor `stop:<buildId>`, or the path cannot be read."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token lacks scope `admin`."),
        (status = 404, body = ErrorBody, description = "No cluster of this name, or no such dead letter on it."),
        (status = 409, body = ErrorBody, description = "The build is no longer held (it was failed and reported FAILURE), or its Screwdriver token expires too soon to run."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn requeue_dead_letter(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<DeadLetterAction>, ApiError> {
    resolve_dead_letter(&state, &caller, &name, id, Verb::Requeue).await
}

/// Fails a held dead letter now and reports FAILURE to Screwdriver; a stop is dropped.
///
/// Also served at `/buildClusters/{name}/deadletters/{id}/fail`.
#[utoipa::path(post, path = "/v4/buildclusters/{name}/deadletters/{id}/fail", tag = "status",
    params(("name" = String, Path), ("id" = String, Path, description = "A build id, or `stop:<buildId>`.")),
    responses(
        (status = 200, body = DeadLetterAction, description = "Failed (a build) or dropped (a stop)."),
        (status = 400, body = ErrorBody, description = "The id is neither a build id nor `stop:<buildId>`, or the path cannot be read."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token lacks scope `admin`."),
        (status = 404, body = ErrorBody, description = "No cluster of this name, or no such dead letter on it."),
        (status = 409, body = ErrorBody, description = "The build is no longer held: it was failed already."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn fail_dead_letter(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<DeadLetterAction>, ApiError> {
    resolve_dead_letter(&state, &caller, &name, id, Verb::Fail).await
}

/// An admin's requeue or fail of a registered cluster's dead letter, its id checked first.
async fn resolve_dead_letter(
    state: &AppState,
    caller: &Caller,
    name: &str,
    id: String,
    verb: Verb,
) -> Result<Json<DeadLetterAction>, ApiError> {
    require(caller, &[Scope::Admin])?;
    let (cluster, letter) = dead_letter_path(state, name, &id)?;
    let action = state
        .workers
        .dead_letters
        .resolve(&cluster, letter, verb)
        .await?;
    tracing::info!(cluster, id = %id, by = caller.username.as_deref().unwrap_or("?"), verb = verb.past(), "dead letter resolved by an operator");
    Ok(Json(DeadLetterAction {
        cluster,
        id,
        action,
    }))
}

/// A registered cluster and a well-formed dead-letter id, from the path.
fn dead_letter_path(
    state: &AppState,
    name: &str,
    id: &str,
) -> Result<(String, LetterId), ApiError> {
    let (cluster, _) = registered(state, name)?;
    let letter = LetterId::parse(id).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "id: must be a build id or stop:<buildId>",
        )
    })?;
    Ok((cluster, letter))
}

fn registered(state: &AppState, name: &str) -> Result<(String, bool), ApiError> {
    state
        .cluster(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no cluster of this name"))
}

/// Every cluster as an operator sees it, in one answer.
///
/// Also served at `/buildClusters/status`.
#[utoipa::path(get, path = "/v4/buildclusters/status", tag = "status",
    responses(
        (status = 200, body = AllStatus, description = "Every registered cluster's health, agents and queue, by name."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has neither scope `user` nor `admin`, or is a guest's."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn all_status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<AllStatus>, ApiError> {
    require(&caller, &[Scope::User, Scope::Admin])?;
    let all = ClusterStatus::read_all(&state.queues, &state.clusters(), state.dead_after)
        .await
        .map_err(|e| unavailable("Redis", &e))?;
    Ok(Json(all))
}

/// Changes some fields of a cluster, e.g. `{"isActive":false}` pauses routing to it.
///
/// Also served at `/buildClusters/{name}`, the seed's path.
#[utoipa::path(put, path = "/v4/buildclusters/{name}", tag = "registry", params(("name" = String, Path), ClusterQuery),
    request_body = ClusterUpdate,
    responses(
        (status = 200, body = Cluster, description = "The cluster after the update."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the path or the query cannot be read (invalid percent-encoding, `scmContext` given twice)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has no scope `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No cluster of this name (of this `scmContext`, when given), or it was deleted meanwhile."),
        (status = 409, body = ErrorBody, description = "The new `authKey` is another cluster's."),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "A field breaks a rule of `ClusterUpdate`, or the record after the update would break one of `ClusterCreate` (the message names the field)."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn update_cluster(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ClusterQuery>,
    JsonObject(body): JsonObject,
) -> Result<Json<Cluster>, ApiError> {
    require(&caller, &[Scope::Admin])?;
    let patch = ClusterPatch::from_json(body)?;
    let current = find_one(&state, &name, &query).await?;
    let next = patch.apply(&current.fields)?;
    // Checked when they change: pausing a cluster whose variable went away must still work.
    if (&next.auth_key, &next.sign_option)
        != (&current.fields.auth_key, &current.fields.sign_option)
    {
        state.cluster_verifier.check_record(&state.env, &next)?;
    }
    let updated = state
        .registry
        .update(current.id, &next)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("build cluster {name} was deleted meanwhile"),
            )
        })?;
    tracing::info!(cluster = %name, active = updated.fields.is_active, "cluster updated");
    state.registry_changed().await;
    Ok(Json(updated))
}

/// Removes a cluster; its waiting builds move to clusters routing picks, or are held.
///
/// Also served at `/buildClusters/{name}`, the seed's path.
#[utoipa::path(delete, path = "/v4/buildclusters/{name}", tag = "registry", params(("name" = String, Path), ClusterQuery),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, body = ErrorBody, description = "The path or the query cannot be read (invalid percent-encoding, `scmContext` given twice)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has no scope `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No cluster of this name (of this `scmContext`, when given)."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn delete_cluster(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ClusterQuery>,
) -> Result<StatusCode, ApiError> {
    require(&caller, &[Scope::Admin])?;
    let current = find_one(&state, &name, &query).await?;
    state.registry.delete(current.id).await?;
    tracing::info!(cluster = %name, "cluster deleted");
    state.registry_changed().await;
    Ok(StatusCode::NO_CONTENT)
}

// === build intake ===

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessageQuery {
    /// Absent for builds; Screwdriver's other message types are not served yet.
    #[serde(rename = "type")]
    #[param(value_type = String, required = false)]
    kind: Option<String>,
}

fn only_builds(query: &MessageQuery) -> Result<(), ApiError> {
    match query.kind.as_deref() {
        None | Some("") => Ok(()),
        Some(other) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "?type={other} messages are not handled by this scheduler; only builds (no type) are"
            ),
        )),
    }
}

/// Accepts a build (Screwdriver's executor start); idempotent per `buildId`.
#[utoipa::path(post, path = "/v1/queue/message", tag = "builds", params(MessageQuery), request_body = StartMessage,
    responses(
        (status = 200, body = Accepted, description = "Already accepted earlier: the same answer."),
        (status = 201, body = Accepted, description = "Accepted now: queued on a cluster, or held until one can take it."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the query cannot be read (`type` given twice)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has no scope `sdapi` (or is a guest's), or the cluster the build names is external and does not list its organization."),
        (status = 404, body = ErrorBody, description = "The build's row vanished while a concurrent start for it was answered (a race with a delete of the database's rows)."),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "A field breaks a rule of `StartMessage`, `apiUri` is not one of the scheduler's `screwdriver.api_uris`, or the cluster the build names does not exist for its `scmContext` (the message names the field)."),
        (status = 500, body = ErrorBody, description = "The body carries no `token` and the scheduler cannot mint one (no `auth.private_key_file`)."),
        (status = 501, body = ErrorBody, description = "`?type=` names a message type other than builds."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn start_build(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiQuery(query): ApiQuery<MessageQuery>,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    require(&caller, &[Scope::SdApi])?;
    only_builds(&query)?;
    let msg = StartMessage::from_json(body)?;
    let accepted = state.intake.start(msg).await?;
    let status = if accepted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(accepted)))
}

/// Stops a build: off its queue if it still waits, else a stop for its cluster's agent.
#[utoipa::path(delete, path = "/v1/queue/message", tag = "builds", params(MessageQuery), request_body = StopRequest,
    responses(
        (status = 200, body = Stopped, description = "What was done."),
        (status = 400, body = ErrorBody, description = "The body is not a JSON object, or the query cannot be read (`type` given twice)."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has no scope `sdapi`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No build of this `buildId` is known to the scheduler."),
        (status = 413, body = ErrorBody, description = doc::TOO_LARGE),
        (status = 422, body = ErrorBody, description = "A field breaks a rule of `StopRequest` (the message names it)."),
        (status = 501, body = ErrorBody, description = "`?type=` names a message type other than builds."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn stop_build(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiQuery(query): ApiQuery<MessageQuery>,
    JsonObject(body): JsonObject,
) -> Result<Json<Stopped>, ApiError> {
    require(&caller, &[Scope::SdApi])?;
    only_builds(&query)?;
    let req = StopRequest::from_json(body)?;
    Ok(Json(state.intake.stop(req).await?))
}

/// Where a build is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildView {
    build_id: u64,
    job_id: u64,
    pipeline_id: u64,
    build_cluster_name: Option<String>,
    state: BuildState,
    reason: Option<String>,
    /// Epoch milliseconds.
    created_at: i64,
    updated_at: i64,
    /// Its steps, oldest first (the latest 100): each state, cluster or reason it had, from
    /// when. A build waiting behind a running one shows as `queued` with the reason
    /// `blocked by a running build of job …`.
    history: Vec<crate::builds::Step>,
}

/// Where a build is, as the scheduler knows it.
#[utoipa::path(get, path = "/v1/builds/{build_id}", tag = "builds",
    params(("build_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64)),
    responses(
        (status = 200, body = BuildView, description = "The build."),
        (status = 400, body = ErrorBody, description = "`build_id` is not an integer from 1 to 2^63-1."),
        (status = 401, body = ErrorBody, description = doc::UNAUTHORIZED),
        (status = 403, body = ErrorBody, description = "The token has none of the scopes `sdapi`, `user`, `admin`, or is a guest's."),
        (status = 404, body = ErrorBody, description = "No build of this id is known to the scheduler."),
        (status = 503, body = ErrorBody, description = doc::BUSY_OR_DOWN,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn get_build(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(build_id): ApiPath<String>,
) -> Result<Json<BuildView>, ApiError> {
    require(&caller, &[Scope::SdApi, Scope::User, Scope::Admin])?;
    let build_id: u64 = build_id
        .parse()
        .ok()
        .filter(|id| sd_protocol::build::positive("buildId", *id).is_ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "buildId must be a positive integer of at most 2^63-1",
            )
        })?;
    let row = state
        .intake
        .builds()
        .get(build_id)
        .await
        .map_err(|e| unavailable("database", &e))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no build {build_id} is known to the scheduler"),
            )
        })?;
    let history = state
        .intake
        .builds()
        .history(build_id, 100)
        .await
        .map_err(|e| unavailable("database", &e))?;
    Ok(Json(BuildView {
        build_id: row.build_id,
        job_id: row.job_id,
        pipeline_id: row.pipeline_id,
        build_cluster_name: row.cluster,
        state: row.state,
        reason: row.reason,
        created_at: row.created_at,
        updated_at: row.updated_at,
        history,
    }))
}

// === operations ===

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, body = Object, description = "The process is up: `{\"status\":\"ok\"}`."),
        (status = 503, body = ErrorBody, description = doc::BUSY,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn healthz() -> Json<Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Whether this replica's dependencies answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// Both answered.
    ready: bool,
    /// `ok`, or why not.
    database: String,
    /// `ok`, or why not.
    redis: String,
}

/// A 503 of `/readyz`: a dependency is down, or the scheduler is busy.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // a schema only: the handler answers either body
enum NotReady {
    Down(Readiness),
    Busy(ErrorBody),
}

/// Readiness: the database and Redis answer within 2 s.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, body = Readiness, description = "The database and Redis answer."),
        (status = 503, body = NotReady, description = "A dependency is down (a `Readiness` saying which), or the scheduler is busy or too slow (an `ErrorBody`, with `Retry-After`).",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let deadline = std::time::Duration::from_secs(2);
    let db = match tokio::time::timeout(deadline, state.db.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => "unreachable: no answer within 2s".to_owned(),
    };
    let redis = match tokio::time::timeout(deadline, state.queues.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => "unreachable: no answer within 2s".to_owned(),
    };
    let ready = db == "ok" && redis == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            database: db,
            redis,
        }),
    )
        .into_response()
}

/// The scheduler's metrics in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, body = String, content_type = "text/plain; version=0.0.4", description = "Every metric of this replica."),
        (status = 503, body = ErrorBody, description = doc::BUSY,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sd-scheduler",
        description = "Routes Screwdriver builds to build clusters and serves each cluster's queue."
    ),
    paths(
        list_clusters,
        create_cluster,
        get_cluster,
        update_cluster,
        delete_cluster,
        cluster_status,
        all_status,
        dead_letters,
        requeue_dead_letter,
        fail_dead_letter,
        start_build,
        stop_build,
        get_build,
        workers::poll,
        workers::ack,
        workers::nack,
        workers::renew,
        workers::events,
        healthz,
        readyz,
        metrics_text,
        openapi
    ),
    modifiers(&SeedAliases),
    components(schemas(
        Cluster,
        NewCluster,
        ClusterCreate,
        ClusterUpdate,
        ErrorBody,
        StartMessage,
        StopRequest,
        sd_protocol::AckBody,
        sd_protocol::NackBody,
        Readiness,
        Accepted,
        Stopped,
        BuildView,
        BuildState,
        crate::builds::Step,
        DeadLetterAction,
        Resolution,
        sd_protocol::Delivery,
        sd_protocol::QueueMessage,
        workers::Jobs,
        workers::EventBody,
        workers::EventAnswer,
        crate::workers::LeaseReport,
        ClusterStatus,
        AllStatus,
        crate::status::AgentStatus,
        crate::status::QueueDepths,
        crate::status::OldestWaiting,
        crate::status::Health,
        crate::status::Minute,
        DeadLetters,
        crate::status::DeadLetter
    ))
)]
pub struct ApiDoc;

/// The registry's operations again under the seed's `/buildClusters` paths, which the router
/// serves as aliases: the same operations, ids suffixed `_alias`.
struct SeedAliases;

impl utoipa::Modify for SeedAliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let aliases: Vec<_> = openapi
            .paths
            .paths
            .iter()
            .filter_map(|(path, item)| {
                let rest = path.strip_prefix("/v4/buildclusters")?;
                let mut item = item.clone();
                for operation in [
                    &mut item.get,
                    &mut item.put,
                    &mut item.post,
                    &mut item.delete,
                ]
                .into_iter()
                .flatten()
                {
                    operation.operation_id = operation
                        .operation_id
                        .take()
                        .map(|id| format!("{id}_alias"));
                    operation.description = Some(format!(
                        "The seed's path for `{path}`, served as its alias."
                    ));
                }
                Some((format!("/buildClusters{rest}"), item))
            })
            .collect();
        openapi.paths.paths.extend(aliases);
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, body = Object, description = "The OpenAPI 3.1 document of this API."),
        (status = 503, body = ErrorBody, description = doc::BUSY,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying; sent when the scheduler is busy, not when a dependency is down."))),
    ))]
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
}

/// The in-flight cap and the request timeout.
#[derive(Clone)]
struct Bounds {
    slots: Arc<tokio::sync::Semaphore>,
    timeout: std::time::Duration,
}

/// Answers 503 with `Retry-After` when `http.max_in_flight` requests are already in flight or
/// this one outlives `http.request_timeout`: a flood or a stuck dependency costs bounded
/// memory and time, and clients (Screwdriver's retries, the agents' back-off) come back later.
async fn bounded(State(bounds): State<Bounds>, req: Request, next: Next) -> Response {
    let Ok(_slot) = bounds.slots.try_acquire() else {
        return busy("too many requests in flight; retry shortly".into());
    };
    match tokio::time::timeout(bounds.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => busy(format!(
            "the request took longer than {}s (http.request_timeout); retry shortly",
            bounds.timeout.as_secs()
        )),
    }
}

fn busy(message: String) -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        .retry_after(1)
        .into_response()
}

/// A request's method as a metric label: HTTP's own methods by name, anything a client made
/// up as `other`, so no client can add label values (and series) at will.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Request count and latency per route and status. Every label is from a fixed set: the
/// method ([`method_label`]), the matched route (or `unmatched`) and the status we answered.
async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("sd_scheduler_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("sd_scheduler_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::{Bounds, bounded, method_label};
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode, header};
    use axum::routing::get;
    use std::sync::Arc;
    use std::time::Duration;
    use tower::ServiceExt;

    fn app(bounds: Bounds) -> Router {
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            )
            .route("/fast", get(|| async { "done" }))
            .route_layer(axum::middleware::from_fn_with_state(bounds, bounded))
    }

    async fn call(app: Router, path: &str) -> (StatusCode, Option<String>) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        (response.status(), retry)
    }

    #[tokio::test]
    async fn a_request_past_its_time_is_answered_503_with_retry_after() {
        let bounds = Bounds {
            slots: Arc::new(tokio::sync::Semaphore::new(4)),
            timeout: Duration::from_millis(50),
        };
        assert_eq!(
            call(app(bounds.clone()), "/slow").await,
            (StatusCode::SERVICE_UNAVAILABLE, Some("1".into()))
        );
        assert_eq!(call(app(bounds), "/fast").await, (StatusCode::OK, None));
    }

    #[tokio::test]
    async fn past_the_in_flight_cap_requests_are_answered_503_at_once() {
        let bounds = Bounds {
            slots: Arc::new(tokio::sync::Semaphore::new(1)),
            timeout: Duration::from_secs(5),
        };
        let held = Arc::clone(&bounds.slots).acquire_owned().await.unwrap();
        assert_eq!(
            call(app(bounds.clone()), "/fast").await,
            (StatusCode::SERVICE_UNAVAILABLE, Some("1".into()))
        );
        drop(held);
        assert_eq!(call(app(bounds), "/fast").await, (StatusCode::OK, None));
    }

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        for made_up in ["FOO", "BREW", "X-1234567"] {
            let method = Method::from_bytes(made_up.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{made_up}");
        }
    }
}
