//! Following build pods: what each pod's state means for its build ([`assess`], pure), the
//! bookkeeping that reports each status once per build ([`Tracker`]), and the tasks that feed
//! them: a pod watch, and a periodic sweep for the conditions that only time reveals (image
//! pull grace, pending timeout, finished-pod TTL).
//!
//! Times come from the pods (creationTimestamp, container finishedAt), so an agent restarted
//! mid-build keeps the same deadlines.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Event as CoreEvent, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::pod::{BUILD_CONTAINER, BUILD_SELECTOR, build_id_of};
use super::{Inner, describe};
use crate::config::KubernetesConfig;
use crate::executor::{BuildEvent, BuildStatus};

/// Waiting reasons that will not resolve by themselves: the build fails at once.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
];
/// Waiting reason that may resolve (registry hiccup): tolerated for `image_pull_grace`.
const PULL_BACKOFF: &str = "ImagePullBackOff";
/// Most recent pod events quoted in a failure reason.
const EVENTS_QUOTED: usize = 8;
/// Failure reasons end up in Screwdriver's `statusMessage`: keep them readable.
const REASON_MAX_CHARS: usize = 1500;
/// How many stopped build ids are remembered, so their pods' last changes stay silent.
const STOPPED_REMEMBERED: usize = 4096;

/// What a pod's current state means for its build.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to report yet.
    Waiting,
    Running,
    Finished {
        at: Option<Timestamp>,
    },
    Failed {
        reason: String,
        report: bool,
        at: Option<Timestamp>,
    },
    /// The pod cannot start: the build fails with this summary (completed with the pod's
    /// events) and the pod is deleted.
    CannotStart(String),
}

/// Judges one pod, `age` after it was created.
pub fn assess(pod: &Pod, age: Duration, config: &KubernetesConfig) -> Verdict {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    match phase {
        "Succeeded" => {
            return Verdict::Finished {
                at: finished_at(pod),
            };
        }
        "Failed" => return failed(pod),
        _ => {}
    }
    if pod.metadata.deletion_timestamp.is_some() {
        // Going away (stopped, or failed by us): its end is dealt with when it is gone.
        return Verdict::Waiting;
    }
    let statuses = status.into_iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    for cs in statuses {
        let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if FATAL_WAITING.contains(&reason)
            || (reason == PULL_BACKOFF && age >= config.image_pull_grace)
        {
            return Verdict::CannotStart(format!(
                "Build failed to start: {}",
                waiting_detail(pod, cs)
            ));
        }
    }
    if phase == "Pending" && age >= config.pending_timeout {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let mut summary = format!(
            "Build failed to start: pod {name} still Pending after {:?} (pending_timeout)",
            config.pending_timeout
        );
        if let Some(detail) = pending_detail(pod) {
            summary.push_str(": ");
            summary.push_str(&detail);
        }
        return Verdict::CannotStart(summary);
    }
    let build_running = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == BUILD_CONTAINER))
        .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    if phase == "Running" || build_running {
        return Verdict::Running;
    }
    Verdict::Waiting
}

/// Phase Failed: the launcher reported its own result, unless Kubernetes ended the pod itself
/// (deadline, eviction, out of memory) and so the launcher never got to.
fn failed(pod: &Pod) -> Verdict {
    let at = finished_at(pod);
    let status = pod.status.as_ref();
    if let Some(reason) = status
        .and_then(|s| s.reason.as_deref())
        .filter(|r| !r.is_empty())
    {
        let message = status
            .and_then(|s| s.message.as_deref())
            .unwrap_or_default();
        let what = match reason {
            "DeadlineExceeded" => {
                "Build failed: it outlived its timeout and the launcher did not end it, so Kubernetes did at the pod's deadline (timeout + grace period + executor.kubernetes.timeout_margin)"
            }
            "Evicted" => "Build failed: its pod was evicted from the node",
            _ => "Build failed: Kubernetes ended its pod",
        };
        let reason = if message.is_empty() {
            format!("{what} ({reason})")
        } else {
            format!("{what} ({reason}): {message}")
        };
        return Verdict::Failed {
            reason,
            report: true,
            at,
        };
    }
    let terminated = build_status(pod)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    match terminated {
        Some(t) if t.reason.as_deref() == Some("OOMKilled") => Verdict::Failed {
            reason: "Build failed: the build container ran out of memory (OOMKilled); ask for more with the screwdriver.cd/ram annotation".into(),
            report: true,
            at,
        },
        Some(t) => Verdict::Failed {
            reason: format!("build container exited with code {}", t.exit_code),
            report: false,
            at,
        },
        // The build container never ended, so the launcher never ran: nobody told Screwdriver.
        None => {
            let init = pod
                .status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .into_iter()
                .flatten()
                .find_map(|cs| {
                    let t = cs.state.as_ref()?.terminated.as_ref()?;
                    (t.exit_code != 0).then_some((cs.name.as_str(), t))
                });
            let reason = match init {
                Some((name, t)) => format!(
                    "Build failed to start: init container {name} exited with code {}{}",
                    t.exit_code,
                    t.message
                        .as_deref()
                        .filter(|m| !m.is_empty())
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                None => "Build failed to start: its pod failed before the build container ran"
                    .into(),
            };
            Verdict::Failed {
                reason,
                report: true,
                at,
            }
        }
    }
}

/// The node a pod was placed on and when (its `PodScheduled` condition; now when the API
/// server did not say), once it has one.
fn scheduled(pod: &Pod) -> Option<(String, String)> {
    let node = pod
        .spec
        .as_ref()?
        .node_name
        .clone()
        .filter(|n| !n.is_empty())?;
    let at = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|all| all.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map_or_else(Timestamp::now, |t| t.0);
    Some((node, at.to_string()))
}

fn build_status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == BUILD_CONTAINER)
}

/// When the build container ended (for the finished-pod TTL).
fn finished_at(pod: &Pod) -> Option<Timestamp> {
    build_status(pod)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .finished_at
        .as_ref()
        .map(|t| t.0)
}

/// `ImagePullBackOff (image "nope:1"): Back-off pulling image ...`; other containers than the
/// build's are named.
fn waiting_detail(pod: &Pod, cs: &ContainerStatus) -> String {
    let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
    let reason = waiting
        .and_then(|w| w.reason.as_deref())
        .unwrap_or("Waiting");
    let message = waiting
        .and_then(|w| w.message.as_deref())
        .unwrap_or_default();
    let image = Some(cs.image.as_str())
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == cs.name)
                .and_then(|c| c.image.clone())
        });
    let mut what = String::new();
    if cs.name != BUILD_CONTAINER {
        what.push_str(&format!("container {}, ", cs.name));
    }
    what.push_str(&format!("image {:?}", image.unwrap_or_default()));
    if message.is_empty() {
        format!("{reason} ({what})")
    } else {
        format!("{reason} ({what}): {message}")
    }
}

/// Why a pod is still pending: a waiting container, else the scheduler's condition.
fn pending_detail(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find(|cs| {
            cs.state
                .as_ref()
                .is_some_and(|s| s.waiting.as_ref().is_some_and(|w| w.reason.is_some()))
        });
    if let Some(cs) = waiting {
        return Some(waiting_detail(pod, cs));
    }
    let scheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status != "True")?;
    Some(format!(
        "{}: {}",
        scheduled.reason.as_deref().unwrap_or("NotScheduled"),
        scheduled.message.as_deref().unwrap_or_default()
    ))
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

fn creation(pod: &Pod) -> Option<Timestamp> {
    pod.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// The reason sent with a build that cannot start: the summary, then the pod's recent events.
fn compose(summary: &str, events: &str) -> String {
    let text = if events.is_empty() {
        summary.to_owned()
    } else {
        format!("{summary}. Pod events: {events}")
    };
    let text = crate::executor::scrub_tokens(&text, None);
    match text.char_indices().nth(REASON_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// `Reason: message` of the most recent events, oldest first.
fn format_events(mut events: Vec<CoreEvent>) -> String {
    let when = |e: &CoreEvent| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.event_time.as_ref().map(|t| t.0))
            .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
            .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    events.sort_by_key(|e| when(e));
    let mut lines: Vec<String> = Vec::new();
    for e in &events {
        let mut line = format!(
            "{}: {}",
            e.reason.as_deref().unwrap_or("Event"),
            e.message.as_deref().unwrap_or_default().trim()
        );
        if let Some(n) = e.count.filter(|n| *n > 1) {
            line.push_str(&format!(" (x{n})"));
        }
        if lines.last() != Some(&line) {
            lines.push(line);
        }
    }
    let skip = lines.len().saturating_sub(EVENTS_QUOTED);
    lines[skip..].join("; ")
}

// === Tracker ===

/// What this executor knows of each build pod, so every status goes out once.
#[derive(Default)]
pub(super) struct Tracker {
    builds: HashMap<u64, Build>,
    stopped: VecDeque<u64>,
}

struct Build {
    pod_name: String,
    created: Timestamp,
    pod: Option<Pod>,
    running_sent: bool,
    /// Its node was sent to Screwdriver as the build's stats.
    scheduled_sent: bool,
    /// Its end (Finished/Failed) was reported or is being reported.
    ended: bool,
    ended_at: Option<Timestamp>,
    /// The pod should go (cannot start, or finished past its TTL).
    delete_wanted: bool,
    /// A delete call is under way (or done, until the watch sees the pod go).
    deleting: bool,
    /// Stopped on request: nothing more is reported for it.
    stopping: bool,
}

impl Build {
    fn new(pod_name: &str, created: Timestamp) -> Self {
        Self {
            pod_name: pod_name.to_owned(),
            created,
            pod: None,
            running_sent: false,
            scheduled_sent: false,
            ended: false,
            ended_at: None,
            delete_wanted: false,
            deleting: false,
            stopping: false,
        }
    }
}

impl Tracker {
    pub(super) fn in_flight(&self) -> usize {
        self.builds
            .values()
            .filter(|b| !b.ended && !b.stopping)
            .count()
    }

    /// `stop` was asked for this build.
    pub(super) fn stopping(&mut self, build_id: u64) {
        if !self.stopped.contains(&build_id) {
            if self.stopped.len() >= STOPPED_REMEMBERED {
                self.stopped.pop_front();
            }
            self.stopped.push_back(build_id);
        }
        if let Some(b) = self.builds.get_mut(&build_id) {
            b.stopping = true;
        }
    }

    /// Known builds whose pods a fresh listing did not contain.
    fn missing(&self, listed: &HashSet<u64>) -> Vec<(u64, String)> {
        self.builds
            .iter()
            .filter(|(id, _)| !listed.contains(id))
            .map(|(id, b)| (*id, b.pod_name.clone()))
            .collect()
    }
}

// === the tasks ===

/// Starts the watch and the sweep; both end when `cancel` is cancelled.
pub(super) fn spawn(inner: &Arc<Inner>, check_interval: Duration) {
    let cancel = inner.cancel.clone();
    let watcher = Arc::clone(inner);
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = watcher.run_watch() => {}
        }
        debug!("build pod watch stopped");
    });
    let cancel = inner.cancel.clone();
    let sweeper = Arc::clone(inner);
    let period = check_interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let sweeps = async {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sweeper.sweep().await;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => {}
            () = sweeps => {}
        }
    });
}

impl Inner {
    /// A pod this executor just created: counted in flight before the watch sees it.
    pub(super) fn launched(&self, build_id: u64, pod: &Pod) {
        let now = Timestamp::now();
        let mut t = self.lock();
        t.stopped.retain(|id| *id != build_id);
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        t.builds
            .entry(build_id)
            .or_insert_with(|| Build::new(name, creation(pod).unwrap_or(now)));
    }

    async fn run_watch(self: &Arc<Self>) {
        loop {
            let config = watcher::Config::default().labels(BUILD_SELECTOR);
            let mut stream = pin!(watcher(self.pods.clone(), config).default_backoff());
            // Builds seen by the listing under way (between Init and InitDone).
            let mut listing: Option<HashSet<u64>> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(id), Some(seen)) = (self.observe(pod), listing.as_mut()) {
                            seen.insert(id);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(seen) = listing.take() {
                            let missing = self.lock().missing(&seen);
                            self.verify_missing(missing).await;
                        }
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        self.observe(pod);
                    }
                    Ok(watcher::Event::Delete(pod)) => self.deleted(pod),
                    Err(e) => {
                        metrics::counter!("sd_agent_kubernetes_api_errors_total").increment(1);
                        warn!(namespace = %self.config.namespace, error = %e, "watching build pods failed; retrying")
                    }
                }
            }
            error!("build pod watch ended unexpectedly; restarting it");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A pod as it is now (added, modified, or listed). Returns its build id when it is ours.
    fn observe(self: &Arc<Self>, pod: Pod) -> Option<u64> {
        let name = pod.metadata.name.clone()?;
        let id = build_id_of(&self.config.prefix, &name)?;
        let now = Timestamp::now();
        let cannot_start = {
            let mut t = self.lock();
            let stopped = t.stopped.contains(&id);
            let b = t.builds.entry(id).or_insert_with(|| Build::new(&name, now));
            b.stopping |= stopped;
            if let Some(created) = creation(&pod) {
                b.created = created;
            }
            b.pod = Some(pod);
            self.step(id, b, now, false)
        };
        if let Some(summary) = cannot_start {
            self.fail(id, name, summary);
        }
        Some(id)
    }

    /// A pod is gone. Its last state may still tell how the build ended.
    fn deleted(self: &Arc<Self>, pod: Pod) {
        let Some(id) = pod
            .metadata
            .name
            .as_deref()
            .and_then(|n| build_id_of(&self.config.prefix, n))
        else {
            return;
        };
        let mut t = self.lock();
        let Some(b) = t.builds.get_mut(&id) else {
            return;
        };
        b.pod = Some(pod);
        self.step(id, b, Timestamp::now(), true);
        if !b.ended && !b.stopping {
            // Deleted by someone else (another replica's stop, a node drain): the launcher got
            // SIGTERM and may have reported; we cannot tell, so Screwdriver is not overruled.
            let reason = format!(
                "build pod {} was deleted before the build finished",
                b.pod_name
            );
            info!(build_id = id, %reason, "build pod deleted");
            self.emit(
                id,
                BuildStatus::Failed {
                    reason,
                    report: false,
                },
            );
        }
        t.builds.remove(&id);
    }

    /// Known pods a relisting did not show: gone while the watch was down, or created after the
    /// listing was taken. A read tells which.
    async fn verify_missing(self: &Arc<Self>, missing: Vec<(u64, String)>) {
        for (id, name) in missing {
            match self.call(self.pods.get(&name)).await {
                Ok(pod) => {
                    self.observe(pod);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    let mut t = self.lock();
                    if let Some(b) = t.builds.remove(&id)
                        && !b.ended
                        && !b.stopping
                    {
                        let reason =
                            format!("build pod {name} disappeared before the build finished");
                        info!(build_id = id, %reason, "build pod gone");
                        self.emit(
                            id,
                            BuildStatus::Failed {
                                reason,
                                report: false,
                            },
                        );
                    }
                }
                Err(e) => {
                    debug!(build_id = id, pod = %name, error = %describe(&e), "cannot read build pod")
                }
            }
        }
    }

    /// Decides what `b`'s latest pod state means and reports it (once). `gone`: the pod was
    /// deleted, so only how it ended matters. Returns a summary when the build cannot start;
    /// the caller fails it outside the lock.
    fn step(&self, id: u64, b: &mut Build, now: Timestamp, gone: bool) -> Option<String> {
        if b.ended || b.stopping {
            return None;
        }
        let pod = b.pod.as_ref()?;
        if !b.scheduled_sent
            && !gone
            && let Some((node, at)) = scheduled(pod)
        {
            b.scheduled_sent = true;
            debug!(build_id = id, pod = %b.pod_name, %node, "build pod scheduled");
            self.emit(id, BuildStatus::Scheduled { node, at });
        }
        match assess(pod, elapsed(b.created, now), &self.config) {
            Verdict::Waiting => None,
            Verdict::Running => {
                if !b.running_sent && !gone {
                    b.running_sent = true;
                    info!(build_id = id, pod = %b.pod_name, "build running");
                    self.emit(id, BuildStatus::Running);
                }
                None
            }
            Verdict::Finished { at } => {
                b.ended = true;
                b.ended_at = Some(at.unwrap_or(now));
                info!(build_id = id, pod = %b.pod_name, "build finished");
                self.emit(id, BuildStatus::Finished);
                None
            }
            Verdict::Failed { reason, report, at } => {
                b.ended = true;
                b.ended_at = Some(at.unwrap_or(now));
                info!(build_id = id, pod = %b.pod_name, %reason, report, "build failed");
                self.emit(id, BuildStatus::Failed { reason, report });
                None
            }
            Verdict::CannotStart(summary) => {
                if gone {
                    return None;
                }
                b.ended = true;
                b.ended_at = Some(now);
                b.delete_wanted = true;
                b.deleting = true;
                Some(summary)
            }
        }
    }

    /// Fails a build whose pod cannot start: quotes the pod's events, reports, deletes the pod.
    fn fail(self: &Arc<Self>, id: u64, name: String, summary: String) {
        let inner = Arc::clone(self);
        let cancel: CancellationToken = self.cancel.clone();
        tokio::spawn(async move {
            let work = async {
                let events = inner.pod_events(&name).await;
                let reason = compose(&summary, &events);
                warn!(build_id = id, pod = %name, %reason, "build cannot start; failing it");
                inner.emit(
                    id,
                    BuildStatus::Failed {
                        reason,
                        report: true,
                    },
                );
                inner.delete_pod(id, &name).await;
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                () = work => {}
            }
        });
    }

    /// Timers: image pull grace and pending timeout (re-judging each pod's last state), the
    /// finished-pod TTL, and deletes that failed before.
    async fn sweep(self: &Arc<Self>) {
        let now = Timestamp::now();
        let ttl = self.config.finished_pod_ttl;
        let mut fails = Vec::new();
        let mut deletes = Vec::new();
        {
            let mut t = self.lock();
            for (id, b) in &mut t.builds {
                if let Some(summary) = self.step(*id, b, now, false) {
                    fails.push((*id, b.pod_name.clone(), summary));
                    continue;
                }
                if b.deleting {
                    continue;
                }
                let expired = b.ended && b.ended_at.is_some_and(|at| elapsed(at, now) >= ttl);
                if b.delete_wanted || expired {
                    b.delete_wanted = true;
                    b.deleting = true;
                    deletes.push((*id, b.pod_name.clone()));
                }
            }
        }
        for (id, name, summary) in fails {
            self.fail(id, name, summary);
        }
        for (id, name) in deletes {
            self.delete_pod(id, &name).await;
        }
    }

    /// Deletes a pod we are done with; on failure the next sweep tries again. The build's
    /// record stays until the watch sees the pod go, so late updates cannot report it twice.
    async fn delete_pod(&self, id: u64, name: &str) {
        match self
            .call(self.pods.delete(name, &DeleteParams::background()))
            .await
        {
            Ok(_) => info!(build_id = id, pod = %name, "deleted build pod"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                warn!(build_id = id, pod = %name, error = %describe(&e), "cannot delete build pod; will retry");
                if let Some(b) = self.lock().builds.get_mut(&id) {
                    b.deleting = false;
                }
            }
        }
    }

    /// The pod's recent events, for failure reasons ("Failed: pull access denied ...").
    async fn pod_events(&self, name: &str) -> String {
        let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
        match self.call(self.events_api.list(&params)).await {
            Ok(list) => format_events(list.items),
            Err(e) => format!("(pod events unavailable: {})", describe(&e)),
        }
    }

    pub(super) fn emit(&self, build_id: u64, status: BuildStatus) {
        if self.events.send(BuildEvent { build_id, status }).is_err() {
            debug!(build_id, "build event dropped: nobody listens any more");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> KubernetesConfig {
        KubernetesConfig {
            pending_timeout: Duration::from_secs(600),
            image_pull_grace: Duration::from_secs(120),
            ..Default::default()
        }
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "sd-5"},
            "spec": {
                "initContainers": [{"name": "launcher", "image": "launcher:v6"}],
                "containers": [{"name": "build", "image": "nope:1"}],
            },
            "status": status,
        }))
        .unwrap()
    }

    fn waiting(container: &str, reason: &str) -> serde_json::Value {
        json!({"phase": "Pending", "containerStatuses": [{
            "name": container, "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": "Back-off pulling image \"nope:1\""}},
        }]})
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn fatal_waiting_reasons_fail_at_once() {
        for reason in FATAL_WAITING {
            match assess(&pod(waiting("build", reason)), Duration::ZERO, &config()) {
                Verdict::CannotStart(s) => assert!(
                    s.starts_with(&format!(
                        "Build failed to start: {reason} (image \"nope:1\")"
                    )),
                    "{s}"
                ),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    #[test]
    fn pull_backoff_waits_for_the_grace() {
        let p = pod(waiting("build", "ImagePullBackOff"));
        assert_eq!(assess(&p, MIN, &config()), Verdict::Waiting);
        let Verdict::CannotStart(s) = assess(&p, 3 * MIN, &config()) else {
            panic!()
        };
        assert_eq!(
            s,
            "Build failed to start: ImagePullBackOff (image \"nope:1\"): Back-off pulling image \"nope:1\""
        );
    }

    #[test]
    fn init_container_failures_name_the_container() {
        let mut p = pod(json!({"phase": "Pending"}));
        let status = p.status.as_mut().unwrap();
        status.init_container_statuses = pod(waiting("launcher", "ErrImagePull"))
            .status
            .unwrap()
            .container_statuses;
        let Verdict::CannotStart(s) = assess(&p, Duration::ZERO, &config()) else {
            panic!()
        };
        assert!(
            s.contains("ErrImagePull (container launcher, image \"launcher:v6\")"),
            "{s}"
        );
    }

    #[test]
    fn a_failed_init_container_is_reported_for_the_launcher_that_never_ran() {
        let p = pod(json!({"phase": "Failed", "initContainerStatuses": [{
            "name": "launcher", "image": "launcher:v6", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 2, "message": "cp: no space left on device"}},
        }]}));
        let Verdict::Failed { reason, report, .. } = assess(&p, Duration::ZERO, &config()) else {
            panic!()
        };
        assert!(report, "the launcher never ran, so the agent reports it");
        assert_eq!(
            reason,
            "Build failed to start: init container launcher exited with code 2: cp: no space left on device"
        );
    }

    #[test]
    fn pending_too_long_fails_with_the_scheduler_reason() {
        let p = pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu.",
        }]}));
        assert_eq!(assess(&p, 9 * MIN, &config()), Verdict::Waiting);
        let Verdict::CannotStart(s) = assess(&p, 11 * MIN, &config()) else {
            panic!()
        };
        assert!(s.contains("still Pending after 600s"), "{s}");
        assert!(
            s.ends_with("Unschedulable: 0/3 nodes are available: 3 Insufficient cpu."),
            "{s}"
        );
    }

    #[test]
    fn phases() {
        let running = pod(json!({"phase": "Running"}));
        assert_eq!(assess(&running, 60 * MIN, &config()), Verdict::Running);
        let done = pod(json!({"phase": "Succeeded", "containerStatuses": [{
            "name": "build", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "finishedAt": "2026-11-28T10:00:00Z"}},
        }]}));
        let Verdict::Finished { at: Some(at) } = assess(&done, Duration::ZERO, &config()) else {
            panic!()
        };
        assert_eq!(at.to_string(), "2026-11-28T10:00:00Z");
        let failed = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3}},
        }]}));
        assert!(matches!(
            assess(&failed, Duration::ZERO, &config()),
            Verdict::Failed { report: false, .. }
        ));
        let deadline = pod(
            json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}),
        );
        let Verdict::Failed {
            reason,
            report: true,
            ..
        } = assess(&deadline, Duration::ZERO, &config())
        else {
            panic!()
        };
        assert!(reason.contains("DeadlineExceeded"), "{reason}");
        let oom = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        }]}));
        assert!(matches!(
            assess(&oom, Duration::ZERO, &config()),
            Verdict::Failed { report: true, .. }
        ));
    }

    #[test]
    fn terminating_pods_are_left_alone() {
        let mut p = pod(waiting("build", "ErrImagePull"));
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
        assert_eq!(assess(&p, 60 * MIN, &config()), Verdict::Waiting);
    }

    #[test]
    fn events_are_quoted_in_order_and_bounded() {
        let event = |reason: &str, message: &str, at: &str| -> CoreEvent {
            serde_json::from_value(json!({
                "metadata": {"name": format!("sd-5.{reason}")},
                "involvedObject": {"kind": "Pod", "name": "sd-5"},
                "reason": reason, "message": message, "lastTimestamp": at,
            }))
            .unwrap()
        };
        let text = format_events(vec![
            event("BackOff", "Back-off pulling image", "2026-11-28T10:00:05Z"),
            event(
                "Failed",
                "Failed to pull image: not found",
                "2026-11-28T10:00:01Z",
            ),
        ]);
        assert_eq!(
            text,
            "Failed: Failed to pull image: not found; BackOff: Back-off pulling image"
        );
        let long = compose("Build failed to start", &"x".repeat(5000));
        assert_eq!(long.chars().count(), REASON_MAX_CHARS + 1);
        assert_eq!(compose("s", ""), "s");
    }
}
