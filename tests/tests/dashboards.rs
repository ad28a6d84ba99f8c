//! `deploy/grafana/`: the dashboard and the alert rules query only metrics the binaries
//! export (a renamed metric would otherwise leave a panel empty and an alert silent for good),
//! and the dashboard is one Grafana can import. The rules' own logic is tested by promtool
//! (`deploy/grafana/alerts.test.yml`, run by `scripts/test`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `sd_*` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sd_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            found.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    found
}

/// The metrics the binaries register: the names in `metrics::counter!`/`gauge!`/`histogram!`
/// calls of their sources.
fn exported() -> BTreeSet<String> {
    let mut exported = BTreeSet::new();
    for dir in [
        "scheduler/src",
        "agent/src",
        "queue/src",
        "http/src",
        "telemetry/src",
    ] {
        let mut stack = vec![root().join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let source = std::fs::read_to_string(&path).unwrap();
                    for call in ["counter!(", "gauge!(", "histogram!("] {
                        for piece in source.split(call).skip(1) {
                            let literal = piece.trim_start().strip_prefix('"').unwrap_or("");
                            if let Some(name) = literal.split('"').next()
                                && name.starts_with("sd_")
                            {
                                exported.insert(name.to_owned());
                            }
                        }
                    }
                }
            }
        }
    }
    exported
}

/// A queried name as the metric it is a series of (histograms' and summaries' parts).
fn metric(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

fn unknown(queried: &BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<String> {
    queried
        .iter()
        .filter(|name| !exported.contains(*name) && !exported.contains(metric(name)))
        .cloned()
        .collect()
}

#[test]
fn the_alert_rules_query_only_exported_metrics() {
    let exported = exported();
    assert!(exported.len() > 20, "found too few metrics: {exported:?}");
    let rules = std::fs::read_to_string(root().join("deploy/grafana/alerts.yml")).unwrap();
    let queried = names(&rules);
    assert!(queried.contains("sd_scheduler_cluster_last_poll_timestamp_seconds"));
    assert_eq!(unknown(&queried, &exported), Vec::<String>::new());
}

#[test]
fn the_dashboard_queries_only_exported_metrics_through_its_data_source_variable() {
    let exported = exported();
    let text = std::fs::read_to_string(root().join("deploy/grafana/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "sd-buildcluster");
    assert_eq!(
        dashboard["templating"]["list"][0]["type"], "datasource",
        "the data source is chosen at import"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "ids are unique"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} queries nothing", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let found = names(expr);
            assert!(!found.is_empty(), "{expr} queries no sd_ metric");
            queried.extend(found);
        }
    }
    assert_eq!(unknown(&queried, &exported), Vec::<String>::new());
}

#[test]
fn names_are_read_whole() {
    let found = names("rate(sd_a_total[5m]) / x_sd_b + sd_c_bucket{le=\"1\"}");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["sd_a_total", "sd_c_bucket"]
    );
}
