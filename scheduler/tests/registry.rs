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
    ambiguous_name_needs_scm_context,
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

/// The design seed's sample records: keyed on (name, scmContext), its inactive second copy of
/// `identity` is a duplicate.
async fn seed_fixture_and_its_inactive_duplicate(backend: Backend) {
    let h = Harness::start(backend).await;
    let seed: Vec<Value> =
        serde_json::from_str(include_str!("../../tests/fixtures/seed-clusters.json")).unwrap();
    let mut statuses = Vec::new();
    for record in &seed {
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

async fn ambiguous_name_needs_scm_context(backend: Backend) {
    let h = Harness::start(backend).await;
    h.register(&cluster("k8s", "screwdriver", &[])).await;
    let mut other = cluster("k8s", "screwdriver", &[]);
    other["scmContext"] = json!("gitlab:gitlab.com");
    h.register(&other).await;
    let (status, body) = h
        .call(Method::GET, "/v4/buildclusters/k8s", Some(&h.user()), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("scmContext"));
    let (status, body) = h
        .call(
            Method::GET,
            "/v4/buildclusters/k8s?scmContext=gitlab:gitlab.com",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["scmContext"], "gitlab:gitlab.com");
    let path = format!("/v4/buildclusters/k8s?scmContext={CTX}");
    let (status, _) = h.call(Method::DELETE, &path, Some(&h.admin()), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = h
        .call(Method::GET, "/v4/buildclusters/k8s", Some(&h.user()), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["scmContext"], "gitlab:gitlab.com");
}

async fn aliases_serve_the_same_registry(backend: Backend) {
    let h = Harness::start(backend).await;
    let (status, _) = h
        .call(
            Method::POST,
            "/buildClusters",
            Some(&h.admin()),
            Some(&json!({
                "name": "bf1", "scmContext": CTX, "isActive": 1, "managedByScrewdriver": true,
                "maintainer": "sd@example.com", "authKey": "BF1_KEY",
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
