//! How a run ends. A build launched here is awaited as our child ([`Inner::watch`]); one
//! adopted from an agent that is gone is looked at until its launcher is gone
//! ([`Inner::follow`]). Either way one function handles the end ([`Inner::end`]): what the
//! launcher left in its group is killed, a build still there at its backstop or stopped is
//! killed, and the result is kept in the outbox before the marker ends, then sent
//! ([`Inner::finish`]). A stop also reaches runs another executor on this host follows, through
//! their marker ([`Inner::stop`]).

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Inner;
use super::kill::{leftovers, terminate};
use super::markers::{Marker, MarkerState, Updated, millis, unix_ms};
use super::outcome::{backstop_reason, describe, describe_code, minutes, outcome};
use super::recovery::RESTART_REASON;
use super::spawn::read_exit_status;
use super::sys;
use crate::executor::{BuildEvent, BuildStatus, ExecError, TimeLimits, Timing};

/// How often an adopted run (not a child of ours, so not awaitable) is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// How long ending a marker is retried while the local Redis is unreachable.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(600);

/// How a run came to an end.
enum End {
    /// Our child (the launcher's parent shell) exited, or could not be waited for.
    Exited(std::io::Result<ExitStatus>),
    /// An adopted run's launcher is gone; its parent shell may have left its exit status.
    Gone,
    /// The backstop passed with the launcher still there.
    TimedOut,
    /// A stop was asked for.
    Stopped,
}

/// What ending one run needs besides how it ended.
struct Ending<'a> {
    /// SIGTERM to SIGKILL for a stop or the backstop.
    grace: Duration,
    /// Reported when the backstop ended the run.
    timed_out: String,
    /// The launcher's parent shell when it is our child (reaped once killed); `None` for an
    /// adopted run.
    child: Option<&'a mut Child>,
}

impl Inner {
    /// Follows a run launched here to its end, kills what is left of its group, records and
    /// reports it. The launcher ends the build at its timeout; only a launcher still there at
    /// the backstop is killed, and reported timed out by the agent.
    pub(super) async fn watch(
        self: Arc<Self>,
        id: u64,
        mut child: Child,
        marker: Marker,
        timing: Timing,
        cancel: CancellationToken,
    ) {
        let end = tokio::select! {
            status = child.wait() => End::Exited(status),
            () = tokio::time::sleep(timing.backstop) => End::TimedOut,
            () = cancel.cancelled() => End::Stopped,
        };
        let ending = Ending {
            grace: timing.grace,
            timed_out: backstop_reason(timing.minutes, timing.backstop),
            child: Some(&mut child),
        };
        self.end(id, marker, end, ending).await;
    }

    /// Follows a run adopted from an agent that is gone: not our child, so it is looked at
    /// every [`FOLLOW_EVERY`] until its launcher is gone, the backstop its marker records passes
    /// or a stop comes; its result is the exit status its parent shell left.
    pub(super) async fn follow(
        self: Arc<Self>,
        id: u64,
        marker: Marker,
        cancel: CancellationToken,
    ) {
        let (end_after, timed_out) = adopted_backstop(&marker, &self.limits);
        let ends_at = marker.started_at.saturating_add(millis(end_after));
        let deadline = Instant::now() + Duration::from_millis(ends_at.saturating_sub(unix_ms()));
        let end = loop {
            if !marker
                .pid
                .is_some_and(|pid| sys::identity_matches(pid, marker.start_time))
            {
                break End::Gone;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
                () = tokio::time::sleep_until(deadline) => break End::TimedOut,
                () = cancel.cancelled() => break End::Stopped,
            }
        };
        let ending = Ending {
            grace: marker.grace(),
            timed_out,
            child: None,
        };
        self.end(id, marker, end, ending).await;
    }

    /// The end of a run, launched here or adopted alike: kills what is left of it, works out
    /// its result, forgets the run and [`finish`](Inner::finish)es it.
    async fn end(&self, id: u64, mut marker: Marker, end: End, ending: Ending<'_>) {
        let pgid = marker.pgid;
        let adopted = ending.child.is_none();
        let status = match end {
            End::Exited(result) => {
                leftovers(pgid, ending.grace).await;
                self.exit_status(id, result).await
            }
            End::Gone => {
                leftovers(pgid, ending.grace).await;
                self.result_of(id, &marker, RESTART_REASON).await
            }
            End::TimedOut => {
                warn!(
                    build_id = id,
                    adopted,
                    "the launcher did not end the build at its timeout; killing its process group"
                );
                terminate(pgid.as_slice(), &[], ending.child, ending.grace).await;
                BuildStatus::Failed {
                    reason: ending.timed_out,
                    report: true,
                }
            }
            End::Stopped => {
                info!(
                    build_id = id,
                    adopted, "stopping build; killing its process group"
                );
                terminate(pgid.as_slice(), &[], ending.child, ending.grace).await;
                BuildStatus::Stopped
            }
        };
        self.runs.forget(id);
        self.finish(id, &mut marker, status).await;
    }

    /// The result of a run launched here from its parent shell's exit status: a failure after
    /// a stop request is the stop.
    async fn exit_status(&self, id: u64, result: std::io::Result<ExitStatus>) -> BuildStatus {
        match result {
            Ok(status) if status.success() => BuildStatus::Finished,
            Ok(status) if self.stop_requested(id).await => {
                debug!(build_id = id, %status, "launcher ended after a stop request");
                BuildStatus::Stopped
            }
            Ok(status) => BuildStatus::Failed {
                reason: describe(status),
                report: true,
            },
            Err(e) => BuildStatus::Failed {
                reason: format!("lost track of the launcher: {e}"),
                report: true,
            },
        }
    }

    /// How a run that ended unwatched went: the exit status its parent shell left (on this
    /// host), a stop asked for it, else `fallback` as a failure.
    pub(super) async fn result_of(&self, id: u64, marker: &Marker, fallback: &str) -> BuildStatus {
        let code = marker
            .exit_file
            .as_deref()
            .filter(|_| marker.host == self.host)
            .and_then(read_exit_status);
        match code {
            Some(0) => BuildStatus::Finished,
            _ if self.stop_requested(id).await => BuildStatus::Stopped,
            Some(code) => BuildStatus::Failed {
                reason: describe_code(code),
                report: true,
            },
            None => BuildStatus::Failed {
                reason: fallback.to_owned(),
                report: true,
            },
        }
    }

    /// Ends the marker (retrying while Redis is unreachable) and sends the final event; the
    /// event does not wait for a long Redis outage. Once the marker is ended, the build's
    /// directory (its exit status) is removed (never before: an agent dying in between leaves it
    /// to the next one).
    pub(super) async fn finish(&self, id: u64, marker: &mut Marker, status: BuildStatus) {
        let now = unix_ms();
        marker.state = MarkerState::Ended;
        marker.ended_at = Some(now);
        marker.outcome = Some(outcome(&status));
        info!(
            build_id = id,
            outcome = marker.outcome.as_deref().unwrap_or_default(),
            "build ended"
        );
        let give_up = Instant::now() + FINISH_RETRY_FOR;
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0;
        let mut kept = false;
        let end = BuildEvent {
            build_id: id,
            status: status.clone(),
        };
        let mut pending = Some(status);
        let ended = loop {
            let Err((what, error)) = self.record_end(&end, marker, now, &mut kept).await else {
                break true;
            };
            attempts += 1;
            warn!(build_id = id, error = %error, attempts, "{what}");
            if attempts >= 3
                && let Some(status) = pending.take()
            {
                self.send(id, status);
            }
            if Instant::now() >= give_up {
                error!(
                    build_id = id,
                    "giving up recording the build's end; its marker stays running"
                );
                break false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        };
        if ended && marker.host == self.host {
            // Runs launched before build directories left their exit status beside the logs.
            if let Some(path) = &marker.exit_file {
                let _ = std::fs::remove_file(path);
            }
            self.spawner.clean_up(&marker.launch_id).await;
        }
        if let Some(status) = pending {
            self.send(id, status);
        }
    }

    /// One attempt at recording a run's end: kept in the outbox (once: `kept`), then the marker
    /// ended at `ended_at`. On failure, what failed and why.
    async fn record_end(
        &self,
        end: &BuildEvent,
        marker: &Marker,
        ended_at: u64,
        kept: &mut bool,
    ) -> Result<(), (&'static str, String)> {
        // The end goes to the outbox before the marker ends: once the marker says ended,
        // nobody else will report this build, so its report must already be durable. Sent
        // directly meanwhile (Redis down), it is still kept once Redis is back: the direct
        // report may not outlive this agent.
        if !*kept {
            self.events
                .keep(end)
                .await
                .map_err(|e| ("cannot keep the build's end", e.to_string()))?;
            *kept = true;
        }
        let id = end.build_id;
        match self
            .markers
            .end(&marker.agent.instance, id, marker, ended_at)
            .await
        {
            Ok(Updated::Ours { .. }) => Ok(()),
            Ok(Updated::NotOurs) => {
                debug!(build_id = id, "marker was already ended");
                Ok(())
            }
            Err(e) => Err(("cannot record the build's end", e.to_string())),
        }
    }

    pub(super) fn send(&self, build_id: u64, status: BuildStatus) {
        self.events.notify(BuildEvent { build_id, status });
    }

    /// Whether a stop was requested for the build by an executor that does not own it (`false`
    /// when Redis cannot say).
    async fn stop_requested(&self, id: u64) -> bool {
        self.markers.stop_requested(id).await.unwrap_or(false)
    }

    /// Stops a run of ours through its token; else records the stop in the marker of a run
    /// another executor on this host follows, and kills its group. `false` when there is no
    /// such run.
    pub(super) async fn stop(&self, id: u64) -> Result<bool, ExecError> {
        if self.runs.cancel(id) {
            return Ok(true);
        }
        // Another executor on this host (sharing the local Redis) may run it.
        let Some(marker) = self.markers.stop(id, &self.host).await? else {
            return Ok(false);
        };
        info!(build_id = id, owner = %marker.agent.instance, "stopping a build another executor runs");
        // Its owner reports it (stopped) when its launcher dies; a starting one stops once its
        // pid is recorded; an orphan's is reported by the clean-up.
        if let (Some(pid), Some(pgid)) = (marker.pid, marker.pgid)
            && sys::identity_matches(pid, marker.start_time)
        {
            let start_time = marker.start_time;
            let grace = marker.grace();
            tokio::spawn(async move {
                if sys::identity_matches(pid, start_time) {
                    terminate(&[pgid], &[], None, grace).await;
                }
            });
        }
        Ok(true)
    }
}

/// When the agent ends an adopted run (after its `started_at`) and what it reports then: the
/// backstop its marker records; a marker without one was written by an agent that ended runs at
/// the timeout itself, and still ends there.
fn adopted_backstop(marker: &Marker, limits: &TimeLimits) -> (Duration, String) {
    match marker.backstop_ms {
        Some(backstop_ms) => {
            let backstop = Duration::from_millis(backstop_ms);
            let timeout_min = marker
                .timeout_s
                .unwrap_or(limits.default_timeout.as_secs())
                .div_ceil(60)
                .max(1);
            (backstop, backstop_reason(timeout_min, backstop))
        }
        None => {
            let timeout = marker
                .timeout_s
                .map_or(limits.default_timeout, Duration::from_secs);
            (
                timeout,
                format!("build timed out after {} minutes", minutes(timeout)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::process::markers::Owner;

    fn marker(timeout_s: Option<u64>, backstop_ms: Option<u64>) -> Marker {
        Marker {
            host: "h".into(),
            boot_id: "b".into(),
            agent: Owner {
                pid: 1,
                start_time: None,
                instance: "i".into(),
            },
            launch_id: "7-00".into(),
            state: MarkerState::Running,
            pid: None,
            pgid: None,
            start_time: None,
            started_at: 0,
            ended_at: None,
            outcome: None,
            timeout_s,
            backstop_ms,
            grace_ms: None,
            exit_file: None,
        }
    }

    const LIMITS: TimeLimits = TimeLimits::DEFAULT;

    #[test]
    fn an_adopted_run_keeps_the_backstop_its_marker_records() {
        let (after, reason) = adopted_backstop(&marker(Some(61), Some(1600)), &LIMITS);
        assert_eq!(after, Duration::from_millis(1600));
        assert_eq!(reason, backstop_reason(2, Duration::from_millis(1600)));
        let (_, default) = adopted_backstop(&marker(None, Some(1600)), &LIMITS);
        assert_eq!(default, backstop_reason(90, Duration::from_millis(1600)));
    }

    #[test]
    fn an_older_agents_run_ends_at_its_timeout() {
        let (after, reason) = adopted_backstop(&marker(Some(30), None), &LIMITS);
        assert_eq!(after, Duration::from_secs(30));
        assert_eq!(reason, "build timed out after 0.5 minutes");
        let (after, _) = adopted_backstop(&marker(None, None), &LIMITS);
        assert_eq!(after, LIMITS.default_timeout);
    }
}
