//! The master queues over `rediss://` with an ACL user and password, as ElastiCache serves them
//! with in-transit encryption and AUTH: a local `redis-server` with `--tls-port`, its
//! certificate from a CA made here. A build goes in and out through TLS; a CA that did not
//! issue the server's certificate, or a wrong password, stops the start at once with the
//! setting to fix.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, build, cluster, delivered_build};
use sd_scheduler::{Scheduler, StartError};
use sd_testkit::{Backend, RedisServer, TestCa};
use serde_json::json;

#[tokio::test]
async fn master_queues_work_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "redis-ca");
    let redis = RedisServer::start_tls(&ca, "sd-scheduler", "s3cret-pass").unwrap();
    let url = redis.tls_url(redis.tls_password());
    let ca_file = ca.ca_file();
    let h = Harness::start_with_redis(Backend::Sqlite, redis, |c| {
        c.redis.url = url;
        c.redis.ca_file = Some(ca_file);
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("secure", "screwdriver", &[]))
        .await;
    let (status, body) = h
        .submit(&build(
            1,
            "acme/app",
            json!({"screwdriver.cd/buildCluster": "secure"}),
        ))
        .await;
    assert_eq!(status, 201, "{body}");
    let jobs = h.poll("secure", &keys, 1, 1).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(delivered_build(&jobs[0]), 1);
}

/// Starts a scheduler on `redis_url`, trusting `ca_file`; the error, and how long it took.
async fn refused(redis_url: String, ca_file: std::path::PathBuf) -> (StartError, Duration) {
    let h = Harness::start(Backend::Sqlite).await;
    let mut config = h.config.clone();
    config.redis.url = redis_url;
    config.redis.ca_file = Some(ca_file);
    let started = Instant::now();
    let result = Scheduler::start_with_env(config, std::sync::Arc::new(|_| None)).await;
    let Err(e) = result else {
        panic!("the scheduler started")
    };
    (e, started.elapsed())
}

#[tokio::test]
async fn a_wrong_ca_or_password_stops_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("right"), "redis-ca");
    let other = TestCa::new(&dir.path().join("other"), "other-ca");
    let redis = RedisServer::start_tls(&ca, "sd-scheduler", "s3cret-pass").unwrap();

    let (e, took) = refused(redis.tls_url(redis.tls_password()), other.ca_file()).await;
    let message = e.to_string();
    assert!(
        message.starts_with("redis.url / redis.ca_file: TLS with Redis failed")
            && message.contains("certificate"),
        "{message}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let (e, took) = refused(redis.tls_url("wrong-pass"), ca.ca_file()).await;
    let message = e.to_string();
    assert!(
        message.starts_with("redis.url (user and password): Redis refused the credentials"),
        "{message}"
    );
    assert!(
        !message.contains("wrong-pass"),
        "the password is shown: {message}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// A Redis in cluster mode needs the cluster client (which follows MOVED), a single server the
/// plain one: `redis.cluster` must say which, or the scheduler refuses to start, saying how to
/// set it.
#[tokio::test]
async fn a_redis_of_the_other_mode_stops_the_start_saying_why() {
    let cluster = RedisServer::start_with_args(&["--cluster-enabled", "yes"]).unwrap();
    let h = Harness::start(Backend::Sqlite).await;
    let mut config = h.config.clone();
    config.redis.url = format!("redis://127.0.0.1:{}", cluster.port());
    let Err(e) = Scheduler::start_with_env(config.clone(), std::sync::Arc::new(|_| None)).await
    else {
        panic!("the scheduler started on a Redis in cluster mode without redis.cluster")
    };
    let message = e.to_string();
    assert!(
        message.starts_with("redis.cluster: Redis runs in cluster mode")
            && message.contains("set redis.cluster = true"),
        "{message}"
    );

    config.redis.url = h.redis.url();
    config.redis.cluster = true;
    let Err(e) = Scheduler::start_with_env(config, std::sync::Arc::new(|_| None)).await else {
        panic!("the scheduler started in cluster mode on a single Redis")
    };
    let message = e.to_string();
    assert!(
        message.starts_with(
            "redis.cluster: redis.cluster is true but this Redis does not run in cluster mode"
        ) && message.contains("set redis.cluster = false"),
        "{message}"
    );
}
