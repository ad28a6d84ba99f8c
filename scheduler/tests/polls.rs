//! Waiting long-polls at scale: thousands wait on one replica over one doorbell subscription,
//! holding no Redis connection each; a cluster or a token past its cap is answered 429 with
//! `Retry-After`, and other clusters are still served.

mod common;

use std::time::Duration;

use common::{Harness, build, cluster, delivered_build};
use jsonwebtoken::Algorithm;
use reqwest::StatusCode;
use sd_testkit::{Backend, ClusterKeys, RedisServer, eventually, unix_now};
use serde_json::json;

/// Redis connections a scheduler replica holds, however many polls wait: its shared
/// multiplexed connection, the registry-invalidation subscription and the doorbell's.
const REPLICA_REDIS_CONNECTIONS: u64 = 3;

/// Clients connected to `redis`, less this probe's own connection.
fn redis_clients(redis: &RedisServer) -> u64 {
    redis.connected_clients() - 1
}

/// Registers `name` with a fresh ES256 key (quick to make) and returns it.
async fn register(h: &Harness, name: &str) -> ClusterKeys {
    let keys = ClusterKeys::generate(Algorithm::ES256);
    let mut body = cluster(name, "screwdriver", &[]);
    let sign = format!("SD_CLUSTER_{}_SIGN", name.to_uppercase());
    body["signOption"] = json!(sign);
    h.set_env(&sign, r#"{"algorithm":"ES256"}"#);
    h.set_env(body["authKey"].as_str().unwrap(), &keys.public_pem);
    h.register(&body).await;
    keys
}

/// A token distinct from every other (a nonce claim), so per-token caps count each apart.
fn token(keys: &ClusterKeys, cluster: &str, nonce: usize) -> String {
    let now = unix_now();
    keys.sign_as(
        keys.algorithm,
        &json!({"buildCluster": cluster, "iat": now, "exp": now + 120, "nonce": nonce}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_waiting_polls_hold_no_redis_connection_each() {
    const CLUSTERS: usize = 200;
    const PER_CLUSTER: usize = 10;
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.queue.max_polls_per_cluster = PER_CLUSTER;
    })
    .await;
    let mut keys = Vec::new();
    for i in 0..CLUSTERS {
        keys.push(register(&h, &format!("c{i}")).await);
    }
    // One quick poll, so every connection the replica keeps is open before counting.
    h.poll("c0", &keys[0], 0, 1).await;
    assert_eq!(redis_clients(&h.redis), REPLICA_REDIS_CONNECTIONS);

    let mut polls = tokio::task::JoinSet::new();
    for i in 0..CLUSTERS * PER_CLUSTER {
        let cluster = format!("c{}", i % CLUSTERS);
        let token = token(&keys[i % CLUSTERS], &cluster, i);
        let http = h.http.clone();
        let base = h.base.clone();
        polls.spawn(async move {
            let (status, body) = common::call_at(
                &http,
                &base,
                reqwest::Method::GET,
                &format!("/v1/jobs/{cluster}?wait=30&max=1"),
                Some(&token),
                None,
            )
            .await;
            (cluster, status, body)
        });
    }
    let limits = &h.scheduler.state().poll_limits;
    eventually(Duration::from_secs(60), || async {
        (limits.waiting() == CLUSTERS * PER_CLUSTER).then_some(())
    })
    .await
    .expect("every poll waits");

    // The constant: not one Redis connection more than before the polls came.
    assert_eq!(
        redis_clients(&h.redis),
        REPLICA_REDIS_CONNECTIONS,
        "waiting polls cost no Redis connection"
    );

    // Past the cap, a cluster's next poll is turned away at once; another cluster is served.
    let (status, body) = h
        .worker_poll(&h.base, "c7", &token(&keys[7], "c7", 1_000_000), 30, 1)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["message"].as_str().unwrap().contains("long-polls"));

    // A build for one cluster wakes that cluster's polls: one of them takes it.
    let (status, _) = h
        .submit(&build(
            42,
            "org/repo",
            json!({"screwdriver.cd/buildCluster": "c3"}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (cluster, status, body) = polls.join_next().await.unwrap().unwrap();
    assert_eq!((cluster.as_str(), status), ("c3", StatusCode::OK), "{body}");
    assert_eq!(delivered_build(&body["jobs"][0]), 42);
    assert_eq!(redis_clients(&h.redis), REPLICA_REDIS_CONNECTIONS);
    polls.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_cap_is_answered_429_with_retry_after() {
    let h = Harness::start_with(Backend::Sqlite, |c| c.queue.max_polls_per_token = 2).await;
    let alpha = register(&h, "alpha").await;
    let beta = register(&h, "beta").await;
    let stolen = token(&alpha, "alpha", 0);
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (http, base, stolen) = (h.http.clone(), h.base.clone(), stolen.clone());
        waiting.push(tokio::spawn(async move {
            common::call_at(
                &http,
                &base,
                reqwest::Method::GET,
                "/v1/jobs/alpha?wait=30",
                Some(&stolen),
                None,
            )
            .await
        }));
    }
    let limits = &h.scheduler.state().poll_limits;
    eventually(Duration::from_secs(10), || async {
        (limits.waiting() == 2).then_some(())
    })
    .await
    .expect("two polls wait");

    let response = h
        .http
        .get(format!("{}/v1/jobs/alpha?wait=30", h.base))
        .bearer_auth(&stolen)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "5");
    // The same cluster with another token, and another cluster, are still served.
    assert!(h.poll("alpha", &alpha, 0, 1).await.is_empty());
    assert!(h.poll("beta", &beta, 0, 1).await.is_empty());
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"sd_scheduler_polls_refused_total{cap="token"} 1"#),
        "{metrics}"
    );
    for poll in waiting {
        poll.abort();
    }
}
