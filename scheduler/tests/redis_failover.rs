//! A Redis failover as ElastiCache performs it: the replica promoted (`REPLICAOF NO ONE`), the
//! primary demoted (`REPLICAOF` the new one), and the endpoint the scheduler's URL names moved
//! to the new primary (a proxy standing in for the DNS name). The scheduler's open connection
//! still reaches the demoted node, which answers `READONLY`; the scheduler must reconnect and go
//! on, with every build delivered once and none lost.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Harness, build_for, cluster};
use sd_testkit::{Backend, ChaosProxy, RedisServer, eventually};

fn redis_cmd(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut server.conn()).expect("redis command")
}

fn role(server: &RedisServer) -> String {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut server.conn())
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    format!("{}/{}", field("role"), field("master_link_status"))
}

#[tokio::test]
async fn a_readonly_failover_is_survived_with_nothing_lost_or_doubled() {
    let primary = RedisServer::start().unwrap();
    let replica = RedisServer::start().unwrap();
    let port = primary.port().to_string();
    redis_cmd(&replica, &["REPLICAOF", "127.0.0.1", &port]);
    let synced = eventually(Duration::from_secs(10), || async {
        (role(&replica) == "slave/up").then_some(())
    })
    .await;
    assert!(
        synced.is_some(),
        "the replica did not sync: {}",
        role(&replica)
    );
    let endpoint = ChaosProxy::start(([127, 0, 0, 1], primary.port()).into())
        .await
        .unwrap();
    let url = endpoint.redis_url();
    let h = Harness::start_with_redis(Backend::Sqlite, primary, |c| c.redis.url = url).await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let submit = |id: u64| h.submit_until_accepted(build_for("east", id), Duration::from_secs(15));
    let mut delivered: BTreeMap<u64, u32> = BTreeMap::new();

    for id in 1..=5 {
        submit(id).await;
    }
    h.take("east", &keys, &mut delivered, 3, Duration::from_secs(20))
        .await;

    // The failover, planned as ElastiCache's: the replica has every write first.
    let primary = &h.redis;
    redis_cmd(primary, &["WAIT", "1", "2000"]);
    redis_cmd(&replica, &["REPLICAOF", "NO", "ONE"]);
    let new_port = replica.port().to_string();
    redis_cmd(primary, &["REPLICAOF", "127.0.0.1", &new_port]);
    endpoint.point_at(([127, 0, 0, 1], replica.port()).into());
    assert!(role(primary).starts_with("slave/"), "{}", role(primary));

    for id in 6..=10 {
        submit(id).await;
    }
    h.take("east", &keys, &mut delivered, 10, Duration::from_secs(20))
        .await;

    let want: BTreeMap<u64, u32> = (1..=10).map(|id| (id, 1)).collect();
    assert_eq!(delivered, want, "every build delivered exactly once");
    let keys_on_new: i64 = redis::cmd("DBSIZE").query(&mut replica.conn()).unwrap();
    assert!(
        keys_on_new > 0,
        "the scheduler writes to the promoted replica"
    );
    assert!(
        endpoint.stats().accepted >= 2,
        "the scheduler reconnected through the endpoint"
    );
}
