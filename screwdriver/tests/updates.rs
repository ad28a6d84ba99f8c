//! `BuildUpdates` against real local HTTP listeners: a build's token goes to an allowed API
//! only, and never on to where that API redirects.

use std::time::Duration;

use sd_screwdriver::{ApiUris, BuildTarget, BuildUpdates};
use sd_testkit::{CountingServer, FakeScrewdriver};
use serde_json::json;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.launcher.signature";

fn updates(allowed: &[&str]) -> BuildUpdates {
    let allowed = ApiUris::new(allowed, true).expect("allow-list");
    BuildUpdates::new(allowed, Duration::from_secs(5), "sd-screwdriver-test").expect("client")
}

fn target(api_uri: &str) -> BuildTarget {
    BuildTarget {
        build_id: 8609,
        api_uri: api_uri.to_owned(),
        token: TOKEN.to_owned(),
    }
}

fn failure() -> serde_json::Value {
    json!({"status": "FAILURE", "statusMessage": "dead-lettered"})
}

#[tokio::test]
async fn an_allowed_api_gets_the_update_with_the_token() {
    let api = FakeScrewdriver::start().await;
    updates(&[&api.url])
        .put(&target(&format!("{}/", api.url)), &failure())
        .await
        .expect("sent");
    let got = api.updates();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].build_id, 8609);
    assert_eq!(got[0].authorization, format!("Bearer {TOKEN}"));
}

#[tokio::test]
async fn an_api_not_allowed_gets_nothing() {
    let api = FakeScrewdriver::start().await;
    let foreign = CountingServer::start().await;
    let e = updates(&[&api.url])
        .put(&target(&foreign.url), &failure())
        .await
        .expect_err("refused");
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("apiUri"), "{}", e.message);
    assert_eq!(foreign.hits(), 0, "a request reached the foreign API");
}

#[tokio::test]
async fn a_redirect_from_the_allowed_api_is_not_followed() {
    let elsewhere = CountingServer::start().await;
    let api = CountingServer::redirecting_to(&format!("{}/v4/builds/8609", elsewhere.url)).await;
    let e = updates(&[&api.url])
        .put(&target(&api.url), &failure())
        .await
        .expect_err("a redirect is not a success");
    assert_eq!(api.hits(), 1, "the allowed API was asked once");
    assert_eq!(
        elsewhere.hits(),
        0,
        "the redirect was followed, token and all"
    );
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("307"), "{}", e.message);
}
