//! End to end: the real scheduler (in-process, on a free port) with real redis-servers (master
//! and each cluster's local one) and real `sd-agent` processes using the process executor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use sd_scheduler::Scheduler;
use sd_scheduler::cluster_auth::EnvLookup;
use sd_scheduler::config::Config as SchedulerConfig;
use sd_testkit::{
    AgentConfig, Backend, RedisServer, RsaKeys, TestDb, eventually, free_port, launcher,
    shared_keys,
};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_sd-agent");
/// The Screwdriver API builds name here (nothing listens; the scheduler and agents allow it).
const DEAD_API: &str = "http://127.0.0.1:9";

struct World {
    scheduler: Option<Scheduler>,
    config: SchedulerConfig,
    base: String,
    master: RedisServer,
    _db: TestDb,
    env: Arc<Mutex<HashMap<String, String>>>,
    api: RsaKeys,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl World {
    async fn start() -> Self {
        let master = RedisServer::start().unwrap();
        let db = TestDb::new(Backend::Sqlite).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let api = shared_keys("api");
        let (_, api_pub) = api.write(dir.path(), "api");
        let (launcher, _) = shared_keys("launcher").write(dir.path(), "launcher");
        let mut config = SchedulerConfig {
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            ..SchedulerConfig::default()
        };
        config.database.url = db.url().to_owned();
        config.redis.url = master.url();
        config.auth.api_public_key_file = Some(api_pub);
        config.auth.private_key_file = Some(launcher);
        config.screwdriver.api_uris = vec![DEAD_API.to_owned()];
        config.screwdriver.allow_http = true;
        config.queue.visibility_timeout = Duration::from_secs(3);
        let env = Arc::new(Mutex::new(HashMap::new()));
        let mut world = Self {
            scheduler: None,
            base: format!("http://{}", config.listen),
            config,
            master,
            _db: db,
            env,
            api,
            dir,
            http: reqwest::Client::new(),
        };
        world.start_scheduler().await;
        world
    }

    async fn start_scheduler(&mut self) {
        let env = Arc::clone(&self.env);
        let lookup: EnvLookup = Arc::new(move |name| env.lock().unwrap().get(name).cloned());
        self.scheduler = Some(
            Scheduler::start_with_env(self.config.clone(), lookup)
                .await
                .unwrap(),
        );
    }

    async fn stop_scheduler(&mut self) {
        if let Some(s) = self.scheduler.take() {
            s.shutdown().await;
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        scope: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.api.api_token(&[scope]));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers `name` (external for `org`, or managed) and prepares an agent for it.
    async fn cluster(&self, name: &str, org: Option<&str>) -> AgentSetup {
        let keys = sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
        let var = format!("SD_CLUSTER_{}_KEY", name.to_uppercase().replace('-', "_"));
        self.env
            .lock()
            .unwrap()
            .insert(var.clone(), keys.public_pem.clone());
        let mut body = json!({"name": name, "scmContext": "github:github.com", "managedByEmail": "t@example.com", "authKey": var});
        match org {
            Some(o) => {
                body["managedBy"] = json!("external");
                body["scmOrganizations"] = json!([o]);
            }
            None => body["managedBy"] = json!("screwdriver"),
        }
        let (status, resp) = self
            .call(Method::POST, "/v4/buildclusters", "admin", Some(body))
            .await;
        assert_eq!(status, 201, "{resp}");
        AgentSetup::new(self.dir.path(), name, &keys, &self.base)
    }

    async fn submit(&self, id: u64, pipeline: &str, cluster: Option<&str>, exit: u8) -> Value {
        self.submit_annotated(id, pipeline, cluster, json!({"test/exit": exit}))
            .await
    }

    /// A build whose launcher stand-in runs `secs` seconds (then exits 0).
    async fn submit_sleeping(&self, id: u64, secs: u64) -> Value {
        self.submit_annotated(id, "web/site", None, json!({"test/sleep": secs}))
            .await
    }

    async fn submit_annotated(
        &self,
        id: u64,
        pipeline: &str,
        cluster: Option<&str>,
        extra: Value,
    ) -> Value {
        let mut annotations = json!({"screwdriver.cd/blockedBySameJob": false});
        for (k, v) in extra.as_object().unwrap() {
            annotations[k] = v.clone();
        }
        if let Some(c) = cluster {
            annotations["screwdriver.cd/buildCluster"] = json!(c);
        }
        let body = json!({
            "buildId": id, "jobId": 10_000 + id, "blockedBy": [], "annotations": annotations,
            "pipeline": {"id": 1, "name": pipeline, "scmContext": "github:github.com"},
            "apiUri": DEAD_API, "container": "node:22",
        });
        let (status, resp) = self
            .call(Method::POST, "/v1/queue/message", "sdapi", Some(body))
            .await;
        assert!(status == 201 || status == 200, "{status} {resp}");
        resp
    }

    async fn state(&self, id: u64) -> String {
        let (_, view) = self
            .call(Method::GET, &format!("/v1/builds/{id}"), "sdapi", None)
            .await;
        view["state"].as_str().unwrap_or_default().to_owned()
    }

    /// Polls until every build in `ids` is in a state `done` accepts; returns their views, or
    /// panics with each build's state after `timeout`.
    async fn wait_for(
        &self,
        ids: &[u64],
        timeout: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> Vec<Value> {
        let views = eventually(timeout, || async {
            let mut views = Vec::new();
            for id in ids {
                let (_, view) = self
                    .call(Method::GET, &format!("/v1/builds/{id}"), "sdapi", None)
                    .await;
                if !done(view["state"].as_str().unwrap_or_default()) {
                    return None;
                }
                views.push(view);
            }
            Some(views)
        })
        .await;
        if let Some(views) = views {
            return views;
        }
        let mut states = Vec::new();
        for id in ids {
            states.push((*id, self.state(*id).await));
        }
        panic!("not every build {what}: {states:?}");
    }

    async fn wait_finished(&self, ids: &[u64], timeout: Duration) {
        self.wait_for(ids, timeout, "finished", |s| s == "finished")
            .await;
    }

    /// Every build in `ids` ends: finished, or failed with a reason.
    async fn wait_ended(&self, ids: &[u64], timeout: Duration) -> Vec<Value> {
        self.wait_for(ids, timeout, "ended", |s| s == "finished" || s == "failed")
            .await
    }
}

/// Everything one cluster's agent needs: its local Redis, key, config, run log.
struct AgentSetup {
    name: String,
    local: RedisServer,
    config: PathBuf,
    runs: PathBuf,
    health: u16,
    children: Vec<Child>,
}

impl AgentSetup {
    fn new(dir: &Path, name: &str, keys: &sd_testkit::ClusterKeys, scheduler: &str) -> Self {
        let local = RedisServer::start_with_aof().unwrap();
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let key = home.join("private.pem");
        std::fs::write(&key, &keys.private_pem).unwrap();
        let runs = home.join("runs.log");
        // The launcher stand-in: records the run, then exits with the code the build asks for.
        let script = launcher::recording(&runs).write(&home.join("launch.sh"));
        let health = free_port();
        let config = AgentConfig::new(name, scheduler, &key)
            .shutdown_timeout(Duration::from_secs(10))
            .poll_wait(Duration::from_secs(2))
            .redis(&local.url())
            .max_in_flight(20)
            .launch_lease(Duration::from_secs(5))
            .launcher(&script)
            .work_dir(&home.join("work"))
            .health_port(health)
            .screwdriver_api(DEAD_API)
            .log_format("json")
            .log_level("info,sd_agent=debug")
            .write(&home.join("agent.toml"));
        Self {
            name: name.to_owned(),
            local,
            config,
            runs,
            health,
            children: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        self.spawn_with(&[], false);
    }

    /// Starts a replica with extra `SD_AGENT_*` overrides; with `config_in_env` the config file
    /// is named by `SD_AGENT_CONFIG` instead of `--config`.
    /// After the agent exited: reaps it, lets acks through the gate again, starts it anew.
    fn restart_through(&mut self, gate: &Gate, env: &[(&str, &str)]) {
        self.children.remove(0).wait().unwrap();
        gate.release();
        self.spawn_with(env, false);
    }

    fn spawn_with(&mut self, env: &[(&str, &str)], config_in_env: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_file_name("agent.log"))
            .unwrap();
        // Replicas after the first get a health port of their own.
        let health = if self.children.is_empty() {
            self.health
        } else {
            free_port()
        };
        let mut cmd = Command::new(AGENT);
        cmd.env("SD_AGENT_HEALTH_LISTEN", format!("127.0.0.1:{health}"));
        if config_in_env {
            cmd.env("SD_AGENT_CONFIG", &self.config);
        } else {
            cmd.arg("--config")
                .arg(&self.config)
                .env_remove("SD_AGENT_CONFIG");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Everything the agents of this cluster logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("agent.log")).unwrap_or_default()
    }

    /// Waits up to `timeout` for the first replica to exit; `None` if it still runs.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.children[0];
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn readyz(&self) -> (u16, Value) {
        let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.health))
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    fn runs(&self) -> HashMap<u64, u32> {
        launcher::runs(&self.runs)
    }

    /// Sends `sig` to every agent process (directly: minimal Debian has no kill(1)).
    fn signal(&mut self, sig: libc::c_int) {
        for child in &self.children {
            let sent = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
            assert_eq!(sent, 0, "signal {sig} to {}", child.id());
        }
    }
}

/// An HTTP forwarder between an agent and the scheduler that can hold the agent's acks: a held
/// ack is never forwarded — as if lost on the way — and is answered 503 only when the gate goes.
struct Gate {
    url: String,
    state: Arc<GateState>,
    task: tokio::task::JoinHandle<()>,
}

struct GateState {
    target: String,
    http: reqwest::Client,
    hold_acks: AtomicBool,
    held: AtomicU64,
    closed: tokio_util::sync::CancellationToken,
}

impl Gate {
    async fn start(target: &str) -> Self {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        async fn forward(
            axum::extract::State(state): axum::extract::State<Arc<GateState>>,
            request: axum::extract::Request,
        ) -> axum::response::Response {
            let (parts, body) = request.into_parts();
            if state.hold_acks.load(Ordering::SeqCst) && parts.uri.path().ends_with("/ack") {
                state.held.fetch_add(1, Ordering::SeqCst);
                state.closed.cancelled().await;
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let body = axum::body::to_bytes(body, 16 << 20)
                .await
                .unwrap_or_default();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut out = state
                .http
                .request(parts.method.clone(), format!("{}{path}", state.target))
                .body(body);
            for (name, value) in &parts.headers {
                if ![header::HOST, header::CONTENT_LENGTH, header::CONNECTION].contains(name) {
                    out = out.header(name, value);
                }
            }
            let Ok(answer) = out.send().await else {
                return StatusCode::BAD_GATEWAY.into_response();
            };
            let status = answer.status();
            let headers = answer.headers().clone();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = (status, bytes).into_response();
            for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
                if let Some(v) = headers.get(&name) {
                    response.headers_mut().insert(name, v.clone());
                }
            }
            response
        }
        let state = Arc::new(GateState {
            target: target.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            hold_acks: AtomicBool::new(false),
            held: AtomicU64::new(0),
            closed: tokio_util::sync::CancellationToken::new(),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&state));
        let (url, task) = sd_testkit::serve(app).await;
        Self { url, state, task }
    }

    /// Acks from now on are held, never forwarded.
    fn hold_acks(&self) {
        self.state.hold_acks.store(true, Ordering::SeqCst);
    }

    /// Acks from now on are forwarded again (held ones stay lost).
    fn release(&self) {
        self.state.hold_acks.store(false, Ordering::SeqCst);
    }

    /// Acks held so far.
    fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Waits until a transfer's ack is held here: the agent has one in flight it cannot finish.
    async fn wait_held(&self) {
        let held = eventually(Duration::from_secs(20), || {
            std::future::ready((self.held() >= 1).then_some(()))
        })
        .await;
        assert!(held.is_some(), "a transfer is waiting for its ack");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.state.closed.cancel();
        self.task.abort();
    }
}

impl Drop for AgentSetup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_on_the_cluster_routing_chose_exactly_once() {
    let world = World::start().await;
    let mut linux = world.cluster("linux", None).await;
    let mut ios = world.cluster("ios-farm", Some("mobile")).await;
    linux.spawn();
    ios.spawn();
    // Routing's choice for each build, as the intake answered it.
    let mut chosen: HashMap<u64, String> = HashMap::new();
    for id in 1..=6 {
        let resp = world.submit(id, "web/site", None, 0).await;
        chosen.insert(id, resp["buildClusterName"].as_str().unwrap().to_owned());
    }
    for id in 7..=9 {
        let resp = world.submit(id, "mobile/app", Some("ios-farm"), 0).await;
        chosen.insert(id, resp["buildClusterName"].as_str().unwrap().to_owned());
    }
    let resp = world.submit(10, "web/site", None, 3).await;
    chosen.insert(10, resp["buildClusterName"].as_str().unwrap().to_owned());
    // web/site is not the external farm's organization; the named builds go where named.
    for id in 1..=10 {
        let expected = if (7..=9).contains(&id) {
            "ios-farm"
        } else {
            "linux"
        };
        assert_eq!(chosen[&id], expected, "routing of build {id}");
    }
    world
        .wait_finished(&(1..=9).collect::<Vec<_>>(), Duration::from_secs(60))
        .await;
    let failed = eventually(Duration::from_secs(30), || async {
        (world.state(10).await == "failed").then_some(())
    })
    .await;
    assert!(
        failed.is_some(),
        "a launcher exiting 3 ends the build failed"
    );
    let (l, i) = (linux.runs(), ios.runs());
    // Each build ran exactly once, on the cluster routing chose, and on no other cluster.
    for id in 1..=10 {
        let on: Vec<(&str, u32)> = [("linux", &l), ("ios-farm", &i)]
            .into_iter()
            .filter_map(|(name, runs)| runs.get(&id).map(|c| (name, *c)))
            .collect();
        assert_eq!(
            on,
            vec![(chosen[&id].as_str(), 1)],
            "build {id} must run once, on {} only: linux {l:?}, ios-farm {i:?}",
            chosen[&id]
        );
    }
    assert!(
        l.keys().chain(i.keys()).all(|id| (1..=10).contains(id)),
        "nothing but the submitted builds ran: {l:?} {i:?}"
    );
    // What operators graph: the agent's own view of the same builds.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", linux.health))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, at_least) in [
        ("sd_agent_jobs_fetched_total", 7.0),
        ("sd_agent_jobs_acked_total", 7.0),
        ("sd_agent_builds_launched_total", 7.0),
        ("sd_agent_queue_wait_seconds_count", 7.0),
        ("sd_agent_start_latency_seconds_count", 7.0),
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"));
        assert!(value >= at_least, "{name} = {value}");
    }
    // Read when scraped, not when the fetcher last polled: every build has ended.
    assert!(
        metrics.lines().any(|l| l == "sd_agent_in_flight 0"),
        "{metrics}"
    );
    // What the scheduler shows an operator: each agent as it reported itself on its polls.
    let (code, status) = world
        .call(Method::GET, "/v4/buildclusters/status", "user", None)
        .await;
    assert_eq!(code, 200, "{status}");
    let clusters = status["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ios-farm", "linux"]);
    for cluster in clusters {
        assert_eq!(cluster["health"], "healthy", "{cluster}");
        assert_eq!(
            cluster["dispatchedLastHour"],
            if cluster["name"] == "linux" { 7 } else { 3 }
        );
        let agents = cluster["agents"].as_array().unwrap();
        assert_eq!(agents.len(), 1, "one agent each: {cluster}");
        assert_eq!(agents[0]["version"], env!("CARGO_PKG_VERSION"), "{cluster}");
        assert_eq!(agents[0]["executor"], "process");
        assert!(
            agents[0]["instance"]
                .as_str()
                .unwrap()
                .starts_with("agent-")
        );
        assert!(agents[0]["capacity"].as_u64().unwrap() > 0);
    }
    let _ = (&linux.name, &linux.local);
}

/// Through the real scheduler and `sd-agent`: a 300 KiB start message runs (its config goes in
/// a file), and a build the kernel will never start (a job name longer than one variable may
/// be) fails once, with the reason, instead of being retried while it holds a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_build_runs_and_one_that_can_never_start_fails_once_with_the_reason() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    agent.spawn();
    let blob = "x".repeat(300 * 1024);
    world
        .submit_annotated(1, "web/site", None, json!({"test/blob": blob}))
        .await;
    let body = json!({
        "buildId": 2, "jobId": 10_002, "blockedBy": [], "jobName": "j".repeat(200 * 1024),
        "annotations": {"screwdriver.cd/blockedBySameJob": false},
        "pipeline": {"id": 1, "name": "web/site", "scmContext": "github:github.com"},
        "apiUri": DEAD_API, "container": "node:22",
    });
    let (status, resp) = world
        .call(Method::POST, "/v1/queue/message", "sdapi", Some(body))
        .await;
    assert!(status == 201 || status == 200, "{status} {resp}");
    world.wait_finished(&[1], Duration::from_secs(60)).await;
    let views = world.wait_ended(&[2], Duration::from_secs(60)).await;
    assert_eq!(views[0]["state"], "failed", "{}", views[0]);
    let reason = views[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("too large"), "{reason}");
    assert_eq!(agent.runs().get(&1), Some(&1));
    assert_eq!(agent.runs().get(&2), None, "build 2 never started");
    let refusals = agent
        .log()
        .lines()
        .filter(|l| l.contains("build cannot be launched") && l.contains("\"build_id\":2"))
        .count();
    assert_eq!(refusals, 1, "tried once, not retried:\n{}", agent.log());
}

/// Local Redis down when the agent starts: it takes nothing, the builds wait on the master; when
/// Redis returns they run, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_redis_down_loses_nothing() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    agent.local.kill();
    agent.spawn();
    for id in 1..=5 {
        world.submit(id, "web/site", None, 0).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in 1..=5 {
        assert_eq!(
            world.state(id).await,
            "queued",
            "build {id} must stay on the master while the local Redis is down"
        );
    }
    assert!(agent.runs().is_empty());
    agent.local.restart().unwrap();
    world
        .wait_finished(&(1..=5).collect::<Vec<_>>(), Duration::from_secs(60))
        .await;
    assert!(agent.runs().values().all(|c| *c == 1), "{:?}", agent.runs());
}

/// The local Redis dies under a running agent that is waiting in a long poll: the jobs that poll
/// brings meet a failed push and are given back (nack), never acknowledged; nothing more is taken
/// while Redis is down and `/readyz` says why; once it returns every build runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_redis_lost_while_running_acks_nothing_until_it_returns() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    // A long poll, so the agent is inside one when its Redis goes.
    agent.spawn_with(&[("SD_AGENT_POLL_WAIT", "20s")], false);
    world.submit(1, "web/site", None, 0).await;
    world.wait_finished(&[1], Duration::from_secs(30)).await;
    let (code, ready) = agent.readyz().await;
    assert_eq!(code, 200, "ready before the fault: {ready}");

    agent.local.kill();
    let ids: Vec<u64> = (2..=6).collect();
    for id in &ids {
        world.submit(*id, "web/site", None, 0).await;
    }
    let mut master = world.master.conn();
    let key = |k: &str| format!("{{sd}}:q:linux:{k}");
    // The poll in progress returns jobs; their push fails and they are handed back: delivered
    // once, no longer leased, on the master queue again.
    let given_back = eventually(Duration::from_secs(20), || {
        let given_back: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| {
                let meta: Option<String> = redis::cmd("HGET")
                    .arg(key("meta"))
                    .arg(id)
                    .query(&mut master)
                    .unwrap();
                let deliveries = meta
                    .and_then(|m| serde_json::from_str::<Value>(&m).ok())
                    .and_then(|m| m["deliveries"].as_u64())
                    .unwrap_or(0);
                let leased: Option<f64> = redis::cmd("ZSCORE")
                    .arg(key("leased"))
                    .arg(id)
                    .query(&mut master)
                    .unwrap();
                deliveries >= 1 && leased.is_none()
            })
            .collect();
        let nacked = agent
            .log()
            .contains("local push failed; giving the job back");
        std::future::ready((nacked && !given_back.is_empty()).then_some(given_back))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the jobs of the poll in progress were not given back; agent log:\n{}",
            agent.log()
        )
    });
    for id in &given_back {
        let waiting: Option<f64> = redis::cmd("ZSCORE")
            .arg(key("delayed"))
            .arg(id)
            .query(&mut master)
            .unwrap();
        let ready: Option<f64> = redis::cmd("ZSCORE")
            .arg(key("ready"))
            .arg(id)
            .query(&mut master)
            .unwrap();
        assert!(
            waiting.is_some() || ready.is_some(),
            "build {id} is back on the master queue"
        );
    }

    // Not ready, naming the local Redis.
    let (code, ready) = eventually(Duration::from_secs(10), || async {
        let (code, body) = agent.readyz().await;
        (body["ready"] == false).then_some((code, body))
    })
    .await
    .expect("/readyz turns not ready");
    assert_eq!(code, 503, "{ready}");
    assert!(
        ready["redis"].as_str().unwrap().starts_with("unreachable"),
        "{ready}"
    );

    // While it is down nothing is acknowledged, dispatched or run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        assert_eq!(
            world.state(*id).await,
            "queued",
            "build {id} must stay on the master while the local Redis is down"
        );
        let acked: Option<f64> = redis::cmd("ZSCORE")
            .arg("{sd}:acked")
            .arg(id)
            .query(&mut master)
            .unwrap();
        assert!(acked.is_none(), "build {id} was acknowledged");
    }
    assert_eq!(agent.runs().keys().copied().collect::<Vec<_>>(), vec![1]);

    agent.local.restart().unwrap();
    world.wait_finished(&ids, Duration::from_secs(60)).await;
    let runs = agent.runs();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert!(
        runs.values().all(|c| *c == 1),
        "each build ran once: {runs:?}"
    );
    let (code, ready) = agent.readyz().await;
    assert_eq!(code, 200, "ready again: {ready}");
}

/// The agent's poll back-off (agent/src/fetcher.rs `new_backoff`): 200 ms doubling up to 30 s,
/// with jitter that only ever adds to a step.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The most connection attempts that back-off allows within `window`: a first attempt, then one
/// after each step whose shortest possible delays still fit into the window.
fn attempts_allowed(window: Duration) -> u64 {
    let (mut attempts, mut elapsed, mut step) = (1, Duration::ZERO, BACKOFF_FIRST);
    loop {
        elapsed += step;
        if elapsed > window {
            return attempts;
        }
        attempts += 1;
        step = (step * 2).min(BACKOFF_MAX);
    }
}

#[test]
fn the_backoff_bound_follows_the_steps() {
    // 0.2 + 0.4 + 0.8 + 1.6 + 3.2 = 6.2 s ≤ 8 s < 12.6 s.
    assert_eq!(attempts_allowed(Duration::from_secs(8)), 6);
    assert_eq!(attempts_allowed(Duration::from_millis(100)), 1);
    // Capped at 30 s a step: eight steps 0.2 … 25.6 make 51 s, then 30 s each (81, 111).
    assert_eq!(attempts_allowed(Duration::from_secs(111)), 11);
}

/// Scheduler down: the agent backs off — the connection attempts reaching a proxy in front of
/// the scheduler during the outage stay within what its jittered exponential back-off allows, far
/// from a reconnect storm — says why it is not ready, and recovers by itself once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_outage_then_recovery() {
    let mut world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    let proxy = sd_testkit::ChaosProxy::start(world.config.listen)
        .await
        .unwrap();
    agent.spawn_with(&[("SD_AGENT_SCHEDULER_URL", &proxy.http_url())], false);
    world.submit(1, "web/site", None, 0).await;
    world.wait_finished(&[1], Duration::from_secs(30)).await;
    assert!(
        proxy.stats().forwarded >= 1,
        "the agent goes through the proxy"
    );

    world.stop_scheduler().await;
    let outage = std::time::Instant::now();
    let before = proxy.stats().accepted;
    let unready = eventually(Duration::from_secs(20), || async {
        let (_, body) = agent.readyz().await;
        (body["ready"] == false).then_some(body)
    })
    .await
    .expect("readyz says why the agent is not ready");
    assert!(
        unready["scheduler"].as_str().unwrap().contains("scheduler"),
        "{unready}"
    );
    let outage_for = Duration::from_secs(8);
    tokio::time::sleep(outage_for.saturating_sub(outage.elapsed())).await;
    let attempts = proxy.stats().accepted - before;
    let window = outage.elapsed();
    world.start_scheduler().await;

    // One more than the back-off allows: an HTTP client may retry a request once on a fresh
    // connection when the pooled one it picked was closed by the scheduler's shutdown.
    let bound = attempts_allowed(window) + 1;
    let naive = (window.as_secs_f64() / BACKOFF_FIRST.as_secs_f64()) as u64;
    assert!(
        attempts <= bound && attempts <= naive,
        "{attempts} connection attempts in {window:?} of outage; the back-off allows at most {bound}"
    );
    assert!(
        attempts >= 3,
        "the agent keeps trying during the outage: {attempts} attempts in {window:?}"
    );
    let stats = proxy.stats();
    assert!(stats.unreachable >= 3, "{stats:?}");
    eprintln!("{attempts} connection attempts in {window:?} of scheduler outage (bound {bound})");

    world.submit(2, "web/site", None, 0).await;
    world.wait_finished(&[2], Duration::from_secs(60)).await;
    let ready = eventually(Duration::from_secs(10), || async {
        let (code, body) = agent.readyz().await;
        (code == 200).then_some(body)
    })
    .await;
    assert!(ready.is_some(), "ready again after the outage");
}

/// Two agent replicas on one cluster, and kill -9 of one of them in the middle of transfers
/// and launches: every build runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_and_kill_9_never_launch_twice() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    agent.spawn();
    agent.spawn();
    let n = 40u64;
    for id in 1..=n {
        world.submit(id, "web/site", None, 0).await;
        if id % 10 == 5 {
            // Kill one replica hard mid-stream and start a fresh one.
            let mut victim = agent.children.remove(0);
            let _ = victim.kill();
            let _ = victim.wait();
            agent.spawn();
            // One crash at a time: let the replacement start before the next kill.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    // Every build ends: finished, or failed with a reason (a killed replica's running builds
    // cannot be accounted for and are reported failed by the survivor, never run again).
    let ended = eventually(Duration::from_secs(120), || async {
        let mut views = Vec::new();
        for id in 1..=n {
            let (_, view) = world
                .call(Method::GET, &format!("/v1/builds/{id}"), "sdapi", None)
                .await;
            if view["state"] != "finished" && view["state"] != "failed" {
                return None;
            }
            views.push(view);
        }
        Some(views)
    })
    .await;
    let views = match ended {
        Some(v) => v,
        None => {
            let mut states = Vec::new();
            for id in 1..=n {
                states.push((id, world.state(id).await));
            }
            let log = std::fs::read_to_string(agent.config.with_file_name("agent.log"))
                .unwrap_or_default();
            let stuck: Vec<String> = states
                .iter()
                .filter(|(_, s)| s != "finished" && s != "failed")
                .map(|(id, _)| format!("\"build_id\":{id},"))
                .collect();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| stuck.iter().any(|k| l.contains(k.as_str())))
                .collect();
            let from = tail.len().saturating_sub(80);
            panic!(
                "not every build ended: {states:?}\nagent log:\n{}",
                tail[from..].join("\n")
            );
        }
    };
    let runs = agent.runs();
    let twice: Vec<_> = runs.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "launched more than once: {twice:?}");
    for view in &views {
        let id = view["buildId"].as_u64().unwrap();
        if view["state"] == "failed" {
            assert!(
                view["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "failed without a reason: {view}"
            );
        } else {
            assert_eq!(runs.get(&id), Some(&1), "finished build {id} ran once");
        }
    }
    let failed = views.iter().filter(|v| v["state"] == "failed").count();
    eprintln!(
        "{n} builds, 4 kill -9: {} finished, {failed} failed with a reason, 0 launched twice",
        views.len() - failed
    );
}

/// SIGTERM drains and exits 0; SIGHUP swaps the key without a failed poll — with the config file
/// named by `SD_AGENT_CONFIG`, as the systemd unit and the container image do (a reload once read
/// that variable as an unknown config key and kept the old key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_key_and_sigterm_drains() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    agent.spawn_with(&[], true);
    world.submit(1, "web/site", None, 0).await;
    world.wait_finished(&[1], Duration::from_secs(30)).await;
    // Rotation: the scheduler trusts old and new keys, the agent switches, the old key goes.
    let new = sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
    let old_pub = world.env.lock().unwrap()["SD_CLUSTER_LINUX_KEY"].clone();
    world.env.lock().unwrap().insert(
        "SD_CLUSTER_LINUX_KEY".into(),
        format!("{old_pub}\n{}", new.public_pem),
    );
    std::fs::write(agent.config.with_file_name("private.pem"), &new.private_pem).unwrap();
    agent.signal(libc::SIGHUP);
    let reloaded = eventually(Duration::from_secs(10), || {
        std::future::ready(
            agent
                .log()
                .contains("reloaded: new private key in use")
                .then_some(()),
        )
    })
    .await;
    assert!(
        reloaded.is_some() && !agent.log().contains("reload refused"),
        "SIGHUP must load the new key; agent log:\n{}",
        agent.log()
    );
    world
        .env
        .lock()
        .unwrap()
        .insert("SD_CLUSTER_LINUX_KEY".into(), new.public_pem.clone());
    world.submit(2, "web/site", None, 0).await;
    world.wait_finished(&[2], Duration::from_secs(30)).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", agent.health))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("sd_agent_scheduler_errors_total") && !l.ends_with(" 0")),
        "no poll failed across the rotation:\n{metrics}"
    );
    agent.signal(libc::SIGTERM);
    let mut child = agent.children.remove(0);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// SIGTERM with builds running, a transfer in flight (its ack held on the way, so the drain
/// cannot finish) and builds still waiting on the master: the agent exits 0 within
/// `shutdown_timeout`; after a restart nothing is lost — every build ran exactly once and
/// finished, those running through the stop adopted by the restarted agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_work_in_flight_exits_within_shutdown_timeout_and_loses_nothing() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    let gate = Gate::start(&world.base).await;
    let env = [
        ("SD_AGENT_SCHEDULER_URL", gate.url.as_str()),
        ("SD_AGENT_SHUTDOWN_TIMEOUT", "3s"),
        ("SD_AGENT_EXECUTOR_MAX_IN_FLIGHT", "5"),
    ];
    agent.spawn_with(&env, false);
    for id in 1..=4 {
        world.submit_sleeping(id, 5).await;
    }
    world
        .wait_for(&[1, 2, 3, 4], Duration::from_secs(30), "running", |s| {
            s == "running"
        })
        .await;
    // Room for one more: build 5 is taken, pushed and launched, and its ack never arrives;
    // 6–8 wait on the master.
    gate.hold_acks();
    for id in 5..=8 {
        world.submit(id, "web/site", None, 0).await;
    }
    gate.wait_held().await;

    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(3 + 5))
        .await
        .expect("the agent exits within shutdown_timeout");
    assert!(status.success(), "{status:?}");
    assert!(
        agent.log().contains("shutdown_timeout reached"),
        "the drain was cut short by shutdown_timeout:\n{}",
        agent.log()
    );
    let started_before = agent.runs();
    agent.restart_through(&gate, &env);
    let ids: Vec<u64> = (1..=8).collect();
    let views = world.wait_ended(&ids, Duration::from_secs(90)).await;
    let runs = agent.runs();
    for view in &views {
        let id = view["buildId"].as_u64().unwrap();
        assert_eq!(
            runs.get(&id),
            Some(&1),
            "build {id} ran exactly once: {runs:?}"
        );
        // Those running through the stop were adopted by the restarted agent: they finish too.
        assert_eq!(
            view["state"],
            "finished",
            "build {id} (running before the stop: {}): {view}",
            started_before.contains_key(&id)
        );
    }
    assert!(
        (6..=8).all(|id| !started_before.contains_key(&id)),
        "6–8 waited on the master during the stop: {started_before:?}"
    );
    let summary: Vec<(u64, String)> = views
        .iter()
        .map(|v| {
            (
                v["buildId"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    eprintln!("after SIGTERM with work in flight and a restart: {summary:?}");
}

/// A second SIGTERM while the drain waits for a transfer (its ack held on the way) exits at once,
/// long before `shutdown_timeout` (30 s); the build of that transfer still runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_while_draining_exits_at_once() {
    let world = World::start().await;
    let mut agent = world.cluster("linux", None).await;
    let gate = Gate::start(&world.base).await;
    let env = [
        ("SD_AGENT_SCHEDULER_URL", gate.url.as_str()),
        ("SD_AGENT_SHUTDOWN_TIMEOUT", "30s"),
    ];
    agent.spawn_with(&env, false);
    world.submit(1, "web/site", None, 0).await;
    world.wait_finished(&[1], Duration::from_secs(30)).await;
    gate.hold_acks();
    world.submit(2, "web/site", None, 0).await;
    gate.wait_held().await;

    agent.signal(libc::SIGTERM);
    let draining = eventually(Duration::from_secs(10), || {
        std::future::ready(agent.log().contains("draining").then_some(()))
    })
    .await;
    assert!(draining.is_some(), "SIGTERM starts the drain");
    assert!(
        agent.wait_exit(Duration::from_secs(3)).await.is_none(),
        "the drain waits for the transfer in flight"
    );
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("a second SIGTERM exits at once, not at shutdown_timeout");
    assert!(status.success(), "{status:?}");
    assert!(
        agent.log().contains("second signal: exiting at once"),
        "{}",
        agent.log()
    );
    agent.restart_through(&gate, &env);
    let views = world.wait_ended(&[2], Duration::from_secs(60)).await;
    assert_eq!(
        agent.runs().get(&2),
        Some(&1),
        "{:?} {views:?}",
        agent.runs()
    );
    world.submit(3, "web/site", None, 0).await;
    world.wait_finished(&[3], Duration::from_secs(30)).await;
}

/// A cluster admin's first minutes: `sd-agent keygen` → export what it says on the scheduler →
/// POST its registration JSON → `sd-agent check` passes; then each thing that can be wrong
/// (another key, the local Redis down) fails its own line with a fix, and the exit code says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_register_check_and_what_check_says_when_wrong() {
    let world = World::start().await;
    let home = world.dir.path().join("ops");
    std::fs::create_dir_all(&home).unwrap();
    let key = home.join("private.pem");
    let out = Command::new(AGENT)
        .args([
            "keygen",
            "--cluster",
            "ops-farm",
            "--algorithm",
            "ES256",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();

    // The exports, as printed: VAR='value' (the PEM spans lines).
    for var in [
        "SD_CLUSTER_OPS_FARM_PUBLIC_KEY",
        "SD_CLUSTER_OPS_FARM_SIGN_OPTIONS",
    ] {
        let start = text.find(&format!("{var}='")).unwrap() + var.len() + 2;
        let len = text[start..].find('\'').unwrap();
        world
            .env
            .lock()
            .unwrap()
            .insert(var.to_owned(), text[start..start + len].to_owned());
    }
    let json_start = text.find("-d '").unwrap() + 4;
    let json_len = text[json_start..].find('\'').unwrap();
    let mut registration: Value =
        serde_json::from_str(&text[json_start..json_start + json_len]).unwrap();
    registration["scmOrganizations"] = json!(["ops"]);
    let (status, body) = world
        .call(
            Method::POST,
            "/v4/buildclusters",
            "admin",
            Some(registration),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let keys = sd_testkit::ClusterKeys {
        algorithm: jsonwebtoken::Algorithm::ES256,
        private_pem: std::fs::read_to_string(&key).unwrap(),
        public_pem: String::new(),
    };
    let mut agent = AgentSetup::new(world.dir.path(), "ops-farm", &keys, &world.base);
    let check = |extra: &[(&str, String)]| {
        let mut cmd = Command::new(AGENT);
        cmd.arg("--config")
            .arg(&agent.config)
            .arg("check")
            .env_remove("SD_AGENT_CONFIG")
            .env("SD_AGENT_AUTH_ALGORITHM", "ES256");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let line = |out: &str, name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
            .to_owned()
    };

    let (code, out) = check(&[]);
    assert_eq!(code, Some(0), "{out}");
    for name in ["config", "key", "scheduler", "redis", "executor"] {
        assert!(line(&out, name).starts_with("ok"), "{out}");
    }
    assert!(out.contains("all checks passed"), "{out}");

    // Another key than the registered one: the scheduler line fails and says what to do.
    let other = home.join("other.pem");
    std::fs::write(
        &other,
        sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::ES256).private_pem,
    )
    .unwrap();
    let (code, out) = check(&[(
        "SD_AGENT_AUTH_PRIVATE_KEY_FILE",
        other.display().to_string(),
    )]);
    assert_eq!(code, Some(1), "{out}");
    let scheduler = line(&out, "scheduler");
    assert!(
        scheduler.starts_with("FAIL")
            && scheduler.contains("refused")
            && scheduler.contains("fix:"),
        "{out}"
    );
    assert!(line(&out, "redis").starts_with("ok"), "{out}");

    // The cluster's Redis down: only that line fails.
    agent.local.kill();
    let (code, out) = check(&[]);
    assert_eq!(code, Some(1), "{out}");
    let redis = line(&out, "redis");
    assert!(
        redis.starts_with("FAIL") && redis.contains("fix: check redis.url"),
        "{out}"
    );
    assert!(line(&out, "scheduler").starts_with("ok"), "{out}");
    assert!(!out.contains("all checks passed"));
    agent.local.restart().unwrap();
}

/// A stop reaching a running build ends it `stopped` (not failed), and releases the build of the
/// same job that waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_build_ends_stopped_and_releases_its_job() {
    let world = World::start().await;
    let mut linux = world.cluster("linux", None).await;
    linux.spawn();
    let start = |id: u64, sleep: u64, blocked_by: Vec<u64>| {
        json!({
            "buildId": id, "jobId": 777, "blockedBy": blocked_by,
            "annotations": {"test/sleep": sleep},
            "pipeline": {"id": 1, "name": "web/site", "scmContext": "github:github.com"},
            "apiUri": DEAD_API, "container": "node:22",
        })
    };
    let (status, body) = world
        .call(
            Method::POST,
            "/v1/queue/message",
            "sdapi",
            Some(start(300, 60, vec![])),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let running = eventually(Duration::from_secs(30), || async {
        (world.state(300).await == "running").then_some(())
    })
    .await;
    assert!(running.is_some(), "build 300 running");
    // The next build of the same job waits behind the running one.
    let (status, body) = world
        .call(
            Method::POST,
            "/v1/queue/message",
            "sdapi",
            Some(start(301, 0, vec![777])),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!linux.runs().contains_key(&301), "301 waits while 300 runs");

    let (status, body) = world
        .call(
            Method::DELETE,
            "/v1/queue/message",
            "sdapi",
            Some(json!({"buildId": 300, "jobId": 777})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let stopped = eventually(Duration::from_secs(30), || async {
        (world.state(300).await == "stopped").then_some(())
    })
    .await;
    assert!(
        stopped.is_some(),
        "300 ends stopped, not {}",
        world.state(300).await
    );
    world.wait_finished(&[301], Duration::from_secs(30)).await;
    assert_eq!(linux.runs().get(&301), Some(&1));
}
