//! What happened to a build, as the agent saw it: the one event type every part of the agent
//! sends (the executors, the launcher) and the reporter drains. A leaf: it depends on nothing
//! of the agent's, so the executors, the outbox and the reporter all depend on it, not on each
//! other.

use sd_protocol::Event;
use tokio::sync::mpsc;

/// What happened to a build, as an executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildEvent {
    pub build_id: u64,
    pub status: BuildStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildStatus {
    /// The build's container/process started.
    Running,
    /// It ended successfully (the launcher reported its own result to Screwdriver).
    Finished,
    /// It ended unsuccessfully. With `report`, the agent must tell the Screwdriver API itself
    /// (`PUT /v4/builds/{id}` FAILURE with `reason`): the launcher never ran or could not report
    /// (bad image, pending too long, a run the agent cannot account for).
    Failed { reason: String, report: bool },
    /// It was stopped on request (Screwdriver asked for it, so only the scheduler is told).
    Stopped,
    /// Its pod was placed on `node` (at `at`, RFC 3339), so its image is being pulled.
    /// Informational: sent to Screwdriver as the build's `stats` (`hostname`,
    /// `imagePullStartTime`), as executor-k8s does, best effort and never through the outbox.
    Scheduled { node: String, at: String },
}

impl BuildStatus {
    /// The event the scheduler hears for it; `None` for what only Screwdriver hears (stats).
    pub fn event(&self) -> Option<Event> {
        match self {
            BuildStatus::Running => Some(Event::Running),
            BuildStatus::Finished => Some(Event::Finished),
            BuildStatus::Failed { .. } => Some(Event::Failed),
            BuildStatus::Stopped => Some(Event::Stopped),
            BuildStatus::Scheduled { .. } => None,
        }
    }
}

/// Sender for build events: the executors and the launcher send, the reporter drains (and
/// keeps each in the outbox before reporting it).
pub type Events = mpsc::UnboundedSender<BuildEvent>;
