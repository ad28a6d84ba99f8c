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

/// `text` with the build's own token (`known`, whatever its shape) and every JWT in it (`eyJ…`
/// in three dot-separated base64url parts) replaced by `***`. Failure reasons quote what
/// Kubernetes said, which can echo a container's command line and so the build's token;
/// reasons are logged and sent to Screwdriver.
pub fn scrub_tokens(text: &str, known: Option<&str>) -> String {
    let text = match known.filter(|t| !t.is_empty()) {
        Some(token) => text.replace(token, "***"),
        None => text.to_owned(),
    };
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("eyJ") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let run = from.find(|c: char| !is_token_char(c)).unwrap_or(from.len());
        // A sentence's full stop after a token is not part of it.
        let candidate = from[..run].trim_end_matches('.');
        let len = candidate.len();
        let parts: Vec<&str> = candidate.split('.').collect();
        if parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) {
            out.push_str("***");
        } else {
            out.push_str(candidate);
        }
        rest = &from[len..];
    }
    out.push_str(rest);
    out
}

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

#[cfg(test)]
mod scrub_tests {
    use super::scrub_tokens;

    #[test]
    fn tokens_are_scrubbed_and_other_text_kept() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJidWlsZElkIjo4fQ.c2lnbmF0dXJl-_x";
        assert_eq!(
            scrub_tokens(
                &format!("exec run.sh \"{jwt}\" \"https://api\" failed"),
                None
            ),
            "exec run.sh \"***\" \"https://api\" failed"
        );
        assert_eq!(scrub_tokens(&format!("{jwt}. Next"), None), "***. Next");
        assert_eq!(
            scrub_tokens("image eyJunk not found", None),
            "image eyJunk not found"
        );
        assert_eq!(scrub_tokens("v1.2.3 eyJa.b", None), "v1.2.3 eyJa.b");
        assert_eq!(scrub_tokens("no tokens here", None), "no tokens here");
        assert_eq!(scrub_tokens("é eyJa.b.c ü", None), "é *** ü");
        // The build's own token, JWT or not.
        assert_eq!(
            scrub_tokens("pod args: run.sh opaque-t0ken x", Some("opaque-t0ken")),
            "pod args: run.sh *** x"
        );
        assert_eq!(scrub_tokens("nothing", Some("")), "nothing");
    }
}
