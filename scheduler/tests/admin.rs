//! `sd-scheduler clusters|pause|resume|drain|dead-letters [requeue|fail]`, the binary, against a
//! running scheduler: what each prints, that it needs a token (and the right scope to change
//! things), that a drain ends once the cluster's waiting builds went to a peer, and that dead
//! letters are requeued and run again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Harness, build, cluster};
use sd_testkit::Backend;
use serde_json::json;

/// Runs `sd-scheduler args` against `h` with `token` (none: no token at all); (exit code,
/// stdout, stderr).
async fn run(h: &Harness, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-scheduler"));
    cmd.args(args)
        .env("SD_SCHEDULER_URL", &h.base)
        .env_remove("SD_SCHEDULER_TOKEN");
    if let Some(token) = token {
        cmd.env("SD_SCHEDULER_TOKEN", token);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("sd-scheduler runs"))
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_pauses_drains_and_resumes_a_cluster() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.ha.check_interval = Duration::from_millis(100);
    })
    .await;
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    for id in 1..=3 {
        let (_, accepted) = h.submit(&build(id, "org/repo", json!({}))).await;
        assert_eq!(accepted["buildClusterName"], "east");
    }
    let taken = h.poll("east", &east, 0, 1).await;
    h.cluster_with_key(&cluster("west", "screwdriver", &[]))
        .await;

    let (code, _, err) = run(&h, None, &["clusters"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no token: set SD_SCHEDULER_TOKEN"), "{err}");

    let (user, admin) = (h.user(), h.admin());
    let (code, out, err) = run(&h, Some(&user), &["clusters"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("CLUSTER"), "{out}");
    let east_line = lines.iter().find(|l| l.starts_with("east ")).expect(&out);
    assert!(east_line.contains("healthy"), "{out}");
    assert!(
        east_line.contains("1 (1 unknown)"),
        "the test's agent sends no report: {out}"
    );
    assert!(
        out.contains("west: no agent has polled"),
        "why west is not healthy: {out}"
    );

    let (code, _, err) = run(&h, Some(&user), &["pause", "east"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("answered 403 Forbidden"), "{err}");
    let (code, _, err) = run(&h, Some(&admin), &["pause", "../x"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not a cluster name: name:"), "{err}");

    // Draining pauses east; its two waiting builds move to west, the leased one is acked.
    let drain = run(&h, Some(&admin), &["drain", "east", "--timeout", "20s"]);
    let ack = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let delivery = taken[0]["deliveryId"].as_str().unwrap();
        h.lease_call("east", &east, "ack", &[delivery]).await;
    };
    let ((code, out, err), ()) = tokio::join!(drain, ack);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("east paused; waiting until its queue is empty"),
        "{out}"
    );
    assert!(out.contains("east is drained and stays paused"), "{out}");
    assert_eq!(
        h.ready("west").await.len(),
        2,
        "the waiting builds went to west"
    );
    let (code, out, _) = run(&h, Some(&user), &["clusters", "--json"]).await;
    assert_eq!(code, 0);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all["clusters"][0]["health"], "paused");

    let (code, out, _) = run(&h, Some(&user), &["dead-letters", "east"]).await;
    assert_eq!((code, out.as_str()), (0, "east has no dead letters\n"));
    let (code, out, err) = run(&h, Some(&admin), &["resume", "east"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("east resumed"), "{out}");
}

/// `dead-letters NAME` lists what is held; `requeue` and `fail` act on ids or on all of them,
/// with an admin token only; a bad id is refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_requeues_and_fails_dead_letters() {
    let h = Harness::start_with(Backend::Sqlite, |c| {
        c.queue.visibility_timeout = Duration::from_millis(300);
        c.queue.max_attempts = 1;
    })
    .await;
    let east = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    for id in 1..=3 {
        h.submit(&build(id, "org/repo", json!({}))).await;
    }
    assert_eq!(h.poll("east", &east, 0, 10).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.poll("east", &east, 0, 10).await.is_empty(), "all dead");

    let (user, admin) = (h.user(), h.admin());
    let (code, out, err) = run(&h, Some(&user), &["dead-letters", "east"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    assert!(out.lines().next().unwrap().contains("HELD UNTIL"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with(char::is_numeric))
            .count(),
        3,
        "{out}"
    );
    assert!(
        out.contains("sd-scheduler dead-letters east requeue"),
        "{out}"
    );

    let (code, _, err) = run(&h, Some(&admin), &["dead-letters", "east", "fail", "1x"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not a dead letter's id"), "{err}");
    let (code, out, err) = run(&h, Some(&user), &["dead-letters", "east", "fail", "1"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1: not failed: the scheduler answered 403"),
        "{out}"
    );
    assert!(err.contains("1 of 1 refused"), "{err}");

    let (code, out, err) = run(&h, Some(&admin), &["dead-letters", "east", "fail", "1"]).await;
    assert_eq!((code, out.as_str()), (0, "1: failed\n"), "{err}");
    let (code, out, err) = run(
        &h,
        Some(&admin),
        &["dead-letters", "east", "requeue", "--all"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["2: requeued", "3: requeued"]);
    let again = h.poll("east", &east, 5, 10).await;
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|j| j["attempt"] == 1));
    let (code, out, _) = run(&h, Some(&admin), &["dead-letters", "east", "requeue", "1"]).await;
    assert_eq!(code, 1);
    assert!(
        out.contains("1: not requeued: the scheduler answered 409"),
        "{out}"
    );
}
