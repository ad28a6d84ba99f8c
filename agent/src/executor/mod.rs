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

pub mod kubernetes;
pub mod process;

pub use crate::events::{BuildEvent, BuildStatus, Events};

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

pub use crate::config::TimeLimits;

/// The most a build's annotation may raise its grace period to.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// How long one build may run, and who enforces what. The launcher owns the timeout (`run.sh`'s
/// timeout argument, whole minutes): at it, it aborts the step, runs teardown and reports the
/// timeout itself. The agent's end (the pod's `activeDeadlineSeconds`, the process executor's
/// kill) is a backstop that comes `timeout_margin` plus the grace period later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `screwdriver.cd/timeout` (minutes, may be fractional), capped; the default when absent.
    pub timeout: Duration,
    /// The launcher's timeout argument: `timeout` in whole minutes, at least 1.
    pub minutes: u64,
    /// SIGTERM to SIGKILL: the larger of the annotation and the default (Screwdriver's rule),
    /// capped at [`MAX_GRACE`].
    pub grace: Duration,
    /// When the agent ends a build the launcher has not ended.
    pub backstop: Duration,
}

impl Timing {
    pub fn of(build: &StartMessage, limits: &TimeLimits) -> Self {
        let timeout = build
            .timeout_minutes()
            .map_or(limits.default_timeout, |m| {
                Duration::try_from_secs_f64(m * 60.0).unwrap_or(limits.max_timeout)
            })
            .min(limits.max_timeout);
        let asked = build
            .termination_grace_seconds()
            .map_or(Duration::ZERO, Duration::from_secs);
        let grace = asked.max(limits.termination_grace_period).min(MAX_GRACE);
        Timing {
            timeout,
            minutes: timeout.as_secs().div_ceil(60).max(1),
            grace,
            backstop: timeout + grace + limits.timeout_margin,
        }
    }
}

#[cfg(test)]
mod timing_tests {
    use super::*;
    use serde_json::{Value, json};

    fn build(annotations: Value) -> StartMessage {
        let Value::Object(m) = json!({
            "buildId": 1, "jobId": 2, "pipeline": {"id": 3, "name": "o/r", "scmContext": "github:github.com"},
            "apiUri": "https://api", "container": "node:22", "annotations": annotations,
        }) else {
            unreachable!()
        };
        StartMessage::from_json(m).unwrap()
    }

    const LIMITS: TimeLimits = TimeLimits {
        default_timeout: Duration::from_secs(90 * 60),
        max_timeout: Duration::from_secs(120 * 60),
        timeout_margin: Duration::from_secs(600),
        termination_grace_period: Duration::from_secs(30),
    };

    #[test]
    fn the_launcher_times_out_first_and_the_backstop_comes_later() {
        let t = Timing::of(
            &build(
                json!({"screwdriver.cd/timeout": 60, "beta.screwdriver.cd/terminationGracePeriodSeconds": "90"}),
            ),
            &LIMITS,
        );
        assert_eq!(
            (t.timeout.as_secs(), t.minutes, t.grace.as_secs()),
            (3600, 60, 90)
        );
        assert_eq!(t.backstop.as_secs(), 3600 + 90 + 600);
        let d = Timing::of(&build(json!({})), &LIMITS);
        assert_eq!(
            (d.minutes, d.grace.as_secs(), d.backstop.as_secs()),
            (90, 30, 5400 + 30 + 600)
        );
    }

    #[test]
    fn annotations_are_capped_and_only_raise_the_grace() {
        let t = Timing::of(
            &build(
                json!({"screwdriver.cd/timeout": "600", "screwdriver.cd/terminationGracePeriodSeconds": 5}),
            ),
            &LIMITS,
        );
        assert_eq!((t.minutes, t.grace.as_secs()), (120, 30));
        let huge = Timing::of(
            &build(
                json!({"screwdriver.cd/timeout": 1e300, "screwdriver.cd/terminationGracePeriodSeconds": 1e300}),
            ),
            &LIMITS,
        );
        assert_eq!((huge.minutes, huge.grace), (120, MAX_GRACE));
        let short = Timing::of(&build(json!({"screwdriver.cd/timeout": 0.01})), &LIMITS);
        assert_eq!((short.timeout.as_millis(), short.minutes), (600, 1));
    }
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
