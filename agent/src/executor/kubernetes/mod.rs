//! Kubernetes executor: one pod per build, named `{prefix}{buildId}` so that agent replicas and
//! restarts agree on it (AlreadyExists counts as launched), with Screwdriver executor-k8s's
//! launcher contract (see [`pod`]).
//!
//! A watcher follows every build pod in the namespace and turns what it sees into
//! [`BuildEvent`](super::BuildEvent)s; it fails builds whose pods cannot start (bad image,
//! pending too long) and deletes finished pods after a TTL (see [`watch`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use sd_protocol::StartMessage;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use super::{Events, ExecError, Launched};
use crate::config::{KubernetesConfig, ScrewdriverConfig};

pub mod pod;
pub mod watch;

pub use pod::{BUILD_SELECTOR, build_pod, pod_name};

/// What every request to the Kubernetes API says it comes from.
pub const USER_AGENT: &str = concat!("sd-agent/", env!("CARGO_PKG_VERSION"));

/// Tuning for the executor's background work; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How often timers (image pull grace, pending timeout, finished-pod TTL) are checked
    /// between watch events.
    pub check_interval: Duration,
    /// Upper bound for one API call (create, delete, list); watches are exempt.
    pub request_timeout: Duration,
    /// Cancelling it stops the watcher; dropping the executor does too.
    pub cancel: CancellationToken,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            cancel: CancellationToken::new(),
        }
    }
}

/// Runs builds as pods. Its watcher tasks run until it is dropped or `WatchOptions::cancel`
/// is cancelled.
pub struct KubernetesExecutor {
    inner: Arc<Inner>,
    _stop: DropGuard,
}

/// State shared with the watcher tasks.
struct Inner {
    pods: Api<Pod>,
    events_api: Api<CoreEvent>,
    config: KubernetesConfig,
    screwdriver: ScrewdriverConfig,
    events: Events,
    tracker: Mutex<watch::Tracker>,
    request_timeout: Duration,
    /// Where the API is, for messages (unknown when handed a ready client).
    cluster_url: Option<String>,
    /// Ends the watcher tasks (cancelled when the executor is dropped).
    cancel: CancellationToken,
}

impl KubernetesExecutor {
    /// Connects with `config.kubeconfig` when set, else the usual inference (`KUBECONFIG`,
    /// `~/.kube/config`, the in-cluster service account), and starts the watcher, which runs
    /// until `cancel` is cancelled or the executor is dropped.
    pub async fn new(
        config: &KubernetesConfig,
        screwdriver: &ScrewdriverConfig,
        events: Events,
        cancel: CancellationToken,
    ) -> Result<Self, ExecError> {
        let options = WatchOptions {
            cancel,
            ..WatchOptions::default()
        };
        Self::connect(config, screwdriver, events, options).await
    }

    /// [`new`](Self::new) with every option.
    pub async fn connect(
        config: &KubernetesConfig,
        screwdriver: &ScrewdriverConfig,
        events: Events,
        options: WatchOptions,
    ) -> Result<Self, ExecError> {
        let (client, url) = connect_client(config).await?;
        Ok(Self::start(
            client,
            config,
            screwdriver,
            events,
            options,
            Some(url),
        ))
    }

    /// Uses `client` as is (tests point it at a fake API server). Must be called inside a
    /// Tokio runtime: it spawns the watcher.
    pub fn with_client(
        client: Client,
        config: &KubernetesConfig,
        screwdriver: &ScrewdriverConfig,
        events: Events,
    ) -> Self {
        Self::with_client_options(client, config, screwdriver, events, WatchOptions::default())
    }

    /// [`with_client`](Self::with_client) with explicit options.
    pub fn with_client_options(
        client: Client,
        config: &KubernetesConfig,
        screwdriver: &ScrewdriverConfig,
        events: Events,
        options: WatchOptions,
    ) -> Self {
        Self::start(client, config, screwdriver, events, options, None)
    }

    fn start(
        client: Client,
        config: &KubernetesConfig,
        screwdriver: &ScrewdriverConfig,
        events: Events,
        options: WatchOptions,
        cluster_url: Option<String>,
    ) -> Self {
        let cancel = options.cancel.child_token();
        let inner = Arc::new(Inner {
            pods: Api::namespaced(client.clone(), &config.namespace),
            events_api: Api::namespaced(client, &config.namespace),
            config: config.clone(),
            screwdriver: screwdriver.clone(),
            events,
            tracker: Mutex::new(watch::Tracker::default()),
            request_timeout: options.request_timeout,
            cluster_url,
            cancel: cancel.clone(),
        });
        watch::spawn(&inner, options.check_interval);
        Self {
            inner,
            _stop: cancel.drop_guard(),
        }
    }

    /// Creates the build's pod. AlreadyExists means another replica (or an earlier attempt)
    /// launched it: `AlreadyRunning`.
    pub async fn launch(&self, build: &StartMessage) -> Result<Launched, ExecError> {
        let pod = build_pod(build, &self.inner.config, &self.inner.screwdriver)?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let scrub = |text: String| crate::executor::scrub_tokens(&text, build.token.as_deref());
        let inner = &self.inner;
        match inner
            .call(inner.pods.create(&PostParams::default(), &pod))
            .await
        {
            Ok(created) => {
                inner.launched(build.build_id, &created);
                info!(build_id = build.build_id, pod = %name, namespace = %inner.config.namespace, "created build pod");
                Ok(Launched::Created)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                info!(build_id = build.build_id, pod = %name, "build pod already exists");
                Ok(Launched::AlreadyRunning)
            }
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 413 | 422) => {
                let message = scrub(status.message.clone());
                warn!(build_id = build.build_id, pod = %name, code = status.code, %message, "Kubernetes rejected the build pod");
                Err(ExecError::Rejected(format!(
                    "Kubernetes rejected pod {name}: {message}"
                )))
            }
            Err(e) => {
                let message = scrub(describe(&e));
                warn!(build_id = build.build_id, pod = %name, error = %message, "cannot create build pod");
                Err(ExecError::Transient(format!(
                    "cannot create pod {name}: {message}"
                )))
            }
        }
    }

    /// Deletes the build's pod; `false` when there was none. The build's later pod changes
    /// are not reported: stopping is not failing.
    pub async fn stop(&self, build_id: u64) -> Result<bool, ExecError> {
        let name = pod_name(&self.inner.config.prefix, build_id);
        self.inner.lock().stopping(build_id);
        let inner = &self.inner;
        match inner
            .call(inner.pods.delete(&name, &DeleteParams::default()))
            .await
        {
            Ok(_) => {
                info!(build_id, pod = %name, "deleted build pod on stop");
                // Reported once even if the build ended meanwhile: the outbox keeps the first end.
                inner.emit(build_id, crate::executor::BuildStatus::Stopped);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(ExecError::Transient(format!(
                "cannot delete pod {name}: {}",
                describe(&e)
            ))),
        }
    }

    /// Lists one pod in the namespace: proves the API is reachable and lets us in.
    pub async fn check(&self) -> Result<String, ExecError> {
        let inner = &self.inner;
        check_pods(
            &inner.pods,
            &inner.config.namespace,
            inner.cluster_url.as_deref(),
            inner.request_timeout,
        )
        .await
    }

    /// Builds whose pods are known (launched here or seen by the watcher) and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight()
    }
}

/// `sd-agent check`: connects as the executor would and makes the same call as
/// [`KubernetesExecutor::check`], without starting a watcher.
pub async fn check_access(config: &KubernetesConfig) -> Result<String, ExecError> {
    let (client, url) = connect_client(config).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let timeout = WatchOptions::default().request_timeout;
    let reached = check_pods(&pods, &config.namespace, Some(&url), timeout).await?;
    let reviewed = review_permissions(client, &config.namespace, timeout).await?;
    Ok(format!("{reached}; {reviewed}"))
}

/// What the executor does in the build namespace: (verb, resource, subresource). Exactly what
/// its calls need (agent/tests/rbac.rs derives it from them and checks the Role in
/// deploy/kubernetes/agent.yaml grants this and nothing more).
pub const PERMISSIONS: &[(&str, &str, &str)] = &[
    ("create", "pods", ""),
    ("get", "pods", ""),
    ("list", "pods", ""),
    ("watch", "pods", ""),
    ("delete", "pods", ""),
    ("list", "events", ""),
];

/// [`PERMISSIONS`] as a person reads them: `pods (create, get, …) and events (list)`.
fn permissions_text() -> String {
    let mut by_resource: Vec<(String, Vec<&str>)> = Vec::new();
    for (verb, resource, sub) in PERMISSIONS {
        let what = if sub.is_empty() {
            (*resource).to_owned()
        } else {
            format!("{resource}/{sub}")
        };
        match by_resource.iter_mut().find(|(r, _)| *r == what) {
            Some((_, verbs)) => verbs.push(verb),
            None => by_resource.push((what, vec![verb])),
        }
    }
    by_resource
        .iter()
        .map(|(what, verbs)| format!("{what} ({})", verbs.join(", ")))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Asks the API server (SelfSubjectAccessReview) whether this identity may do each thing the
/// executor does, so a missing RBAC rule shows up in `sd-agent check`, not at the first build.
async fn review_permissions(
    client: Client,
    ns: &str,
    timeout: Duration,
) -> Result<String, ExecError> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client);
    let mut denied = Vec::new();
    for (verb, resource, subresource) in PERMISSIONS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.to_owned()),
                    verb: Some((*verb).to_owned()),
                    resource: Some((*resource).to_owned()),
                    subresource: (!subresource.is_empty()).then(|| (*subresource).to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let params = PostParams::default();
        let answer = match tokio::time::timeout(timeout, reviews.create(&params, &review)).await {
            Ok(Ok(answer)) => answer,
            // Some API servers do not offer the review to everyone: say so, do not guess.
            Ok(Err(e)) => {
                return Ok(format!(
                    "permissions not reviewed (SelfSubjectAccessReview: {})",
                    describe(&e)
                ));
            }
            Err(_) => return Err(ExecError::Transient(describe(&timed_out(timeout)))),
        };
        if !answer.status.is_some_and(|s| s.allowed) {
            let what = if subresource.is_empty() {
                (*resource).to_owned()
            } else {
                format!("{resource}/{subresource}")
            };
            denied.push(format!("{verb} {what}"));
        }
    }
    if denied.is_empty() {
        Ok(format!(
            "may create, watch and delete build pods and read their events in {ns}"
        ))
    } else {
        Err(ExecError::Transient(format!(
            "the agent's identity may not {} in namespace {ns}: grant them in its Role (deploy/kubernetes/agent.yaml has the rules)",
            denied.join(", ")
        )))
    }
}

/// A client from `config.kubeconfig`, else `kube`'s inference; with the API's URL for messages.
async fn connect_client(config: &KubernetesConfig) -> Result<(Client, String), ExecError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let bad = |source| ExecError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer()
            .await
            .map_err(ExecError::NoKubeconfig)?,
    };
    let url = kube_config.cluster_url.to_string();
    let mut kube_config = kube_config;
    // Audit logs then name the agent (kube sends no User-Agent of its own).
    kube_config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    let client = Client::try_from(kube_config).map_err(|source| ExecError::KubeClient {
        url: url.clone(),
        source,
    })?;
    Ok((client, url))
}

/// Lists at most one pod; on failure says what to fix.
async fn check_pods(
    pods: &Api<Pod>,
    ns: &str,
    url: Option<&str>,
    timeout: Duration,
) -> Result<String, ExecError> {
    let rbac = format!(
        "the agent's service account needs RBAC for {} in namespace {ns}",
        permissions_text()
    );
    let result =
        match tokio::time::timeout(timeout, pods.list(&ListParams::default().limit(1))).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(timeout)),
        };
    match result {
        Ok(_) => Ok(format!("Kubernetes API reachable, namespace {ns}")),
        Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => {
            Err(ExecError::Transient(format!(
                "the Kubernetes API refused to list pods in namespace {ns} (HTTP {}: {}): {rbac}",
                status.code, status.message
            )))
        }
        Err(e) => {
            let at = url.map(|u| format!(" at {u}")).unwrap_or_default();
            Err(ExecError::Transient(format!(
                "cannot list pods in namespace {ns} through the Kubernetes API{at}: {}; check executor.kubernetes.kubeconfig (or the in-cluster service account), and that {rbac}",
                describe(&e)
            )))
        }
    }
}

fn timed_out(timeout: Duration) -> kube::Error {
    kube::Error::Service(format!("no answer from the Kubernetes API within {timeout:?}").into())
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, watch::Tracker> {
        // A panic while holding the lock leaves plain bookkeeping behind: keep going.
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One API call, bounded by `request_timeout` so a hung API server cannot hang the caller.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        let result = match tokio::time::timeout(self.request_timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(self.request_timeout)),
        };
        // 404 and 409 (AlreadyExists) are answers the executor expects, not errors.
        if let Err(e) = &result
            && !matches!(e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
        {
            metrics::counter!("sd_agent_kubernetes_api_errors_total").increment(1);
        }
        result
    }
}

/// A kube error as one line, without the Debug dump kube's Display appends for API errors.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if status.message.is_empty() => {
            format!("HTTP {} {}", status.code, status.reason)
        }
        kube::Error::Api(status) => {
            format!("HTTP {} {}: {}", status.code, status.reason, status.message)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                let s_text = s.to_string();
                if !text.contains(&s_text) {
                    text.push_str(": ");
                    text.push_str(&s_text);
                }
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rbac_hint_lists_exactly_the_permissions_used() {
        assert_eq!(
            super::permissions_text(),
            "pods (create, get, list, watch, delete) and events (list)"
        );
    }
}
