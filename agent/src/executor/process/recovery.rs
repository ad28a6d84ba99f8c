//! What recovery does with a launch marker that has not ended and that no run of this executor
//! follows (pure): leave it, adopt the run, or end it and say why. Process liveness comes
//! through [`Processes`], so the decision is tested without processes or Redis; reading the
//! markers and acting on the answer is the I/O edge in `orphans`.
//!
//! A marker's owner is an executor instance. One that is gone (its process died, the host
//! rebooted, or it was dropped) leaves an orphan: the next executor on the host adopts the run
//! when its launcher still runs under the parent shell that will leave its exit status, and
//! otherwise ends it. A host that stops beating for [`HOST_GONE_AFTER`] has its runs ended from
//! another host.

use std::collections::HashMap;
use std::time::Duration;

use super::markers::{Marker, MarkerState, Owner};

/// Runs on a host silent for this long are ended by an executor elsewhere on the same Redis:
/// the host is gone (or cut off), and its builds can no longer be reported by it.
pub const HOST_GONE_AFTER: Duration = Duration::from_secs(15 * 60);
/// Reported for a build whose owning agent went away while it ran.
pub const RESTART_REASON: &str = "the agent restarted while the build ran; its result is unknown";

/// Reported for a build whose host stopped answering while it ran.
pub fn host_gone_reason(host: &str) -> String {
    format!(
        "the agent on host {host} has not been heard from for over {} minutes while the build ran; its result is unknown",
        HOST_GONE_AFTER.as_secs() / 60
    )
}

/// What this host can say about its own processes.
pub(super) trait Processes: Sync {
    /// `pid` is alive and is the process that started at `start_time` (the pid-reuse guard).
    fn running(&self, pid: u32, start_time: Option<u64>) -> bool;
    /// Executor `instance`, one of this agent process's own, has not been dropped.
    fn live_instance(&self, instance: &str) -> bool;
}

/// This host and executor, as markers are compared with them.
pub(super) struct Here<'a> {
    pub host: &'a str,
    /// Empty where the kernel does not say.
    pub boot_id: &'a str,
    pub me: &'a Owner,
    pub processes: &'a dyn Processes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Disposition {
    /// Not ours to act on: it has ended, its owner lives, or its host may still report it.
    Skip,
    /// An orphan of this host and boot whose launcher still runs under the parent shell that
    /// will leave its exit status: follow it to its end instead of killing it. (An end kept in
    /// the outbox means its owner saw the launcher end: the edge then ends it instead, as
    /// `End(RESTART_REASON)`, since only Redis can tell.)
    Adopt,
    /// An orphan to end (its processes killed where this host can reach them) and report once,
    /// with this reason unless a better one is known (a kept end, the exit status left).
    End(String),
}

/// What to do with `marker`, an active marker no run of ours follows; `beats` are the hosts'
/// last beats and `now` the time of ours (Redis clock, ms).
pub(super) fn disposition(
    marker: &Marker,
    here: &Here<'_>,
    beats: &HashMap<String, u64>,
    now: u64,
) -> Disposition {
    if marker.state == MarkerState::Ended {
        return Disposition::Skip;
    }
    if marker.host != here.host {
        // A host that never beat ran an older agent: leave its markers to it.
        return match beats.get(&marker.host) {
            Some(seen) if now.saturating_sub(*seen) > HOST_GONE_AFTER.as_millis() as u64 => {
                Disposition::End(host_gone_reason(&marker.host))
            }
            _ => Disposition::Skip,
        };
    }
    if owner_alive(marker, here) {
        Disposition::Skip
    } else if adoptable(marker, here) {
        Disposition::Adopt
    } else {
        Disposition::End(RESTART_REASON.to_owned())
    }
}

/// Whether the executor owning `marker` (on this host) still runs.
fn owner_alive(marker: &Marker, here: &Here<'_>) -> bool {
    let owner = &marker.agent;
    if owner.instance == here.me.instance {
        return true;
    }
    if !marker.boot_id.is_empty() && !here.boot_id.is_empty() && marker.boot_id != here.boot_id {
        return false;
    }
    if owner.pid == here.me.pid && owner.start_time == here.me.start_time {
        return here.processes.live_instance(&owner.instance);
    }
    here.processes.running(owner.pid, owner.start_time)
}

/// An orphan of this host and boot whose launcher still runs under the parent shell that will
/// leave its exit status: it can be followed to its end instead of killed.
fn adoptable(marker: &Marker, here: &Here<'_>) -> bool {
    marker.host == here.host
        && !marker.boot_id.is_empty()
        && marker.boot_id == here.boot_id
        && marker.exit_file.is_some()
        && marker
            .pid
            .is_some_and(|pid| here.processes.running(pid, marker.start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes by (pid, start time), and the executor instances of this agent process.
    #[derive(Default)]
    struct Fake {
        running: Vec<(u32, u64)>,
        instances: Vec<&'static str>,
    }

    impl Processes for Fake {
        fn running(&self, pid: u32, start_time: Option<u64>) -> bool {
            start_time.is_some_and(|start| self.running.contains(&(pid, start)))
        }
        fn live_instance(&self, instance: &str) -> bool {
            self.instances.contains(&instance)
        }
    }

    const BOOT: &str = "boot-1";
    const MIN: u64 = 60_000;

    fn me() -> Owner {
        Owner {
            pid: 100,
            start_time: Some(1000),
            instance: "me".into(),
        }
    }

    /// A running launch of host "h", boot [`BOOT`], owner pid 200 (started at 2000), launcher
    /// pid 300 (started at 3000), with an exit file.
    fn marker() -> Marker {
        Marker {
            host: "h".into(),
            boot_id: BOOT.into(),
            agent: Owner {
                pid: 200,
                start_time: Some(2000),
                instance: "gone".into(),
            },
            launch_id: "7-00".into(),
            state: MarkerState::Running,
            pid: Some(300),
            pgid: Some(300),
            start_time: Some(3000),
            started_at: 0,
            ended_at: None,
            outcome: None,
            timeout_s: Some(60),
            backstop_ms: Some(90_000),
            grace_ms: Some(30_000),
            exit_file: Some("/work/exit-7-00".into()),
        }
    }

    fn decide(marker: &Marker, processes: &Fake) -> Disposition {
        let me = me();
        let here = Here {
            host: "h",
            boot_id: BOOT,
            me: &me,
            processes,
        };
        disposition(marker, &here, &HashMap::new(), 0)
    }

    fn restart() -> Disposition {
        Disposition::End(RESTART_REASON.to_owned())
    }

    #[test]
    fn ended_markers_and_live_owners_are_left() {
        let mut ended = marker();
        ended.state = MarkerState::Ended;
        assert_eq!(decide(&ended, &Fake::default()), Disposition::Skip);

        let mut mine = marker();
        mine.agent = me();
        assert_eq!(decide(&mine, &Fake::default()), Disposition::Skip);

        let owner_runs = Fake {
            running: vec![(200, 2000)],
            ..Fake::default()
        };
        assert_eq!(decide(&marker(), &owner_runs), Disposition::Skip);
    }

    #[test]
    fn a_running_launcher_of_a_gone_owner_is_adopted() {
        let launcher_runs = Fake {
            running: vec![(300, 3000)],
            ..Fake::default()
        };
        assert_eq!(decide(&marker(), &launcher_runs), Disposition::Adopt);
        // Its pid now names another process: nothing to follow.
        let reused = Fake {
            running: vec![(300, 3999)],
            ..Fake::default()
        };
        assert_eq!(decide(&marker(), &reused), restart());
        assert_eq!(decide(&marker(), &Fake::default()), restart());
    }

    #[test]
    fn runs_that_cannot_be_followed_are_ended() {
        let launcher_runs = Fake {
            running: vec![(200, 2000), (300, 3000)],
            ..Fake::default()
        };
        // An older agent's: no exit status will be left.
        let mut no_exit_file = marker();
        no_exit_file.agent.pid = 201;
        no_exit_file.exit_file = None;
        assert_eq!(decide(&no_exit_file, &launcher_runs), restart());
        // No boot id recorded: its pids cannot be trusted.
        let mut no_boot = marker();
        no_boot.agent.pid = 201;
        no_boot.boot_id = String::new();
        assert_eq!(decide(&no_boot, &launcher_runs), restart());
        // An earlier boot: its owner is gone whatever runs under its pid now.
        let mut earlier_boot = marker();
        earlier_boot.boot_id = "boot-0".into();
        assert_eq!(decide(&earlier_boot, &launcher_runs), restart());
    }

    #[test]
    fn an_owner_in_this_process_lives_while_its_instance_does() {
        let mut sibling = marker();
        sibling.agent = Owner {
            instance: "sibling".into(),
            ..me()
        };
        sibling.exit_file = None;
        let listed = Fake {
            instances: vec!["sibling"],
            ..Fake::default()
        };
        assert_eq!(decide(&sibling, &listed), Disposition::Skip);
        assert_eq!(decide(&sibling, &Fake::default()), restart());
    }

    #[test]
    fn another_hosts_runs_are_ended_only_once_it_is_silent() {
        let me = me();
        let processes = Fake::default();
        let here = Here {
            host: "other",
            boot_id: BOOT,
            me: &me,
            processes: &processes,
        };
        let now = 100 * MIN;
        let beats = |at: u64| HashMap::from([("h".to_owned(), at)]);
        let gone_after = HOST_GONE_AFTER.as_millis() as u64;
        assert_eq!(
            disposition(&marker(), &here, &beats(now - gone_after - 1), now),
            Disposition::End(host_gone_reason("h"))
        );
        assert_eq!(
            disposition(&marker(), &here, &beats(now - gone_after), now),
            Disposition::Skip
        );
        // Never beat: an older agent's host.
        assert_eq!(
            disposition(&marker(), &here, &HashMap::new(), now),
            Disposition::Skip
        );
        assert!(host_gone_reason("h").contains("over 15 minutes"));
    }
}
