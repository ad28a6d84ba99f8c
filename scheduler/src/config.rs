//! Typed configuration: embedded defaults, then the TOML file, then `SD_SCHEDULER_*` variables.
//!
//! Everything is validated before a port is bound or a connection opened, so a bad value stops
//! start-up with the key and the reason instead of failing later under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_screwdriver::ApiUris;
use serde::Deserialize;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "SD_SCHEDULER_";
const SECTIONS: &[&str] = &[
    "listen_tls",
    "database",
    "redis",
    "auth",
    "registry",
    "queue",
    "ha",
    "reconciler",
    "screwdriver",
    "http",
    "log",
    "ui",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// HTTPS on `listen`, terminated by the scheduler itself.
    pub listen_tls: ListenTlsConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub registry: RegistryConfig,
    pub queue: QueueConfig,
    pub ha: HaConfig,
    pub reconciler: ReconcilerConfig,
    pub screwdriver: ScrewdriverConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub ui: UiConfig,
}

/// The status pages under `/ui/`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Anyone who reaches the scheduler may see them, without a token: only on a private
    /// network. Off: the first visit asks for a Screwdriver token with scope user or admin.
    pub open: bool,
}

/// HTTPS served by the scheduler itself (rustls). Unset: plain HTTP, for a terminating proxy
/// or a private network. The files are re-read on SIGHUP and when they change (checked every
/// 10 s), so a renewed certificate needs no restart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenTlsConfig {
    /// The certificate chain (PEM, leaf first).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// When set, every client must present a certificate this CA (PEM) issued: agents set
    /// `scheduler.client_cert_file`, and Screwdriver's API needs one too.
    pub client_ca_file: Option<PathBuf>,
}

impl ListenTlsConfig {
    /// The files, when HTTPS is configured.
    pub fn files(&self) -> Option<sd_http::TlsFiles> {
        Some(sd_http::TlsFiles {
            cert_file: self.cert_file.clone()?,
            key_file: self.key_file.clone()?,
            client_ca_file: self.client_ca_file.clone(),
        })
    }
}

/// What one client may take of the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Requests handled at once, long-polls aside; past it: 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Longest a request may take, long-polls aside (they wait by design); past it: 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once, waiting long-polls included; more wait in the kernel's
    /// backlog. The process's open-files limit is raised to fit at start.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            request_timeout: Duration::from_secs(30),
            max_connections: 16_384,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// A delivery not acknowledged within this time is delivered again.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Deliveries before a build is dead-lettered.
    pub max_attempts: u32,
    /// How long a dead-lettered build is held, still QUEUED in Screwdriver, for an operator to
    /// requeue or fail; then it is failed. Zero fails it at once (nothing left to requeue).
    #[serde(with = "humantime_serde")]
    pub dead_letter_hold: Duration,
    /// Safety-net re-check of blocked builds (they are released at once on the blocker's event).
    #[serde(with = "humantime_serde")]
    pub blocked_recheck: Duration,
    /// First back-off after a nack; doubles per delivery up to `nack_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub nack_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub nack_backoff_max: Duration,
    /// Longest long-poll a worker may ask for (`?wait=`).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Long-polls of one cluster waiting at once on a replica; past it: 429 with `Retry-After`.
    pub max_polls_per_cluster: usize,
    /// Long-polls of one token waiting at once on a replica (an agent needs one).
    pub max_polls_per_token: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// A cluster whose agents have not polled for this long is unhealthy; its waiting builds
    /// are re-routed.
    #[serde(with = "humantime_serde")]
    pub cluster_dead_after: Duration,
    /// How often cluster health is evaluated.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilerConfig {
    /// A build the database holds as queued or dispatched, but that no cluster started within
    /// this time, is queued again (covers Redis writes lost in a failover).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrewdriverConfig {
    /// Base URL(s) of the Screwdriver API. A build whose `apiUri` is not one of them (or below
    /// one) is refused: its freshly minted token would go wherever the message says. Required.
    #[serde(deserialize_with = "sd_protocol::env::one_or_many")]
    pub api_uris: Vec<String>,
    /// Lets `api_uris` (and so `apiUri`) be plain `http://`: for tests and demos on one host.
    pub allow_http: bool,
    /// Attempts per status report to the Screwdriver API (`PUT /v4/builds/{id}`).
    pub report_attempts: u32,
    /// Timeout of one report request.
    #[serde(with = "humantime_serde")]
    pub report_timeout: Duration,
}

impl ScrewdriverConfig {
    /// The Screwdriver APIs builds may name, or why `api_uris` is unusable.
    pub fn allowed_apis(&self) -> Result<ApiUris, ConfigError> {
        ApiUris::new(&self.api_uris, self.allow_http)
            .map_err(|e| ConfigError::invalid("screwdriver.api_uris", e.to_string()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://FILE` (created on first start) or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS), with `user:password@` for an ACL user (ElastiCache
    /// AUTH).
    pub url: String,
    /// CA certificate(s) (PEM) trusted for `rediss://` instead of the system's: a private CA.
    pub ca_file: Option<PathBuf>,
    /// The Redis runs in cluster mode (ElastiCache "cluster mode enabled"; `url` is then the
    /// configuration endpoint or any node).
    pub cluster: bool,
}

impl RedisConfig {
    /// The Redis to reach, with its CA read.
    pub fn target(&self) -> Result<sd_queue::RedisTarget, ConfigError> {
        sd_queue::RedisTarget::load(&self.url, self.ca_file.as_deref(), self.cluster)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// PEM public key(s) of the Screwdriver API; verifies RS256 tokens of the API and admins.
    pub api_public_key_file: Option<PathBuf>,
    /// Longest `exp - iat` an API token may have. Screwdriver's own: 2 h for users and admins,
    /// 12 h for the `sdapi` token that comes with each build.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// When set, API tokens must carry this `iss` (Screwdriver sets none).
    pub issuer: Option<String>,
    /// When set, API tokens must carry this `aud` (Screwdriver sets none).
    pub audience: Option<String>,
    /// When set, API tokens must carry this `environment` (Screwdriver's `jwtEnvironment`,
    /// e.g. `prod`), and minted launcher tokens carry it too, as its queue-service's do.
    pub environment: Option<String>,
    /// PEM RSA private key the scheduler mints launcher tokens with (trusted by the API).
    pub private_key_file: Option<PathBuf>,
    /// Lifetime of minted launcher tokens; at most [`MAX_LAUNCHER_TOKEN_TTL`].
    #[serde(with = "humantime_serde")]
    pub launcher_token_ttl: Duration,
}

/// The longest `queue.dead_letter_hold`: a held build shows as QUEUED in Screwdriver all that
/// time, and the build's token (Screwdriver's, at most 12 h) must still be good to report it
/// failed or to run it when requeued.
pub const MAX_DEAD_LETTER_HOLD: Duration = Duration::from_secs(12 * 3600);

/// The longest `auth.max_token_lifetime`: twice the longest token Screwdriver sends (12 h).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest `auth.launcher_token_ttl`: twice Screwdriver's 12 h for the same token, room
/// for a build that waits long in a queue and then runs to its timeout. The token is in the
/// build's pod spec and environment, where the build's own code can read it, and stays valid
/// after the build ended: a longer one outlives any build it could be needed for.
pub const MAX_LAUNCHER_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Safety-net reload of the cluster cache; writes also invalidate it at once via pub/sub.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// The only environment variables a record's `authKey`/`signOption` may name start with
    /// this, so whoever registers clusters cannot make the scheduler read `PATH` or a secret.
    pub variable_prefix: String,
    /// A directory of files named like variables (a Kubernetes Secret volume): a record's
    /// `authKey`/`signOption` variable not in the environment is read from here, and the files
    /// are re-read every `reload_interval`, so keys are added and rotated without a restart.
    pub key_dir: Option<PathBuf>,
}

pub use sd_telemetry::{LogConfig, LogFormat};

// === defaults ===

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_tls: ListenTlsConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            auth: AuthConfig::default(),
            registry: RegistryConfig::default(),
            queue: QueueConfig::default(),
            ha: HaConfig::default(),
            reconciler: ReconcilerConfig::default(),
            screwdriver: ScrewdriverConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            ui: UiConfig::default(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(60),
            max_attempts: 5,
            dead_letter_hold: Duration::from_secs(15 * 60),
            blocked_recheck: Duration::from_secs(60),
            nack_backoff: Duration::from_secs(1),
            nack_backoff_max: Duration::from_secs(60),
            max_wait: Duration::from_secs(60),
            max_polls_per_cluster: 64,
            max_polls_per_token: 4,
        }
    }
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            cluster_dead_after: Duration::from_secs(120),
            check_interval: Duration::from_secs(5),
        }
    }
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(600),
            interval: Duration::from_secs(30),
        }
    }
}

impl Default for ScrewdriverConfig {
    fn default() -> Self {
        Self {
            api_uris: Vec::new(),
            allow_http: false,
            report_attempts: 5,
            report_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://sd-scheduler.db".into(),
            max_connections: 10,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            ca_file: None,
            cluster: false,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_public_key_file: None,
            max_token_lifetime: Duration::from_secs(12 * 3600),
            issuer: None,
            audience: None,
            environment: None,
            private_key_file: None,
            launcher_token_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            reload_interval: Duration::from_secs(30),
            variable_prefix: crate::cluster_auth::DEFAULT_PREFIX.to_owned(),
            key_dir: None,
        }
    }
}

// === loading ===

pub use sd_protocol::env::ConfigError;

impl Config {
    /// Loads `path` (or only the defaults when `None`) and applies `vars` as overrides.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, path) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path,
            ),
            None => (String::new(), Path::new("(defaults)")),
        };
        Self::parse(&text, path, vars)
    }

    /// Parses config `text` (read from `path`, named in errors) with `vars` as overrides.
    pub fn parse(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let config: Config =
            sd_protocol::env::parse_config(text, path, ENV_PREFIX, SECTIONS, vars)?;
        config.validate()?;
        Ok(config)
    }

    /// One check per key in the file's order, each naming its key (a flat list, longer than
    /// most functions here: split, it would only scatter a list that reads top to bottom).
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        };
        let tls = &self.listen_tls;
        sd_protocol::env::check_pair(
            ("listen_tls.cert_file", tls.cert_file.as_deref()),
            ("listen_tls.key_file", tls.key_file.as_deref()),
        )?;
        if tls.cert_file.is_none() && tls.client_ca_file.is_some() {
            return Err(invalid(
                "listen_tls.client_ca_file",
                "needs listen_tls.cert_file and key_file",
            ));
        }
        sd_protocol::env::check_files([
            ("listen_tls.cert_file", tls.cert_file.as_deref()),
            ("listen_tls.key_file", tls.key_file.as_deref()),
            ("listen_tls.client_ca_file", tls.client_ca_file.as_deref()),
        ])?;
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with sqlite:// (a file) or postgres:// (PostgreSQL)",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if let Err(e) = redis::Client::open(self.redis.url.as_str()) {
            return Err(ConfigError::Invalid {
                key: "redis.url".into(),
                reason: format!("not a valid Redis URL: {e}"),
            });
        }
        for (key, file) in [
            ("auth.api_public_key_file", &self.auth.api_public_key_file),
            ("auth.private_key_file", &self.auth.private_key_file),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    reason: format!("{} does not exist or is not a file", file.display()),
                });
            }
        }
        let auth = &self.auth;
        if auth.max_token_lifetime < Duration::from_secs(60)
            || auth.max_token_lifetime > MAX_TOKEN_LIFETIME
        {
            return Err(invalid(
                "auth.max_token_lifetime",
                "must be from 1m to 24h (Screwdriver's tokens live 2h, its sdapi tokens 12h)",
            ));
        }
        for (key, value) in [
            ("auth.issuer", &auth.issuer),
            ("auth.audience", &auth.audience),
            ("auth.environment", &auth.environment),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(
                    key,
                    "must not be empty; leave it out to not check it",
                ));
            }
        }
        if auth.launcher_token_ttl < Duration::from_secs(60)
            || auth.launcher_token_ttl > MAX_LAUNCHER_TOKEN_TTL
        {
            return Err(invalid(
                "auth.launcher_token_ttl",
                "must be from 60s to 24h (Screwdriver's queue-service mints 12h)",
            ));
        }
        if self.registry.reload_interval < Duration::from_secs(1) {
            return Err(invalid("registry.reload_interval", "must be at least 1s"));
        }
        if let Some(dir) = &self.registry.key_dir
            && !dir.is_dir()
        {
            return Err(invalid(
                "registry.key_dir",
                &format!("{} is not a directory", dir.display()),
            ));
        }
        let q = &self.queue;
        if q.visibility_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "queue.visibility_timeout",
                "must be at least 100ms",
            ));
        }
        if q.max_attempts == 0 {
            return Err(invalid("queue.max_attempts", "must be at least 1"));
        }
        if q.dead_letter_hold > MAX_DEAD_LETTER_HOLD {
            return Err(invalid(
                "queue.dead_letter_hold",
                "must be at most 12h: the build's token must outlive the hold",
            ));
        }
        if q.blocked_recheck < Duration::from_millis(100) {
            return Err(invalid("queue.blocked_recheck", "must be at least 100ms"));
        }
        if q.nack_backoff_max < q.nack_backoff {
            return Err(invalid(
                "queue.nack_backoff_max",
                "must not be below queue.nack_backoff",
            ));
        }
        if q.max_wait > Duration::from_secs(300) {
            return Err(invalid("queue.max_wait", "must be at most 300s"));
        }
        if q.max_polls_per_cluster == 0 {
            return Err(invalid("queue.max_polls_per_cluster", "must be at least 1"));
        }
        if q.max_polls_per_token == 0 {
            return Err(invalid("queue.max_polls_per_token", "must be at least 1"));
        }
        if self.ha.cluster_dead_after < Duration::from_secs(1) {
            return Err(invalid("ha.cluster_dead_after", "must be at least 1s"));
        }
        if self.ha.check_interval < Duration::from_millis(100) {
            return Err(invalid("ha.check_interval", "must be at least 100ms"));
        }
        if self.reconciler.grace < Duration::from_secs(1) {
            return Err(invalid("reconciler.grace", "must be at least 1s"));
        }
        if self.reconciler.interval < Duration::from_millis(100) {
            return Err(invalid("reconciler.interval", "must be at least 100ms"));
        }
        self.screwdriver.allowed_apis()?;
        if self.screwdriver.report_attempts == 0 {
            return Err(invalid("screwdriver.report_attempts", "must be at least 1"));
        }
        if self.http.max_in_flight == 0 {
            return Err(invalid("http.max_in_flight", "must be at least 1"));
        }
        if self.http.request_timeout < Duration::from_secs(1) {
            return Err(invalid("http.request_timeout", "must be at least 1s"));
        }
        let prefix = &self.registry.variable_prefix;
        if prefix.len() < 3
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            || prefix.as_bytes()[0].is_ascii_digit()
        {
            return Err(invalid(
                "registry.variable_prefix",
                "must be at least 3 of A-Z, 0-9 and '_', not starting with a digit (e.g. SD_CLUSTER_)",
            ));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if let Err(reason) = self.log.check_level() {
            return Err(invalid("log.level", &reason));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const API_VAR: &str = "SD_SCHEDULER_SCREWDRIVER_API_URIS";

    /// Loads `text` with `vars`, and an allowed API unless the test sets `api_uris` itself.
    fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile_dir();
        let path = dir.join("scheduler.toml");
        std::fs::write(&path, text).unwrap();
        let mut vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        if !text.contains("api_uris") && !vars.iter().any(|(k, _)| k == API_VAR) {
            vars.push((API_VAR.into(), "https://api.screwdriver.example".into()));
        }
        Config::load(Some(&path), vars)
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sd-scheduler-config-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_need_no_file_but_the_api() {
        let c = Config::load(
            None,
            vec![(API_VAR.into(), "https://api.screwdriver.example".into())],
        )
        .unwrap();
        assert_eq!(c.screwdriver.api_uris, ["https://api.screwdriver.example"]);
        assert_eq!(c.database.url, "sqlite://sd-scheduler.db");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.auth.launcher_token_ttl, Duration::from_secs(43200));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../config/scheduler.toml");
        // The example points at files that exist only on a real host.
        let text = text
            .lines()
            .filter(|l| !l.contains("_file ="))
            .collect::<Vec<_>>()
            .join("\n");
        load(&text, &[]).unwrap();
    }

    #[test]
    fn the_allowed_apis_are_required_and_https_unless_allowed() {
        let refused = |text: &str, vars: &[(&str, &str)]| match load(text, vars) {
            Err(ConfigError::Invalid { key, reason }) => {
                assert_eq!(key, "screwdriver.api_uris", "{reason}");
                reason
            }
            other => panic!("{text} {vars:?}: {other:?}"),
        };
        assert!(Config::load(None, Vec::new()).is_err(), "no API configured");
        assert!(refused("[screwdriver]\napi_uris = []\n", &[]).contains("empty"));
        assert!(refused("", &[(API_VAR, "http://127.0.0.1:9")]).contains("https"));
        assert!(refused("", &[(API_VAR, "https://u:p@api.example")]).contains('@'));
        let c = load(
            "[screwdriver]\napi_uris = [\"http://127.0.0.1:9\"]\nallow_http = true\n",
            &[],
        )
        .unwrap();
        assert!(
            c.screwdriver
                .allowed_apis()
                .unwrap()
                .check("http://127.0.0.1:9")
                .is_ok()
        );
        let c = load(
            "",
            &[(API_VAR, "[\"https://a.example\", \"https://b.example\"]")],
        )
        .unwrap();
        assert_eq!(c.screwdriver.api_uris.len(), 2);
    }

    #[test]
    fn the_key_dir_must_be_a_directory() {
        let dir = tempfile_dir();
        let ok = load(
            "",
            &[("SD_SCHEDULER_REGISTRY_KEY_DIR", dir.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(ok.registry.key_dir.as_deref(), Some(dir.as_path()));
        let missing = dir.join("missing");
        match load(
            "",
            &[("SD_SCHEDULER_REGISTRY_KEY_DIR", missing.to_str().unwrap())],
        ) {
            Err(ConfigError::Invalid { key, reason }) => {
                assert_eq!(key, "registry.key_dir");
                assert!(reason.contains("is not a directory"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_lifetimes_are_capped() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.auth.max_token_lifetime, Duration::from_secs(12 * 3600));
        for (text, key) in [
            (
                "[auth]\nlauncher_token_ttl = \"25h\"\n",
                "auth.launcher_token_ttl",
            ),
            (
                "[auth]\nlauncher_token_ttl = \"30s\"\n",
                "auth.launcher_token_ttl",
            ),
            (
                "[auth]\nmax_token_lifetime = \"2d\"\n",
                "auth.max_token_lifetime",
            ),
            (
                "[auth]\nmax_token_lifetime = \"10s\"\n",
                "auth.max_token_lifetime",
            ),
            ("[auth]\nenvironment = \"\"\n", "auth.environment"),
            ("[auth]\nissuer = \" \"\n", "auth.issuer"),
        ] {
            match load(text, &[]) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let c = load(
            "[auth]\nlauncher_token_ttl = \"24h\"\nmax_token_lifetime = \"24h\"\nenvironment = \"prod\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.auth.launcher_token_ttl, MAX_LAUNCHER_TOKEN_TTL);
        assert_eq!(c.auth.environment.as_deref(), Some("prod"));
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            "[redis]\nurl = \"redis://a:1\"\n",
            &[
                ("SD_SCHEDULER_REDIS_URL", "redis://b:2"),
                ("SD_SCHEDULER_REGISTRY_RELOAD_INTERVAL", "5s"),
            ],
        )
        .unwrap();
        assert_eq!(c.redis.url, "redis://b:2");
        assert_eq!(c.registry.reload_interval, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[redis]\nurl = \"redis://a\"\nport = 1\n", "redis"),
            ("listen = \"nope\"\n", "listen"),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
            (
                "[auth]\nlauncher_token_ttl = \"soon\"\n",
                "auth.launcher_token_ttl",
            ),
            (
                "[auth]\napi_public_key_file = \"/nonexistent.pem\"\n",
                "auth.api_public_key_file",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[queue]\nmax_attempts = 0\n", "queue.max_attempts"),
            (
                "[queue]\ndead_letter_hold = \"13h\"\n",
                "queue.dead_letter_hold",
            ),
            (
                "[queue]\ndead_letter_hold = \"a while\"\n",
                "queue.dead_letter_hold",
            ),
            (
                "[ha]\ncluster_dead_after = \"2 fortnights\"\n",
                "ha.cluster_dead_after",
            ),
            ("[reconciler]\ngrace = \"0s\"\n", "reconciler.grace"),
        ];
        for (text, key) in cases {
            match load(text, &[]) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert!(k.starts_with(key), "{text}: key {k} ({reason})")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            load("listen = [", &[]),
            Err(ConfigError::Syntax { .. })
        ));
    }
}
