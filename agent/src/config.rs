//! Typed configuration: one TOML file (`/etc/sd-agent/agent.toml`), every key overridable by
//! `SD_AGENT_<SECTION>_<KEY>`. Validated as a whole before anything binds or connects; an
//! invalid file stops start-up with exit code 64, the key and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Lifecycle;
use sd_protocol::SigningAlgorithm;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "SD_AGENT_";
/// Names the config file itself, so it is not one of the `SD_AGENT_*` overrides.
pub const CONFIG_ENV: &str = "SD_AGENT_CONFIG";
pub const DEFAULT_PATH: &str = "/etc/sd-agent/agent.toml";
const SECTIONS: &[&str] = &[
    "cluster",
    "scheduler",
    "auth",
    "poll",
    "redis",
    "executor",
    "executor.kubernetes",
    "executor.kubernetes.cpu",
    "executor.kubernetes.ram",
    "executor.process",
    "screwdriver",
    "health",
    "log",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub scheduler: SchedulerConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub poll: PollConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    pub executor: ExecutorConfig,
    #[serde(default)]
    pub screwdriver: ScrewdriverConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// SIGTERM: stop polling, finish transfers in flight, exit within this time.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name in the scheduler's registry.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Base URL of sd-scheduler, e.g. `https://sd-scheduler.example.com`.
    pub url: String,
    /// Extra CA certificate (PEM) to trust for the scheduler's TLS, e.g. a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM, leaf first) presented to the scheduler, for a scheduler (or a
    /// proxy in front of it) that requires one (`listen_tls.client_ca_file`).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The cluster's private key (PEM); its public half is registered with the scheduler.
    pub private_key_file: PathBuf,
    #[serde(default = "defaults::algorithm")]
    pub algorithm: SigningAlgorithm,
    /// Lifetime of each signed token; must not exceed the cluster's `expiresIn`.
    #[serde(default = "defaults::token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// How long one long-poll may wait for jobs.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Most jobs taken per poll.
    pub max_jobs: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// The cluster's own Redis (the local queue). Use AOF and `noeviction`.
    pub url: String,
    /// A file holding the Redis password (a mounted Secret), read when the config is loaded and
    /// put into `url` (which must then carry none): the password stays out of the config file,
    /// the environment and the command line. One trailing newline is dropped.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for `rediss://` instead of the system's: a private CA.
    pub ca_file: Option<PathBuf>,
    /// The Redis runs in cluster mode (ElastiCache "cluster mode enabled"; `url` is then the
    /// configuration endpoint or any node).
    pub cluster: bool,
}

impl RedisConfig {
    /// The local Redis to reach, with its CA read.
    pub fn target(&self) -> Result<sd_queue::RedisTarget, ConfigError> {
        sd_queue::RedisTarget::load(&self.url, self.ca_file.as_deref(), self.cluster)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Kubernetes,
    Process,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Kubernetes => "kubernetes",
            ExecutorKind::Process => "process",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    /// Builds launched and not yet finished; at capacity the agent stops taking work.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// The launcher's lease on a local job; another replica takes over a crashed one's after it.
    #[serde(default = "defaults::launch_lease", with = "humantime_serde")]
    pub launch_lease: Duration,
    /// Builds launched (or stopped) at once. A real API server answers a pod create in
    /// 10–50 ms, so one at a time would cap a cluster at 20–100 launches/s.
    #[serde(default = "defaults::launch_concurrency")]
    pub launch_concurrency: u32,
    /// An agent silent this long is dead: the local jobs it took are taken over by the others
    /// (or by its own next run on the host) instead of waiting out `launch_lease`.
    #[serde(default = "defaults::takeover_after", with = "humantime_serde")]
    pub takeover_after: Duration,
    /// A file on this host's own disk (systemd `StateDirectory`, a Kubernetes `emptyDir` that
    /// outlives container restarts; not a network file system) that this agent holds locked
    /// while it runs. Its lock proves the previous run dead, so a restarted agent takes back
    /// the local jobs that run held at once. Unset: they wait out `takeover_after`. Each agent
    /// needs its own: a second agent finding it locked refuses to start.
    #[serde(default)]
    pub instance_file: Option<PathBuf>,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(default)]
    pub process: ProcessConfig,
}

/// The Kubernetes executor. Keys that carry one of Screwdriver executor-k8s's settings have
/// its meaning (docs/onboarding.md has the table).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// kubeconfig file; unset: `KUBECONFIG`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    /// Image whose init container copies the Screwdriver launcher into the build pod.
    pub launcher_image: String,
    /// Pod names are `{prefix}{buildId}`; also the launcher's `SD_BUILD_PREFIX`.
    pub prefix: String,
    /// A plain pod `nodeSelector` (no toleration added).
    pub node_selector: BTreeMap<String, String>,
    /// executor-k8s `nodeSelectors`: each pair becomes a required node affinity term and a
    /// matching `NoSchedule` toleration, so builds land on (and only on) tainted build nodes.
    pub node_selectors: BTreeMap<String, String>,
    /// executor-k8s `preferredNodeSelectors`: preferred node affinity (weight 100).
    pub preferred_node_selectors: BTreeMap<String, String>,
    /// Kubernetes tolerations, as in a pod spec (`key`, `operator`, `value`, `effect`).
    pub tolerations: Vec<Toleration>,
    pub service_account: Option<String>,
    /// Mount the service account's API token into build pods (executor-k8s
    /// `automountServiceAccountToken`). Build code runs there: keep it off unless builds need it.
    pub automount_service_account_token: bool,
    pub image_pull_secrets: Vec<String>,
    /// `Always` (Screwdriver's default: a moving tag like `node:22` is refreshed), `IfNotPresent`
    /// or `Never`.
    pub image_pull_policy: PullPolicy,
    /// The pod's `dnsPolicy`.
    pub dns_policy: DnsPolicy,
    /// The pod's `runtimeClassName` (e.g. gVisor, Kata), also the launcher's `SD_RUNTIME_CLASS`.
    pub runtime_class: Option<String>,
    /// Runs the build container privileged (executor-k8s `privileged`); needs `pod_security =
    /// "privileged"`.
    pub privileged: bool,
    /// The Pod Security level the builds' namespace enforces (its
    /// `pod-security.kubernetes.io/enforce` label). Settings that level would refuse are
    /// refused at start-up instead, so no build finds out at admission.
    pub pod_security: PodSecurity,
    /// The build container's `allowPrivilegeEscalation`. Off, setuid programs (`sudo`) cannot
    /// gain privileges; images whose user is not root need it on, since the launcher's
    /// entrypoint then uses `sudo` to create `/sd`.
    pub allow_privilege_escalation: bool,
    /// Capabilities dropped from the build container (which keeps the runtime's default set
    /// less these: builds run as root and install packages). `NET_RAW` by default, so build
    /// code cannot forge packets on the node's network.
    pub drop_capabilities: Vec<String>,
    pub extra_labels: BTreeMap<String, String>,
    /// Annotations added to every build pod (executor-k8s `annotations`).
    pub pod_annotations: BTreeMap<String, String>,
    /// The build container's `lifecycle` (executor-k8s `lifecycleHooks`), as in a pod spec.
    #[serde(deserialize_with = "lifecycle")]
    pub lifecycle_hooks: Option<Lifecycle>,
    /// Host paths mounted into the build container (executor-k8s `volumeMounts`).
    pub host_volumes: Vec<HostVolume>,
    /// Secret keys exposed to the build as environment variables (executor-k8s `buildSecrets`).
    pub build_secrets: Vec<BuildSecret>,
    /// Secrets mounted into the build container as files (executor-k8s `buildSecretsFile`).
    pub build_secret_files: Vec<BuildSecretFile>,
    /// The launcher's `SD_HAB_ENABLED`: set up habitat packages (bash, jq) in the build container.
    pub hab_enabled: bool,
    /// A node label whose value must equal `screwdriver.cd/diskSpeed` (lower-cased); unset, a
    /// build asking for a disk speed is refused (executor-k8s `resources.disk.speed`).
    pub disk_speed_label: Option<String>,
    /// Builds may ask for a docker-in-docker sidecar with `screwdriver.cd/dockerEnabled`
    /// (executor-k8s `dockerFeatureEnabled`); the sidecar runs privileged.
    pub docker_enabled: bool,
    /// The docker-in-docker sidecar's image.
    pub dind_image: String,
    /// `screwdriver.cd/cpu` values → CPU cores; a number in the annotation is capped at `max`.
    #[serde(deserialize_with = "cpu_table")]
    pub cpu: ResourceTable,
    /// `screwdriver.cd/ram` values → GiB; a number in the annotation is capped at `max`.
    #[serde(deserialize_with = "ram_table")]
    pub ram: ResourceTable,
    /// Build timeout when `screwdriver.cd/timeout` is absent, and its cap. The launcher enforces
    /// it; the pod's `activeDeadlineSeconds` is only a backstop (see `timeout_margin`).
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// The pod's deadline is timeout + grace period + this: time for image pull, the init
    /// container and the launcher's teardown, so the launcher's own timeout always comes first.
    #[serde(with = "humantime_serde")]
    pub timeout_margin: Duration,
    /// Time between SIGTERM and SIGKILL for a stopped build (executor-k8s
    /// `terminationGracePeriodSeconds`); `screwdriver.cd/terminationGracePeriodSeconds` may
    /// raise it. The launcher aborts the step, runs teardown and reports within it.
    #[serde(with = "humantime_serde")]
    pub termination_grace_period: Duration,
    /// A pod pending longer than this fails the build.
    #[serde(with = "humantime_serde")]
    pub pending_timeout: Duration,
    /// ImagePullBackOff is tolerated this long before the build fails.
    #[serde(with = "humantime_serde")]
    pub image_pull_grace: Duration,
    /// Finished pods are deleted after this long.
    #[serde(with = "humantime_serde")]
    pub finished_pod_ttl: Duration,
}

/// A Pod Security Standards level, as the namespace label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurity {
    /// Named so the refusal can say why builds cannot meet it (see `check_kubernetes_security`).
    Restricted,
    /// No privileged containers, host namespaces or host paths; the runtime's default seccomp
    /// profile and capabilities. What builds need.
    Baseline,
    /// Anything: for clusters that offer privileged builds, docker-in-docker or host paths.
    Privileged,
}

impl PodSecurity {
    /// The namespace label's value.
    pub fn label(self) -> &'static str {
        match self {
            PodSecurity::Restricted => "restricted",
            PodSecurity::Baseline => "baseline",
            PodSecurity::Privileged => "privileged",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DnsPolicy {
    ClusterFirst,
    ClusterFirstWithHostNet,
    Default,
    None,
}

/// A host path mounted into the build container (executor-k8s `volumeMounts` entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostVolume {
    /// Volume name: a DNS label.
    pub name: String,
    /// Where the build container sees it.
    pub mount_path: String,
    /// The path on the node.
    pub path: String,
    /// hostPath `type` (`Directory`, `File`, `DirectoryOrCreate`, …); empty: no check.
    #[serde(default)]
    pub r#type: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

/// A Secret key as an environment variable of the build (executor-k8s `buildSecrets` entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSecret {
    pub env: String,
    pub secret_name: String,
    pub key: String,
}

/// A Secret mounted as files (executor-k8s `buildSecretsFile` entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSecretFile {
    /// Volume name: a DNS label.
    pub name: String,
    pub mount_path: String,
    pub secret_name: String,
    #[serde(default = "read_only_default")]
    pub read_only: bool,
}

fn read_only_default() -> bool {
    true
}

/// `lifecycle_hooks` as Kubernetes' `Lifecycle`, refusing keys Kubernetes does not know (the
/// type itself would drop them silently).
fn lifecycle<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Lifecycle>, D::Error> {
    use serde::de::Error;
    let Some(written) = Option::<serde_json::Value>::deserialize(d)? else {
        return Ok(None);
    };
    let hooks: Lifecycle = serde_json::from_value(written.clone()).map_err(D::Error::custom)?;
    let kept = serde_json::to_value(&hooks).map_err(D::Error::custom)?;
    if kept != written {
        return Err(D::Error::custom(format!(
            "not a Kubernetes container lifecycle (unknown or misspelt keys; kept only {kept})"
        )));
    }
    Ok(Some(hooks))
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    pub key: Option<String>,
    pub operator: Option<String>,
    pub value: Option<String>,
    pub effect: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceTable {
    pub micro: f64,
    pub low: f64,
    pub high: f64,
    pub turbo: f64,
    pub max: f64,
}

impl ResourceTable {
    pub const CPU: ResourceTable = ResourceTable {
        micro: 0.5,
        low: 2.0,
        high: 6.0,
        turbo: 12.0,
        max: 12.0,
    };
    pub const RAM: ResourceTable = ResourceTable {
        micro: 1.0,
        low: 2.0,
        high: 12.0,
        turbo: 16.0,
        max: 16.0,
    };
}

/// A table as written: any size left out keeps its default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceInput {
    micro: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    turbo: Option<f64>,
    max: Option<f64>,
}

impl ResourceInput {
    fn over(self, d: &ResourceTable) -> ResourceTable {
        ResourceTable {
            micro: self.micro.unwrap_or(d.micro),
            low: self.low.unwrap_or(d.low),
            high: self.high.unwrap_or(d.high),
            turbo: self.turbo.unwrap_or(d.turbo),
            max: self.max.unwrap_or(d.max),
        }
    }
}

fn cpu_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ResourceTable, D::Error> {
    Ok(ResourceInput::deserialize(d)?.over(&ResourceTable::CPU))
}

fn ram_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ResourceTable, D::Error> {
    Ok(ResourceInput::deserialize(d)?.over(&ResourceTable::RAM))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// The launcher to run per build, as an argv list; the build's values come as `SD_*`
    /// environment variables.
    pub command: Vec<String>,
    /// Where launch markers are kept besides the local Redis (one directory per agent host).
    pub work_dir: Option<PathBuf>,
    /// Build timeout when `screwdriver.cd/timeout` is absent, and its cap. The launcher gets it
    /// (`SD_TIMEOUT`) and enforces it; the agent ends the build only `timeout_margin` (plus the
    /// grace period) later, as a backstop.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// How long after the timeout the agent ends a build the launcher did not end itself.
    #[serde(with = "humantime_serde")]
    pub timeout_margin: Duration,
    /// Between SIGTERM and SIGKILL for a stopped or timed-out build (`SD_TERMINATION_GRACE_PERIOD_SECONDS`);
    /// `screwdriver.cd/terminationGracePeriodSeconds` may raise it.
    #[serde(with = "humantime_serde")]
    pub termination_grace_period: Duration,
    /// The account builds run as (a name or a numeric uid). A build runs code written by any
    /// pipeline author: as the agent's own user it could read the cluster's key and config and
    /// signal the agent. Required unless `allow_agent_user`.
    pub user: Option<String>,
    /// The builds' group (a name or a numeric gid); default: `user`'s primary group.
    pub group: Option<String>,
    /// Uids handed out one per running build (`"200000-200999"`, no account needed), so a build
    /// cannot read another's environment (its token) or files. Without it every build runs as
    /// `user` and builds running at once can see each other.
    pub uid_range: Option<UidRange>,
    /// Runs builds as the agent's own user: only for a host that runs trusted builds (tests,
    /// a demo), never one that takes strangers' pipelines.
    pub allow_agent_user: bool,
    /// Variables of the agent's environment a build inherits (names); everything else is left
    /// out but the `SD_*` the launcher needs, `HOME` and `USER`.
    pub env_allow: Vec<String>,
}

/// A range of uids, `"first-last"` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// How many uids it holds.
    pub fn count(&self) -> u32 {
        self.last - self.first + 1
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
        });
        match parsed {
            // Below 1000 are the system's accounts; u32::MAX is (uid_t)-1, "no change".
            Some((first, last)) if first >= 1000 && first <= last && last < u32::MAX => {
                Ok(Self { first, last })
            }
            _ => Err(format!(
                "{s:?} is not a uid range: write \"first-last\", from 1000 up, first ≤ last"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for UidRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a build inherits from the agent's environment unless `env_allow` says otherwise.
pub const DEFAULT_ENV_ALLOW: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrewdriverConfig {
    /// Base URL(s) of the Screwdriver API. Each build names its API (`apiUri`) and gets it,
    /// with its token, on the launcher's command line; a build naming any other is refused.
    /// Required.
    #[serde(deserialize_with = "sd_protocol::env::one_or_many")]
    pub api_uris: Vec<String>,
    /// Lets `api_uris` (and so `apiUri`) be plain `http://`: for tests and demos on one host.
    pub allow_http: bool,
    /// Passed to the launcher; the API URL comes with each build.
    pub store_uri: String,
    pub ui_uri: String,
    /// Prometheus pushgateway the launcher pushes build metrics to (`SD_PUSHGATEWAY_URL`;
    /// Screwdriver's `ecosystem.pushgatewayUrl`); empty: none.
    pub pushgateway_url: String,
}

impl ScrewdriverConfig {
    /// The Screwdriver APIs builds may name, or why `api_uris` is unusable.
    pub fn allowed_apis(&self) -> Result<sd_screwdriver::ApiUris, ConfigError> {
        sd_screwdriver::ApiUris::new(&self.api_uris, self.allow_http)
            .map_err(|e| invalid("screwdriver.api_uris", e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
}

pub use sd_telemetry::{LogConfig, LogFormat};

mod defaults {
    use std::time::Duration;

    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn algorithm() -> sd_protocol::SigningAlgorithm {
        sd_protocol::SigningAlgorithm::RS256
    }
    pub fn token_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_in_flight() -> u32 {
        50
    }
    pub fn launch_lease() -> Duration {
        Duration::from_secs(120)
    }
    pub fn launch_concurrency() -> u32 {
        32
    }
    pub fn takeover_after() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(30),
            max_jobs: 10,
        }
    }
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            work_dir: None,
            default_timeout: TimeLimits::DEFAULT.default_timeout,
            max_timeout: TimeLimits::DEFAULT.max_timeout,
            timeout_margin: TimeLimits::DEFAULT.timeout_margin,
            termination_grace_period: TimeLimits::DEFAULT.termination_grace_period,
            user: None,
            group: None,
            uid_range: None,
            allow_agent_user: false,
            env_allow: DEFAULT_ENV_ALLOW.iter().map(|&v| v.to_owned()).collect(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            password_file: None,
            ca_file: None,
            cluster: false,
        }
    }
}

impl RedisConfig {
    /// Puts the password `password_file` holds into `url`.
    fn read_password_file(&mut self) -> Result<(), ConfigError> {
        const KEY: &str = "redis.password_file";
        let Some(file) = &self.password_file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::ReadKeyFile {
            key: KEY.into(),
            path: file.clone(),
            source,
        })?;
        let password = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if password.is_empty() || password.chars().any(char::is_control) {
            return Err(invalid(
                KEY,
                format!("{} must hold the password on one line", file.display()),
            ));
        }
        let mut url = reqwest::Url::parse(&self.url)
            .map_err(|e| invalid("redis.url", format!("not a valid Redis URL: {e}")))?;
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(invalid(KEY, "needs a redis:// or rediss:// redis.url"));
        }
        if url.password().is_some() {
            return Err(invalid(
                KEY,
                "redis.url carries a password already: set one or the other",
            ));
        }
        // Every byte but unreserved ones percent-encoded (`url` would leave `%` as it is), and
        // decoded by the redis crate: any password survives the URL.
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        url.set_password(Some(&encoded))
            .map_err(|()| invalid(KEY, "redis.url names no host to give the password to"))?;
        self.url = url.into();
        Ok(())
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace: "default".into(),
            launcher_image: "screwdrivercd/launcher:stable".into(),
            prefix: String::new(),
            node_selector: BTreeMap::new(),
            node_selectors: BTreeMap::new(),
            preferred_node_selectors: BTreeMap::new(),
            tolerations: Vec::new(),
            service_account: None,
            automount_service_account_token: false,
            image_pull_secrets: Vec::new(),
            image_pull_policy: PullPolicy::Always,
            dns_policy: DnsPolicy::ClusterFirst,
            runtime_class: None,
            privileged: false,
            pod_security: PodSecurity::Baseline,
            allow_privilege_escalation: false,
            drop_capabilities: vec!["NET_RAW".into()],
            extra_labels: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
            lifecycle_hooks: None,
            host_volumes: Vec::new(),
            build_secrets: Vec::new(),
            build_secret_files: Vec::new(),
            hab_enabled: true,
            disk_speed_label: None,
            docker_enabled: false,
            dind_image: "docker:20.10-dind".into(),
            cpu: ResourceTable::CPU,
            ram: ResourceTable::RAM,
            default_timeout: TimeLimits::DEFAULT.default_timeout,
            max_timeout: TimeLimits::DEFAULT.max_timeout,
            timeout_margin: TimeLimits::DEFAULT.timeout_margin,
            termination_grace_period: TimeLimits::DEFAULT.termination_grace_period,
            pending_timeout: Duration::from_secs(10 * 60),
            image_pull_grace: Duration::from_secs(2 * 60),
            finished_pod_ttl: Duration::from_secs(3600),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
        }
    }
}

pub use sd_protocol::env::ConfigError;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, reason)
}

/// The `SD_AGENT_*` overrides in this process's environment.
pub fn env_overrides() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_ENV)
}

impl Config {
    /// Sections of `other` that differ from this config's: what a reload cannot apply.
    pub fn changed_sections(&self, other: &Config) -> Vec<&'static str> {
        [
            ("scheduler", self.scheduler != other.scheduler),
            ("poll", self.poll != other.poll),
            ("redis", self.redis != other.redis),
            ("executor", self.executor != other.executor),
            ("screwdriver", self.screwdriver != other.screwdriver),
            ("health", self.health != other.health),
            ("log", self.log != other.log),
            (
                "shutdown_timeout",
                self.shutdown_timeout != other.shutdown_timeout,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Loads `path` and applies `vars` (`SD_AGENT_*`) as overrides, then validates.
    pub fn load(
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, vars)
    }

    pub fn parse(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config: Config =
            sd_protocol::env::parse_config(text, path, ENV_PREFIX, SECTIONS, vars)?;
        config.redis.read_password_file()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.cluster.name;
        if let Err(e) = sd_protocol::check_cluster_name(name) {
            return Err(invalid(
                "cluster.name",
                format!("{} (the name registered with the scheduler)", e.reason),
            ));
        }
        let url = &self.scheduler.url;
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || reqwest::Url::parse(url).is_err()
        {
            return Err(invalid(
                "scheduler.url",
                "must be an http:// or https:// URL",
            ));
        }
        let s = &self.scheduler;
        sd_protocol::env::check_pair(
            ("scheduler.client_cert_file", s.client_cert_file.as_deref()),
            ("scheduler.client_key_file", s.client_key_file.as_deref()),
        )?;
        sd_protocol::env::check_files([
            ("scheduler.ca_file", s.ca_file.as_deref()),
            ("scheduler.client_cert_file", s.client_cert_file.as_deref()),
            ("scheduler.client_key_file", s.client_key_file.as_deref()),
        ])?;
        if !self.auth.private_key_file.is_file() {
            return Err(invalid(
                "auth.private_key_file",
                format!(
                    "{} does not exist (create one with `sd-agent keygen --cluster {name}`)",
                    self.auth.private_key_file.display()
                ),
            ));
        }
        if self.auth.token_ttl < Duration::from_secs(10)
            || self.auth.token_ttl > Duration::from_secs(86_400)
        {
            return Err(invalid("auth.token_ttl", "must be from 10s to 24h"));
        }
        if self.poll.wait < Duration::from_secs(1) || self.poll.wait > Duration::from_secs(60) {
            return Err(invalid(
                "poll.wait",
                "must be from 1s to 60s (shorter turns the long-poll into a busy loop; the scheduler caps it at 60s)",
            ));
        }
        if !(1..=100).contains(&self.poll.max_jobs) {
            return Err(invalid("poll.max_jobs", "must be from 1 to 100"));
        }
        if let Err(e) = redis::Client::open(self.redis.url.as_str()) {
            return Err(invalid("redis.url", format!("not a valid Redis URL: {e}")));
        }
        if self.executor.max_in_flight == 0 {
            return Err(invalid("executor.max_in_flight", "must be at least 1"));
        }
        if !(1..=1024).contains(&self.executor.launch_concurrency) {
            return Err(invalid(
                "executor.launch_concurrency",
                "must be from 1 to 1024",
            ));
        }
        if self.executor.takeover_after < Duration::from_secs(1)
            || self.executor.takeover_after > self.executor.launch_lease
        {
            return Err(invalid(
                "executor.takeover_after",
                "must be at least 1s and at most executor.launch_lease",
            ));
        }
        if let Some(file) = &self.executor.instance_file
            && (file.as_os_str().is_empty() || file.is_dir())
        {
            return Err(invalid(
                "executor.instance_file",
                "must name a file (e.g. /var/lib/sd-agent/instance), not a directory",
            ));
        }
        if self.executor.launch_lease < Duration::from_secs(5) {
            return Err(invalid("executor.launch_lease", "must be at least 5s"));
        }
        self.screwdriver.allowed_apis()?;
        if let Err(reason) = self.log.check_level() {
            return Err(invalid("log.level", reason));
        }
        match self.executor.kind {
            ExecutorKind::Process => {
                check_process(&self.executor.process)?;
                if let Some(range) = self.executor.process.uid_range
                    && range.count() < self.executor.max_in_flight
                {
                    return Err(invalid(
                        "executor.process.uid_range",
                        format!(
                            "holds {} uids for executor.max_in_flight = {} builds: one uid per running build",
                            range.count(),
                            self.executor.max_in_flight
                        ),
                    ));
                }
            }
            ExecutorKind::Kubernetes => check_kubernetes(&self.executor.kubernetes)?,
        }
        Ok(())
    }
}

/// The longest grace period: the most a config may set or a build's annotation may raise it to.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// An executor's time settings (both executors' config sections carry the same four).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimits {
    /// When `screwdriver.cd/timeout` is absent.
    pub default_timeout: Duration,
    /// The cap on `screwdriver.cd/timeout`.
    pub max_timeout: Duration,
    /// Between the launcher's timeout (plus the grace period) and the agent's backstop.
    pub timeout_margin: Duration,
    /// The default grace period; `screwdriver.cd/terminationGracePeriodSeconds` may raise it.
    pub termination_grace_period: Duration,
}

impl TimeLimits {
    /// Both executors' defaults: Screwdriver's timeouts (90 min, at most 120) and grace period
    /// (30 s), and a 10 min margin before the agent's backstop.
    pub const DEFAULT: TimeLimits = TimeLimits {
        default_timeout: Duration::from_secs(90 * 60),
        max_timeout: Duration::from_secs(120 * 60),
        timeout_margin: Duration::from_secs(10 * 60),
        termination_grace_period: Duration::from_secs(30),
    };
}

impl KubernetesConfig {
    /// What `Config::load` checks of this section: the pod builder relies on it.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_kubernetes(self)
    }

    pub fn limits(&self) -> TimeLimits {
        TimeLimits {
            default_timeout: self.default_timeout,
            max_timeout: self.max_timeout,
            timeout_margin: self.timeout_margin,
            termination_grace_period: self.termination_grace_period,
        }
    }
}

impl ProcessConfig {
    pub fn limits(&self) -> TimeLimits {
        TimeLimits {
            default_timeout: self.default_timeout,
            max_timeout: self.max_timeout,
            timeout_margin: self.timeout_margin,
            termination_grace_period: self.termination_grace_period,
        }
    }
}

/// The launcher's timeout is whole minutes (a fractional annotation is rounded up), the
/// backstop counts from the exact one: a margin of a minute or more keeps the backstop last.
fn check_margin(key: &str, margin: Duration) -> Result<(), ConfigError> {
    if margin < Duration::from_secs(60) {
        return Err(invalid(
            key,
            "must be at least 1m: the agent's backstop must come after the launcher's own timeout, which is whole minutes",
        ));
    }
    Ok(())
}

/// The launcher's SIGTERM trap sleeps `SD_TERMINATION_GRACE_PERIOD_SECONDS - 1`.
fn check_grace(key: &str, grace: Duration) -> Result<(), ConfigError> {
    if grace < Duration::from_secs(2) || grace > MAX_GRACE {
        return Err(invalid(
            key,
            "must be from 2s to 1h (the launcher needs it to abort the step, run teardown and report)",
        ));
    }
    Ok(())
}

/// `[executor.process]`: a launcher to run, and times the launcher can work with.
fn check_process(p: &ProcessConfig) -> Result<(), ConfigError> {
    if p.command.first().is_none_or(String::is_empty) {
        return Err(invalid(
            "executor.process.command",
            "is required for executor.kind = \"process\": the launcher argv, e.g. [\"/usr/local/bin/sd-launch\"]",
        ));
    }
    if p.max_timeout.is_zero() {
        return Err(invalid(
            "executor.process.max_timeout",
            "must be more than 0s",
        ));
    }
    if p.default_timeout.is_zero() || p.default_timeout > p.max_timeout {
        return Err(invalid(
            "executor.process.default_timeout",
            "must be more than 0s and not exceed executor.process.max_timeout",
        ));
    }
    check_grace(
        "executor.process.termination_grace_period",
        p.termination_grace_period,
    )?;
    check_margin("executor.process.timeout_margin", p.timeout_margin)?;
    if p.user.is_none() && p.uid_range.is_none() && !p.allow_agent_user {
        return Err(invalid(
            "executor.process.user",
            "is required: builds run code written by any pipeline author, and as the agent's own user they could read its key (auth.private_key_file) and config and signal it. Set user (and uid_range to keep builds apart from each other), or allow_agent_user = true on a host that runs only trusted builds",
        ));
    }
    if p.uid_range.is_some() && p.user.is_none() && p.group.is_none() {
        return Err(invalid(
            "executor.process.group",
            "is required with uid_range when user is not set: the group builds run with",
        ));
    }
    for name in &p.env_allow {
        let bad = name.is_empty()
            || name.starts_with("SD_")
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if bad {
            return Err(invalid(
                "executor.process.env_allow",
                format!(
                    "{name:?} is not allowed: names of letters, digits and _ only, and no SD_* (the agent's own settings start so; the launcher's SD_* are set per build)"
                ),
            ));
        }
    }
    Ok(())
}

/// `[executor.kubernetes]`: every value a pod is built from, so a build never finds out.
fn check_kubernetes(k: &KubernetesConfig) -> Result<(), ConfigError> {
    check_kubernetes_basics(k)?;
    check_kubernetes_names(k)?;
    check_kubernetes_volumes(k)?;
    check_kubernetes_secrets(k)?;
    check_kubernetes_security(k)
}

/// What the builds' namespace admits (`pod_security`) against what the pods would ask for.
fn check_kubernetes_security(k: &KubernetesConfig) -> Result<(), ConfigError> {
    let key = kube_key;
    match k.pod_security {
        PodSecurity::Restricted => {
            return Err(invalid(
                &key("pod_security"),
                "builds cannot meet \"restricted\": the launcher runs as the build image's user and, when that is not root, creates /sd with sudo, which restricted forbids (runAsNonRoot, no privilege escalation); label the builds' namespace baseline and set \"baseline\"",
            ));
        }
        PodSecurity::Baseline => {
            let asks = [
                ("privileged", k.privileged),
                ("docker_enabled", k.docker_enabled),
                ("host_volumes", !k.host_volumes.is_empty()),
            ];
            if let Some((name, _)) = asks.iter().find(|(_, on)| *on) {
                return Err(invalid(
                    &key(name),
                    "needs privileged build pods, which a namespace at Pod Security baseline refuses: label the builds' namespace pod-security.kubernetes.io/enforce=privileged and set executor.kubernetes.pod_security = \"privileged\"",
                ));
            }
        }
        PodSecurity::Privileged => {}
    }
    // Kubernetes' spelling: `ALL`, or a capability without its `CAP_` prefix.
    if let Some(c) = k.drop_capabilities.iter().find(|c| {
        c.starts_with("CAP_")
            || c.is_empty()
            || !c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    }) {
        return Err(invalid(
            &key("drop_capabilities"),
            format!(
                "{c:?} is not a capability as Kubernetes names them (ALL, NET_RAW, SYS_ADMIN, …)"
            ),
        ));
    }
    Ok(())
}

/// The name of a key of `[executor.kubernetes]`, as refusals show it.
fn kube_key(name: &str) -> String {
    format!("executor.kubernetes.{name}")
}

/// Namespace, prefix, images, size tables, timeouts, kubeconfig.
fn check_kubernetes_basics(k: &KubernetesConfig) -> Result<(), ConfigError> {
    use crate::kube_names::is_dns_label;
    let key = kube_key;
    if !is_dns_label(&k.namespace) {
        return Err(invalid(
            &key("namespace"),
            "must be a Kubernetes namespace name (lowercase letters, digits and '-')",
        ));
    }
    // The longest build id (20 digits) must still make a valid pod name.
    if !is_dns_label(&format!("{}1", k.prefix)) || k.prefix.len() > 63 - 20 {
        return Err(invalid(
            &key("prefix"),
            "must be at most 43 lowercase letters, digits and '-', starting with a letter or digit (pod names are {prefix}{buildId})",
        ));
    }
    for (name, image) in [
        ("launcher_image", &k.launcher_image),
        ("dind_image", &k.dind_image),
    ] {
        if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
            return Err(invalid(&key(name), "must name an image"));
        }
    }
    for (name, table) in [("cpu", &k.cpu), ("ram", &k.ram)] {
        let values = [table.micro, table.low, table.high, table.turbo, table.max];
        if values.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err(invalid(&key(name), "every size must be a positive number"));
        }
        if values[..4].iter().any(|v| *v > table.max) {
            return Err(invalid(&key(name), "no size may exceed max"));
        }
    }
    if k.max_timeout.is_zero() {
        return Err(invalid(&key("max_timeout"), "must be more than 0s"));
    }
    if k.default_timeout.is_zero() || k.default_timeout > k.max_timeout {
        return Err(invalid(
            &key("default_timeout"),
            format!("must be more than 0s and not exceed {}", key("max_timeout")),
        ));
    }
    check_grace(&key("termination_grace_period"), k.termination_grace_period)?;
    check_margin(&key("timeout_margin"), k.timeout_margin)?;
    if let Some(file) = &k.kubeconfig
        && !file.is_file()
    {
        return Err(invalid(
            &key("kubeconfig"),
            format!("{} does not exist", file.display()),
        ));
    }
    Ok(())
}

/// Labels, selectors, annotations and object names: as the API server would check them.
fn check_kubernetes_names(k: &KubernetesConfig) -> Result<(), ConfigError> {
    use crate::kube_names::{is_dns_subdomain, is_label_value, is_qualified_name};
    let key = kube_key;
    for (name, map) in [
        ("extra_labels", &k.extra_labels),
        ("node_selector", &k.node_selector),
        ("node_selectors", &k.node_selectors),
        ("preferred_node_selectors", &k.preferred_node_selectors),
    ] {
        for (label, value) in map {
            if !is_qualified_name(label) {
                return Err(invalid(
                    &key(name),
                    format!(
                        "{label:?} is not a Kubernetes label key ([prefix/]name, name ≤ 63 of A-Z a-z 0-9 - _ .)"
                    ),
                ));
            }
            if !is_label_value(value) {
                return Err(invalid(
                    &key(name),
                    format!(
                        "{value:?} (for {label}) is not a Kubernetes label value (≤ 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"
                    ),
                ));
            }
        }
    }
    if let Some(label) = k.pod_annotations.keys().find(|a| !is_qualified_name(a)) {
        return Err(invalid(
            &key("pod_annotations"),
            format!("{label:?} is not a Kubernetes annotation key"),
        ));
    }
    if let Some(label) = k
        .disk_speed_label
        .as_deref()
        .filter(|l| !is_qualified_name(l))
    {
        return Err(invalid(
            &key("disk_speed_label"),
            format!("{label:?} is not a Kubernetes label key"),
        ));
    }
    for (name, value) in [
        ("runtime_class", &k.runtime_class),
        ("service_account", &k.service_account),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !is_dns_subdomain(v)) {
            return Err(invalid(
                &key(name),
                format!("{v:?} is not a Kubernetes object name"),
            ));
        }
    }
    if let Some(s) = k.image_pull_secrets.iter().find(|s| !is_dns_subdomain(s)) {
        return Err(invalid(
            &key("image_pull_secrets"),
            format!("{s:?} is not a Secret name"),
        ));
    }
    Ok(())
}

/// Host volumes and secret files: names unique (the agent's own volumes included), paths
/// absolute, hostPath types known.
fn check_kubernetes_volumes(k: &KubernetesConfig) -> Result<(), ConfigError> {
    use crate::kube_names::{is_dns_label, is_dns_subdomain};
    let key = kube_key;
    // Volumes the agent adds itself; an operator's must not collide with them or each other.
    let mut volumes: Vec<String> = crate::kube_names::RESERVED_VOLUMES
        .iter()
        .map(|v| (*v).to_owned())
        .collect();
    let mut add_volume = |field: &str, name: &str| -> Result<(), ConfigError> {
        if !is_dns_label(name) {
            return Err(invalid(
                &key(field),
                format!(
                    "volume name {name:?} is not a DNS label (lowercase letters, digits and '-')"
                ),
            ));
        }
        if volumes.iter().any(|v| v == name) {
            return Err(invalid(
                &key(field),
                format!(
                    "volume name {name:?} is used twice (the agent's own volumes are {})",
                    crate::kube_names::RESERVED_VOLUMES.join(", ")
                ),
            ));
        }
        volumes.push(name.to_owned());
        Ok(())
    };
    for v in &k.host_volumes {
        add_volume("host_volumes", &v.name)?;
        if !v.path.starts_with('/') || !v.mount_path.starts_with('/') {
            return Err(invalid(
                &key("host_volumes"),
                format!("{}: path and mount_path must be absolute", v.name),
            ));
        }
        const TYPES: &[&str] = &[
            "",
            "DirectoryOrCreate",
            "Directory",
            "FileOrCreate",
            "File",
            "Socket",
            "CharDevice",
            "BlockDevice",
        ];
        if let Some(t) = v.r#type.as_deref().filter(|t| !TYPES.contains(t)) {
            return Err(invalid(
                &key("host_volumes"),
                format!(
                    "{}: type {t:?} is not one of {}",
                    v.name,
                    TYPES[1..].join(", ")
                ),
            ));
        }
    }
    for f in &k.build_secret_files {
        add_volume("build_secret_files", &f.name)?;
        if !f.mount_path.starts_with('/') || !is_dns_subdomain(&f.secret_name) {
            return Err(invalid(
                &key("build_secret_files"),
                format!(
                    "{}: mount_path must be absolute and secret_name a Secret name",
                    f.name
                ),
            ));
        }
    }
    Ok(())
}

/// Secrets given to builds as environment variables: never one of the launcher's `SD_*`.
fn check_kubernetes_secrets(k: &KubernetesConfig) -> Result<(), ConfigError> {
    use crate::kube_names::{is_dns_subdomain, is_env_name};
    let key = kube_key;
    for s in &k.build_secrets {
        if !is_env_name(&s.env) || s.env.starts_with("SD_") {
            return Err(invalid(
                &key("build_secrets"),
                format!(
                    "{:?} is not an environment variable name a build may get (letters, digits, '_', '-', '.'; not SD_*, which the launcher owns)",
                    s.env
                ),
            ));
        }
        if !is_dns_subdomain(&s.secret_name) || s.key.is_empty() {
            return Err(invalid(
                &key("build_secrets"),
                format!(
                    "{}: secret_name must be a Secret name and key not empty",
                    s.env
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    fn minimal(key: &Path) -> String {
        format!(
            "[cluster]\nname = \"ios-farm\"\n[scheduler]\nurl = \"https://sched.example\"\n[auth]\nprivate_key_file = \"{}\"\n[executor]\nkind = \"process\"\n[executor.process]\ncommand = [\"/bin/true\"]\nuser = \"sd-build\"\n[screwdriver]\napi_uris = [\"https://api.sd.example\"]\n",
            key.display()
        )
    }

    fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            Path::new("agent.toml"),
            vars.iter().map(|(k, v)| ((*k).into(), (*v).into())),
        )
    }

    /// Found by tests/properties.rs: a zero max_timeout was refused naming default_timeout,
    /// and a client certificate without its key named only the key.
    #[test]
    fn each_refusal_names_the_key_to_fix() {
        let key = key_file();
        let refused = |vars: &[(&str, &str)]| match parse(&minimal(key.path()), vars) {
            Err(ConfigError::Invalid { key, reason }) => format!("{key}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(&[("SD_AGENT_EXECUTOR_PROCESS_MAX_TIMEOUT", "0ms")]),
            "executor.process.max_timeout: must be more than 0s"
        );
        let cert = refused(&[("SD_AGENT_SCHEDULER_CLIENT_CERT_FILE", "/nonexistent")]);
        assert!(
            cert.starts_with(
                "scheduler.client_key_file: is required with scheduler.client_cert_file"
            ),
            "{cert}"
        );
    }

    #[test]
    fn minimal_config_fills_defaults() {
        let key = key_file();
        let c = parse(&minimal(key.path()), &[]).unwrap();
        assert_eq!(c.poll.max_jobs, 10);
        assert_eq!(c.auth.algorithm, SigningAlgorithm::RS256);
        assert_eq!(c.executor.max_in_flight, 50);
        assert_eq!(
            c.executor.instance_file, None,
            "without it, the lapse applies"
        );
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_allowed_apis_are_required_and_https_unless_allowed() {
        let key = key_file();
        let base = minimal(key.path());
        let refused = |text: String| match parse(&text, &[]) {
            Err(ConfigError::Invalid { key, reason }) => {
                assert_eq!(key, "screwdriver.api_uris", "{reason}");
                reason
            }
            other => panic!("{text}: {other:?}"),
        };
        let without = base.replace("api_uris = [\"https://api.sd.example\"]\n", "");
        assert!(refused(without.clone()).contains("empty"));
        let http = base.replace("https://api.sd.example", "http://127.0.0.1:9");
        assert!(refused(http.clone()).contains("https"));
        let c = parse(&format!("{http}allow_http = true\n"), &[]).unwrap();
        assert!(
            c.screwdriver
                .allowed_apis()
                .unwrap()
                .check("http://127.0.0.1:9/")
                .is_ok()
        );
        let c = parse(
            &without,
            &[("SD_AGENT_SCREWDRIVER_API_URIS", "https://api.other.example")],
        )
        .unwrap();
        assert_eq!(c.screwdriver.api_uris, ["https://api.other.example"]);
    }

    #[test]
    fn env_overrides_reach_nested_sections() {
        let key = key_file();
        let c = parse(
            &minimal(key.path()),
            &[
                ("SD_AGENT_POLL_MAX_JOBS", "3"),
                ("SD_AGENT_EXECUTOR_KUBERNETES_NAMESPACE", "builds"),
                ("SD_AGENT_EXECUTOR_KUBERNETES_CPU_MAX", "24"),
                ("SD_AGENT_SHUTDOWN_TIMEOUT", "5s"),
            ],
        )
        .unwrap();
        assert_eq!(c.poll.max_jobs, 3);
        assert_eq!(c.executor.kubernetes.namespace, "builds");
        assert_eq!(c.executor.kubernetes.cpu.max, 24.0);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_reload_names_the_sections_it_cannot_apply() {
        let key = key_file();
        let base = parse(&minimal(key.path()), &[]).unwrap();
        let key_only = parse(&minimal(key.path()), &[("SD_AGENT_AUTH_TOKEN_TTL", "60s")]).unwrap();
        assert!(
            base.changed_sections(&key_only).is_empty(),
            "auth is applied"
        );
        let more = parse(
            &minimal(key.path()),
            &[
                ("SD_AGENT_POLL_MAX_JOBS", "3"),
                ("SD_AGENT_EXECUTOR_MAX_IN_FLIGHT", "7"),
            ],
        )
        .unwrap();
        assert_eq!(base.changed_sections(&more), ["poll", "executor"]);
    }

    #[test]
    fn every_refusal_names_its_key() {
        let key = key_file();
        let base = minimal(key.path());
        let cases: Vec<(String, &str)> = vec![
            (base.replace("ios-farm", "ios farm"), "cluster.name"),
            (
                base.replace("https://sched.example", "sched.example"),
                "scheduler.url",
            ),
            (
                base.replace(&key.path().display().to_string(), "/nonexistent.pem"),
                "auth.private_key_file",
            ),
            (
                base.replace("[\"/bin/true\"]", "[]"),
                "executor.process.command",
            ),
            (
                base.replace("kind = \"process\"", "kind = \"docker\""),
                "executor.kind",
            ),
            (format!("{base}[poll]\nmax_jobs = 0\n"), "poll.max_jobs"),
            (
                base.replace(
                    "kind = \"process\"",
                    "kind = \"process\"\nlaunch_concurrency = 0",
                ),
                "executor.launch_concurrency",
            ),
            (
                base.replace(
                    "kind = \"process\"",
                    "kind = \"process\"\nlaunch_lease = \"10s\"\ntakeover_after = \"20s\"",
                ),
                "executor.takeover_after",
            ),
            (
                base.replace(
                    "kind = \"process\"",
                    "kind = \"process\"\ninstance_file = \"/\"",
                ),
                "executor.instance_file",
            ),
            (format!("{base}[poll]\nwait = \"5m\"\n"), "poll.wait"),
            (format!("{base}[poll]\nwait = \"0s\"\n"), "poll.wait"),
            (format!("{base}[log]\nlevel = \"inf\"\n"), "log.level"),
            (
                format!("{base}[log]\nlevel = \"info,hyper=loud\"\n"),
                "log.level",
            ),
            (
                base.replace(
                    "[\"/bin/true\"]",
                    "[\"/bin/true\"]\ndefault_timeout = \"3h\"",
                ),
                "executor.process.default_timeout",
            ),
            (format!("{base}[poll]\nsurprise = 1\n"), "poll"),
            (
                base.replace(
                    "[\"/bin/true\"]",
                    "[\"/bin/true\"]\ntimeout_margin = \"30s\"",
                ),
                "executor.process.timeout_margin",
            ),
            (
                base.replace(
                    "[\"/bin/true\"]",
                    "[\"/bin/true\"]\ntermination_grace_period = \"1s\"",
                ),
                "executor.process.termination_grace_period",
            ),
            (
                base.replace("[cluster]\nname = \"ios-farm\"\n", ""),
                "cluster",
            ),
            (
                base.replace("url = \"https://sched.example\"\n", ""),
                "scheduler.url",
            ),
            (format!("{base}[auth2]\n"), "auth2"),
            (
                base.replace("user = \"sd-build\"\n", ""),
                "executor.process.user",
            ),
            (
                base.replace("user = \"sd-build\"", "uid_range = \"200000-200099\""),
                "executor.process.group",
            ),
            (
                base.replace("user = \"sd-build\"", "user = \"b\"\nuid_range = \"10-20\""),
                "executor.process.uid_range",
            ),
            (
                base.replace(
                    "user = \"sd-build\"",
                    "user = \"b\"\nuid_range = \"200000-200009\"",
                ),
                "executor.process.uid_range",
            ),
            (
                base.replace(
                    "user = \"sd-build\"",
                    "user = \"b\"\nenv_allow = [\"SD_AGENT_CONFIG\"]",
                ),
                "executor.process.env_allow",
            ),
            (
                base.replace("user = \"sd-build\"", "user = \"b\"\nenv_allow = [\"A=B\"]"),
                "executor.process.env_allow",
            ),
        ];
        for (text, key) in cases {
            match parse(&text, &[]) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert!(k.contains(key), "{key}: got {k} ({reason})")
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        let mut k8s = base.replace("kind = \"process\"", "kind = \"kubernetes\"");
        k8s.push_str(
            "[executor.kubernetes.cpu]\nmicro = 1\nlow = 2\nhigh = 30\nturbo = 40\nmax = 8\n",
        );
        assert!(
            matches!(parse(&k8s, &[]), Err(ConfigError::Invalid { key, .. }) if key == "executor.kubernetes.cpu")
        );
        let k8s = base.replace("kind = \"process\"", "kind = \"kubernetes\"");
        for prefix in ["Build-", "-b", "b_", &"b".repeat(44)] {
            let text = format!("{k8s}[executor.kubernetes]\nprefix = \"{prefix}\"\n");
            assert!(
                matches!(parse(&text, &[]), Err(ConfigError::Invalid { ref key, .. }) if key == "executor.kubernetes.prefix"),
                "{prefix}"
            );
        }
        for (section, key) in [
            (
                "timeout_margin = \"59s\"",
                "executor.kubernetes.timeout_margin",
            ),
            (
                "image_pull_policy = \"Sometimes\"",
                "executor.kubernetes.image_pull_policy",
            ),
            (
                "extra_labels = { \"team\" = \"i os\" }",
                "executor.kubernetes.extra_labels",
            ),
            (
                "node_selectors = { \"Pool!\" = \"b\" }",
                "executor.kubernetes.node_selectors",
            ),
            (
                "pod_annotations = { \"/x\" = \"y\" }",
                "executor.kubernetes.pod_annotations",
            ),
            (
                "runtime_class = \"G Visor\"",
                "executor.kubernetes.runtime_class",
            ),
            (
                "lifecycle_hooks = { preStop = { exek = { command = [\"true\"] } } }",
                "executor.kubernetes.lifecycle_hooks",
            ),
            (
                "host_volumes = [{ name = \"workspace\", mount_path = \"/w\", path = \"/w\" }]",
                "executor.kubernetes.host_volumes",
            ),
            (
                "host_volumes = [{ name = \"kvm\", mount_path = \"dev/kvm\", path = \"/dev/kvm\" }]",
                "executor.kubernetes.host_volumes",
            ),
            (
                "build_secrets = [{ env = \"SD_TOKEN\", secret_name = \"s\", key = \"k\" }]",
                "executor.kubernetes.build_secrets",
            ),
            (
                "build_secret_files = [{ name = \"Bad\", mount_path = \"/s\", secret_name = \"s\" }]",
                "executor.kubernetes.build_secret_files",
            ),
            // What Pod Security baseline (the default level) would refuse at admission.
            ("privileged = true", "executor.kubernetes.privileged"),
            (
                "docker_enabled = true",
                "executor.kubernetes.docker_enabled",
            ),
            (
                "host_volumes = [{ name = \"kvm\", mount_path = \"/dev/kvm\", path = \"/dev/kvm\" }]",
                "executor.kubernetes.host_volumes",
            ),
            (
                "pod_security = \"restricted\"",
                "executor.kubernetes.pod_security",
            ),
            (
                "pod_security = \"Baseline\"",
                "executor.kubernetes.pod_security",
            ),
            (
                "drop_capabilities = [\"CAP_NET_RAW\"]",
                "executor.kubernetes.drop_capabilities",
            ),
            (
                "drop_capabilities = [\"net_raw\"]",
                "executor.kubernetes.drop_capabilities",
            ),
        ] {
            let text = format!("{k8s}[executor.kubernetes]\n{section}\n");
            match parse(&text, &[]) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert!(k.contains(key), "{section}: got {k} ({reason})")
                }
                other => panic!("{section}: {other:?}"),
            }
        }
        let hooks = format!(
            "{k8s}[executor.kubernetes]\nlifecycle_hooks = {{ preStop = {{ exec = {{ command = [\"/bin/sh\", \"-c\", \"sleep 5\"] }} }} }}\n"
        );
        assert!(
            parse(&hooks, &[])
                .unwrap()
                .executor
                .kubernetes
                .lifecycle_hooks
                .is_some()
        );
        for prefix in ["", "sd-build-", "1", &"b".repeat(43)] {
            let text = format!("{k8s}[executor.kubernetes]\nprefix = \"{prefix}\"\n");
            assert!(parse(&text, &[]).is_ok(), "{prefix}");
        }
        // The same settings in a namespace that admits privileged pods.
        let privileged = format!(
            "{k8s}[executor.kubernetes]\npod_security = \"privileged\"\nprivileged = true\ndocker_enabled = true\nhost_volumes = [{{ name = \"kvm\", mount_path = \"/dev/kvm\", path = \"/dev/kvm\" }}]\ndrop_capabilities = [\"ALL\"]\n"
        );
        let k = parse(&privileged, &[]).unwrap().executor.kubernetes;
        assert_eq!(
            (k.pod_security, k.privileged, k.drop_capabilities),
            (PodSecurity::Privileged, true, vec!["ALL".to_owned()])
        );
        for level in [
            "warn",
            "info,sd_agent=debug",
            "off",
            "sd_agent::fetcher=trace",
        ] {
            assert!(
                parse(&format!("{base}[log]\nlevel = \"{level}\"\n"), &[]).is_ok(),
                "{level}"
            );
        }
    }

    #[test]
    fn builds_run_as_the_agents_user_only_when_allowed_and_a_range_is_parsed() {
        let key = key_file();
        let base = minimal(key.path());
        let allowed = base.replace("user = \"sd-build\"", "allow_agent_user = true");
        assert!(
            parse(&allowed, &[])
                .unwrap()
                .executor
                .process
                .allow_agent_user
        );
        let ranged = base.replace(
            "user = \"sd-build\"",
            "group = \"sd-build\"\nuid_range = \" 200000 - 200999 \"",
        );
        let c = parse(&ranged, &[]).unwrap();
        let range = c.executor.process.uid_range.unwrap();
        assert_eq!(
            (range.first, range.last, range.count()),
            (200_000, 200_999, 1000)
        );
        assert_eq!(c.executor.process.env_allow, DEFAULT_ENV_ALLOW);
        for bad in ["5-10", "2000-1000", "1000", "a-b", "1000-4294967295"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_are_hardened_by_default() {
        let key = key_file();
        let k8s = minimal(key.path()).replace("kind = \"process\"", "kind = \"kubernetes\"");
        let k = parse(&k8s, &[]).unwrap().executor.kubernetes;
        assert_eq!(k.pod_security, PodSecurity::Baseline);
        assert!(!k.allow_privilege_escalation && !k.privileged && !k.docker_enabled);
        assert_eq!(k.drop_capabilities, ["NET_RAW"]);
    }

    #[test]
    fn the_redis_password_comes_from_its_file() {
        let key = key_file();
        let base = minimal(key.path());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        let with_file = |url: &str| {
            format!(
                "{base}[redis]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
                file.display()
            )
        };
        // A Secret's file often ends in a newline; characters a URL reserves are encoded.
        std::fs::write(&file, "s3cr:t/@#%41\n").unwrap();
        let c = parse(&with_file("redis://sd-agent-redis.sd-agent.svc:6379"), &[]).unwrap();
        assert_eq!(
            c.redis.url,
            "redis://:s3cr%3At%2F%40%23%2541@sd-agent-redis.sd-agent.svc:6379"
        );
        let info = redis::Client::open(c.redis.url.as_str())
            .unwrap()
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_owned);
        assert_eq!(info.as_deref(), Some("s3cr:t/@#%41"), "what Redis is sent");
        // An ACL user named in the URL keeps its name.
        let c = parse(&with_file("rediss://sd-agent@redis.example:6380/2"), &[]).unwrap();
        assert_eq!(
            c.redis.url,
            "rediss://sd-agent:s3cr%3At%2F%40%23%2541@redis.example:6380/2"
        );
        // Set by the variable the DaemonSet could use instead of the file key.
        let over = parse(
            &format!("{base}[redis]\nurl = \"redis://r:6379\"\n"),
            &[(
                "SD_AGENT_REDIS_PASSWORD_FILE",
                file.display().to_string().as_str(),
            )],
        )
        .unwrap();
        assert_eq!(over.redis.url, "redis://:s3cr%3At%2F%40%23%2541@r:6379");

        let refused = |text: String| match parse(&text, &[]) {
            Err(e @ (ConfigError::Invalid { .. } | ConfigError::ReadKeyFile { .. })) => {
                assert!(e.to_string().contains("redis."), "{e}");
                e
            }
            other => panic!("{text}: {other:?}"),
        };
        let both = refused(with_file("redis://:inline@r:6379"));
        assert!(both.to_string().contains("one or the other"), "{both}");
        assert!(matches!(
            refused(with_file("unix:///run/redis.sock")),
            ConfigError::Invalid { .. }
        ));
        for content in ["", "\n", "two\nlines\n"] {
            std::fs::write(&file, content).unwrap();
            refused(with_file("redis://r:6379"));
        }
        std::fs::remove_file(&file).unwrap();
        match refused(with_file("redis://r:6379")) {
            ConfigError::ReadKeyFile { key, path, source } => {
                assert_eq!((key.as_str(), path), ("redis.password_file", file.clone()));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn example_config_is_valid() {
        let key = key_file();
        let text = include_str!("../../config/agent.toml").replace(
            "/etc/sd-agent/private.pem",
            &key.path().display().to_string(),
        );
        let c = parse(&text, &[]).unwrap();
        assert_eq!(
            c.executor.instance_file.as_deref(),
            Some(Path::new("/var/lib/sd-agent/instance")),
            "in the unit's StateDirectory"
        );
        assert!(include_str!("../../systemd/sd-agent.service").contains("StateDirectory=sd-agent"));
    }

    #[test]
    fn the_daemonset_config_is_valid_with_the_variables_it_sets() {
        let manifest = include_str!("../../deploy/kubernetes/agent.yaml");
        let (_, after) = manifest.split_once("  agent.toml: |\n").unwrap();
        let text: String = after
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        assert!(text.contains("[cluster]"), "{text}");
        let key = key_file();
        let key_path = key.path().display().to_string();
        let password = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password.path(), "0123abcd").unwrap();
        let password_path = password.path().display().to_string();
        let c = parse(
            &text,
            &[
                ("SD_AGENT_AUTH_PRIVATE_KEY_FILE", key_path.as_str()),
                ("SD_AGENT_REDIS_PASSWORD_FILE", password_path.as_str()),
            ],
        )
        .unwrap();
        assert_eq!(
            c.redis.url,
            "redis://:0123abcd@sd-agent-redis.sd-agent.svc:6379"
        );
        assert!(
            text.contains("password_file = \"/etc/sd-agent/redis/password\"")
                && manifest.contains(
                    "{name: redis-password, mountPath: /etc/sd-agent/redis, readOnly: true}"
                ),
            "the password file is where the Secret is mounted"
        );
        assert_eq!(c.executor.kind, ExecutorKind::Kubernetes);
        assert_eq!(c.health.listen.port(), 8081);
        // On an emptyDir: it outlives a restart of the container, so the restarted agent takes
        // back what its previous run held at once.
        assert_eq!(
            c.executor.instance_file.as_deref(),
            Some(Path::new("/var/lib/sd-agent/instance"))
        );
        assert!(manifest.contains("{name: state, mountPath: /var/lib/sd-agent}"));
        assert!(manifest.contains("- name: state\n          emptyDir: {sizeLimit: 1Mi}"));
        // No password on a command line or in an environment variable, on either side.
        assert!(
            !manifest.contains("--requirepass"),
            "redis-server's arguments"
        );
        assert!(
            !manifest.contains("secretKeyRef"),
            "Secrets are mounted as files"
        );
    }
}
