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

/// The agent's effective uid.
pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `name` as an account: its uid and primary gid, or `None` when there is no such account.
pub(super) fn user_by_name(name: &str) -> std::io::Result<Option<(u32, u32)>> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to overwrite.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf.len()` is the size of `buf`, which
    // getpwnam_r respects; `found` is set to `&pwd` or null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
}

/// `name` as a group: its gid, or `None` when there is no such group.
pub(super) fn group_by_name(name: &str) -> std::io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: an all-zero group is a valid value for getgrnam_r to overwrite.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user_by_name`.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some(grp.gr_gid))
}

/// Capabilities (bit numbers, `capability.h`) the agent needs to run builds as other users: to
/// switch to them, to hand them their files, and to signal them.
pub(super) const SWITCH_CAPABILITIES: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
];

/// Which of [`SWITCH_CAPABILITIES`] this process lacks (none for root).
pub(super) fn missing_switch_capabilities() -> Vec<&'static str> {
    if euid() == 0 {
        return Vec::new();
    }
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    SWITCH_CAPABILITIES
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|&(_, name)| name)
        .collect()
}

/// Uids that own a live process on this host (`/proc/<pid>/status`, real uid).
pub(super) fn uids_with_processes() -> std::collections::HashSet<u32> {
    proc_pids()
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `capset(2)`'s header and data (version 3: two 32-bit words per set).
#[cfg(target_os = "linux")]
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(target_os = "linux")]
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In a child between fork and exec: becomes `uid`:`gid` with no supplementary groups and no
/// capability left (none permitted, inheritable or ambient), sets no-new-privileges so no
/// set-uid program gives any back, and a umask of 077. Only async-signal-safe calls: no
/// allocation.
///
/// # Safety
/// To be called only in a forked child before exec (`Command::pre_exec`).
pub(super) unsafe fn become_user(uid: u32, gid: u32) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on values; `groups` is valid for one gid.
    unsafe {
        // What the build writes (in /tmp too) is its own: not readable by other builds.
        libc::umask(0o077);
        let groups = [gid];
        check(libc::setgroups(1, groups.as_ptr()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls; `header` and `none` outlive the call, `none` holds the two
    // words version 3 reads.
    unsafe {
        // A non-root agent keeps its capabilities across setuid: drop them all.
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        let rc = libc::syscall(libc::SYS_capset, &header, none.as_ptr());
        check(if rc == 0 { 0 } else { -1 })?;
        // Ambient capabilities go with the permitted ones; cleared again for old kernels'
        // sake (EINVAL there: none can exist).
        let _ = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}
