//! The cluster-worker protocol: what an agent and the scheduler exchange under
//! `/v1/jobs/{buildCluster}…`.
//!
//! | call | request | answer |
//! | --- | --- | --- |
//! | `GET /v1/jobs/{cluster}?wait&max` | — | [`Jobs`] |
//! | `POST …/ack`, `POST …/renew` | [`AckBody`] | [`LeaseReport`] |
//! | `POST …/nack` | [`NackBody`] | [`LeaseReport`] |
//! | `POST …/events` | [`EventBody`] | the build's state (the scheduler's) |
//!
//! Limits are enforced twice, in one place: the sender shapes its text with
//! [`truncate_message`] so it always fits, and the receiver refuses what does not with the
//! `from_json` of each body, naming the field.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FieldError, from_value, only_fields};
use crate::queue::Delivery;

/// Most delivery ids one ack, nack or renew may name.
pub const MAX_DELIVERY_IDS: usize = 1000;

/// Most characters (Unicode scalar values, not bytes) of a nack's `reason` and an event's
/// `statusMessage`.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// The sender's side of [`MAX_MESSAGE_CHARS`]: `text` cut to at most that many characters, at a
/// character boundary (never inside a multi-byte character).
pub fn truncate_message(text: &str) -> &str {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// The receiver's side of [`MAX_MESSAGE_CHARS`]: whether `text` is within it.
pub fn message_fits(text: &str) -> bool {
    text.chars().nth(MAX_MESSAGE_CHARS).is_none()
}

/// Lifecycle events an agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Running,
    Finished,
    Failed,
    /// Ended on request (a stop reached the agent).
    Stopped,
}

impl Event {
    pub const ALL: [Event; 4] = [
        Event::Running,
        Event::Finished,
        Event::Failed,
        Event::Stopped,
    ];

    /// The wire name: `running`, `finished`, `failed`, `stopped`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Event::Running => "running",
            Event::Finished => "finished",
            Event::Failed => "failed",
            Event::Stopped => "stopped",
        }
    }

    /// Every event but `running` ends the build.
    pub const fn is_end(self) -> bool {
        !matches!(self, Event::Running)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a wire name; anything else is refused as the scheduler refuses it in a body (field
/// `event`, serde's reason).
impl FromStr for Event {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_value::<Self>(Value::String(s.to_owned())).map_err(|e| FieldError {
            field: "event".to_owned(),
            ..e
        })
    }
}

impl TryFrom<&str> for Event {
    type Error = FieldError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// `{"buildId","event","statusMessage"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventBody {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub build_id: u64,
    pub event: Event,
    /// At most 1000 characters ([`MAX_MESSAGE_CHARS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1000)]
    pub status_message: Option<String>,
}

impl EventBody {
    /// The sender's body: a longer `status_message` is cut to [`MAX_MESSAGE_CHARS`].
    pub fn new(build_id: u64, event: Event, status_message: Option<&str>) -> Self {
        Self {
            build_id,
            event,
            status_message: status_message.map(|m| truncate_message(m).to_owned()),
        }
    }

    /// The receiver's parse: unknown or mistyped fields and an over-long `statusMessage` are
    /// refused, naming the field.
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        let event: Self = from_value(Value::Object(body))?;
        event.validate()?;
        Ok(event)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        crate::build::positive("buildId", self.build_id)?;
        if self
            .status_message
            .as_deref()
            .is_some_and(|m| !message_fits(m))
        {
            return Err(FieldError::new(
                "statusMessage",
                format!("must be at most {MAX_MESSAGE_CHARS} characters"),
            ));
        }
        Ok(())
    }
}

/// `{"deliveryIds":[…]}`: the body of an ack (these transfers succeeded) and of a renew
/// (extend these leases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "Map<String, Value>")]
pub struct AckBody {
    pub delivery_ids: Vec<String>,
}

impl AckBody {
    pub const FIELDS: &'static [&'static str] = &["deliveryIds"];

    pub fn new(delivery_ids: &[String]) -> Self {
        Self {
            delivery_ids: delivery_ids.to_vec(),
        }
    }

    /// The receiver's parse: only `deliveryIds`, a non-empty list of at most
    /// [`MAX_DELIVERY_IDS`] strings.
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        only_fields(&body, Self::FIELDS)?;
        Ok(Self {
            delivery_ids: delivery_ids(&body)?,
        })
    }
}

impl TryFrom<Map<String, Value>> for AckBody {
    type Error = FieldError;

    fn try_from(body: Map<String, Value>) -> Result<Self, Self::Error> {
        Self::from_json(body)
    }
}

/// `{"deliveryIds":[…],"reason":"…"}`: the body of a nack (give these back now, and why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "Map<String, Value>")]
pub struct NackBody {
    pub delivery_ids: Vec<String>,
    /// Empty when the sender gave none; at most [`MAX_MESSAGE_CHARS`] characters.
    pub reason: String,
}

impl NackBody {
    pub const FIELDS: &'static [&'static str] = &["deliveryIds", "reason"];

    /// The sender's body: a longer `reason` is cut to [`MAX_MESSAGE_CHARS`].
    pub fn new(delivery_ids: &[String], reason: &str) -> Self {
        Self {
            delivery_ids: delivery_ids.to_vec(),
            reason: truncate_message(reason).to_owned(),
        }
    }

    /// The receiver's parse: the rules of [`AckBody::from_json`], and `reason`, when present,
    /// a string of at most [`MAX_MESSAGE_CHARS`] characters.
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        only_fields(&body, Self::FIELDS)?;
        let delivery_ids = delivery_ids(&body)?;
        let reason = match body.get("reason") {
            None => String::new(),
            Some(Value::String(s)) if message_fits(s) => s.clone(),
            Some(_) => {
                return Err(FieldError::new(
                    "reason",
                    format!("must be a string of at most {MAX_MESSAGE_CHARS} characters"),
                ));
            }
        };
        Ok(Self {
            delivery_ids,
            reason,
        })
    }
}

impl TryFrom<Map<String, Value>> for NackBody {
    type Error = FieldError;

    fn try_from(body: Map<String, Value>) -> Result<Self, Self::Error> {
        Self::from_json(body)
    }
}

/// `deliveryIds`: a non-empty list of at most [`MAX_DELIVERY_IDS`] strings.
fn delivery_ids(body: &Map<String, Value>) -> Result<Vec<String>, FieldError> {
    let invalid = || {
        FieldError::new(
            "deliveryIds",
            format!("must be a non-empty list of at most {MAX_DELIVERY_IDS} strings"),
        )
    };
    let list = body
        .get("deliveryIds")
        .and_then(Value::as_array)
        .ok_or_else(invalid)?;
    if list.is_empty() || list.len() > MAX_DELIVERY_IDS {
        return Err(invalid());
    }
    list.iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or_else(invalid))
        .collect()
}

/// The result of acknowledging (or nacking, renewing) a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseReport {
    /// Delivery ids the operation applied to.
    #[serde(default)]
    #[schema(required = true)]
    pub done: Vec<String>,
    /// Delivery ids that are not the current lease (redelivered, lapsed, or already acked).
    #[serde(default)]
    #[schema(required = true)]
    pub stale: Vec<String>,
}

/// A long-poll's answer.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Jobs {
    // The scheduler always sends it; a reader takes its absence for none.
    #[serde(default)]
    #[schema(required = true)]
    pub jobs: Vec<Delivery>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::queue::{JobKind, QueueMessage};

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i}@1")).collect()
    }

    #[test]
    fn truncate_message_cuts_at_a_character_boundary() {
        assert_eq!(truncate_message(""), "");
        assert_eq!(truncate_message("short"), "short");
        let exact = "a".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(truncate_message(&exact), exact);
        let long = "a".repeat(MAX_MESSAGE_CHARS + 1);
        assert_eq!(truncate_message(&long), exact);
        // Multi-byte characters count once each and are never split.
        let wide = "é".repeat(MAX_MESSAGE_CHARS + 5);
        let cut = truncate_message(&wide);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS);
        assert_eq!(cut.len(), 2 * MAX_MESSAGE_CHARS);
        let mixed = format!("{}😀😀", "a".repeat(MAX_MESSAGE_CHARS - 1));
        assert_eq!(
            truncate_message(&mixed),
            format!("{}😀", "a".repeat(MAX_MESSAGE_CHARS - 1))
        );
        // What the sender cuts, the receiver accepts.
        for text in [&long, &wide, &mixed] {
            assert!(message_fits(truncate_message(text)));
            assert!(!message_fits(text));
        }
        assert!(message_fits(&exact));
        assert!(message_fits(&"é".repeat(MAX_MESSAGE_CHARS)));
    }

    #[test]
    fn event_is_lowercase_on_the_wire() {
        for event in Event::ALL {
            let wire = serde_json::to_value(event).unwrap();
            assert_eq!(wire, json!(event.as_str()));
            assert_eq!(serde_json::from_value::<Event>(wire).unwrap(), event);
            assert_eq!(event.as_str().parse::<Event>().unwrap(), event);
            assert_eq!(Event::try_from(event.as_str()).unwrap(), event);
            assert_eq!(event.to_string(), event.as_str());
            assert_eq!(event.is_end(), event != Event::Running);
        }
        let err = "Running".parse::<Event>().unwrap_err();
        assert_eq!(err.field, "event");
        assert!(err.reason.contains("unknown variant `Running`"), "{err}");
    }

    #[test]
    fn event_body_round_trips() {
        let body = EventBody::new(7, Event::Failed, Some("exit 1"));
        let wire = serde_json::to_value(&body).unwrap();
        assert_eq!(
            wire,
            json!({"buildId": 7, "event": "failed", "statusMessage": "exit 1"})
        );
        assert_eq!(EventBody::from_json(object(wire)).unwrap(), body);

        let body = EventBody::new(8, Event::Running, None);
        let wire = serde_json::to_value(&body).unwrap();
        assert_eq!(wire, json!({"buildId": 8, "event": "running"}));
        assert_eq!(EventBody::from_json(object(wire)).unwrap(), body);
    }

    #[test]
    fn event_body_caps_the_status_message() {
        let long = "x".repeat(MAX_MESSAGE_CHARS + 1);
        // The sender cuts it…
        let body = EventBody::new(7, Event::Failed, Some(&long));
        assert_eq!(
            body.status_message.as_deref().map(|m| m.chars().count()),
            Some(MAX_MESSAGE_CHARS)
        );
        assert!(body.validate().is_ok());
        // …and the receiver refuses what was not cut.
        let err = EventBody::from_json(object(
            json!({"buildId": 7, "event": "failed", "statusMessage": long}),
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "statusMessage: must be at most 1000 characters"
        );
        let exact = "é".repeat(MAX_MESSAGE_CHARS);
        assert!(
            EventBody::from_json(object(
                json!({"buildId": 7, "event": "failed", "statusMessage": exact}),
            ))
            .is_ok()
        );
    }

    #[test]
    fn event_body_names_the_refused_field() {
        let refuse = |v: Value| EventBody::from_json(object(v)).unwrap_err();
        assert_eq!(refuse(json!({"event": "running"})).field, "buildId");
        assert_eq!(refuse(json!({"buildId": 1})).field, "event");
        let err = refuse(json!({"buildId": 1, "event": "exploded"}));
        assert_eq!(err.field, "event");
        assert!(err.reason.contains("unknown variant"), "{err}");
        assert_eq!(
            refuse(json!({"buildId": 1, "event": "running", "statusMessage": 5})).field,
            "statusMessage"
        );
        let err = refuse(json!({"buildId": 1, "event": "running", "extra": true}));
        assert!(err.reason.contains("unknown field `extra`"), "{err}");
        for id in [0_u64, 1_u64 << 63] {
            assert_eq!(
                refuse(json!({"buildId": id, "event": "running"})).field,
                "buildId"
            );
        }
    }

    #[test]
    fn ack_body_round_trips() {
        let body = AckBody::new(&ids(2));
        let wire = serde_json::to_value(&body).unwrap();
        assert_eq!(wire, json!({"deliveryIds": ["0@1", "1@1"]}));
        assert_eq!(AckBody::from_json(object(wire.clone())).unwrap(), body);
        assert_eq!(serde_json::from_value::<AckBody>(wire).unwrap(), body);
    }

    #[test]
    fn ack_body_refusals_name_the_field() {
        let refuse = |v: Value| AckBody::from_json(object(v)).unwrap_err().to_string();
        let ids_rule = "deliveryIds: must be a non-empty list of at most 1000 strings";
        assert_eq!(refuse(json!({})), ids_rule);
        assert_eq!(refuse(json!({"deliveryIds": []})), ids_rule);
        assert_eq!(refuse(json!({"deliveryIds": "a@1"})), ids_rule);
        assert_eq!(refuse(json!({"deliveryIds": ["a@1", 2]})), ids_rule);
        assert_eq!(
            refuse(json!({"deliveryIds": ids(MAX_DELIVERY_IDS + 1)})),
            ids_rule
        );
        assert!(AckBody::from_json(object(json!({"deliveryIds": ids(MAX_DELIVERY_IDS)}))).is_ok());
        // An unknown field is named before anything else is looked at.
        assert_eq!(
            refuse(json!({"deliveryIds": [], "reason": "x"})),
            "reason: unknown field; allowed fields are deliveryIds"
        );
        // Found by tests/properties.rs: an empty key was named as the field "".
        assert!(
            refuse(json!({"": 1})).starts_with("body: has a field with an empty"),
            "{}",
            refuse(json!({"": 1}))
        );
        // Deserializing runs the same rules.
        let err = serde_json::from_value::<AckBody>(json!({"deliveryIds": []})).unwrap_err();
        assert_eq!(err.to_string(), ids_rule);
    }

    #[test]
    fn nack_body_round_trips() {
        let body = NackBody::new(&ids(1), "local Redis is down");
        let wire = serde_json::to_value(&body).unwrap();
        assert_eq!(
            wire,
            json!({"deliveryIds": ["0@1"], "reason": "local Redis is down"})
        );
        assert_eq!(NackBody::from_json(object(wire.clone())).unwrap(), body);
        assert_eq!(serde_json::from_value::<NackBody>(wire).unwrap(), body);
        // `reason` is optional on the wire.
        let bare = NackBody::from_json(object(json!({"deliveryIds": ["0@1"]}))).unwrap();
        assert_eq!(bare, NackBody::new(&ids(1), ""));
    }

    #[test]
    fn nack_body_caps_the_reason() {
        let long = "ü".repeat(MAX_MESSAGE_CHARS + 1);
        let body = NackBody::new(&ids(1), &long);
        assert_eq!(body.reason.chars().count(), MAX_MESSAGE_CHARS);
        let wire = object(serde_json::to_value(&body).unwrap());
        assert_eq!(NackBody::from_json(wire).unwrap(), body);

        let refuse = |v: Value| NackBody::from_json(object(v)).unwrap_err().to_string();
        let reason_rule = "reason: must be a string of at most 1000 characters";
        assert_eq!(
            refuse(json!({"deliveryIds": ["0@1"], "reason": long})),
            reason_rule
        );
        assert_eq!(
            refuse(json!({"deliveryIds": ["0@1"], "reason": 1})),
            reason_rule
        );
        assert_eq!(
            refuse(json!({"deliveryIds": ["0@1"], "reason": null})),
            reason_rule
        );
        // The ids are checked first, then the reason.
        assert_eq!(
            refuse(json!({"deliveryIds": [], "reason": 1})),
            "deliveryIds: must be a non-empty list of at most 1000 strings"
        );
        assert_eq!(
            refuse(json!({"deliveryIds": ["0@1"], "why": "x"})),
            "why: unknown field; allowed fields are deliveryIds, reason"
        );
    }

    #[test]
    fn lease_report_round_trips_and_reads_leniently() {
        let report = LeaseReport {
            done: vec!["1@2".into()],
            stale: vec!["3@4".into()],
        };
        let wire = serde_json::to_value(&report).unwrap();
        assert_eq!(wire, json!({"done": ["1@2"], "stale": ["3@4"]}));
        assert_eq!(serde_json::from_value::<LeaseReport>(wire).unwrap(), report);
        assert_eq!(
            serde_json::to_value(LeaseReport::default()).unwrap(),
            json!({"done": [], "stale": []})
        );
        assert_eq!(
            serde_json::from_value::<LeaseReport>(json!({"done": ["1@2"]})).unwrap(),
            LeaseReport {
                done: vec!["1@2".into()],
                stale: Vec::new()
            }
        );
    }

    #[test]
    fn jobs_round_trip() {
        let jobs = Jobs {
            jobs: vec![Delivery {
                delivery_id: "42@7".into(),
                attempt: 1,
                message: QueueMessage {
                    job: JobKind::Start,
                    build_config: json!({"buildId": 42}),
                    queued_at: Some(5),
                    received_at: None,
                },
            }],
        };
        let wire = serde_json::to_value(&jobs).unwrap();
        assert_eq!(
            wire,
            json!({"jobs": [{
                "deliveryId": "42@7",
                "attempt": 1,
                "message": {"job": "start", "buildConfig": {"buildId": 42}, "queuedAt": 5}
            }]})
        );
        assert_eq!(serde_json::from_value::<Jobs>(wire).unwrap(), jobs);
        assert_eq!(
            serde_json::to_value(Jobs::default()).unwrap(),
            json!({"jobs": []})
        );
        assert_eq!(
            serde_json::from_value::<Jobs>(json!({})).unwrap(),
            Jobs::default()
        );
    }
}
