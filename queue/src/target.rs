//! How a process reaches a Redis: its URL (`redis://`, `rediss://` for TLS, with an ACL user
//! and password as ElastiCache's AUTH wants them) and, for a private CA, that CA. One owner for
//! building clients, so the scheduler's master queues, its pub/sub and an agent's local Redis
//! all trust the same way; whether the server runs in cluster mode (ElastiCache "cluster mode
//! enabled", whose URL is the configuration endpoint); and the start-up check that tells a wrong
//! CA, password or mode (which no retry heals) from a Redis that is merely down.

use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::{Client, RedisError, TlsCertificates};

/// A Redis and how to trust it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTarget {
    pub url: String,
    /// PEM CA certificate(s) trusted for `rediss://` instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// The server runs in cluster mode (config `redis.cluster`): the URL names one node (or
    /// the configuration endpoint), the others are found from it.
    pub cluster: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &sd_protocol::env::redact_url(&self.url))
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "(set)"))
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Why Redis could not be used at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The TLS handshake failed: the server's certificate is not trusted (or not for this
    /// host), or the server does not speak TLS there. Retrying does not help.
    #[error("TLS with Redis failed: {0}")]
    Tls(String),
    /// Redis refused the user or password. Retrying does not help.
    #[error("Redis refused the credentials: {0}")]
    Auth(String),
    /// The server runs in cluster mode and `redis.cluster` is not set. Retrying does not help.
    #[error(
        "Redis runs in cluster mode (ElastiCache: cluster mode enabled): set redis.cluster = true"
    )]
    ClusterMode,
    /// `redis.cluster` is set and the server does not run in cluster mode. Retrying does not
    /// help.
    #[error(
        "redis.cluster is true but this Redis does not run in cluster mode: set redis.cluster = false"
    )]
    NotClusterMode,
    /// Redis did not answer (down, or not yet up): worth waiting for.
    #[error("Redis does not answer: {0}")]
    Unreachable(String),
}

/// A URL alone: the system's CAs.
impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        Self::new(url.as_str())
    }
}

impl RedisTarget {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_pem: None,
            cluster: false,
        }
    }

    /// The same Redis, in cluster mode.
    pub fn in_cluster_mode(self) -> Self {
        Self {
            cluster: true,
            ..self
        }
    }

    /// The Redis at `url`, trusting the CA in `ca_file` (config key `redis.ca_file`, named
    /// when it cannot be read), in cluster mode when `cluster`.
    pub fn load(
        url: &str,
        ca_file: Option<&std::path::Path>,
        cluster: bool,
    ) -> Result<Self, sd_protocol::env::ConfigError> {
        let ca_pem = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| {
                sd_protocol::env::ConfigError::ReadKeyFile {
                    key: "redis.ca_file".into(),
                    path: path.to_owned(),
                    source,
                }
            })?),
            None => None,
        };
        Ok(Self {
            url: url.to_owned(),
            ca_pem,
            cluster,
        })
    }

    /// A client of the node the URL names; it connects only when used. In cluster mode that is
    /// for pub/sub, which reaches every node from any one.
    pub fn client(&self) -> Result<Client, RedisError> {
        match &self.ca_pem {
            None => Client::open(self.url.as_str()),
            Some(pem) => Client::build_with_tls(
                self.url.as_str(),
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
    }

    /// The cluster client's settings for this target (cluster mode), credentials and TLS
    /// from the URL.
    pub(crate) fn cluster_client(&self) -> Result<ClusterClientBuilder, RedisError> {
        let builder = ClusterClientBuilder::new([self.url.as_str()]);
        Ok(match &self.ca_pem {
            None => builder,
            Some(pem) => builder.certs(TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            }),
        })
    }

    /// Connects once and sends PING, within `within`, to tell at start a configuration that
    /// cannot work from a Redis that is only unavailable; logs a warning for each
    /// [`risky_settings`] found.
    pub async fn check_access(&self, within: Duration) -> Result<(), AccessError> {
        let attempt = async {
            // The node the URL names, by itself: it says whether it runs in cluster mode, and
            // a cluster client would only fail on a server that does not.
            let client = self.client()?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            let cluster: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let cluster_mode = cluster.lines().any(|l| l.trim() == "cluster_enabled:1");
            Ok::<_, RedisError>((cluster_mode, risky_settings(&mut conn).await))
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok((true, _))) if !self.cluster => Err(AccessError::ClusterMode),
            Ok(Ok((false, _))) if self.cluster => Err(AccessError::NotClusterMode),
            Ok(Ok((_, warnings))) => {
                for warning in warnings {
                    tracing::warn!(redis = %sd_protocol::env::redact_url(&self.url), "{warning}");
                }
                Ok(())
            }
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(AccessError::Unreachable(format!(
                "no answer within {within:?}"
            ))),
        }
    }
}

/// What in a server's settings puts queued jobs at risk: evictions, no persistence. Managed
/// Redis may refuse CONFIG (ElastiCache does); then nothing can be said from here.
pub async fn risky_settings<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    let mut get = async |name: &str| {
        redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async::<Vec<String>>(conn)
            .await
            .ok()
            .and_then(|pair| pair.get(1).cloned())
    };
    if get("maxmemory-policy")
        .await
        .is_some_and(|p| p != "noeviction")
    {
        warnings.push("maxmemory-policy is not noeviction: queued jobs could be evicted");
    }
    if get("appendonly").await.is_some_and(|v| v != "yes") {
        warnings.push("appendonly is off: acknowledged jobs would not survive a Redis restart");
    }
    warnings
}

/// What a failed first contact means. The TLS cause is read from the message: the client
/// reports the handshake's error as an I/O error carrying rustls's text.
fn classify(e: &RedisError) -> AccessError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || lower.contains("wrongpass")
        || lower.contains("noauth")
        || lower.contains("invalid username-password")
    {
        AccessError::Auth(text)
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("invaliddata")
    {
        AccessError::Tls(text)
    } else {
        AccessError::Unreachable(text)
    }
}
