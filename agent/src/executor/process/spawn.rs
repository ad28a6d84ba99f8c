//! Starting the configured launcher for one build: the program (resolved and checked, also by
//! `sd-agent check`), the private work dir, the build's log file, its environment, and the
//! parent shell ([`EXIT_WRAPPER`]) that leaves the launcher's exit status for an agent that was
//! not there to see it end.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sd_protocol::StartMessage;
use tokio::process::{Child, Command};

use super::markers::LAUNCH_ID_VAR;
use super::outcome::whole_seconds;
use crate::config::{ProcessConfig, ScrewdriverConfig};
use crate::executor::{ExecError, Timing};

/// The launcher's parent: runs it (`"$@"`), then leaves its exit status in the file `$0`
/// names, so an agent that restarts while the build runs can adopt it and still learn how it
/// ended. It mirrors the launcher's status (128 + N when a signal N ended it).
pub(super) const EXIT_WRAPPER: &str =
    r#""$@"; status=$?; printf '%s\n' "$status" > "$0.tmp" && mv -f "$0.tmp" "$0"; exit "$status""#;

/// Why a config without a launcher is refused.
const EMPTY_COMMAND: &str =
    "executor.process.command is empty: set the launcher argv, e.g. [\"/usr/local/bin/sd-launch\"]";

/// Why the launcher cannot be started on this host: its program, its work dir, the build's log
/// file, or the start itself. A launch that meets it is retried (nothing started, and the host
/// may be fixed meanwhile); at start-up and in `sd-agent check` it says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// A relative launcher path cannot be pinned to the agent's own directory.
    #[error("cannot resolve launcher {}: {source}", program.display())]
    Resolve {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bare launcher name matches no executable file in `PATH`.
    #[error(
        "launcher {} is not found in PATH ({}): install it or set executor.process.command to its absolute path",
        program.display(),
        path.to_string_lossy()
    )]
    NotInPath { program: PathBuf, path: OsString },
    #[error("launcher {} cannot be used ({source}): fix executor.process.command", path.display())]
    Unusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("launcher {} is not a file: fix executor.process.command", path.display())]
    NotAFile { path: PathBuf },
    #[error("launcher {} is not executable: chmod +x it", path.display())]
    NotExecutable { path: PathBuf },
    #[error("cannot create work dir {} (executor.process.work_dir): {source}", path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "work dir {} is not writable by this user ({source}): fix its owner or set executor.process.work_dir",
        path.display()
    )]
    WorkDirNotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open build log {}: {source}", path.display())]
    BuildLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start launcher {}: {source} (fix executor.process.command)", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How this executor starts the launcher, and where a build's files go.
pub(super) struct Spawner {
    program: PathBuf,
    args: Vec<String>,
    work_dir: PathBuf,
    store_uri: String,
    ui_uri: String,
    /// `SD_PUSHGATEWAY_URL`, when configured.
    pushgateway_url: Option<String>,
    /// This host's name (`NODE_ID`).
    host: String,
}

impl Spawner {
    /// The launcher argv of `executor.process.command` and the work dir, created if missing.
    pub(super) fn new(
        config: &ProcessConfig,
        screwdriver: &ScrewdriverConfig,
        host: String,
    ) -> Result<Self, ExecError> {
        let Some((program, args)) = config.command.split_first().filter(|(p, _)| !p.is_empty())
        else {
            return Err(ExecError::Rejected(EMPTY_COMMAND.into()));
        };
        let mut program = PathBuf::from(program);
        // The child runs in the work dir: pin a relative path to the agent's own directory.
        if program.components().count() > 1 && program.is_relative() {
            let cwd = std::env::current_dir().map_err(|source| LauncherError::Resolve {
                program: program.clone(),
                source,
            })?;
            program = cwd.join(program);
        }
        Ok(Self {
            program,
            args: args.to_vec(),
            work_dir: prepare_work_dir(config)?,
            store_uri: screwdriver.store_uri.clone(),
            ui_uri: screwdriver.ui_uri.clone(),
            pushgateway_url: Some(screwdriver.pushgateway_url.clone())
                .filter(|url| !url.trim().is_empty()),
            host,
        })
    }

    /// Where the launcher's stdout and stderr of `build_id` go.
    pub(super) fn log_path(&self, build_id: u64) -> PathBuf {
        self.work_dir.join(format!("build-{build_id}.log"))
    }

    /// Where the [`EXIT_WRAPPER`] of launch `launch_id` leaves its exit status.
    pub(super) fn exit_path(&self, launch_id: &str) -> PathBuf {
        self.work_dir.join(format!("exit-{launch_id}"))
    }

    /// The launcher is an executable file (through `PATH` for a bare name) and the work dir is
    /// still there; the launcher's path.
    pub(super) fn check(&self) -> Result<PathBuf, ExecError> {
        let program = resolve_program(&self.program)?;
        if !self.work_dir.is_dir() {
            return Err(ExecError::Rejected(format!(
                "work dir {} is gone: recreate it or set executor.process.work_dir",
                self.work_dir.display()
            )));
        }
        Ok(program)
    }

    /// Starts the launcher of `build` in its own process group under the [`EXIT_WRAPPER`],
    /// appending to the build's log. Every error but an unencodable build is worth retrying: the
    /// launch is not done.
    pub(super) fn spawn(
        &self,
        build: &StartMessage,
        timing: &Timing,
        launch_id: &str,
    ) -> Result<Child, ExecError> {
        let id = build.build_id;
        // The shell would start even without a launcher: find out here, while the launch can
        // still be retried (the marker is dropped) instead of failing the build.
        resolve_program(&self.program)?;
        let exit_file = self.exit_path(launch_id);
        let _ = std::fs::remove_file(&exit_file);
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|source| LauncherError::BuildLog {
                path: log_path.clone(),
                source,
            })?;
        let stderr = log.try_clone().map_err(|source| LauncherError::BuildLog {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(EXIT_WRAPPER)
            .arg(&exit_file)
            .arg(&self.program)
            .args(&self.args)
            .current_dir(&self.work_dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(false);
        // The agent's own settings (SD_AGENT_*, possibly secrets) and stale SD_* values stay out.
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"SD_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.build_env(build, timing, launch_id)?);
        let child = cmd.spawn().map_err(|source| LauncherError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        Ok(child)
    }

    /// The launcher's environment: its `SD_*` variables, and what Screwdriver's Kubernetes
    /// executor also gives it (`NODE_ID`, the host it reports as the build's; `CONTAINER_IMAGE`).
    /// The token is in `SD_TOKEN` only: `SD_BUILD_CONFIG` leaves it out, so dumping the config
    /// does not leak it.
    fn build_env(
        &self,
        build: &StartMessage,
        timing: &Timing,
        launch_id: &str,
    ) -> Result<Vec<(&'static str, String)>, ExecError> {
        let mut config = serde_json::to_value(build).map_err(|source| ExecError::Encode {
            build_id: build.build_id,
            source,
        })?;
        if let Some(object) = config.as_object_mut() {
            object.remove("token");
        }
        let event_id = build.event_id.or_else(|| {
            build
                .extra
                .get("build")
                .and_then(|b| b.get("eventId"))
                .and_then(serde_json::Value::as_u64)
        });
        let mut env = vec![
            ("SD_BUILD_ID", build.build_id.to_string()),
            ("SD_JOB_ID", build.job_id.to_string()),
            (
                "SD_EVENT_ID",
                event_id.map(|e| e.to_string()).unwrap_or_default(),
            ),
            ("SD_PIPELINE_ID", build.pipeline_id().to_string()),
            ("SD_JOB_NAME", build.job_name.clone().unwrap_or_default()),
            ("SD_TOKEN", build.token.clone().unwrap_or_default()),
            ("SD_API_URI", build.api_uri.clone()),
            ("SD_STORE_URI", self.store_uri.clone()),
            ("SD_UI_URI", self.ui_uri.clone()),
            // The launcher's own timeout (whole minutes): it ends the build at it.
            ("SD_TIMEOUT", timing.minutes.to_string()),
            // Its SIGTERM trap sleeps one second less before giving up.
            (
                "SD_TERMINATION_GRACE_PERIOD_SECONDS",
                whole_seconds(timing.grace).to_string(),
            ),
            ("SD_IMAGE", build.container.clone()),
            ("CONTAINER_IMAGE", build.container.clone()),
            ("NODE_ID", self.host.clone()),
            ("SD_BUILD_CONFIG", config.to_string()),
            (LAUNCH_ID_VAR, launch_id.to_owned()),
        ];
        if let Some(url) = &self.pushgateway_url {
            env.push(("SD_PUSHGATEWAY_URL", url.clone()));
        }
        Ok(env)
    }
}

/// The status [`EXIT_WRAPPER`] left, if it got to write one.
pub(super) fn read_exit_status(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `sd-agent check` without a running executor: the launcher the config names exists and is
/// executable (through `PATH` for a bare name).
pub fn check_command(config: &ProcessConfig) -> Result<String, ExecError> {
    let Some(program) = config.command.first().filter(|p| !p.is_empty()) else {
        return Err(ExecError::Rejected(EMPTY_COMMAND.into()));
    };
    let program = resolve_program(Path::new(program))?;
    let work_dir = prepare_work_dir(config)?;
    // Build logs and the launcher's files go there: find out now whether the agent may write.
    let probe = work_dir.join(format!(".sd-agent-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|source| LauncherError::WorkDirNotWritable {
            path: work_dir.clone(),
            source,
        })?;
    Ok(format!(
        "launcher {} is executable; work dir {} is writable",
        program.display(),
        work_dir.display()
    ))
}

/// `executor.process.work_dir` (default: a folder under the system temp dir), created private
/// to the agent's user when missing.
fn prepare_work_dir(config: &ProcessConfig) -> Result<PathBuf, LauncherError> {
    let work_dir = config
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("sd-agent-process"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&work_dir)
        .map_err(|source| LauncherError::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
    Ok(work_dir)
}

/// The program to run: `program` itself when it names a path, else the first executable match
/// in `PATH`. The error says what to fix.
fn resolve_program(program: &Path) -> Result<PathBuf, LauncherError> {
    if program.components().count() > 1 {
        return check_executable(program).map(|()| program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| check_executable(candidate).is_ok());
    found.ok_or_else(|| LauncherError::NotInPath {
        program: program.to_owned(),
        path,
    })
}

fn check_executable(path: &Path) -> Result<(), LauncherError> {
    let meta = std::fs::metadata(path).map_err(|source| LauncherError::Unusable {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LauncherError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(LauncherError::NotExecutable {
            path: path.to_owned(),
        });
    }
    Ok(())
}
