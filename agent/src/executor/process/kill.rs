//! Ending processes: SIGTERM, the grace period, then SIGKILL to what is still there
//! ([`terminate`]); what a launcher left in its group once it has ended ([`leftovers`]); and
//! every process of an orphaned run, found by its recorded group and by the launch id in its
//! environment ([`kill_orphan`]).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::process::Child;
use tokio::time::Instant;

use super::markers::{LAUNCH_ID_VAR, Marker, SHORT_GRACE};
use super::sys;

/// SIGTERM to the groups and pids, then SIGKILL to what is still there after `grace`; reaps
/// `child` (the leader of the first group) when given.
pub(super) async fn terminate(
    groups: &[u32],
    pids: &[u32],
    mut child: Option<&mut Child>,
    grace: Duration,
) {
    for &g in groups {
        sys::signal_group(g, libc::SIGTERM);
    }
    for &p in pids {
        sys::signal_pid(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    if let Some(child) = child.as_deref_mut()
        && groups.is_empty()
    {
        let _ = child.start_kill();
    }
    if let Some(child) = child.as_deref_mut() {
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    let remaining =
        || groups.iter().any(|&g| sys::group_alive(g)) || pids.iter().any(|&p| sys::pid_alive(p));
    while remaining() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if remaining() {
        for &g in groups {
            sys::signal_group(g, libc::SIGKILL);
        }
        for &p in pids {
            sys::signal_pid(p, libc::SIGKILL);
        }
    }
    if let Some(child) = child {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// The launcher is gone; anything it left in its group `pgid` goes too, given at most
/// [`SHORT_GRACE`] of the build's `grace` (it has reported already).
pub(super) async fn leftovers(pgid: Option<u32>, grace: Duration) {
    if let Some(pgid) = pgid
        && sys::group_alive(pgid)
    {
        terminate(&[pgid], &[], None, grace.min(SHORT_GRACE)).await;
    }
}

/// Kills an orphan's processes: the recorded group when its leader is still the same process,
/// and the group of every process carrying its launch id; SIGKILL after the grace period its
/// marker records, else [`SHORT_GRACE`].
pub(super) async fn kill_orphan(marker: &Marker) {
    let mut groups = BTreeSet::new();
    let mut pids = BTreeSet::new();
    if let Some(pid) = marker.pid
        && sys::identity_matches(pid, marker.start_time)
    {
        match sys::pgid(pid).or(marker.pgid) {
            Some(pgid) if sys::killable_group(pgid) => groups.insert(pgid),
            _ => pids.insert(pid),
        };
    }
    for (pid, pgid) in sys::processes_with_env(LAUNCH_ID_VAR, &marker.launch_id) {
        if sys::killable_group(pgid) {
            groups.insert(pgid);
        } else {
            pids.insert(pid);
        }
    }
    let groups: Vec<u32> = groups.into_iter().collect();
    let pids: Vec<u32> = pids.into_iter().collect();
    if !groups.is_empty() || !pids.is_empty() {
        terminate(&groups, &pids, None, marker.grace()).await;
    }
}
