//! Recovery's I/O edge: tells the other hosts this one is alive, reads the markers that have
//! not ended, asks [`disposition`] what to do with each, then adopts the runs still going and
//! ends the rest (killing what is left of them, reporting each once). Runs at start-up and
//! every sweep.

use std::sync::Arc;

use tracing::{info, warn};

use super::kill::kill_orphan;
use super::markers::{Marker, Updated};
use super::recovery::{Disposition, Here, Processes, RESTART_REASON, disposition};
use super::{Inner, LIVE_INSTANCES, lock, sys};
use crate::executor::{BuildStatus, ExecError};

/// This host's processes as `/proc` shows them, and the executors alive in this agent process.
struct ThisHost;

impl Processes for ThisHost {
    fn running(&self, pid: u32, start_time: Option<u64>) -> bool {
        sys::identity_matches(pid, start_time)
    }

    fn live_instance(&self, instance: &str) -> bool {
        lock(&LIVE_INSTANCES).iter().any(|i| i == instance)
    }
}

impl Inner {
    /// Takes over the builds of executors on this host that are gone (adopting those still
    /// running, ending the rest) and ends those of hosts that are gone; returns how many. Also
    /// tells the other hosts that this one is alive.
    pub(super) async fn recover(self: &Arc<Self>) -> Result<usize, ExecError> {
        let now = self.markers.beat(&self.host).await?;
        let beats = self.markers.beats().await?;
        let ids = self.markers.active().await?;
        let here = Here {
            host: &self.host,
            boot_id: &self.boot_id,
            me: &self.me,
            processes: &ThisHost,
        };
        let mut taken = 0;
        let mut orphans = Vec::new();
        for id in ids {
            if self.runs.contains(id) {
                continue;
            }
            let Some(marker) = self.markers.get(id).await? else {
                continue;
            };
            let reason = match disposition(&marker, &here, &beats, now) {
                Disposition::Skip => continue,
                // A kept end means its owner saw the launcher end: nothing to follow.
                Disposition::Adopt if self.known_end(id).await?.is_none() => {
                    if self.adopt(id, marker).await? {
                        taken += 1;
                    }
                    continue;
                }
                Disposition::Adopt => RESTART_REASON.to_owned(),
                Disposition::End(reason) => reason,
            };
            orphans.push((id, marker, reason));
        }
        // Together: each may wait for its build's grace period before its SIGKILL.
        let ended =
            futures::future::join_all(orphans.into_iter().map(|(id, marker, reason)| async move {
                self.recover_one(id, marker, &reason).await
            }))
            .await;
        for result in ended {
            if result? {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Takes an orphaned marker over, kills what is left of the build (SIGKILL after the grace
    /// period its marker records) and reports it once; `false` when another executor took it
    /// first.
    async fn recover_one(&self, id: u64, marker: Marker, reason: &str) -> Result<bool, ExecError> {
        let Some((mut claimed, stop_requested)) = self.take_over(id, &marker).await? else {
            return Ok(false);
        };
        warn!(
            build_id = id,
            pid = marker.pid,
            host = %marker.host,
            "build left by an agent that is gone; ending it"
        );
        // Only this host's processes can be reached; nothing of an earlier boot runs any more,
        // and its pids mean other processes now.
        if marker.host == self.host && (marker.boot_id.is_empty() || marker.boot_id == self.boot_id)
        {
            kill_orphan(&marker).await;
        }
        // Its owner may have kept the end before dying between that and ending the marker.
        let status = match self.known_end(id).await? {
            Some(end) => end,
            None if stop_requested => BuildStatus::Stopped,
            None => self.result_of(id, &marker, reason).await,
        };
        self.finish(id, &mut claimed, status).await;
        Ok(true)
    }

    /// Makes a still-running orphan ours and follows it; `false` when another executor took it
    /// first.
    async fn adopt(self: &Arc<Self>, id: u64, marker: Marker) -> Result<bool, ExecError> {
        self.register(
            id,
            |cancel| async move {
                let Some((claimed, stop_requested)) = self.take_over(id, &marker).await? else {
                    return Ok(None);
                };
                info!(
                    build_id = id,
                    pid = marker.pid,
                    "adopted a build its agent left running; following it to its end"
                );
                if stop_requested {
                    cancel.cancel();
                }
                Ok(Some(claimed))
            },
            move |inner, claimed, cancel| inner.follow(id, claimed, cancel),
        )
        .await
    }

    /// Makes the marker of an executor that is gone ours, so a crash of ours now leaves it to
    /// the next executor: the marker as claimed and whether a stop was requested for the build,
    /// or `None` when another executor took it first.
    async fn take_over(
        &self,
        id: u64,
        marker: &Marker,
    ) -> Result<Option<(Marker, bool)>, ExecError> {
        let mut claimed = marker.clone();
        claimed.agent = self.me.clone();
        Ok(
            match self
                .markers
                .update(&marker.agent.instance, id, &claimed)
                .await?
            {
                Updated::Ours { stop_requested } => Some((claimed, stop_requested)),
                Updated::NotOurs => None,
            },
        )
    }

    /// How the build ended, if its end was kept in the outbox (pending or reported).
    async fn known_end(&self, id: u64) -> Result<Option<BuildStatus>, ExecError> {
        Ok(self.events.end_of(id).await?)
    }
}
