//! A scheduler started in-process on a free port, with its own redis-server and database.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use sd_scheduler::Scheduler;
use sd_scheduler::cluster_auth::EnvLookup;
use sd_scheduler::config::Config;
use sd_testkit::{Backend, ClusterKeys, RedisServer, RsaKeys, TestDb, shared_keys};
use serde_json::{Value, json};

pub const CTX: &str = "github:github.com";
/// The Screwdriver API the harness allows, and the one [`build`] names.
pub const API_URI: &str = "https://api.screwdriver.example";

/// Also allows the (plain-HTTP, local) API at `url`, e.g. a `FakeScrewdriver`'s.
pub fn allow_api(config: &mut Config, url: &str) {
    config.screwdriver.api_uris.push(url.to_owned());
    config.screwdriver.allow_http = true;
}

pub struct Harness {
    pub scheduler: Scheduler,
    pub base: String,
    pub http: reqwest::Client,
    pub redis: RedisServer,
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    pub api: RsaKeys,
    pub launcher: RsaKeys,
    pub config: Config,
    /// The environment the scheduler reads cluster keys from.
    pub env: Arc<Mutex<HashMap<String, String>>>,
}

impl Harness {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let redis = RedisServer::start().expect("redis-server");
        let db = TestDb::new(backend).await.expect("test database");
        let dir = tempfile::tempdir().expect("tempdir");
        let api = shared_keys("api");
        let launcher = shared_keys("launcher");
        let (_, api_pub) = api.write(dir.path(), "api");
        let (launcher_key, _) = launcher.write(dir.path(), "launcher");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        config.database.url = db.url().to_owned();
        config.database.max_connections = 4;
        config.redis.url = redis.url();
        config.auth.api_public_key_file = Some(api_pub);
        config.auth.private_key_file = Some(launcher_key);
        config.screwdriver.api_uris = vec![API_URI.to_owned()];
        // Long, so tests prove the pub/sub invalidation rather than the periodic reload.
        config.registry.reload_interval = Duration::from_secs(3600);
        tweak(&mut config);
        let env = Arc::new(Mutex::new(HashMap::new()));
        let scheduler = Scheduler::start_with_env(config.clone(), lookup(&env))
            .await
            .expect("scheduler starts");
        let base = format!("http://{}", scheduler.addr());
        Self {
            scheduler,
            base,
            http: reqwest::Client::new(),
            redis,
            db,
            dir,
            api,
            launcher,
            config,
            env,
        }
    }

    /// Starts with a Redis that keeps an append-only file (restartable without loss).
    pub async fn start_with_redis(
        backend: Backend,
        redis: RedisServer,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut h = Self::start_with(backend, |c| {
            c.redis.url = redis.url();
            tweak(c);
        })
        .await;
        h.redis = redis;
        h
    }

    /// Sets an environment variable as the scheduler sees it.
    pub fn set_env(&self, name: &str, value: &str) {
        self.env
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.to_owned());
    }

    /// Registers a cluster with a fresh RS256 key published under its authKey variable.
    pub async fn cluster_with_key(&self, body: &Value) -> ClusterKeys {
        let keys = ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
        self.set_env(body["authKey"].as_str().unwrap(), &keys.public_pem);
        self.register(body).await;
        keys
    }

    /// `GET /v1/jobs/{cluster}` as the cluster's agent.
    pub async fn poll(&self, cluster: &str, keys: &ClusterKeys, wait: u64, max: u64) -> Vec<Value> {
        let (status, body) = self
            .worker_poll(&self.base, cluster, &keys.token(cluster, 60), wait, max)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["jobs"].as_array().unwrap().clone()
    }

    /// A poll (`wait=0`) for up to `max` jobs as an agent that reports itself with `headers`
    /// (none: an agent older than reports).
    pub async fn poll_as(
        &self,
        cluster: &str,
        keys: &ClusterKeys,
        max: u64,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .get(format!("{}/v1/jobs/{cluster}?wait=0&max={max}", self.base))
            .bearer_auth(keys.token(cluster, 60));
        for (header, value) in headers {
            request = request.header(*header, *value);
        }
        let response = request.send().await.expect("poll");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn worker_poll(
        &self,
        base: &str,
        cluster: &str,
        token: &str,
        wait: u64,
        max: u64,
    ) -> (StatusCode, Value) {
        let path = format!("/v1/jobs/{cluster}?wait={wait}&max={max}");
        call_at(&self.http, base, Method::GET, &path, Some(token), None).await
    }

    /// `POST /v1/jobs/{cluster}/{action}` with `{"deliveryIds": ids}`.
    pub async fn lease_call(
        &self,
        cluster: &str,
        keys: &ClusterKeys,
        action: &str,
        ids: &[&str],
    ) -> Value {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/v1/jobs/{cluster}/{action}"),
                Some(&keys.token(cluster, 60)),
                Some(&json!({"deliveryIds": ids})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn event(
        &self,
        cluster: &str,
        keys: &ClusterKeys,
        build_id: u64,
        event: &str,
    ) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/v1/jobs/{cluster}/events"),
            Some(&keys.token(cluster, 60)),
            Some(&json!({"buildId": build_id, "event": event})),
        )
        .await
    }

    /// Another scheduler process sharing this one's database and Redis.
    pub async fn replica(&self) -> (Scheduler, String) {
        let s = Scheduler::start_with_env(self.config.clone(), lookup(&self.env))
            .await
            .expect("replica starts");
        let base = format!("http://{}", s.addr());
        (s, base)
    }

    pub fn admin(&self) -> String {
        self.api.api_token(&["admin"])
    }

    pub fn user(&self) -> String {
        self.api.api_token(&["user"])
    }

    pub fn sdapi(&self) -> String {
        self.api.api_token(&["sdapi"])
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        call_at(&self.http, &self.base, method, path, token, body).await
    }

    /// Registers `body`; its `authKey` variable gets a (shared) public key unless the test set
    /// one, since registration checks that the variable exists and parses.
    pub async fn register(&self, body: &Value) -> Value {
        if let Some(var) = body["authKey"].as_str()
            && !self.env.lock().unwrap().contains_key(var)
        {
            self.set_env(var, &shared_keys("other").public_pem);
        }
        let (status, created) = self
            .call(
                Method::POST,
                "/v4/buildclusters",
                Some(&self.admin()),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created
    }

    pub async fn submit(&self, body: &Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/queue/message",
            Some(&self.sdapi()),
            Some(body),
        )
        .await
    }

    /// Submits `body` until it is accepted, as Screwdriver's executor retries a 5xx; panics
    /// with the last answer after `within`.
    pub async fn submit_until_accepted(&self, body: Value, within: Duration) {
        let last = Mutex::new(String::new());
        sd_testkit::eventually(within, || async {
            let (status, answer) = self.submit(&body).await;
            *last.lock().unwrap() = format!("{status}: {answer}");
            status.is_success().then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "build {} was never accepted: {}",
                body["buildId"],
                last.lock().unwrap()
            )
        });
    }

    /// Polls and acknowledges as `cluster`'s agent until `want` builds were delivered,
    /// counting deliveries per build; unanswered polls (Redis away) are retried for `within`.
    pub async fn take(
        &self,
        cluster: &str,
        keys: &ClusterKeys,
        delivered: &mut BTreeMap<u64, u32>,
        want: usize,
        within: Duration,
    ) {
        let deadline = std::time::Instant::now() + within;
        let acks = format!("/v1/jobs/{cluster}/ack");
        while delivered.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "only {delivered:?} delivered, want {want}"
            );
            let (status, body) = self
                .worker_poll(&self.base, cluster, &keys.token(cluster, 60), 1, 10)
                .await;
            if status != StatusCode::OK {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            for job in body["jobs"].as_array().cloned().unwrap_or_default() {
                let id = job["deliveryId"].as_str().unwrap().to_owned();
                let (status, _) = self
                    .call(
                        Method::POST,
                        &acks,
                        Some(&keys.token(cluster, 60)),
                        Some(&json!({"deliveryIds": [id]})),
                    )
                    .await;
                if status == StatusCode::OK {
                    *delivered.entry(delivered_build(&job)).or_default() += 1;
                }
            }
        }
    }

    /// Everything the scheduler keeps: the cluster table, the build rows, and every Redis key.
    pub async fn snapshot(&self) -> (Vec<Value>, i64, BTreeMap<String, String>) {
        let state = self.scheduler.state();
        let clusters = state
            .registry
            .list()
            .await
            .expect("list clusters")
            .into_iter()
            .map(|c| serde_json::to_value(c).expect("json"))
            .collect();
        let builds = state.intake.builds().count().await.expect("count builds");
        (clusters, builds, redis_dump(&self.redis))
    }

    /// The scheduler's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(format!("{}/metrics", self.base)).send().await;
        response
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Ids on a cluster's ready queue.
    pub async fn ready(&self, cluster: &str) -> Vec<String> {
        self.scheduler
            .state()
            .queues
            .ready(cluster)
            .await
            .expect("ready ids")
    }
}

fn lookup(env: &Arc<Mutex<HashMap<String, String>>>) -> EnvLookup {
    let env = Arc::clone(env);
    Arc::new(move |name| env.lock().unwrap().get(name).cloned())
}

/// The build id a delivery carries.
pub fn delivered_build(delivery: &Value) -> u64 {
    delivery["message"]["buildConfig"]["buildId"]
        .as_u64()
        .unwrap()
}

pub async fn call_at(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

/// Every key of the test's Redis with a type-aware rendering of its value.
pub fn redis_dump(redis: &RedisServer) -> BTreeMap<String, String> {
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("keys");
    keys.into_iter()
        .map(|k| {
            let kind: String = redis::cmd("TYPE").arg(&k).query(&mut conn).expect("type");
            let value = match kind.as_str() {
                "hash" => format!(
                    "{:?}",
                    redis::cmd("HGETALL")
                        .arg(&k)
                        .query::<BTreeMap<String, String>>(&mut conn)
                        .expect("hgetall")
                ),
                "zset" => format!(
                    "{:?}",
                    redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query::<Vec<String>>(&mut conn)
                        .expect("zrange")
                ),
                "list" => format!(
                    "{:?}",
                    redis::cmd("LRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query::<Vec<String>>(&mut conn)
                        .expect("lrange")
                ),
                _ => kind,
            };
            (k, value)
        })
        .collect()
}

pub fn cluster(name: &str, managed_by: &str, orgs: &[&str]) -> Value {
    json!({
        "name": name,
        "scmContext": CTX,
        "scmOrganizations": orgs,
        "managedBy": managed_by,
        "managedByEmail": "team@example.com",
        "authKey": format!("SD_CLUSTER_{}_PUBLIC_KEY", sd_protocol::cluster::cluster_name_key(name)),
    })
}

/// A start payload as Screwdriver's API sends it (its token is in the header, not here).
/// A build of `acme/app` annotated for `cluster`.
pub fn build_for(cluster: &str, build_id: u64) -> Value {
    build(
        build_id,
        "acme/app",
        json!({"screwdriver.cd/buildCluster": cluster}),
    )
}

pub fn build(build_id: u64, pipeline: &str, annotations: Value) -> Value {
    json!({
        "buildId": build_id,
        "jobId": 100 + build_id,
        "eventId": 9000 + build_id,
        "jobName": "main",
        "jobState": "ENABLED",
        "jobArchived": false,
        "annotations": annotations,
        "blockedBy": [100 + build_id],
        "pipeline": {"id": 7, "name": pipeline, "scmContext": CTX, "configPipelineId": null},
        "apiUri": API_URI,
        "container": "node:22",
        "isPR": false,
        "prParentJobId": null,
        "causeMessage": "Started by user alice",
        "freezeWindows": [],
        "build": {"id": build_id, "status": "QUEUED"},
    })
}

pub fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

/// Declares each listed `async fn name(backend: Backend)` as two tests: `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(sd_testkit::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(sd_testkit::Backend::Postgres).await }
            )*
        }
    };
}
