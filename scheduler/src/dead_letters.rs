//! The dead-letter office: what happens to a message delivered `queue.max_attempts` times
//! without an acknowledgement, and what an operator can do about it.
//!
//! A dead start is **held**, not failed: its row becomes `dead`, its message stays on its
//! cluster's dead set, and Screwdriver is told why in the build's `statusMessage` while the
//! build stays QUEUED there. That is what lets it run later: Screwdriver refuses any update of
//! a build it holds as finished, so a build reported FAILURE could run but never report. An
//! operator then **requeues** it (back on its cluster's queue, deliveries counted from 1) or
//! **fails** it; when `queue.dead_letter_hold` passes first, the sweep fails it. A dead stop
//! message is held the same time and can be requeued too; failing one drops it.
//!
//! Order of writes, as in intake: the row first (a compare-and-set from `dead`, so a requeue,
//! a fail and the sweep racing each other resolve to one), then the queue, then the report.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio_util::sync::CancellationToken;

use crate::builds::{BuildRow, BuildState, Builds};
use crate::db::{DbError, now_ms};
use crate::intake::{Intake, IntakeError};
use crate::queue::{QueueError, Queues};
use crate::reporter::{ReportTarget, Reporter};

/// Dead letters examined per cluster and per pass of the sweep.
const SWEEP_BATCH: usize = 100;

/// A build whose token expires sooner than this is not requeued: it could not report.
const TOKEN_LEFT_TO_RUN: Duration = Duration::from_secs(10 * 60);

/// A dead letter's queue id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetterId {
    /// A start: the build id.
    Build(u64),
    /// A stop for this build (`stop:<buildId>`).
    Stop(u64),
}

impl LetterId {
    /// Reads a queue id as the API and the queue spell it; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let number = |digits: &str| {
            (!digits.is_empty() && digits.len() <= 19 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse().ok())
                .flatten()
                .filter(|n| *n > 0)
        };
        match text.strip_prefix("stop:") {
            Some(rest) => number(rest).map(Self::Stop),
            None => number(text).map(Self::Build),
        }
    }

    fn queue_id(self) -> String {
        match self {
            Self::Build(id) => id.to_string(),
            Self::Stop(id) => format!("stop:{id}"),
        }
    }
}

/// What an operator asks for a dead letter (the last segment of its API path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Requeue,
    Fail,
}

impl Verb {
    /// The API path's last segment.
    pub fn segment(self) -> &'static str {
        match self {
            Self::Requeue => "requeue",
            Self::Fail => "fail",
        }
    }

    /// "requeued", "failed": for logs and messages.
    pub fn past(self) -> &'static str {
        match self {
            Self::Requeue => "requeued",
            Self::Fail => "failed",
        }
    }
}

/// What an operator's call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// Back on its cluster's queue.
    Requeued,
    /// Failed and reported FAILURE to Screwdriver.
    Failed,
    /// A stop message, dropped.
    Dropped,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("{id} is not a dead letter of cluster {cluster}")]
    NotFound { cluster: String, id: String },
    #[error(
        "build {0} is no longer held: it was failed and reported FAILURE to Screwdriver, which refuses any update of a finished build; restart it in Screwdriver"
    )]
    NotHeld(u64),
    #[error(
        "build {build_id}'s Screwdriver token expires in {left}: requeued, it could not report its result; fail it, then restart it in Screwdriver"
    )]
    TokenExpiring { build_id: u64, left: String },
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Holds, requeues and fails dead letters (see the module's documentation).
pub struct DeadLetterOffice {
    intake: Arc<Intake>,
    queues: Queues,
    builds: Builds,
    reporter: Reporter,
    /// `queue.dead_letter_hold`.
    hold: Duration,
    /// `queue.max_attempts`, for the messages.
    max_attempts: u32,
}

impl DeadLetterOffice {
    pub fn new(
        intake: Arc<Intake>,
        queues: Queues,
        reporter: Reporter,
        hold: Duration,
        max_attempts: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            builds: intake.builds().clone(),
            intake,
            queues,
            reporter,
            hold,
            max_attempts,
        })
    }

    /// How long a dead letter is held.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// A message the fetch just dead-lettered on `cluster` (`raw` is its queue message): held,
    /// or failed at once when the hold is zero.
    pub async fn take(&self, cluster: &str, id: &str, raw: &str) -> Result<(), DeadLetterError> {
        tracing::error!(id = %id, cluster, hold = ?self.hold, "dead-lettered");
        metrics::counter!("sd_scheduler_dead_letters_total", "cluster" => cluster.to_owned())
            .increment(1);
        let Some(letter) = LetterId::parse(id) else {
            return Ok(());
        };
        let LetterId::Build(build_id) = letter else {
            if self.hold.is_zero() {
                self.queues.forget_dead(cluster, id).await?;
            }
            return Ok(());
        };
        let target = ReportTarget::from_message(raw);
        if self.hold.is_zero() {
            let reason = format!(
                "build was delivered {} times to cluster {cluster} without being acknowledged; giving up",
                self.max_attempts
            );
            for from in [BuildState::Queued, BuildState::Dispatched] {
                if self
                    .fail_from(build_id, from, cluster, &reason, target.clone())
                    .await?
                {
                    break;
                }
            }
            return Ok(());
        }
        let until = crate::status::timestamp(now_ms().saturating_add(millis(self.hold)));
        let reason = format!(
            "delivered {} times to cluster {cluster} without being acknowledged; held for an operator to requeue or fail until {until}, then failed",
            self.max_attempts
        );
        for from in [BuildState::Queued, BuildState::Dispatched] {
            if self
                .builds
                .transition_keep_cluster(build_id, from, BuildState::Dead, &reason)
                .await?
            {
                if let Some(target) = target {
                    let note = format!(
                        "Delivered {} times to build cluster {cluster} without starting. Held until {until} for an operator to requeue; failed then.",
                        self.max_attempts
                    );
                    self.reporter.note(target, note).await;
                }
                return Ok(());
            }
        }
        // Already ended another way (stopped meanwhile): nothing to hold.
        if let Some(row) = self.builds.get(build_id).await?
            && !matches!(row.state, BuildState::Queued | BuildState::Dispatched)
        {
            self.queues.forget_dead(cluster, id).await?;
        }
        Ok(())
    }

    /// An operator's requeue or fail.
    pub async fn resolve(
        &self,
        cluster: &str,
        id: LetterId,
        verb: Verb,
    ) -> Result<Resolution, DeadLetterError> {
        match verb {
            Verb::Requeue => self.requeue(cluster, id).await,
            Verb::Fail => self.fail(cluster, id).await,
        }
    }

    /// An operator's requeue: the letter goes back on its cluster's queue.
    pub async fn requeue(
        &self,
        cluster: &str,
        id: LetterId,
    ) -> Result<Resolution, DeadLetterError> {
        let build_id = match id {
            LetterId::Stop(build_id) => {
                let (_, message) = self
                    .queues
                    .dead_letter(cluster, &id.queue_id())
                    .await?
                    .ok_or_else(|| not_found(cluster, id))?;
                let message = message.ok_or_else(|| not_found(cluster, id))?;
                let message = serde_json::from_str(&message).map_err(QueueError::from)?;
                self.queues
                    .enqueue_stop(cluster, build_id, &message)
                    .await?;
                resolved("requeued");
                tracing::info!(build_id, cluster, "dead stop requeued by an operator");
                return Ok(Resolution::Requeued);
            }
            LetterId::Build(build_id) => build_id,
        };
        let row = self.held(cluster, build_id).await?;
        // A token the scheduler mints is minted afresh; Screwdriver's own cannot be.
        if let Some(exp) = row.body_token.as_deref().and_then(token_expiry) {
            let left = exp.saturating_sub(now_ms() / 1000);
            if left < i64::try_from(TOKEN_LEFT_TO_RUN.as_secs()).unwrap_or(i64::MAX) {
                return Err(DeadLetterError::TokenExpiring {
                    build_id,
                    left: humantime::format_duration(Duration::from_secs(
                        u64::try_from(left).unwrap_or(0),
                    ))
                    .to_string(),
                });
            }
        }
        let requeued = self
            .builds
            .transition_keep_cluster(
                build_id,
                BuildState::Dead,
                BuildState::Queued,
                "requeued by an operator after it was dead-lettered",
            )
            .await?;
        if !requeued {
            return Err(DeadLetterError::NotHeld(build_id));
        }
        // The row says queued from here: were Redis to fail now, the reconciler queues it.
        self.intake.requeue(&row, false).await?;
        resolved("requeued");
        tracing::info!(build_id, cluster, "dead letter requeued by an operator");
        let msg = self.intake.launch_message(&row)?;
        if let Some(target) = ReportTarget::from_start(&msg) {
            self.reporter
                .note(
                    target,
                    format!("Requeued by an operator; waiting for build cluster {cluster}."),
                )
                .await;
        }
        Ok(Resolution::Requeued)
    }

    /// An operator's fail: a held build is failed and reported FAILURE; a stop is dropped.
    pub async fn fail(&self, cluster: &str, id: LetterId) -> Result<Resolution, DeadLetterError> {
        let build_id = match id {
            LetterId::Stop(_) => {
                if !self.queues.forget_dead(cluster, &id.queue_id()).await? {
                    return Err(not_found(cluster, id));
                }
                resolved("dropped");
                return Ok(Resolution::Dropped);
            }
            LetterId::Build(build_id) => build_id,
        };
        self.held(cluster, build_id).await?;
        let reason = format!(
            "failed by an operator after {} deliveries to cluster {cluster} without an acknowledgement",
            self.max_attempts
        );
        if !self
            .fail_from(build_id, BuildState::Dead, cluster, &reason, None)
            .await?
        {
            return Err(DeadLetterError::NotHeld(build_id));
        }
        resolved("failed");
        Ok(Resolution::Failed)
    }

    /// Fails what was held longer than the hold, and drops what is left of dead letters whose
    /// build ended another way; returns how many it resolved.
    pub async fn sweep(&self) -> Result<usize, DeadLetterError> {
        let mut done = 0;
        let before = now_ms().saturating_sub(millis(self.hold));
        for row in self
            .builds
            .stale(BuildState::Dead, before, SWEEP_BATCH as i64)
            .await?
        {
            let Some(cluster) = row.cluster.as_deref() else {
                continue;
            };
            let reason = format!(
                "delivered {} times to cluster {cluster} without being acknowledged, and not requeued within queue.dead_letter_hold ({})",
                self.max_attempts,
                humantime::format_duration(self.hold)
            );
            if self
                .fail_from(row.build_id, BuildState::Dead, cluster, &reason, None)
                .await?
            {
                resolved("expired");
                done += 1;
            }
        }
        // Letters the rows above do not cover: stops, and any whose row moved on.
        let clusters = self.queues.depths_all().await?;
        for (cluster, [.., dead]) in clusters {
            if dead == 0 {
                continue;
            }
            let expired = self
                .queues
                .dead_before(&cluster, self.hold + Duration::from_secs(60), SWEEP_BATCH)
                .await?;
            for id in expired {
                if self.leftover(&id).await? && self.queues.forget_dead(&cluster, &id).await? {
                    resolved("expired");
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Runs the sweep every tenth of the hold (between 1 s and 30 s) until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.hold / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(resolved = n, "dead letters past their hold resolved"),
                Err(e) => tracing::warn!(error = %e, "dead-letter sweep failed; will retry"),
            }
        }
    }

    /// Whether a dead letter past its hold is only a leftover: a stop, or a build whose row is
    /// neither held (the row-driven pass fails those) nor waiting (the reconciler queues those
    /// again, which takes them off the dead set).
    async fn leftover(&self, id: &str) -> Result<bool, DeadLetterError> {
        Ok(match LetterId::parse(id) {
            Some(LetterId::Build(build_id)) => match self.builds.get(build_id).await? {
                Some(row) => !matches!(
                    row.state,
                    BuildState::Dead | BuildState::Queued | BuildState::Dispatched
                ),
                None => true,
            },
            _ => true,
        })
    }

    /// The row of a build held on `cluster`.
    async fn held(&self, cluster: &str, build_id: u64) -> Result<BuildRow, DeadLetterError> {
        let row = self
            .builds
            .get(build_id)
            .await?
            .filter(|row| row.cluster.as_deref() == Some(cluster))
            .ok_or_else(|| not_found(cluster, LetterId::Build(build_id)))?;
        match row.state {
            BuildState::Dead => Ok(row),
            BuildState::Failed => Err(DeadLetterError::NotHeld(build_id)),
            _ => Err(not_found(cluster, LetterId::Build(build_id))),
        }
    }

    /// Moves the row from `from` to failed and, when that won, reports FAILURE and drops the
    /// letter. Whom to report as is found first (so an outage changes nothing): `target`, else
    /// the message the queue holds, else the build's own token (or a new launcher token).
    async fn fail_from(
        &self,
        build_id: u64,
        from: BuildState,
        cluster: &str,
        reason: &str,
        target: Option<ReportTarget>,
    ) -> Result<bool, DeadLetterError> {
        let id = build_id.to_string();
        let target = match target {
            Some(target) => Some(target),
            None => self.report_target(cluster, build_id).await?,
        };
        if !self
            .builds
            .transition_keep_cluster(build_id, from, BuildState::Failed, reason)
            .await?
        {
            return Ok(false);
        }
        match target {
            Some(target) => {
                self.reporter
                    .report(target, "FAILURE", capitalized(reason))
                    .await;
            }
            None => tracing::error!(
                build_id,
                "cannot tell Screwdriver the build failed: no apiUri or token"
            ),
        }
        // Were this to fail, the sweep drops the leftover later.
        self.queues.forget_dead(cluster, &id).await?;
        Ok(true)
    }

    /// Whom to report a build's end as: the token of the message its dead letter holds, else
    /// the build's own (or a new launcher token) from its row.
    async fn report_target(
        &self,
        cluster: &str,
        build_id: u64,
    ) -> Result<Option<ReportTarget>, DeadLetterError> {
        if let Some((_, Some(raw))) = self
            .queues
            .dead_letter(cluster, &build_id.to_string())
            .await?
        {
            return Ok(ReportTarget::from_message(&raw));
        }
        Ok(match self.builds.get(build_id).await? {
            Some(row) => ReportTarget::from_start(&self.intake.launch_message(&row)?),
            None => None,
        })
    }
}

fn not_found(cluster: &str, id: LetterId) -> DeadLetterError {
    DeadLetterError::NotFound {
        cluster: cluster.to_owned(),
        id: id.queue_id(),
    }
}

fn resolved(how: &'static str) {
    metrics::counter!("sd_scheduler_dead_letters_resolved_total", "how" => how).increment(1);
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A JWT's `exp` (seconds since the epoch), read without checking the signature: it only
/// decides whether a requeued build's token could still report. `None` when unreadable.
fn token_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_ids_are_build_ids_or_stops() {
        assert_eq!(LetterId::parse("9"), Some(LetterId::Build(9)));
        assert_eq!(LetterId::parse("stop:12"), Some(LetterId::Stop(12)));
        for bad in [
            "",
            "0",
            "stop:",
            "stop:0",
            "-1",
            "1.5",
            "12a",
            "stop:x",
            "STOP:1",
            " 1",
            "+1",
            "99999999999999999999",
            "stop:stop:1",
        ] {
            assert_eq!(LetterId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(LetterId::Stop(12).queue_id(), "stop:12");
    }

    #[test]
    fn token_expiry_reads_exp_and_nothing_else() {
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let token = format!("{}.{}.sig", encode("{}"), encode(r#"{"exp":1700000000}"#));
        assert_eq!(token_expiry(&token), Some(1_700_000_000));
        let none = format!("{}.{}.sig", encode("{}"), encode(r#"{"iat":1}"#));
        assert_eq!(token_expiry(&none), None);
        assert_eq!(token_expiry("not a token"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
    }

    #[test]
    fn reasons_become_sentences() {
        assert_eq!(capitalized("failed by x"), "Failed by x");
        assert_eq!(capitalized(""), "");
    }
}
