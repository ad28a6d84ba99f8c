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

    // Builds' tokens go to the API a build names: without an allow-list it does not start.
    let (code, text) = run(&["--check-config"], &[]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("screwdriver.api_uris"), "{text}");
    let (code, text) = run(&["--check-config"], &[(API_VAR, "https://api.example")]);
    assert_eq!(code, 0, "{text}");
}

/// SIGHUP, an operator's habitual reload, leaves the scheduler running (without listen_tls
/// there is nothing to reload; its default action would kill the process).
#[tokio::test]
async fn sighup_does_not_stop_the_scheduler() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let port = free_port();
    let mut child = Command::new(BIN)
        .env_remove("SD_SCHEDULER_CONFIG")
        .envs([
            (API_VAR, "https://api.example".to_owned()),
            ("SD_SCHEDULER_LISTEN", format!("127.0.0.1:{port}")),
            ("SD_SCHEDULER_DATABASE_URL", db),
            ("SD_SCHEDULER_REDIS_URL", redis.url()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let up = || async {
        reqwest::get(&url)
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ())
    };
    assert!(
        eventually(Duration::from_secs(20), up).await.is_some(),
        "the scheduler did not start"
    );
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the scheduler"
    );
    assert!(eventually(Duration::from_secs(5), up).await.is_some());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
}

/// A Redis that cannot be used as configured (here: in cluster mode, and `redis.cluster` not
/// set) is a configuration error too, found at start: exit 64, which systemd does not restart, with the setting named.
#[test]
fn an_unusable_redis_exits_64_naming_the_setting() {
    let cluster = RedisServer::start_with_args(&["--cluster-enabled", "yes"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let url = format!("redis://127.0.0.1:{}", cluster.port());
    let (code, text) = run(
        &[],
        &[
            (API_VAR, "https://api.example"),
            ("SD_SCHEDULER_LISTEN", "127.0.0.1:0"),
            ("SD_SCHEDULER_DATABASE_URL", &db),
            ("SD_SCHEDULER_REDIS_URL", &url),
        ],
    );
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("redis.cluster: Redis runs in cluster mode"),
        "{text}"
    );
}

/// The Screwdriver API every scheduler here allows.
const API_VAR: &str = "SD_SCHEDULER_SCREWDRIVER_API_URIS";

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

/// A real `sd-scheduler` on a free port whose stderr (its log) the test reads after SIGTERM.
struct Logged {
    child: tokio::process::Child,
    port: u16,
    _redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Logged {
    /// Starts on the defaults plus `env`, and waits until `/readyz` answers 200.
    async fn start(env: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut command = tokio::process::Command::new(BIN);
        command
            .current_dir(dir.path())
            .env_remove("SD_SCHEDULER_CONFIG")
            .env_remove("RUST_LOG")
            .env("SD_SCHEDULER_LISTEN", format!("127.0.0.1:{port}"))
            .env("SD_SCHEDULER_REDIS_URL", redis.url())
            .env(API_VAR, "https://api.screwdriver.example")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let ready = eventually(Duration::from_secs(20), || async {
            let r = http.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(ready.is_some(), "the scheduler became ready");
        Self {
            child,
            port,
            _redis: redis,
            dir,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then how it exited and everything it logged.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let pid = libc::pid_t::try_from(self.child.id().unwrap()).unwrap();
        // SAFETY: kill(2) only sends a signal; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        let mut logs = String::new();
        use tokio::io::AsyncReadExt;
        let mut stderr = self.child.stderr.take().unwrap();
        stderr.read_to_string(&mut logs).await.unwrap();
        (status, logs)
    }
}

#[tokio::test]
async fn starts_on_defaults_and_its_api_serves_and_stops_on_sigterm() {
    let scheduler = Logged::start(&[("SD_SCHEDULER_LOG_FORMAT", "json")]).await;
    // The default database is a SQLite file created in the working directory.
    assert!(scheduler.dir.path().join("sd-scheduler.db").exists());
    let (status, logs) = scheduler.stop().await;
    assert!(status.success(), "{status:?}");
    let first = logs
        .lines()
        .find(|l| l.contains("listening"))
        .expect("a listening line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("JSON logs");
    assert_eq!(parsed["level"], "INFO");
}

/// A real `sd-scheduler` process, killed on drop.
struct Process {
    child: std::process::Child,
    base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_scheduler(env: &[(&str, String)]) -> Process {
    let port = free_port();
    let child = Command::new(BIN)
        .env_remove("SD_SCHEDULER_CONFIG")
        .env("SD_SCHEDULER_LISTEN", format!("127.0.0.1:{port}"))
        .env(API_VAR, "https://api.example")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sd-scheduler");
    Process {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// Two scheduler processes on one PostgreSQL database and one Redis serve long-polls for the
/// same cluster: every build is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scheduler_processes_deliver_each_build_once() {
    use serde_json::json;
    use std::collections::HashMap;
    let redis = RedisServer::start().unwrap();
    let db = sd_testkit::TestDb::new(sd_testkit::Backend::Postgres)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = sd_testkit::shared_keys("api");
    let (_, api_pub) = api.write(dir.path(), "api");
    let (launcher, _) = sd_testkit::shared_keys("launcher").write(dir.path(), "launcher");
    let cluster = sd_testkit::ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
    let env = [
        ("SD_SCHEDULER_DATABASE_URL", db.url().to_owned()),
        ("SD_SCHEDULER_REDIS_URL", redis.url()),
        (
            "SD_SCHEDULER_AUTH_API_PUBLIC_KEY_FILE",
            api_pub.display().to_string(),
        ),
        (
            "SD_SCHEDULER_AUTH_PRIVATE_KEY_FILE",
            launcher.display().to_string(),
        ),
        ("SD_CLUSTER_SHARED_PUBLIC_KEY", cluster.public_pem.clone()),
    ];
    let a = spawn_scheduler(&env);
    let b = spawn_scheduler(&env);
    let http = reqwest::Client::new();
    for p in [&a, &b] {
        let up = eventually(Duration::from_secs(30), || async {
            let r = http.get(format!("{}/readyz", p.base)).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(up.is_some(), "scheduler at {} ready", p.base);
    }
    let created = http
        .post(format!("{}/v4/buildclusters", a.base))
        .bearer_auth(api.api_token(&["admin"]))
        .json(
            &json!({"name": "shared", "scmContext": "github:github.com", "managedBy": "screwdriver",
            "managedByEmail": "ops@example.com", "authKey": "SD_CLUSTER_SHARED_PUBLIC_KEY"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // B learns of the cluster through pub/sub.
    let n = 40u64;
    for id in 1..=n {
        let base = if id % 2 == 0 { &a.base } else { &b.base };
        let body = json!({
            "buildId": id, "jobId": 1000 + id, "blockedBy": [], "annotations": {},
            "pipeline": {"id": 1, "name": "org/repo", "scmContext": "github:github.com"},
            "apiUri": "https://api.example", "container": "node:22",
        });
        let accepted = eventually(Duration::from_secs(10), || async {
            let r = http
                .post(format!("{base}/v1/queue/message"))
                .bearer_auth(api.api_token(&["sdapi"]))
                .json(&body)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            (v["buildClusterName"] == "shared").then_some(())
        })
        .await;
        assert!(accepted.is_some(), "build {id} routed");
    }
    let pollers = [&a.base, &b.base, &a.base, &b.base].map(|base| {
        let (http, base, token) = (http.clone(), base.clone(), cluster.token("shared", 120));
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let body: serde_json::Value = http
                    .get(format!("{base}/v1/jobs/shared?wait=1&max=3"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let jobs = body["jobs"].as_array().unwrap().clone();
                if jobs.is_empty() {
                    return got;
                }
                let ids: Vec<_> = jobs.iter().map(|j| j["deliveryId"].clone()).collect();
                let r = http
                    .post(format!("{base}/v1/jobs/shared/ack"))
                    .bearer_auth(&token)
                    .json(&json!({"deliveryIds": ids}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                got.extend(
                    jobs.iter()
                        .map(|j| j["message"]["buildConfig"]["buildId"].as_u64().unwrap()),
                );
            }
        })
    });
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for p in pollers {
        for id in p.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len() as u64, n, "every build delivered: {seen:?}");
    assert!(seen.values().all(|c| *c == 1), "none twice: {seen:?}");
}

/// Log injection: what a client puts in a path never starts a line of the scheduler's text log
/// (names are checked before they are logged, and user input is logged escaped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_log_lines() {
    let scheduler = Logged::start(&[
        ("SD_SCHEDULER_LOG_FORMAT", "text"),
        ("SD_SCHEDULER_LOG_LEVEL", "debug"),
    ])
    .await;
    let (http, base) = (reqwest::Client::new(), scheduler.base());
    let forged = "%0D%0A2026-01-01T00:00:00Z%20ERROR%20forged%3A%20admin%20logged%20in";
    for path in [
        format!("/v1/jobs/c1{forged}"),
        format!("/v1/jobs/c1{forged}/ack"),
        format!("/v4/buildclusters/c1{forged}"),
        format!("/v1/queue/message/{forged}"),
        format!("/nowhere{forged}"),
    ] {
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth("x.y.z")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }
    // A well-formed name that is not registered is logged, by name.
    let r = http
        .get(format!("{base}/v1/jobs/nosuch"))
        .bearer_auth("x.y.z")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    let (_, logs) = scheduler.stop().await;
    assert!(
        logs.contains("nosuch"),
        "the control request was logged: {logs}"
    );
    for line in logs.lines() {
        assert!(
            !line.trim_start().starts_with("2026-01-01"),
            "forged line: {line}"
        );
        assert!(
            !line.trim_start().starts_with("ERROR forged"),
            "forged line: {line}"
        );
    }
}
