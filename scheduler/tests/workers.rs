//! The cluster-worker protocol against a real redis-server: leases, acks, dead letters,
//! blockedBy and collapse, stops, HA re-routing, replicas, Redis restarts and the JWT attack
//! matrix.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Harness, allow_api, build, cluster, delivered_build};
use jsonwebtoken::Algorithm;
use reqwest::{Method, StatusCode};
use sd_testkit::{Backend, ClusterKeys, FakeScrewdriver, RedisServer, eventually, unix_now};
use serde_json::{Value, json};

both_backends!(two_schedulers_never_deliver_a_build_twice);

fn with_api(mut body: Value, api: &FakeScrewdriver) -> Value {
    body["apiUri"] = json!(api.url);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_attack_matrix_dequeues_nothing() {
    let h = Harness::start(Backend::Sqlite).await;
    let alpha = h
        .cluster_with_key(&cluster("alpha", "screwdriver", &[]))
        .await;
    let beta = h
        .cluster_with_key(&cluster("beta", "screwdriver", &[]))
        .await;
    h.set_env(
        "SD_CLUSTER_ALPHA_SIGN",
        r#"{"algorithm":"RS256","expiresIn":300}"#,
    );
    h.call(
        Method::PUT,
        "/v4/buildclusters/alpha",
        Some(&h.admin()),
        Some(&json!({"signOption": "SD_CLUSTER_ALPHA_SIGN", "weightage": 100})),
    )
    .await;
    h.call(
        Method::PUT,
        "/v4/buildclusters/beta",
        Some(&h.admin()),
        Some(&json!({"weightage": 0})),
    )
    .await;
    let (status, resp) = h.submit(&build(1, "org/repo", json!({}))).await;
    assert_eq!(
        (status, resp["buildClusterName"].as_str()),
        (StatusCode::CREATED, Some("alpha"))
    );

    let now = unix_now();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = |iat: u64, exp: u64| json!({"buildCluster": "alpha", "iat": iat, "exp": exp});
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(now, now + 60))
    );
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims(now, now + 60),
        &jsonwebtoken::EncodingKey::from_secret(alpha.public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let es256 =
        ClusterKeys::generate(Algorithm::ES256).sign_as(Algorithm::ES256, &claims(now, now + 60));
    let cases: Vec<(&str, Option<String>, StatusCode)> = vec![
        ("alg none", Some(none), StatusCode::UNAUTHORIZED),
        (
            "HS256 signed with the public key",
            Some(hs256),
            StatusCode::UNAUTHORIZED,
        ),
        ("another algorithm", Some(es256), StatusCode::UNAUTHORIZED),
        (
            "expired",
            Some(alpha.sign_as(Algorithm::RS256, &claims(now - 1000, now - 700))),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "iat in the future",
            Some(alpha.sign_as(Algorithm::RS256, &claims(now + 600, now + 700))),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "lifetime over expiresIn",
            Some(alpha.sign_as(Algorithm::RS256, &claims(now, now + 3600))),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no iat",
            Some(alpha.sign_as(
                Algorithm::RS256,
                &json!({"buildCluster": "alpha", "exp": now + 60}),
            )),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "signed by alpha, claims beta",
            Some(alpha.token("beta", 60)),
            StatusCode::FORBIDDEN,
        ),
        (
            "beta's own token",
            Some(beta.token("beta", 60)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another cluster's key",
            Some(beta.sign_as(Algorithm::RS256, &claims(now, now + 60))),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "malformed",
            Some("abc.def".into()),
            StatusCode::UNAUTHORIZED,
        ),
        ("missing header", None, StatusCode::UNAUTHORIZED),
    ];
    for (name, token, want) in &cases {
        let (status, body) = common::call_at(
            &h.http,
            &h.base,
            Method::GET,
            "/v1/jobs/alpha?wait=0",
            token.as_deref(),
            None,
        )
        .await;
        assert_eq!(status, *want, "{name}: {body}");
        assert!(body["message"].is_string(), "{name}: {body}");
        let (status, _) = common::call_at(
            &h.http,
            &h.base,
            Method::POST,
            "/v1/jobs/alpha/ack",
            token.as_deref(),
            Some(&json!({"deliveryIds": ["1@1"]})),
        )
        .await;
        assert_eq!(status, *want, "{name} (ack)");
    }
    let (status, body) = common::call_at(
        &h.http,
        &h.base,
        Method::GET,
        "/v1/jobs/ghost?wait=0",
        Some(&alpha.token("ghost", 60)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Nothing was dequeued by any refused call.
    assert_eq!(h.ready("alpha").await, vec!["1"]);
    assert!(
        h.scheduler
            .state()
            .queues
            .leased("alpha")
            .await
            .unwrap()
            .is_empty()
    );
    // Cluster B can never pull cluster A's jobs: its valid token on its own path finds nothing.
    assert!(h.poll("beta", &beta, 0, 10).await.is_empty());
    // The genuine agent gets the build.
    let jobs = h.poll("alpha", &alpha, 0, 10).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(delivered_build(&jobs[0]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_algorithm_rotation_issuer_and_audience() {
    let h = Harness::start(Backend::Sqlite).await;
    for (name, alg, label) in [
        ("ec", Algorithm::ES256, "ES256"),
        ("ed", Algorithm::EdDSA, "EdDSA"),
        ("ps", Algorithm::PS256, "PS256"),
    ] {
        let keys = ClusterKeys::generate(alg);
        let mut body = cluster(name, "screwdriver", &[]);
        body["signOption"] = json!(format!("SD_CLUSTER_{}_SIGN", name.to_uppercase()));
        h.set_env(body["authKey"].as_str().unwrap(), &keys.public_pem);
        h.set_env(
            &format!("SD_CLUSTER_{}_SIGN", name.to_uppercase()),
            &format!(r#"{{"algorithm":"{label}"}}"#),
        );
        h.register(&body).await;
        let (status, resp) = h
            .worker_poll(&h.base, name, &keys.token(name, 60), 0, 1)
            .await;
        assert_eq!(status, StatusCode::OK, "{label}: {resp}");
    }
    // Rotation: two PEM blocks in the variable, both keys verify.
    let old = ClusterKeys::generate(Algorithm::RS256);
    let new = ClusterKeys::generate(Algorithm::RS256);
    let mut body = cluster("rot", "screwdriver", &[]);
    body["signOption"] = json!("SD_CLUSTER_ROT_SIGN");
    h.set_env(
        "SD_CLUSTER_ROT_PUBLIC_KEY",
        &format!("{}\n{}", old.public_pem, new.public_pem),
    );
    h.set_env(
        "SD_CLUSTER_ROT_SIGN",
        r#"{"algorithm":"RS256","issuer":"sd-agent","audience":"sd-scheduler"}"#,
    );
    h.register(&body).await;
    let now = unix_now();
    let good = json!({"buildCluster": "rot", "iat": now, "exp": now + 60, "iss": "sd-agent", "aud": "sd-scheduler"});
    for keys in [&old, &new] {
        let (status, resp) = h
            .worker_poll(&h.base, "rot", &keys.sign_as(Algorithm::RS256, &good), 0, 1)
            .await;
        assert_eq!(status, StatusCode::OK, "{resp}");
    }
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("someone");
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    for claims in [wrong_iss, no_aud] {
        let (status, _) = h
            .worker_poll(
                &h.base,
                "rot",
                &new.sign_as(Algorithm::RS256, &claims),
                0,
                1,
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{claims}");
    }
    // After rotation drops the old key, its tokens stop working.
    h.set_env("SD_CLUSTER_ROT_PUBLIC_KEY", &new.public_pem);
    let (status, _) = h
        .worker_poll(&h.base, "rot", &old.sign_as(Algorithm::RS256, &good), 0, 1)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A key variable the scheduler lacks is a 500, not a silent refusal; which variable is for
    // the operator's log, not for whoever holds a token.
    h.set_env("SD_CLUSTER_ROT_PUBLIC_KEY", "");
    h.env.lock().unwrap().remove("SD_CLUSTER_ROT_PUBLIC_KEY");
    let (status, body) = h
        .worker_poll(&h.base, "rot", &new.sign_as(Algorithm::RS256, &good), 0, 1)
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("scheduler's log"), "{body}");
    assert!(!message.contains("SD_CLUSTER_ROT_PUBLIC_KEY"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_lease_is_redelivered_and_a_stale_token_cannot_ack() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.queue.visibility_timeout = Duration::from_millis(500)
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&build(7, "org/repo", json!({}))).await;
    let first = h.poll("sd1", &keys, 0, 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["attempt"], 1);
    let d1 = first[0]["deliveryId"].as_str().unwrap().to_owned();
    // While the lease holds, nobody else gets it.
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = h.poll("sd1", &keys, 5, 10).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["attempt"], 2);
    let d2 = second[0]["deliveryId"].as_str().unwrap().to_owned();
    assert_ne!(d1, d2);
    let report = h.lease_call("sd1", &keys, "ack", &[&d1]).await;
    assert_eq!(
        report["stale"],
        json!([d1]),
        "the old holder cannot ack the newer lease"
    );
    assert_eq!(
        h.scheduler.state().queues.leased("sd1").await.unwrap(),
        vec!["7"]
    );
    let report = h.lease_call("sd1", &keys, "ack", &[&d2, "garbage"]).await;
    assert_eq!(report["done"], json!([d2]));
    assert_eq!(report["stale"], json!(["garbage"]));
    assert!(
        h.scheduler
            .state()
            .queues
            .leased("sd1")
            .await
            .unwrap()
            .is_empty()
    );
    let (_, view) = h
        .call(Method::GET, "/v1/builds/7", Some(&h.sdapi()), None)
        .await;
    assert_eq!(view["state"], "dispatched");
    // A late retry of the start does not queue it again.
    h.submit(&build(7, "org/repo", json!({}))).await;
    assert!(h.ready("sd1").await.is_empty());
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
}

/// With `queue.dead_letter_hold = 0` a dead letter is failed at once: reported FAILURE with the
/// build's token, its row failed, nothing left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_hold_a_dead_letter_is_reported_failure_at_once() {
    let api = FakeScrewdriver::start().await;
    let h = Harness::start_with(Backend::Sqlite, |c| {
        allow_api(c, &api.url);
        c.queue.visibility_timeout = Duration::from_millis(300);
        c.queue.max_attempts = 2;
        c.queue.dead_letter_hold = Duration::ZERO;
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&with_api(build(9, "org/repo", json!({})), &api))
        .await;
    // The API is briefly down: the report is retried.
    api.fail_next(2);
    for attempt in 1..=2 {
        let jobs = h.poll("sd1", &keys, 5, 10).await;
        assert_eq!(jobs[0]["attempt"], attempt);
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
    let update = api
        .wait_for(9, Duration::from_secs(10))
        .await
        .expect("FAILURE reported");
    assert_eq!(update.body["status"], "FAILURE");
    assert!(
        update.body["statusMessage"]
            .as_str()
            .unwrap()
            .contains("2 times"),
        "{}",
        update.body
    );
    assert!(
        update.authorization.starts_with("Bearer ey"),
        "reported with the build's token"
    );
    assert_eq!(api.status(9), "FAILURE");
    let (_, view) = h
        .call(Method::GET, "/v1/builds/9", Some(&h.sdapi()), None)
        .await;
    assert_eq!(view["state"], "failed");
    // Nothing is held: there is nothing an operator could requeue.
    assert!(
        h.scheduler
            .state()
            .queues
            .dead("sd1")
            .await
            .unwrap()
            .is_empty()
    );
    let (status, dead) = h
        .call(
            Method::GET,
            "/v4/buildclusters/sd1/deadletters",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(
        (status, &dead["total"]),
        (StatusCode::OK, &json!(0)),
        "{dead}"
    );
}

/// A FAILURE the API could not take yet outlives the replica that dead-lettered the build: it is
/// kept in Redis, and another replica delivers it once the API is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_report_outlives_the_replica_that_made_it() {
    let api = FakeScrewdriver::start().await;
    let mut h = Harness::start_with(Backend::Sqlite, |c| {
        allow_api(c, &api.url);
        c.queue.visibility_timeout = Duration::from_millis(300);
        c.queue.max_attempts = 1;
        c.queue.dead_letter_hold = Duration::ZERO;
        c.screwdriver.report_timeout = Duration::from_secs(1);
        c.screwdriver.report_attempts = 20;
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&with_api(build(31, "org/repo", json!({})), &api))
        .await;
    api.fail_next(u32::MAX); // the Screwdriver API is down
    assert_eq!(h.poll("sd1", &keys, 5, 10).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty()); // dead-lettered now
    let kept = eventually(Duration::from_secs(10), || async {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg("{sd}:reports")
            .query(&mut h.redis.conn())
            .unwrap();
        (fields == ["31:FAILURE"]).then_some(())
    })
    .await;
    assert!(kept.is_some(), "the FAILURE report is kept in Redis");

    // The replica that made it goes away; another one is running.
    let (replica, base) = h.replica().await;
    let gone = std::mem::replace(&mut h.scheduler, replica);
    gone.shutdown().await;
    h.base = base;
    assert!(api.updates().is_empty());
    api.fail_next(0);
    let update = api
        .wait_for(31, Duration::from_secs(20))
        .await
        .expect("FAILURE delivered by the other replica");
    assert_eq!(update.body["status"], "FAILURE");
    let drained = eventually(Duration::from_secs(5), || async {
        let n: u64 = redis::cmd("HLEN")
            .arg("{sd}:reports")
            .query(&mut h.redis.conn())
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "a delivered report is dropped");
    assert_eq!(api.updates().len(), 1, "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_gives_back_and_renew_keeps() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.queue.visibility_timeout = Duration::from_millis(800);
        c.queue.nack_backoff = Duration::from_millis(200);
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&build(1, "org/repo", json!({}))).await;
    h.submit(&build(
        2,
        "org/repo",
        json!({"screwdriver.cd/blockedBySameJob": false}),
    ))
    .await;
    let jobs = h.poll("sd1", &keys, 0, 10).await;
    assert_eq!(jobs.len(), 2);
    let d1 = jobs[0]["deliveryId"].as_str().unwrap().to_owned();
    let d2 = jobs[1]["deliveryId"].as_str().unwrap().to_owned();
    let (status, resp) = h
        .call(
            Method::POST,
            "/v1/jobs/sd1/nack",
            Some(&keys.token("sd1", 60)),
            Some(&json!({"deliveryIds": [d1], "reason": "local redis down"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp["done"], json!([d1]));
    assert_eq!(
        h.scheduler.state().queues.delayed("sd1").await.unwrap(),
        vec!["1"]
    );
    // Renewing 2 repeatedly keeps it leased past its original deadline.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            h.lease_call("sd1", &keys, "renew", &[&d2]).await["done"],
            json!([d2])
        );
    }
    let again = h.poll("sd1", &keys, 5, 10).await;
    assert_eq!(again.len(), 1, "only the nacked build returns: {again:?}");
    assert_eq!(delivered_build(&again[0]), 1);
    assert_eq!(again[0]["attempt"], 2);
    let (status, resp) = h
        .call(
            Method::POST,
            "/v1/jobs/sd1/ack",
            Some(&keys.token("sd1", 60)),
            Some(&json!({"deliveryIds": []})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        resp["message"]
            .as_str()
            .unwrap()
            .starts_with("deliveryIds:")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_enqueue_and_paused_clusters_get_nothing() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    let token = keys.token("sd1", 60);
    let started = Instant::now();
    let poller = {
        let (http, base) = (h.http.clone(), h.base.clone());
        tokio::spawn(async move {
            common::call_at(
                &http,
                &base,
                Method::GET,
                "/v1/jobs/sd1?wait=30",
                Some(&token),
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.submit(&build(3, "org/repo", json!({}))).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), poller)
        .await
        .expect("woken before wait=30 ran out")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(20));

    h.call(
        Method::PUT,
        "/v4/buildclusters/sd1",
        Some(&h.admin()),
        Some(&json!({"isActive": false})),
    )
    .await;
    let mut named = build(4, "org/repo", json!({"screwdriver.cd/buildCluster": "sd1"}));
    named["jobId"] = json!(999);
    h.submit(&named).await;
    // Paused and nothing else eligible: the build waits unroutable; a paused cluster's poll is empty.
    assert!(h.poll("sd1", &keys, 1, 10).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_by_is_released_by_the_finish_event_and_older_waits_collapse() {
    let api = FakeScrewdriver::start().await;
    let h = Harness::start_with(Backend::Sqlite, |c| allow_api(c, &api.url)).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    let job = |id: u64| {
        let mut b = with_api(build(id, "org/repo", json!({})), &api);
        b["jobId"] = json!(500);
        b["blockedBy"] = json!([500]);
        b
    };
    h.submit(&job(1)).await;
    let jobs = h.poll("sd1", &keys, 0, 10).await;
    h.lease_call(
        "sd1",
        &keys,
        "ack",
        &[jobs[0]["deliveryId"].as_str().unwrap()],
    )
    .await;
    assert_eq!(
        h.event("sd1", &keys, 1, "running").await.1["state"],
        "running"
    );

    h.submit(&job(2)).await;
    assert!(
        h.poll("sd1", &keys, 0, 10).await.is_empty(),
        "2 waits while 1 runs"
    );
    let blocked = api
        .wait_for(2, Duration::from_secs(5))
        .await
        .expect("BLOCKED reported");
    assert_eq!(blocked.body["status"], "BLOCKED");
    // Another job blocked by 500 waits too.
    let mut other = with_api(build(10, "org/other", json!({})), &api);
    other["blockedBy"] = json!([500]);
    h.submit(&other).await;
    h.submit(&job(3)).await;
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
    // Finishing 1 releases everything held behind job 500 at once: 3 runs, 2 collapses into
    // it (only the newest waiting build of a job runs), and 10 runs.
    let released_at = Instant::now();
    assert_eq!(
        h.event("sd1", &keys, 1, "finished").await.1["state"],
        "finished"
    );
    let jobs = h.poll("sd1", &keys, 5, 10).await;
    let latency = released_at.elapsed();
    let mut ids: Vec<u64> = jobs.iter().map(delivered_build).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![3, 10], "newest of job 500 and the other job");
    let collapsed = eventually(Duration::from_secs(5), || async {
        api.updates()
            .into_iter()
            .find(|u| u.build_id == 2 && u.body["status"] == "COLLAPSED")
    })
    .await;
    assert!(collapsed.is_some(), "{:?}", api.updates());
    let (_, view) = h
        .call(Method::GET, "/v1/builds/2", Some(&h.sdapi()), None)
        .await;
    assert_eq!(view["state"], "collapsed");
    // Its steps, as the operator's view shows them, and those of the build that held it.
    let steps = |view: &Value| -> Vec<(String, String)> {
        view["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
                (text(&s["state"]), text(&s["reason"]))
            })
            .collect()
    };
    let states =
        |view: &Value| -> Vec<String> { steps(view).into_iter().map(|(s, _)| s).collect() };
    let two = steps(&view);
    assert_eq!(two.first().map(|s| s.0.as_str()), Some("queued"), "{view}");
    assert!(
        two.contains(&(
            "queued".into(),
            "blocked by a running build of job 500".into()
        )),
        "{view}"
    );
    assert_eq!(
        two.last().map(|s| s.0.as_str()),
        Some("collapsed"),
        "{view}"
    );
    let (_, one) = h
        .call(Method::GET, "/v1/builds/1", Some(&h.sdapi()), None)
        .await;
    assert_eq!(
        states(&one),
        ["queued", "dispatched", "running", "finished"],
        "{one}"
    );
    let times: Vec<i64> = one["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["at"].as_i64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {one}"
    );
    assert_eq!(one["history"][1]["cluster"], "sd1");
    eprintln!("blockedBy release → delivery: {latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_of_a_delivered_build_reaches_its_cluster_only() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    let other = h
        .cluster_with_key(&cluster("sd2", "screwdriver", &[]))
        .await;
    h.call(
        Method::PUT,
        "/v4/buildclusters/sd2",
        Some(&h.admin()),
        Some(&json!({"weightage": 0})),
    )
    .await;
    h.submit(&build(5, "org/repo", json!({}))).await;
    let jobs = h.poll("sd1", &keys, 0, 10).await;
    h.lease_call(
        "sd1",
        &keys,
        "ack",
        &[jobs[0]["deliveryId"].as_str().unwrap()],
    )
    .await;
    let (status, resp) = h
        .call(
            Method::DELETE,
            "/v1/queue/message",
            Some(&h.sdapi()),
            Some(&json!({"buildId": 5, "jobId": 105})),
        )
        .await;
    assert_eq!(
        (status, resp["action"].as_str()),
        (StatusCode::OK, Some("stop queued"))
    );
    assert!(h.poll("sd2", &other, 0, 10).await.is_empty());
    let stops = h.poll("sd1", &keys, 0, 10).await;
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0]["message"]["job"], "stop");
    assert_eq!(stops[0]["message"]["buildConfig"]["buildId"], 5);
    // Events about a build on another cluster are refused.
    let (status, _) = h.event("sd2", &other, 5, "failed").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.event("sd1", &keys, 404_404, "failed").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h.event("sd1", &keys, 5, "exploded").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        h.event("sd1", &keys, 5, "failed").await.1["state"],
        "failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_paused_clusters_lose_their_waiting_builds_to_peers() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.ha.cluster_dead_after = Duration::from_secs(1);
        c.ha.check_interval = Duration::from_millis(100);
    })
    .await;
    let west = h
        .cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;
    let mut farm = cluster("farm", "external", &["mobile"]);
    farm["group"] = json!("macos");
    h.cluster_with_key(&farm).await;
    for id in 1..=3 {
        assert_eq!(
            h.submit(&build(id, "org/repo", json!({}))).await.1["buildClusterName"],
            "west"
        );
    }
    h.submit(&build(
        50,
        "mobile/app",
        json!({"screwdriver.cd/buildCluster": "farm"}),
    ))
    .await;
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    // East's agent polls; west's and farm's stay silent past cluster_dead_after.
    let got = std::sync::Mutex::new(Vec::new());
    eventually(Duration::from_secs(15), || async {
        for j in h.poll("east", &east, 1, 10).await {
            h.lease_call("east", &east, "ack", &[j["deliveryId"].as_str().unwrap()])
                .await;
            got.lock().unwrap().push(delivered_build(&j));
        }
        (got.lock().unwrap().len() >= 3).then_some(())
    })
    .await
    .expect("west's builds re-routed to east");
    let mut got = got.into_inner().unwrap();
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3]);
    assert!(h.ready("west").await.is_empty());
    let (_, view) = h
        .call(Method::GET, "/v1/builds/2", Some(&h.sdapi()), None)
        .await;
    assert_eq!(view["buildClusterName"], "east");
    // The farm's build has nowhere else to go (own group, external): it waits in its queue.
    assert_eq!(h.ready("farm").await, vec!["50"]);
    let metrics = eventually(Duration::from_secs(5), || async {
        let text = h
            .http
            .get(format!("{}/metrics", h.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| {
                l.starts_with("sd_scheduler_queue_depth")
                    && l.contains("cluster=\"farm\"")
                    && l.contains("set=\"ready\"")
                    && l.ends_with(" 1")
            })
            .then_some(text)
    })
    .await;
    assert!(metrics.is_some(), "queue depth exported per cluster");
    // West polls again: healthy, and a pause moves its new builds to east at once.
    assert!(h.poll("west", &west, 0, 10).await.is_empty());
    h.call(
        Method::PUT,
        "/v4/buildclusters/east",
        Some(&h.admin()),
        Some(&json!({"weightage": 0})),
    )
    .await;
    assert_eq!(
        h.submit(&build(20, "org/repo", json!({}))).await.1["buildClusterName"],
        "west"
    );
    h.call(
        Method::PUT,
        "/v4/buildclusters/west",
        Some(&h.admin()),
        Some(&json!({"isActive": false})),
    )
    .await;
    h.call(
        Method::PUT,
        "/v4/buildclusters/east",
        Some(&h.admin()),
        Some(&json!({"weightage": 100})),
    )
    .await;
    eventually(Duration::from_secs(10), || async {
        (h.ready("east").await == ["20"]).then_some(())
    })
    .await
    .expect("paused cluster's build moved");
    assert!(h.ready("west").await.is_empty());
    // Deleting a cluster with nowhere else to go holds its builds, never drops them.
    h.call(
        Method::DELETE,
        "/v4/buildclusters/farm",
        Some(&h.admin()),
        None,
    )
    .await;
    let held = eventually(Duration::from_secs(10), || async {
        let (_, view) = h
            .call(Method::GET, "/v1/builds/50", Some(&h.sdapi()), None)
            .await;
        (view["state"] == "unroutable").then_some(view)
    })
    .await
    .expect("held after delete");
    assert!(held["reason"].as_str().unwrap().contains("farm"), "{held}");
    assert!(h.ready("farm").await.is_empty());
}

async fn two_schedulers_never_deliver_a_build_twice(backend: Backend) {
    let h = Harness::start(backend).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    let (replica, replica_base) = h.replica().await;
    let n = 60u64;
    for id in 1..=n {
        let mut b = build(id, "org/repo", json!({}));
        b["blockedBy"] = json!([]);
        b["annotations"] = json!({"screwdriver.cd/blockedBySameJob": false});
        h.submit(&b).await;
    }
    let mut delivered: HashMap<u64, u32> = HashMap::new();
    let bases = [h.base.clone(), replica_base.clone()];
    let mut handles = Vec::new();
    for base in bases
        .into_iter()
        .chain([h.base.clone(), replica_base.clone()])
    {
        let (http, keys) = (h.http.clone(), keys.clone());
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let (status, body) = common::call_at(
                    &http,
                    &base,
                    Method::GET,
                    "/v1/jobs/sd1?wait=1&max=4",
                    Some(&keys.token("sd1", 60)),
                    None,
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                let jobs = body["jobs"].as_array().unwrap().clone();
                if jobs.is_empty() {
                    return got;
                }
                let ids: Vec<String> = jobs
                    .iter()
                    .map(|j| j["deliveryId"].as_str().unwrap().to_owned())
                    .collect();
                let (status, _) = common::call_at(
                    &http,
                    &base,
                    Method::POST,
                    "/v1/jobs/sd1/ack",
                    Some(&keys.token("sd1", 60)),
                    Some(&json!({"deliveryIds": ids})),
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                got.extend(jobs.iter().map(delivered_build));
            }
        }));
    }
    for handle in handles {
        for id in handle.await.unwrap() {
            *delivered.entry(id).or_default() += 1;
        }
    }
    assert_eq!(delivered.len() as u64, n, "every build delivered");
    assert!(
        delivered.values().all(|c| *c == 1),
        "none twice: {delivered:?}"
    );
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_loses_nothing() {
    let redis = RedisServer::start_with_aof().unwrap();
    let mut h = Harness::start_with_redis(Backend::Sqlite, redis, |_| {}).await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    for id in 1..=20 {
        let mut b = build(
            id,
            "org/repo",
            json!({"screwdriver.cd/blockedBySameJob": false}),
        );
        b["blockedBy"] = json!([]);
        h.submit(&b).await;
    }
    let mut seen = Vec::new();
    let first = h.poll("sd1", &keys, 0, 5).await;
    for j in &first {
        h.lease_call("sd1", &keys, "ack", &[j["deliveryId"].as_str().unwrap()])
            .await;
        seen.push(delivered_build(j));
    }
    h.redis.restart().unwrap();
    let rest = eventually(Duration::from_secs(20), || async {
        let (status, body) = h
            .worker_poll(&h.base, "sd1", &keys.token("sd1", 60), 0, 100)
            .await;
        (status == StatusCode::OK).then_some(body["jobs"].as_array().unwrap().clone())
    })
    .await
    .expect("scheduler reconnects after the restart");
    for j in &rest {
        h.lease_call("sd1", &keys, "ack", &[j["deliveryId"].as_str().unwrap()])
            .await;
        seen.push(delivered_build(j));
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_requeues_what_redis_lost() {
    let mut h = Harness::start_with(Backend::Sqlite, |c| {
        c.reconciler.grace = Duration::from_secs(1);
        c.reconciler.interval = Duration::from_millis(200);
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("sd1", "screwdriver", &[]))
        .await;
    h.submit(&build(11, "org/repo", json!({}))).await;
    // A Redis without persistence restarts empty: the queued build is gone from Redis.
    h.redis.restart().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            h.scheduler.state().queues.ping().await.ok()
        })
        .await
        .is_some()
    );
    assert!(h.ready("sd1").await.is_empty());
    let jobs = eventually(Duration::from_secs(15), || async {
        let jobs = h.poll("sd1", &keys, 1, 10).await;
        (!jobs.is_empty()).then_some(jobs)
    })
    .await
    .expect("reconciler queued it again");
    assert_eq!(delivered_build(&jobs[0]), 11);
    h.lease_call(
        "sd1",
        &keys,
        "ack",
        &[jobs[0]["deliveryId"].as_str().unwrap()],
    )
    .await;
    h.event("sd1", &keys, 11, "running").await;
    // Once running, it is left alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(h.poll("sd1", &keys, 0, 10).await.is_empty());
}

/// A build its cluster acknowledged but never reported started is queued again by the
/// reconciler on that cluster only — even when the cluster has gone silent and a healthy peer
/// could take it: its agent may still hold it in its own queue and launch it when it returns.
/// (Found by the fault suite: moved to the peer, the build ran on two clusters.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciled_dispatched_build_never_moves_to_another_cluster() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.reconciler.grace = Duration::from_secs(1);
        c.reconciler.interval = Duration::from_millis(200);
        c.ha.cluster_dead_after = Duration::from_secs(1);
        c.ha.check_interval = Duration::from_millis(100);
        // Re-routing passes run this often too.
        c.registry.reload_interval = Duration::from_millis(200);
    })
    .await;
    let west = h
        .cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;
    let mut b = build(11, "org/repo", json!({}));
    b["blockedBy"] = json!([]);
    assert_eq!(h.submit(&b).await.1["buildClusterName"], "west");
    let jobs = h.poll("west", &west, 1, 10).await;
    assert_eq!(jobs.len(), 1);
    h.lease_call(
        "west",
        &west,
        "ack",
        &[jobs[0]["deliveryId"].as_str().unwrap()],
    )
    .await;
    // West's agent now holds the build, then goes silent without reporting it started.
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let requeued = eventually(Duration::from_secs(15), || async {
        assert!(
            h.poll("east", &east, 0, 10).await.is_empty(),
            "the build west acknowledged must not reach east"
        );
        (h.ready("west").await == vec!["11".to_owned()]).then_some(())
    })
    .await;
    assert!(requeued.is_some(), "reconciler re-queued it on west");
    // West unhealthy, east healthy, rebalance running: it stays on west.
    for _ in 0..10 {
        assert!(h.poll("east", &east, 0, 10).await.is_empty());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.ready("west").await, vec!["11".to_owned()]);
    // West's agent comes back and gets it again (its launch de-duplicates by buildId).
    let again = h.poll("west", &west, 1, 10).await;
    assert_eq!(
        again.iter().map(delivered_build).collect::<Vec<_>>(),
        vec![11]
    );
}

/// An HA move puts a build on another cluster's queue, and that cluster's agent can fetch and
/// acknowledge it before the move's row update lands: the acknowledgement itself records where
/// the build went, so the agent's events are accepted and the reconciler never re-queues it on
/// the cluster it left. (Found by the fault suite: re-queued there, it ran on two clusters.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_records_the_cluster_that_took_the_build() {
    let h = Harness::start(Backend::Sqlite).await;
    h.cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;
    let mut b = build(12, "org/repo", json!({}));
    b["blockedBy"] = json!([]);
    assert_eq!(h.submit(&b).await.1["buildClusterName"], "west");
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    // The first half of ha::rebalance: the queue moves it; the row has not followed yet.
    let moved = h
        .scheduler
        .state()
        .queues
        .move_waiting("12", "west", "east")
        .await
        .unwrap();
    assert_eq!(moved, sd_scheduler::queue::Moved::Moved);
    let jobs = h.poll("east", &east, 1, 10).await;
    assert_eq!(
        jobs.iter().map(delivered_build).collect::<Vec<_>>(),
        vec![12]
    );
    h.lease_call(
        "east",
        &east,
        "ack",
        &[jobs[0]["deliveryId"].as_str().unwrap()],
    )
    .await;
    let (_, view) = h
        .call(Method::GET, "/v1/builds/12", Some(&h.sdapi()), None)
        .await;
    assert_eq!(
        (&view["state"], &view["buildClusterName"]),
        (&json!("dispatched"), &json!("east")),
        "{view}"
    );
    assert_eq!(
        h.event("east", &east, 12, "running").await.1["state"],
        "running"
    );
}
