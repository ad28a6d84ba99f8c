//! The fault suite: the real `sd-scheduler` (two replicas on one PostgreSQL database) and real
//! `sd-agent` processes (process executor) for three clusters, each behind TCP proxies that cut
//! connections on demand, with real `redis-server`s (AOF, `appendfsync always`) for the master
//! queues and for each cluster's local queue. While a few hundred builds are submitted through
//! the intake API, faults land at random points:
//!
//! - agent ⇄ scheduler, scheduler ⇄ master Redis and agent ⇄ local Redis connections are cut
//!   (reset) or blackholed, then restored;
//! - scheduler replicas and agents are killed with SIGKILL and started again;
//! - the master Redis and the clusters' local Redis are killed and restarted from their AOF;
//! - the master Redis fails over as ElastiCache does: its replica promoted, the primary demoted
//!   to replica of it, and the endpoint the schedulers reach (their proxies) moved to the new
//!   primary, while their open connections still reach the demoted one (`READONLY`).
//!
//! Afterwards, with every fault healed, each build must have been launched exactly once or,
//! never launched, reported to the Screwdriver API as FAILURE with a message (a reason only in
//! the scheduler's database is not enough: nobody would learn of it); none may run on two
//! clusters, and the external cluster may only ever run builds of the organization it lists.
//! The verdict is taken after a quiet period longer than the longest redelivery path the suite
//! configures, so a late duplicate is caught. No scheduler or agent may exit by itself: each
//! such exit is a violation, shown with the end of its log. The figures are printed at the end
//! (`scripts/test` runs this suite with `--nocapture`, so they show when it passes too).
//!
//! And the scheduler must hear the end of every launched build ("state not final" otherwise):
//! agents keep build events in an outbox in their local Redis until reported, so no fault loses
//! one.
//!
//! The fault schedule comes from a seeded RNG: the seed is printed, and `SD_FAULT_SEED=<seed>`
//! replays the same schedule (timing still varies from run to run). On a violation the logs of
//! every process are copied to `$TMPDIR/sd-faults-<seed>-<pid>` (always with
//! `SD_FAULT_KEEP_LOGS=1`). The binaries are taken from the target directory this test runs from
//! (`cargo test --workspace` builds them; alone: `cargo build -p sd-scheduler -p sd-agent` first),
//! or from `SD_FAULT_BIN_DIR`; a binary older than its sources is refused unless
//! `SD_FAULT_ALLOW_STALE=1`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sd_testkit::chaos::ProxyStats;
use sd_testkit::{
    AgentConfig, Backend, ChaosProxy, ClusterKeys, FakeScrewdriver, RedisServer, TestDb, free_port,
    launcher, shared_keys,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Builds submitted (every twelfth one is of an organization its named cluster refuses).
const SUBMISSIONS: u64 = 240;
/// Pace of submissions.
const SUBMIT_EVERY: Duration = Duration::from_millis(180);
/// Faults keep coming this long after the last submission.
const FAULTS_AFTER_SUBMISSIONS: Duration = Duration::from_secs(5);
/// Once every fault is healed, how long builds get to end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Once every build launched or failed: how long the scheduler gets to hear their ends (an
/// agent killed mid-report leaves it to the next one once its 30 s claim lapses).
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

// Timings the suite configures (production values scaled down to seconds), and the one it
// cannot configure: together they bound how late a redelivery can still launch a build.
/// `queue.visibility_timeout`: an unacknowledged delivery is redelivered after this.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3);
/// `queue.nack_backoff_max`: a nacked delivery waits at most this before it is ready again.
const NACK_BACKOFF_MAX: Duration = Duration::from_secs(3);
/// `reconciler.grace` and `reconciler.interval`: a build dispatched but never heard to start
/// is queued again after the grace, found on the next round.
const RECONCILER_GRACE: Duration = Duration::from_secs(10);
const RECONCILER_INTERVAL: Duration = Duration::from_secs(2);
/// The agents' `executor.launch_lease`: a local job whose launcher died is handed out again
/// after this.
const LAUNCH_LEASE: Duration = Duration::from_secs(5);
/// The agents' `poll.wait`.
const POLL_WAIT: Duration = Duration::from_secs(2);
/// The agents' outbox claim lease and sweep (`CLAIM_LEASE`, `SWEEP_EVERY` in
/// agent/src/watcher.rs, not configurable): events a killed agent was reporting are taken over
/// by the next one within their sum.
const OUTBOX_CLAIM_LEASE: Duration = Duration::from_secs(30);
const OUTBOX_SWEEP: Duration = Duration::from_secs(5);
/// The longest way a build can still reach a launcher late: queued again by the reconciler,
/// its lease lapsing on the master queue, a nack back-off, a poll, its lease lapsing on the
/// local queue.
const REDELIVERY_PATH: Duration = RECONCILER_GRACE
    .saturating_add(RECONCILER_INTERVAL)
    .saturating_add(VISIBILITY_TIMEOUT)
    .saturating_add(NACK_BACKOFF_MAX)
    .saturating_add(POLL_WAIT)
    .saturating_add(LAUNCH_LEASE);
/// After everything settled: time for a late duplicate, or a late event undoing a final state,
/// to show up — longer than the redelivery path and than a report's takeover.
const QUIET_PERIOD: Duration = max_duration(
    REDELIVERY_PATH,
    OUTBOX_CLAIM_LEASE.saturating_add(OUTBOX_SWEEP),
)
.saturating_add(Duration::from_secs(2));

const fn max_duration(a: Duration, b: Duration) -> Duration {
    if a.as_nanos() > b.as_nanos() { a } else { b }
}

/// A duration as the binaries' config reads it.
fn config_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

const SCM: &str = "github:github.com";
/// The external cluster and the one organization it lists.
const EXTERNAL: &str = "ios-farm";
const EXTERNAL_ORG: &str = "mobile";
const MANAGED: [&str; 2] = ["linux-a", "linux-b"];

// === binaries ===

/// The built binary `name`, next to this test's own target directory (or in
/// `SD_FAULT_BIN_DIR`); refuses a binary older than the sources it is built from.
fn binary(name: &str, crates: &[&str]) -> PathBuf {
    let dir = match std::env::var_os("SD_FAULT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("path of the test executable");
            // target/<profile>/deps/faults-<hash> → target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("the test executable lives in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing. The fault suite runs the real binaries: `cargo test --workspace` builds them; \
         to run this test alone, first `cargo build -p sd-scheduler -p sd-agent` (same profile), \
         or set SD_FAULT_BIN_DIR to the directory holding sd-scheduler and sd-agent.",
        path.display()
    );
    if std::env::var_os("SD_FAULT_ALLOW_STALE").is_none() {
        let built = mtime(&path);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let newer: Vec<PathBuf> = crates
            .iter()
            .flat_map(|c| files_under(&root.join(c).join("src")))
            .filter(|f| mtime(f) > built)
            .collect();
        assert!(
            newer.is_empty(),
            "{} is older than its sources ({}): rebuild with `cargo build -p sd-scheduler -p sd-agent` \
             (or set SD_FAULT_ALLOW_STALE=1 to test it anyway)",
            path.display(),
            newer
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    path
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

// === processes ===

/// A real process of ours that can be killed with SIGKILL and started again the same way.
struct Proc {
    /// What it is, for messages ("scheduler 0", "agent of linux-a").
    what: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

/// A process of ours that exited without being killed. Neither binary exits by itself under
/// these faults: the scheduler only at start-up when its database or port is unusable (not
/// faulted here), the agent at start-up for an unusable config, port or work dir, or when one of
/// its loops ends on its own (a panic: `app::run` supervises them) — both connect to Redis
/// lazily and ride out cuts and restarts. So each one is a violation.
struct SelfExit {
    what: String,
    status: String,
    at: f64,
    log: PathBuf,
    /// The last lines of its log when the exit was noticed.
    tail: String,
}

static SELF_EXITS: Mutex<Vec<SelfExit>> = Mutex::new(Vec::new());

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    fn new(
        what: &str,
        program: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Self {
        Self {
            what: what.to_owned(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            log,
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open process log");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("SD_") || key_text == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e}", self.program.display());
        }));
    }

    /// Whether it exited without being killed; such an exit is recorded (a violation) and the
    /// child forgotten.
    fn exited_by_itself(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return false;
        };
        self.child = None;
        eprintln!(
            "faults: t+{:>5.1}s {} had exited by itself ({status}); see {}",
            elapsed_since_start(),
            self.what,
            self.log.display()
        );
        lock(&SELF_EXITS).push(SelfExit {
            what: self.what.clone(),
            status: status.to_string(),
            at: elapsed_since_start(),
            log: self.log.clone(),
            tail: tail(&self.log, 15),
        });
        true
    }

    /// `kill -9`, and reap it.
    fn kill9(&mut self) {
        self.exited_by_itself();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Running now: started again when it is not (an exit by itself is recorded).
    fn ensure_running(&mut self) {
        self.exited_by_itself();
        if self.child.is_none() {
            self.start();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === the world ===

struct Cluster {
    name: &'static str,
    /// The organization an external cluster lists; `None` for Screwdriver-managed ones.
    org: Option<&'static str>,
    local: Mutex<RedisServer>,
    /// Agent ⇄ local Redis.
    redis_proxy: ChaosProxy,
    /// Agent ⇄ scheduler replicas (a load balancer over both).
    scheduler_proxy: ChaosProxy,
    agent: Mutex<Proc>,
    runs: PathBuf,
    home: PathBuf,
}

impl Cluster {
    /// buildId → launches recorded by this cluster's launcher.
    fn runs(&self) -> HashMap<u64, u32> {
        launcher::runs(&self.runs)
    }
}

struct World {
    /// The master Redis: the primary, then its replica (swapped by each failover).
    master: Mutex<(RedisServer, RedisServer)>,
    /// Scheduler replica i ⇄ master Redis.
    redis_proxies: Vec<ChaosProxy>,
    schedulers: Vec<Mutex<Proc>>,
    /// Direct URLs of the replicas (the Screwdriver API's side, not faulted).
    bases: Vec<String>,
    clusters: Vec<Cluster>,
    fake: FakeScrewdriver,
    pool: sqlx::PgPool,
    sdapi: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    _db: TestDb,
}

impl World {
    async fn start() -> Self {
        let scheduler_bin = binary("sd-scheduler", &["scheduler", "queue", "protocol"]);
        let agent_bin = binary("sd-agent", &["agent", "queue", "protocol"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let master = RedisServer::start_with_aof().expect("master redis-server");
        let standby = RedisServer::start_with_aof().expect("master's replica redis-server");
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master.port())
            .query(&mut standby.conn())
            .expect("REPLICAOF");
        let db = TestDb::new(Backend::Postgres).await.expect("PostgreSQL");
        let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");
        let fake = FakeScrewdriver::start().await;
        let api = shared_keys("api");
        let (_, api_pub) = api.write(dir.path(), "api");
        let (launcher_key, _) = shared_keys("launcher").write(dir.path(), "launcher");
        let master_addr = format!("127.0.0.1:{}", master.port())
            .parse()
            .expect("addr");

        let ports = [free_port(), free_port()];
        let replicas: Vec<std::net::SocketAddr> = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().expect("addr"))
            .collect();
        let mut redis_proxies = Vec::new();
        for _ in &ports {
            redis_proxies.push(ChaosProxy::start(master_addr).await.expect("proxy"));
        }

        let names: Vec<&'static str> = MANAGED.iter().copied().chain([EXTERNAL]).collect();
        let keys: Vec<ClusterKeys> = names
            .iter()
            .map(|_| ClusterKeys::generate(jsonwebtoken::Algorithm::RS256))
            .collect();
        let key_var =
            |name: &str| format!("SD_CLUSTER_{}_KEY", name.to_uppercase().replace('-', "_"));

        let mut schedulers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let mut env = vec![
                ("SD_SCHEDULER_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("SD_SCHEDULER_DATABASE_URL".into(), db.url().to_owned()),
                ("SD_SCHEDULER_DATABASE_MAX_CONNECTIONS".into(), "5".into()),
                (
                    "SD_SCHEDULER_REDIS_URL".into(),
                    redis_proxies[i].redis_url(),
                ),
                (
                    "SD_SCHEDULER_AUTH_API_PUBLIC_KEY_FILE".into(),
                    api_pub.display().to_string(),
                ),
                (
                    "SD_SCHEDULER_AUTH_PRIVATE_KEY_FILE".into(),
                    launcher_key.display().to_string(),
                ),
                // Production timings scaled down to seconds.
                (
                    "SD_SCHEDULER_QUEUE_VISIBILITY_TIMEOUT".into(),
                    config_duration(VISIBILITY_TIMEOUT),
                ),
                ("SD_SCHEDULER_QUEUE_MAX_ATTEMPTS".into(), "10".into()),
                // A dead letter is held, then failed: within the suite's settle time.
                ("SD_SCHEDULER_QUEUE_DEAD_LETTER_HOLD".into(), "5s".into()),
                ("SD_SCHEDULER_QUEUE_NACK_BACKOFF".into(), "500ms".into()),
                (
                    "SD_SCHEDULER_QUEUE_NACK_BACKOFF_MAX".into(),
                    config_duration(NACK_BACKOFF_MAX),
                ),
                ("SD_SCHEDULER_HA_CLUSTER_DEAD_AFTER".into(), "6s".into()),
                ("SD_SCHEDULER_HA_CHECK_INTERVAL".into(), "1s".into()),
                (
                    "SD_SCHEDULER_RECONCILER_GRACE".into(),
                    config_duration(RECONCILER_GRACE),
                ),
                (
                    "SD_SCHEDULER_RECONCILER_INTERVAL".into(),
                    config_duration(RECONCILER_INTERVAL),
                ),
                ("SD_SCHEDULER_REGISTRY_RELOAD_INTERVAL".into(), "2s".into()),
                (
                    "SD_SCHEDULER_SCREWDRIVER_REPORT_TIMEOUT".into(),
                    "5s".into(),
                ),
                ("SD_SCHEDULER_SCREWDRIVER_API_URIS".into(), fake.url.clone()),
                ("SD_SCHEDULER_SCREWDRIVER_ALLOW_HTTP".into(), "true".into()),
                ("SD_SCHEDULER_LOG_FORMAT".into(), "json".into()),
                ("SD_SCHEDULER_LOG_LEVEL".into(), "info".into()),
            ];
            for (name, key) in names.iter().zip(&keys) {
                env.push((key_var(name), key.public_pem.clone()));
            }
            let mut proc = Proc::new(
                &format!("scheduler {i}"),
                &scheduler_bin,
                &[],
                env,
                dir.path().join(format!("scheduler-{i}.log")),
            );
            proc.start();
            schedulers.push(Mutex::new(proc));
        }
        let bases: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        for base in &bases {
            let up = sd_testkit::eventually(Duration::from_secs(30), || async {
                let r = http.get(format!("{base}/readyz")).send().await.ok()?;
                r.status().is_success().then_some(())
            })
            .await;
            assert!(
                up.is_some(),
                "scheduler at {base} not ready; see its log in {}",
                dir.path().display()
            );
        }

        let admin = api.api_token(&["admin"]);
        let mut clusters = Vec::new();
        for (name, key) in names.iter().zip(&keys) {
            let org = (*name == EXTERNAL).then_some(EXTERNAL_ORG);
            let mut body = json!({"name": name, "scmContext": SCM, "managedByEmail": "ops@example.com",
                                  "authKey": key_var(name)});
            match org {
                Some(o) => {
                    body["managedBy"] = json!("external");
                    body["scmOrganizations"] = json!([o]);
                }
                None => body["managedBy"] = json!("screwdriver"),
            }
            let resp = http
                .post(format!("{}/v4/buildclusters", bases[0]))
                .bearer_auth(&admin)
                .json(&body)
                .send()
                .await
                .expect("register cluster");
            assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
            clusters.push(
                Cluster::prepare(dir.path(), name, org, key, &replicas, &agent_bin, &fake.url)
                    .await,
            );
        }
        for c in &clusters {
            lock(&c.agent).start();
        }
        Self {
            master: Mutex::new((master, standby)),
            redis_proxies,
            schedulers,
            bases,
            clusters,
            fake,
            pool,
            sdapi: api.api_token(&["sdapi"]),
            http,
            dir,
            _db: db,
        }
    }

    /// Submits one build, as Screwdriver's client does: retried (on either replica) until it
    /// is answered 200/201, or refused with a 4xx. Returns the status and body.
    async fn submit(&self, spec: &BuildSpec) -> (u16, Value) {
        let mut annotations = json!({
            "screwdriver.cd/blockedBySameJob": false,
            "test/exit": spec.exit,
            "test/sleep": format!("{:.2}", spec.sleep),
        });
        if let Some(c) = spec.named {
            annotations["screwdriver.cd/buildCluster"] = json!(c);
        }
        let body = json!({
            "buildId": spec.id, "jobId": 100_000 + spec.id, "eventId": 7, "blockedBy": [],
            "annotations": annotations,
            "pipeline": {"id": 1 + spec.id % 7, "name": format!("{}/repo-{}", spec.org, spec.id % 7), "scmContext": SCM},
            "apiUri": self.fake.url, "container": "node:22", "jobName": "main",
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut attempt = spec.id as usize;
        loop {
            let base = &self.bases[attempt % self.bases.len()];
            attempt += 1;
            let sent = self
                .http
                .post(format!("{base}/v1/queue/message"))
                .bearer_auth(&self.sdapi)
                .json(&body)
                .send()
                .await;
            if let Ok(resp) = sent {
                let status = resp.status().as_u16();
                let value: Value = resp.json().await.unwrap_or(Value::Null);
                if status == 200 || status == 201 || (400..500).contains(&status) {
                    return (status, value);
                }
            }
            assert!(
                Instant::now() < deadline,
                "build {} was not accepted within 120 s",
                spec.id
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every build row: buildId → (state, reason, cluster).
    async fn rows(&self) -> HashMap<u64, (String, Option<String>, Option<String>)> {
        use sqlx::Row;
        let rows = sqlx::query("SELECT build_id, state, reason, cluster FROM builds")
            .fetch_all(&self.pool)
            .await
            .expect("read builds");
        rows.iter()
            .map(|r| {
                let id: i64 = r.get("build_id");
                (
                    u64::try_from(id).unwrap_or(0),
                    (r.get("state"), r.get("reason"), r.get("cluster")),
                )
            })
            .collect()
    }

    /// FAILURE reports the Screwdriver API received, with their messages.
    fn failures(&self) -> HashMap<u64, String> {
        self.fake
            .updates()
            .into_iter()
            .filter(|u| u.body["status"] == "FAILURE")
            .map(|u| {
                let msg = u.body["statusMessage"].as_str().unwrap_or_default();
                (u.build_id, msg.to_owned())
            })
            .filter(|(_, m)| !m.is_empty())
            .collect()
    }

    /// Heals everything: proxies open, every process and server up.
    fn heal(&self) {
        for p in &self.redis_proxies {
            p.restore();
        }
        tokio::task::block_in_place(|| {
            let mut master = lock(&self.master);
            if redis::Client::open(master.0.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .is_err()
            {
                master.0.restart().expect("restart master redis");
            }
            for s in &self.schedulers {
                lock(s).ensure_running();
            }
            for c in &self.clusters {
                c.redis_proxy.restore();
                c.scheduler_proxy.restore();
                let mut local = lock(&c.local);
                if redis::Client::open(local.url())
                    .and_then(|cl| cl.get_connection_with_timeout(Duration::from_secs(1)))
                    .is_err()
                {
                    local.restart().expect("restart local redis");
                }
                drop(local);
                lock(&c.agent).ensure_running();
            }
        });
    }

    /// Copies every process log and run log somewhere that outlives the test, for a post-mortem.
    fn keep_logs(&self, seed: u64) -> PathBuf {
        let kept = std::env::temp_dir().join(format!("sd-faults-{seed}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&kept);
        for i in 0..self.schedulers.len() {
            let name = format!("scheduler-{i}.log");
            let _ = std::fs::copy(self.dir.path().join(&name), kept.join(&name));
        }
        for c in &self.clusters {
            for file in ["agent.log", "runs.log"] {
                let _ = std::fs::copy(c.home.join(file), kept.join(format!("{}-{file}", c.name)));
            }
        }
        kept
    }

    /// Log lines of every process that mention `build_id` (JSON logs), for a failure message.
    fn trail(&self, build_id: u64) -> String {
        let needle = format!("\"build_id\":{build_id}");
        let alt = format!("\"id\":\"{build_id}\"");
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = (0..self.schedulers.len())
            .map(|i| self.dir.path().join(format!("scheduler-{i}.log")))
            .collect();
        logs.extend(self.clusters.iter().map(|c| c.home.join("agent.log")));
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(&needle) || l.contains(&alt))
                .collect();
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("--- {}\n", log.display()));
            let from = lines.len().saturating_sub(40);
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Cluster {
    async fn prepare(
        dir: &Path,
        name: &'static str,
        org: Option<&'static str>,
        keys: &ClusterKeys,
        schedulers: &[std::net::SocketAddr],
        agent_bin: &Path,
        screwdriver: &str,
    ) -> Self {
        let local = RedisServer::start_with_aof().expect("local redis-server");
        let local_addr = format!("127.0.0.1:{}", local.port()).parse().expect("addr");
        let redis_proxy = ChaosProxy::start(local_addr).await.expect("proxy");
        let scheduler_proxy = ChaosProxy::balanced(schedulers.to_vec())
            .await
            .expect("proxy");
        let home = dir.join(name);
        std::fs::create_dir_all(home.join("work")).expect("cluster dir");
        let key = home.join("private.pem");
        std::fs::write(&key, &keys.private_pem).expect("write key");
        let runs = home.join("runs.log");
        // The launcher stand-in: records the launch, runs a while, exits as the build asks.
        let script = launcher::recording(&runs).write(&home.join("launch.sh"));
        let config = AgentConfig::new(name, &scheduler_proxy.http_url(), &key)
            .shutdown_timeout(Duration::from_secs(5))
            .request_timeout(Duration::from_secs(3))
            .poll_wait(POLL_WAIT)
            .poll_max_jobs(10)
            .redis(&redis_proxy.redis_url())
            .max_in_flight(20)
            .launch_lease(LAUNCH_LEASE)
            .launcher(&script)
            .work_dir(&home.join("work"))
            .health_port(free_port())
            .screwdriver_api(screwdriver)
            .log_format("json")
            .log_level("info")
            .write(&home.join("agent.toml"));
        let config_arg = config.display().to_string();
        let agent = Proc::new(
            &format!("agent of {name}"),
            agent_bin,
            &["--config", &config_arg, "run"],
            Vec::new(),
            home.join("agent.log"),
        );
        Self {
            name,
            org,
            local: Mutex::new(local),
            redis_proxy,
            scheduler_proxy,
            agent: Mutex::new(agent),
            runs,
            home,
        }
    }
}

// === builds ===

#[derive(Debug, Clone)]
struct BuildSpec {
    id: u64,
    org: &'static str,
    named: Option<&'static str>,
    exit: u8,
    sleep: f64,
}

impl BuildSpec {
    fn random(id: u64, rng: &mut StdRng) -> Self {
        let (org, named) = if id.is_multiple_of(12) {
            // An organization the external cluster does not list, naming it: refused (403).
            ("web", Some(EXTERNAL))
        } else {
            match rng.random_range(0..100) {
                0..45 => ("web", None),
                45..60 => ("web", Some(MANAGED[0])),
                60..80 => (EXTERNAL_ORG, Some(EXTERNAL)),
                80..90 => (EXTERNAL_ORG, None),
                _ => ("games", Some(MANAGED[1])),
            }
        };
        Self {
            id,
            org,
            named,
            exit: if rng.random_range(0..100) < 5 { 3 } else { 0 },
            sleep: rng.random_range(0.1..1.5),
        }
    }

    /// Clusters this build may run on.
    fn allowed(&self) -> BTreeSet<&'static str> {
        match self.named {
            Some(EXTERNAL) if self.org == EXTERNAL_ORG => [EXTERNAL].into(),
            Some(EXTERNAL) => BTreeSet::new(),
            // Named managed clusters fall back within their group and kind.
            _ => MANAGED.into(),
        }
    }

    fn refused(&self) -> bool {
        self.named == Some(EXTERNAL) && self.org != EXTERNAL_ORG
    }
}

// === faults ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    AgentSchedulerCut,
    SchedulerRedisCut,
    AgentRedisCut,
    SchedulerKill,
    AgentKill,
    MasterRedisRestart,
    MasterRedisFailover,
    LocalRedisRestart,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::AgentSchedulerCut,
        Kind::SchedulerRedisCut,
        Kind::AgentRedisCut,
        Kind::SchedulerKill,
        Kind::AgentKill,
        Kind::MasterRedisRestart,
        Kind::MasterRedisFailover,
        Kind::LocalRedisRestart,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::AgentSchedulerCut => "agent⇄scheduler cut",
            Kind::SchedulerRedisCut => "scheduler⇄master-Redis cut",
            Kind::AgentRedisCut => "agent⇄local-Redis cut",
            Kind::SchedulerKill => "scheduler kill -9 + restart",
            Kind::AgentKill => "agent kill -9 + restart",
            Kind::MasterRedisRestart => "master Redis kill -9 + restart (AOF)",
            Kind::MasterRedisFailover => "master Redis failover (REPLICAOF)",
            Kind::LocalRedisRestart => "local Redis kill -9 + restart (AOF)",
        }
    }

    /// Relative frequency.
    fn weight(self) -> u32 {
        match self {
            Kind::AgentSchedulerCut | Kind::SchedulerRedisCut | Kind::AgentRedisCut => 4,
            Kind::AgentKill => 4,
            Kind::SchedulerKill => 3,
            Kind::MasterRedisRestart | Kind::MasterRedisFailover | Kind::LocalRedisRestart => 1,
        }
    }
}

/// One fault: what, where (replica or cluster index), for how long, and how a cut behaves.
#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: Kind,
    target: usize,
    hold: Duration,
    blackhole: bool,
}

impl Fault {
    /// What the fault occupies: two faults never hit the same thing at once.
    fn key(&self) -> String {
        match self.kind {
            Kind::AgentSchedulerCut => format!("agent-scheduler:{}", self.target),
            Kind::SchedulerRedisCut => format!("scheduler-redis:{}", self.target),
            Kind::AgentRedisCut | Kind::LocalRedisRestart => {
                format!("local-redis:{}", self.target)
            }
            Kind::SchedulerKill => format!("scheduler:{}", self.target),
            Kind::AgentKill => format!("agent:{}", self.target),
            Kind::MasterRedisRestart | Kind::MasterRedisFailover => "master-redis".into(),
        }
    }

    fn random(kind: Kind, replicas: usize, clusters: usize, rng: &mut StdRng) -> Self {
        let secs =
            |rng: &mut StdRng, lo: f64, hi: f64| Duration::from_secs_f64(rng.random_range(lo..hi));
        let (target, hold) = match kind {
            Kind::SchedulerRedisCut => (rng.random_range(0..replicas), secs(rng, 0.3, 4.0)),
            Kind::SchedulerKill => (rng.random_range(0..replicas), secs(rng, 0.2, 3.0)),
            // Some outages outlast ha.cluster_dead_after (6 s) and reconciler.grace (10 s):
            // the cluster is declared dead and its waiting builds move.
            Kind::AgentSchedulerCut | Kind::AgentKill if rng.random_range(0..100) < 20 => {
                (rng.random_range(0..clusters), secs(rng, 7.0, 13.0))
            }
            Kind::AgentSchedulerCut | Kind::AgentKill | Kind::AgentRedisCut => {
                (rng.random_range(0..clusters), secs(rng, 0.3, 4.0))
            }
            Kind::MasterRedisRestart => (0, secs(rng, 0.0, 1.5)),
            Kind::MasterRedisFailover => (0, secs(rng, 0.5, 2.0)),
            Kind::LocalRedisRestart => (rng.random_range(0..clusters), secs(rng, 0.0, 2.0)),
        };
        Self {
            kind,
            target,
            hold,
            blackhole: rng.random_range(0..100) < 30,
        }
    }
}

fn pick_kind(rng: &mut StdRng) -> Kind {
    let total: u32 = Kind::ALL.iter().map(|k| k.weight()).sum();
    let mut n = rng.random_range(0..total);
    for k in Kind::ALL {
        if n < k.weight() {
            return k;
        }
        n -= k.weight();
    }
    Kind::AgentKill
}

/// Applies `fault`, holds it, and heals it.
async fn inject(world: Arc<World>, fault: Fault) {
    let cut = |proxy: &ChaosProxy| {
        if fault.blackhole {
            proxy.blackhole();
        } else {
            proxy.cut();
        }
    };
    match fault.kind {
        Kind::AgentSchedulerCut => {
            let proxy = &world.clusters[fault.target].scheduler_proxy;
            cut(proxy);
            tokio::time::sleep(fault.hold).await;
            proxy.restore();
        }
        Kind::SchedulerRedisCut => {
            let proxy = &world.redis_proxies[fault.target];
            cut(proxy);
            tokio::time::sleep(fault.hold).await;
            proxy.restore();
        }
        Kind::AgentRedisCut => {
            let proxy = &world.clusters[fault.target].redis_proxy;
            cut(proxy);
            tokio::time::sleep(fault.hold).await;
            proxy.restore();
        }
        Kind::SchedulerKill => {
            lock(&world.schedulers[fault.target]).kill9();
            tokio::time::sleep(fault.hold).await;
            lock(&world.schedulers[fault.target]).start();
        }
        Kind::AgentKill => {
            let cluster = &world.clusters[fault.target];
            lock(&cluster.agent).kill9();
            tokio::time::sleep(fault.hold).await;
            lock(&cluster.agent).start();
        }
        Kind::MasterRedisRestart => {
            lock(&world.master).0.kill();
            tokio::time::sleep(fault.hold).await;
            tokio::task::block_in_place(|| lock(&world.master).0.restart())
                .expect("master redis restarts from its AOF");
        }
        Kind::MasterRedisFailover => {
            tokio::task::block_in_place(|| fail_over(&world, fault.hold));
        }
        Kind::LocalRedisRestart => {
            let cluster = &world.clusters[fault.target];
            lock(&cluster.local).kill();
            tokio::time::sleep(fault.hold).await;
            tokio::task::block_in_place(|| lock(&cluster.local).restart())
                .expect("local redis restarts from its AOF");
        }
    }
}

/// A planned failover, as ElastiCache runs one: writes paused on the primary, the replica
/// caught up, promoted, the primary made its replica, the endpoint (every scheduler's proxy)
/// moved; then writes resume, and the schedulers' open connections reach the demoted node,
/// which answers `READONLY` until they reconnect. `hold` is how long writes stay paused.
fn fail_over(world: &World, hold: Duration) {
    let mut master = lock(&world.master);
    let (primary, replica) = (&master.0, &master.1);
    let run = |server: &RedisServer, args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<redis::Value>(&mut server.conn())
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let pause_ms = (hold.as_millis() + 2000).to_string();
    run(primary, &["CLIENT", "PAUSE", &pause_ms, "WRITE"]);
    let caught_up = run(primary, &["WAIT", "1", "5000"]);
    assert_eq!(
        caught_up,
        redis::Value::Int(1),
        "the replica did not catch up"
    );
    run(replica, &["REPLICAOF", "NO", "ONE"]);
    let new_primary = replica.port().to_string();
    run(primary, &["REPLICAOF", "127.0.0.1", &new_primary]);
    let endpoint: std::net::SocketAddr = format!("127.0.0.1:{new_primary}").parse().expect("addr");
    for proxy in &world.redis_proxies {
        proxy.point_at(endpoint);
    }
    std::thread::sleep(hold);
    run(primary, &["CLIENT", "UNPAUSE"]);
    let (a, b) = &mut *master;
    std::mem::swap(a, b);
}

/// Injects faults at random points until `until`; returns how many of each kind.
async fn inject_faults(world: Arc<World>, seed: u64, until: Instant) -> BTreeMap<Kind, u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Every kind early on, in a random order; then at random.
    let mut first: Vec<Kind> = Kind::ALL.to_vec();
    first.shuffle(&mut rng);
    let mut counts = BTreeMap::new();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut running = JoinSet::new();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() < until {
        let from_first = !first.is_empty();
        let kind = if from_first {
            first.remove(0)
        } else {
            pick_kind(&mut rng)
        };
        let fault = Fault::random(kind, world.schedulers.len(), world.clusters.len(), &mut rng);
        let gap = Duration::from_secs_f64(rng.random_range(0.4..1.6));
        let key = fault.key();
        let admitted = {
            let mut b = lock(&busy);
            // Both replicas never down at once (the HA promise is about losing one).
            let other_scheduler_down =
                kind == Kind::SchedulerKill && b.iter().any(|k| k.starts_with("scheduler:"));
            !other_scheduler_down && b.insert(key.clone())
        };
        if admitted {
            *counts.entry(kind).or_insert(0) += 1;
            let cut = matches!(
                kind,
                Kind::AgentSchedulerCut | Kind::SchedulerRedisCut | Kind::AgentRedisCut
            );
            eprintln!(
                "faults: t+{:>5.1}s {} on {} for {:.1}s{}",
                elapsed_since_start(),
                kind.label(),
                target_name(&world, &fault),
                fault.hold.as_secs_f64(),
                if cut && fault.blackhole {
                    " (blackhole)"
                } else {
                    ""
                }
            );
            let (world, busy) = (Arc::clone(&world), Arc::clone(&busy));
            running.spawn(async move {
                inject(world, fault).await;
                lock(&busy).remove(&key);
            });
        } else if from_first {
            // Every kind is covered: try this one again later.
            first.push(kind);
        }
        tokio::time::sleep(gap).await;
    }
    while let Some(done) = running.join_next().await {
        done.expect("fault task");
    }
    counts
}

fn target_name(world: &World, fault: &Fault) -> String {
    match fault.kind {
        Kind::SchedulerRedisCut | Kind::SchedulerKill => format!("scheduler {}", fault.target),
        Kind::MasterRedisRestart | Kind::MasterRedisFailover => "master".into(),
        _ => world.clusters[fault.target].name.to_owned(),
    }
}

static START_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

fn elapsed_since_start() -> f64 {
    now_ms().saturating_sub(START_MS.load(Ordering::Relaxed)) as f64 / 1000.0
}

// === the verdict ===

#[derive(Default, Debug)]
struct Verdict {
    /// Launches the clusters' launchers recorded, over all accepted builds.
    launches: u32,
    launched_once: Vec<u64>,
    /// Launched once, then ended as a failure (its exit code, or its agent died under it).
    launched_then_failed: Vec<u64>,
    /// Never launched, and the Screwdriver API received FAILURE with a message for it.
    failed_with_reason: Vec<u64>,
    /// Never launched and the scheduler gave it up with a reason (state `failed`), but the
    /// Screwdriver API never received FAILURE for it: the user would never learn.
    failed_unreported: Vec<(u64, String)>,
    /// Never launched, and no reason anywhere.
    lost: Vec<u64>,
    duplicated: Vec<(u64, u32)>,
    two_clusters: Vec<(u64, Vec<&'static str>)>,
    wrong_cluster: Vec<(u64, &'static str)>,
    refused_but_ran: Vec<u64>,
    /// Launched, but the scheduler still shows it waiting or running.
    state_not_final: Vec<(u64, String)>,
}

impl Verdict {
    /// Builds that break an invariant (each once).
    fn offending(&self) -> BTreeSet<u64> {
        self.lost
            .iter()
            .copied()
            .chain(self.failed_unreported.iter().map(|(id, _)| *id))
            .chain(self.duplicated.iter().map(|(id, _)| *id))
            .chain(self.two_clusters.iter().map(|(id, _)| *id))
            .chain(self.wrong_cluster.iter().map(|(id, _)| *id))
            .chain(self.refused_but_ran.iter().copied())
            .chain(self.state_not_final.iter().map(|(id, _)| *id))
            .collect()
    }
}

async fn judge(world: &World, accepted: &[BuildSpec], refused: &[BuildSpec]) -> Verdict {
    let runs: Vec<(&'static str, HashMap<u64, u32>)> =
        world.clusters.iter().map(|c| (c.name, c.runs())).collect();
    let lists: HashMap<&'static str, Option<&'static str>> =
        world.clusters.iter().map(|c| (c.name, c.org)).collect();
    let rows = world.rows().await;
    // What the Screwdriver API was told: only this makes a failure visible to the user.
    let reported = world.failures();
    let mut v = Verdict::default();
    for spec in accepted {
        let on: Vec<(&'static str, u32)> = runs
            .iter()
            .filter_map(|(name, r)| r.get(&spec.id).map(|n| (*name, *n)))
            .collect();
        let total: u32 = on.iter().map(|(_, n)| n).sum();
        v.launches += total;
        let row = rows.get(&spec.id);
        let state = row.map_or("absent", |r| r.0.as_str());
        let db_reason = row
            .and_then(|r| r.1.clone())
            .filter(|r| !r.is_empty() && state == "failed");
        let reported = reported.get(&spec.id);
        if total > 1 {
            v.duplicated.push((spec.id, total));
        }
        if on.len() > 1 {
            v.two_clusters
                .push((spec.id, on.iter().map(|(n, _)| *n).collect()));
        }
        let allowed = spec.allowed();
        for (name, _) in &on {
            // An external cluster runs only builds of the organization it lists.
            let foreign = lists
                .get(name)
                .copied()
                .flatten()
                .is_some_and(|org| org != spec.org);
            if foreign || !allowed.contains(name) {
                v.wrong_cluster.push((spec.id, name));
            }
        }
        if total == 1 {
            v.launched_once.push(spec.id);
            if state == "failed" || reported.is_some() {
                v.launched_then_failed.push(spec.id);
            }
        } else if total == 0 {
            match (reported, db_reason) {
                (Some(_), _) => v.failed_with_reason.push(spec.id),
                (None, Some(reason)) => v.failed_unreported.push((spec.id, reason)),
                (None, None) => v.lost.push(spec.id),
            }
        }
        if total >= 1
            && !matches!(state, "finished" | "failed" | "stopped" | "collapsed")
            && reported.is_none()
        {
            v.state_not_final.push((spec.id, state.to_owned()));
        }
    }
    for spec in refused {
        if runs.iter().any(|(_, r)| r.contains_key(&spec.id)) || rows.contains_key(&spec.id) {
            v.refused_but_ran.push(spec.id);
        }
    }
    v
}

/// The figures, as a short table: `n` alone when all is well, `n  [ids…]` otherwise.
struct Figures {
    seed: u64,
    accepted: usize,
    refused: usize,
    faults: BTreeMap<Kind, u32>,
    proxies: ProxyStats,
    verdict: Verdict,
    misrouted_at_intake: Vec<(u64, String)>,
    self_exits: Vec<String>,
    elapsed: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn row(
            f: &mut std::fmt::Formatter<'_>,
            label: &str,
            n: usize,
            ids: String,
        ) -> std::fmt::Result {
            if n == 0 {
                writeln!(f, "  {label:<40}{n}")
            } else {
                writeln!(f, "  {label:<40}{n}  {ids}")
            }
        }
        let v = &self.verdict;
        let p = &self.proxies;
        writeln!(f, "\n=== fault suite figures ===")?;
        writeln!(
            f,
            "  {:<40}{} (SD_FAULT_SEED={} replays the schedule)",
            "seed", self.seed, self.seed
        )?;
        writeln!(
            f,
            "  {:<40}{:.1} s (of which quiet period {} s)",
            "elapsed",
            self.elapsed.as_secs_f64(),
            QUIET_PERIOD.as_secs()
        )?;
        writeln!(f, "  {:<40}{}", "builds accepted", self.accepted)?;
        writeln!(
            f,
            "  {:<40}{} (403 at intake)",
            "builds refused", self.refused
        )?;
        let total: u32 = self.faults.values().sum();
        writeln!(f, "  {:<40}{total}", "faults injected")?;
        for kind in Kind::ALL {
            writeln!(
                f,
                "    {:<38}{}",
                kind.label(),
                self.faults.get(&kind).copied().unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "    {:<38}{} ({} reset, {} refused while cut, {} blackholed)",
            "proxied connections", p.accepted, p.reset, p.refused, p.blackholed
        )?;
        writeln!(
            f,
            "  {:<40}{} ({} builds launched once, {} of them then failed)",
            "launches",
            v.launches,
            v.launched_once.len(),
            v.launched_then_failed.len()
        )?;
        row(
            f,
            "never launched, FAILURE reported",
            v.failed_with_reason.len(),
            format!("{:?}", v.failed_with_reason),
        )?;
        row(
            f,
            "never launched, FAILURE not sent",
            v.failed_unreported.len(),
            format!("{:?}", v.failed_unreported),
        )?;
        row(f, "lost", v.lost.len(), format!("{:?}", v.lost))?;
        row(
            f,
            "duplicated",
            v.duplicated.len(),
            format!("{:?}", v.duplicated),
        )?;
        row(
            f,
            "on two clusters",
            v.two_clusters.len(),
            format!("{:?}", v.two_clusters),
        )?;
        row(
            f,
            "wrong cluster / organization",
            v.wrong_cluster.len() + self.misrouted_at_intake.len(),
            format!(
                "ran: {:?}; routed at intake: {:?}",
                v.wrong_cluster, self.misrouted_at_intake
            ),
        )?;
        row(
            f,
            "refused, yet recorded or run",
            v.refused_but_ran.len(),
            format!("{:?}", v.refused_but_ran),
        )?;
        row(
            f,
            "launched, end not heard",
            v.state_not_final.len(),
            format!("{:?}", v.state_not_final),
        )?;
        row(
            f,
            "processes exited by themselves",
            self.self_exits.len(),
            format!("{:?}", self.self_exits),
        )?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite, about two minutes: scripts/test runs it (alone: cargo build -p sd-scheduler -p sd-agent, then cargo test -p sd-testkit --test faults -- --ignored --nocapture)"]
async fn every_build_launched_once_or_failed_with_a_reason_under_faults() {
    let started = Instant::now();
    START_MS.store(now_ms(), Ordering::Relaxed);
    let seed = std::env::var("SD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(rand::random);
    eprintln!("faults: seed {seed} (replay with SD_FAULT_SEED={seed})");
    let world = Arc::new(World::start().await);
    eprintln!(
        "faults: world up in {:.1}s (logs in {})",
        started.elapsed().as_secs_f64(),
        world.dir.path().display()
    );

    // Submissions and faults run together.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_b111d);
    let specs: Vec<BuildSpec> = (1..=SUBMISSIONS)
        .map(|id| BuildSpec::random(id, &mut rng))
        .collect();
    let faults_until = Instant::now()
        + SUBMIT_EVERY * u32::try_from(SUBMISSIONS).unwrap_or(0)
        + FAULTS_AFTER_SUBMISSIONS;
    let injector = tokio::spawn(inject_faults(Arc::clone(&world), seed, faults_until));
    let mut submissions = JoinSet::new();
    for spec in specs.clone() {
        let world = Arc::clone(&world);
        submissions.spawn(async move {
            let answer = world.submit(&spec).await;
            (spec, answer)
        });
        tokio::time::sleep(SUBMIT_EVERY).await;
    }
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut misrouted_at_intake = Vec::new();
    while let Some(done) = submissions.join_next().await {
        let (spec, (status, body)) = done.expect("submission task");
        match (spec.refused(), status) {
            (true, 403) => refused.push(spec),
            (false, 200 | 201) => {
                if let Some(c) = body["buildClusterName"].as_str()
                    && !spec.allowed().contains(c)
                {
                    misrouted_at_intake.push((spec.id, c.to_owned()));
                }
                accepted.push(spec);
            }
            _ => panic!(
                "build {} ({} naming {:?}) answered {status}: {body}",
                spec.id, spec.org, spec.named
            ),
        }
    }
    accepted.sort_by_key(|s| s.id);
    let counts = injector.await.expect("fault injector");
    eprintln!(
        "faults: t+{:.1}s submissions done ({} accepted, {} refused); healing",
        started.elapsed().as_secs_f64(),
        accepted.len(),
        refused.len()
    );
    world.heal();

    // Every build ends: launched, or failed with a reason Screwdriver was told; then the
    // scheduler hears the end of those that were launched (bounded: a lost end event is
    // reported, not waited for).
    let settle_deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut final_deadline = None;
    let mut next_report = Instant::now() + Duration::from_secs(10);
    loop {
        let verdict = judge(&world, &accepted, &refused).await;
        let now = Instant::now();
        if verdict.lost.is_empty() && final_deadline.is_none() {
            final_deadline = Some(now + STATE_TIMEOUT);
        }
        let done = verdict.lost.is_empty()
            && verdict.failed_unreported.is_empty()
            && verdict.state_not_final.is_empty();
        let out_of_time = now >= settle_deadline || final_deadline.is_some_and(|d| now >= d);
        if done || out_of_time {
            eprintln!(
                "faults: t+{:.1}s {}",
                started.elapsed().as_secs_f64(),
                if done {
                    "every build ended"
                } else {
                    "settle timeout"
                }
            );
            break;
        }
        if now >= next_report {
            next_report += Duration::from_secs(10);
            eprintln!(
                "faults: t+{:.1}s still waiting: not launched {:?}; failed, FAILURE not sent yet {:?}; launched, state not final {:?}",
                started.elapsed().as_secs_f64(),
                verdict.lost,
                verdict.failed_unreported,
                verdict.state_not_final
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        world.heal();
    }
    // Quiet: no faults; anything still travelling (a redelivery, a report taken over from a
    // dead agent) arrives now. Processes are watched meanwhile: none may exit by itself.
    eprintln!(
        "faults: t+{:.1}s quiet for {} s (longer than the longest redelivery path, {} s, and a report's takeover, {} s)",
        started.elapsed().as_secs_f64(),
        QUIET_PERIOD.as_secs(),
        REDELIVERY_PATH.as_secs(),
        (OUTBOX_CLAIM_LEASE + OUTBOX_SWEEP).as_secs()
    );
    let quiet_until = Instant::now() + QUIET_PERIOD;
    while Instant::now() < quiet_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        world.heal();
    }
    let verdict = judge(&world, &accepted, &refused).await;
    let elapsed = started.elapsed();

    let mut proxies = ProxyStats::default();
    let all_proxies = world.redis_proxies.iter().chain(
        world
            .clusters
            .iter()
            .flat_map(|c| [&c.redis_proxy, &c.scheduler_proxy]),
    );
    for p in all_proxies {
        let s = p.stats();
        proxies.accepted += s.accepted;
        proxies.reset += s.reset;
        proxies.refused += s.refused;
        proxies.blackholed += s.blackholed;
    }
    let mut exits = String::new();
    let self_exits: Vec<String> = lock(&SELF_EXITS)
        .iter()
        .map(|e| {
            exits.push_str(&format!(
                "=== {} exited by itself at t+{:.1}s ({}); last lines of {}:\n{}\n",
                e.what,
                e.at,
                e.status,
                e.log.display(),
                e.tail
            ));
            format!("{} at t+{:.1}s", e.what, e.at)
        })
        .collect();
    let mut offending = verdict.offending();
    offending.extend(misrouted_at_intake.iter().map(|(id, _)| *id));
    let figures = Figures {
        seed,
        accepted: accepted.len(),
        refused: refused.len(),
        faults: counts,
        proxies,
        verdict,
        misrouted_at_intake,
        self_exits,
        elapsed,
    };
    eprintln!("{figures}");

    if std::env::var_os("SD_FAULT_KEEP_LOGS").is_some() {
        eprintln!("faults: logs kept in {}", world.keep_logs(seed).display());
    }
    if !offending.is_empty() || !figures.self_exits.is_empty() {
        let mut trails = String::new();
        for id in offending.iter().take(5) {
            trails.push_str(&format!("=== build {id}\n{}", world.trail(*id)));
        }
        let kept = world.keep_logs(seed);
        panic!(
            "fault suite: {} build(s) break an invariant: {offending:?}; {} process(es) exited by themselves (seed {seed}; logs kept in {}):{figures}\n{exits}{trails}",
            offending.len(),
            figures.self_exits.len(),
            kept.display()
        );
    }
    assert!(
        figures.accepted >= 200,
        "at least 200 builds must be accepted, got {}",
        figures.accepted
    );
}
