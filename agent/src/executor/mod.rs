//! Executors turn a build into something running: a Kubernetes pod, or a local process.
//!
//! Contract shared by both (the launcher relies on it):
//! - `launch` is idempotent per buildId: launching a build that already runs (or ran) returns
//!   `Launched::AlreadyRunning` and starts nothing — at most one pod/process per buildId, even
//!   across agent restarts and replicas.
//! - Lifecycle changes are sent as [`BuildEvent`]s on the channel given at construction.
//! - `stop` ends a running build (deletes the pod / kills the process group).

use std::time::Duration;

use sd_protocol::StartMessage;
use tokio::sync::mpsc;

pub mod kubernetes;
pub mod process;

/// What happened to a build, as an executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildEvent {
    pub build_id: u64,
    pub status: BuildStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildStatus {
    /// The build's container/process started.
    Running,
    /// It ended successfully (the launcher reported its own result to Screwdriver).
    Finished,
    /// It ended unsuccessfully. With `report`, the agent must tell the Screwdriver API itself
    /// (`PUT /v4/builds/{id}` FAILURE with `reason`): the launcher never ran or could not report
    /// (bad image, pending too long, a run the agent cannot account for).
    Failed { reason: String, report: bool },
    /// It was stopped on request (Screwdriver asked for it, so only the scheduler is told).
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launched {
    Created,
    AlreadyRunning,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Worth retrying (API unreachable, throttled, conflict on a transient state).
    #[error("{0}")]
    Transient(String),
    /// Will not get better by retrying this build (invalid spec, rejected by the API).
    #[error("{0}")]
    Rejected(String),
}

/// The executor chosen by `executor.kind`.
pub enum Executor {
    Kubernetes(kubernetes::KubernetesExecutor),
    Process(process::ProcessExecutor),
}

impl Executor {
    pub async fn launch(&self, build: &StartMessage) -> Result<Launched, ExecError> {
        match self {
            Executor::Kubernetes(k) => k.launch(build).await,
            Executor::Process(p) => p.launch(build).await,
        }
    }

    /// Stops a build; `false` when nothing of it was running here.
    pub async fn stop(&self, build_id: u64) -> Result<bool, ExecError> {
        match self {
            Executor::Kubernetes(k) => k.stop(build_id).await,
            Executor::Process(p) => p.stop(build_id).await,
        }
    }

    /// A real call proving the executor works (for `/readyz` and `sd-agent check`); on success
    /// a short description of what was reached.
    pub async fn check(&self) -> Result<String, ExecError> {
        match self {
            Executor::Kubernetes(k) => k.check().await,
            Executor::Process(p) => p.check().await,
        }
    }

    /// Builds launched here and not yet ended.
    pub fn in_flight(&self) -> usize {
        match self {
            Executor::Kubernetes(k) => k.in_flight(),
            Executor::Process(p) => p.in_flight(),
        }
    }
}

/// Sender for build events; executors spawn their watch tasks with a clone.
pub type Events = mpsc::UnboundedSender<BuildEvent>;

/// The build timeout from `screwdriver.cd/timeout` (minutes), capped; `default` when absent.
pub fn build_timeout(build: &StartMessage, default: Duration, max: Duration) -> Duration {
    let minutes = match build.annotations.get("screwdriver.cd/timeout") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    minutes
        .filter(|m| m.is_finite() && *m > 0.0)
        .map_or(default, |m| Duration::from_secs_f64(m * 60.0))
        .min(max)
}
