//! An idle scheduler stays idle however many clusters are registered: its periodic work costs
//! Redis commands per check, not per cluster, and a burst of registry announcements costs a
//! couple of cache reloads, not one reload of the whole table each. Observed by counting (Redis
//! `INFO commandstats`, the registry sync's counters), never by timing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Harness, build, cluster, delivered_build};
use reqwest::StatusCode;
use sd_testkit::{Backend, RedisServer, eventually};
use serde_json::json;

/// Calls per command since the server started (`INFO commandstats`), scripts' own included.
fn command_calls(redis: &RedisServer) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The value of the queue-depth gauge of `cluster`'s `set` in `/metrics`, if exported.
fn depth(metrics: &str, cluster: &str, set: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix("sd_scheduler_queue_depth{")?;
        (rest.contains(&format!("cluster=\"{cluster}\""))
            && rest.contains(&format!("set=\"{set}\"")))
        .then(|| l.rsplit(' ').next()?.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_cost_redis_commands_per_check_not_per_cluster() {
    const CLUSTERS: usize = 200;
    /// Health checks in the window counted.
    const CHECKS: u64 = 10;
    /// Commands an idle replica may send per check, all its background work together: the
    /// check's heartbeats, clock and scan, the reporter's claim now and then. Reading every
    /// cluster's four set sizes would be 800.
    const PER_CHECK: u64 = 10;
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.ha.check_interval = Duration::from_millis(100);
    })
    .await;
    let keys = h.cluster_with_key(&cluster("c0", "screwdriver", &[])).await;
    for i in 1..CLUSTERS {
        h.register(&cluster(&format!("c{i}"), "screwdriver", &[]))
            .await;
    }
    let (status, _) = h
        .submit(&build(
            7,
            "org/repo",
            json!({"screwdriver.cd/buildCluster": "c0"}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // A check reads the heartbeats once (HGETALL): the window is CHECKS of them.
    let before = command_calls(&h.redis);
    let checks_before = before.get("hgetall").copied().unwrap_or(0);
    let after = eventually(Duration::from_secs(30), || async {
        let now = command_calls(&h.redis);
        (now.get("hgetall").copied().unwrap_or(0) >= checks_before + CHECKS).then_some(now)
    })
    .await
    .expect("the health check runs");
    let checks = after["hgetall"] - checks_before;
    let sent: u64 = after
        .iter()
        // INFO is this test's own probe.
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, calls)| calls - before.get(name).copied().unwrap_or(0))
        .sum();
    assert!(
        sent <= checks * PER_CHECK,
        "{sent} Redis commands over {checks} health checks of {CLUSTERS} idle clusters: {after:?}"
    );

    // The gauges still follow the queues: every registered cluster is exported, and a change
    // of one cluster's depths shows at a later check.
    let metrics = eventually(Duration::from_secs(10), || async {
        let text = h.metrics().await;
        (depth(&text, "c0", "ready") == Some(1)).then_some(text)
    })
    .await
    .expect("c0's waiting build counted");
    let last = format!("c{}", CLUSTERS - 1);
    assert_eq!(depth(&metrics, &last, "ready"), Some(0), "{metrics}");
    let jobs = h.poll("c0", &keys, 0, 1).await;
    assert_eq!(delivered_build(&jobs[0]), 7);
    eventually(Duration::from_secs(10), || async {
        let text = h.metrics().await;
        (depth(&text, "c0", "ready") == Some(0) && depth(&text, "c0", "leased") == Some(1))
            .then_some(())
    })
    .await
    .expect("c0's depths follow the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_registry_announcements_costs_a_couple_of_reloads() {
    const ANNOUNCEMENTS: u64 = 500;
    // One database connection, so the test can hold it and keep a reload waiting.
    let h = Harness::start_with(Backend::Sqlite, |c| c.database.max_connections = 1).await;
    let state = h.scheduler.state();
    let sync = &state.registry_sync;
    // Subscribed, and the subscription's own reload done: nothing else is pending.
    let mut redis = h.redis.conn();
    eventually(Duration::from_secs(10), || {
        let subscribers: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("{sd}:registry")
            .query(&mut redis)
            .expect("PUBSUB NUMSUB");
        let ready = subscribers[0].1 == 1 && sync.reloads() >= 1;
        async move { ready.then_some(()) }
    })
    .await
    .expect("the registry subscription is up");
    let before = sync.reloads();

    // Another replica's burst of writes, announced while this replica's reload waits for the
    // database: every announcement is heard without waiting for a reload of its own.
    let held = state.db.pool.acquire().await.expect("the only connection");
    let mut burst = redis::pipe();
    for i in 0..ANNOUNCEMENTS {
        burst
            .publish("{sd}:registry", format!("write {i}"))
            .ignore();
    }
    let () = burst.query(&mut redis).expect("PUBLISH");
    eventually(Duration::from_secs(10), || async {
        (sync.announcements_heard() == ANNOUNCEMENTS).then_some(())
    })
    .await
    .expect("every announcement heard while a reload waits");
    assert_eq!(sync.reloads(), before, "the reload is still waiting");

    drop(held);
    eventually(Duration::from_secs(10), || async {
        (sync.reloads() > before).then_some(())
    })
    .await
    .expect("the cache reloads");
    let reloads = sync.reloads() - before;
    assert!(
        reloads <= 2,
        "{ANNOUNCEMENTS} announcements cost {reloads} reloads: the one waiting and one after"
    );

    // A replica skips its own announcement (it reloaded before making it): after a write here,
    // a marker published behind it is the only announcement heard.
    let heard = sync.announcements_heard();
    h.register(&cluster("after", "screwdriver", &[])).await;
    let () = redis::cmd("PUBLISH")
        .arg("{sd}:registry")
        .arg("marker")
        .query(&mut redis)
        .expect("PUBLISH");
    eventually(Duration::from_secs(10), || async {
        (sync.announcements_heard() > heard).then_some(())
    })
    .await
    .expect("the marker heard");
    assert_eq!(sync.announcements_heard(), heard + 1);
}
