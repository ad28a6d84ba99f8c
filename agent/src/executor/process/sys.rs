//! The host and its processes as the kernel shows them: host name, boot id, process start times
//! (the pid-reuse guard), process groups, the launch-id scan of environments, liveness and
//! signals. The crate's only `unsafe` (its libc calls) is here, each block with its safety comment.
//!
//! Linux `/proc` gives the pid-reuse guard (start times), group membership and the launch-id scan;
//! without it (other Unixes) liveness falls back to `kill(pid, 0)` and the scan finds nothing.
//!
//! A leaf: it knows nothing of builds or markers.

use std::path::Path;

/// This machine's host name ("localhost" when the kernel will not say).
pub(super) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, which gethostname respects.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The kernel's boot id (empty without `/proc`): pids of an earlier boot mean other processes.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of `pid` (`/proc/<pid>/stat` field 22), which tells it from a later process
/// given the same pid.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

/// The process group of `pid`, as `/proc` says.
pub(super) fn pgid(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|s| s.pgid)
}

fn have_proc() -> bool {
    Path::new("/proc/self/stat").exists()
}

struct ProcStat {
    state: char,
    pgid: u32,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field n is fields[n - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn is_live(stat: &ProcStat) -> bool {
    !matches!(stat.state, 'Z' | 'X' | 'x')
}

fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// `pid` is alive (not a zombie) and is the process that started at `start_time`. With `/proc`
/// a missing start time never matches: better to leave a process than to kill a stranger.
pub(super) fn identity_matches(pid: u32, start_time: Option<u64>) -> bool {
    if have_proc() {
        return match (proc_stat(pid), start_time) {
            (Some(stat), Some(start)) => is_live(&stat) && stat.start_time == start,
            _ => false,
        };
    }
    signal_probe(1, pid)
}

pub(super) fn pid_alive(pid: u32) -> bool {
    if have_proc() {
        return proc_stat(pid).is_some_and(|s| is_live(&s));
    }
    signal_probe(1, pid)
}

pub(super) fn group_alive(pgid: u32) -> bool {
    if have_proc() {
        return proc_pids()
            .into_iter()
            .filter_map(proc_stat)
            .any(|s| s.pgid == pgid && is_live(&s));
    }
    signal_probe(-1, pgid)
}

/// Processes whose environment holds `name=value`, with their process group.
pub(super) fn processes_with_env(name: &str, value: &str) -> Vec<(u32, u32)> {
    let needle = format!("{name}={value}");
    proc_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|entry| entry == needle.as_bytes())
            })
        })
        .filter_map(|pid| proc_stat(pid).filter(is_live).map(|s| (pid, s.pgid)))
        .collect()
}

/// Never signal init, "every process" (0/-1), or the agent's own group.
pub(super) fn killable_group(pgid: u32) -> bool {
    // SAFETY: getpgrp has no preconditions.
    let own = unsafe { libc::getpgrp() };
    libc::pid_t::try_from(pgid).is_ok_and(|g| g > 1 && g != own)
}

pub(super) fn signal_group(pgid: u32, signal: libc::c_int) {
    if !killable_group(pgid) {
        return;
    }
    if let Ok(g) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill has no memory preconditions; `-g` (g > 1) addresses exactly group g.
        unsafe { libc::kill(-g, signal) };
    }
}

pub(super) fn signal_pid(pid: u32, signal: libc::c_int) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    if p <= 1 || pid == std::process::id() {
        return;
    }
    // SAFETY: kill has no memory preconditions; p > 1 addresses exactly one process.
    unsafe { libc::kill(p, signal) };
}

/// `kill(sign * id, 0)`: whether the process (sign 1) or group (sign -1) exists.
fn signal_probe(sign: libc::pid_t, id: u32) -> bool {
    let Ok(id) = libc::pid_t::try_from(id) else {
        return false;
    };
    if id <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(sign * id, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
