//! resourceVersions: watches (the backlog after a version, live changes, bookmarks for the
//! clients that allow them, 410 Gone after compaction), lists at a version
//! (`resourceVersionMatch`), and the label and field selectors both use.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::{Broadcast, OpenWatch, Shared, Store, status};

/// Pods by (namespace, name).
pub(super) type Pods = BTreeMap<(String, String), Value>;

/// The watch event ending a watch that asked for a compacted resourceVersion.
fn too_old(asked: &str, oldest: u64) -> Value {
    status::expired(&format!("too old resource version: {asked} ({oldest})"))
}

/// A bookmark: only the kind and a resourceVersion, as the server sends them.
pub(super) fn bookmark_object(rv: u64) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}})
}

/// Streams `{"type","object"}` lines: the backlog the resourceVersion asks for, then live
/// changes (and bookmarks when `allowWatchBookmarks=true`), until `timeoutSeconds`, a
/// [`FakeKube::close_watches`](super::FakeKube::close_watches), or the client goes away.
pub(super) fn watch(shared: Arc<Shared>, filter: Filter, q: &HashMap<String, String>) -> Response {
    let rv = q
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (backlog, rx, done) = {
        let store = shared.lock();
        let rx = shared.tx.subscribe();
        let (backlog, done) = backlog(&store, &filter, rv, initial);
        (backlog, rx, done)
    };
    let cursor = Cursor {
        _open: OpenWatch::new(Arc::clone(&shared)),
        backlog,
        rx,
        filter,
        bookmarks,
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
        let next = c.next_event().await?;
        Some((Ok(next), c))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            status::response(
                500,
                "InternalError",
                "cannot build the watch response",
                None,
            )
        })
}

/// The events a new watch starts with, and whether it ends after them (410).
fn backlog(store: &Store, filter: &Filter, rv: &str, initial: bool) -> (VecDeque<Bytes>, bool) {
    let mut backlog = VecDeque::new();
    if rv.is_empty() || rv == "0" || initial {
        for ((ns, _), pod) in &store.pods {
            if filter.matches(ns, pod) {
                backlog.push_back(line("ADDED", pod));
            }
        }
        if initial {
            let mut mark = bookmark_object(store.rv);
            mark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            backlog.push_back(line("BOOKMARK", &mark));
        }
        return (backlog, false);
    }
    match rv.parse::<u64>() {
        Ok(from) if from >= store.base_rv => {
            for c in store.history.iter().filter(|c| c.rv > from) {
                if filter.matches(&c.namespace, &c.object) {
                    backlog.push_back(line(c.kind, &c.object));
                }
            }
            (backlog, false)
        }
        _ => {
            backlog.push_back(line("ERROR", &too_old(rv, store.base_rv)));
            (backlog, true)
        }
    }
}

struct Cursor {
    _open: OpenWatch,
    backlog: VecDeque<Bytes>,
    rx: broadcast::Receiver<Broadcast>,
    filter: Filter,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    done: bool,
}

impl Cursor {
    /// The next line for this watch; `None` ends it (closed, lagged behind — the client
    /// resumes from its last version — or timed out).
    async fn next_event(&mut self) -> Option<Bytes> {
        loop {
            match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Ok(Ok(Broadcast::Change(change))) => {
                    if self.filter.matches(&change.namespace, &change.object) {
                        return Some(line(change.kind, &change.object));
                    }
                }
                Ok(Ok(Broadcast::Bookmark(rv))) => {
                    if self.bookmarks {
                        return Some(line("BOOKMARK", &bookmark_object(rv)));
                    }
                }
                Ok(Ok(Broadcast::Close) | Err(_)) | Err(_) => return None,
            }
        }
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The pods a list answers and the list's resourceVersion: the current ones, unless the
/// list asks for an exact version (rebuilt from the compaction snapshot and the history
/// since). Too old is 410, ahead of the store 504, as on the server.
pub(super) fn pods_at(store: &Store, q: &HashMap<String, String>) -> Result<(u64, Pods), Value> {
    let asked = q
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    if asked.is_empty() || (asked == "0" && !exact) {
        return Ok((store.rv, store.pods.clone()));
    }
    let Ok(rv) = asked.parse::<u64>() else {
        return Err(status::body(
            400,
            "BadRequest",
            &format!(
                "invalid resource version: strconv.ParseUint: parsing {}: invalid syntax",
                super::validate::go_quote(asked)
            ),
            None,
        ));
    };
    if rv > store.rv {
        return Err(status::too_large_resource_version(rv, store.rv));
    }
    if !exact {
        return Ok((store.rv, store.pods.clone()));
    }
    if rv < store.base_rv {
        return Err(status::expired(
            "The resourceVersion for the provided list is too old.",
        ));
    }
    let mut pods = store.base.clone();
    for change in store.history.iter().take_while(|c| c.rv <= rv) {
        change.apply_to(&mut pods);
    }
    Ok((rv, pods))
}

// === selectors ===

/// Namespace, equality-based label selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`) and field
/// selector (`involvedObject.name=x`, `metadata.name!=y`, ...).
pub(super) struct Filter {
    pub namespace: Option<String>,
    pub labels: String,
    pub fields: String,
}

impl Filter {
    pub fn new(namespace: Option<String>, q: &HashMap<String, String>) -> Self {
        Self {
            namespace,
            labels: q.get("labelSelector").cloned().unwrap_or_default(),
            fields: q.get("fieldSelector").cloned().unwrap_or_default(),
        }
    }

    pub fn matches(&self, ns: &str, object: &Value) -> bool {
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
