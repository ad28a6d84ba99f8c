//! Launching a build: its marker is created (the one step that decides who runs it) and
//! confirmed on disk *before* anything is spawned, then the launcher is started and its pid
//! recorded. A build whose marker exists anywhere on this local Redis is never started again.

use std::sync::Arc;

use sd_protocol::StartMessage;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Inner;
use super::markers::{Created, Marker, MarkerState, Updated, millis, unix_ms};
use super::outcome::whole_seconds;
use super::sys;
use crate::executor::{BuildStatus, ExecError, Launched, Timing};

impl Inner {
    pub(super) async fn launch(
        self: &Arc<Self>,
        build: &StartMessage,
    ) -> Result<Launched, ExecError> {
        let id = build.build_id;
        let started = self
            .register(
                id,
                |cancel| async move { self.start(build, &cancel).await },
                move |inner, (child, marker, timing), cancel| {
                    inner.watch(id, child, marker, timing, cancel)
                },
            )
            .await?;
        Ok(if started {
            Launched::Created
        } else {
            Launched::AlreadyRunning
        })
    }

    /// Writes the marker and spawns; `None` when the build was launched before.
    async fn start(
        &self,
        build: &StartMessage,
        cancel: &CancellationToken,
    ) -> Result<Option<(Child, Marker, Timing)>, ExecError> {
        let id = build.build_id;
        let timing = Timing::of(build, &self.limits);
        let Some(mut marker) = self.create_marker(id, &timing).await? else {
            return Ok(None);
        };
        // Not on disk: start nothing. The marker stays ours and `Starting`, so the retry of this
        // launch resumes it.
        self.markers
            .confirm()
            .await
            .map_err(|source| ExecError::MarkerNotDurable {
                build_id: id,
                source,
            })?;
        let child = match self.spawner.spawn(build, &timing, &marker.launch_id) {
            Ok(child) => child,
            Err(e) => {
                self.spawner.clean_up(&marker.launch_id).await;
                if let Err(re) = self.markers.abandon(id, &self.me.instance).await {
                    warn!(build_id = id, error = %re, "cannot remove the marker of a launch that did not start");
                }
                return Err(e);
            }
        };
        let pid = child.id();
        marker.pid = pid;
        marker.pgid = pid;
        marker.start_time = pid.and_then(sys::start_time);
        marker.state = MarkerState::Running;
        info!(
            build_id = id,
            pid,
            log = %self.spawner.log_path(id).display(),
            timeout_min = timing.minutes,
            backstop_s = timing.backstop.as_secs(),
            grace_s = whole_seconds(timing.grace),
            "launcher started"
        );
        match self.markers.update(&self.me.instance, id, &marker).await {
            Ok(Updated::Ours {
                stop_requested: true,
            }) => {
                info!(build_id = id, "a stop was requested while it started");
                cancel.cancel();
            }
            Ok(Updated::Ours {
                stop_requested: false,
            }) => {}
            Ok(Updated::NotOurs) => warn!(build_id = id, "launch marker is no longer ours"),
            // The run goes on; a restarted agent finds it through its launch id.
            Err(e) => warn!(build_id = id, error = %e, "cannot record the launcher's pid"),
        }
        self.send(id, BuildStatus::Running);
        Ok(Some((child, marker, timing)))
    }

    /// Creates the build's marker (ours, `Starting`, carrying the backstop and grace period so
    /// an executor adopting the run keeps them); `None` when the build has one already.
    async fn create_marker(&self, id: u64, timing: &Timing) -> Result<Option<Marker>, ExecError> {
        let launch_id = format!("{id}-{:016x}", rand::random::<u64>());
        let marker = Marker {
            host: self.host.clone(),
            boot_id: self.boot_id.clone(),
            agent: self.me.clone(),
            exit_file: Some(self.spawner.exit_path(&launch_id)),
            launch_id,
            state: MarkerState::Starting,
            pid: None,
            pgid: None,
            start_time: None,
            started_at: unix_ms(),
            ended_at: None,
            outcome: None,
            timeout_s: Some(timing.timeout.as_secs()),
            backstop_ms: Some(millis(timing.backstop)),
            grace_ms: Some(millis(timing.grace)),
        };
        match self.markers.create(id, &marker).await? {
            Created::New => Ok(Some(marker)),
            // Ours, still starting, and no launch of it in progress here: an earlier attempt
            // wrote it but its reply was lost, or it could not be removed after a failed spawn.
            // Nothing was started for it: carry on with it.
            Created::Exists(Some(m))
                if m.agent.instance == self.me.instance && m.state == MarkerState::Starting =>
            {
                info!(
                    build_id = id,
                    "resuming a launch whose marker an earlier attempt wrote"
                );
                Ok(Some(*m))
            }
            Created::Exists(_) => {
                info!(
                    build_id = id,
                    "build was launched before; not starting it again"
                );
                Ok(None)
            }
        }
    }
}
