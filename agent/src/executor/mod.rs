//! Executors turn a build into something running: a Kubernetes pod, or a local process.
//!
//! Contract shared by both (the launcher relies on it):
//! - `launch` is idempotent per buildId: launching a build that already runs (or ran) returns
//!   `Launched::AlreadyRunning` and starts nothing — at most one pod/process per buildId, even
//!   across agent restarts and replicas.
//! - Lifecycle changes are sent as [`BuildEvent`]s on the channel given at construction.
//! - `stop` ends a running build (deletes the pod / kills the process group).

use std::path::PathBuf;
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

/// Why an executor could not do what was asked. Whether trying the same build again can help is
/// [`ExecError::is_permanent`]'s call, and only its: the launcher retries or fails a build by it.
///
/// Plain conditions are `Transient`/`Rejected` messages; a failure that has an underlying error
/// keeps it as its [`source`](std::error::Error::source). The texts are what users read (in
/// logs, `/readyz`, `sd-agent check`, and a rejected build's failure reason).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Worth retrying (API unreachable, throttled, conflict on a transient state).
    ///
    /// Kubernetes API errors come here (and to `Rejected`) as text on purpose, never as a
    /// source: a `kube::Error` can echo the pod's command line and so the build's token, so its
    /// text goes through [`scrub_tokens`], and a `{:#}` or error-chain printer given the raw
    /// error would print it unscrubbed.
    #[error("{0}")]
    Transient(String),
    /// Will not get better by retrying this build (invalid spec, rejected by the API). Kubernetes
    /// API errors are scrubbed text here too, for the reason given at `Transient`.
    #[error("{0}")]
    Rejected(String),
    /// The build cannot be encoded for the launcher's environment (process executor).
    #[error("build {build_id} cannot be encoded: {source}")]
    Encode {
        build_id: u64,
        #[source]
        source: serde_json::Error,
    },
    /// `executor.kubernetes.kubeconfig` does not load.
    #[error("executor.kubernetes.kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No Kubernetes configuration could be inferred (`KUBECONFIG`, `~/.kube/config`, the
    /// in-cluster service account).
    #[error(
        "no Kubernetes configuration found (set executor.kubernetes.kubeconfig or KUBECONFIG, or run in a pod with a service account): {0}"
    )]
    NoKubeconfig(#[source] kube::config::InferConfigError),
    /// The Kubernetes client cannot be built from its configuration (TLS, proxy). Kept as a
    /// source, unlike API errors: it comes before any request, so no build's token is in it.
    #[error("cannot build a Kubernetes client for {url}: {source}")]
    KubeClient {
        url: String,
        #[source]
        source: kube::Error,
    },
    /// The launcher cannot be started on this host (process executor): its program, its work
    /// dir, the build's log file, or the start itself.
    #[error(transparent)]
    Launcher(#[from] process::LauncherError),
    /// The local Redis failed while reading or writing a launch marker (process executor).
    #[error(transparent)]
    Marker(#[from] process::MarkerError),
    /// The launch marker just written is not on the local Redis's disk yet (process executor).
    #[error("launch marker of build {build_id} is not confirmed on disk yet: {source}")]
    MarkerNotDurable {
        build_id: u64,
        #[source]
        source: crate::local::LocalError,
    },
    /// The outbox in the local Redis cannot be read (process executor).
    #[error("local Redis: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    /// The local Redis cannot be set up from `redis.url` (process executor); `context` says
    /// what failed.
    #[error("{context}: {source}")]
    Redis {
        context: &'static str,
        #[source]
        source: redis::RedisError,
    },
    /// The local Redis does not answer (process executor's check).
    #[error("local Redis does not answer ({0}): check redis.url and that redis-server runs")]
    RedisDown(#[source] redis::RedisError),
}

impl ExecError {
    /// Whether trying the same build again cannot help: `Rejected` (the build's spec, what the
    /// API said of its pod, a setting no build can run with), a build that cannot be encoded, and
    /// one too large for the kernel to start.
    /// Everything else — an API or a Redis that does not answer, this host's launcher or files —
    /// may recover meanwhile, so the build waits and is tried again rather than failed. (Errors
    /// of an executor's construction and `check` are reported, not retried.)
    pub fn is_permanent(&self) -> bool {
        match self {
            ExecError::Rejected(_) | ExecError::Encode { .. } => true,
            ExecError::Launcher(e) => e.is_permanent(),
            ExecError::Transient(_)
            | ExecError::Kubeconfig { .. }
            | ExecError::NoKubeconfig(_)
            | ExecError::KubeClient { .. }
            | ExecError::Marker(_)
            | ExecError::MarkerNotDurable { .. }
            | ExecError::Outbox(_)
            | ExecError::Redis { .. }
            | ExecError::RedisDown(_) => false,
        }
    }
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

pub use crate::config::{MAX_GRACE, TimeLimits};

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
mod error_tests {
    use std::error::Error as _;
    use std::io;

    use super::process::LauncherError;
    use super::*;

    fn not_found() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    #[test]
    fn only_the_builds_own_faults_are_permanent() {
        assert!(ExecError::Rejected("invalid pod".into()).is_permanent());
        let encode = serde_json::from_str::<u64>("x").unwrap_err();
        assert!(
            ExecError::Encode {
                build_id: 7,
                source: encode
            }
            .is_permanent()
        );
        assert!(!ExecError::Transient("API unreachable".into()).is_permanent());
        let launcher = LauncherError::Unusable {
            path: "/opt/sd/launch".into(),
            source: not_found(),
        };
        assert!(!ExecError::from(launcher).is_permanent());
        let redis = redis::RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(!ExecError::RedisDown(redis).is_permanent());
    }

    #[test]
    fn underlying_errors_are_kept_as_sources_with_the_same_text() {
        let e = ExecError::from(LauncherError::Spawn {
            program: "/opt/sd/launch".into(),
            source: not_found(),
        });
        assert_eq!(
            e.to_string(),
            format!(
                "cannot start launcher /opt/sd/launch: {} (fix executor.process.command)",
                not_found()
            )
        );
        assert!(e.source().is_some_and(|s| s.is::<io::Error>()), "{e:?}");
        let e = ExecError::from(LauncherError::WorkDirNotWritable {
            path: "/var/sd".into(),
            source: not_found(),
        });
        assert_eq!(
            e.to_string(),
            format!(
                "work dir /var/sd is not writable by this user ({}): fix its owner or set executor.process.work_dir",
                not_found()
            )
        );
        assert!(e.source().is_some_and(|s| s.is::<io::Error>()), "{e:?}");
        // Kubernetes API errors stay scrubbed text: nothing behind them to print unscrubbed.
        assert!(
            ExecError::Transient("cannot create pod sd-7: ***".into())
                .source()
                .is_none()
        );
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

    const LIMITS: TimeLimits = TimeLimits::DEFAULT;

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
