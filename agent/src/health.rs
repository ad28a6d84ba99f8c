//! `/healthz` (the process is up), `/readyz` (scheduler reachable and authenticated, local
//! Redis up, executor reachable) and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::Mutex;

use crate::executor::Executor;
use crate::local::LocalQueue;
use crate::status::Status;

pub struct HealthState {
    pub status: Arc<Status>,
    pub local: LocalQueue,
    pub executor: Arc<Executor>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The executor check is a real API call: cached briefly so probes stay cheap.
    executor_check: Mutex<Option<(Instant, Result<String, String>)>>,
}

impl HealthState {
    pub fn new(
        status: Arc<Status>,
        local: LocalQueue,
        executor: Arc<Executor>,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Arc<Self> {
        Arc::new(Self {
            status,
            local,
            executor,
            metrics,
            executor_check: Mutex::new(None),
        })
    }
}

pub fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<HealthState>>) -> Response {
    let scheduler = state.status.not_ready().unwrap_or_else(|| "ok".to_owned());
    let redis = match tokio::time::timeout(Duration::from_secs(2), state.local.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => "unreachable: no answer within 2s".to_owned(),
    };
    let executor = {
        let mut cached = state.executor_check.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(10));
        if !fresh {
            let result =
                match tokio::time::timeout(Duration::from_secs(5), state.executor.check()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("no answer within 5s".to_owned()),
                };
            *cached = Some((Instant::now(), result));
        }
        match cached.as_ref().map(|(_, r)| r) {
            Some(Ok(_)) => "ok".to_owned(),
            Some(Err(e)) => format!("unreachable: {e}"),
            None => "unknown".to_owned(),
        }
    };
    let ready = scheduler == "ok" && redis == "ok" && executor == "ok";
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": ready,
        "scheduler": scheduler,
        "redis": redis,
        "executor": executor,
        "atCapacity": state.status.at_capacity(),
        "inFlight": state.executor.in_flight(),
    });
    (code, Json(body)).into_response()
}

/// Renders the metrics; builds in flight are read at this moment (a gauge set elsewhere would
/// be as old as the last event that set it, e.g. the start of a 30 s long-poll).
async fn metrics(State(state): State<Arc<HealthState>>) -> impl IntoResponse {
    metrics::gauge!("sd_agent_in_flight").set(state.executor.in_flight() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
