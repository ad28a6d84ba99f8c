//! Build intake and routing end to end: real HTTP, real database (both backends), real Redis.

mod common;

use std::time::Duration;

use common::{API_URI, CTX, Harness, allow_api, build, cluster, redis_dump};
use reqwest::{Method, StatusCode};
use sd_testkit::{Backend, CountingServer, FakeScrewdriver, eventually};
use serde_json::{Value, json};

both_backends!(
    routed_build_is_queued_once_with_a_minted_token,
    organization_rule_refuses_with_403_and_changes_nothing,
    bad_build_requests_change_nothing,
    unroutable_build_waits_then_routes_when_a_cluster_appears,
    fallback_and_weight_zero,
    stop_queued_held_and_delivered_builds,
    cache_refresh_across_two_schedulers,
    operations_endpoints,
    redis_outage_then_retry_loses_nothing,
    token_in_body_is_used_as_is,
    a_foreign_api_is_refused_and_sent_nothing,
);

fn ann(cluster: &str) -> Value {
    json!({ "screwdriver.cd/buildCluster": cluster })
}

async fn get_build(h: &Harness, id: u64) -> (StatusCode, Value) {
    h.call(
        Method::GET,
        &format!("/v1/builds/{id}"),
        Some(&h.sdapi()),
        None,
    )
    .await
}

async fn routed_build_is_queued_once_with_a_minted_token(backend: Backend) {
    let h = Harness::start(backend).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    let body = build(8609, "screwdriver-cd/ui", json!({}));
    let (status, resp) = h.submit(&body).await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert_eq!(resp["buildClusterName"], "sd1");
    assert_eq!(resp["state"], "queued");
    assert_eq!(h.ready("sd1").await, vec!["8609"]);

    // Screwdriver's client retries: the same build again is a 200 and no second queue entry.
    let (status, again) = h.submit(&body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["buildClusterName"], "sd1");
    assert_eq!(h.ready("sd1").await, vec!["8609"]);
    // A repeat is answered with the first decision even when this attempt alone could not be
    // routed (it names a cluster that does not exist).
    let mut changed = body.clone();
    changed["annotations"] = ann("nowhere");
    let (status, again) = h.submit(&changed).await;
    assert_eq!(
        (status, again["buildClusterName"].as_str()),
        (StatusCode::OK, Some("sd1")),
        "{again}"
    );
    assert_eq!(h.ready("sd1").await, vec!["8609"]);

    let (status, view) = get_build(&h, 8609).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["buildClusterName"], "sd1");
    assert_eq!(view["state"], "queued");
    assert_eq!(view["jobId"], 8709);

    let msg = h
        .scheduler
        .state()
        .queues
        .message("sd1", "8609")
        .await
        .unwrap()
        .unwrap();
    let config = serde_json::to_value(&msg).unwrap();
    assert_eq!(config["job"], "start");
    let cfg = &config["buildConfig"];
    // Unknown fields pass through to the agent untouched.
    assert_eq!(cfg["causeMessage"], "Started by user alice");
    assert_eq!(cfg["build"], json!({"id": 8609, "status": "QUEUED"}));
    assert_eq!(cfg["jobState"], "ENABLED");
    // The launcher token is minted with the scheduler's key, as Screwdriver's queue-service does.
    let token = cfg["token"].as_str().expect("minted token");
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(h.launcher.public_pem.as_bytes()).unwrap();
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &key,
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256),
    )
    .unwrap()
    .claims;
    assert_eq!(claims["username"], 8609);
    assert_eq!(claims["buildId"], 8609);
    assert_eq!(claims["jobId"], 8709);
    assert_eq!(claims["pipelineId"], 7);
    assert_eq!(claims["scmContext"], CTX);
    assert_eq!(claims["scope"], json!(["temporal"]));
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 12 * 3600);
    // Each minted token has an id of its own (a UUID, as Screwdriver's), and no environment
    // unless auth.environment is set.
    let jti = claims["jti"].as_str().expect("jti");
    assert_eq!(jti.len(), 36, "{jti}");
    assert_eq!(jti.as_bytes()[14], b'4', "a version 4 UUID: {jti}");
    assert!(claims.get("environment").is_none(), "{claims}");
    h.submit(&build(8610, "screwdriver-cd/ui", json!({}))).await;
    let other = h
        .scheduler
        .state()
        .queues
        .message("sd1", "8610")
        .await
        .unwrap()
        .unwrap();
    let other = serde_json::to_value(&other).unwrap();
    let other_claims = jsonwebtoken::decode::<Value>(
        other["buildConfig"]["token"].as_str().unwrap(),
        &key,
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256),
    )
    .unwrap()
    .claims;
    assert_ne!(other_claims["jti"], claims["jti"], "two tokens, one jti");
    // The token is never stored in the database.
    let (_, builds, _) = h.snapshot().await;
    assert_eq!(builds, 2);
}

/// With `auth.environment` set, the minted launcher token carries it, as Screwdriver's
/// queue-service puts its `jwtEnvironment` in the tokens it mints; API tokens must carry it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_carry_the_configured_environment() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.auth.environment = Some("prod".into())
    })
    .await;
    // Registration checks the key variable, as `Harness::register` would set it.
    h.set_env(
        "SD_CLUSTER_SD1_PUBLIC_KEY",
        &sd_testkit::shared_keys("other").public_pem,
    );
    let now = sd_testkit::unix_now();
    let admin = h
        .api
        .sign(&json!({"scope": ["admin"], "environment": "prod", "iat": now, "exp": now + 600}));
    h.set_env(
        "SD_CLUSTER_SD1_PUBLIC_KEY",
        &sd_testkit::shared_keys("other").public_pem,
    );
    let (status, resp) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&admin),
            Some(&cluster("sd1", "screwdriver", &[])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    let sdapi = h
        .api
        .sign(&json!({"scope": ["sdapi"], "environment": "prod", "iat": now, "exp": now + 600}));
    let (status, resp) = h
        .call(
            Method::POST,
            "/v1/queue/message",
            Some(&sdapi),
            Some(&build(1, "org/repo", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    let msg = h
        .scheduler
        .state()
        .queues
        .message("sd1", "1")
        .await
        .unwrap()
        .unwrap();
    let msg = serde_json::to_value(&msg).unwrap();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(h.launcher.public_pem.as_bytes()).unwrap();
    let claims = jsonwebtoken::decode::<Value>(
        msg["buildConfig"]["token"].as_str().unwrap(),
        &key,
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256),
    )
    .unwrap()
    .claims;
    assert_eq!(claims["environment"], "prod");
}

/// A start message naming an API the scheduler does not allow would have the build's fresh
/// token sent there (status reports, the launcher): refused with 422 naming `apiUri`, nothing
/// kept, nothing sent — lookalikes of the allowed API included.
async fn a_foreign_api_is_refused_and_sent_nothing(backend: Backend) {
    let api = FakeScrewdriver::start().await;
    let foreign = CountingServer::start().await;
    let h = Harness::start_with(backend, |c| allow_api(c, &api.url)).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    let before = h.snapshot().await;
    let foreign_host = foreign.url.trim_start_matches("http://");
    let lookalikes = [
        foreign.url.clone(),
        format!("{}@{foreign_host}", api.url),
        format!("{API_URI}.evil.example"),
        format!("{API_URI}@evil.example"),
        format!("{API_URI}:8443"),
        API_URI.replace("https://", "http://"),
    ];
    for api_uri in &lookalikes {
        let mut body = build(8609, "org/repo", json!({}));
        body["apiUri"] = json!(api_uri);
        let (status, resp) = h.submit(&body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{api_uri}: {resp}"
        );
        let msg = resp["message"].as_str().unwrap();
        assert!(msg.starts_with("apiUri:"), "{msg} should name apiUri");
    }
    assert_eq!(
        h.snapshot().await,
        before,
        "a refused build leaves no trace"
    );

    // The allowed APIs are taken; a repeat naming a foreign API is refused all the same.
    for (id, api_uri) in [(1, API_URI), (2, api.url.as_str())] {
        let mut body = build(id, "org/repo", json!({}));
        body["apiUri"] = json!(api_uri);
        assert_eq!(h.submit(&body).await.0, StatusCode::CREATED, "{api_uri}");
    }
    let mut repeat = build(1, "org/repo", json!({}));
    repeat["apiUri"] = json!(foreign.url);
    assert_eq!(h.submit(&repeat).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(foreign.hits(), 0, "something was sent to the foreign API");
}

async fn organization_rule_refuses_with_403_and_changes_nothing(backend: Backend) {
    let h = Harness::start(backend).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    h.register(&cluster("iOS", "external", &["mobile"])).await;
    let before = h.snapshot().await;
    let (status, resp) = h.submit(&build(1, "web/site", ann("iOS"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{resp}");
    let msg = resp["message"].as_str().unwrap();
    assert!(msg.contains("iOS") && msg.contains("web"), "{msg}");
    // The seed's short annotation and the pipeline's shared annotation are held to the same rule.
    let (status, _) = h
        .submit(&build(2, "web/site", json!({"buildCluster": "iOS"})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut shared = build(3, "web/site", json!({}));
    shared["pipeline"]["annotations"] = ann("iOS");
    assert_eq!(h.submit(&shared).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        h.snapshot().await,
        before,
        "a refused build leaves no trace"
    );

    // The listed organization gets its cluster; unnamed builds never land on an external one.
    let (status, resp) = h.submit(&build(4, "mobile/app", ann("iOS"))).await;
    assert_eq!(
        (status, resp["buildClusterName"].as_str()),
        (StatusCode::CREATED, Some("iOS"))
    );
    for id in 10..40 {
        let (_, resp) = h.submit(&build(id, "mobile/app", json!({}))).await;
        assert_eq!(resp["buildClusterName"], "sd1");
    }
    assert_eq!(h.ready("iOS").await, vec!["4"]);
}

async fn bad_build_requests_change_nothing(backend: Backend) {
    let h = Harness::start(backend).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    let before = h.snapshot().await;
    let cases = [
        ("buildId", json!("abc"), "buildId"),
        ("buildId", json!(0), "buildId"),
        // Above 2^63-1 the database would clamp what Redis keeps whole.
        ("buildId", json!(9_223_372_036_854_775_808_u64), "buildId"),
        ("buildId", json!(u64::MAX), "buildId"),
        ("jobId", json!(9_223_372_036_854_775_808_u64), "jobId"),
        ("eventId", json!(9_223_372_036_854_775_808_u64), "eventId"),
        (
            "blockedBy",
            json!([9_223_372_036_854_775_808_u64]),
            "blockedBy[0]",
        ),
        (
            "pipeline",
            json!({"id": 7, "name": "noslash", "scmContext": CTX}),
            "pipeline.name",
        ),
        ("apiUri", json!("not a url"), "apiUri"),
        ("blockedBy", json!([1, "two"]), "blockedBy[1]"),
        (
            "annotations",
            json!({"screwdriver.cd/buildCluster": ["a"]}),
            "annotations.screwdriver.cd/buildCluster",
        ),
    ];
    for (key, value, field) in cases {
        let mut body = build(5, "org/repo", json!({}));
        body[key] = value;
        let (status, resp) = h.submit(&body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
        let msg = resp["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("{field}:")),
            "{msg} should name {field}"
        );
    }
    let mut missing = build(5, "org/repo", json!({}));
    missing.as_object_mut().unwrap().remove("container");
    let (status, resp) = h.submit(&missing).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        resp["message"].as_str().unwrap().starts_with("container:"),
        "{resp}"
    );

    // A named cluster that does not exist is refused, never silently routed elsewhere.
    let (status, resp) = h.submit(&build(6, "org/repo", ann("nope"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(resp["message"].as_str().unwrap().contains("nope"));

    // Other Screwdriver message types are a clear 501.
    let (status, resp) = h
        .call(
            Method::POST,
            "/v1/queue/message?type=periodic",
            Some(&h.sdapi()),
            Some(&build(7, "org/repo", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert!(resp["message"].as_str().unwrap().contains("periodic"));

    // Intake needs the sdapi scope.
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/queue/message",
            Some(&h.admin()),
            Some(&build(8, "org/repo", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/queue/message",
            None,
            Some(&build(8, "org/repo", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = h
        .call(
            Method::DELETE,
            "/v1/queue/message",
            Some(&h.user()),
            Some(&json!({"buildId": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h
        .call(
            Method::DELETE,
            "/v1/queue/message",
            Some(&h.sdapi()),
            Some(&json!({"buildId": 9_223_372_036_854_775_808_u64})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = get_build(&h, 9_223_372_036_854_775_808).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(h.snapshot().await, before);
}

async fn unroutable_build_waits_then_routes_when_a_cluster_appears(backend: Backend) {
    let h = Harness::start(backend).await;
    let (status, resp) = h.submit(&build(42, "org/repo", json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert_eq!(resp["state"], "unroutable");
    assert_eq!(resp["buildClusterName"], Value::Null);
    assert!(resp["reason"].as_str().unwrap().contains(CTX));
    let (_, view) = get_build(&h, 42).await;
    assert_eq!(view["state"], "unroutable");
    // Retried by Screwdriver while held: still one build, still held.
    assert_eq!(
        h.submit(&build(42, "org/repo", json!({}))).await.0,
        StatusCode::OK
    );

    h.register(&cluster("late", "screwdriver", &[])).await;
    // The row is claimed before the enqueue, so wait for the queue itself.
    eventually(Duration::from_secs(10), || async {
        (h.ready("late").await == ["42"]).then_some(())
    })
    .await
    .expect("held build queued after the registry change");
    let (_, routed) = get_build(&h, 42).await;
    assert_eq!(routed["state"], "queued");
    assert_eq!(routed["buildClusterName"], "late");
}

async fn fallback_and_weight_zero(backend: Backend) {
    let h = Harness::start(backend).await;
    let mut ios = cluster("iOS", "external", &["mobile"]);
    ios["group"] = json!("macos");
    let mut backup = cluster("iOS-backup", "external", &["mobile"]);
    backup["group"] = json!("macos");
    h.register(&ios).await;
    h.register(&backup).await;
    let mut special = cluster("special", "screwdriver", &[]);
    special["weightage"] = json!(0);
    h.register(&special).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;

    let pause = json!({"isActive": false});
    let (status, _) = h
        .call(
            Method::PUT,
            "/v4/buildclusters/iOS",
            Some(&h.admin()),
            Some(&pause),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, resp) = h.submit(&build(1, "mobile/app", ann("iOS"))).await;
    assert_eq!(
        resp["buildClusterName"], "iOS-backup",
        "inactive named cluster falls back within its group"
    );

    h.call(
        Method::PUT,
        "/v4/buildclusters/iOS-backup",
        Some(&h.admin()),
        Some(&pause),
    )
    .await;
    let (status, resp) = h.submit(&build(2, "mobile/app", ann("iOS"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(resp["state"], "unroutable", "never onto Linux: {resp}");
    assert!(h.ready("sd1").await.is_empty());

    let (_, resp) = h.submit(&build(3, "web/app", ann("special"))).await;
    assert_eq!(
        resp["buildClusterName"], "special",
        "weight 0 is reachable by name"
    );
    for id in 10..30 {
        let (_, resp) = h.submit(&build(id, "web/app", json!({}))).await;
        assert_eq!(
            resp["buildClusterName"], "sd1",
            "weight 0 is never picked at random"
        );
    }

    // Reactivating the named cluster releases the held build to it.
    h.call(
        Method::PUT,
        "/v4/buildclusters/iOS",
        Some(&h.admin()),
        Some(&json!({"isActive": true})),
    )
    .await;
    let view = eventually(Duration::from_secs(10), || async {
        let (_, view) = get_build(&h, 2).await;
        (view["state"] == "queued").then_some(view)
    })
    .await
    .expect("held build routed after reactivation");
    assert_eq!(view["buildClusterName"], "iOS");
}

async fn stop_queued_held_and_delivered_builds(backend: Backend) {
    let h = Harness::start(backend).await;
    let stop = |id: u64| json!({"buildId": id, "jobId": 100 + id, "blockedBy": [100 + id]});
    let del = |id: u64| {
        let h = &h;
        async move {
            h.call(
                Method::DELETE,
                "/v1/queue/message",
                Some(&h.sdapi()),
                Some(&stop(id)),
            )
            .await
        }
    };
    // Held builds are simply stopped.
    h.submit(&build(1, "org/repo", json!({}))).await;
    let (status, resp) = del(1).await;
    assert_eq!(
        (status, resp["action"].as_str()),
        (StatusCode::OK, Some("removed"))
    );
    assert_eq!(get_build(&h, 1).await.1["state"], "stopped");

    h.register(&cluster("sd1", "screwdriver", &[])).await;
    h.submit(&build(2, "org/repo", json!({}))).await;
    h.submit(&build(3, "org/repo", json!({}))).await;
    assert_eq!(h.ready("sd1").await, vec!["2", "3"]);
    let (_, resp) = del(2).await;
    assert_eq!(resp["action"], "removed");
    assert_eq!(resp["state"], "stopped");
    assert_eq!(h.ready("sd1").await, vec!["3"]);
    // A stopped build is not revived by a late retry of its start.
    assert_eq!(
        h.submit(&build(2, "org/repo", json!({}))).await.1["state"],
        "stopped"
    );
    assert_eq!(h.ready("sd1").await, vec!["3"]);

    // Leased by an agent: the cluster gets a stop message instead.
    {
        let mut conn = h.redis.conn();
        let _: () = redis::cmd("ZREM")
            .arg("{sd}:q:sd1:ready")
            .arg("3")
            .query(&mut conn)
            .unwrap();
        let _: () = redis::cmd("ZADD")
            .arg("{sd}:q:sd1:leased")
            .arg(i64::MAX)
            .arg("3")
            .query(&mut conn)
            .unwrap();
    }
    let (_, resp) = del(3).await;
    assert_eq!(resp["action"], "stop queued");
    assert_eq!(h.ready("sd1").await, vec!["stop:3"]);
    let msg = serde_json::to_value(
        h.scheduler
            .state()
            .queues
            .message("sd1", "stop:3")
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(msg["job"], "stop");
    assert_eq!(msg["buildConfig"]["buildId"], 3);
    // Asking twice queues one stop.
    del(3).await;
    assert_eq!(h.ready("sd1").await, vec!["stop:3"]);

    let (status, resp) = del(999).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(resp["message"].as_str().unwrap().contains("999"));
}

async fn cache_refresh_across_two_schedulers(backend: Backend) {
    let h = Harness::start(backend).await;
    let (replica, replica_base) = h.replica().await;
    assert!(replica.state().cache.snapshot().is_empty());
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    // Pub/sub, not the (hour-long) periodic reload, brings the change to the other replica.
    eventually(Duration::from_secs(5), || async {
        (replica.state().cache.snapshot().len() == 1).then_some(())
    })
    .await
    .expect("replica cache refreshed");
    let (status, resp) = common::call_at(
        &h.http,
        &replica_base,
        Method::POST,
        "/v1/queue/message",
        Some(&h.sdapi()),
        Some(&build(5, "org/repo", json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(resp["buildClusterName"], "sd1");
    // Idempotency holds across replicas: the same build on the first one is a repeat.
    assert_eq!(
        h.submit(&build(5, "org/repo", json!({}))).await.0,
        StatusCode::OK
    );

    h.call(
        Method::PUT,
        "/v4/buildclusters/sd1",
        Some(&h.admin()),
        Some(&json!({"isActive": false})),
    )
    .await;
    eventually(Duration::from_secs(5), || async {
        let snap = replica.state().cache.snapshot();
        (!snap[0].fields.is_active).then_some(())
    })
    .await
    .expect("pause reached the replica");
    let (_, resp) = common::call_at(
        &h.http,
        &replica_base,
        Method::POST,
        "/v1/queue/message",
        Some(&h.sdapi()),
        Some(&build(6, "org/repo", json!({}))),
    )
    .await;
    assert_eq!(resp["state"], "unroutable");
    replica.shutdown().await;
}

async fn operations_endpoints(backend: Backend) {
    let mut h = Harness::start(backend).await;
    let (status, body) = h.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body) = h.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["database"], "ok");

    let (status, spec) = h.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v4/buildclusters",
        "/v4/buildclusters/{name}",
        "/v1/queue/message",
        "/v1/builds/{build_id}",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(spec["components"]["schemas"].get("StartMessage").is_some());

    h.call(Method::GET, "/v4/buildclusters", Some(&h.user()), None)
        .await;
    // Made-up methods (answered 405) must not each become a label value: one series for all.
    for made_up in ["FOOBAR", "BREWCOFFEE"] {
        let method = Method::from_bytes(made_up.as_bytes()).unwrap();
        h.call(method, "/v4/buildclusters", None, None).await;
    }
    let text = h.metrics().await;
    assert!(text.contains("sd_scheduler_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/v4/buildclusters\""), "{text}");
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(
        !text.contains("FOOBAR") && !text.contains("BREWCOFFEE"),
        "a client's made-up method became a label: {text}"
    );

    let (status, body) = h.call(Method::GET, "/no/such/thing", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["statusCode"], 404);

    // However many made-up methods, paths and cluster names: the series count stays put.
    let series = |text: String| {
        text.lines()
            .filter(|l| l.starts_with("sd_scheduler_http_"))
            .count()
    };
    let hostile_round = |round: usize| {
        let h = &h;
        async move {
            for i in 0..20 {
                let made_up = Method::from_bytes(format!("X{round}M{i}").as_bytes()).unwrap();
                h.call(made_up, "/v4/buildclusters", None, None).await;
                h.call(Method::GET, &format!("/made/up/{round}/{i}"), None, None)
                    .await;
                h.call(
                    Method::GET,
                    &format!("/v1/jobs/nosuch-{round}-{i}"),
                    Some("x"),
                    None,
                )
                .await;
                h.call(
                    Method::GET,
                    &format!("/v4/buildclusters/nosuch-{round}-{i}"),
                    None,
                    None,
                )
                .await;
            }
        }
    };
    hostile_round(0).await;
    let before = series(h.metrics().await);
    hostile_round(1).await;
    assert_eq!(
        series(h.metrics().await),
        before,
        "a client added metric series"
    );

    h.redis.kill();
    let (status, body) = h.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["database"], "ok");
    assert!(
        body["redis"].as_str().unwrap().starts_with("unreachable"),
        "{body}"
    );
    h.redis.restart().unwrap();
    let ready = eventually(Duration::from_secs(10), || async {
        let (status, _) = h.call(Method::GET, "/readyz", None, None).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(ready.is_some(), "ready again once Redis is back");
}

/// Redis down during intake: 503 (Screwdriver retries), the row is kept, and the retry after
/// Redis returns queues the build exactly once.
async fn redis_outage_then_retry_loses_nothing(backend: Backend) {
    let mut h = Harness::start(backend).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    h.redis.kill();
    let (status, resp) = h.submit(&build(77, "org/repo", json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains("retry"));
    h.redis.restart().unwrap();
    let resp = eventually(Duration::from_secs(10), || async {
        let (status, resp) = h.submit(&build(77, "org/repo", json!({}))).await;
        (status == StatusCode::OK).then_some(resp)
    })
    .await
    .expect("retry succeeds once Redis is back");
    assert_eq!(resp["buildClusterName"], "sd1");
    assert_eq!(h.ready("sd1").await, vec!["77"]);
    h.submit(&build(77, "org/repo", json!({}))).await;
    assert_eq!(h.ready("sd1").await, vec!["77"]);
}

async fn token_in_body_is_used_as_is(backend: Backend) {
    let h = Harness::start_with(backend, |c| c.auth.private_key_file = None).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    let before = h.snapshot().await;
    // Without a key to mint with, a build without a token is refused up front.
    let (status, resp) = h.submit(&build(1, "org/repo", json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        resp["message"]
            .as_str()
            .unwrap()
            .contains("auth.private_key_file"),
        "{resp}"
    );
    assert_eq!(h.snapshot().await, before);

    let mut body = build(2, "org/repo", json!({}));
    body["token"] = json!("launcher-token-from-the-api");
    assert_eq!(h.submit(&body).await.0, StatusCode::CREATED);
    let msg = serde_json::to_value(
        h.scheduler
            .state()
            .queues
            .message("sd1", "2")
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(msg["buildConfig"]["token"], "launcher-token-from-the-api");
    let dump = redis_dump(&h.redis);
    assert!(
        dump.values()
            .any(|v| v.contains("launcher-token-from-the-api"))
    );
    // Kept apart for re-enqueueing, never inside the stored payload.
    let row = h
        .scheduler
        .state()
        .intake
        .builds()
        .get(2)
        .await
        .unwrap()
        .unwrap();
    assert!(!row.message.contains("launcher-token-from-the-api"));
    assert_eq!(
        row.body_token.as_deref(),
        Some("launcher-token-from-the-api")
    );
}
