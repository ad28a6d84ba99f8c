//! `sd-agent check`: verifies the whole setup with real calls and says exactly what to fix.
//! Nothing is taken from any queue and no build is touched.

use std::time::Duration;

use crate::config::{Config, ExecutorKind};

/// One verified item.
pub struct Line {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {:<10} {}", self.name, self.detail)
    }
}

fn line(name: &'static str, result: Result<String, String>) -> Line {
    match result {
        Ok(detail) => Line {
            name,
            ok: true,
            detail,
        },
        Err(detail) => Line {
            name,
            ok: false,
            detail,
        },
    }
}

/// Runs every check; the config itself was already loaded and validated.
pub async fn run(config: &Config, config_path: &std::path::Path) -> Vec<Line> {
    let mut lines = vec![Line {
        name: "config",
        ok: true,
        detail: format!(
            "{} is valid (cluster {})",
            config_path.display(),
            config.cluster.name
        ),
    }];
    let signer = crate::app::signer(config);
    lines.push(line(
        "key",
        match &signer {
            Ok(_) => Ok(format!("{} loads and signs {}", config.auth.private_key_file.display(), config.auth.algorithm.as_str())),
            Err(e) => Err(format!("{e} — fix: point auth.private_key_file at the key from `sd-agent keygen`, and auth.algorithm at its type")),
        },
    ));
    lines.push(match signer {
        Ok(signer) => line("scheduler", scheduler(config, signer).await),
        Err(_) => Line {
            name: "scheduler",
            ok: false,
            detail: "skipped: no usable key".into(),
        },
    });
    lines.push(line("redis", redis(config).await));
    lines.push(line("instance", instance(config)));
    lines.push(line("executor", executor(config).await));
    lines
}

async fn scheduler(config: &Config, signer: crate::signer::Signer) -> Result<String, String> {
    let client =
        crate::app::client(config, std::sync::Arc::new(signer)).map_err(|e| e.to_string())?;
    // A signed no-op: renewing a lease that does not exist proves reachability and that the
    // scheduler accepts this cluster's token, without taking any job.
    match tokio::time::timeout(Duration::from_secs(15), client.renew_nothing()).await {
        Ok(Ok(())) => Ok(format!(
            "{} accepts this agent's token for cluster {}",
            config.scheduler.url, config.cluster.name
        )),
        Ok(Err(crate::scheduler_client::ClientError::Refused { status, message })) => Err(format!(
            "{} refused the token ({status}: {message}) — fix: register the cluster with this key's public half (sd-agent keygen prints it), export it on the scheduler under the cluster's authKey variable, and check this host's clock",
            config.scheduler.url
        )),
        Ok(Err(crate::scheduler_client::ClientError::Unavailable {
            message,
            status: Some(status),
            ..
        })) => Err(format!(
            "{} answered {status}: {message} — fix: the scheduler is reachable but failing; read its log (a missing authKey/signOption variable for this cluster shows there)",
            config.scheduler.url
        )),
        Ok(Err(e)) => Err(format!(
            "{e} — fix: check scheduler.url, DNS, firewalls and scheduler.ca_file"
        )),
        Err(_) => Err(format!(
            "{} did not answer within 15s — fix: check scheduler.url and the network",
            config.scheduler.url
        )),
    }
}

async fn redis(config: &Config) -> Result<String, String> {
    let fix = "fix: check redis.url and that the cluster's Redis runs";
    let url = sd_protocol::env::redact_url(&config.redis.url);
    let target = config.redis.target().map_err(|e| format!("{e} — {fix}"))?;
    match target.check_access(Duration::from_secs(5)).await {
        Err(e @ sd_queue::AccessError::Tls(_)) => {
            return Err(format!(
                "{url}: {e} — fix: redis.url must be rediss:// to the server's TLS port, and redis.ca_file the CA that issued its certificate"
            ));
        }
        Err(e @ (sd_queue::AccessError::ClusterMode | sd_queue::AccessError::NotClusterMode)) => {
            return Err(format!("{url}: {e}"));
        }
        Err(e @ sd_queue::AccessError::Auth(_)) => {
            return Err(format!(
                "{url}: {e} — fix: the user and password in redis.url (or redis.password_file)"
            ));
        }
        _ => {}
    }
    let client = target.client().map_err(|e| format!("{e} — {fix}"))?;
    let connect = client.get_multiplexed_async_connection();
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("{url} unreachable: {e} — {fix}")),
        Err(_) => return Err(format!("{url} did not answer within 5s — {fix}")),
    };
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("PING failed: {e} — {fix}"))?;
    let warnings = sd_queue::risky_settings(&mut conn).await;
    if warnings.is_empty() {
        Ok(format!("{url} answers"))
    } else {
        Err(format!(
            "{url} answers, but {} — fix the Redis configuration",
            warnings.join("; ")
        ))
    }
}

/// `executor.instance_file`: that the agent can create, write and lock it, or that a running
/// agent holds it. The lock is taken for a moment only, and no file is created.
fn instance(config: &Config) -> Result<String, String> {
    use crate::instance::{Probe, probe};
    let Some(path) = &config.executor.instance_file else {
        return Ok(format!(
            "executor.instance_file is not set: a restarted agent takes back its previous run's local jobs only after executor.takeover_after ({:?})",
            config.executor.takeover_after
        ));
    };
    let file = path.display();
    let previous = |name: Option<String>| match name {
        Some(name) => format!("names instance {name}"),
        None => "names no instance".to_owned(),
    };
    match probe(path) {
        Ok(Probe::Absent) => Ok(format!(
            "{file} does not exist yet; its directory is writable, the agent creates it"
        )),
        Ok(Probe::Free(name)) => Ok(format!(
            "{file} is writable and lockable ({}); no agent holds it",
            previous(name)
        )),
        Ok(Probe::Held(name)) => Ok(format!(
            "{file} is held by a running agent ({}); another agent given this file would refuse to start",
            previous(name)
        )),
        Err(e) => Err(format!(
            "{e} — fix: point executor.instance_file at a file in a directory the agent's user may write (the unit's StateDirectory /var/lib/sd-agent, or the DaemonSet's emptyDir)"
        )),
    }
}

async fn executor(config: &Config) -> Result<String, String> {
    match config.executor.kind {
        ExecutorKind::Process => crate::executor::process::check_command(&config.executor.process)
            .map_err(|e| e.to_string()),
        ExecutorKind::Kubernetes => {
            crate::executor::kubernetes::check_access(&config.executor.kubernetes)
                .await
                .map_err(|e| e.to_string())
        }
    }
}
