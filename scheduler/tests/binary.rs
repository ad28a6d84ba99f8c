//! The real `sd-scheduler` binary: configuration errors, defaults, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use sd_testkit::{RedisServer, eventually, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_sd-scheduler");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("SD_SCHEDULER_CONFIG")
        .output()
        .expect("run sd-scheduler");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn invalid_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[database]\nurl = \"mysql://nope\"\n").unwrap();
    let (code, text) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("database.url"), "{text}");

    std::fs::write(&file, "[redis]\nurll = \"redis://x\"\n").unwrap();
    let (code, text) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64);
    assert!(text.contains("urll"), "{text}");

    let (code, text) = run(
        &["--check-config"],
        &[("SD_SCHEDULER_REGISTRY_RELOAD_INTERVAL", "often")],
    );
    assert_eq!(code, 64);
    assert!(text.contains("registry.reload_interval"), "{text}");

    let (code, text) = run(&["--config", "/nonexistent/scheduler.toml"], &[]);
    assert_eq!(code, 64);
    assert!(text.contains("/nonexistent/scheduler.toml"), "{text}");
}

#[test]
fn example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/scheduler.toml");
    let dir = tempfile::tempdir().unwrap();
    // The example names key files that exist only on a real host.
    let text = std::fs::read_to_string(example).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.contains("_file ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = dir.path().join("scheduler.toml");
    std::fs::write(&file, text).unwrap();
    let (code, out) = run(&["--config", file.to_str().unwrap(), "--check-config"], &[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn help_explains() {
    let (code, text) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(text.contains("SD_SCHEDULER_"), "{text}");
    assert!(text.contains("--config"), "{text}");
}

#[tokio::test]
async fn starts_on_defaults_serves_and_stops_on_sigterm() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(BIN)
        .current_dir(dir.path())
        .env_remove("SD_SCHEDULER_CONFIG")
        .env("SD_SCHEDULER_LISTEN", format!("127.0.0.1:{port}"))
        .env("SD_SCHEDULER_REDIS_URL", redis.url())
        .env("SD_SCHEDULER_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let ready = eventually(Duration::from_secs(20), || async {
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(ready.is_some(), "scheduler became ready on its defaults");
    // The default database is a SQLite file created in the working directory.
    assert!(dir.path().join("sd-scheduler.db").exists());

    let pid = child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    let first = logs
        .lines()
        .find(|l| l.contains("listening"))
        .expect("a listening line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("JSON logs");
    assert_eq!(parsed["level"], "INFO");
}
