//! A fake Kubernetes API server: enough of core/v1 pods and events for the real `kube` client
//! and its runtime watcher (create, get, list with selectors and paging, watch with
//! resourceVersions, delete). Tests drive what the kubelet would do (phases, container
//! states, events) and assert on every request it received.
//!
//! Each object change gets the next resourceVersion and is kept as a watch event, so a watch
//! resumed from any resourceVersion gets exactly the changes after it; [`FakeKube::compact`]
//! makes older versions answer 410 Gone, as etcd compaction does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: String,
    pub body: Option<Value>,
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
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
}

#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
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
    pods: BTreeMap<(String, String), Value>,
    events: Vec<(String, Value)>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    floor: u64,
    requests: Vec<KubeRequest>,
    failures: VecDeque<Failure>,
    /// `verb resource[/subresource]` that access reviews answer "not allowed".
    denied: std::collections::HashSet<String>,
}

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Broadcast>,
    /// Watch streams currently open.
    open_watches: AtomicUsize,
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
        let _ = self.tx.send(Broadcast::Change(change));
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
                status(
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

    // --- assertions ---

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every pod, in all namespaces.
    pub fn pods(&self) -> Vec<Value> {
        self.shared.lock().pods.values().cloned().collect()
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

    /// Access reviews (SelfSubjectAccessReview) of `verb` on `resource` (e.g. `pods/log`) answer
    /// "not allowed" from now on, as for a Role that lacks the rule; everything else is allowed.
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
    /// 410 Gone and must list again. Open watches are closed.
    pub fn compact(&self) {
        {
            let mut store = self.shared.lock();
            store.floor = store.rv + 1;
            store.history.clear();
        }
        self.close_watches();
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

/// Records every request, and answers it with an injected failure when one matches.
async fn record(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let method = parts.method.as_str().to_owned();
    let failure = {
        let mut store = shared.lock();
        store.requests.push(KubeRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: serde_json::from_slice(&bytes).ok(),
        });
        let target = format!("{path}?{query}");
        let index = store
            .failures
            .iter()
            .position(|f| f.method == method && target.contains(&f.target));
        index.and_then(|i| store.failures.remove(i))
    };
    if let Some(f) = failure {
        return status(f.code, reason_for(f.code), &f.message, None);
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
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
    let filter = Filter {
        namespace: ns,
        labels: q.get("labelSelector").cloned().unwrap_or_default(),
        fields: q.get("fieldSelector").cloned().unwrap_or_default(),
    };
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch(shared, filter, &q);
    }
    let store = shared.lock();
    let items: Vec<Value> = store
        .pods
        .iter()
        .filter(|((ns, _), pod)| filter.matches(ns, pod))
        .map(|(_, pod)| pod.clone())
        .collect();
    list_response("PodList", store.rv, items, &q)
}

async fn list_events(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let filter = Filter {
        namespace: Some(ns),
        labels: q.get("labelSelector").cloned().unwrap_or_default(),
        fields: q.get("fieldSelector").cloned().unwrap_or_default(),
    };
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
        None => not_found(&name),
    }
}

async fn delete_pod(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match remove_pod(&shared, &ns, &name) {
        Some(pod) => (StatusCode::OK, axum::Json(pod)).into_response(),
        None => not_found(&name),
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

/// `POST …/selfsubjectaccessreviews`: the review with `status.allowed` filled in.
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
    (axum::http::StatusCode::CREATED, axum::Json(review)).into_response()
}

async fn create_pod(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(mut pod) = serde_json::from_slice::<Value>(&body) else {
        return not_json();
    };
    if !pod.is_object() {
        return status(
            400,
            "BadRequest",
            "the body of the request must be a Pod",
            None,
        );
    }
    let mut store = shared.lock();
    store.uid += 1;
    let name = match pod["metadata"]["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => match pod["metadata"]["generateName"].as_str() {
            Some(g) => format!("{g}{:05x}", store.uid),
            None => {
                return invalid(
                    "",
                    "metadata.name: Required value: name or generateName is required",
                );
            }
        },
    };
    if !is_dns_subdomain(&name) {
        return invalid(
            &name,
            &format!(
                "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        );
    }
    if let Some(body_ns) = pod["metadata"]["namespace"].as_str()
        && body_ns != ns
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        );
    }
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        return invalid(&name, "spec.containers: Required value");
    }
    for (i, c) in containers.iter().enumerate() {
        if c["image"].as_str().is_none_or(str::is_empty) {
            return invalid(
                &name,
                &format!("spec.containers[{i}].image: Required value"),
            );
        }
    }
    if store.pods.contains_key(&(ns.clone(), name.clone())) {
        return status(
            409,
            "AlreadyExists",
            &format!("pods \"{name}\" already exists"),
            Some(json!({"name": name, "kind": "pods"})),
        );
    }
    store.rv += 1;
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    let metadata = &mut pod["metadata"];
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(ns);
    metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", store.uid));
    metadata["resourceVersion"] = json!(store.rv.to_string());
    metadata["creationTimestamp"] = json!(now());
    pod["status"] = json!({"phase": "Pending", "qosClass": "Guaranteed"});
    store.pods.insert((ns.clone(), name), pod.clone());
    shared.publish(&mut store, "ADDED", &ns, &pod);
    (StatusCode::CREATED, axum::Json(pod)).into_response()
}

// === watch ===

/// Streams `{"type","object"}` lines: the backlog the resourceVersion asks for, then live
/// changes, until `timeoutSeconds`, a [`FakeKube::close_watches`], or the client goes away.
fn watch(shared: Arc<Shared>, filter: Filter, q: &HashMap<String, String>) -> Response {
    let rv = q
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (backlog, rx, done) = {
        let store = shared.lock();
        let rx = shared.tx.subscribe();
        let mut backlog = VecDeque::new();
        let mut done = false;
        if rv.is_empty() || rv == "0" || initial {
            for ((ns, _), pod) in &store.pods {
                if filter.matches(ns, pod) {
                    backlog.push_back(line("ADDED", pod));
                }
            }
            if initial {
                let mark = json!({"kind": "Pod", "apiVersion": "v1", "metadata": {
                    "resourceVersion": store.rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                }});
                backlog.push_back(line("BOOKMARK", &mark));
            }
        } else {
            match rv.parse::<u64>() {
                Ok(from) if from + 1 >= store.floor => {
                    for c in store.history.iter().filter(|c| c.rv > from) {
                        if filter.matches(&c.namespace, &c.object) {
                            backlog.push_back(line(c.kind, &c.object));
                        }
                    }
                }
                _ => {
                    let gone = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {rv} ({})", store.floor.saturating_sub(1)),
                        "reason": "Expired", "code": 410,
                    });
                    backlog.push_back(line("ERROR", &gone));
                    done = true;
                }
            }
        }
        (backlog, rx, done)
    };
    let cursor = Cursor {
        _open: OpenWatch::new(Arc::clone(&shared)),
        backlog,
        rx,
        filter,
        deadline: tokio::time::Instant::now() + timeout,
        done,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        if let Some(next) = c.backlog.pop_front() {
            return Some((Ok::<Bytes, Infallible>(next), c));
        }
        if c.done {
            return None;
        }
        loop {
            match tokio::time::timeout_at(c.deadline, c.rx.recv()).await {
                Ok(Ok(Broadcast::Change(change))) => {
                    if c.filter.matches(&change.namespace, &change.object) {
                        let next = line(change.kind, &change.object);
                        return Some((Ok(next), c));
                    }
                }
                // Closed, lagged behind (the client resumes from its last version), or timed out.
                Ok(Ok(Broadcast::Close) | Err(_)) | Err(_) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            status(
                500,
                "InternalError",
                "cannot build the watch response",
                None,
            )
        })
}

struct Cursor {
    _open: OpenWatch,
    backlog: VecDeque<Bytes>,
    rx: broadcast::Receiver<Broadcast>,
    filter: Filter,
    deadline: tokio::time::Instant,
    done: bool,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

// === selectors ===

/// Namespace, equality-based label selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`) and field
/// selector (`involvedObject.name=x`, `metadata.name!=y`, ...).
struct Filter {
    namespace: Option<String>,
    labels: String,
    fields: String,
}

impl Filter {
    fn matches(&self, ns: &str, object: &Value) -> bool {
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        let label = |key: &str| {
            object["metadata"]["labels"][key]
                .as_str()
                .map(str::to_owned)
        };
        let field = |path: &str| {
            let pointer = format!("/{}", path.replace('.', "/"));
            object.pointer(&pointer).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        requirements(&self.labels).all(|r| r.holds(label))
            && requirements(&self.fields).all(|r| r.holds(field))
    }
}

enum Requirement<'a> {
    Equals(&'a str, &'a str),
    NotEquals(&'a str, &'a str),
    Exists(&'a str),
    Absent(&'a str),
}

fn requirements(selector: &str) -> impl Iterator<Item = Requirement<'_>> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|r| {
            if let Some((k, v)) = r.split_once("!=") {
                Requirement::NotEquals(k.trim(), v.trim())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                Requirement::Equals(k.trim(), v.trim())
            } else if let Some(k) = r.strip_prefix('!') {
                Requirement::Absent(k.trim())
            } else {
                Requirement::Exists(r)
            }
        })
}

impl Requirement<'_> {
    fn holds(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Equals(k, v) => get(k).as_deref() == Some(*v),
            Requirement::NotEquals(k, v) => get(k).as_deref() != Some(*v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
        }
    }
}

// === helpers ===

/// What the API server answers a body that is not JSON.
fn not_json() -> Response {
    status(
        400,
        "BadRequest",
        "the body of the request was not valid JSON",
        None,
    )
}

fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

fn not_found(name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("pods \"{name}\" not found"),
        Some(json!({"name": name, "kind": "pods"})),
    )
}

fn invalid(name: &str, cause: &str) -> Response {
    status(
        422,
        "Invalid",
        &format!("Pod \"{name}\" is invalid: {cause}"),
        Some(json!({"name": name, "kind": "Pod"})),
    )
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
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
