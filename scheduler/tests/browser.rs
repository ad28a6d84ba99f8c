//! The status pages in a real headless Chromium: the sign-in form asks once for a token, the
//! cluster table and a build's history render with the numbers the API gives, health has its
//! colour. Screenshots are kept in `target/ui-screenshots/` (the README's come from here).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Harness, build_for, cluster};
use reqwest::Method;
use sd_protocol::agent_report::header;
use sd_testkit::{Backend, Browser};
use serde_json::json;

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_render_in_chromium_with_the_apis_numbers() {
    let h = Harness::start(Backend::Sqlite).await;
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let west = h
        .cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;
    h.cluster_with_key(&cluster("ios-farm", "screwdriver", &[]))
        .await;
    // east: build 1 runs, 2 waits behind it, 3 is handed to the agent; west polled once and
    // was paused; ios-farm never polled.
    let version = env!("CARGO_PKG_VERSION");
    let report = [
        (header::INSTANCE, "agent-7-3f9c"),
        (header::HOST, "build-node-1"),
        (header::VERSION, version),
        (header::EXECUTOR, "kubernetes"),
        (header::IN_FLIGHT, "1"),
        (header::CAPACITY, "8"),
    ];
    let poll_east = || async { h.poll_as("east", &east, 1, &report).await.1 };
    for (id, blocked_by) in [(1, json!([])), (2, json!([100])), (3, json!([]))] {
        let mut body = build_for("east", id);
        body["jobId"] = json!(if id == 3 { 300 } else { 100 });
        body["blockedBy"] = blocked_by;
        h.submit_until_accepted(body, Duration::from_secs(5)).await;
        if id == 1 {
            let jobs = poll_east().await;
            let delivery = jobs["jobs"][0]["deliveryId"].as_str().unwrap();
            h.lease_call("east", &east, "ack", &[delivery]).await;
            h.event("east", &east, 1, "running").await;
        }
    }
    let jobs = poll_east().await;
    assert_eq!(
        jobs["jobs"][0]["message"]["buildConfig"]["buildId"], 3,
        "2 is held back"
    );
    h.poll("west", &west, 0, 1).await;
    h.call(
        Method::PUT,
        "/v4/buildclusters/west",
        Some(&h.admin()),
        Some(&json!({"isActive": false})),
    )
    .await;

    let browser = Browser::start(1100, 520).await.expect("headless Chromium");
    browser.goto(&format!("{}/ui/", h.base)).await.unwrap();
    assert!(
        browser.url().await.unwrap().contains("/ui/login?next="),
        "asked to sign in"
    );
    browser
        .screenshot(&shots().join("sign-in.png"))
        .await
        .unwrap();
    browser.type_into("#token", &h.user()).await.unwrap();
    browser.click("button[type=submit]").await.unwrap();
    assert_eq!(browser.url().await.unwrap(), format!("{}/ui/", h.base));

    let (_, api) = h
        .call(
            Method::GET,
            "/v4/buildclusters/status",
            Some(&h.user()),
            None,
        )
        .await;
    let clusters = api["clusters"].as_array().unwrap();
    for c in clusters {
        let name = c["name"].as_str().unwrap();
        let row = format!(r#"tr[data-cluster="{name}"]"#);
        let health = browser.text(&format!("{row} .health")).await.unwrap();
        let expected = match c["health"].as_str().unwrap() {
            "neverPolled" => "never polled",
            other => other,
        };
        assert_eq!(health, expected, "{name}");
        for (class, field) in [
            ("ready", "ready"),
            ("leased", "leased"),
            ("blocked", "blocked"),
            ("dead", "dead"),
        ] {
            let shown = browser.text(&format!("{row} td.{class}")).await.unwrap();
            assert_eq!(shown, c["queue"][field].to_string(), "{name} {field}");
        }
        let shown = browser.text(&format!("{row} td.dispatched")).await.unwrap();
        assert_eq!(shown, c["dispatchedLastHour"].to_string(), "{name}");
    }
    let east_row = r#"tr[data-cluster="east"]"#;
    assert_eq!(
        browser
            .text(&format!("{east_row} td.in-flight"))
            .await
            .unwrap(),
        "1/8"
    );
    assert_eq!(
        browser
            .css(&format!("{east_row} .health"), "background-color")
            .await
            .unwrap(),
        "rgba(18, 128, 92, 1)",
        "healthy is green"
    );
    assert_eq!(
        browser
            .css(r#"tr[data-cluster="west"] .health"#, "background-color")
            .await
            .unwrap(),
        "rgba(181, 71, 8, 1)",
        "paused is amber"
    );
    let reasons = browser.texts(".reasons li").await.unwrap();
    assert!(
        reasons.iter().any(|r| r.starts_with("west: paused")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("ios-farm: no agent has polled")),
        "{reasons:?}"
    );
    browser
        .screenshot(&shots().join("clusters.png"))
        .await
        .unwrap();

    browser
        .click(r#"tr[data-cluster="east"] td a"#)
        .await
        .unwrap();
    assert_eq!(
        browser.url().await.unwrap(),
        format!("{}/ui/clusters/east", h.base)
    );
    let reasons = browser.texts("#waiting td:last-child").await.unwrap();
    assert!(
        reasons.contains(&"blocked by a running build of job 100".to_owned()),
        "{reasons:?}"
    );
    assert_eq!(
        browser.text("#agents td:nth-child(3)").await.unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    browser
        .screenshot(&shots().join("cluster.png"))
        .await
        .unwrap();

    browser
        .goto(&format!("{}/ui/builds/1", h.base))
        .await
        .unwrap();
    let (_, view) = h
        .call(Method::GET, "/v1/builds/1", Some(&h.user()), None)
        .await;
    let states: Vec<String> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["queued", "dispatched", "running"], "{view}");
    assert_eq!(browser.texts("#history .state").await.unwrap(), states);
    assert_eq!(browser.text("#state").await.unwrap(), "running");
    browser
        .screenshot(&shots().join("build.png"))
        .await
        .unwrap();
    browser.close().await.unwrap();
}
