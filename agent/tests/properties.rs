//! Property tests of the agent's parsers of outside input: its config (a file and `SD_AGENT_*`
//! variables) and the pods the watcher reads back from the Kubernetes API. Jobs read back from
//! Redis go through `QueueMessage::start`, covered in protocol/tests/properties.rs.
//!
//! proptest's case count per property (256, or `PROPTEST_CASES`); `fuzz/` goes further.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use sd_agent::config::{Config, ConfigError, KubernetesConfig};
use sd_agent::executor::kubernetes::watch::{Verdict, assess};
use sd_testkit::AgentConfig;
use serde_json::{Value, json};

/// A valid config's text (a key file that exists) and every key `config/agent.toml` documents.
struct Base {
    text: String,
    keys: Vec<String>,
    _dir: tempfile::TempDir,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = dir.path().join("agent.key.pem");
        std::fs::write(&key, "not read by the parser").expect("the key file");
        let text = AgentConfig::new("alpha", "http://127.0.0.1:1", &key)
            .screwdriver_api("https://api.example.com")
            .work_dir(dir.path())
            .command(["/bin/true"])
            .render();
        Config::parse(&text, Path::new("agent.toml"), []).expect("the base config is valid");
        let documented = include_str!("../../config/agent.toml")
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join("\n");
        let mut keys = Vec::new();
        let mut section = String::new();
        for line in documented.lines() {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_owned();
            } else if let Some((key, _)) = line.split_once(" = ")
                && !key.is_empty()
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                let full = if section.is_empty() {
                    key.to_owned()
                } else {
                    format!("{section}.{key}")
                };
                if !keys.contains(&full) {
                    keys.push(full);
                }
            }
        }
        assert!(
            keys.len() > 30,
            "config/agent.toml documents {} keys",
            keys.len()
        );
        Base {
            text,
            keys,
            _dir: dir,
        }
    })
}

/// The variable that overrides `key` (`executor.process.user` → `SD_AGENT_EXECUTOR_PROCESS_USER`).
fn variable(key: &str) -> String {
    format!("SD_AGENT_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Values an operator's variable might hold: numbers, durations, lists, garbage.
fn raw_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        any::<i64>().prop_map(|n| n.to_string()),
        (
            0_u32..100_000,
            prop::sample::select(vec!["ms", "s", "m", "h", "d", "", "x"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        Just("true".to_owned()),
        Just("[\"a\", 1]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("".to_owned()),
    ]
}

fn pod_status() -> impl Strategy<Value = Value> {
    let reason = prop::sample::select(vec![
        "ErrImagePull",
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "ImagePullBackOff",
        "ContainerCreating",
        "PodInitializing",
        "OOMKilled",
        "Error",
        "Completed",
        "DeadlineExceeded",
        "Evicted",
        "",
    ]);
    let state = prop_oneof![
        reason.clone().prop_map(|r| json!({"waiting": {"reason": r, "message": "m"}})),
        Just(json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}})),
        (reason.clone(), any::<i32>()).prop_map(|(r, code)| json!({"terminated": {"exitCode": code, "reason": r, "finishedAt": "2026-01-01T00:01:00Z"}})),
        Just(json!({})),
    ];
    let container = (prop::sample::select(vec!["build", "launcher", "sidecar"]), state)
        .prop_map(|(name, state)| json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": state}));
    (
        prop::option::of(prop::sample::select(vec![
            "Pending",
            "Running",
            "Succeeded",
            "Failed",
            "Unknown",
            "",
        ])),
        prop::option::of(reason),
        prop::collection::vec(container.clone(), 0..3),
        prop::collection::vec(container, 0..3),
        any::<bool>(),
    )
        .prop_map(|(phase, reason, init, main, deleting)| {
            let mut pod = json!({
                "metadata": {"name": "b-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"initContainerStatuses": init, "containerStatuses": main},
            });
            if let Some(phase) = phase {
                pod["status"]["phase"] = phase.into();
            }
            if let Some(reason) = reason {
                pod["status"]["reason"] = reason.into();
            }
            if deleting {
                pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:02:00Z".into();
            }
            pod
        })
}

proptest! {
    /// One documented key set by its variable to anything is accepted, or refused naming that
    /// key (or its variable, or, for a key of a pair, naming it in the reason): an operator is
    /// never sent to the wrong line.
    #[test]
    fn a_bad_variable_is_refused_naming_its_key(at in any::<prop::sample::Index>(), raw in raw_value()) {
        let base = base();
        let key = &base.keys[at.index(base.keys.len())];
        let var = variable(key);
        match Config::parse(&base.text, Path::new("agent.toml"), [(var.clone(), raw.clone())]) {
            Ok(_) => {}
            // Keys that go in pairs (a client certificate and its key) may be refused naming
            // the missing partner, with this key in the reason.
            Err(ConfigError::Invalid { key: named, reason }) => prop_assert!(
                named == *key || named == var || named.starts_with(&format!("{key}.")) || named.starts_with(&format!("{key}["))
                    || reason.contains(key.as_str()),
                "{var}={raw:?} refused naming {named}: {reason}"
            ),
            Err(ConfigError::ReadKeyFile { key: named, .. }) => prop_assert_eq!(&named, key),
            Err(other) => prop_assert!(false, "{var}={raw:?}: {other}"),
        }
    }

    /// Any text as the file is a config or an error naming the file or a key; never a panic.
    #[test]
    fn any_config_text_is_parsed_or_refused(text in "\\PC{0,200}", tail in "[a-z_.]{1,20} = \\PC{0,20}") {
        for text in [text.clone(), format!("{}\n{tail}\n", base().text)] {
            if let Err(e) = Config::parse(&text, Path::new("agent.toml"), []) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// The watcher's judgement of any pod it may read back follows the rules the launcher and
    /// Kubernetes set: Succeeded is finished, Failed is an end, a pod being deleted waits for
    /// its end, and a container that can never start fails the build.
    #[test]
    fn the_watcher_judges_any_pod_by_the_rules(status in pod_status(), age in 0_u64..2000) {
        let pod: Pod = serde_json::from_value(status.clone()).expect("a pod");
        let config = KubernetesConfig::default();
        let verdict = assess(&pod, Duration::from_secs(age), &config);
        let phase = status["status"]["phase"].as_str().unwrap_or("Pending");
        let waiting: Vec<&str> = ["initContainerStatuses", "containerStatuses"].iter()
            .flat_map(|k| status["status"][k].as_array().into_iter().flatten())
            .filter_map(|c| c["state"]["waiting"]["reason"].as_str())
            .collect();
        match phase {
            "Succeeded" => prop_assert!(matches!(verdict, Verdict::Finished { .. }), "{verdict:?}"),
            "Failed" => prop_assert!(matches!(verdict, Verdict::Finished { .. } | Verdict::Failed { .. }), "{verdict:?}"),
            _ if !status["metadata"]["deletionTimestamp"].is_null() => prop_assert_eq!(verdict, Verdict::Waiting),
            _ if waiting.iter().any(|r| ["ErrImagePull", "InvalidImageName", "CrashLoopBackOff", "CreateContainerConfigError"].contains(r)) => {
                prop_assert!(matches!(verdict, Verdict::CannotStart(_)), "{verdict:?}");
            }
            _ if phase == "Pending" && Duration::from_secs(age) >= config.pending_timeout => {
                prop_assert!(matches!(verdict, Verdict::CannotStart(_)), "{verdict:?}");
            }
            _ => prop_assert!(!matches!(verdict, Verdict::Finished { .. } | Verdict::Failed { .. }), "{verdict:?}"),
        }
    }
}
