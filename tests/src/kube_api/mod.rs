//! A fake Kubernetes API server that refuses what a real kube-apiserver (1.30–1.37) refuses,
//! with its response bodies, for core/v1 pods and events and the real `kube` client and
//! runtime watcher: create, get, list with selectors and paging, watch, delete, and
//! SelfSubjectAccessReview. Tests drive what the kubelet would do (phases, container states,
//! events) and assert on every request it received.
//!
//! - A pod on create is decoded as the server decodes it (`decode`: values of the wrong
//!   type and unparsable quantities are 400, unknown fields follow `fieldValidation` —
//!   `Strict` 400, `Warn` (the default) dropped with a `Warning` header, `Ignore` dropped),
//!   then validated ([`validate`]: 422 `Invalid` with one cause per field error).
//! - Every request is authorized as [`USER`]: what [`FakeKube::deny`] denies is 403
//!   `Forbidden`, with the message naming the verb and resource as the server's authorizer
//!   sees them ([`KubeRequest::authz`]); access reviews answer the same.
//!   [`FakeKube::verbs_used`] lists what the client needed.
//! - Each object change gets the next resourceVersion and is kept as a watch event, so a watch
//!   resumed from any resourceVersion gets exactly the changes after it, and an exact list at
//!   one sees the pods as they were; [`FakeKube::compact`] makes older versions answer
//!   410 Gone, as etcd compaction does; [`FakeKube::bookmark`] sends the BOOKMARK the server
//!   sends periodically to watches that allow them.

pub mod authz;
mod decode;
pub mod quantity;
mod status;
pub mod validate;
mod watch;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch as gate_watch};

use authz::Attributes;
use decode::Directive;
use watch::{Filter, Pods};

/// The identity requests are authorized as (an agent's service account).
pub const USER: &str = "system:serviceaccount:sd-agent:sd-agent";

/// One request the server received.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: String,
    pub body: Option<Value>,
    /// The `User-Agent` header, when the client sent one.
    pub user_agent: Option<String>,
    /// The bearer token of the `Authorization` header, when the client sent one.
    pub bearer: Option<String>,
}

impl KubeRequest {
    /// A decoded query parameter.
    pub fn param(&self, key: &str) -> Option<String> {
        url_decode_pairs(&self.query)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }

    /// (verb, resource, subresource) as the API server's authorizer sees this request: a GET
    /// of a named object is `get`, of a collection `list` (`watch` with `watch=true`); POST
    /// `create`, PUT `update`, PATCH `patch`, DELETE `delete` (`deletecollection` on a
    /// collection). `None` for non-resource paths (discovery, `/version`). Self-access reviews
    /// (`create selfsubjectaccessreviews`, API group `authorization.k8s.io`) are included
    /// although every authenticated user may create them (`system:basic-user`), so a Role
    /// needs no rule for them.
    pub fn authz(&self) -> Option<(String, String, String)> {
        self.attributes()
            .map(|a| (a.verb, a.resource, a.subresource))
    }

    /// Everything the authorizer decides on (API group, namespace and name too).
    pub fn attributes(&self) -> Option<Attributes> {
        authz::attributes(&self.method, &self.path, &url_decode_pairs(&self.query))
    }
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
}

impl Change {
    /// The pods as they are after this change.
    fn apply_to(&self, pods: &mut Pods) {
        let name = self.object["metadata"]["name"].as_str().unwrap_or_default();
        let key = (self.namespace.clone(), name.to_owned());
        if self.kind == "DELETED" {
            pods.remove(&key);
        } else {
            pods.insert(key, self.object.clone());
        }
    }
}

#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
    /// A BOOKMARK at this resourceVersion, for the watches that allow them.
    Bookmark(u64),
    /// Ends every open watch (as an API server restart or a load balancer timeout would).
    Close,
}

struct Failure {
    method: String,
    target: String,
    code: u16,
    message: String,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    pods: Pods,
    events: Vec<(String, Value)>,
    /// Every change since the last compaction, oldest first.
    history: Vec<Change>,
    /// The pods at the last compaction, and its resourceVersion: older versions are gone.
    base: Pods,
    base_rv: u64,
    requests: Vec<KubeRequest>,
    failures: VecDeque<Failure>,
    /// `verb resource[/subresource]` the identity may not do.
    denied: HashSet<String>,
    /// When set, only requests with `Authorization: Bearer <one of these>` are authenticated;
    /// the rest get 401, as from an API server that does not know the token.
    tokens: Option<HashSet<String>>,
}

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Broadcast>,
    /// Watch streams currently open.
    open_watches: AtomicUsize,
    /// How long a pod create takes, as a real API server's admission and etcd write do.
    create_latency: Mutex<Duration>,
    /// Pod creates being answered now, and the most there have been at once.
    creates_in_flight: AtomicUsize,
    max_creates_in_flight: AtomicUsize,
    /// Holds pod creates back on demand (see [`FakeKube::hold_creates`]).
    gate: gate_watch::Sender<Gate>,
    /// Pod creates waiting at the gate now.
    held_creates: AtomicUsize,
    /// Told of every pod stored, with the moment (see [`FakeKube::creations`]).
    creations: Mutex<Option<mpsc::UnboundedSender<(String, Instant)>>>,
}

/// The create gate: while `held`, creates wait; those that waited in an epoch up to
/// `timed_out_to` are answered 504 when released, as an API server answers a request whose
/// storage write did not finish in time.
#[derive(Debug, Clone, Copy, Default)]
struct Gate {
    held: bool,
    epoch: u64,
    timed_out_to: Option<u64>,
}

/// Counts a pod create as in flight until its answer is ready.
struct CreateInFlight<'a>(&'a Shared);

impl<'a> CreateInFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        let now = shared.creates_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared
            .max_creates_in_flight
            .fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for CreateInFlight<'_> {
    fn drop(&mut self) {
        self.0.creates_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a watch stream as open until the server drops it (client gone, or stream ended).
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change under the store's lock, so a watch subscribing under the same lock
    /// neither misses nor repeats it.
    fn publish(&self, store: &mut Store, kind: &'static str, namespace: &str, object: &Value) {
        let change = Change {
            rv: store.rv,
            kind,
            namespace: namespace.to_owned(),
            object: object.clone(),
        };
        store.history.push(change.clone());
        if store.history.len() > HISTORY_KEPT {
            store.fold_oldest(HISTORY_KEPT / 2);
        }
        let _ = self.tx.send(Broadcast::Change(change));
    }
}

/// Changes the store keeps for watches to resume from, as etcd compacts its history (by
/// default every five minutes on a real cluster): older resourceVersions get 410 Gone.
/// Keeps a long run (a benchmark's hundreds of thousands of changes) in bounded memory.
const HISTORY_KEPT: usize = 20_000;

impl Store {
    /// Compacts the oldest `n` changes into the snapshot (`base`): versions up to the last of
    /// them are gone, as after `compact`, while open watches (past them) stay open.
    fn fold_oldest(&mut self, n: usize) {
        let n = n.min(self.history.len());
        for change in self.history.drain(..n) {
            change.apply_to(&mut self.base);
            self.base_rv = change.rv;
        }
    }
}

/// Containers that cannot start, as the kubelet reports them (build id, container, waiting
/// reason, message): each must fail its build at once, with the pod's events.
pub const CANNOT_START: [(u64, &str, &str, &str); 5] = [
    (
        21,
        "build",
        "ErrImagePull",
        "rpc error: pull access denied for nope",
    ),
    (
        22,
        "build",
        "InvalidImageName",
        "couldn't parse image reference \"NOPE::\"",
    ),
    (
        23,
        "build",
        "CrashLoopBackOff",
        "back-off 10s restarting failed container",
    ),
    (
        24,
        "build",
        "CreateContainerConfigError",
        "secret \"missing\" not found",
    ),
    (25, "launcher", "ErrImagePull", "launcher image not found"),
];

/// The fake API server, on a free port of 127.0.0.1; stopped on drop.
pub struct FakeKube {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKube {
    pub async fn start() -> Self {
        let (tx, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            tx,
            open_watches: AtomicUsize::new(0),
            create_latency: Mutex::new(Duration::ZERO),
            creates_in_flight: AtomicUsize::new(0),
            max_creates_in_flight: AtomicUsize::new(0),
            gate: gate_watch::Sender::new(Gate::default()),
            held_creates: AtomicUsize::new(0),
            creations: Mutex::new(None),
        });
        let app = Router::new()
            .route("/api/v1/pods", get(list_all_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_pods).post(create_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).delete(delete_pod),
            )
            .route("/api/v1/namespaces/{ns}/events", get(list_events))
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                axum::routing::post(review_access),
            )
            .fallback(|| async {
                status::response(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                    None,
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                record,
            ))
            .with_state(Arc::clone(&shared));
        let (url, task) = crate::serve(app).await;
        Self { url, shared, task }
    }

    /// Every pod create from now on takes `latency` before it is answered (a real API server
    /// takes 10–50 ms).
    pub fn set_create_latency(&self, latency: Duration) {
        *self
            .shared
            .create_latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = latency;
    }

    /// Pod creates from now on wait (nothing stored) until [`FakeKube::release_creates`].
    pub fn hold_creates(&self) {
        self.shared.gate.send_modify(|g| g.held = true);
    }

    /// Lets held creates go on; with `time_out`, those held so far are answered
    /// `504 Timeout` without storing anything (their client may be gone: an API server does
    /// not commit a write it did not finish).
    pub fn release_creates(&self, time_out: bool) {
        self.shared.gate.send_modify(|g| {
            if time_out {
                g.timed_out_to = Some(g.epoch);
            }
            g.held = false;
            g.epoch += 1;
        });
    }

    /// Pod creates waiting at the gate now.
    pub fn held_creates(&self) -> usize {
        self.shared.held_creates.load(Ordering::SeqCst)
    }

    /// Every pod stored from now on, by name, with the moment it was stored (one receiver:
    /// a second call replaces the first).
    pub fn creations(&self) -> mpsc::UnboundedReceiver<(String, Instant)> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self
            .shared
            .creations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    // --- assertions ---

    /// The most pod creates that were being answered at the same moment.
    pub fn max_concurrent_creates(&self) -> usize {
        self.shared.max_creates_in_flight.load(Ordering::SeqCst)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every pod, in all namespaces.
    pub fn pods(&self) -> Vec<Value> {
        self.shared.lock().pods.values().cloned().collect()
    }

    /// How many pods there are, in all namespaces.
    pub fn pod_count(&self) -> usize {
        self.shared.lock().pods.len()
    }

    /// The pod named `name` (in any namespace).
    pub fn pod(&self, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .pods
            .iter()
            .find(|((_, n), _)| n == name)
            .map(|(_, p)| p.clone())
    }

    /// Watch streams open right now (a client that stopped watching has closed its stream).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    // --- failures ---

    /// The next request with this method whose `path?query` contains `target` is answered
    /// with `code` and a Status carrying `message` (e.g. `("POST", "/pods", 422, "...")`).
    pub fn fail_next(&self, method: &str, target: &str, code: u16, message: &str) {
        self.shared.lock().failures.push_back(Failure {
            method: method.to_ascii_uppercase(),
            target: target.to_owned(),
            code,
            message: message.to_owned(),
        });
    }

    /// The identity may not `verb` `resource` (e.g. `("get", "pods/log")`) from now on, as
    /// with a Role that lacks the rule: such requests answer 403 Forbidden, and access reviews
    /// of them "not allowed". Everything else is allowed.
    /// From now on, only requests bearing one of `tokens` are served; others get 401.
    pub fn require_tokens<S: Into<String>>(&self, tokens: impl IntoIterator<Item = S>) {
        self.shared.lock().tokens = Some(tokens.into_iter().map(Into::into).collect());
    }

    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denied
            .insert(format!("{verb} {resource}"));
    }

    /// Ends every open watch stream; clients resume from their last resourceVersion.
    pub fn close_watches(&self) {
        let _ = self.shared.tx.send(Broadcast::Close);
    }

    /// Forgets the change history: watches resumed from any older resourceVersion get
    /// 410 Gone and must list again, as do exact lists at one. Open watches are closed.
    pub fn compact(&self) {
        {
            let mut store = self.shared.lock();
            store.base = store.pods.clone();
            store.base_rv = store.rv;
            store.history.clear();
        }
        self.close_watches();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that allows them
    /// (`allowWatchBookmarks=true`), as the server does periodically.
    pub fn bookmark(&self) {
        let store = self.shared.lock();
        let _ = self.shared.tx.send(Broadcast::Bookmark(store.rv));
    }

    /// Every (verb, resource, subresource) the requests so far needed, as the authorizer
    /// sees them ([`KubeRequest::authz`]): what a Role must grant the client.
    pub fn verbs_used(&self) -> BTreeSet<(String, String, String)> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter_map(KubeRequest::authz)
            .collect()
    }

    // --- driving pods, as the kubelet would ---

    /// Changes a pod with `f` and publishes MODIFIED. Panics when there is no such pod.
    pub fn update_pod(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let shared = &self.shared;
        let mut store = shared.lock();
        store.rv += 1;
        let rv = store.rv;
        let (ns, pod) = {
            let Some(((ns, _), pod)) = store.pods.iter_mut().find(|((_, n), _)| n == name) else {
                panic!("fake Kubernetes: no pod named {name}");
            };
            f(pod);
            pod["metadata"]["resourceVersion"] = json!(rv.to_string());
            (ns.clone(), pod.clone())
        };
        shared.publish(&mut store, "MODIFIED", &ns, &pod);
    }

    /// Sets `status.phase`. `Running` also marks the init containers completed and every
    /// container running, as the kubelet reports them.
    pub fn set_phase(&self, name: &str, phase: &str) {
        let now = now();
        self.update_pod(name, |pod| {
            let status = status_of(pod);
            status["phase"] = json!(phase);
            if phase == "Running" {
                status["startTime"] = json!(now);
                let inits = container_statuses(pod, "initContainers", |image| {
                    json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}})
                        .pipe_image(image)
                });
                let apps = container_statuses(pod, "containers", |image| json!({"running": {"startedAt": now}}).pipe_image(image));
                let status = status_of(pod);
                status["initContainerStatuses"] = inits;
                status["containerStatuses"] = apps;
            }
        });
    }

    /// Puts one container (init or not) in `waiting` with this reason, e.g. `ImagePullBackOff`.
    pub fn set_waiting(&self, name: &str, container: &str, reason: &str, message: &str) {
        self.update_pod(name, |pod| {
            let field = if containers(pod, "initContainers")
                .iter()
                .any(|c| c["name"] == container)
            {
                "initContainerStatuses"
            } else {
                "containerStatuses"
            };
            let image = containers(pod, "initContainers")
                .iter()
                .chain(containers(pod, "containers").iter())
                .find(|c| c["name"] == container)
                .and_then(|c| c["image"].as_str())
                .unwrap_or_default()
                .to_owned();
            let entry = json!({
                "name": container, "image": image, "imageID": "", "ready": false, "restartCount": 0,
                "started": false,
                "state": {"waiting": {"reason": reason, "message": message}},
            });
            let status = status_of(pod);
            let list = status[field]
                .as_array_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            let mut list: Vec<Value> = list
                .into_iter()
                .filter(|s| s["name"] != container)
                .collect();
            list.push(entry);
            status[field] = Value::Array(list);
        });
    }

    /// Ends every container with `exit_code`: phase Succeeded (0) or Failed.
    pub fn terminate(&self, name: &str, exit_code: i32) {
        let now = now();
        self.update_pod(name, |pod| {
            let reason = if exit_code == 0 { "Completed" } else { "Error" };
            let inits = container_statuses(pod, "initContainers", |image| {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}).pipe_image(image)
            });
            let apps = container_statuses(pod, "containers", |image| {
                json!({"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}})
                    .pipe_image(image)
            });
            let status = status_of(pod);
            status["phase"] = json!(if exit_code == 0 { "Succeeded" } else { "Failed" });
            status["initContainerStatuses"] = inits;
            status["containerStatuses"] = apps;
        });
    }

    /// Moves the pod's creationTimestamp `by` into the past (publishes MODIFIED), so
    /// age-based rules can be tested without waiting.
    pub fn backdate(&self, name: &str, by: Duration) {
        let then = timestamp_now()
            .checked_sub(SignedDuration::try_from(by).unwrap_or(SignedDuration::ZERO))
            .unwrap_or(Timestamp::UNIX_EPOCH);
        self.update_pod(name, |pod| {
            pod["metadata"]["creationTimestamp"] = json!(format_time(then))
        });
    }

    /// Deletes a pod as `kubectl delete` would (publishes DELETED). `false` when absent.
    pub fn delete(&self, name: &str) -> bool {
        let ns = self
            .shared
            .lock()
            .pods
            .keys()
            .find(|(_, n)| n == name)
            .map(|(ns, _)| ns.clone());
        ns.is_some_and(|ns| remove_pod(&self.shared, &ns, name).is_some())
    }

    /// Removes a pod without telling watches, as if it went while they were down (use with
    /// [`compact`](Self::compact), which makes them list again). `false` when absent.
    pub fn delete_unwatched(&self, name: &str) -> bool {
        let mut store = self.shared.lock();
        let key = store.pods.keys().find(|(_, n)| n == name).cloned();
        let removed = key.and_then(|k| store.pods.remove(&k)).is_some();
        if removed {
            store.rv += 1;
        }
        removed
    }

    /// Records a Warning event about `pod` (found in any namespace, else `default`).
    pub fn add_event(&self, pod: &str, reason: &str, message: &str) {
        let now = now();
        let mut store = self.shared.lock();
        let ns = store
            .pods
            .keys()
            .find(|(_, n)| n == pod)
            .map_or_else(|| "default".to_owned(), |(ns, _)| ns.clone());
        store.rv += 1;
        store.uid += 1;
        let event = json!({
            "kind": "Event", "apiVersion": "v1",
            "metadata": {
                "name": format!("{pod}.{:x}", store.uid), "namespace": ns,
                "resourceVersion": store.rv.to_string(), "uid": format!("event-{}", store.uid),
                "creationTimestamp": now,
            },
            "involvedObject": {"kind": "Pod", "namespace": ns, "name": pod, "apiVersion": "v1"},
            "reason": reason, "message": message, "type": "Warning", "count": 1,
            "source": {"component": "kubelet"},
            "firstTimestamp": now, "lastTimestamp": now,
        });
        store.events.push((ns, event));
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.close_watches();
        self.task.abort();
    }
}

// === handlers ===

/// Records every request, then answers it as the server would before any handler: 403 when
/// the identity may not do it, else an injected failure when one matches.
async fn record(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let request = KubeRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        body: serde_json::from_slice(&bytes).ok(),
        user_agent: parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        bearer: parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned),
    };
    let refusal = {
        let mut store = shared.lock();
        store.requests.push(request.clone());
        unauthenticated(&store, &request)
            .or_else(|| forbidden(&store, &request))
            .or_else(|| injected_failure(&mut store, &request))
    };
    if let Some(response) = refusal {
        return response;
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The 403 for a request the identity may not make (self-access reviews are always allowed).
/// The 401 of a request whose token the server does not know (when tokens are required).
fn unauthenticated(store: &Store, request: &KubeRequest) -> Option<Response> {
    let tokens = store.tokens.as_ref()?;
    let known = request.bearer.as_ref().is_some_and(|t| tokens.contains(t));
    (!known).then(|| status::response(401, "Unauthorized", "Unauthorized", None))
}

fn forbidden(store: &Store, request: &KubeRequest) -> Option<Response> {
    let attrs = request.attributes()?;
    (!attrs.is_self_review() && store.denied.contains(&attrs.rule()))
        .then(|| status::respond(status::forbidden(&attrs, USER)))
}

/// The first [`FakeKube::fail_next`] failure matching the request, consumed.
fn injected_failure(store: &mut Store, request: &KubeRequest) -> Option<Response> {
    let target = format!("{}?{}", request.path, request.query);
    let index = store
        .failures
        .iter()
        .position(|f| f.method == request.method && target.contains(&f.target))?;
    let f = store.failures.remove(index)?;
    Some(status::response(
        f.code,
        status::reason_for(f.code),
        &f.message,
        None,
    ))
}

async fn list_all_pods(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pods_or_watch(shared, None, q)
}

async fn list_pods(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pods_or_watch(shared, Some(ns), q)
}

fn pods_or_watch(shared: Arc<Shared>, ns: Option<String>, q: HashMap<String, String>) -> Response {
    let filter = Filter::new(ns, &q);
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch::watch(shared, filter, &q);
    }
    let store = shared.lock();
    let (rv, pods) = match watch::pods_at(&store, &q) {
        Ok(at) => at,
        Err(refusal) => return status::respond(refusal),
    };
    let items: Vec<Value> = pods
        .iter()
        .filter(|((ns, _), pod)| filter.matches(ns, pod))
        .map(|(_, pod)| pod.clone())
        .collect();
    list_response("PodList", rv, items, &q)
}

async fn list_events(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let filter = Filter::new(Some(ns), &q);
    let store = shared.lock();
    let items: Vec<Value> = store
        .events
        .iter()
        .filter(|(ns, e)| filter.matches(ns, e))
        .map(|(_, e)| e.clone())
        .collect();
    list_response("EventList", store.rv, items, &q)
}

/// A list honouring `limit` and `continue` (the continue token is the next offset).
fn list_response(kind: &str, rv: u64, items: Vec<Value>, q: &HashMap<String, String>) -> Response {
    let start = q
        .get("continue")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0)
        .min(items.len());
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let end = limit.map_or(items.len(), |l| (start + l).min(items.len()));
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    let page = items[start..end].to_vec();
    (
        StatusCode::OK,
        axum::Json(json!({"kind": kind, "apiVersion": "v1", "metadata": metadata, "items": page})),
    )
        .into_response()
}

async fn get_pod(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match shared.lock().pods.get(&(ns, name.clone())) {
        Some(pod) => (StatusCode::OK, axum::Json(pod.clone())).into_response(),
        None => status::respond(status::not_found(&name)),
    }
}

async fn delete_pod(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match remove_pod(&shared, &ns, &name) {
        Some(pod) => (StatusCode::OK, axum::Json(pod)).into_response(),
        None => status::respond(status::not_found(&name)),
    }
}

fn remove_pod(shared: &Shared, ns: &str, name: &str) -> Option<Value> {
    let mut store = shared.lock();
    let mut pod = store.pods.remove(&(ns.to_owned(), name.to_owned()))?;
    store.rv += 1;
    pod["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    pod["metadata"]["deletionTimestamp"] = json!(now());
    shared.publish(&mut store, "DELETED", ns, &pod);
    Some(pod)
}

/// `POST …/selfsubjectaccessreviews`: the review with `status.allowed` filled in, as the
/// authorizer decides real requests.
async fn review_access(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(&body) else {
        return not_json();
    };
    let attributes = &review["spec"]["resourceAttributes"];
    let mut what = attributes["resource"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(sub) = attributes["subresource"].as_str().filter(|s| !s.is_empty()) {
        what = format!("{what}/{sub}");
    }
    let key = format!("{} {what}", attributes["verb"].as_str().unwrap_or_default());
    let allowed = !shared.lock().denied.contains(&key);
    review["status"] = json!({"allowed": allowed});
    (StatusCode::CREATED, axum::Json(review)).into_response()
}

/// `POST …/namespaces/{ns}/pods`: decode (400), name, validate (422), store (409 if taken).
async fn create_pod(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let _in_flight = CreateInFlight::new(&shared);
    let latency = *shared
        .create_latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if !pass_gate(&shared).await {
        return status::response(
            504,
            "Timeout",
            "Timeout: request did not complete within requested timeout - context deadline exceeded",
            None,
        );
    }
    let directive = match Directive::from_param(q.get("fieldValidation").map(String::as_str)) {
        Ok(d) => d,
        Err(refusal) => return status::respond(refusal),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return not_json();
    };
    if !body.is_object() {
        return status::response(
            400,
            "BadRequest",
            "the body of the request must be a Pod",
            None,
        );
    }
    let decoded = match decode::decode_pod(body, directive) {
        Ok(decoded) => decoded,
        Err(error) => return status::respond(status::cannot_decode_pod(&error)),
    };
    let mut pod = decoded.pod;
    if let Some(body_ns) = pod["metadata"]["namespace"].as_str()
        && body_ns != ns
    {
        return status::response(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        );
    }
    let mut store = shared.lock();
    name_pod(&mut pod, &ns, &mut store);
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let causes = validate::validate_pod(&pod);
    if !causes.is_empty() {
        return status::respond(status::invalid_pod(&name, &causes));
    }
    if store.pods.contains_key(&(ns.clone(), name.clone())) {
        return status::respond(status::already_exists(&name));
    }
    store_pod(&shared, &mut store, &ns, &name, &mut pod);
    created(&pod, &decoded.warnings)
}

/// Waits while the gate is held; false when the wait ended in a timeout.
async fn pass_gate(shared: &Shared) -> bool {
    let mut gate = shared.gate.subscribe();
    let mine = {
        let g = gate.borrow_and_update();
        if !g.held {
            return true;
        }
        g.epoch
    };
    shared.held_creates.fetch_add(1, Ordering::SeqCst);
    let passed = loop {
        if gate.changed().await.is_err() {
            break false;
        }
        let g = *gate.borrow_and_update();
        if g.timed_out_to.is_some_and(|to| to >= mine) {
            break false;
        }
        // Released (perhaps held again since, in a later epoch).
        if !g.held || g.epoch > mine {
            break true;
        }
    };
    shared.held_creates.fetch_sub(1, Ordering::SeqCst);
    passed
}

/// Sets the namespace, and a name from generateName (its prefix and 5 characters) when there
/// is none.
fn name_pod(pod: &mut Value, ns: &str, store: &mut Store) {
    store.uid += 1;
    let metadata = &mut pod["metadata"];
    metadata["namespace"] = json!(ns);
    let named = metadata["name"].as_str().is_some_and(|n| !n.is_empty());
    if let (false, Some(prefix)) = (named, metadata["generateName"].as_str()) {
        metadata["name"] = json!(format!("{prefix}{:05x}", store.uid));
    }
}

/// Stores a new pod with what the server adds (uid, resourceVersion, timestamps, status).
fn store_pod(shared: &Shared, store: &mut Store, ns: &str, name: &str, pod: &mut Value) {
    store.rv += 1;
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    let metadata = &mut pod["metadata"];
    metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", store.uid));
    metadata["resourceVersion"] = json!(store.rv.to_string());
    metadata["creationTimestamp"] = json!(now());
    pod["status"] = json!({"phase": "Pending", "qosClass": "Guaranteed"});
    store
        .pods
        .insert((ns.to_owned(), name.to_owned()), pod.clone());
    shared.publish(store, "ADDED", ns, pod);
    if let Some(tx) = shared
        .creations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
    {
        let _ = tx.send((name.to_owned(), Instant::now()));
    }
}

/// 201 with the pod, and a `Warning` header per warning.
fn created(pod: &Value, warnings: &[String]) -> Response {
    let mut headers = HeaderMap::new();
    for warning in warnings {
        if let Some(value) = status::warning_header(warning) {
            headers.append(status::WARNING, value);
        }
    }
    (StatusCode::CREATED, headers, axum::Json(pod.clone())).into_response()
}

// === helpers ===

/// What the API server answers a body that is not JSON.
fn not_json() -> Response {
    status::response(
        400,
        "BadRequest",
        "the body of the request was not valid JSON",
        None,
    )
}

/// Kubernetes' time format (RFC 3339, whole seconds, UTC).
fn format_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn now() -> String {
    format_time(timestamp_now())
}

/// `Timestamp::now` needs jiff's `std` feature, which this crate does not ask for.
fn timestamp_now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    Timestamp::new(secs, nanos).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn status_of(pod: &mut Value) -> &mut Value {
    if !pod["status"].is_object() {
        pod["status"] = json!({});
    }
    &mut pod["status"]
}

fn containers(pod: &Value, field: &str) -> Vec<Value> {
    pod["spec"][field].as_array().cloned().unwrap_or_default()
}

/// A status entry per container of `spec.{field}`, with the state `state(image)` builds.
fn container_statuses(pod: &Value, field: &str, state: impl Fn(&str) -> Value) -> Value {
    Value::Array(
        containers(pod, field)
            .iter()
            .map(|c| {
                let image = c["image"].as_str().unwrap_or_default();
                let mut entry = state(image);
                entry["name"] = c["name"].clone();
                entry
            })
            .collect(),
    )
}

/// Wraps a container state into a ContainerStatus with the fields the API always sets.
trait PipeImage {
    fn pipe_image(self, image: &str) -> Value;
}

impl PipeImage for Value {
    fn pipe_image(self, image: &str) -> Value {
        let running = self.get("running").is_some();
        json!({
            "image": image, "imageID": "", "ready": running, "restartCount": 0,
            "started": running, "state": self,
        })
    }
}

fn url_decode_pairs(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}
