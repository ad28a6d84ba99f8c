//! Crash takeover: the local jobs an agent took and did not settle are taken over by another
//! agent sharing the local Redis as soon as the first stops beating — seconds, not the whole
//! launch lease. The dead one's late settle is refused (its fencing token is stale), and what
//! it settled before it died is not taken again.

use std::time::{Duration, Instant};

use sd_agent::local::LocalQueue;
use sd_protocol::{JobKind, QueueMessage};
use sd_testkit::{RedisServer, eventually};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "c1";
/// The launch lease: what a takeover would wait for without the heartbeats.
const LEASE: Duration = Duration::from_secs(120);
const LAPSE: Duration = Duration::from_secs(1);

fn start(id: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Start,
        build_config: json!({"buildId": id, "jobId": 100 + id}),
        queued_at: None,
        received_at: None,
    }
}

fn beating(local: &LocalQueue) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (local, stop) = (local.clone(), stop.clone());
        async move { local.keep_alive(LAPSE, stop).await }
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agents_jobs_are_taken_over_in_seconds_and_its_late_settle_is_stale() {
    let redis = RedisServer::start().unwrap();
    let a = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
        .await
        .unwrap();
    let b = LocalQueue::connect(&redis.url(), CLUSTER, LEASE)
        .await
        .unwrap();
    assert_ne!(a.instance(), b.instance());
    for id in 1..=3 {
        a.push(&start(id)).await.unwrap();
    }
    let (a_stop, a_task) = beating(&a);
    let (b_stop, b_task) = beating(&b);
    let taken = a.take(10).await.unwrap();
    assert_eq!(taken.len(), 3);

    // While A beats, its jobs stay its own.
    tokio::time::sleep(LAPSE * 3).await;
    assert!(
        b.take(10).await.unwrap().is_empty(),
        "taken from a live agent"
    );

    // A settles one job, then stops beating, as a kill -9 leaves it.
    assert!(a.done(&taken[0]).await.unwrap());
    a_stop.cancel();
    a_task.await.unwrap();
    let silent = Instant::now();
    let again = eventually(Duration::from_secs(30), || async {
        let leases = b.take(10).await.unwrap();
        (!leases.is_empty()).then_some(leases)
    })
    .await
    .expect("B takes A's jobs over long before the launch lease would lapse");
    let mut ids: Vec<_> = again.iter().map(|l| l.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["2", "3"], "what A settled stays settled");
    println!("taken over {:?} after the last beat", silent.elapsed());

    // A's late settle is refused; B's is the one that counts.
    assert!(!a.done(&taken[1]).await.unwrap(), "a dead holder settled");
    for lease in &again {
        assert!(b.done(lease).await.unwrap());
    }
    // Settled leases leave the holders' record at the next beat: it does not grow per build.
    let holders = b.queues().keys().cluster(CLUSTER).holders;
    let emptied = eventually(Duration::from_secs(10), || async {
        let mut conn = b.queues().connection();
        let held: u64 = redis::cmd("HLEN")
            .arg(&holders)
            .query_async(&mut conn)
            .await
            .unwrap();
        (held == 0).then_some(())
    })
    .await;
    assert!(emptied.is_some(), "settled jobs stay in {holders}");
    b_stop.cancel();
    b_task.await.unwrap();
}
