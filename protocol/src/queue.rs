//! What travels from a master queue to a cluster's agent.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Whether a queued message starts or stops a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Start,
    Stop,
}

/// A message on a cluster's queue: `{"job":"start"|"stop","buildConfig":{…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueMessage {
    pub job: JobKind,
    /// The start payload (with the launcher's token), or `{buildId, jobId}` for a stop.
    #[schema(value_type = Object)]
    pub build_config: Value,
    /// When the scheduler accepted the build (ms since the epoch, its clock): agents measure
    /// submission-to-launch latency from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<u64>,
    /// When an agent took it from the scheduler (ms since the epoch, the agent's clock): the
    /// time it then waited in the cluster's local queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<u64>,
}

impl QueueMessage {
    /// The start message this job carries, held to the intake's rules again: it was read back
    /// from Redis, which any holder of the password can write.
    pub fn start(&self) -> Result<crate::StartMessage, crate::FieldError> {
        match &self.build_config {
            Value::Object(map) => crate::StartMessage::from_json(map.clone()),
            _ => Err(crate::FieldError::new(
                "buildConfig",
                "must be a JSON object",
            )),
        }
    }
}

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One leased delivery returned by a long-poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Opaque; acknowledges exactly this lease and no later one.
    pub delivery_id: String,
    /// 1 on first delivery, +1 on each redelivery after a lapsed lease.
    pub attempt: u32,
    pub message: QueueMessage,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/corpus/queue_message/regression-float-roundtrip.json): a number
    /// too large for an integer, passed through in a start message, is kept as a float, and it
    /// came back one unit in the last place away after the trip through Redis, until
    /// serde_json parsed with `float_roundtrip`.
    #[test]
    fn a_float_in_a_message_survives_the_trip_through_the_queue() {
        let wire = r#"{"job":"start","buildConfig":{"build":{"id":5555555555555555555555555555555555555555555555555555555555555555555555555551}}}"#;
        let message: QueueMessage = serde_json::from_str(wire).unwrap();
        let again: QueueMessage =
            serde_json::from_str(&serde_json::to_string(&message).unwrap()).unwrap();
        assert_eq!(again, message);
    }
}
