//! The doorbell's relay against a real `redis-server`: an enqueue wakes the waiters of its
//! cluster over one subscription, and a subscription lost with Redis comes back by itself and
//! wakes every waiter (rings sent meanwhile are gone).

use std::time::Duration;

use sd_protocol::{JobKind, QueueMessage};
use sd_queue::{Doorbell, Enqueued, Holds, Queues};
use sd_testkit::RedisServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(300);

fn message(build: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Start,
        build_config: json!({ "buildId": build, "jobId": build }),
        queued_at: None,
        received_at: None,
    }
}

async fn put(q: &Queues, cluster: &str, build: u64) {
    let got = q
        .enqueue(
            cluster,
            build,
            build,
            &message(build),
            &Holds::default(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(got, Enqueued::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_wakes_its_clusters_waiters_and_a_lost_subscription_comes_back() {
    let mut redis = RedisServer::start().unwrap();
    let q = Queues::connect(&redis.url(), "sd").unwrap();
    let doorbell = Doorbell::default();
    let mut a = doorbell.listen("a");
    let mut b = doorbell.listen("b");
    let stop = CancellationToken::new();
    let relay = tokio::spawn({
        let (q, doorbell, stop) = (q.clone(), doorbell.clone(), stop.clone());
        async move { q.relay_doorbell(&doorbell, stop.cancelled_owned()).await }
    });
    assert!(a.rung(LONG).await, "subscribing wakes every waiter");
    assert!(b.rung(LONG).await);

    a.arm();
    b.arm();
    put(&q, "a", 1).await;
    assert!(a.rung(LONG).await, "a's enqueue rings a");
    assert!(!b.rung(SHORT).await, "and not b");

    // A thousand waiters of a hundred clusters share the one subscription.
    let before = redis.connected_clients();
    let many: Vec<_> = (0..1000)
        .map(|i| doorbell.listen(&format!("c{}", i % 100)))
        .collect();
    assert_eq!(doorbell.waiting_clusters(), 102);
    assert_eq!(
        redis.connected_clients(),
        before,
        "waiters cost no connection"
    );
    drop(many);
    assert_eq!(doorbell.waiting_clusters(), 2);

    // Redis goes away and comes back: the relay subscribes again and wakes everyone, since
    // what rang meanwhile was lost.
    redis.restart().unwrap();
    a.arm();
    b.arm();
    assert!(a.rung(LONG).await, "re-subscribing wakes every waiter");
    assert!(b.rung(LONG).await);
    // The queue's own connection may need a call to notice the restart; the bell must not.
    let mut heard = false;
    for build in 2..40 {
        a.arm();
        if q.enqueue("a", build, build, &message(build), &Holds::default(), false)
            .await
            .is_ok()
            && a.rung(SHORT).await
        {
            heard = true;
            break;
        }
    }
    assert!(heard, "rings are heard again after the reconnection");

    stop.cancel();
    relay.await.unwrap();
}
