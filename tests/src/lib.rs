//! Test harness for sd-buildcluster: real `redis-server` processes and real databases, one per
//! test, on free ports; keys and tokens. Nothing here is a fake of a dependency we can run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod agent_config;
pub mod browser;
pub mod chaos;
pub mod kube_api;
pub mod launcher;
pub mod postgres_tls;
pub mod redis_cluster;
pub mod tls;

pub use agent_config::AgentConfig;
pub use browser::Browser;
pub use chaos::ChaosProxy;
pub use postgres_tls::PgTls;
pub use redis_cluster::RedisCluster;
pub use tls::{CertFiles, TestCa};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Serves `app` on a free port of 127.0.0.1 until the task is aborted: its base URL and task.
pub async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a test server");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

// === RedisServer ===

/// A `redis-server` of this test's own, killed on drop.
///
/// Its port is picked free and then handed to the server, so another process may take it in
/// between: then this server exits ("address in use") while a readiness ping could reach the
/// other one — another test's server. So a server only counts as started once it answers and
/// `INFO server` names this child's pid while the child still runs; otherwise it is started
/// again on another port (or, for [`restart`](Self::restart), retried on its own port).
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    aof: bool,
    secure: Option<Secure>,
    /// More `redis-server` arguments (`--cluster-enabled yes`…).
    extra_args: Vec<String>,
}

/// A server with TLS on a second port and passwords: ElastiCache with in-transit encryption and
/// AUTH, as a test can run it.
struct Secure {
    tls_port: u16,
    cert: CertFiles,
    ca_file: PathBuf,
    /// The `default` user's password (the harness's own connections, on the plain port).
    admin_password: String,
    /// An ACL user for the code under test.
    user: String,
    password: String,
}

/// Ports tried before [`RedisServer::start`] gives up.
const REDIS_PORT_ATTEMPTS: usize = 5;

/// Why a spawned `redis-server` is not this test's server on its port.
enum NotOurs {
    /// Something else answers there, or our child exited (the port was taken): try again.
    PortTaken(String),
    /// Nothing answered in time, or the server could not be started at all.
    Failed(anyhow::Error),
}

impl RedisServer {
    /// Starts a throwaway server (no persistence).
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server that keeps an append-only file, so a restart keeps the data.
    pub fn start_with_aof() -> Result<Self> {
        Self::start_with(true)
    }

    /// Starts a server that also listens with TLS (a certificate from `ca` for localhost and
    /// 127.0.0.1) and requires passwords: ACL user `user` with `password` for the code under
    /// test ([`tls_url`](Self::tls_url)); the harness keeps the plain port, behind a password
    /// of its own.
    pub fn start_tls(ca: &TestCa, user: &str, password: &str) -> Result<Self> {
        Self::start_secured(Some(Secure {
            tls_port: 0,
            cert: ca.server(&format!("redis-{}", free_port())),
            ca_file: ca.ca_file(),
            admin_password: format!("admin-{}", free_port()),
            user: user.to_owned(),
            password: password.to_owned(),
        }))
    }

    fn start_with(aof: bool) -> Result<Self> {
        let mut server = Self::start_secured_unspawned(aof, None)?;
        server.start_on_free_port()?;
        Ok(server)
    }

    fn start_secured(secure: Option<Secure>) -> Result<Self> {
        let mut server = Self::start_secured_unspawned(false, secure)?;
        server.start_on_free_port()?;
        Ok(server)
    }

    fn start_secured_unspawned(aof: bool, secure: Option<Secure>) -> Result<Self> {
        Ok(Self {
            port: 0,
            dir: tempfile::tempdir()?,
            child: None,
            aof,
            secure,
            extra_args: Vec::new(),
        })
    }

    /// Starts a throwaway server with these extra `redis-server` arguments.
    pub fn start_with_args(args: &[&str]) -> Result<Self> {
        let mut server = Self::start_secured_unspawned(false, None)?;
        server.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
        server.start_on_free_port()?;
        Ok(server)
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        let server = self;
        let mut taken = Vec::new();
        for _ in 0..REDIS_PORT_ATTEMPTS {
            server.port = free_port();
            if let Some(secure) = &mut server.secure {
                secure.tls_port = free_port();
            }
            match server.spawn() {
                Ok(()) => return Ok(()),
                Err(NotOurs::PortTaken(why)) => taken.push(why),
                Err(NotOurs::Failed(e)) => return Err(e),
            }
        }
        bail!(
            "redis-server did not start on any of {REDIS_PORT_ATTEMPTS} free ports: {}",
            taken.join("; ")
        )
    }

    /// Spawns the server on `self.port` and waits until it answers as itself.
    fn spawn(&mut self) -> std::result::Result<(), NotOurs> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--logfile")
            .arg(self.log_path());
        if let Some(secure) = &self.secure {
            cmd.arg("--tls-port")
                .arg(secure.tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(&secure.cert.cert)
                .arg("--tls-key-file")
                .arg(&secure.cert.key)
                .arg("--tls-ca-cert-file")
                .arg(&secure.ca_file)
                .args(["--tls-auth-clients", "no"])
                .arg("--requirepass")
                .arg(&secure.admin_password)
                .arg("--user")
                .arg(&secure.user)
                .arg("on")
                .arg(format!(">{}", secure.password))
                .args(["~*", "&*", "+@all"]);
        }
        cmd.args(&self.extra_args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd
            .spawn()
            .context("cannot start redis-server (install it: apt-get install redis-server)")
            .map_err(NotOurs::Failed)?;
        let pid = child.id();
        self.child = Some(child);
        let verdict = self.wait_ready(pid);
        if verdict.is_err() {
            self.kill();
        }
        verdict
    }

    /// Waits until the server on `self.port` answers, and checks it is our child `pid`.
    fn wait_ready(&mut self, pid: u32) -> std::result::Result<(), NotOurs> {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Err(NotOurs::PortTaken(format!(
                    "port {port}: redis-server exited ({status}) before answering: {}",
                    self.last_log_line()
                )));
            }
            let info = redis::Client::open(self.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut conn| {
                    redis::cmd("PING").query::<String>(&mut conn)?;
                    redis::cmd("INFO").arg("server").query::<String>(&mut conn)
                });
            if let Ok(info) = info {
                let answering = info_field(&info, "process_id");
                return match (self.exited(), answering) {
                    (None, Some(p)) if p == pid.to_string() => Ok(()),
                    (Some(status), _) => Err(NotOurs::PortTaken(format!(
                        "port {port}: redis-server exited ({status}; {}) and another server answers there",
                        self.last_log_line()
                    ))),
                    (None, other) => Err(NotOurs::PortTaken(format!(
                        "port {port}: the server answering is pid {}, not ours ({pid})",
                        other.unwrap_or("unknown")
                    ))),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(NotOurs::Failed(anyhow::anyhow!(
            "redis-server on port {port} did not answer within 10s"
        )))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis-server.log")
    }

    /// What the server logged last (why it exited, say).
    fn last_log_line(&self) -> String {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("(no log)")
            .to_owned()
    }

    /// The child's exit status, once it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The plain port's URL (with the harness's password on a [`start_tls`](Self::start_tls)
    /// server).
    pub fn url(&self) -> String {
        match &self.secure {
            Some(s) => format!("redis://:{}@127.0.0.1:{}", s.admin_password, self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The TLS port's URL for the ACL user, with `password` (the right one or not), of a
    /// [`start_tls`](Self::start_tls) server.
    pub fn tls_url(&self, password: &str) -> String {
        let s = self
            .secure
            .as_ref()
            .expect("a server started with start_tls");
        format!("rediss://{}:{password}@localhost:{}", s.user, s.tls_port)
    }

    /// The ACL user's right password.
    pub fn tls_password(&self) -> &str {
        &self
            .secure
            .as_ref()
            .expect("a server started with start_tls")
            .password
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's pid (`None` after [`kill`](Self::kill)).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (with its AOF, when it keeps one): proxies and configs
    /// name that port. Should another process hold the port meanwhile, it retries a few times,
    /// then fails rather than hand out someone else's server.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut taken = Vec::new();
        for attempt in 0..REDIS_PORT_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(NotOurs::PortTaken(why)) => taken.push(why),
                Err(NotOurs::Failed(e)) => return Err(e),
            }
        }
        bail!(
            "redis-server could not restart on its port {}: {}",
            self.port,
            taken.join("; ")
        )
    }

    /// Clients connected, as the server counts them (this call's own connection included).
    pub fn connected_clients(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut self.conn())
            .expect("INFO clients");
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("connected_clients in INFO clients")
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// === TestDb ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database for one test: a SQLite file in a temp dir, or a new PostgreSQL
/// database on the server `SD_TEST_POSTGRES_URL` names (dropped afterwards).
pub struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("SD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl TestDb {
    pub async fn new(backend: Backend) -> Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("scheduler.db").display());
                Ok(Self {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                })
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let admin = postgres_admin_url();
                let name = format!("sdtest_{}_{}", std::process::id(), rand::random::<u32>());
                let mut conn = sqlx::PgConnection::connect(&admin).await.with_context(|| {
                    format!("PostgreSQL at {admin} (set SD_TEST_POSTGRES_URL, or run scripts/test which starts one)")
                })?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await?;
                let url = match admin.rfind('/') {
                    Some(i) => format!("{}/{name}", &admin[..i]),
                    None => bail!("SD_TEST_POSTGRES_URL has no database part: {admin}"),
                };
                Ok(Self {
                    url,
                    _dir: None,
                    postgres: Some((admin, name)),
                })
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

// === keys and tokens ===

/// An RSA key pair as PEM.
#[derive(Clone)]
pub struct RsaKeys {
    pub private_pem: String,
    pub public_pem: String,
}

impl RsaKeys {
    pub fn generate() -> Self {
        let pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key generation");
        Self {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        }
    }

    /// Writes both halves into `dir`, returning (private, public) paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let private = dir.join(format!("{stem}.key.pem"));
        let public = dir.join(format!("{stem}.pub.pem"));
        std::fs::write(&private, &self.private_pem).expect("write private key");
        std::fs::write(&public, &self.public_pem).expect("write public key");
        (private, public)
    }

    /// Signs `claims` with RS256.
    pub fn sign(&self, claims: &Value) -> String {
        let key =
            jsonwebtoken::EncodingKey::from_rsa_pem(self.private_pem.as_bytes()).expect("RSA PEM");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &key,
        )
        .expect("sign token")
    }

    /// A Screwdriver-API-style token with these scopes, valid for ten minutes.
    pub fn api_token(&self, scopes: &[&str]) -> String {
        let now = unix_now();
        self.sign(&serde_json::json!({
            "username": "tester",
            "scope": scopes,
            "iat": now,
            "exp": now + 600,
        }))
    }
}

/// Process-wide key pairs (RSA generation is slow; tests only need distinct roles).
pub fn shared_keys(role: &str) -> RsaKeys {
    static API: OnceLock<RsaKeys> = OnceLock::new();
    static LAUNCHER: OnceLock<RsaKeys> = OnceLock::new();
    static OTHER: OnceLock<RsaKeys> = OnceLock::new();
    match role {
        "api" => API.get_or_init(RsaKeys::generate).clone(),
        "launcher" => LAUNCHER.get_or_init(RsaKeys::generate).clone(),
        _ => OTHER.get_or_init(RsaKeys::generate).clone(),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Polls `check` until it returns `Some` or `timeout` passes. For waiting on asynchronous
/// effects (a cache refresh, a routed build) without fixed sleeps.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === cluster keys ===

/// A cluster's signing key pair for any algorithm a cluster may use.
#[derive(Clone)]
pub struct ClusterKeys {
    pub algorithm: jsonwebtoken::Algorithm,
    pub private_pem: String,
    pub public_pem: String,
}

impl ClusterKeys {
    pub fn generate(algorithm: jsonwebtoken::Algorithm) -> Self {
        use jsonwebtoken::Algorithm as A;
        let alg: &'static rcgen::SignatureAlgorithm = match algorithm {
            A::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            A::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            A::EdDSA => &rcgen::PKCS_ED25519,
            _ => &rcgen::PKCS_RSA_SHA256,
        };
        let pair = rcgen::KeyPair::generate_for(alg).expect("key generation");
        Self {
            algorithm,
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        }
    }

    /// Signs `claims` with this key, declaring `header_alg` in the header (normally the key's).
    pub fn sign_as(&self, header_alg: jsonwebtoken::Algorithm, claims: &Value) -> String {
        use jsonwebtoken::{Algorithm as A, EncodingKey};
        let key = match self.algorithm {
            A::ES256 | A::ES384 => EncodingKey::from_ec_pem(self.private_pem.as_bytes()),
            A::EdDSA => EncodingKey::from_ed_pem(self.private_pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(self.private_pem.as_bytes()),
        }
        .expect("private key PEM");
        jsonwebtoken::encode(&jsonwebtoken::Header::new(header_alg), claims, &key).expect("sign")
    }

    /// A valid agent token for `cluster`, living `ttl` seconds.
    pub fn token(&self, cluster: &str, ttl: u64) -> String {
        let now = unix_now();
        self.sign_as(
            self.algorithm,
            &serde_json::json!({"buildCluster": cluster, "iat": now, "exp": now + ttl}),
        )
    }
}

// === FakeScrewdriver ===

/// One status update the Screwdriver-API-shaped server received.
#[derive(Debug, Clone)]
pub struct BuildUpdate {
    pub build_id: u64,
    pub authorization: String,
    pub body: Value,
    /// What the server answered: 200, or the refusal Screwdriver would send.
    pub answered: u16,
}

#[derive(Default)]
struct FakeState {
    updates: std::sync::Mutex<Vec<BuildUpdate>>,
    /// Each build's status as Screwdriver holds it (QUEUED until an update changes it).
    statuses: std::sync::Mutex<std::collections::HashMap<u64, String>>,
    fail_next: std::sync::atomic::AtomicU32,
}

/// Screwdriver's answer to a build-token update of a build in `current` (`plugins/builds/
/// update.js`): `Err((code, message))` for what it refuses, else the status it then holds.
fn screwdriver_update(current: &str, body: &Value) -> Result<String, (u16, String)> {
    if !["RUNNING", "QUEUED", "BLOCKED", "UNSTABLE", "FROZEN"].contains(&current) {
        return Err((
            403,
            "Can only update RUNNING, QUEUED, BLOCKED, FROZEN, or UNSTABLE builds".into(),
        ));
    }
    let Some(desired) = body.get("status").and_then(Value::as_str) else {
        return Ok(current.to_owned());
    };
    if (desired == "QUEUED" && current != "QUEUED")
        || (desired == "BLOCKED" && current == "BLOCKED")
    {
        return Err((400, format!("Cannot update builds to {desired}")));
    }
    Ok(if current == "UNSTABLE" {
        current.to_owned()
    } else {
        desired.to_owned()
    })
}

/// An HTTP server speaking the Screwdriver API's build update call
/// (`PUT /v4/builds/{id}` with a bearer token) that records what it receives, and refuses
/// what Screwdriver refuses: any update of a finished build, QUEUED after QUEUED was left,
/// BLOCKED twice.
pub struct FakeScrewdriver {
    pub url: String,
    state: std::sync::Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeScrewdriver {
    pub async fn start() -> Self {
        use axum::extract::{Path, State};
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::Ordering;
        async fn update(
            State(state): State<std::sync::Arc<FakeState>>,
            Path(id): Path<u64>,
            headers: HeaderMap,
            axum::Json(body): axum::Json<Value>,
        ) -> (StatusCode, axum::Json<Value>) {
            if state
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({"statusCode": 503})),
                );
            }
            let authorization = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let answer = {
                let mut statuses = state.statuses.lock().expect("lock");
                let current = statuses
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "QUEUED".into());
                let answer = screwdriver_update(&current, &body);
                if let Ok(now) = &answer {
                    statuses.insert(id, now.clone());
                }
                answer
            };
            let answered = answer.as_ref().map_or_else(|(code, _)| *code, |_| 200);
            state.updates.lock().expect("lock").push(BuildUpdate {
                build_id: id,
                authorization,
                body: body.clone(),
                answered,
            });
            match answer {
                Ok(_) => (StatusCode::OK, axum::Json(body)),
                Err((code, message)) => (
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                    axum::Json(serde_json::json!({"statusCode": code, "message": message})),
                ),
            }
        }
        let state = std::sync::Arc::new(FakeState::default());
        let app = axum::Router::new()
            .route("/v4/builds/{id}", axum::routing::put(update))
            .with_state(std::sync::Arc::clone(&state));
        let (url, task) = serve(app).await;
        Self { url, state, task }
    }

    /// Answer the next `n` updates with 503.
    pub fn fail_next(&self, n: u32) {
        self.state
            .fail_next
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn updates(&self) -> Vec<BuildUpdate> {
        self.state.updates.lock().expect("lock").clone()
    }

    /// The build's status as Screwdriver now holds it (QUEUED before any update).
    pub fn status(&self, build_id: u64) -> String {
        self.state
            .statuses
            .lock()
            .expect("lock")
            .get(&build_id)
            .cloned()
            .unwrap_or_else(|| "QUEUED".into())
    }

    /// Sets a build's status as if something else had updated it (its launcher, a user).
    pub fn set_status(&self, build_id: u64, status: &str) {
        self.state
            .statuses
            .lock()
            .expect("lock")
            .insert(build_id, status.to_owned());
    }

    /// Waits until an update for `build_id` arrived.
    pub async fn wait_for(&self, build_id: u64, timeout: Duration) -> Option<BuildUpdate> {
        eventually(timeout, || async {
            self.updates().into_iter().find(|u| u.build_id == build_id)
        })
        .await
    }
}

impl Drop for FakeScrewdriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === CountingServer ===

/// An HTTP server that answers every request (any method, any path) the same way and counts
/// them: the address a test proves nothing was sent to, or a redirect to one.
pub struct CountingServer {
    pub url: String,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingServer {
    /// Answers `200 {}`.
    pub async fn start() -> Self {
        Self::answering(axum::http::StatusCode::OK, None).await
    }

    /// Answers `307 Temporary Redirect` to `location` (a redirect that keeps method and body).
    pub async fn redirecting_to(location: &str) -> Self {
        Self::answering(
            axum::http::StatusCode::TEMPORARY_REDIRECT,
            Some(location.to_owned()),
        )
        .await
    }

    async fn answering(status: axum::http::StatusCode, location: Option<String>) -> Self {
        use std::sync::atomic::Ordering;
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&hits);
        let app = axum::Router::new().fallback(move || {
            let location = location.clone();
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut headers = axum::http::HeaderMap::new();
                if let Some(to) = location.and_then(|l| l.parse().ok()) {
                    headers.insert(axum::http::header::LOCATION, to);
                }
                (status, headers, axum::Json(serde_json::json!({})))
            }
        });
        let (url, task) = serve(app).await;
        Self { url, hits, task }
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server of ours started on `port`, as `start` would after picking it.
    fn spawn_on(port: u16) -> (RedisServer, std::result::Result<(), NotOurs>) {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            aof: false,
            secure: None,
            extra_args: Vec::new(),
        };
        let verdict = server.spawn();
        (server, verdict)
    }

    fn process_id(server: &RedisServer) -> String {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut server.conn())
            .unwrap();
        info_field(&info, "process_id").unwrap().to_owned()
    }

    #[test]
    fn a_started_server_is_its_own_child() {
        let server = RedisServer::start().unwrap();
        assert_eq!(process_id(&server), server.pid().unwrap().to_string());
    }

    #[test]
    fn a_port_taken_in_between_is_not_mistaken_for_ours() {
        let other = RedisServer::start().unwrap();
        let (ours, verdict) = spawn_on(other.port());
        match verdict {
            Err(NotOurs::PortTaken(why)) => assert!(why.contains(&other.port().to_string())),
            Err(NotOurs::Failed(e)) => panic!("a taken port is retried elsewhere, not: {e}"),
            Ok(()) => panic!("another server's port taken for ours"),
        }
        assert!(ours.pid().is_none(), "our server is gone");
        assert_eq!(process_id(&other), other.pid().unwrap().to_string());
    }

    #[test]
    fn a_restart_on_a_port_taken_meanwhile_fails_rather_than_share_it() {
        let mut server = RedisServer::start().unwrap();
        server.kill();
        let (squatter, verdict) = spawn_on(server.port());
        assert!(verdict.is_ok(), "the squatter has the port");
        let err = server.restart().unwrap_err().to_string();
        assert!(err.contains("could not restart"), "{err}");
        assert!(server.pid().is_none());
        assert_eq!(process_id(&squatter), squatter.pid().unwrap().to_string());
    }

    #[test]
    fn info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nprocess_supervised:no\r\nprocess_id:42\r\n";
        assert_eq!(info_field(info, "process_id"), Some("42"));
        assert_eq!(info_field(info, "run_id"), None);
    }
}
