//! The cluster registry API against real SQLite and PostgreSQL and a real redis-server.

mod common;

use common::{CTX, Harness, cluster};
use reqwest::{Method, StatusCode};
use sd_testkit::{Backend, unix_now};
use serde_json::{Value, json};

both_backends!(
    crud_round_trip,
    seed_fixture_and_its_inactive_duplicate,
    tokens_and_scopes,
    invalid_bodies_change_nothing,
    oversize_body_is_413_and_changes_nothing,
    one_identity_per_cluster,
    key_variables_are_checked_and_never_leak,
    aliases_serve_the_same_registry,
);

async fn crud_round_trip(backend: Backend) {
    let h = Harness::start(backend).await;
    let admin = h.admin();
    let created = h.register(&cluster("iOS", "external", &["mobile"])).await;
    assert_eq!(created["name"], "iOS");
    assert_eq!(created["weightage"], 100);
    assert_eq!(created["group"], "default");
    assert_eq!(created["isActive"], true);
    assert!(created["id"].as_i64().unwrap() > 0);

    let (status, list) = h
        .call(Method::GET, "/v4/buildclusters", Some(&h.user()), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (status, one) = h
        .call(Method::GET, "/v4/buildclusters/iOS", Some(&h.user()), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, created);

    let (status, paused) = h
        .call(
            Method::PUT,
            "/v4/buildclusters/iOS",
            Some(&admin),
            Some(&json!({"isActive": false, "weightage": 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["isActive"], false);
    assert_eq!(paused["weightage"], 20);
    assert_eq!(paused["scmOrganizations"], json!(["mobile"]));
    // The cache follows every write on this replica at once.
    let cached = h.scheduler.state().cache.snapshot();
    assert!(!cached[0].fields.is_active);

    let (status, body) = h
        .call(Method::DELETE, "/v4/buildclusters/iOS", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = h
        .call(Method::GET, "/v4/buildclusters/iOS", Some(&h.user()), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["statusCode"], 404);
    assert_eq!(body["error"], "Not Found");
    assert!(body["message"].as_str().unwrap().contains("iOS"));
    assert!(h.scheduler.state().cache.snapshot().is_empty());

    for (method, path) in [
        (Method::PUT, "/v4/buildclusters/nope"),
        (Method::DELETE, "/v4/buildclusters/nope"),
    ] {
        let (status, _) = h
            .call(method, path, Some(&admin), Some(&json!({"isActive": true})))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

/// The design seed's sample records: its inactive second copy of `identity` is a duplicate.
/// Its key variables predate the `SD_CLUSTER_` prefix: moved under it (as an operator would
/// rename them), every other record registers.
async fn seed_fixture_and_its_inactive_duplicate(backend: Backend) {
    let h = Harness::start(backend).await;
    let seed: Vec<Value> =
        serde_json::from_str(include_str!("../../tests/fixtures/seed-clusters.json")).unwrap();
    let (status, body) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&seed[0]),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("authKey: GQ1_PUBLIC_KEY is not a cluster key variable"),
        "{body}"
    );
    let mut statuses = Vec::new();
    for record in &seed {
        let mut record = record.clone();
        record["authKey"] = json!(format!(
            "SD_CLUSTER_{}",
            record["authKey"].as_str().unwrap()
        ));
        h.set_env(
            record["authKey"].as_str().unwrap(),
            &sd_testkit::shared_keys("other").public_pem,
        );
        let record = &record;
        let (status, body) = h
            .call(
                Method::POST,
                "/v4/buildclusters",
                Some(&h.admin()),
                Some(record),
            )
            .await;
        statuses.push((status, body));
    }
    let codes: Vec<u16> = statuses.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(codes, vec![201, 201, 201, 409, 201]);
    let (_, conflict) = &statuses[3];
    assert_eq!(conflict["statusCode"], 409);
    let msg = conflict["message"].as_str().unwrap();
    assert!(
        msg.contains("identity") && msg.contains("github:git.ouroath.com"),
        "{msg}"
    );
    // The first copy stands unchanged: pausing is isActive on the one record.
    let (_, identity) = h
        .call(
            Method::GET,
            "/v4/buildclusters/identity",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(identity["isActive"], true);
    assert_eq!(
        identity["scmOrganizations"],
        json!(["identity_org1", "identity_org2"])
    );
    let (_, list) = h
        .call(Method::GET, "/buildClusters", Some(&h.user()), None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 4);
}

async fn tokens_and_scopes(backend: Backend) {
    let h = Harness::start(backend).await;
    let body = cluster("sd1", "screwdriver", &[]);
    let before = h.snapshot().await;
    let now = sd_testkit::unix_now();
    let expired = h
        .api
        .sign(&json!({"scope": ["admin"], "iat": now - 7200, "exp": now - 3600}));
    let foreign = sd_testkit::shared_keys("other").api_token(&["admin"]);
    let no_exp = h.api.sign(&json!({"scope": ["admin"], "iat": now}));
    let cases: Vec<(Option<String>, StatusCode, &str)> = vec![
        (None, StatusCode::UNAUTHORIZED, "missing"),
        (
            Some("not-a-jwt".into()),
            StatusCode::UNAUTHORIZED,
            "invalid token",
        ),
        (Some(expired), StatusCode::UNAUTHORIZED, "expired"),
        (Some(foreign), StatusCode::UNAUTHORIZED, "signature"),
        (Some(no_exp), StatusCode::UNAUTHORIZED, "exp"),
        (Some(h.user()), StatusCode::FORBIDDEN, "scope admin"),
        (Some(h.sdapi()), StatusCode::FORBIDDEN, "scope admin"),
    ];
    for (token, want, words) in cases {
        let (status, resp) = h
            .call(
                Method::POST,
                "/v4/buildclusters",
                token.as_deref(),
                Some(&body),
            )
            .await;
        assert_eq!(status, want, "{resp}");
        let msg = resp["message"].as_str().unwrap();
        assert!(msg.contains(words), "{msg} should mention {words}");
    }
    assert_eq!(
        h.snapshot().await,
        before,
        "refused writes must change nothing"
    );
    // Reads need user or admin; the build-intake scope alone does not read the registry.
    assert_eq!(
        h.call(Method::GET, "/v4/buildclusters", Some(&h.user()), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        h.call(Method::GET, "/v4/buildclusters", Some(&h.admin()), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        h.call(Method::GET, "/v4/buildclusters", Some(&h.sdapi()), None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.call(Method::GET, "/v4/buildclusters", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// `(status, message)` of `GET path` with `token`.
async fn get_with(h: &Harness, path: &str, token: &str) -> (StatusCode, String) {
    let (status, body) = h.call(Method::GET, path, Some(token), None).await;
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    (status, message)
}

/// Screwdriver's guest login carries `user` too: refused on every route all the same, with
/// 403 (a valid token that may not), as a missing scope is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_tokens_are_refused_on_every_route() {
    let h = Harness::start(Backend::Sqlite).await;
    h.register(&cluster("sd1", "screwdriver", &[])).await;
    h.submit(&common::build(5, "org/repo", json!({}))).await;
    let before = h.snapshot().await;
    let guest = h.api.api_token(&["user", "guest"]);
    for path in ["/v4/buildclusters", "/v4/buildclusters/sd1", "/v1/builds/5"] {
        let (status, message) = get_with(&h, path, &guest).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {message}");
        assert!(message.contains("guest"), "{path}: {message}");
        // The same token without `guest` reads.
        let user = h.api.api_token(&["user"]);
        assert_eq!(get_with(&h, path, &user).await.0, StatusCode::OK, "{path}");
    }
    for (method, path, scopes, body) in [
        (
            Method::POST,
            "/v4/buildclusters",
            ["admin", "guest"],
            cluster("sd2", "screwdriver", &[]),
        ),
        (
            Method::POST,
            "/v1/queue/message",
            ["sdapi", "guest"],
            common::build(6, "org/repo", json!({})),
        ),
        (
            Method::DELETE,
            "/v1/queue/message",
            ["sdapi", "guest"],
            json!({"buildId": 5}),
        ),
    ] {
        let token = h.api.api_token(&scopes);
        let (status, resp) = h.call(method, path, Some(&token), Some(&body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {resp}");
    }
    assert_eq!(h.snapshot().await, before, "guests changed something");
}

/// Time and lifetime claims: not before `nbf`, not issued in the future, `iat` present, no
/// longer-lived than `auth.max_token_lifetime` (12 h by default, Screwdriver's longest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_and_lifetime_are_checked() {
    let h = Harness::start(Backend::Sqlite).await;
    let now = unix_now();
    let token = |extra: Value| {
        let mut claims =
            json!({"username": "alice", "scope": ["user"], "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        h.api.sign(&claims)
    };
    let refused = [
        (json!({"nbf": now + 3600}), "nbf"),
        (json!({"iat": now + 3600, "exp": now + 7200}), "iat"),
        (json!({"iat": null}), "iat"),
        (json!({"exp": now + 12 * 3600 + 1}), "max_token_lifetime"),
        (
            json!({"iat": now - 3600, "exp": now + 365 * 86400}),
            "lifetime",
        ),
    ];
    for (extra, words) in refused {
        let (status, message) = get_with(&h, "/v4/buildclusters", &token(extra.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{extra}: {message}");
        assert!(
            message.contains(words),
            "{extra}: {message} should mention {words}"
        );
    }
    for extra in [
        json!({"nbf": now - 60}),
        json!({"exp": now + 12 * 3600}),
        json!({"jti": "2b0f6c4e-0000-4000-8000-000000000000"}),
    ] {
        let (status, message) = get_with(&h, "/v4/buildclusters", &token(extra.clone())).await;
        assert_eq!(status, StatusCode::OK, "{extra}: {message}");
    }

    // A tighter cap is the operator's to set.
    let tight = Harness::start_with(Backend::Sqlite, |c| {
        c.auth.max_token_lifetime = std::time::Duration::from_secs(300);
    })
    .await;
    let (status, message) = get_with(&tight, "/v4/buildclusters", &tight.user()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{message}");
    assert!(message.contains("300s"), "{message}");
}

/// `iss`, `aud` and Screwdriver's `environment` are checked when configured (a token of the
/// `beta` API is refused by a `prod` scheduler trusting the same key), ignored when not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_audience_and_environment_when_configured() {
    let now = unix_now();
    let sign = |h: &Harness, extra: Value| {
        let mut claims =
            json!({"username": "alice", "scope": ["user"], "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        h.api.sign(&claims)
    };
    let good = json!({"iss": "sd-api", "aud": "sd-scheduler", "environment": "prod"});
    let with = |k: &str, v: Value| {
        let mut claims = good.clone();
        match v {
            Value::Null => {
                claims.as_object_mut().unwrap().remove(k);
            }
            v => claims[k] = v,
        }
        claims
    };

    let strict = Harness::start_with(Backend::Sqlite, |c| {
        c.auth.issuer = Some("sd-api".into());
        c.auth.audience = Some("sd-scheduler".into());
        c.auth.environment = Some("prod".into());
    })
    .await;
    let (status, message) =
        get_with(&strict, "/v4/buildclusters", &sign(&strict, good.clone())).await;
    assert_eq!(status, StatusCode::OK, "{message}");
    let refused = [
        (with("iss", json!("someone-else")), "iss"),
        (with("iss", Value::Null), "iss"),
        (with("aud", json!("another-service")), "aud"),
        (with("aud", Value::Null), "aud"),
        (with("environment", json!("beta")), "environment"),
        (with("environment", Value::Null), "environment"),
    ];
    for (claims, words) in refused {
        let (status, message) =
            get_with(&strict, "/v4/buildclusters", &sign(&strict, claims.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{claims}: {message}");
        assert!(
            message.contains(words),
            "{claims}: {message} should mention {words}"
        );
    }

    // Unset, none of them is looked at: Screwdriver's tokens carry no iss or aud.
    let h = Harness::start(Backend::Sqlite).await;
    for claims in [
        json!({}),
        with("iss", json!("someone-else")),
        with("aud", json!("another-service")),
        with("environment", json!("beta")),
    ] {
        let (status, message) = get_with(&h, "/v4/buildclusters", &sign(&h, claims.clone())).await;
        assert_eq!(status, StatusCode::OK, "{claims}: {message}");
    }
}

async fn invalid_bodies_change_nothing(backend: Backend) {
    let h = Harness::start(backend).await;
    h.register(&cluster("existing", "screwdriver", &[])).await;
    let before = h.snapshot().await;
    let with = |patch: Value| {
        let mut body = cluster("fresh", "external", &["org"]);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (with(json!({"name": "bad name!"})), "name"),
        (with(json!({"name": "n".repeat(101)})), "name"),
        (
            with(json!({"managedByEmail": "not-an-email"})),
            "managedByEmail",
        ),
        (with(json!({"scmOrganizations": []})), "scmOrganizations"),
        (with(json!({"weightage": 101})), "weightage"),
        (with(json!({"weightage": -5})), "weightage"),
        (with(json!({"surprise": true})), "surprise"),
        (
            with(json!({"authKey": "-----BEGIN PUBLIC KEY-----"})),
            "authKey",
        ),
        (with(json!({"group": "x".repeat(51)})), "group"),
        (json!({"name": "fresh"}), "scmContext"),
    ];
    for (body, field) in cases {
        let (status, resp) = h
            .call(
                Method::POST,
                "/v4/buildclusters",
                Some(&h.admin()),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {resp}");
        let msg = resp["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("{field}:")),
            "{msg} should name {field}"
        );
    }
    // Updates are checked against the whole record.
    let updates = [
        (json!({"weightage": 1000}), "weightage"),
        (json!({"managedBy": "external"}), "scmOrganizations"),
        (json!({"name": "renamed"}), "name"),
        (json!({"isActive": "maybe"}), "isActive"),
        (json!({"unknown": 1}), "unknown"),
    ];
    for (body, field) in updates {
        let (status, resp) = h
            .call(
                Method::PUT,
                "/v4/buildclusters/existing",
                Some(&h.admin()),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {resp}");
        assert!(
            resp["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{resp}"
        );
    }
    // Malformed JSON and non-objects are 400.
    let resp = h
        .http
        .post(format!("{}/v4/buildclusters", h.base))
        .bearer_auth(h.admin())
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (status, _) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&json!([1, 2])),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.snapshot().await,
        before,
        "refused bodies must change nothing"
    );
}

async fn oversize_body_is_413_and_changes_nothing(backend: Backend) {
    let h = Harness::start(backend).await;
    let before = h.snapshot().await;
    let mut body = cluster("big", "screwdriver", &[]);
    body["description"] = json!("x".repeat(1024 * 1024 + 10));
    let (status, resp) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(resp["statusCode"], 413);
    let mut build = common::build(1, "org/repo", json!({}));
    build["padding"] = json!("y".repeat(1024 * 1024 + 10));
    let (status, _) = h.submit(&build).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h.snapshot().await, before);
}

/// A name is one cluster's identity (queue, heartbeat, builds): unique across scmContexts and
/// up to what would share key variables; a key variable belongs to one cluster. A record that
/// tried to borrow a name or a key is refused and changes nothing, so its key never verifies.
async fn one_identity_per_cluster(backend: Backend) {
    let h = Harness::start(backend).await;
    let c1 = h.cluster_with_key(&cluster("c1", "screwdriver", &[])).await;
    h.register(&cluster("ios-farm", "external", &["mobile"]))
        .await;
    let before = h.snapshot().await;

    // The same name under another scmContext, with a key of its own.
    let intruder = sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
    let mut twin = cluster("c1", "screwdriver", &[]);
    twin["scmContext"] = json!("gitlab:gitlab.com");
    twin["authKey"] = json!("SD_CLUSTER_C1_GITLAB_PUBLIC_KEY");
    h.set_env("SD_CLUSTER_C1_GITLAB_PUBLIC_KEY", &intruder.public_pem);
    let refused = |name: &str, body: &Value| {
        let m = body["message"].as_str().unwrap_or_default().to_owned();
        assert!(m.contains("is taken") && m.contains(name), "{body}");
    };
    let (status, body) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&twin),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    refused("c1", &body);
    // Names whose key variables would be spelled alike.
    for alike in ["ios.farm", "IOS_FARM", "Ios-Farm"] {
        let mut body = cluster(alike, "external", &["mobile"]);
        body["authKey"] = json!(format!("SD_CLUSTER_OTHER_{}", alike.len()));
        h.set_env(body["authKey"].as_str().unwrap(), &intruder.public_pem);
        let (status, answer) = h
            .call(
                Method::POST,
                "/v4/buildclusters",
                Some(&h.admin()),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{alike}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("share key variables"),
            "{answer}"
        );
    }
    // Another cluster naming c1's key variable, at registration or by an update.
    let mut borrower = cluster("borrower", "screwdriver", &[]);
    borrower["authKey"] = json!("SD_CLUSTER_C1_PUBLIC_KEY");
    let (status, body) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&borrower),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already the key of cluster c1"),
        "{body}"
    );
    let (status, body) = h
        .call(
            Method::PUT,
            "/v4/buildclusters/ios-farm",
            Some(&h.admin()),
            Some(&json!({"authKey": "SD_CLUSTER_C1_PUBLIC_KEY"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(h.snapshot().await, before, "refused records change nothing");

    // So a github build for c1 goes to c1's agent only: the intruder's key pulls nothing.
    let (status, _) = h
        .submit(&common::build(
            7,
            "org/repo",
            json!({"screwdriver.cd/buildCluster": "c1"}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = h
        .worker_poll(&h.base, "c1", &intruder.token("c1", 60), 0, 10)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.ready("c1").await,
        ["7"],
        "still waiting for c1's own agent"
    );
    let jobs = h.poll("c1", &c1, 0, 10).await;
    assert_eq!(common::delivered_build(&jobs[0]), 7);
}

/// `authKey`/`signOption` may name only variables under `registry.variable_prefix`, which must
/// exist and parse; no answer ever quotes a variable's value, whoever asks.
async fn key_variables_are_checked_and_never_leak(backend: Backend) {
    let h = Harness::start(backend).await;
    let secret = "hunter2-secret";
    for var in [
        "PATH",
        "AWS_SECRET_ACCESS_KEY",
        "SD_CLUSTER_SECRET",
        "SD_CLUSTER_SIGN_SECRET",
    ] {
        h.set_env(var, secret);
    }
    h.set_env("SD_CLUSTER_SIGN_QUOTED", &format!("\"{secret}\""));
    h.set_env(
        "SD_CLUSTER_GOOD_KEY",
        &sd_testkit::shared_keys("other").public_pem,
    );
    let attempt = |auth: &str, sign: Option<&str>| {
        let mut body = cluster("c1", "screwdriver", &[]);
        body["authKey"] = json!(auth);
        if let Some(sign) = sign {
            body["signOption"] = json!(sign);
        }
        body
    };
    for (body, field, says) in [
        (
            attempt("PATH", None),
            "authKey",
            "not a cluster key variable",
        ),
        (
            attempt("AWS_SECRET_ACCESS_KEY", None),
            "authKey",
            "SD_CLUSTER_",
        ),
        (
            attempt("SD_CLUSTER_UNSET", None),
            "authKey",
            "SD_CLUSTER_UNSET is not set",
        ),
        (
            attempt("SD_CLUSTER_SECRET", None),
            "authKey",
            "holds no PEM public key",
        ),
        (
            attempt("SD_CLUSTER_GOOD_KEY", Some("PATH")),
            "signOption",
            "not a cluster key variable",
        ),
        (
            attempt("SD_CLUSTER_GOOD_KEY", Some("SD_CLUSTER_SIGN_SECRET")),
            "signOption",
            "holds no valid sign options",
        ),
        (
            attempt("SD_CLUSTER_GOOD_KEY", Some("SD_CLUSTER_SIGN_QUOTED")),
            "signOption",
            "holds no valid sign options",
        ),
    ] {
        let (status, answer) = h
            .call(
                Method::POST,
                "/v4/buildclusters",
                Some(&h.admin()),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}: ")) && message.contains(says),
            "{answer}"
        );
        assert!(!answer.to_string().contains("hunter2"), "{answer}");
    }
    let (_, list) = h
        .call(Method::GET, "/v4/buildclusters", Some(&h.user()), None)
        .await;
    assert_eq!(list, json!([]), "nothing registered");

    // Registered while good, then the variable goes bad: any caller, whatever its bearer
    // string, gets a generic 500; the detail is the operator's.
    h.register(&attempt("SD_CLUSTER_GOOD_KEY", None)).await;
    h.set_env("SD_CLUSTER_GOOD_KEY", secret);
    for token in ["x", "a.b.c", &h.admin()] {
        let (status, answer) = h.worker_poll(&h.base, "c1", token, 0, 1).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
        let text = answer.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("SD_CLUSTER_GOOD_KEY"),
            "{answer}"
        );
    }
}

async fn aliases_serve_the_same_registry(backend: Backend) {
    let h = Harness::start(backend).await;
    h.set_env(
        "SD_CLUSTER_BF1_KEY",
        &sd_testkit::shared_keys("other").public_pem,
    );
    let (status, _) = h
        .call(
            Method::POST,
            "/buildClusters",
            Some(&h.admin()),
            Some(&json!({
                "name": "bf1", "scmContext": CTX, "isActive": 1, "managedByScrewdriver": true,
                "maintainer": "sd@example.com", "authKey": "SD_CLUSTER_BF1_KEY",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, body) = h
        .call(Method::GET, "/v4/buildclusters/bf1", Some(&h.user()), None)
        .await;
    assert_eq!(body["managedBy"], "screwdriver");
    assert_eq!(body["managedByEmail"], "sd@example.com");
    let (status, _) = h
        .call(Method::DELETE, "/buildClusters/bf1", Some(&h.admin()), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// Onboarding without a restart: a cluster's key added as a file in `registry.key_dir` (as a
/// Kubernetes Secret volume updates it) while the scheduler runs; registered and polling; the
/// key rotated in the file, picked up within `registry.reload_interval`, the old key refused.
#[tokio::test]
async fn a_key_added_and_rotated_as_a_file_needs_no_restart() {
    use sd_testkit::ClusterKeys;
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path().to_owned();
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.registry.key_dir = Some(dir.clone());
        c.registry.reload_interval = std::time::Duration::from_secs(1);
    })
    .await;
    let body = cluster("filed", "screwdriver", &[]);
    let var = body["authKey"].as_str().unwrap().to_owned();
    // As the kubelet writes a Secret volume: a new file, then renamed into place.
    let publish = |pem: &str| {
        let tmp = keys.path().join(".tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, keys.path().join(&var)).unwrap();
    };

    let (status, resp) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains(&var), "{resp}");

    let first = ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
    publish(&first.public_pem);
    let (status, resp) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert!(h.poll("filed", &first, 0, 1).await.is_empty());

    let second = ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
    publish(&second.public_pem);
    let rotated = sd_testkit::eventually(std::time::Duration::from_secs(10), || async {
        let (status, _) = h
            .worker_poll(&h.base, "filed", &second.token("filed", 60), 0, 1)
            .await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(rotated.is_some(), "the rotated key was not picked up");
    let (status, resp) = h
        .worker_poll(&h.base, "filed", &first.token("filed", 60), 0, 1)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old key still verifies: {resp}"
    );
}
