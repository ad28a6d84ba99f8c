//! The master queues on a Redis Cluster (ElastiCache with cluster mode enabled): three nodes,
//! the scheduler given one of them and finding the rest. The slot holding every queue key is
//! resharded to another node while builds come and go (`ASK` and `TRYAGAIN` during the move,
//! `MOVED` after), then a node is killed until the others declare the cluster down
//! (`CLUSTERDOWN`) and started again. Every build must be delivered exactly once, none lost.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Harness, build_for, cluster};
use sd_testkit::{Backend, RedisCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_survive_a_resharded_slot_and_a_cluster_down() {
    let mut redis = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
        .expect("a 3-node Redis Cluster");
    let slot = redis.slot("{sd}").unwrap();
    let home = redis.owner(slot).unwrap();
    // The scheduler is given a node that does not hold its keys: it must follow MOVED from
    // the first command on.
    let seed = (home + 1) % redis.len();
    let url = redis.url(seed);
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.redis.url = url;
        c.redis.cluster = true;
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let submit = |id: u64| h.submit_until_accepted(build_for("east", id), Duration::from_secs(20));
    let mut delivered: BTreeMap<u64, u32> = BTreeMap::new();
    let within = Duration::from_secs(30);

    for id in 1..=10 {
        submit(id).await;
    }
    // The scan behind the depths of every queue goes to the node holding the keys.
    let depths = h.scheduler.state().queues.depths_all().await.unwrap();
    assert_eq!(depths.get("east"), Some(&[10, 0, 0, 0]), "{depths:?}");
    h.take("east", &keys, &mut delivered, 4, within).await;
    assert!(
        redis.keys_on(home).unwrap() > 0,
        "the queue keys are on node {home}"
    );
    assert_eq!(
        redis.keys_on(seed).unwrap(),
        0,
        "nothing is kept on the seed node"
    );

    // Reshard the slot to the third node, key by key, while builds are submitted and taken.
    let target = (home + 2) % redis.len();
    let resharded = {
        let redis = &redis;
        let submitting = async {
            for id in 11..=20 {
                submit(id).await;
            }
        };
        let moving = tokio::task::block_in_place(|| {
            std::thread::scope(|s| {
                let mover = s.spawn(|| redis.move_slot(slot, target, Duration::from_millis(30)));
                tokio::runtime::Handle::current().block_on(submitting);
                mover.join().unwrap()
            })
        });
        moving.expect("the slot moves")
    };
    assert!(resharded > 0, "keys moved with the slot");
    assert_eq!(
        redis.owner(slot).unwrap(),
        target,
        "the slot is on its new node"
    );
    assert_eq!(
        redis.keys_on(home).unwrap(),
        0,
        "no key left on the old node"
    );
    h.take("east", &keys, &mut delivered, 12, within).await;
    let errors = redis.errors().unwrap();
    let seen = |kind: &str| errors.get(kind).copied().unwrap_or(0);
    assert!(
        seen("MOVED") > 0,
        "the scheduler was redirected: {errors:?}"
    );
    assert!(
        seen("ASK") + seen("TRYAGAIN") > 0,
        "the scheduler met the slot mid-move: {errors:?}"
    );

    // A node the queues do not live on dies: the others mark the cluster down and answer
    // CLUSTERDOWN for every slot until it is back.
    let other = home;
    tokio::task::block_in_place(|| redis.kill(other)).expect("the cluster goes down");
    let (status, answer) = h.submit(&build_for("east", 21)).await;
    assert!(
        status.is_server_error(),
        "accepted while the cluster is down: {status} {answer}"
    );
    let errors = redis.errors().unwrap();
    assert!(
        errors.get("CLUSTERDOWN").copied().unwrap_or(0) > 0,
        "the scheduler was answered CLUSTERDOWN: {errors:?}"
    );
    tokio::task::block_in_place(|| redis.restart(other)).expect("the cluster is ok again");
    for id in 21..=30 {
        submit(id).await;
    }
    h.take("east", &keys, &mut delivered, 30, within).await;

    let want: BTreeMap<u64, u32> = (1..=30).map(|id| (id, 1)).collect();
    assert_eq!(delivered, want, "every build delivered exactly once");
}
