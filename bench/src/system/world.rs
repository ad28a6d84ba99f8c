//! The system under measurement, all real but the Kubernetes API: a master `redis-server`, the
//! `sd-scheduler` process on SQLite, the cluster's local `redis-server` (AOF, fsync always: what
//! the onboarding guide asks of a Redis without WAITAOF) and `sd-agent` processes with the
//! Kubernetes executor against [`FakeKube`], whose creations are the finish line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_testkit::kube_api::FakeKube;
use sd_testkit::{FakeScrewdriver, RedisServer, RsaKeys, free_port};
use serde_json::json;

/// The cluster the agents serve.
pub const CLUSTER: &str = "bench-agent";
/// A cluster nobody polls, holding the backlog.
pub const BACKLOG: &str = "bench-backlog";
/// The scheduler's queue tag (`sd_scheduler::queue::TAG`) and the agent's local one
/// (`sd_agent::local::TAG`): the benchmark reads both Redis as those binaries write them.
pub const MASTER_TAG: &str = "sd";
pub const LOCAL_TAG: &str = "sd-agent";
/// Key variables the scheduler is started with: `SD_CLUSTER_BENCH_<i>_PUBLIC_KEY` for these.
pub const MAX_CLUSTERS: usize = 1000;

/// A child process, killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails with the end of its log when it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited ({status}):\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Pod creations by build id (pods are named by build id), with how often each was stored.
#[derive(Default)]
pub struct Created {
    at: HashMap<u64, Instant>,
    stored_again: Vec<u64>,
}

pub struct World {
    pub work: tempfile::TempDir,
    bins: PathBuf,
    pub master: RedisServer,
    pub local: RedisServer,
    pub kube: Arc<FakeKube>,
    screwdriver: FakeScrewdriver,
    pub scheduler: Proc,
    pub agent: Option<Proc>,
    agent_health: u16,
    pub url: String,
    pub http: reqwest::Client,
    admin: String,
    sdapi: String,
    cluster_key: RsaKeys,
    created: Arc<Mutex<Created>>,
    /// Woken at each creation, so a waiter looks again only when there is something new.
    news: Arc<tokio::sync::Notify>,
    next_id: AtomicU64,
    launch_concurrency: u32,
}

/// How the next agent is started.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Incarnation {
    /// With the instance file of the previous one: this host's restarted agent.
    SameHost,
    /// Without: another instance, which knows nothing of the previous one.
    Other,
}

impl World {
    /// Starts everything but the agent, on `master` (where the ceilings were measured).
    pub async fn start(bins: &Path, launch_concurrency: u32, master: RedisServer) -> Result<Self> {
        // SD_BENCH_KEEP=1 keeps the run's directory (logs, configs) to look at afterwards.
        let keep = std::env::var_os("SD_BENCH_KEEP").is_some_and(|v| v == "1");
        let work = tempfile::Builder::new()
            .prefix("sd-bench-system.")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            eprintln!("keeping {}", work.path().display());
        }
        let local = RedisServer::start_with_aof()?;
        let kube = Arc::new(FakeKube::start().await);
        let screwdriver = FakeScrewdriver::start().await;
        let keys = work.path().join("keys");
        std::fs::create_dir_all(&keys)?;
        let api = RsaKeys::generate();
        api.write(&keys, "api");
        RsaKeys::generate().write(&keys, "launcher");
        let cluster_key = RsaKeys::generate();
        cluster_key.write(&keys, "cluster");

        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(bins.join("sd-scheduler"));
        cmd.env("SD_SCHEDULER_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "SD_SCHEDULER_DATABASE_URL",
                format!("sqlite://{}/scheduler.db", work.path().display()),
            )
            .env("SD_SCHEDULER_REDIS_URL", master.url())
            .env(
                "SD_SCHEDULER_AUTH_API_PUBLIC_KEY_FILE",
                keys.join("api.pub.pem"),
            )
            .env(
                "SD_SCHEDULER_AUTH_PRIVATE_KEY_FILE",
                keys.join("launcher.key.pem"),
            )
            .env("SD_SCHEDULER_SCREWDRIVER_API_URIS", &screwdriver.url)
            .env("SD_SCHEDULER_SCREWDRIVER_ALLOW_HTTP", "true")
            // Clusters that never poll stay healthy for the run (no re-routing of the backlog).
            .env("SD_SCHEDULER_HA_CLUSTER_DEAD_AFTER", "1h")
            .env("SD_SCHEDULER_LOG_LEVEL", "warn")
            .env("SD_CLUSTER_BENCH_AGENT_PUBLIC_KEY", &cluster_key.public_pem)
            .env(
                "SD_CLUSTER_BENCH_BACKLOG_PUBLIC_KEY",
                &cluster_key.public_pem,
            );
        for i in 0..MAX_CLUSTERS {
            cmd.env(
                format!("SD_CLUSTER_BENCH_{i}_PUBLIC_KEY"),
                &cluster_key.public_pem,
            );
        }
        let scheduler = Proc::spawn("sd-scheduler", cmd, work.path().join("scheduler.log"))?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut world = Self {
            bins: bins.to_owned(),
            master,
            local,
            kube,
            screwdriver,
            scheduler,
            agent: None,
            agent_health: free_port(),
            url,
            http,
            admin: api.api_token(&["admin"]),
            sdapi: api.api_token(&["sdapi"]),
            cluster_key,
            created: Arc::default(),
            news: Arc::default(),
            next_id: AtomicU64::new(1_000_000),
            launch_concurrency,
            work,
        };
        world.wait_ready(&format!("{}/readyz", world.url)).await?;
        world.play_kubelet();
        world
            .register(CLUSTER, "SD_CLUSTER_BENCH_AGENT_PUBLIC_KEY")
            .await?;
        world
            .register(BACKLOG, "SD_CLUSTER_BENCH_BACKLOG_PUBLIC_KEY")
            .await?;
        Ok(world)
    }

    async fn wait_ready(&mut self, url: &str) -> Result<()> {
        for _ in 0..300 {
            if self
                .http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            self.scheduler.check_alive()?;
            if let Some(agent) = self.agent.as_mut() {
                agent.check_alive()?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{url} not ready after 15 s")
    }

    /// Records every pod stored and starts it running, as a kubelet would.
    fn play_kubelet(&self) {
        let mut creations = self.kube.creations();
        let created = Arc::clone(&self.created);
        let kube = Arc::clone(&self.kube);
        let news = Arc::clone(&self.news);
        tokio::spawn(async move {
            while let Some((name, at)) = creations.recv().await {
                // Running before anyone hears of the pod: a waiter that ends it at once must
                // not see it set running again after (a new agent would adopt it as running).
                kube.set_phase(&name, "Running");
                if let Ok(id) = name.parse::<u64>() {
                    let mut c = created.lock().unwrap_or_else(PoisonError::into_inner);
                    if c.at.insert(id, at).is_some() {
                        c.stored_again.push(id);
                    }
                    news.notify_one();
                }
            }
        });
    }

    /// Registers a cluster (weightage 0: reached only by name).
    pub async fn register(&self, name: &str, key_variable: &str) -> Result<()> {
        crate::calls::register(&self.http, &self.url, &self.admin, name, key_variable, 0).await
    }

    /// Registers `bench-0` … up to `n` clusters in all (with `bench-agent` and the backlog's).
    pub async fn register_clusters(&self, n: usize) -> Result<()> {
        let names: Vec<usize> = (0..n.saturating_sub(2).min(MAX_CLUSTERS)).collect();
        let results = futures::future::join_all(names.chunks(32).map(|chunk| async move {
            for i in chunk {
                self.register(
                    &format!("bench-{i}"),
                    &format!("SD_CLUSTER_BENCH_{i}_PUBLIC_KEY"),
                )
                .await?;
            }
            Ok::<_, anyhow::Error>(())
        }))
        .await;
        results.into_iter().collect()
    }

    /// A token of `cluster`'s agent.
    pub fn agent_token(&self, cluster: &str) -> String {
        let now = sd_testkit::unix_now();
        self.cluster_key
            .sign(&json!({"buildCluster": cluster, "iat": now, "exp": now + 300}))
    }

    /// Starts an agent of [`CLUSTER`] and waits until it is ready.
    pub async fn start_agent(&mut self, incarnation: Incarnation) -> Result<()> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let config = self.work.path().join(format!("agent-{n}.toml"));
        let instance_file = match incarnation {
            Incarnation::SameHost => self.work.path().join("agent.instance"),
            Incarnation::Other => self.work.path().join(format!("agent-{n}.instance")),
        };
        let kubeconfig = self.work.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: bench, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: bench, user: {{}}}}]\ncontexts: [{{name: bench, context: {{cluster: bench, user: bench, namespace: sd-builds}}}}]\ncurrent-context: bench\n",
                self.kube.url
            ),
        )?;
        std::fs::write(
            &config,
            format!(
                r#"[cluster]
name = "{CLUSTER}"
[scheduler]
url = "{url}"
[auth]
private_key_file = "{key}"
[poll]
wait = "10s"
max_jobs = 50
[redis]
url = "{local}"
[executor]
kind = "kubernetes"
max_in_flight = 100000
launch_concurrency = {concurrency}
instance_file = "{instance}"
[executor.kubernetes]
kubeconfig = "{kubeconfig}"
namespace = "sd-builds"
# A run creates some 22,000 pods: finished ones are deleted after 10 s rather than an hour, so
# the fake API's store stays small (the deletes are part of the work measured).
finished_pod_ttl = "10s"
[screwdriver]
api_uris = ["{sd}"]
allow_http = true
[health]
listen = "127.0.0.1:{health}"
[log]
level = "warn"
"#,
                url = self.url,
                key = self.work.path().join("keys/cluster.key.pem").display(),
                local = self.local.url(),
                concurrency = self.launch_concurrency,
                instance = instance_file.display(),
                kubeconfig = kubeconfig.display(),
                sd = self.screwdriver.url,
                health = self.agent_health,
            ),
        )?;
        let mut cmd = Command::new(self.bins.join("sd-agent"));
        cmd.arg("--config").arg(&config).arg("run");
        self.agent = Some(Proc::spawn(
            "sd-agent",
            cmd,
            self.work.path().join(format!("agent-{n}.log")),
        )?);
        let ready = format!("http://127.0.0.1:{}/readyz", self.agent_health);
        self.wait_ready(&ready).await
    }

    pub fn agent_pid(&self) -> Result<u32> {
        self.agent.as_ref().map(Proc::pid).context("no agent")
    }

    /// Builds the agent has launched and not seen end (its `sd_agent_in_flight`).
    pub async fn in_flight(&self) -> Result<u64> {
        self.agent_series("sd_agent_in_flight")
            .await?
            .map(|v| v as u64)
            .context("sd_agent_in_flight missing from the agent's /metrics")
    }

    /// A series of the agent's `/metrics` (0 when not there yet).
    pub async fn agent_metric(&self, name: &str) -> Result<f64> {
        Ok(self.agent_series(name).await?.unwrap_or(0.0))
    }

    async fn agent_series(&self, name: &str) -> Result<Option<f64>> {
        let metrics = format!("http://127.0.0.1:{}/metrics", self.agent_health);
        crate::calls::gauge(&self.http, &metrics, name).await
    }

    /// Fresh build ids (pairs for blockedBy use the id as the job id too).
    pub fn next_ids(&self, n: u64) -> Vec<u64> {
        let first = self.next_id.fetch_add(n, Ordering::Relaxed);
        (first..first + n).collect()
    }

    /// Submits a start of build `id` (job `id`) to [`CLUSTER`], the launcher token minted by the
    /// scheduler as in production.
    pub async fn submit(&self, id: u64, blocked_by: &[u64]) -> Result<()> {
        let mut blocked: Vec<u64> = vec![id];
        blocked.extend_from_slice(blocked_by);
        let body = json!({
            "buildId": id, "jobId": id, "eventId": 1, "jobName": "main",
            "annotations": {"screwdriver.cd/buildCluster": CLUSTER}, "blockedBy": blocked,
            "pipeline": {"id": 1, "name": "bench/repo", "scmContext": "github:github.com"},
            "apiUri": self.screwdriver.url, "container": "node:22", "isPR": false,
        });
        // A client told to come back (503/429: the scheduler sheds load) does, as Screwdriver's
        // queue worker would; anything else refused is an error.
        for _ in 0..50 {
            let resp = self
                .http
                .post(format!("{}/v1/queue/message", self.url))
                .bearer_auth(&self.sdapi)
                .json(&body)
                .send()
                .await?;
            match resp.status().as_u16() {
                200..=299 => return Ok(()),
                429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => bail!(
                    "submitting build {id}: {} {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                ),
            }
        }
        bail!("submitting build {id}: still shed after 50 tries")
    }

    /// Submits `ids` with `concurrency` requests at a time.
    pub async fn submit_all(&self, ids: &[u64], concurrency: usize) -> Result<()> {
        use futures::StreamExt;
        let sent: Vec<Result<()>> = futures::stream::iter(ids)
            .map(|&id| self.submit(id, &[]))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        sent.into_iter().collect()
    }

    /// When build `id`'s pod was created.
    pub fn created_at(&self, id: u64) -> Option<Instant> {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .at
            .get(&id)
            .copied()
    }

    /// Builds whose pod was stored more than once (none may be).
    pub fn stored_again(&self) -> Vec<u64> {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stored_again
            .clone()
    }

    /// Waits until every build of `ids` has its pod; the moment the last one was created.
    /// Looks again at each creation (not on a timer: the bench shares the cores it measures).
    pub async fn wait_created(&mut self, ids: &[u64], timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut missing = ids.to_vec();
        let mut last: Option<Instant> = None;
        loop {
            {
                let c = self.created.lock().unwrap_or_else(PoisonError::into_inner);
                missing.retain(|id| match c.at.get(id) {
                    Some(&at) => {
                        last = last.max(Some(at));
                        false
                    }
                    None => true,
                });
            }
            if missing.is_empty() {
                return last.context("no builds");
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {} builds have no pod after {timeout:?}: lost",
                    missing.len(),
                    ids.len()
                );
            }
            self.scheduler.check_alive()?;
            if let Some(agent) = self.agent.as_mut() {
                agent.check_alive()?;
            }
            // A creation since the last look left a permit: no wake is lost.
            let _ = tokio::time::timeout(Duration::from_millis(200), self.news.notified()).await;
        }
    }

    /// Ends the builds `ids` (their pods succeed) and waits until the agent has seen every end.
    pub async fn finish(&mut self, ids: &[u64]) -> Result<()> {
        for id in ids {
            self.kube.terminate(&id.to_string(), 0);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = self.in_flight().await?;
            if n == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{n} builds still in flight 120 s after their pods ended (SD_BENCH_KEEP=1 keeps the logs)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The agent is empty, but its reports may still be on their way: a phase measured
        // while the last one's reports queue in the scheduler would measure that queue.
        let mut unreported = ids.to_vec();
        while let Some(&id) = unreported.last() {
            if self.build_state(id).await? == "finished" {
                unreported.pop();
                continue;
            }
            if Instant::now() > deadline {
                bail!("build {id} not finished in the scheduler 120 s after its pod ended");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// CPU seconds so far of the scheduler, the agent, this process, the master and the local
    /// Redis (the agent's 0 when none runs).
    pub fn cpu_seconds(&self) -> Result<[f64; 5]> {
        let redis = |r: &RedisServer| {
            r.pid()
                .context("a Redis server without a pid")
                .and_then(super::stats::cpu_seconds)
        };
        Ok([
            super::stats::cpu_seconds(self.scheduler.pid())?,
            match &self.agent {
                Some(agent) => super::stats::cpu_seconds(agent.pid())?,
                None => 0.0,
            },
            super::stats::cpu_seconds(std::process::id())?,
            redis(&self.master)?,
            redis(&self.local)?,
        ])
    }

    /// Waits until the agent has deleted every pod (`finished_pod_ttl` after each ended): a
    /// measured phase starts on a quiet cluster, not while the last phase's thousands of pods
    /// are being deleted (a real cluster deletes them as steadily as it creates them).
    pub async fn wait_pods_gone(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.kube.pod_count() > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{} pods still there 120 s after their builds ended",
                    self.kube.pod_count()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Build `id`'s state as the scheduler knows it.
    async fn build_state(&self, id: u64) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct View {
            state: String,
        }
        let view: View = self
            .http
            .get(format!("{}/v1/builds/{id}", self.url))
            .bearer_auth(&self.sdapi)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(view.state)
    }

    /// Holds `n` long-polls waiting, one per cluster `bench-0…`; dropped, they end.
    pub async fn hold_polls(&self, n: usize) -> Result<Vec<tokio::task::JoinHandle<String>>> {
        let mut polls = Vec::with_capacity(n);
        // A client of its own: these connections must not crowd the shared pool.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        for i in 0..n {
            let cluster = format!("bench-{i}");
            let request = http
                .get(format!("{}/v1/jobs/{cluster}?wait=60&max=1", self.url))
                .bearer_auth(self.agent_token(&cluster))
                .send();
            polls.push(tokio::spawn(async move {
                match request.await {
                    Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                    Err(e) => e.to_string(),
                }
            }));
        }
        Ok(polls)
    }

    /// `sd_scheduler_polls_waiting` now.
    pub async fn polls_waiting(&self) -> Result<u64> {
        let metrics = format!("{}/metrics", self.url);
        let waiting =
            crate::calls::gauge(&self.http, &metrics, "sd_scheduler_polls_waiting").await?;
        Ok(waiting.unwrap_or(0.0) as u64)
    }

    /// Puts `n` builds on the backlog cluster's master queue directly (as intake would, without
    /// the HTTP and SQL per build: a million through intake would take the run's whole budget).
    pub async fn fill_backlog(&self, n: u64) -> Result<()> {
        use futures::StreamExt;
        let queues = sd_queue::Queues::connect(&self.master.url(), MASTER_TAG)?;
        let message = sd_protocol::QueueMessage {
            job: sd_protocol::JobKind::Start,
            build_config: json!({"buildId": 0, "jobId": 0, "container": "node:22",
                "apiUri": self.screwdriver.url, "pipeline": {"id": 1, "name": "bench/backlog"}}),
            queued_at: None,
            received_at: None,
        };
        let first = 9_000_000_000u64;
        let results: Vec<Result<()>> = futures::stream::iter(first..first + n)
            .map(|id| {
                let (queues, mut message) = (queues.clone(), message.clone());
                async move {
                    message.build_config["buildId"] = json!(id);
                    message.build_config["jobId"] = json!(id);
                    queues
                        .enqueue(BACKLOG, id, id, &message, &Default::default(), false)
                        .await?;
                    Ok(())
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// Redis's own count of the work it did: per command, calls and microseconds.
#[derive(Debug, Default, Clone)]
pub struct CommandStats(pub HashMap<String, (u64, u64)>);

impl CommandStats {
    pub fn read(conn: &mut redis::Connection) -> Result<Self> {
        let info: String = redis::cmd("INFO").arg("commandstats").query(conn)?;
        let mut stats = HashMap::new();
        for line in info.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            stats.insert(name.to_owned(), (field("calls="), field("usec=")));
        }
        Ok(Self(stats))
    }

    /// What was done between `before` and `self`: (calls, µs, µs in scripts).
    pub fn since(&self, before: &Self) -> (u64, u64, u64) {
        let mut total = (0, 0, 0);
        for (name, (calls, usec)) in &self.0 {
            let (c0, u0) = before.0.get(name).copied().unwrap_or_default();
            let (dc, du) = (calls.saturating_sub(c0), usec.saturating_sub(u0));
            total.0 += dc;
            total.1 += du;
            if name.starts_with("evalsha") || name.starts_with("eval") || name.starts_with("fcall")
            {
                total.2 += du;
            }
        }
        total
    }
}
