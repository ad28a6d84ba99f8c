//! Starting the configured launcher for one build: the program (resolved and checked, also by
//! `sd-agent check`), the private work dir, the build's log file, its environment, and the
//! parent shell ([`EXIT_WRAPPER`]) that leaves the launcher's exit status for an agent that was
//! not there to see it end.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use sd_protocol::StartMessage;
use tokio::process::{Child, Command};
use tracing::warn;

use super::account::{AccountError, RunAs, free_uid};
use super::markers::LAUNCH_ID_VAR;
use super::outcome::whole_seconds;
use super::{lock, sys};
use crate::config::{ProcessConfig, ScrewdriverConfig};
use crate::executor::{ExecError, Timing};

/// The build's own directory under the work dir: its home, its config, its exit status.
const BUILD_DIR_PREFIX: &str = "run-";
/// The build config in its directory (`SD_BUILD_CONFIG_FILE`): a file, not a variable, since a
/// large one would exceed what the kernel lets a process's environment hold.
const CONFIG_FILE: &str = "build.json";

/// The launcher's parent: runs it (`"$@"`), then leaves its exit status in the file `$0`
/// names, so an agent that restarts while the build runs can adopt it and still learn how it
/// ended. It mirrors the launcher's status (128 + N when a signal N ended it).
pub(super) const EXIT_WRAPPER: &str =
    r#""$@"; status=$?; printf '%s\n' "$status" > "$0.tmp" && mv -f "$0.tmp" "$0"; exit "$status""#;

/// Run as a build's user once its run ended: `$0` its directory, `$1` "kill" when the uid is the
/// build's alone (then everything left running as it goes first). Makes what the build left
/// removable (a directory it made unwritable), then empties the directory.
const CLEAN_UP: &str = r#"[ "$1" = kill ] && kill -s KILL -1 2>/dev/null; chmod -R u+rwX -- "$0" 2>/dev/null; find "$0" -mindepth 1 -delete"#;

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
    /// The build's values exceed what the kernel lets a new process carry (E2BIG): the same
    /// build will never start, whatever the host.
    #[error(
        "the build's environment is too large for the kernel ({bytes} bytes; at most 128 KiB a value): a value of the start message is too long"
    )]
    TooLarge { bytes: usize },
    #[error("cannot prepare the build's directory {}: {source}", path.display())]
    BuildDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "all {count} uids of executor.process.uid_range are in use: make the range larger than executor.max_in_flight"
    )]
    NoFreeUid { count: u32 },
    #[error(transparent)]
    Account(#[from] AccountError),
}

impl LauncherError {
    /// Whether starting the same build again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, LauncherError::TooLarge { .. })
    }
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
    /// Whose account builds run as.
    run_as: RunAs,
    /// Variables of the agent's environment builds inherit.
    env_allow: Vec<String>,
    /// Uids of [`RunAs::Range`] handed to a launch whose directory is not made yet.
    claimed: Mutex<HashSet<u32>>,
}

/// Who one build runs as: its uid and gid, `None` for the agent's own user.
type Account = Option<(u32, u32)>;

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
        let run_as = RunAs::resolve(config).map_err(LauncherError::from)?;
        let work_dir = prepare_work_dir(config)?;
        if run_as != RunAs::Agent {
            // Builds pass through it to their own directory; they may not list it (the build
            // logs and other builds' directories are there).
            std::fs::set_permissions(&work_dir, std::fs::Permissions::from_mode(0o711)).map_err(
                |source| LauncherError::WorkDir {
                    path: work_dir.clone(),
                    source,
                },
            )?;
        }
        tracing::info!(run_as = %run_as.describe(), "process executor accounts");
        Ok(Self {
            program,
            args: args.to_vec(),
            work_dir,
            store_uri: screwdriver.store_uri.clone(),
            ui_uri: screwdriver.ui_uri.clone(),
            pushgateway_url: Some(screwdriver.pushgateway_url.clone())
                .filter(|url| !url.trim().is_empty()),
            host,
            run_as,
            env_allow: config.env_allow.clone(),
            claimed: Mutex::new(HashSet::new()),
        })
    }

    /// The build's own directory for launch `launch_id`.
    pub(super) fn build_dir(&self, launch_id: &str) -> PathBuf {
        self.work_dir.join(format!("{BUILD_DIR_PREFIX}{launch_id}"))
    }

    /// The account for one launch; with a uid range, a uid no build directory, process or other
    /// launch in progress holds, kept claimed until `release`.
    fn claim_account(&self) -> Result<Account, LauncherError> {
        let (range, gid) = match self.run_as {
            RunAs::Agent => return Ok(None),
            RunAs::One { uid, gid } => return Ok(Some((uid, gid))),
            RunAs::Range { range, gid } => (range, gid),
        };
        let mut busy = sys::uids_with_processes();
        busy.extend(self.build_dir_owners());
        let mut claimed = lock(&self.claimed);
        busy.extend(claimed.iter().copied());
        let uid = free_uid(range, &busy).ok_or(LauncherError::NoFreeUid {
            count: range.count(),
        })?;
        claimed.insert(uid);
        Ok(Some((uid, gid)))
    }

    fn release(&self, account: Account) {
        if let (RunAs::Range { .. }, Some((uid, _))) = (&self.run_as, account) {
            lock(&self.claimed).remove(&uid);
        }
    }

    /// Owners of the build directories there are: their uids are taken until removed.
    fn build_dir_owners(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.work_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(BUILD_DIR_PREFIX)
            })
            .filter_map(|e| std::fs::symlink_metadata(e.path()).ok())
            .filter(std::fs::Metadata::is_dir)
            .map(|m| m.uid())
            .collect()
    }

    /// The build's directory, private to its account, holding its config ([`CONFIG_FILE`]).
    fn prepare_build_dir(
        &self,
        dir: &Path,
        config: &str,
        account: Account,
    ) -> Result<(), LauncherError> {
        let failed = |source| LauncherError::BuildDir {
            path: dir.to_owned(),
            source,
        };
        // A directory left by a launch attempt that did not start is made again.
        match std::fs::symlink_metadata(dir) {
            Ok(_) => reclaim_tree(dir).map_err(failed)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(failed)?;
        let file = dir.join(CONFIG_FILE);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(failed)?;
        out.write_all(config.as_bytes()).map_err(failed)?;
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(&file, Some(uid), Some(gid)).map_err(failed)?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(failed)?;
        }
        Ok(())
    }

    /// Removes launch `launch_id`'s directory once its run has ended. What the build made in it
    /// is removed as the build's own user (the agent needs no right over its files); with a uid
    /// of its own, whatever still runs as that uid (a daemon that left the process group) is
    /// killed first, so the uid is free for the next build.
    pub(super) async fn clean_up(&self, launch_id: &str) {
        let dir = self.build_dir(launch_id);
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            return;
        };
        let owner = meta.uid();
        if meta.is_dir()
            && owner != sys::euid()
            && let Some(gid) = self.run_as.gid()
        {
            let kill = if self.run_as.owns_alone(owner) {
                "kill"
            } else {
                "keep"
            };
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(CLEAN_UP)
                .arg(&dir)
                .arg(kill)
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: `become_user` makes only async-signal-safe calls.
            unsafe {
                cmd.pre_exec(move || sys::become_user(owner, gid));
            }
            match cmd.status().await {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    warn!(dir = %dir.display(), %status, "clean-up of a build's directory failed")
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot clean up a build's directory")
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&dir).or_else(|_| reclaim_tree(&dir)) {
            warn!(dir = %dir.display(), error = %e, "cannot remove a build's directory; its uid stays taken until it is gone");
        }
    }

    /// Where the launcher's stdout and stderr of `build_id` go.
    pub(super) fn log_path(&self, build_id: u64) -> PathBuf {
        self.work_dir.join(format!("build-{build_id}.log"))
    }

    /// Where the [`EXIT_WRAPPER`] of launch `launch_id` leaves its exit status (in the build's
    /// directory: the wrapper runs as the build's user).
    pub(super) fn exit_path(&self, launch_id: &str) -> PathBuf {
        self.build_dir(launch_id).join("exit")
    }

    /// The launcher is an executable file (through `PATH` for a bare name) and the work dir is
    /// still there; the launcher's path, and whose account builds run as.
    pub(super) fn check(&self) -> Result<(PathBuf, String), ExecError> {
        let program = resolve_program(&self.program)?;
        if !self.work_dir.is_dir() {
            return Err(ExecError::Rejected(format!(
                "work dir {} is gone: recreate it or set executor.process.work_dir",
                self.work_dir.display()
            )));
        }
        Ok((program, self.run_as.describe()))
    }

    /// Starts the launcher of `build` in its own process group under the [`EXIT_WRAPPER`], as
    /// the build's account, in its own directory, appending to the build's log. Errors are worth
    /// retrying (the launch is not done) but an unencodable build or one too large to start.
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
        let config = self.build_config(build)?;
        let dir = self.build_dir(launch_id);
        let account = self.claim_account()?;
        let prepared = self.prepare_build_dir(&dir, &config, account);
        // From here the directory's owner holds the uid.
        self.release(account);
        prepared?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(EXIT_WRAPPER)
            .arg(self.exit_path(launch_id))
            .arg(&self.program)
            .args(&self.args)
            .current_dir(&dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(false)
            // Only what the allow-list names: the agent's own settings (SD_AGENT_*, possibly
            // secrets) and anything else of its environment stay out.
            .env_clear();
        for name in &self.env_allow {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.envs(self.build_env(build, timing, launch_id, &dir));
        if let Some((uid, gid)) = account {
            // SAFETY: `become_user` makes only async-signal-safe calls.
            unsafe {
                cmd.pre_exec(move || sys::become_user(uid, gid));
            }
        }
        let child = cmd.spawn().map_err(|source| {
            if source.raw_os_error() == Some(libc::E2BIG) {
                let bytes = self
                    .build_env(build, timing, launch_id, &dir)
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 2)
                    .sum();
                LauncherError::TooLarge { bytes }
            } else {
                LauncherError::Spawn {
                    program: self.program.clone(),
                    source,
                }
            }
        })?;
        Ok(child)
    }

    /// The build as JSON for [`CONFIG_FILE`], without its token (in `SD_TOKEN` only, so that
    /// dumping the config does not leak it).
    fn build_config(&self, build: &StartMessage) -> Result<String, ExecError> {
        let mut config = serde_json::to_value(build).map_err(|source| ExecError::Encode {
            build_id: build.build_id,
            source,
        })?;
        if let Some(object) = config.as_object_mut() {
            object.remove("token");
        }
        Ok(config.to_string())
    }

    /// The launcher's environment: its `SD_*` variables, and what Screwdriver's Kubernetes
    /// executor also gives it (`NODE_ID`, the host it reports as the build's; `CONTAINER_IMAGE`).
    /// The build's config is in the file `SD_BUILD_CONFIG_FILE` names.
    fn build_env(
        &self,
        build: &StartMessage,
        timing: &Timing,
        launch_id: &str,
        dir: &Path,
    ) -> Vec<(&'static str, String)> {
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
            (
                "SD_BUILD_CONFIG_FILE",
                dir.join(CONFIG_FILE).to_string_lossy().into_owned(),
            ),
            ("HOME", dir.to_string_lossy().into_owned()),
            (LAUNCH_ID_VAR, launch_id.to_owned()),
        ];
        if let Some(url) = &self.pushgateway_url {
            env.push(("SD_PUSHGATEWAY_URL", url.clone()));
        }
        env
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
    let run_as = RunAs::resolve(config).map_err(LauncherError::from)?;
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
        "launcher {} is executable; work dir {} is writable; {}",
        program.display(),
        work_dir.display(),
        run_as.describe()
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

/// Removes `path` (in the agent's work dir) and what is under it, taking the directory back
/// from a build's user first: a directory of a launch that did not start holds only what the
/// agent put there.
fn reclaim_tree(path: &Path) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.is_dir()
        && meta.uid() != sys::euid()
    {
        std::os::unix::fs::lchown(path, Some(sys::euid()), None)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    remove_tree(path)
}

/// Removes `path` and what is under it, never following a symbolic link out of it.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
