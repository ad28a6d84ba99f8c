//! The `builds` table under concurrent intake: on SQLite new builds are written in groups
//! (one commit for those arriving together); each request must still hear its own row's fate,
//! a request cancelled mid-way must leave no one waiting, and PostgreSQL writes the same.

use std::collections::HashMap;

use sd_scheduler::builds::{BuildRow, BuildState, Builds};
use sd_scheduler::db::Db;
use sd_testkit::{Backend, TestDb};

fn row(build_id: u64) -> BuildRow {
    BuildRow {
        build_id,
        job_id: build_id + 7,
        pipeline_id: 42,
        scm_context: "github:github.com".into(),
        organization: "screwdriver-cd".into(),
        cluster: Some("east".into()),
        state: BuildState::Queued,
        reason: None,
        message: format!("{{\"buildId\":{build_id}}}"),
        body_token: None,
        created_at: 0,
        updated_at: 0,
    }
}

async fn builds(backend: Backend) -> (Builds, TestDb) {
    let db = TestDb::new(backend).await.expect("test database");
    let pool = Db::connect(db.url(), 10).await.expect("connect");
    (Builds::new(pool), db)
}

/// 300 inserts at once, 100 of them a second request for a build another request brings:
/// every build is written once, exactly one request of each pair hears `true`, and every row
/// reads back as its own request wrote it.
async fn concurrent_inserts_each_hear_their_own_result(backend: Backend) {
    let (builds, _db) = builds(backend).await;
    let ids: Vec<u64> = (1..=200).chain(1..=100).collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let builds = builds.clone();
            tokio::spawn(async move { (id, builds.insert(&row(id)).await) })
        })
        .collect();
    let mut inserted: HashMap<u64, usize> = HashMap::new();
    for task in tasks {
        let (id, result) = task.await.expect("insert task");
        if result.expect("insert") {
            *inserted.entry(id).or_default() += 1;
        }
    }
    assert_eq!(inserted.len(), 200, "every build inserted");
    assert!(
        inserted.values().all(|&n| n == 1),
        "a build reported inserted twice: {inserted:?}"
    );
    assert_eq!(builds.count().await.expect("count"), 200);
    for id in [1, 100, 101, 200] {
        let got = builds.get(id).await.expect("get").expect("row");
        assert_eq!(got.job_id, id + 7);
        assert_eq!(got.message, format!("{{\"buildId\":{id}}}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_each_hear_their_own_result_sqlite() {
    concurrent_inserts_each_hear_their_own_result(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_each_hear_their_own_result_postgres() {
    concurrent_inserts_each_hear_their_own_result(Backend::Postgres).await;
}

/// Requests dropped while their insert waits for its group (a client gone, a request
/// timeout): the others still hear their results, and a request for the same build after
/// finds it either written once or not at all, never half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_inserts_leave_no_one_waiting() {
    let (builds, _db) = builds(Backend::Sqlite).await;
    let tasks: Vec<_> = (1..=200u64)
        .map(|id| {
            let builds = builds.clone();
            tokio::spawn(async move { builds.insert(&row(id)).await })
        })
        .collect();
    let mut kept = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if i % 2 == 0 {
            task.abort();
        } else {
            kept.push(task);
        }
    }
    for task in kept {
        let inserted = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("an insert left waiting")
            .expect("insert task")
            .expect("insert");
        assert!(inserted);
    }
    // Again, for every build: the cancelled ones are written now, or were already.
    for id in 1..=200u64 {
        let again = builds.insert(&row(id)).await.expect("insert again");
        // Builds 2, 4, … were kept (and written); 1, 3, … were cancelled.
        if id % 2 == 0 {
            assert!(!again, "build {id} reported new twice");
        }
    }
    assert_eq!(builds.count().await.expect("count"), 200);
}

/// Every change of state, cluster or reason is a step of the build's history (written by the
/// database's triggers, migration 3); a write that changes nothing is not; the steps read back
/// oldest first, the latest `limit` of them.
async fn each_change_is_a_step_of_the_history(backend: Backend) {
    let (builds, _db) = builds(backend).await;
    assert!(builds.insert(&row(5)).await.unwrap());
    assert!(builds.insert(&row(6)).await.unwrap());
    builds
        .set_reason(5, "blocked by a running build of job 9")
        .await
        .unwrap();
    builds
        .set_reason(5, "blocked by a running build of job 9")
        .await
        .unwrap();
    builds
        .reassign(5, "east", "west", "moved off a silent cluster")
        .await
        .unwrap();
    builds.mark_dispatched("west", &[5]).await.unwrap();
    assert!(
        builds
            .transition(
                5,
                BuildState::Dispatched,
                BuildState::Running,
                Some("west"),
                None
            )
            .await
            .unwrap()
    );
    let steps = builds.history(5, 100).await.unwrap();
    let seen: Vec<(BuildState, Option<&str>, Option<&str>)> = steps
        .iter()
        .map(|s| (s.state, s.cluster.as_deref(), s.reason.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (BuildState::Queued, Some("east"), None),
            (
                BuildState::Queued,
                Some("east"),
                Some("blocked by a running build of job 9")
            ),
            (
                BuildState::Queued,
                Some("west"),
                Some("moved off a silent cluster")
            ),
            (
                BuildState::Dispatched,
                Some("west"),
                Some("transferred to its cluster")
            ),
            (BuildState::Running, Some("west"), None),
        ],
        "{backend:?}"
    );
    assert!(steps.windows(2).all(|w| w[0].at <= w[1].at));
    let latest = builds.history(5, 2).await.unwrap();
    assert_eq!(latest, steps[3..], "the latest two, oldest first");
    assert_eq!(
        builds.history(6, 100).await.unwrap().len(),
        1,
        "build 6 has its own"
    );
}

#[tokio::test]
async fn each_change_is_a_step_of_the_history_sqlite() {
    each_change_is_a_step_of_the_history(Backend::Sqlite).await;
}

#[tokio::test]
async fn each_change_is_a_step_of_the_history_postgres() {
    each_change_is_a_step_of_the_history(Backend::Postgres).await;
}
