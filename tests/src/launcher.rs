//! The launcher stand-in: a `/bin/sh` script the process executor runs where Screwdriver's
//! launcher would run, with the behaviours tests need as options.
//!
//! A run of the script is made of a prelude every build shares (record the run, dump the
//! environment, read the build's annotations) and a [`Run`]: a SIGTERM trap, a pause, a line
//! said, and an end (exit code, a signal to itself, or hanging with a grandchild). One run is the
//! default; [`Launcher::for_build`] gives a build id a run of its own.
//!
//! Files a run leaves for the test go into the directory given by [`Launcher::files_in`] (`$OUT`
//! in the script), named `<what>-<build id>`:
//!
//! | file             | written by                 | holds                                  |
//! |------------------|----------------------------|----------------------------------------|
//! | `count-<id>`     | [`Launcher::count_runs`]   | a line per run of that build           |
//! | `env-<id>`       | [`Launcher::dump_env`]     | the launcher's environment (`env`)     |
//! | `config-<id>`    | [`Launcher::dump_env`]     | the build config file's content        |
//! | `grandchild-<id>`| [`Run::hang`]              | the pid of the `sleep` left in its group |
//! | `leader-<id>`    | [`Run::hang`]              | its own pid, written last (traps are set) |
//! | `trapped-<id>`   | [`OnTerm::Flush`]          | `flushed`, once the trap's pause is over |
//! | `termed-<id>`    | [`OnTerm::Note`]           | `term`: a SIGTERM reached it           |
//!
//! Builds steer it with annotations (read from the file `SD_BUILD_CONFIG_FILE` names, as a number or a string of
//! digits): [`EXIT`] is the exit code of [`Run::exit_as_annotated`], [`SLEEP`] the seconds of
//! [`Run::sleep_as_annotated`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The annotation giving the exit code (`{"test/exit": 3}` or `"3"`).
pub const EXIT: &str = "test/exit";
/// The annotation giving the seconds to run (`{"test/sleep": 2}` or `"0.35"`).
pub const SLEEP: &str = "test/sleep";

/// The stand-in the system tests and the fault suite give their agents: appends the build id to
/// `runs_log` (one line a run: see [`runs`]), runs as long as [`SLEEP`] says (0.2 s without),
/// exits as [`EXIT`] says (0 without).
pub fn recording(runs_log: &Path) -> Launcher {
    Launcher::new()
        .log_runs(runs_log)
        .sleep_as_annotated(Duration::from_millis(200))
        .exit_as_annotated()
}

/// The runs a launcher with [`Launcher::log_runs`] recorded in `runs_log`: build id → runs.
pub fn runs(runs_log: &Path) -> HashMap<u64, u32> {
    let text = std::fs::read_to_string(runs_log).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        if let Ok(id) = line.trim().parse::<u64>() {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// What the stand-in does when SIGTERM reaches it (by default: dies of it).
#[derive(Debug, Clone, PartialEq)]
pub enum OnTerm {
    /// Ignores it (a process only SIGKILL ends).
    Ignore,
    /// Leaves `termed-<id>` and exits 143.
    Note,
    /// As run.sh does: finishes its work for this long, leaves `trapped-<id>`, exits 143.
    Flush(Duration),
}

#[derive(Debug, Clone, PartialEq)]
enum Pause {
    Fixed(Duration),
    /// [`SLEEP`], or this without it.
    Annotated(Duration),
}

#[derive(Debug, Clone, PartialEq)]
enum End {
    Exit(u8),
    /// [`EXIT`], or 0 without it.
    AnnotatedExit,
    /// `kill -<signal> $$`.
    Signal(String),
    Hang,
}

/// What one build's launcher does after the shared prelude, in this order: sets its SIGTERM
/// trap, pauses, says a line, ends. By default it ends at once with exit 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    on_term: Option<OnTerm>,
    pause: Option<Pause>,
    say: Option<String>,
    end: End,
}

impl Default for Run {
    fn default() -> Self {
        Self::new()
    }
}

impl Run {
    pub fn new() -> Self {
        Self {
            on_term: None,
            pause: None,
            say: None,
            end: End::Exit(0),
        }
    }

    /// Runs for `d` before it ends.
    pub fn sleep(mut self, d: Duration) -> Self {
        self.pause = Some(Pause::Fixed(d));
        self
    }

    /// Runs as long as the build's [`SLEEP`] annotation says, `default` without it.
    pub fn sleep_as_annotated(mut self, default: Duration) -> Self {
        self.pause = Some(Pause::Annotated(default));
        self
    }

    /// Says `line` on stdout (the build's log) after its pause. It is put in double quotes:
    /// `$SD_BUILD_ID`, `$SD_TIMEOUT` and the like expand.
    pub fn say(mut self, line: &str) -> Self {
        self.say = Some(line.to_owned());
        self
    }

    /// Exits with `code`.
    pub fn exit(mut self, code: u8) -> Self {
        self.end = End::Exit(code);
        self
    }

    /// Exits with the build's [`EXIT`] annotation, 0 without it.
    pub fn exit_as_annotated(mut self) -> Self {
        self.end = End::AnnotatedExit;
        self
    }

    /// Ends by sending itself `signal` (`TERM`, `KILL`…), as a launcher killed from outside.
    pub fn kill_itself(mut self, signal: &str) -> Self {
        self.end = End::Signal(signal.to_owned());
        self
    }

    /// Never ends by itself: leaves a grandchild (`sleep 300`) in its process group, writes
    /// `grandchild-<id>` and then `leader-<id>` (each whole, through a rename), and waits.
    pub fn hang(mut self) -> Self {
        self.end = End::Hang;
        self
    }

    /// Traps SIGTERM as `on_term` says.
    pub fn on_sigterm(mut self, on_term: OnTerm) -> Self {
        self.on_term = Some(on_term);
        self
    }

    fn needs_out(&self) -> bool {
        matches!(self.end, End::Hang)
            || matches!(self.on_term, Some(OnTerm::Note | OnTerm::Flush(_)))
    }

    fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.on_term {
            None => {}
            Some(OnTerm::Ignore) => out.push("trap '' TERM".to_owned()),
            Some(OnTerm::Note) => out
                .push(r#"trap 'echo term > "$OUT/termed-$SD_BUILD_ID"; exit 143' TERM"#.to_owned()),
            Some(OnTerm::Flush(d)) => out.push(format!(
                r#"trap 'sleep {}; echo flushed > "$OUT/trapped-$SD_BUILD_ID"; exit 143' TERM"#,
                seconds(*d)
            )),
        }
        match &self.pause {
            None => {}
            Some(Pause::Fixed(d)) => out.push(format!("sleep {}", seconds(*d))),
            Some(Pause::Annotated(d)) => out.push(format!("sleep \"${{pause:-{}}}\"", seconds(*d))),
        }
        if let Some(line) = &self.say {
            out.push(format!("echo \"{}\"", double_quoted(line)));
        }
        match &self.end {
            End::Exit(code) => out.push(format!("exit {code}")),
            End::AnnotatedExit => out.push("exit \"${code:-0}\"".to_owned()),
            End::Signal(signal) => out.push(format!("kill -{signal} $$")),
            End::Hang => out.extend(
                [
                    "sleep 300 &",
                    r#"echo $! > "$OUT/grandchild-$SD_BUILD_ID.tmp" && mv "$OUT/grandchild-$SD_BUILD_ID.tmp" "$OUT/grandchild-$SD_BUILD_ID""#,
                    r#"echo $$ > "$OUT/leader-$SD_BUILD_ID.tmp" && mv "$OUT/leader-$SD_BUILD_ID.tmp" "$OUT/leader-$SD_BUILD_ID""#,
                    "wait",
                ]
                .map(str::to_owned),
            ),
        }
        out
    }
}

/// A launcher stand-in script: a shared prelude, a default [`Run`] and runs of particular
/// builds. The run options here set the default run.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    out: Option<PathBuf>,
    runs_log: Option<PathBuf>,
    count_runs: bool,
    dump_env: bool,
    default: Run,
    builds: Vec<(u64, Run)>,
}

impl Launcher {
    /// A launcher that records nothing and exits 0 at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// The directory its `<what>-<id>` files go to (`$OUT`); needed by the options writing one.
    pub fn files_in(mut self, dir: &Path) -> Self {
        self.out = Some(dir.to_owned());
        self
    }

    /// Appends the build id to `runs_log` first thing, one line a run (read it with [`runs`]).
    pub fn log_runs(mut self, runs_log: &Path) -> Self {
        self.runs_log = Some(runs_log.to_owned());
        self
    }

    /// Appends a line to `count-<id>` first thing: one line a run of that build.
    pub fn count_runs(mut self) -> Self {
        self.count_runs = true;
        self
    }

    /// Writes its environment to `env-<id>`.
    pub fn dump_env(mut self) -> Self {
        self.dump_env = true;
        self
    }

    /// Build `id` runs `run` instead of the default run.
    pub fn for_build(mut self, id: u64, run: Run) -> Self {
        self.builds.push((id, run));
        self
    }

    /// See [`Run::sleep`].
    pub fn sleep(self, d: Duration) -> Self {
        self.with_default(|r| r.sleep(d))
    }

    /// See [`Run::sleep_as_annotated`].
    pub fn sleep_as_annotated(self, default: Duration) -> Self {
        self.with_default(|r| r.sleep_as_annotated(default))
    }

    /// See [`Run::say`].
    pub fn say(self, line: &str) -> Self {
        self.with_default(|r| r.say(line))
    }

    /// See [`Run::exit`].
    pub fn exit(self, code: u8) -> Self {
        self.with_default(|r| r.exit(code))
    }

    /// See [`Run::exit_as_annotated`].
    pub fn exit_as_annotated(self) -> Self {
        self.with_default(Run::exit_as_annotated)
    }

    /// See [`Run::kill_itself`].
    pub fn kill_itself(self, signal: &str) -> Self {
        self.with_default(|r| r.kill_itself(signal))
    }

    /// See [`Run::hang`].
    pub fn hang(self) -> Self {
        self.with_default(Run::hang)
    }

    /// See [`Run::on_sigterm`].
    pub fn on_sigterm(self, on_term: OnTerm) -> Self {
        self.with_default(|r| r.on_sigterm(on_term))
    }

    fn with_default(mut self, f: impl FnOnce(Run) -> Run) -> Self {
        self.default = f(self.default);
        self
    }

    fn runs(&self) -> impl Iterator<Item = &Run> {
        std::iter::once(&self.default).chain(self.builds.iter().map(|(_, r)| r))
    }

    /// The script's text.
    ///
    /// # Panics
    /// When an option writing a `<what>-<id>` file is set without [`files_in`](Self::files_in).
    pub fn script(&self) -> String {
        let needs_out = self.count_runs || self.dump_env || self.runs().any(Run::needs_out);
        assert!(
            !needs_out || self.out.is_some(),
            "this launcher writes files: give it a directory with files_in"
        );
        let mut s = String::from("#!/bin/sh\n");
        if let Some(out) = &self.out {
            let _ = writeln!(s, "OUT={}", single_quoted(&out.display().to_string()));
        }
        if let Some(log) = &self.runs_log {
            let _ = writeln!(
                s,
                "echo \"$SD_BUILD_ID\" >> {}",
                single_quoted(&log.display().to_string())
            );
        }
        if self.count_runs {
            s.push_str("echo run >> \"$OUT/count-$SD_BUILD_ID\"\n");
        }
        if self.dump_env {
            s.push_str("env > \"$OUT/env-$SD_BUILD_ID\"\n");
            s.push_str(
                "cat \"$SD_BUILD_CONFIG_FILE\" > \"$OUT/config-$SD_BUILD_ID\" 2>/dev/null\n",
            );
        }
        if self.runs().any(|r| r.end == End::AnnotatedExit) {
            let _ = writeln!(s, "code={}", annotation(EXIT, "[0-9]"));
        }
        if self
            .runs()
            .any(|r| matches!(r.pause, Some(Pause::Annotated(_))))
        {
            let _ = writeln!(s, "pause={}", annotation(SLEEP, "[0-9.]"));
        }
        if self.builds.is_empty() {
            for line in self.default.lines() {
                let _ = writeln!(s, "{line}");
            }
            return s;
        }
        s.push_str("case $SD_BUILD_ID in\n");
        let arms = self.builds.iter().map(|(id, run)| (id.to_string(), run));
        for (pattern, run) in arms.chain(std::iter::once(("*".to_owned(), &self.default))) {
            let _ = writeln!(s, "{pattern})");
            for line in run.lines() {
                let _ = writeln!(s, "  {line}");
            }
            s.push_str("  ;;\n");
        }
        s.push_str("esac\n");
        s
    }

    /// Writes the script to `path`, executable, and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.script()).expect("write the launcher stand-in");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .expect("make the launcher stand-in executable");
        path.to_owned()
    }
}

/// A command substitution reading annotation `name` (a number, or a string of `chars`) from
/// the file `SD_BUILD_CONFIG_FILE` names: empty without it.
fn annotation(name: &str, chars: &str) -> String {
    format!(
        r#"$(sed -n 's/.*"{}":"\{{0,1\}}\({chars}*\).*/\1/p' "$SD_BUILD_CONFIG_FILE" 2>/dev/null)"#,
        name.replace('/', "\\/")
    )
}

/// `d` in seconds as `sleep` takes them: `1`, `0.2`, `2.4`.
fn seconds(d: Duration) -> String {
    let millis = d.subsec_millis();
    if millis == 0 {
        return d.as_secs().to_string();
    }
    let fraction = format!("{millis:03}");
    format!("{}.{}", d.as_secs(), fraction.trim_end_matches('0'))
}

fn single_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `s` for inside double quotes: `$` still expands, nothing else does.
fn double_quoted(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('`', "\\`")
}

#[cfg(test)]
mod tests {
    use std::process::{Command, ExitStatus};
    use std::time::Instant;

    use super::*;

    fn launch(script: &Path, id: u64, config: &str) -> (ExitStatus, String) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let out = Command::new(script)
            .env("SD_BUILD_ID", id.to_string())
            .env("SD_BUILD_CONFIG_FILE", file.path())
            .env("SD_TIMEOUT", "7")
            .output()
            .expect("run the stand-in");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn config(annotations: serde_json::Value) -> String {
        serde_json::json!({"buildId": 1, "annotations": annotations}).to_string()
    }

    #[test]
    fn recording_logs_runs_and_obeys_the_annotations_as_numbers_or_strings() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs.log");
        let script = recording(&log).write(&dir.path().join("launch.sh"));
        let (status, _) = launch(&script, 5, &config(serde_json::json!({EXIT: 3, SLEEP: 0})));
        assert_eq!(status.code(), Some(3));
        let (status, _) = launch(&script, 6, &config(serde_json::json!({EXIT: "4"})));
        assert_eq!(status.code(), Some(4));
        let started = Instant::now();
        let (status, _) = launch(&script, 5, &config(serde_json::json!({SLEEP: "0.50"})));
        assert!(status.success());
        assert!(started.elapsed() >= Duration::from_millis(500));
        let started = Instant::now();
        let (status, _) = launch(&script, 7, "{}");
        assert!(status.success(), "exit 0 without the annotation");
        assert!(started.elapsed() >= Duration::from_millis(200), "0.2 s");
        assert_eq!(runs(&log), HashMap::from([(5, 2), (6, 1), (7, 1)]));
    }

    #[test]
    fn per_build_runs_files_and_signals() {
        let dir = tempfile::tempdir().unwrap();
        let script = Launcher::new()
            .files_in(dir.path())
            .count_runs()
            .dump_env()
            .say("hello from build $SD_BUILD_ID after \"$SD_TIMEOUT\" minutes")
            .exit_as_annotated()
            .for_build(2, Run::new().sleep(Duration::from_millis(100)).exit(5))
            .for_build(3, Run::new().kill_itself("TERM"))
            .write(&dir.path().join("launch.sh"));
        let (status, said) = launch(&script, 1, &config(serde_json::json!({EXIT: "9"})));
        assert_eq!(status.code(), Some(9));
        assert_eq!(said, "hello from build 1 after \"7\" minutes\n");
        assert_eq!(launch(&script, 2, "{}").0.code(), Some(5));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(launch(&script, 3, "{}").0.signal(), Some(15), "SIGTERM");
        let count = std::fs::read_to_string(dir.path().join("count-1")).unwrap();
        assert_eq!(count.lines().count(), 1);
        let env = std::fs::read_to_string(dir.path().join("env-2")).unwrap();
        assert!(env.lines().any(|l| l == "SD_BUILD_ID=2"), "{env}");
    }

    #[test]
    fn hanging_leaves_its_pids_and_a_trap_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let script = Launcher::new()
            .files_in(dir.path())
            .on_sigterm(OnTerm::Flush(Duration::from_millis(100)))
            .hang()
            .write(&dir.path().join("launch.sh"));
        let mut child = Command::new(&script)
            .env("SD_BUILD_ID", "8")
            .spawn()
            .unwrap();
        let leader = dir.path().join("leader-8");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !leader.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid: u32 = std::fs::read_to_string(&leader)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, child.id());
        let grandchild: u32 = std::fs::read_to_string(dir.path().join("grandchild-8"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(signal(pid, "TERM"));
        assert_eq!(child.wait().unwrap().code(), Some(143));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("trapped-8")).unwrap(),
            "flushed\n"
        );
        assert!(signal(grandchild, "KILL"));
    }

    /// Through the shell's builtin: minimal images have no kill(1).
    fn signal(pid: u32, signal: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("kill -{signal} {pid}")])
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    #[should_panic(expected = "files_in")]
    fn files_without_a_directory_are_refused() {
        let _ = Launcher::new().hang().script();
    }

    #[test]
    fn seconds_as_sleep_takes_them() {
        assert_eq!(seconds(Duration::from_secs(1)), "1");
        assert_eq!(seconds(Duration::from_millis(200)), "0.2");
        assert_eq!(seconds(Duration::from_millis(2400)), "2.4");
        assert_eq!(seconds(Duration::from_millis(1050)), "1.05");
    }
}
