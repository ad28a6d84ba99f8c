//! `sd_queue::DueSet` (the scheduler's status reports, the agent's outbox) against a real
//! `redis-server` per test: keep, claim with a lease, forget, len.
//!
//! Due times come from Redis's clock, so the tests read it around each call: a score is checked
//! exactly against the times the script could have run at, and waits go by Redis's clock too.
//! A lease or delay meant not to lapse during a test is 30 s; one meant to lapse is a few ms.

use std::time::Duration;

use sd_queue::Connection;
use sd_queue::DueSet;
use sd_testkit::RedisServer;

/// Long enough never to lapse during a test.
const LONG: Duration = Duration::from_secs(30);

/// A redis-server of the test's own, a due set on it and a connection.
async fn start() -> (RedisServer, DueSet, Connection) {
    let redis = RedisServer::start().expect("start redis-server");
    let client = redis::Client::open(redis.url()).expect("redis url");
    let conn = Connection::lazy(client).expect("connect");
    (redis, DueSet::new("{t}:items", "{t}:due"), conn)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(f, b)| ((*f).to_owned(), (*b).to_owned()))
        .collect()
}

/// Redis's clock in ms, as the scripts read it.
async fn now(conn: &mut Connection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Waits until Redis's clock is more than `d` past what it says now.
async fn pass(conn: &mut Connection, d: Duration) {
    let target = now(conn).await + i64::try_from(d.as_millis()).unwrap();
    tokio::time::sleep(d).await;
    while now(conn).await <= target {
        tokio::time::sleep(ms(1)).await;
    }
}

async fn due_at(conn: &mut Connection, set: &DueSet, field: &str) -> Option<i64> {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(set.due_key())
        .arg(field)
        .query_async(conn)
        .await
        .unwrap();
    score.map(|s| s as i64)
}

async fn body(conn: &mut Connection, set: &DueSet, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(set.items_key())
        .arg(field)
        .query_async(conn)
        .await
        .unwrap()
}

/// Asserts `field` is due `d` after the Redis time of a call made between `before` and `after`.
async fn assert_due(
    conn: &mut Connection,
    set: &DueSet,
    field: &str,
    (before, after): (i64, i64),
    d: Duration,
) {
    let d = i64::try_from(d.as_millis()).unwrap();
    let due = due_at(conn, set, field).await.expect("a due time");
    assert!(
        before + d <= due && due <= after + d,
        "{field}: due at {due}, want {d} ms after a time in {before}..={after}"
    );
}

#[tokio::test]
async fn a_claimed_item_is_claimed_once_until_its_lease_lapses_then_again() {
    let (_redis, set, mut conn) = start().await;
    set.keep(&mut conn, "7", "report of 7", Duration::ZERO)
        .await
        .unwrap();

    let before = now(&mut conn).await;
    let claimed = set.claim(&mut conn, 10, LONG).await.unwrap();
    let after = now(&mut conn).await;
    assert_eq!(claimed, pairs(&[("7", "report of 7")]));
    assert_due(&mut conn, &set, "7", (before, after), LONG).await;
    assert!(
        set.claim(&mut conn, 10, LONG).await.unwrap().is_empty(),
        "claimed by the first claimant while its lease runs"
    );
    assert_eq!(set.len(&mut conn).await.unwrap(), 1, "still kept");

    // A claimant that does nothing (died) releases it when its lease lapses.
    set.keep(&mut conn, "8", "report of 8", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        set.claim(&mut conn, 10, ms(20)).await.unwrap(),
        pairs(&[("8", "report of 8")])
    );
    pass(&mut conn, ms(20)).await;
    assert_eq!(
        set.claim(&mut conn, 10, LONG).await.unwrap(),
        pairs(&[("8", "report of 8")]),
        "claimed again, with its body, once the lease lapsed"
    );
    assert!(set.claim(&mut conn, 10, LONG).await.unwrap().is_empty());
    assert_eq!(set.len(&mut conn).await.unwrap(), 2);
}

#[tokio::test]
async fn an_item_kept_with_a_delay_is_not_due_before_it() {
    let (_redis, set, mut conn) = start().await;
    let before = now(&mut conn).await;
    set.keep(&mut conn, "a", "later", LONG).await.unwrap();
    let after = now(&mut conn).await;
    assert_due(&mut conn, &set, "a", (before, after), LONG).await;
    assert!(set.claim(&mut conn, 10, LONG).await.unwrap().is_empty());
    assert_eq!(set.len(&mut conn).await.unwrap(), 1, "kept meanwhile");

    // Kept again: the body is replaced and the due time with it.
    set.keep(&mut conn, "a", "sooner", ms(20)).await.unwrap();
    pass(&mut conn, ms(20)).await;
    assert_eq!(
        set.claim(&mut conn, 10, LONG).await.unwrap(),
        pairs(&[("a", "sooner")])
    );
    assert_eq!(set.len(&mut conn).await.unwrap(), 1);
}

#[tokio::test]
async fn forget_drops_an_item_claimed_or_not() {
    let (_redis, set, mut conn) = start().await;
    for field in ["a", "b", "c"] {
        set.keep(&mut conn, field, &format!("body {field}"), Duration::ZERO)
            .await
            .unwrap();
    }
    set.forget(&mut conn, "a").await.unwrap();
    assert_eq!(body(&mut conn, &set, "a").await, None);
    assert_eq!(due_at(&mut conn, &set, "a").await, None);
    assert_eq!(set.len(&mut conn).await.unwrap(), 2);

    // Claimed, then done: gone for good, not claimed again after the lease.
    let claimed = set.claim(&mut conn, 1, ms(20)).await.unwrap();
    assert_eq!(claimed, pairs(&[("b", "body b")]));
    set.forget(&mut conn, "b").await.unwrap();
    pass(&mut conn, ms(20)).await;
    assert_eq!(
        set.claim(&mut conn, 10, LONG).await.unwrap(),
        pairs(&[("c", "body c")])
    );
    assert_eq!(set.len(&mut conn).await.unwrap(), 1);

    set.forget(&mut conn, "never-kept").await.unwrap();
    assert_eq!(set.len(&mut conn).await.unwrap(), 1);
}

#[tokio::test]
async fn claim_drops_a_field_whose_item_vanished() {
    let (_redis, set, mut conn) = start().await;
    for field in ["gone", "here"] {
        set.keep(&mut conn, field, "body", Duration::ZERO)
            .await
            .unwrap();
    }
    let _: i64 = redis::cmd("HDEL")
        .arg(set.items_key())
        .arg("gone")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(due_at(&mut conn, &set, "gone").await.is_some());

    assert_eq!(
        set.claim(&mut conn, 10, LONG).await.unwrap(),
        pairs(&[("here", "body")])
    );
    assert_eq!(
        due_at(&mut conn, &set, "gone").await,
        None,
        "dropped from the due set"
    );
    assert_eq!(set.len(&mut conn).await.unwrap(), 1);
}

#[tokio::test]
async fn claim_takes_at_most_max_earliest_due_first() {
    let (_redis, set, mut conn) = start().await;
    // Each kept on a later millisecond than the one before: due in this order.
    let fields = ["5", "1", "4", "2", "3"];
    for field in fields {
        set.keep(&mut conn, field, &format!("body {field}"), Duration::ZERO)
            .await
            .unwrap();
        pass(&mut conn, Duration::ZERO).await;
    }
    let mut claimed = Vec::new();
    for (max, want) in [(2, 2), (2, 2), (10, 1), (10, 0)] {
        let got = set.claim(&mut conn, max, LONG).await.unwrap();
        assert_eq!(got.len(), want, "claim of at most {max}: {got:?}");
        claimed.extend(got.into_iter().map(|(field, _)| field));
    }
    assert_eq!(claimed, fields, "earliest due first");
    assert_eq!(set.len(&mut conn).await.unwrap(), 5);
}

/// `claim_json` decodes what it claims; an item that never will decode is dropped (and named),
/// not claimed again after every lease.
#[tokio::test]
async fn claim_json_decodes_and_drops_the_unreadable() {
    let (_redis, set, mut conn) = start().await;
    set.keep(&mut conn, "a", "{\"n\":1}", Duration::ZERO)
        .await
        .unwrap();
    set.keep(&mut conn, "b", "not json", Duration::ZERO)
        .await
        .unwrap();
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Item {
        n: u32,
    }
    let claimed = set.claim_json::<Item>(&mut conn, 10, ms(1)).await.unwrap();
    assert_eq!(claimed.items, vec![Item { n: 1 }]);
    let dropped: Vec<&str> = claimed.dropped.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(dropped, vec!["b"]);
    assert_eq!(set.len(&mut conn).await.unwrap(), 1, "b is gone, a is kept");
    pass(&mut conn, ms(2)).await;
    let again = set.claim_json::<Item>(&mut conn, 10, LONG).await.unwrap();
    assert_eq!((again.items.len(), again.dropped.len()), (1, 0));
}
