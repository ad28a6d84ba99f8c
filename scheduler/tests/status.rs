//! The operator's view through the API: agents' reports of themselves (and older agents that
//! send none), a cluster's health and why, its queue by kind, the oldest waiting build and the
//! builds dispatched in the last hour.

mod common;

use std::time::Duration;

use common::{Harness, build_for, cluster, delivered_build};
use reqwest::{Method, StatusCode};
use sd_protocol::agent_report::header;
use sd_testkit::Backend;
use serde_json::{Value, json};

fn report(instance: &str, in_flight: &str) -> Vec<(&'static str, String)> {
    vec![
        (header::INSTANCE, instance.to_owned()),
        (header::HOST, "node-7".to_owned()),
        (header::VERSION, "9.8.7".to_owned()),
        (header::EXECUTOR, "kubernetes".to_owned()),
        (header::IN_FLIGHT, in_flight.to_owned()),
        (header::CAPACITY, "20".to_owned()),
    ]
}

async fn status(h: &Harness, name: &str) -> Value {
    let (code, body) = h
        .call(
            Method::GET,
            &format!("/v4/buildclusters/{name}/status"),
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn an_agent_too_old_to_report_still_gets_builds_and_shows_as_unknown() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    h.submit_until_accepted(build_for("east", 1), Duration::from_secs(5))
        .await;

    let (code, body) = h.poll_as("east", &keys, 10, &[]).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        delivered_build(&body["jobs"][0]),
        1,
        "the old agent gets its build"
    );
    let seen = status(&h, "east").await;
    assert_eq!(seen["health"], "healthy", "{seen}");
    let agents = seen["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{seen}");
    for field in ["instance", "version", "executor", "inFlight", "capacity"] {
        assert!(agents[0][field].is_null(), "{field} is unknown: {seen}");
    }

    // A newer agent beside it reports itself; both are listed, the latest first.
    let headers = report("agent-42-beef", "3");
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, body) = h.poll_as("east", &keys, 10, &pairs).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let seen = status(&h, "east").await;
    let agents = seen["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 2, "{seen}");
    assert_eq!(
        agents[0],
        json!({
            "instance": "agent-42-beef", "host": "node-7", "version": "9.8.7",
            "executor": "kubernetes", "inFlight": 3, "capacity": 20,
            "lastSeen": agents[0]["lastSeen"], "secondsSince": agents[0]["secondsSince"],
        })
    );
    assert!(agents[1]["version"].is_null());
}

#[tokio::test]
async fn a_bad_report_is_refused_naming_the_header_and_changes_nothing() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    h.submit_until_accepted(build_for("east", 1), Duration::from_secs(5))
        .await;
    for (name, value) in [
        (header::INSTANCE, "<img src=x>"),
        (header::VERSION, "1.0 beta"),
        (header::EXECUTOR, "docker"),
        (header::IN_FLIGHT, "many"),
        (header::CAPACITY, "-1"),
    ] {
        let mut headers = report("agent-1", "0");
        for pair in &mut headers {
            if pair.0 == name {
                pair.1 = value.to_owned();
            }
        }
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, body) = h.poll_as("east", &keys, 10, &pairs).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{name}: ")), "{message}");
        assert!(
            !message.contains(value),
            "the value is not echoed: {message}"
        );
    }
    let (code, _) = h
        .poll_as("east", &keys, 10, &[(header::INSTANCE, "agent-1")])
        .await;
    assert_eq!(
        code,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the other headers are required"
    );
    let seen = status(&h, "east").await;
    assert_eq!(
        seen["queue"]["ready"], 1,
        "no refused poll took the build: {seen}"
    );
    assert_eq!(
        seen["health"], "neverPolled",
        "no refused poll counts: {seen}"
    );
    assert_eq!(seen["agents"], json!([]));
}

#[tokio::test]
async fn the_queue_is_shown_by_kind_with_its_oldest_build_and_the_last_hours_dispatches() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let with_job = |id: u64, job: u64, blocked_by: &[u64]| {
        let mut b = build_for("east", id);
        b["jobId"] = json!(job);
        b["blockedBy"] = json!(blocked_by);
        b
    };
    // 1 runs (delivered, acknowledged, running); 2 is blocked by 1's job; 3 and 4 wait.
    h.submit_until_accepted(with_job(1, 100, &[]), Duration::from_secs(5))
        .await;
    let jobs = h.poll("east", &keys, 0, 10).await;
    let id = jobs[0]["deliveryId"].as_str().unwrap();
    h.lease_call("east", &keys, "ack", &[id]).await;
    for (id, job, blocked_by) in [(2, 200, vec![100]), (3, 300, vec![]), (4, 400, vec![])] {
        h.submit_until_accepted(with_job(id, job, &blocked_by), Duration::from_secs(5))
            .await;
    }
    let jobs = h.poll("east", &keys, 0, 1).await;
    assert_eq!(delivered_build(&jobs[0]), 3, "2 is held back, 3 is next");
    let seen = status(&h, "east").await;
    assert_eq!(
        seen["queue"],
        json!({"ready": 1, "leased": 1, "deferred": 0, "blocked": 1, "dead": 0, "complete": true}),
        "{seen}"
    );
    assert_eq!(seen["oldestWaiting"]["buildId"], "2", "{seen}");
    assert!(seen["oldestWaiting"]["ageSeconds"].as_u64().unwrap() < 60);
    assert_eq!(seen["dispatchedLastHour"], 2, "{seen}");
    // Minute by minute: the same dispatches, and what waited after the last poll.
    let minutes = seen["lastHour"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let dispatched: u64 = minutes
        .iter()
        .map(|m| m["dispatched"].as_u64().unwrap())
        .sum();
    assert_eq!(dispatched, 2, "{seen}");
    let waiting = minutes.iter().rev().find_map(|m| m["waiting"].as_u64());
    assert_eq!(
        waiting,
        Some(2),
        "4 ready and 2 blocked after the last poll: {seen}"
    );
    assert!(minutes[59]["minute"].as_str().unwrap().ends_with(":00Z"));
    assert_eq!(seen["health"], "healthy");
    assert!(seen["reason"].as_str().unwrap().starts_with("last poll "));
    assert!(seen["silentForSeconds"].as_u64().unwrap() < 60);
}

#[tokio::test]
async fn health_says_silent_never_polled_or_paused_and_why() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.ha.cluster_dead_after = Duration::from_secs(1);
        c.ha.check_interval = Duration::from_millis(200);
    })
    .await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    h.cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;
    h.cluster_with_key(&cluster("north", "screwdriver", &[]))
        .await;
    h.poll("east", &keys, 0, 1).await;
    h.call(
        Method::PUT,
        "/v4/buildclusters/north",
        Some(&h.admin()),
        Some(&json!({"isActive": false})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (code, all) = h
        .call(
            Method::GET,
            "/v4/buildclusters/status",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{all}");
    let by_name = |name: &str| {
        all["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {all}"))
    };
    let east = by_name("east");
    assert_eq!(east["health"], "silent", "{east}");
    assert!(
        east.get("lastHour").is_none(),
        "only one cluster's status has its minutes"
    );
    let reason = east["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("silent for 2s, longer than ha.cluster_dead_after (1s)"),
        "{reason}"
    );
    assert!(east["lastPoll"].as_str().unwrap().ends_with('Z'));
    assert_eq!(by_name("west")["health"], "neverPolled");
    assert_eq!(by_name("north")["health"], "paused");

    // The same last poll, for alerts on one cluster's silence.
    let metrics = h.metrics().await;
    let at: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("sd_scheduler_cluster_last_poll_timestamp_seconds{cluster=\"east\"} ")
        })
        .unwrap_or_else(|| panic!("no last poll of east in /metrics:\n{metrics}"))
        .parse()
        .unwrap();
    let last_poll = humantime::parse_rfc3339(east["lastPoll"].as_str().unwrap()).unwrap();
    let seconds = last_poll
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((at - seconds).abs() < 1.0, "{at} against {seconds}");
    assert!(
        !metrics.contains("sd_scheduler_cluster_last_poll_timestamp_seconds{cluster=\"west\"}"),
        "a cluster that never polled has no last poll"
    );
}

#[tokio::test]
async fn status_needs_a_user_token_and_a_known_cluster() {
    let h = Harness::start(Backend::Sqlite).await;
    h.cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    for path in ["/v4/buildclusters/status", "/v4/buildclusters/east/status"] {
        let (code, _) = h.call(Method::GET, path, None, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        let (code, _) = h.call(Method::GET, path, Some(&h.sdapi()), None).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{path}");
    }
    let (code, _) = h
        .call(
            Method::GET,
            "/v4/buildclusters/nope/status",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    // The seed's path serves it too.
    let (code, body) = h
        .call(
            Method::GET,
            "/buildClusters/east/status",
            Some(&h.user()),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // No cluster may be named like the path of every cluster's status.
    let (code, body) = h
        .call(
            Method::POST,
            "/v4/buildclusters",
            Some(&h.admin()),
            Some(&cluster("status", "screwdriver", &[])),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("name: is reserved"),
        "{body}"
    );
}
