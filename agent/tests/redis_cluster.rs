//! The agent's local queue on a Redis Cluster (ElastiCache with cluster mode enabled,
//! `redis.cluster = true`): found from a node that does not hold its keys, kept through its slot
//! being resharded and through the cluster being down for a while; and `sd-agent run`'s preflight
//! refusing a `redis.cluster` that does not match the server, naming the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sd_agent::config::{Config, ConfigError};
use sd_agent::local::{LocalQueue, TAG};
use sd_protocol::{JobKind, QueueMessage};
use sd_testkit::{AgentConfig, RedisCluster, RedisServer};
use serde_json::json;

/// The agent's config for the Redis at `url`, `cluster` saying whether it runs in cluster mode.
fn config(dir: &Path, url: &str, cluster: bool) -> Config {
    let key = dir.join("agent.pem");
    std::fs::write(&key, sd_testkit::shared_keys("other").private_pem).unwrap();
    let text = AgentConfig::new("cluster-farm", "http://127.0.0.1:1", &key)
        .screwdriver_api("https://api.example.com")
        .work_dir(dir)
        .command(["/bin/true"])
        .redis(url)
        .render()
        .replacen("[redis]\n", &format!("[redis]\ncluster = {cluster}\n"), 1);
    Config::parse(&text, Path::new("agent.toml"), []).unwrap()
}

fn message(build_id: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Start,
        build_config: json!({"buildId": build_id, "jobId": build_id}),
        queued_at: None,
        received_at: None,
    }
}

/// Takes and finishes local jobs until `want` builds were done, counting each.
async fn drain(local: &LocalQueue, done: &mut BTreeMap<u64, u32>, want: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.len() < want {
        assert!(std::time::Instant::now() < deadline, "only {done:?} done");
        let Ok(leases) = local.take(3).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        for lease in leases {
            let build: u64 = lease.id.parse().unwrap();
            if local.done(&lease).await.unwrap_or(false) {
                *done.entry(build).or_default() += 1;
            }
        }
    }
}

/// Pushes until Redis takes it (the fetcher acknowledges the scheduler only after a push).
async fn push(local: &LocalQueue, build_id: u64) {
    let pushed = sd_testkit::eventually(Duration::from_secs(20), || async {
        local.push(&message(build_id)).await.ok()
    })
    .await;
    assert!(pushed.is_some(), "build {build_id} was never pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_queue_survives_a_resharded_slot_and_a_cluster_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
        .unwrap();
    let slot = redis.slot(&format!("{{{TAG}}}")).unwrap();
    let home = redis.owner(slot).unwrap();
    let seed = (home + 1) % redis.len();
    let config = config(dir.path(), &redis.url(seed), true);
    sd_agent::app::preflight(&config)
        .await
        .expect("the preflight accepts a cluster with redis.cluster = true");
    let local = LocalQueue::connect(
        config.redis.target().unwrap(),
        "cluster-farm",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let mut done = BTreeMap::new();
    for id in 1..=5 {
        push(&local, id).await;
    }
    drain(&local, &mut done, 2).await;

    let target = (home + 2) % redis.len();
    tokio::task::block_in_place(|| redis.move_slot(slot, target, Duration::from_millis(10)))
        .unwrap();
    for id in 6..=10 {
        push(&local, id).await;
    }
    drain(&local, &mut done, 7).await;
    let errors = redis.errors().unwrap();
    assert!(
        errors.contains_key("MOVED") || errors.contains_key("ASK"),
        "the agent was redirected: {errors:?}"
    );

    tokio::task::block_in_place(|| redis.kill(home)).unwrap();
    assert!(
        local.push(&message(11)).await.is_err(),
        "a push while the cluster is down must fail (the scheduler is then not acknowledged)"
    );
    tokio::task::block_in_place(|| redis.restart(home)).unwrap();
    for id in 11..=15 {
        push(&local, id).await;
    }
    drain(&local, &mut done, 15).await;

    let want: BTreeMap<u64, u32> = (1..=15).map(|id| (id, 1)).collect();
    assert_eq!(done, want, "every local job done exactly once");
    let errors = redis.errors().unwrap();
    assert!(
        errors.contains_key("CLUSTERDOWN"),
        "the agent was answered CLUSTERDOWN: {errors:?}"
    );
}

#[tokio::test]
async fn a_redis_cluster_setting_that_does_not_match_the_server_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let single = RedisServer::start().unwrap();
    let in_cluster_mode = RedisServer::start_with_args(&["--cluster-enabled", "yes"]).unwrap();
    for (url, cluster, says) in [
        (single.url(), true, "set redis.cluster = false"),
        (in_cluster_mode.url(), false, "set redis.cluster = true"),
    ] {
        match sd_agent::app::preflight(&config(dir.path(), &url, cluster)).await {
            Err(ConfigError::Invalid { key, reason }) => {
                assert_eq!(key, "redis.cluster", "{reason}");
                assert!(reason.contains(says), "{reason}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("redis.cluster = {cluster} was accepted for {url}"),
        }
    }
}
