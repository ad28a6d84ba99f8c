//! The agent's local queue over `rediss://` with an ACL user and password (a `redis-server`
//! with `--tls-port` and a CA made here), and `sd-agent run`'s preflight refusing a CA that did
//! not issue the server's certificate, or a wrong password, naming the key to fix.

use std::path::Path;
use std::time::{Duration, Instant};

use sd_agent::config::{Config, ConfigError};
use sd_agent::local::LocalQueue;
use sd_protocol::{JobKind, QueueMessage};
use sd_queue::RedisTarget;
use sd_testkit::{AgentConfig, RedisServer, TestCa};
use serde_json::json;

#[tokio::test]
async fn the_local_queue_works_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "redis-ca");
    let redis = RedisServer::start_tls(&ca, "sd-agent", "agent-pass").unwrap();
    let target = RedisTarget {
        url: redis.tls_url(redis.tls_password()),
        ca_pem: Some(std::fs::read(ca.ca_file()).unwrap()),
        cluster: false,
    };
    let local = LocalQueue::connect(target, "tls-farm", Duration::from_secs(30))
        .await
        .unwrap();
    let message = QueueMessage {
        job: JobKind::Start,
        build_config: json!({"buildId": 7, "jobId": 8}),
        queued_at: None,
        received_at: None,
    };
    local.push(&message).await.unwrap();
    let leases = local.take(10).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert!(local.done(&leases[0]).await.unwrap());
}

/// The agent's config for a Redis at `url` trusting `ca_file`, as `sd-agent run` loads it.
fn config(dir: &Path, url: &str, ca_file: &Path) -> Config {
    let key = dir.join("agent.pem");
    std::fs::write(&key, sd_testkit::shared_keys("other").private_pem).unwrap();
    let text = AgentConfig::new("tls-farm", "http://127.0.0.1:1", &key)
        .screwdriver_api("https://api.example.com")
        .work_dir(dir)
        .command(["/bin/true"])
        .redis(url)
        .render()
        .replacen(
            "[redis]\n",
            &format!("[redis]\nca_file = \"{}\"\n", ca_file.display()),
            1,
        );
    Config::parse(&text, Path::new("agent.toml"), []).unwrap()
}

async fn refused(config: &Config) -> (String, String, Duration) {
    let started = Instant::now();
    match sd_agent::app::preflight(config).await {
        Err(ConfigError::Invalid { key, reason }) => (key, reason, started.elapsed()),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("the configuration was accepted"),
    }
}

#[tokio::test]
async fn a_wrong_ca_or_password_is_a_configuration_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("right"), "redis-ca");
    let other = TestCa::new(&dir.path().join("other"), "other-ca");
    let redis = RedisServer::start_tls(&ca, "sd-agent", "agent-pass").unwrap();

    let (key, reason, took) = refused(&config(
        dir.path(),
        &redis.tls_url("agent-pass"),
        &other.ca_file(),
    ))
    .await;
    assert_eq!(key, "redis.ca_file", "{reason}");
    assert!(reason.contains("TLS with Redis failed"), "{reason}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let (key, reason, took) = refused(&config(
        dir.path(),
        &redis.tls_url("wrong-pass"),
        &ca.ca_file(),
    ))
    .await;
    assert_eq!(key, "redis.url", "{reason}");
    assert!(reason.contains("refused the credentials"), "{reason}");
    assert!(
        !reason.contains("wrong-pass"),
        "the password is shown: {reason}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
