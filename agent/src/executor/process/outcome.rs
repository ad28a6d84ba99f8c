//! How the end of a run is put into words (pure): the launcher's exit status, the agent's
//! backstop, a stop; and the minutes and seconds those words and the launcher's environment use.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::executor::BuildStatus;

/// Reported (without telling Screwdriver, which asked for it) for a stopped build.
pub const STOP_REASON: &str = "stopped on request";

/// Reported when the agent's backstop ended a build: the launcher should have ended it (and
/// reported the timeout itself) at its `timeout_min`-minute timeout; `after` is the backstop.
pub fn backstop_reason(timeout_min: u64, after: Duration) -> String {
    format!(
        "build timed out: the launcher did not end it at its {timeout_min}-minute timeout, so the agent ended it after {} minutes",
        minutes(after)
    )
}

/// The marker's `outcome` for a run that ended with `status`.
pub(super) fn outcome(status: &BuildStatus) -> String {
    match status {
        BuildStatus::Failed { reason, .. } => reason.clone(),
        BuildStatus::Stopped => STOP_REASON.to_owned(),
        _ => "finished".to_owned(),
    }
}

/// The exit status of the launcher's parent shell (our child), as a failure reason.
pub(super) fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return describe_code(code);
    }
    match status.signal() {
        Some(signal) => killed_by(signal),
        None => format!("launcher ended: {status}"),
    }
}

/// The launcher's exit status as its parent shell reports it: 128 + N for a signal N.
pub(super) fn describe_code(code: i32) -> String {
    match code {
        129..=192 => killed_by(code - 128),
        _ => format!("launcher exited with status {code}"),
    }
}

fn killed_by(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGQUIT => " (SIGQUIT)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    };
    format!("launcher was killed by signal {signal}{name}")
}

/// Minutes for messages: "90", or "0.5" for short test timeouts.
pub(super) fn minutes(d: Duration) -> f64 {
    (d.as_secs_f64() / 60.0 * 100.0).round() / 100.0
}

/// `d` in whole seconds, rounded up (the launcher's trap sleeps one second less).
pub(super) fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_signals_are_named() {
        assert_eq!(describe_code(1), "launcher exited with status 1");
        assert_eq!(
            describe_code(128 + libc::SIGTERM),
            format!("launcher was killed by signal {} (SIGTERM)", libc::SIGTERM)
        );
        assert_eq!(describe_code(193), "launcher exited with status 193");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            format!("launcher was killed by signal {} (SIGKILL)", libc::SIGKILL)
        );
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "launcher exited with status 3"
        );
    }

    #[test]
    fn minutes_and_seconds() {
        assert_eq!(minutes(Duration::from_secs(90 * 60)), 90.0);
        assert_eq!(minutes(Duration::from_millis(1600)), 0.03);
        assert_eq!(whole_seconds(Duration::from_millis(30_000)), 30);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(
            backstop_reason(1, Duration::from_secs(90)),
            "build timed out: the launcher did not end it at its 1-minute timeout, so the agent ended it after 1.5 minutes"
        );
    }

    #[test]
    fn the_outcome_is_the_reason_or_a_word() {
        let failed = BuildStatus::Failed {
            reason: "launcher exited with status 2".into(),
            report: true,
        };
        assert_eq!(outcome(&failed), "launcher exited with status 2");
        assert_eq!(outcome(&BuildStatus::Stopped), STOP_REASON);
        assert_eq!(outcome(&BuildStatus::Finished), "finished");
    }
}
