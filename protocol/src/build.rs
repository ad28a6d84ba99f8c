//! The build start and stop messages, as Screwdriver's executor sends them.
//!
//! Screwdriver's payload grows over time, so fields this project does not use are kept in
//! `extra` and passed through to the agent untouched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FieldError, from_value};

/// Annotation naming the cluster a job must run in.
pub const ANNOTATION_BUILD_CLUSTER: &str = "screwdriver.cd/buildCluster";
/// The seed's short form of [`ANNOTATION_BUILD_CLUSTER`].
pub const ANNOTATION_BUILD_CLUSTER_SHORT: &str = "buildCluster";

/// The pipeline a build belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRef {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub id: u64,
    /// `organization/repository`; the organization decides which external clusters may run it.
    #[schema(schema_with = crate::schema::pipeline_name)]
    pub name: String,
    /// `type:host`, e.g. `github:github.com`: must hold a `:`.
    #[schema(pattern = ":")]
    pub scm_context: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_pipeline_id: Option<u64>,
    /// The pipeline's `shared` annotations, when the API sends them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, Value>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/queue/message`: Screwdriver's executor start payload. Fields not named here are
/// kept and passed to the agent. Integers are written as integers (`1`, not `1.0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartMessage {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub build_id: u64,
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub job_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub event_id: Option<u64>,
    /// Screwdriver sends it at the top level in some versions; `pipeline.id` is the fallback.
    /// When given, it must equal `pipeline.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub pipeline_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    pub pipeline: PipelineRef,
    /// The Screwdriver API the build reports to: an `http://` or `https://` URL that must also
    /// be one of the scheduler's `screwdriver.api_uris` (scheme, host, port, path prefix), else
    /// 422.
    #[schema(pattern = "^https?://")]
    pub api_uri: String,
    /// The image the build runs in.
    #[schema(schema_with = crate::schema::container)]
    pub container: String,
    #[serde(default)]
    #[schema(schema_with = crate::schema::start_annotations)]
    pub annotations: BTreeMap<String, Value>,
    /// Job ids whose running builds hold this one back.
    #[serde(default)]
    #[schema(schema_with = crate::schema::blocked_by)]
    pub blocked_by: Vec<u64>,
    #[serde(default, rename = "isPR")]
    pub is_pr: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_parent_job_id: Option<u64>,
    /// The launcher's token. Screwdriver's client moves its own token to the header, so this is
    /// normally minted by the scheduler; one present in the body is used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The cluster asked for when no annotation names one (empty: none); as the annotation, it
    /// must exist (422) and admit the organization (403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_cluster_name: Option<String>,
    /// Everything else Screwdriver sends (`jobState`, `causeMessage`, `build`, …), kept verbatim.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// `DELETE /v1/queue/message`: stop a build. Fields not named here are kept and passed to the
/// agent. Integers are written as integers (`1`, not `1.0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StopRequest {
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub build_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

// === impl StartMessage ===

impl StartMessage {
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        from_value::<Self>(Value::Object(body))?.validate()
    }

    fn validate(self) -> Result<Self, FieldError> {
        positive("buildId", self.build_id)?;
        positive("jobId", self.job_id)?;
        positive("pipeline.id", self.pipeline.id)?;
        if let Some(p) = self.pipeline_id
            && p != self.pipeline.id
        {
            return Err(FieldError::new(
                "pipelineId",
                format!("is {p} but pipeline.id is {}", self.pipeline.id),
            ));
        }
        let Some((org, repo)) = self.pipeline.name.split_once('/') else {
            return Err(FieldError::new(
                "pipeline.name",
                "must be \"organization/repository\"",
            ));
        };
        if org.is_empty() || repo.is_empty() {
            return Err(FieldError::new(
                "pipeline.name",
                "must be \"organization/repository\"",
            ));
        }
        if !self.pipeline.scm_context.contains(':') {
            return Err(FieldError::new(
                "pipeline.scmContext",
                "must look like \"github:github.com\"",
            ));
        }
        if !(self.api_uri.starts_with("http://") || self.api_uri.starts_with("https://")) {
            return Err(FieldError::new(
                "apiUri",
                "must be an http:// or https:// URL",
            ));
        }
        if self.container.trim().is_empty() {
            return Err(FieldError::new("container", "must name the build's image"));
        }
        for (i, job) in self.blocked_by.iter().enumerate() {
            positive(&format!("blockedBy[{i}]"), *job)?;
        }
        if let Some(id) = self.event_id {
            positive("eventId", id)?;
        }
        for key in [ANNOTATION_BUILD_CLUSTER, ANNOTATION_BUILD_CLUSTER_SHORT] {
            match self.annotations.get(key) {
                None | Some(Value::String(_)) => {}
                Some(_) => {
                    return Err(FieldError::new(
                        format!("annotations.{key}"),
                        "must be a string naming a build cluster",
                    ));
                }
            }
        }
        Ok(self)
    }

    /// The cluster this build asks for: the job's annotation, then the pipeline's shared
    /// annotation, then an explicit `buildClusterName`.
    pub fn requested_cluster(&self) -> Option<&str> {
        fn annotated(map: &BTreeMap<String, Value>) -> Option<&str> {
            [ANNOTATION_BUILD_CLUSTER, ANNOTATION_BUILD_CLUSTER_SHORT]
                .iter()
                .find_map(|k| map.get(*k).and_then(Value::as_str))
                .filter(|s| !s.is_empty())
        }
        annotated(&self.annotations)
            .or_else(|| annotated(&self.pipeline.annotations))
            .or(self.build_cluster_name.as_deref().filter(|s| !s.is_empty()))
    }

    /// The SCM organization: the part of `pipeline.name` before the `/`.
    pub fn organization(&self) -> &str {
        self.pipeline
            .name
            .split_once('/')
            .map_or(self.pipeline.name.as_str(), |(org, _)| org)
    }

    pub fn pipeline_id(&self) -> u64 {
        self.pipeline_id.unwrap_or(self.pipeline.id)
    }
}

impl StopRequest {
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        let stop: Self = from_value(Value::Object(body))?;
        positive("buildId", stop.build_id)?;
        Ok(stop)
    }
}

/// The largest id any part of the system keeps exactly: the database stores ids as BIGINT,
/// so a larger one would be clamped there while Redis kept it whole, and the two would name
/// different builds.
pub const MAX_ID: u64 = i64::MAX as u64;

/// An id as Screwdriver issues them: 1 to [`MAX_ID`].
pub fn positive(field: &str, value: u64) -> Result<(), FieldError> {
    if value == 0 || value > MAX_ID {
        return Err(FieldError::new(
            field,
            "must be a positive integer of at most 9223372036854775807 (2^63-1)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A start payload as Screwdriver's API sends it (token already moved to the header).
    pub(crate) fn screwdriver_payload() -> Value {
        json!({
            "build": {"id": 8609, "eventId": 775, "createTime": "2026-11-28T00:00:00.000Z"},
            "causeMessage": "Started by user alice",
            "jobId": 1234,
            "jobState": "ENABLED",
            "jobArchived": false,
            "jobName": "main",
            "annotations": {"screwdriver.cd/buildCluster": "iOS", "screwdriver.cd/cpu": "HIGH"},
            "blockedBy": [1234, 99],
            "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com", "configPipelineId": null},
            "freezeWindows": [],
            "apiUri": "https://api.screwdriver.example",
            "buildId": 8609,
            "eventId": 775,
            "container": "node:20",
            "isPR": false,
            "prParentJobId": null,
            "buildClusterName": "",
        })
    }

    fn parse(v: Value) -> Result<StartMessage, FieldError> {
        match v {
            Value::Object(m) => StartMessage::from_json(m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn screwdriver_payload_parses_and_round_trips_unknown_fields() {
        let msg = parse(screwdriver_payload()).unwrap();
        assert_eq!(msg.build_id, 8609);
        assert_eq!(msg.organization(), "mobile");
        assert_eq!(msg.requested_cluster(), Some("iOS"));
        assert_eq!(msg.pipeline_id(), 42);
        let back = serde_json::to_value(&msg).unwrap();
        assert_eq!(back["causeMessage"], "Started by user alice");
        assert_eq!(back["build"]["eventId"], 775);
        assert_eq!(back["jobState"], "ENABLED");
        assert_eq!(back["isPR"], false);
    }

    #[test]
    fn requested_cluster_precedence() {
        let mut v = screwdriver_payload();
        v["annotations"] = json!({});
        v["pipeline"]["annotations"] = json!({"buildCluster": "shared"});
        v["buildClusterName"] = json!("explicit");
        assert_eq!(
            parse(v.clone()).unwrap().requested_cluster(),
            Some("shared")
        );
        v["pipeline"]["annotations"] = json!({});
        assert_eq!(
            parse(v.clone()).unwrap().requested_cluster(),
            Some("explicit")
        );
        v["buildClusterName"] = json!("");
        assert_eq!(parse(v).unwrap().requested_cluster(), None);
    }

    #[test]
    fn invalid_payloads_name_the_field() {
        let cases = [
            ("buildId", json!("abc"), "buildId"),
            ("buildId", json!(0), "buildId"),
            ("apiUri", json!("ftp://x"), "apiUri"),
            ("container", json!(" "), "container"),
            ("blockedBy", json!([1, "x"]), "blockedBy[1]"),
            (
                "annotations",
                json!({"screwdriver.cd/buildCluster": 5}),
                "annotations.screwdriver.cd/buildCluster",
            ),
            ("pipelineId", json!(7), "pipelineId"),
        ];
        for (key, value, field) in cases {
            let mut v = screwdriver_payload();
            v[key] = value;
            let err = parse(v).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut v = screwdriver_payload();
        v["pipeline"]["name"] = json!("noslash");
        assert_eq!(parse(v).unwrap_err().field, "pipeline.name");
        let mut v = screwdriver_payload();
        v.as_object_mut().unwrap().remove("jobId");
        assert_eq!(parse(v).unwrap_err().field, "jobId");
    }

    #[test]
    fn stop_request() {
        let Value::Object(m) = json!({"buildId": 5, "jobId": 2, "blockedBy": [2]}) else {
            unreachable!()
        };
        let stop = StopRequest::from_json(m).unwrap();
        assert_eq!(stop.build_id, 5);
        assert_eq!(stop.extra["blockedBy"], json!([2]));
    }
}
