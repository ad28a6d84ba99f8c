//! Dead letters, held and resolved, against a real redis-server, the database and a
//! Screwdriver API that refuses what Screwdriver refuses: a build delivered too often without an
//! acknowledgement is held (still QUEUED in Screwdriver), then requeued and run once, or failed
//! by an operator, or failed when its hold passes; dead stops are requeued or dropped; nobody
//! but an admin, and nothing through another cluster's path, touches them.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{Harness, allow_api, build, cluster, delivered_build};
use reqwest::{Method, StatusCode};
use sd_testkit::{Backend, ClusterKeys, FakeScrewdriver, eventually, unix_now};
use serde_json::{Value, json};

const VISIBILITY: Duration = Duration::from_millis(300);

async fn start(backend: Backend, api: &FakeScrewdriver, hold: Duration) -> Harness {
    let url = api.url.clone();
    Harness::start_with(backend, move |c| {
        allow_api(c, &url);
        c.queue.visibility_timeout = VISIBILITY;
        c.queue.max_attempts = 2;
        c.queue.dead_letter_hold = hold;
    })
    .await
}

fn with_api(mut body: Value, api: &FakeScrewdriver) -> Value {
    body["apiUri"] = json!(api.url);
    body
}

/// A harness whose cluster sd1 holds build 9 as a dead letter for `hold`, and the Screwdriver
/// API it reports to.
async fn held_build_9(backend: Backend, hold: Duration) -> (FakeScrewdriver, Harness, ClusterKeys) {
    let api = FakeScrewdriver::start().await;
    let h = start(backend, &api, hold).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&with_api(build(9, "org/repo", json!({})), &api))
        .await;
    let_die(&h, "sd1", &keys).await;
    (api, h, keys)
}

/// Takes the cluster's next delivery twice without acknowledging it, so the next poll
/// dead-letters it.
async fn let_die(h: &Harness, name: &str, keys: &ClusterKeys) {
    for attempt in 1..=2 {
        let jobs = h.poll(name, keys, 5, 10).await;
        assert_eq!(jobs.len(), 1, "attempt {attempt}: {jobs:?}");
        assert_eq!(jobs[0]["attempt"], attempt);
        tokio::time::sleep(VISIBILITY + Duration::from_millis(50)).await;
    }
    assert!(h.poll(name, keys, 0, 10).await.is_empty(), "dead-lettered");
}

async fn state_of(h: &Harness, build_id: u64) -> Value {
    let (status, view) = h
        .call(
            Method::GET,
            &format!("/v1/builds/{build_id}"),
            Some(&h.sdapi()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view["state"].clone()
}

async fn act(h: &Harness, token: &str, cluster: &str, id: &str, verb: &str) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        &format!("/v4/buildclusters/{cluster}/deadletters/{id}/{verb}"),
        Some(token),
        None,
    )
    .await
}

async fn listed(h: &Harness, cluster: &str) -> Value {
    let (status, dead) = h
        .call(
            Method::GET,
            &format!("/v4/buildclusters/{cluster}/deadletters"),
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dead}");
    dead
}

/// Updates Screwdriver got for `build_id`, as (status or "note", message), in the order they
/// arrived (reports are sent concurrently: two may arrive in either order).
fn told(api: &FakeScrewdriver, build_id: u64) -> Vec<(String, String)> {
    api.updates()
        .into_iter()
        .filter(|u| u.build_id == build_id)
        .map(|u| {
            (
                u.body["status"].as_str().unwrap_or("note").to_owned(),
                u.body["statusMessage"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn told_eventually(api: &FakeScrewdriver, build_id: u64, n: usize) -> Vec<(String, String)> {
    eventually(Duration::from_secs(10), || async {
        let got = told(api, build_id);
        (got.len() >= n).then_some(got)
    })
    .await
    .unwrap_or_else(|| panic!("{n} updates of build {build_id}: {:?}", told(api, build_id)))
}

/// Waits for an update of `build_id` with `status` (or "note") whose message contains `text`.
async fn told_of(api: &FakeScrewdriver, build_id: u64, status: &str, text: &str) {
    let found = eventually(Duration::from_secs(10), || async {
        told(api, build_id)
            .iter()
            .any(|(s, m)| s == status && m.contains(text))
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "no {status} saying {text:?} for build {build_id}: {:?}",
        told(api, build_id)
    );
}

/// Held, then requeued by an admin: delivered again from attempt 1, run once, and Screwdriver,
/// which never saw it finish, was told each time in the message alone.
async fn a_held_dead_letter_is_requeued_and_runs_once(backend: Backend) {
    let (api, h, keys) = held_build_9(backend, Duration::from_secs(600)).await;

    assert_eq!(state_of(&h, 9).await, "dead");
    let notes = told_eventually(&api, 9, 1).await;
    assert_eq!(notes[0].0, "note", "the status is left as it is: {notes:?}");
    assert!(notes[0].1.contains("Held until"), "{notes:?}");
    assert_eq!(api.status(9), "QUEUED");
    let dead = listed(&h, "sd1").await;
    assert_eq!(dead["total"], 1, "{dead}");
    let letter = &dead["deadLetters"][0];
    assert_eq!(
        (&letter["id"], &letter["buildId"]),
        (&json!("9"), &json!(9))
    );
    assert!(letter["heldUntil"].as_str().unwrap() > letter["deadSince"].as_str().unwrap());
    let (_, status) = h
        .call(
            Method::GET,
            "/v4/buildclusters/sd1/status",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(status["queue"]["dead"], 1, "{status}");
    // The reconciler leaves a held build alone.
    assert_eq!(
        h.scheduler
            .state()
            .intake
            .reconcile(Duration::ZERO)
            .await
            .unwrap(),
        0
    );

    // Reading is for users; acting, for admins.
    let (code, body) = act(&h, &h.user(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(state_of(&h, 9).await, "dead");
    let (code, body) = act(&h, &h.admin(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"cluster": "sd1", "id": "9", "action": "requeued"})
    );
    assert_eq!(listed(&h, "sd1").await["total"], 0);

    let jobs = h.poll("sd1", &keys, 5, 10).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (delivered_build(&jobs[0]), &jobs[0]["attempt"]),
        (9, &json!(1))
    );
    let id = jobs[0]["deliveryId"].as_str().unwrap().to_owned();
    let report = h.lease_call("sd1", &keys, "ack", &[&id]).await;
    assert_eq!(report["done"], json!([id]));
    assert_eq!(state_of(&h, 9).await, "dispatched");
    // Requeued once is requeued once: a second call finds nothing held.
    let (code, body) = act(&h, &h.admin(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());

    told_of(&api, 9, "note", "Requeued by an operator").await;
    assert!(api.updates().iter().all(|u| u.answered == 200));
    assert_eq!(
        api.status(9),
        "QUEUED",
        "left for the launcher to set RUNNING"
    );
}

/// Not requeued within the hold: failed, reported FAILURE, and no longer requeueable.
async fn a_dead_letter_still_held_when_its_hold_ends_is_failed(backend: Backend) {
    let (api, h, keys) = held_build_9(backend, Duration::from_secs(2)).await;
    assert_eq!(state_of(&h, 9).await, "dead");
    told_of(&api, 9, "FAILURE", "queue.dead_letter_hold (2s)").await;
    assert_eq!(api.status(9), "FAILURE");
    assert_eq!(state_of(&h, 9).await, "failed");
    assert_eq!(listed(&h, "sd1").await["total"], 0);
    let (code, body) = act(&h, &h.admin(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("restart it in Screwdriver"),
        "{body}"
    );
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
}

both_backends!(
    a_held_dead_letter_is_requeued_and_runs_once,
    a_dead_letter_still_held_when_its_hold_ends_is_failed
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_fails_a_held_dead_letter() {
    let (api, h, _keys) = held_build_9(Backend::Sqlite, Duration::from_secs(600)).await;
    let (code, body) = act(&h, &h.admin(), "sd1", "9", "fail").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["action"], "failed");
    assert_eq!(state_of(&h, 9).await, "failed");
    told_of(&api, 9, "FAILURE", "Failed by an operator").await;
    assert_eq!(api.status(9), "FAILURE");
    assert_eq!(listed(&h, "sd1").await["total"], 0);
    for verb in ["fail", "requeue"] {
        let (code, body) = act(&h, &h.admin(), "sd1", "9", verb).await;
        assert_eq!(code, StatusCode::CONFLICT, "{verb}: {body}");
    }
}

/// A stop that never reached its cluster is held too, and can be requeued or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stop_is_requeued_or_dropped() {
    let api = FakeScrewdriver::start().await;
    let h = start(Backend::Sqlite, &api, Duration::from_secs(600)).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    for build_id in [5, 6] {
        h.submit(&with_api(build(build_id, "org/repo", json!({})), &api))
            .await;
        let jobs = h.poll("sd1", &keys, 5, 10).await;
        let id = jobs[0]["deliveryId"].as_str().unwrap().to_owned();
        h.lease_call("sd1", &keys, "ack", &[&id]).await;
        let (code, body) = h
            .call(
                Method::DELETE,
                "/v1/queue/message",
                Some(&h.sdapi()),
                Some(&json!({"buildId": build_id})),
            )
            .await;
        assert!(code.is_success(), "{body}");
        let_die(&h, "sd1", &keys).await;
    }
    let dead = listed(&h, "sd1").await;
    let mut ids: Vec<&str> = dead["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["stop:5", "stop:6"], "{dead}");

    let (code, body) = act(&h, &h.admin(), "sd1", "stop:5", "requeue").await;
    assert_eq!(
        (code, &body["action"]),
        (StatusCode::OK, &json!("requeued")),
        "{body}"
    );
    let (code, body) = act(&h, &h.admin(), "sd1", "stop:6", "fail").await;
    assert_eq!(
        (code, &body["action"]),
        (StatusCode::OK, &json!("dropped")),
        "{body}"
    );
    let jobs = h.poll("sd1", &keys, 5, 10).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["message"]["job"], "stop");
    assert_eq!(jobs[0]["attempt"], 1);
    assert_eq!(delivered_build(&jobs[0]), 5);
    assert_eq!(listed(&h, "sd1").await["total"], 0);
    let (code, _) = act(&h, &h.admin(), "sd1", "stop:6", "requeue").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

/// Screwdriver aborts a held build: it is stopped, and can never be requeued after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_build_that_is_stopped_is_gone_for_good() {
    let (_api, h, keys) = held_build_9(Backend::Sqlite, Duration::from_secs(600)).await;
    let (code, body) = h
        .call(
            Method::DELETE,
            "/v1/queue/message",
            Some(&h.sdapi()),
            Some(&json!({"buildId": 9})),
        )
        .await;
    assert!(code.is_success(), "{body}");
    assert_eq!(
        (&body["state"], &body["action"]),
        (&json!("stopped"), &json!("removed"))
    );
    assert_eq!(listed(&h, "sd1").await["total"], 0);
    let (code, _) = act(&h, &h.admin(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
}

/// No cluster's dead letter is reached through another's path, and ids are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_reached_only_through_their_own_cluster() {
    let api = FakeScrewdriver::start().await;
    let h = start(Backend::Sqlite, &api, Duration::from_secs(600)).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.cluster_with_key(&cluster("sd2", "screwdriver", &[]))
        .await;
    h.submit(&with_api(
        build(9, "org/repo", json!({"screwdriver.cd/buildCluster": "sd1"})),
        &api,
    ))
    .await;
    let_die(&h, "sd1", &keys).await;
    for verb in ["requeue", "fail"] {
        let (code, body) = act(&h, &h.admin(), "sd2", "9", verb).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{verb} through sd2: {body}");
        let (code, _) = act(&h, &h.admin(), "ghost", "9", verb).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        for bad in [
            "0",
            "nine",
            "stop:",
            "stop:x",
            "9%20",
            "-9",
            "99999999999999999999",
        ] {
            let (code, body) = act(&h, &h.admin(), "sd1", bad, verb).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{verb} {bad}: {body}");
            assert!(
                body["message"].as_str().unwrap().starts_with("id:"),
                "{body}"
            );
        }
    }
    let (code, _) = h
        .call(
            Method::POST,
            "/v4/buildclusters/sd1/deadletters/9/requeue",
            None,
            None,
        )
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(state_of(&h, 9).await, "dead", "nothing changed it");
    assert_eq!(listed(&h, "sd1").await["total"], 1);
}

/// A build whose own (Screwdriver's) token is about to expire is not requeued: it could run,
/// but not report. Failing it is still possible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_token_expires_soon_is_not_requeued() {
    let api = FakeScrewdriver::start().await;
    let h = start(Backend::Sqlite, &api, Duration::from_secs(600)).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    let part = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let token = format!(
        "{}.{}.c2ln",
        part(json!({"alg": "RS256", "typ": "JWT"})),
        part(json!({"username": "9", "scope": ["temporal"], "exp": unix_now() + 300}))
    );
    let mut body = with_api(build(9, "org/repo", json!({})), &api);
    body["token"] = json!(token);
    h.submit(&body).await;
    let_die(&h, "sd1", &keys).await;
    let (code, body) = act(&h, &h.admin(), "sd1", "9", "requeue").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("token expires in"),
        "{body}"
    );
    assert_eq!(state_of(&h, 9).await, "dead");
    let (code, _) = act(&h, &h.admin(), "sd1", "9", "fail").await;
    assert_eq!(code, StatusCode::OK);
    let updates = told_eventually(&api, 9, 2).await;
    assert!(
        api.updates()
            .iter()
            .all(|u| u.authorization == format!("Bearer {token}")),
        "reported with the build's own token: {updates:?}"
    );
}
