//! `sd_queue::risky_settings`, which the scheduler and the agent log at start and
//! `sd-agent check` reports: a server that may evict keys or keeps no append-only file is
//! named for each risk, and one set up as the docs say is not.

use sd_queue::{Connection, risky_settings};
use sd_testkit::RedisServer;

async fn settings(redis: &RedisServer, policy: &str, aof: &str) -> Vec<&'static str> {
    let mut admin = redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg(policy)
        .arg("appendonly")
        .arg(aof)
        .query(&mut admin)
        .unwrap();
    let mut conn = Connection::lazy(redis::Client::open(redis.url()).unwrap()).unwrap();
    risky_settings(&mut conn).await
}

#[tokio::test]
async fn evictions_and_no_persistence_are_each_named() {
    let redis = RedisServer::start().unwrap();
    let both = settings(&redis, "allkeys-lru", "no").await;
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(
        both[0].starts_with("maxmemory-policy is not noeviction"),
        "{both:?}"
    );
    assert!(both[1].starts_with("appendonly is off"), "{both:?}");
    assert!(settings(&redis, "noeviction", "yes").await.is_empty());
}
