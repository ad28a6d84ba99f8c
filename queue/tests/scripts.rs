//! The queue scripts (`queue/src/*.lua`) against a real `redis-server` per test, through the
//! crate's typed wrappers: what each script does, so a change of behaviour fails here rather than
//! somewhere behind the scheduler's HTTP API or the agent's local queue.
//!
//! Every script takes its time from Redis (`TIME`), so the waits are short: leases, back-offs
//! and re-checks last tens of milliseconds, and [`pass`] waits until Redis's clock has moved past
//! them. Raw reads (`HGET`, `ZSCORE`) use `Queues::connection` and the key names
//! `Queues::keys` gives.

use std::time::Duration;

use sd_protocol::{AgentReport, JobKind, QueueMessage};
use sd_queue::{
    Cancelled, Enqueued, Fetched, Holds, Lease, LeaseOp, LeaseOutcome, Moved, QueueSettings,
    Queues, parse_delivery_id,
};
use sd_testkit::RedisServer;
use serde_json::{Value, json};

/// The master queues' tag and the agent's local queue's tag.
const TAGS: [&str; 2] = ["sd", "sd-agent"];

// === Harness ===

/// A redis-server of the test's own and the queues under `tag` on it.
fn start(tag: &str) -> (RedisServer, Queues) {
    let redis = RedisServer::start().expect("start redis-server");
    let queues = Queues::connect(&redis.url(), tag).expect("connect");
    (redis, queues)
}

/// Settings under which nothing lapses or comes due during a test unless it says so.
fn settings() -> QueueSettings {
    QueueSettings {
        visibility_timeout: Duration::from_secs(30),
        max_attempts: 5,
        blocked_recheck: Duration::from_secs(30),
        nack_backoff: Duration::from_secs(10),
        nack_backoff_max: Duration::from_secs(60),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn message(build: u64, job: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Start,
        build_config: json!({ "buildId": build, "jobId": job }),
        queued_at: None,
        received_at: None,
    }
}

fn stop_message(build: u64) -> QueueMessage {
    QueueMessage {
        job: JobKind::Stop,
        build_config: json!({ "buildId": build }),
        queued_at: None,
        received_at: None,
    }
}

fn blocked_by(jobs: &[u64]) -> Holds {
    Holds {
        blockers: jobs.to_vec(),
        ..Holds::default()
    }
}

fn collapsing(jobs: &[u64]) -> Holds {
    Holds {
        blockers: jobs.to_vec(),
        collapse: true,
        ..Holds::default()
    }
}

/// Enqueues a start message for `build` of `job`; it must be queued now.
async fn put(q: &Queues, cluster: &str, build: u64, job: u64, holds: &Holds) {
    let got = q
        .enqueue(cluster, build, job, &message(build, job), holds, false)
        .await
        .unwrap();
    assert_eq!(got, Enqueued::Queued, "enqueue {build} on {cluster}");
}

/// Enqueues a start message without holds and says what happened.
async fn enqueue(
    q: &Queues,
    cluster: &str,
    build: u64,
    job: u64,
    message: &QueueMessage,
    force: bool,
) -> Enqueued {
    q.enqueue(cluster, build, job, message, &Holds::default(), force)
        .await
        .unwrap()
}

async fn fetch(q: &Queues, cluster: &str, max: u32, settings: &QueueSettings) -> Fetched {
    q.fetch(cluster, max, settings).await.unwrap()
}

/// Fetches and expects exactly one lease, of `id`.
async fn lease_one(q: &Queues, cluster: &str, id: &str, settings: &QueueSettings) -> Lease {
    let fetched = fetch(q, cluster, 10, settings).await;
    assert_eq!(ids(&fetched), [id], "leases of {fetched:?}");
    fetched.leases.into_iter().next().unwrap()
}

async fn settle(q: &Queues, op: LeaseOp, cluster: &str, lease: &Lease) -> LeaseOutcome {
    settle_with(q, op, cluster, lease, &settings()).await
}

async fn settle_with(
    q: &Queues,
    op: LeaseOp,
    cluster: &str,
    lease: &Lease,
    settings: &QueueSettings,
) -> LeaseOutcome {
    q.settle_lease(op, cluster, &lease.id, &lease.token, settings)
        .await
        .unwrap()
}

fn ids(fetched: &Fetched) -> Vec<&str> {
    fetched.leases.iter().map(|l| l.id.as_str()).collect()
}

fn decoded(raw: &str) -> QueueMessage {
    serde_json::from_str(raw).expect("a queue message")
}

/// Waits until Redis's clock is more than `d` past what it says now.
async fn pass(q: &Queues, d: Duration) {
    let target = q.now_ms().await.unwrap() + i64::try_from(d.as_millis()).unwrap();
    tokio::time::sleep(d).await;
    while q.now_ms().await.unwrap() <= target {
        tokio::time::sleep(ms(1)).await;
    }
}

/// Waits for Redis's clock to reach the next millisecond: enqueues on either side of it get
/// different scores, so their order is their enqueue order and not a tie broken by id.
async fn next_ms(q: &Queues) {
    pass(q, Duration::ZERO).await;
}

async fn hget(q: &Queues, key: &str, field: &str) -> Option<String> {
    let mut conn = q.connection();
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn zscore(q: &Queues, key: &str, member: &str) -> Option<f64> {
    let mut conn = q.connection();
    redis::cmd("ZSCORE")
        .arg(key)
        .arg(member)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The build `{tag}:running` says runs for `job`.
async fn running(q: &Queues, job: u64) -> Option<String> {
    hget(q, &q.keys().running, &job.to_string()).await
}

/// The `cluster\tid` entries `{tag}:blocked` keeps behind `job`.
async fn blocked_behind(q: &Queues, job: u64) -> Vec<String> {
    match hget(q, &q.keys().blocked, &job.to_string()).await {
        Some(raw) => serde_json::from_str(&raw).unwrap(),
        None => Vec::new(),
    }
}

async fn meta(q: &Queues, cluster: &str, id: &str) -> Value {
    let raw = hget(q, &q.keys().cluster(cluster).meta, id)
        .await
        .expect("meta");
    serde_json::from_str(&raw).unwrap()
}

async fn now(q: &Queues) -> i64 {
    q.now_ms().await.unwrap()
}

/// Asserts that `id`'s score in the sorted set `key` is `d` ms after the Redis time of a script
/// that ran between `before` and `after` (Redis ms, read around the call): exact however slowly
/// the test runs.
async fn assert_due(q: &Queues, key: &str, id: &str, (before, after): (i64, i64), d: i64) {
    let due = zscore(q, key, id).await.expect("a score") as i64;
    assert!(
        before + d <= due && due <= after + d,
        "{key} {id}: due at {due}, want {d} ms after a time in {before}..={after}"
    );
}

/// What the doorbell channel carries, heard on a subscription of the test's own.
struct Rings {
    _sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

/// Starts hearing the doorbell of `q`.
async fn rings(redis: &RedisServer, q: &Queues) -> Rings {
    let client = redis::Client::open(redis.url()).unwrap();
    let (mut sink, stream) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe(&q.keys().bell).await.unwrap();
    Rings {
        _sink: sink,
        stream,
    }
}

impl Rings {
    /// The clusters rung since the last call, in order (until 200 ms pass without a ring).
    async fn heard(&mut self) -> Vec<String> {
        use futures::StreamExt;
        let mut clusters = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout(ms(200), self.stream.next()).await {
            clusters.push(message.get_payload::<String>().unwrap());
        }
        clusters
    }
}

// === enqueue ===

#[tokio::test]
async fn enqueue_is_idempotent_and_keeps_a_build_on_one_queue() {
    let (redis, q) = start("sd");
    let mut bell = rings(&redis, &q).await;
    put(&q, "a", 7, 1, &Holds::default()).await;
    assert_eq!(bell.heard().await, ["a"], "enqueue rings the doorbell");

    let other = message(7, 99);
    assert_eq!(
        enqueue(&q, "a", 7, 1, &other, false).await,
        Enqueued::AlreadyQueued
    );
    assert_eq!(
        enqueue(&q, "a", 7, 1, &other, true).await,
        Enqueued::AlreadyQueued
    );
    assert_eq!(
        enqueue(&q, "b", 7, 1, &other, false).await,
        Enqueued::QueuedElsewhere("a".into())
    );
    assert_eq!(q.ready("a").await.unwrap(), ["7"]);
    assert!(q.ready("b").await.unwrap().is_empty());
    assert_eq!(q.message("a", "7").await.unwrap(), Some(message(7, 1)));
    assert_eq!(q.message("b", "7").await.unwrap(), None);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));

    // Leased, it is still this cluster's.
    lease_one(&q, "a", "7", &settings()).await;
    assert_eq!(
        enqueue(&q, "a", 7, 1, &other, false).await,
        Enqueued::AlreadyQueued
    );
    assert_eq!(
        enqueue(&q, "b", 7, 1, &other, false).await,
        Enqueued::QueuedElsewhere("a".into())
    );
    assert!(q.ready("a").await.unwrap().is_empty());
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);
    assert!(q.ready("b").await.unwrap().is_empty());
}

#[tokio::test]
async fn enqueue_refuses_a_delivered_build_unless_forced_and_then_pins_it() {
    let (_redis, q) = start("sd");
    put(&q, "a", 7, 1, &Holds::default()).await;
    let lease = lease_one(&q, "a", "7", &settings()).await;
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );

    for cluster in ["a", "b"] {
        assert_eq!(
            enqueue(&q, cluster, 7, 1, &message(7, 1), false).await,
            Enqueued::AlreadyDelivered,
            "on {cluster}"
        );
    }
    assert!(q.ready("a").await.unwrap().is_empty());
    assert!(q.ready("b").await.unwrap().is_empty());

    // The reconciler's forced re-queue: a fresh message, pinned to the cluster.
    assert_eq!(
        enqueue(&q, "a", 7, 1, &message(7, 1), true).await,
        Enqueued::Queued
    );
    assert_eq!(meta(&q, "a", "7").await["pinned"], json!(true));
    let again = lease_one(&q, "a", "7", &settings()).await;
    assert_eq!(again.attempt, 1, "a forced enqueue starts counting afresh");
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &again).await,
        LeaseOutcome::Done
    );
    assert_eq!(
        enqueue(&q, "a", 7, 1, &message(7, 1), false).await,
        Enqueued::AlreadyDelivered
    );
}

#[tokio::test]
async fn stops_are_queued_once_per_build_and_never_hold_a_job() {
    let (_redis, q) = start("sd");
    q.enqueue_stop("a", 5, &stop_message(5)).await.unwrap();
    q.enqueue_stop("a", 5, &stop_message(5)).await.unwrap();
    assert_eq!(q.ready("a").await.unwrap(), ["stop:5"]);
    let err = q.enqueue_stop("b", 5, &stop_message(5)).await.unwrap_err();
    assert!(err.to_string().contains("already queued on a"), "{err}");
    assert!(q.ready("b").await.unwrap().is_empty());

    let lease = lease_one(&q, "a", "stop:5", &settings()).await;
    assert_eq!(decoded(&lease.message), stop_message(5));
    let delivery = lease.delivery_id();
    assert_eq!(
        parse_delivery_id(&delivery),
        Some(("stop:5", lease.token.as_str()))
    );
    let mut conn = q.connection();
    let jobs: i64 = redis::cmd("HLEN")
        .arg(&q.keys().running)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "a stop marks no job running");

    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    q.enqueue_stop("a", 5, &stop_message(5)).await.unwrap();
    assert!(
        q.ready("a").await.unwrap().is_empty(),
        "a delivered stop is not queued again"
    );
}

// === fetch ===

#[tokio::test]
async fn fetch_leases_oldest_first_up_to_max_with_fresh_tokens() {
    let (_redis, q) = start("sd");
    let empty = fetch(&q, "a", 10, &settings()).await;
    assert!(empty.leases.is_empty() && empty.next_due_in.is_none());

    // Ids chosen so that string order (1000, 200, 30) is not enqueue order.
    for (build, job) in [(30, 3), (200, 2), (1000, 1)] {
        put(&q, "a", build, job, &Holds::default()).await;
        next_ms(&q).await;
    }
    assert_eq!(q.ready("a").await.unwrap(), ["30", "200", "1000"]);

    let first = fetch(&q, "a", 2, &settings()).await;
    assert_eq!(ids(&first), ["30", "200"]);
    assert_eq!(q.ready("a").await.unwrap(), ["1000"]);
    let rest = fetch(&q, "a", 2, &settings()).await;
    assert_eq!(ids(&rest), ["1000"]);
    assert!(fetch(&q, "a", 2, &settings()).await.leases.is_empty());

    let leases: Vec<&Lease> = first.leases.iter().chain(&rest.leases).collect();
    let tokens: Vec<u64> = leases.iter().map(|l| l.token.parse().unwrap()).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase: {tokens:?}"
    );
    for (lease, (build, job)) in leases.iter().zip([(30, 3), (200, 2), (1000, 1)]) {
        assert_eq!(lease.attempt, 1);
        assert_eq!(decoded(&lease.message), message(build, job));
        assert_eq!(running(&q, job).await, Some(build.to_string()));
        assert_eq!(meta(&q, "a", &lease.id).await["token"], json!(lease.token));
    }
    let mut leased = q.leased("a").await.unwrap();
    leased.sort();
    assert_eq!(leased, ["1000", "200", "30"]);
    assert_eq!(q.depths("a").await.unwrap(), [0, 3, 0, 0]);
    let due = rest.next_due_in.expect("a lease deadline");
    assert!(due <= ms(30_000) && due > ms(25_000), "{due:?}");
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_with_the_next_attempt_and_the_old_token_is_stale() {
    let (_redis, q) = start("sd");
    let short = QueueSettings {
        visibility_timeout: ms(30),
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    let before = now(&q).await;
    let old = lease_one(&q, "a", "7", &short).await;
    let leased = &q.keys().cluster("a").leased;
    assert_due(&q, leased, "7", (before, now(&q).await), 30).await;
    assert_eq!(old.attempt, 1);

    pass(&q, ms(30)).await;
    let new = lease_one(&q, "a", "7", &settings()).await;
    assert_eq!(new.attempt, 2);
    assert!(new.token.parse::<u64>().unwrap() > old.token.parse::<u64>().unwrap());
    assert_eq!(decoded(&new.message), message(7, 1));

    // The first holder can no longer touch the lease.
    for op in [LeaseOp::Ack, LeaseOp::Renew, LeaseOp::Nack] {
        assert_eq!(
            settle(&q, op, "a", &old).await,
            LeaseOutcome::Stale,
            "{op:?}"
        );
    }
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &new).await,
        LeaseOutcome::Done
    );
}

#[tokio::test]
async fn a_redelivered_build_is_not_blocked_by_its_own_job() {
    let (_redis, q) = start("sd");
    let short = QueueSettings {
        visibility_timeout: ms(20),
        ..settings()
    };
    put(&q, "a", 7, 1, &blocked_by(&[1])).await;
    lease_one(&q, "a", "7", &short).await;
    pass(&q, ms(20)).await;
    // {sd}:running still names build 7 for job 1: that is this build, not a blocker.
    let again = fetch(&q, "a", 10, &settings()).await;
    assert_eq!(ids(&again), ["7"]);
    assert_eq!(again.leases[0].attempt, 2);
    assert!(again.blocked.is_empty());
}

#[tokio::test]
async fn depths_all_reports_each_non_empty_queue_and_only_those() {
    for tag in TAGS {
        let (redis, q) = start(tag);
        // Another tag's queue on the same server is not this one's.
        let other = Queues::connect(&redis.url(), &format!("{tag}-other")).unwrap();
        put(&other, "a", 99, 9, &Holds::default()).await;
        assert!(q.depths_all().await.unwrap().is_empty(), "{tag}: all idle");
        for build in 1..=3 {
            put(&q, "a", build, build, &Holds::default()).await;
        }
        put(&q, "b.c-d_e", 10, 10, &Holds::default()).await;
        lease_one(&q, "b.c-d_e", "10", &settings()).await;
        put(&q, "idle", 20, 20, &Holds::default()).await;
        assert_eq!(q.cancel("idle", 20).await.unwrap(), Cancelled::Removed);
        let all = q.depths_all().await.unwrap();
        assert_eq!(all.len(), 2, "{tag}: {all:?}");
        for cluster in ["a", "b.c-d_e"] {
            assert_eq!(
                all[cluster],
                q.depths(cluster).await.unwrap(),
                "{tag} {cluster}"
            );
        }
        assert_eq!(all["a"], [3, 0, 0, 0]);
        assert_eq!(all["b.c-d_e"], [0, 1, 0, 0]);
    }
}

#[tokio::test]
async fn fetch_dead_letters_a_build_after_max_attempts() {
    let (_redis, q) = start("sd");
    let s = QueueSettings {
        visibility_timeout: ms(20),
        max_attempts: 2,
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    let mut holder = None;
    for attempt in 1..=2 {
        let fetched = fetch(&q, "a", 10, &s).await;
        assert_eq!(ids(&fetched), ["7"]);
        assert_eq!(fetched.leases[0].attempt, attempt);
        assert!(fetched.dead.is_empty());
        holder = fetched.leases.into_iter().next();
        pass(&q, ms(20)).await;
    }
    let last = fetch(&q, "a", 10, &s).await;
    assert!(last.leases.is_empty());
    assert_eq!(
        last.dead,
        [(
            "7".to_owned(),
            serde_json::to_string(&message(7, 1)).unwrap()
        )]
    );
    assert_eq!(last.next_due_in, None);
    assert_eq!(q.dead("a").await.unwrap(), ["7"]);
    assert_eq!(q.depths("a").await.unwrap(), [0, 0, 0, 1]);
    assert_eq!(q.owner("7").await.unwrap(), None, "no queue holds it");
    assert_eq!(running(&q, 1).await, None, "its job no longer runs");
    // The last holder's lease lapsed with it.
    let holder = holder.unwrap();
    for op in [LeaseOp::Ack, LeaseOp::Renew, LeaseOp::Nack] {
        let outcome = settle_with(&q, op, "a", &holder, &s).await;
        assert_eq!(outcome, LeaseOutcome::Stale, "{op:?}");
    }
    assert_eq!(q.depths("a").await.unwrap(), [0, 0, 0, 1]);
    assert!(
        zscore(&q, &q.keys().acked, "7").await.is_none(),
        "no tombstone"
    );
    assert!(
        fetch(&q, "a", 10, &s).await.dead.is_empty(),
        "reported once"
    );
}

#[tokio::test]
async fn the_agents_local_queue_redelivers_without_dead_letters() {
    // The agent's settings: max_attempts u32::MAX.
    let (_redis, q) = start("sd-agent");
    let s = QueueSettings {
        visibility_timeout: ms(10),
        max_attempts: u32::MAX,
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    for attempt in 1..=5 {
        let fetched = fetch(&q, "a", 10, &s).await;
        assert_eq!(ids(&fetched), ["7"]);
        assert_eq!(fetched.leases[0].attempt, attempt);
        assert!(fetched.dead.is_empty());
        pass(&q, ms(10)).await;
    }
    assert!(q.dead("a").await.unwrap().is_empty());
}

#[tokio::test]
async fn fetch_defers_a_build_whose_blocker_runs_reports_it_once_and_registers_it() {
    let (_redis, q) = start("sd");
    let recheck = QueueSettings {
        blocked_recheck: ms(40),
        ..settings()
    };
    put(&q, "a", 100, 1, &Holds::default()).await;
    let holder = lease_one(&q, "a", "100", &settings()).await;
    assert_eq!(running(&q, 1).await.as_deref(), Some("100"));

    put(&q, "a", 200, 2, &blocked_by(&[1])).await;
    let before = now(&q).await;
    let first = fetch(&q, "a", 10, &recheck).await;
    let delayed = &q.keys().cluster("a").delayed;
    assert_due(&q, delayed, "200", (before, now(&q).await), 40).await;
    assert!(first.leases.is_empty());
    let body = serde_json::to_string(&message(200, 2)).unwrap();
    assert_eq!(
        first.blocked,
        [("200".to_owned(), body.clone(), "1".to_owned())]
    );
    assert_eq!(q.delayed("a").await.unwrap(), ["200"]);
    assert_eq!(blocked_behind(&q, 1).await, ["a\t200"]);
    assert!(first.next_due_in.unwrap() <= ms(40), "the re-check is next");

    // Re-checked while job 1 still runs: deferred again, not reported again.
    pass(&q, ms(40)).await;
    let second = fetch(&q, "a", 10, &recheck).await;
    assert!(second.leases.is_empty() && second.blocked.is_empty());
    assert_eq!(q.delayed("a").await.unwrap(), ["200"]);
    assert_eq!(meta(&q, "a", "200").await["deliveries"], json!(0));

    // An ack does not end the build: job 1 runs until it is released.
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &holder).await,
        LeaseOutcome::Done
    );
    pass(&q, ms(40)).await;
    let third = fetch(&q, "a", 10, &recheck).await;
    assert!(third.leases.is_empty() && third.blocked.is_empty());
    assert_eq!(q.delayed("a").await.unwrap(), ["200"]);

    // Each re-check registered it again; it is promoted once.
    assert_eq!(q.release(1, 100).await.unwrap(), 1);
    assert_eq!(running(&q, 1).await, None);
    let after = lease_one(&q, "a", "200", &recheck).await;
    assert_eq!(after.attempt, 1, "deferrals are not deliveries");
    assert_eq!(decoded(&after.message), message(200, 2));
}

#[tokio::test]
async fn a_build_blocked_only_by_its_own_job_waits_its_same_job_time() {
    let (_redis, q) = start("sd");
    let s = QueueSettings {
        blocked_recheck: ms(20_000),
        ..settings()
    };
    let own_wait = Holds {
        same_job_wait: ms(5_000),
        ..blocked_by(&[1])
    };
    put(&q, "a", 100, 1, &Holds::default()).await;
    lease_one(&q, "a", "100", &s).await;

    put(&q, "a", 101, 1, &own_wait).await; // only its own job blocks it
    next_ms(&q).await;
    let other_job = Holds {
        same_job_wait: ms(5_000),
        ..blocked_by(&[1])
    };
    put(&q, "a", 300, 3, &other_job).await; // job 1 is another job's
    next_ms(&q).await;
    let both = Holds {
        same_job_wait: ms(5_000),
        ..blocked_by(&[4, 1])
    };
    put(&q, "a", 400, 4, &both).await; // its own job is idle: job 1 holds it
    let before = now(&q).await;
    let fetched = fetch(&q, "a", 10, &s).await;
    let ran = (before, now(&q).await);
    let delayed = &q.keys().cluster("a").delayed;
    assert_due(&q, delayed, "101", ran, 5_000).await;
    assert_due(&q, delayed, "300", ran, 20_000).await;
    assert_due(&q, delayed, "400", ran, 20_000).await;
    assert!(fetched.leases.is_empty());
    let reported: Vec<(&str, &str)> = fetched
        .blocked
        .iter()
        .map(|(id, _, job)| (id.as_str(), job.as_str()))
        .collect();
    assert_eq!(reported, [("101", "1"), ("300", "1"), ("400", "1")]);
    assert_eq!(blocked_behind(&q, 1).await, ["a\t101", "a\t300", "a\t400"]);
}

#[tokio::test]
async fn collapse_drops_a_blocked_build_when_a_newer_build_of_its_job_waits() {
    let (_redis, q) = start("sd");
    // Job 1 runs build 100; 101 and 102 wait behind it and collapse.
    put(&q, "a", 100, 1, &Holds::default()).await;
    // Job 5 runs build 500; 501 and 502 wait behind it without collapse.
    // 801 and 802 of job 8 collapse but wait for job 1, not for their own job: both stay.
    put(&q, "a", 500, 5, &Holds::default()).await;
    let fetched = fetch(&q, "a", 10, &settings()).await;
    assert_eq!(ids(&fetched), ["100", "500"]);
    for (build, job, holds) in [
        (101, 1, collapsing(&[1])),
        (102, 1, collapsing(&[1])),
        (501, 5, blocked_by(&[5])),
        (502, 5, blocked_by(&[5])),
        (801, 8, collapsing(&[1])),
        (802, 8, collapsing(&[1])),
    ] {
        put(&q, "a", build, job, &holds).await;
        next_ms(&q).await;
    }

    let fetched = fetch(&q, "a", 10, &settings()).await;
    assert!(fetched.leases.is_empty());
    assert_eq!(
        fetched.collapsed,
        [(
            "101".to_owned(),
            serde_json::to_string(&message(101, 1)).unwrap()
        )]
    );
    let deferred: Vec<&str> = fetched.blocked.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(deferred, ["102", "501", "502", "801", "802"]);
    assert_eq!(q.owner("101").await.unwrap(), None);
    assert_eq!(q.message("a", "101").await.unwrap(), None);
    assert_eq!(q.delayed("a").await.unwrap().len(), 5);
    assert!(!q.delayed("a").await.unwrap().contains(&"101".to_owned()));
    assert_eq!(blocked_behind(&q, 1).await, ["a\t102", "a\t801", "a\t802"]);

    // The newest one of job 1 runs once job 1 is released; job 8's wait for it again.
    assert_eq!(q.release(1, 100).await.unwrap(), 3);
    let fetched = fetch(&q, "a", 10, &settings()).await;
    assert_eq!(ids(&fetched), ["102"]);
    assert!(fetched.collapsed.is_empty());
    assert_eq!(blocked_behind(&q, 1).await, ["a\t801", "a\t802"]);
}

#[tokio::test]
async fn collapse_gives_way_to_a_newer_delivered_build_but_not_to_a_cancelled_one() {
    let (_redis, q) = start("sd");
    // Job 7: build 702 was delivered and acknowledged; 701 arrives late and collapses.
    put(&q, "a", 702, 7, &Holds::default()).await;
    let lease = lease_one(&q, "a", "702", &settings()).await;
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    put(&q, "a", 701, 7, &collapsing(&[7])).await;
    let fetched = fetch(&q, "a", 10, &settings()).await;
    assert!(fetched.leases.is_empty());
    let collapsed: Vec<&str> = fetched.collapsed.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(collapsed, ["701"]);

    // Job 6: build 600 runs; the newer 602 is cancelled, so 601 only waits.
    put(&q, "a", 600, 6, &Holds::default()).await;
    lease_one(&q, "a", "600", &settings()).await;
    put(&q, "a", 601, 6, &collapsing(&[6])).await;
    put(&q, "a", 602, 6, &collapsing(&[6])).await;
    assert_eq!(q.cancel("a", 602).await.unwrap(), Cancelled::Removed);
    let fetched = fetch(&q, "a", 10, &settings()).await;
    assert!(fetched.collapsed.is_empty(), "{:?}", fetched.collapsed);
    let deferred: Vec<&str> = fetched.blocked.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(deferred, ["601"]);
    assert_eq!(q.owner("601").await.unwrap().as_deref(), Some("a"));
}

// === ack, renew, nack ===

#[tokio::test]
async fn ack_settles_only_the_current_lease_and_leaves_a_tombstone() {
    let (_redis, q) = start("sd");
    put(&q, "a", 7, 1, &Holds::default()).await;
    let lease = lease_one(&q, "a", "7", &settings()).await;
    let forged = Lease {
        token: (lease.token.parse::<u64>().unwrap() + 1).to_string(),
        ..lease.clone()
    };
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &forged).await,
        LeaseOutcome::Stale
    );
    assert_eq!(
        settle(&q, LeaseOp::Ack, "b", &lease).await,
        LeaseOutcome::Stale,
        "another cluster's queue does not hold the lease"
    );
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);

    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Stale,
        "acknowledged already"
    );
    assert_eq!(q.depths("a").await.unwrap(), [0, 0, 0, 0]);
    assert_eq!(q.owner("7").await.unwrap(), None);
    assert_eq!(q.message("a", "7").await.unwrap(), None);
    assert!(
        zscore(&q, &q.keys().acked, "7").await.is_some(),
        "tombstone"
    );
    assert_eq!(
        running(&q, 1).await.as_deref(),
        Some("7"),
        "the job runs until it is released"
    );
    let never = Lease {
        id: "8".into(),
        ..lease
    };
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &never).await,
        LeaseOutcome::Stale
    );
}

#[tokio::test]
async fn renew_extends_only_the_current_lease() {
    let (_redis, q) = start("sd");
    let short = QueueSettings {
        visibility_timeout: ms(40),
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    let lease = lease_one(&q, "a", "7", &short).await;
    let forged = Lease {
        token: "0".into(),
        ..lease.clone()
    };
    assert_eq!(
        settle(&q, LeaseOp::Renew, "a", &forged).await,
        LeaseOutcome::Stale
    );
    let longer = QueueSettings {
        visibility_timeout: ms(60_000),
        ..settings()
    };
    assert_eq!(
        settle_with(&q, LeaseOp::Renew, "a", &lease, &longer).await,
        LeaseOutcome::Done
    );
    pass(&q, ms(40)).await;
    let fetched = fetch(&q, "a", 10, &short).await;
    assert!(fetched.leases.is_empty(), "renewed: not reclaimed");
    let due = fetched.next_due_in.unwrap();
    assert!(due > ms(55_000) && due <= ms(60_000), "{due:?}");
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    assert_eq!(
        settle(&q, LeaseOp::Renew, "a", &lease).await,
        LeaseOutcome::Stale,
        "nothing to renew after an ack"
    );
    assert!(q.leased("a").await.unwrap().is_empty());
}

#[tokio::test]
async fn nack_backs_off_doubling_per_delivery_up_to_the_maximum() {
    let (_redis, q) = start("sd");
    let s = QueueSettings {
        nack_backoff: ms(50),
        nack_backoff_max: ms(120),
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    let mut previous: Option<Lease> = None;
    // Leased by a fetch that came late (a slow test run), after the back-off.
    let mut next: Option<Lease> = None;
    // Deliveries 1, 2, 3 back off 50, 100 and 120 (not 200) ms.
    for (attempt, backoff) in [(1, 50), (2, 100), (3, 120)] {
        let lease = match next.take() {
            Some(lease) => lease,
            None => lease_one(&q, "a", "7", &s).await,
        };
        assert_eq!(lease.id, "7");
        assert_eq!(lease.attempt, attempt);
        if let Some(old) = &previous {
            assert_ne!(lease.token, old.token);
            assert_eq!(
                settle_with(&q, LeaseOp::Nack, "a", old, &s).await,
                LeaseOutcome::Stale
            );
        }
        assert_eq!(running(&q, 1).await.as_deref(), Some("7"));
        let before = now(&q).await;
        assert_eq!(
            settle_with(&q, LeaseOp::Nack, "a", &lease, &s).await,
            LeaseOutcome::Done
        );
        let delayed = &q.keys().cluster("a").delayed;
        assert_due(&q, delayed, "7", (before, now(&q).await), backoff).await;
        assert_eq!(running(&q, 1).await, None, "a nack ends the job's run");
        assert_eq!(meta(&q, "a", "7").await["token"], json!(""), "no lease");
        assert!(q.leased("a").await.unwrap().is_empty());
        assert_eq!(q.delayed("a").await.unwrap(), ["7"]);
        assert_eq!(
            settle_with(&q, LeaseOp::Ack, "a", &lease, &s).await,
            LeaseOutcome::Stale,
            "a nacked lease is over"
        );
        let early = fetch(&q, "a", 10, &s).await;
        let on_time = now(&q).await < before + backoff;
        next = early.leases.into_iter().next();
        if on_time {
            assert!(next.is_none(), "not before its back-off");
            assert!(early.next_due_in.unwrap() <= ms(backoff.unsigned_abs()));
        }
        if next.is_none() {
            pass(&q, ms(backoff.unsigned_abs())).await;
        }
        previous = Some(lease);
    }
    let last = match next {
        Some(lease) => lease,
        None => lease_one(&q, "a", "7", &s).await,
    };
    assert_eq!(last.attempt, 4);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));
}

// === release, promote ===

#[tokio::test]
async fn release_promotes_the_builds_deferred_behind_a_job_on_every_cluster() {
    let (redis, q) = start("sd");
    put(&q, "a", 100, 1, &Holds::default()).await;
    lease_one(&q, "a", "100", &settings()).await;
    put(&q, "a", 200, 2, &blocked_by(&[1])).await;
    put(&q, "b", 300, 3, &blocked_by(&[1])).await;
    for cluster in ["a", "b"] {
        assert!(fetch(&q, cluster, 10, &settings()).await.leases.is_empty());
    }
    let mut bell = rings(&redis, &q).await;
    assert_eq!(blocked_behind(&q, 1).await, ["a\t200", "b\t300"]);

    assert_eq!(q.release(1, 100).await.unwrap(), 2);
    assert_eq!(running(&q, 1).await, None);
    assert!(blocked_behind(&q, 1).await.is_empty());
    assert_eq!(q.ready("a").await.unwrap(), ["200"]);
    assert_eq!(q.ready("b").await.unwrap(), ["300"]);
    assert!(q.delayed("a").await.unwrap().is_empty());
    assert!(q.delayed("b").await.unwrap().is_empty());
    assert_eq!(bell.heard().await, ["a", "b"], "each cluster's bell, once");
    lease_one(&q, "a", "200", &settings()).await;
    lease_one(&q, "b", "300", &settings()).await;
    assert_eq!(
        q.release(1, 100).await.unwrap(),
        0,
        "nothing waits any more"
    );
}

#[tokio::test]
async fn release_of_another_build_keeps_the_job_running() {
    let (_redis, q) = start("sd");
    put(&q, "a", 100, 1, &Holds::default()).await;
    lease_one(&q, "a", "100", &settings()).await;
    put(&q, "a", 200, 2, &blocked_by(&[1])).await;
    assert_eq!(fetch(&q, "a", 10, &settings()).await.blocked.len(), 1);

    // An older build of job 1 ends: job 1 still runs 100. What waited is promoted anyway and
    // deferred again by the next fetch, without a second report.
    assert_eq!(q.release(1, 99).await.unwrap(), 1);
    assert_eq!(running(&q, 1).await.as_deref(), Some("100"));
    assert_eq!(q.ready("a").await.unwrap(), ["200"]);
    let again = fetch(&q, "a", 10, &settings()).await;
    assert!(again.leases.is_empty() && again.blocked.is_empty());
    assert_eq!(q.delayed("a").await.unwrap(), ["200"]);
    assert_eq!(blocked_behind(&q, 1).await, ["a\t200"]);

    assert_eq!(q.release(1, 100).await.unwrap(), 1);
    lease_one(&q, "a", "200", &settings()).await;
}

#[tokio::test]
async fn promote_skips_builds_that_are_no_longer_deferred() {
    let (redis, q) = start("sd");
    put(&q, "a", 100, 1, &Holds::default()).await;
    lease_one(&q, "a", "100", &settings()).await;
    put(&q, "a", 200, 2, &blocked_by(&[1])).await;
    put(&q, "a", 300, 3, &blocked_by(&[1])).await;
    assert_eq!(fetch(&q, "a", 10, &settings()).await.blocked.len(), 2);
    assert_eq!(q.cancel("a", 200).await.unwrap(), Cancelled::Removed);
    let mut bell = rings(&redis, &q).await;

    assert_eq!(q.release(1, 100).await.unwrap(), 1);
    assert_eq!(q.ready("a").await.unwrap(), ["300"]);
    assert_eq!(bell.heard().await, ["a"]);
    assert_eq!(
        q.owner("200").await.unwrap(),
        None,
        "a cancelled build stays gone"
    );

    // Nothing promoted: no doorbell.
    let lease = lease_one(&q, "a", "300", &settings()).await;
    put(&q, "a", 400, 4, &blocked_by(&[3])).await;
    put(&q, "b", 500, 5, &blocked_by(&[3])).await;
    assert_eq!(fetch(&q, "a", 10, &settings()).await.blocked.len(), 1);
    assert_eq!(fetch(&q, "b", 10, &settings()).await.blocked.len(), 1);
    assert_eq!(q.cancel("a", 400).await.unwrap(), Cancelled::Removed);
    assert_eq!(q.cancel("b", 500).await.unwrap(), Cancelled::Removed);
    bell.heard().await;
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    assert_eq!(q.release(3, 300).await.unwrap(), 0);
    assert!(bell.heard().await.is_empty());
    assert!(q.ready("a").await.unwrap().is_empty());
}

// === move ===

#[tokio::test]
async fn move_takes_a_waiting_build_to_another_cluster_with_its_place() {
    let (redis, q) = start("sd");
    put(&q, "a", 2, 2, &Holds::default()).await;
    next_ms(&q).await;
    put(&q, "b", 1, 1, &Holds::default()).await;
    let score = zscore(&q, &q.keys().cluster("a").ready, "2").await;
    let before = meta(&q, "a", "2").await;
    let mut bell = rings(&redis, &q).await;

    assert_eq!(q.move_waiting("2", "a", "b").await.unwrap(), Moved::Moved);
    assert_eq!(q.owner("2").await.unwrap().as_deref(), Some("b"));
    assert_eq!(q.ready("b").await.unwrap(), ["2", "1"], "older first");
    assert_eq!(zscore(&q, &q.keys().cluster("b").ready, "2").await, score);
    assert_eq!(meta(&q, "b", "2").await, before);
    assert_eq!(q.message("b", "2").await.unwrap(), Some(message(2, 2)));
    assert!(q.ready("a").await.unwrap().is_empty());
    assert_eq!(q.message("a", "2").await.unwrap(), None);
    assert!(hget(&q, &q.keys().cluster("a").meta, "2").await.is_none());
    assert_eq!(bell.heard().await, ["b"]);

    // Asked again from the old cluster, or for a build on no queue.
    let again = q.move_waiting("2", "a", "c").await.unwrap();
    assert_eq!(again, Moved::Elsewhere("b".into()));
    let nowhere = q.move_waiting("9", "a", "b").await.unwrap();
    assert_eq!(nowhere, Moved::Elsewhere(String::new()));

    // A deferred build moves to the other cluster's ready queue.
    put(&q, "a", 100, 10, &Holds::default()).await;
    lease_one(&q, "a", "100", &settings()).await;
    put(&q, "a", 200, 20, &blocked_by(&[10])).await;
    assert_eq!(fetch(&q, "a", 10, &settings()).await.blocked.len(), 1);
    assert_eq!(q.move_waiting("200", "a", "c").await.unwrap(), Moved::Moved);
    assert!(q.delayed("a").await.unwrap().is_empty());
    assert_eq!(q.ready("c").await.unwrap(), ["200"]);
    let fetched = fetch(&q, "b", 10, &settings()).await;
    assert_eq!(ids(&fetched), ["2", "1"]);
    assert_eq!(fetched.leases[0].attempt, 1);
}

#[tokio::test]
async fn move_never_takes_a_leased_or_pinned_build() {
    let (_redis, q) = start("sd");
    put(&q, "a", 7, 1, &Holds::default()).await;
    let lease = lease_one(&q, "a", "7", &settings()).await;
    assert_eq!(q.move_waiting("7", "a", "b").await.unwrap(), Moved::Leased);
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));
    assert!(q.ready("b").await.unwrap().is_empty());
    assert_eq!(q.message("b", "7").await.unwrap(), None);

    // Acknowledged, then put back by the reconciler: pinned to "a".
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &lease).await,
        LeaseOutcome::Done
    );
    assert_eq!(
        enqueue(&q, "a", 7, 1, &message(7, 1), true).await,
        Enqueued::Queued
    );
    assert_eq!(q.move_waiting("7", "a", "b").await.unwrap(), Moved::Pinned);
    assert_eq!(q.ready("a").await.unwrap(), ["7"]);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));
    assert!(q.ready("b").await.unwrap().is_empty());

    // A build that was never delivered is not pinned.
    put(&q, "a", 8, 2, &Holds::default()).await;
    assert_eq!(meta(&q, "a", "8").await["pinned"], json!(false));
    assert_eq!(q.move_waiting("8", "a", "b").await.unwrap(), Moved::Moved);
}

// === cancel ===

#[tokio::test]
async fn cancel_removes_a_waiting_build_but_never_a_leased_one() {
    let (_redis, q) = start("sd");
    let s = QueueSettings {
        nack_backoff: ms(60_000),
        ..settings()
    };
    put(&q, "a", 7, 1, &Holds::default()).await;
    assert_eq!(q.cancel("a", 7).await.unwrap(), Cancelled::Removed);
    assert!(q.ready("a").await.unwrap().is_empty());
    assert_eq!(q.owner("7").await.unwrap(), None);
    assert_eq!(q.message("a", "7").await.unwrap(), None);
    assert!(hget(&q, &q.keys().cluster("a").meta, "7").await.is_none());
    assert_eq!(q.cancel("a", 7).await.unwrap(), Cancelled::Absent);
    assert_eq!(q.cancel("b", 9).await.unwrap(), Cancelled::Absent);
    // Not a delivery: it may be queued again.
    put(&q, "a", 7, 1, &Holds::default()).await;

    let lease = lease_one(&q, "a", "7", &s).await;
    assert_eq!(q.cancel("a", 7).await.unwrap(), Cancelled::Leased);
    assert_eq!(q.leased("a").await.unwrap(), ["7"]);
    assert_eq!(q.owner("7").await.unwrap().as_deref(), Some("a"));
    assert_eq!(
        settle(&q, LeaseOp::Renew, "a", &lease).await,
        LeaseOutcome::Done
    );

    // Backing off after a nack, it is waiting again.
    assert_eq!(
        settle_with(&q, LeaseOp::Nack, "a", &lease, &s).await,
        LeaseOutcome::Done
    );
    assert_eq!(q.delayed("a").await.unwrap(), ["7"]);
    assert_eq!(q.cancel("a", 7).await.unwrap(), Cancelled::Removed);
    assert_eq!(q.depths("a").await.unwrap(), [0, 0, 0, 0]);
    assert_eq!(q.owner("7").await.unwrap(), None);
}

// === holders ===

#[tokio::test]
async fn an_instance_known_dead_loses_its_leases_at_once_and_no_other_does() {
    let (redis, q) = start("sd-agent");
    for build in 1..=4 {
        put(&q, "a", build, build, &Holds::default()).await;
    }
    let leases = fetch(&q, "a", 10, &settings()).await.leases;
    assert_eq!(leases.len(), 4);
    q.beat("dead").await.unwrap();
    q.beat("live").await.unwrap();
    q.hold("a", "dead", &leases[..2]).await.unwrap();
    q.hold("a", "live", &leases[2..]).await.unwrap();
    // One of the dead instance's leases was settled before it died: nothing to take back there.
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &leases[1]).await,
        LeaseOutcome::Done
    );
    let mut bell = rings(&redis, &q).await;

    // Both just beat: judged by silence, nobody is dead.
    assert_eq!(q.reclaim("a", Duration::from_secs(60)).await.unwrap(), 0);
    assert_eq!(q.reclaim_instance("a", "dead").await.unwrap(), 1);
    assert_eq!(bell.heard().await, ["a"]);
    let instances = &q.keys().instances;
    assert_eq!(zscore(&q, instances, "dead").await, None, "forgotten");
    assert!(zscore(&q, instances, "live").await.is_some());
    let holders = &q.keys().cluster("a").holders;
    for (id, holder) in [
        ("1", None),
        ("2", None),
        ("3", Some("live")),
        ("4", Some("live")),
    ] {
        assert_eq!(
            hget(&q, holders, id).await.as_deref(),
            holder,
            "holder of {id}"
        );
    }

    // Back on the queue now, though its 30 s lease has not run out; the dead holder's settle is
    // stale, the live one's leases are untouched.
    let again = lease_one(&q, "a", "1", &settings()).await;
    assert_eq!(again.attempt, 2);
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &leases[0]).await,
        LeaseOutcome::Stale
    );
    assert_eq!(
        settle(&q, LeaseOp::Ack, "a", &again).await,
        LeaseOutcome::Done
    );
    for lease in &leases[2..] {
        assert_eq!(
            settle(&q, LeaseOp::Ack, "a", lease).await,
            LeaseOutcome::Done
        );
    }
    assert_eq!(q.reclaim_instance("a", "dead").await.unwrap(), 0);
    assert!(bell.heard().await.is_empty(), "nothing taken back: no ring");
}

// === both tags ===

#[tokio::test]
async fn both_tags_keep_every_key_under_their_own_hash_tag() {
    let redis = RedisServer::start().expect("start redis-server");
    let fast = QueueSettings {
        visibility_timeout: ms(10),
        max_attempts: 1,
        ..settings()
    };
    for tag in TAGS {
        let q = Queues::connect(&redis.url(), tag).unwrap();
        // The same build ids under each tag, in one Redis: each tag is a queue of its own.
        put(&q, "a", 1, 1, &Holds::default()).await;
        let lease = lease_one(&q, "a", "1", &settings()).await;
        assert_eq!(lease.token, "1", "{tag}: fencing tokens count per tag");
        put(&q, "a", 2, 2, &collapsing(&[1, 2])).await;
        put(&q, "a", 3, 2, &collapsing(&[1, 2])).await;
        let fetched = fetch(&q, "a", 10, &settings()).await;
        assert_eq!(fetched.collapsed.len(), 1, "{tag}");
        assert_eq!(fetched.blocked.len(), 1, "{tag}");
        assert_eq!(
            settle(&q, LeaseOp::Ack, "a", &lease).await,
            LeaseOutcome::Done
        );
        assert_eq!(q.release(1, 1).await.unwrap(), 1);
        assert_eq!(q.move_waiting("3", "a", "b").await.unwrap(), Moved::Moved);
        let moved = lease_one(&q, "b", "3", &settings()).await;
        assert_eq!(
            settle(&q, LeaseOp::Nack, "b", &moved).await,
            LeaseOutcome::Done
        );
        assert_eq!(q.cancel("b", 3).await.unwrap(), Cancelled::Removed);
        put(&q, "c", 4, 4, &Holds::default()).await;
        lease_one(&q, "c", "4", &fast).await;
        pass(&q, ms(10)).await;
        assert_eq!(fetch(&q, "c", 10, &fast).await.dead.len(), 1, "{tag}");
        q.enqueue_stop("c", 4, &stop_message(4)).await.unwrap();
        q.heartbeat("c", None).await.unwrap();
        q.heartbeat("c", Some(&report("agent-1"))).await.unwrap();
        q.status("c").await.unwrap();
    }

    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(
            key.starts_with("{sd}:") || key.starts_with("{sd-agent}:"),
            "{key} is outside both hash tags"
        );
    }
    for tag in TAGS {
        let ready = Queues::connect(&redis.url(), tag)
            .unwrap()
            .keys()
            .cluster("a")
            .ready;
        assert_eq!(ready, format!("{{{tag}}}:q:a:ready"));
    }
    let acked: Vec<String> = redis::cmd("ZRANGE")
        .arg("{sd-agent}:acked")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(acked, ["1"], "each tag has its own tombstones");
}

// === the operator's view ===

fn report(instance: &str) -> AgentReport {
    AgentReport {
        instance: instance.to_owned(),
        host: None,
        version: "1.2.3".into(),
        executor: "process".into(),
        in_flight: 1,
        capacity: 4,
    }
}

#[tokio::test]
async fn agents_are_kept_per_instance_newest_first_and_bounded() {
    let redis = RedisServer::start().expect("start redis-server");
    let q = Queues::connect(&redis.url(), "sd").unwrap();
    let most = sd_queue::status::MOST_AGENTS as usize;
    for i in 0..most + 5 {
        q.heartbeat("c", Some(&report(&format!("agent-{i}"))))
            .await
            .unwrap();
        // A millisecond apart at least, as polls are: the order of polls is the order kept.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    q.heartbeat("c", None).await.unwrap();
    // Polling again keeps one entry per instance.
    q.heartbeat("c", Some(&report("agent-204"))).await.unwrap();
    let status = q.status("c").await.unwrap();
    assert_eq!(status.agents.len(), most, "the newest {most} instances");
    let newest = status.agents[0].report.as_ref().expect("a report");
    assert_eq!(newest.instance, "agent-204");
    assert!(
        status.agents.iter().any(|a| a.report.is_none()),
        "an agent without a report is kept, as unknown"
    );
    assert!(
        !status
            .agents
            .iter()
            .any(|a| a.report.as_ref().is_some_and(|r| [
                "agent-0", "agent-1", "agent-2", "agent-3", "agent-4", "agent-5"
            ]
            .contains(&r.instance.as_str()))),
        "the oldest instances went first"
    );
    assert_eq!(status.last_poll_ms, Some(status.agents[0].last_seen_ms));
    assert!(q.status("other").await.unwrap().last_poll_ms.is_none());
    let mut conn = redis.conn();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&q.keys().cluster("c").agents)
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0, "the record expires when no agent polls any more");
}

#[tokio::test]
async fn deliveries_are_counted_for_the_last_hour() {
    let redis = RedisServer::start().expect("start redis-server");
    let q = Queues::connect(&redis.url(), "sd").unwrap();
    for id in 1..=5 {
        put(&q, "c", id, id, &Holds::default()).await;
    }
    assert_eq!(fetch(&q, "c", 2, &settings()).await.leases.len(), 2);
    assert_eq!(fetch(&q, "c", 10, &settings()).await.leases.len(), 3);
    let status = q.status("c").await.unwrap();
    assert_eq!(status.dispatched_last_hour, 5);
    assert_eq!((status.ready, status.leased), (0, 5));
    assert!(status.oldest.is_none(), "nothing waits");
}
