//! The `sd-agent` binary's command line: bad configuration stops it with exit 64 and the key
//! at fault, before it binds or connects anything.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sd_testkit::AgentConfig;

fn agent(config: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-agent"));
    cmd.arg("--config").arg(config).arg("run");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.env_remove("SD_AGENT_CONFIG");
    cmd.output().unwrap()
}

/// A config whose health port is one this test holds: an agent that got as far as binding
/// would fail there instead (exit 1, "cannot listen").
fn config(dir: &Path, key: &Path, health: u16, extra: &str) -> std::path::PathBuf {
    let path = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile_in(dir)
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    AgentConfig::new("ios-farm", "http://127.0.0.1:9", key)
        .shutdown_timeout(Duration::from_secs(5))
        .algorithm("ES256")
        .command(["/bin/true"])
        .health_port(health)
        .screwdriver_api("https://api.sd.example")
        .extra_toml(extra)
        .write(&path)
}

fn es256_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("key.pem");
    let generated = sd_agent::keygen::generate(sd_protocol::SigningAlgorithm::ES256).unwrap();
    std::fs::write(&path, &generated.private_pem).unwrap();
    path
}

fn held_port() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn assert_config_error(out: &Output, key: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
    assert!(stderr.contains(key), "{key} not named: {stderr}");
    assert!(
        !stderr.contains("cannot listen"),
        "bound before checking: {stderr}"
    );
}

#[test]
fn invalid_configuration_exits_64_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (_held, port) = held_port();
    let good_key = es256_key(dir.path());
    let garbage_key = dir.path().join("garbage.pem");
    std::fs::write(&garbage_key, "not a key").unwrap();

    type Case<'a> = (std::path::PathBuf, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case> = vec![
        (
            config(dir.path(), &good_key, port, "[poll]\nwiat = \"30s\"\n"),
            &[],
            "poll",
        ),
        (
            config(dir.path(), &garbage_key, port, ""),
            &[],
            "auth.private_key_file",
        ),
        (
            config(dir.path(), &good_key, port, ""),
            &[("SD_AGENT_POLL_MAX_JOBS", "1000")],
            "poll.max_jobs",
        ),
        (
            config(dir.path(), &good_key, port, "[log]\nlevel = \"verbose\"\n"),
            &[],
            "log.level",
        ),
    ];
    for (path, env, key) in cases {
        assert_config_error(&agent(&path, env), key);
    }
}

#[test]
fn the_binding_failure_is_a_different_error() {
    // The counterpart of the test above: with a valid config the same held port is what stops
    // it, so exit 64 there really means "refused before binding".
    let dir = tempfile::tempdir().unwrap();
    let (_held, port) = held_port();
    let key = es256_key(dir.path());
    let out = agent(&config(dir.path(), &key, port, ""), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
}

#[test]
fn help_explains_the_subcommands_and_overrides() {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["run", "check", "keygen", "SD_AGENT_", "--config"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
}

#[test]
fn keygen_refuses_a_name_the_registry_would_refuse_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("private.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_sd-agent"))
        .args(["keygen", "--cluster", "ios farm", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--cluster") && stderr.contains("letters, digits"),
        "{stderr}"
    );
    assert!(!out_file.exists());
}
