//! `Status` bodies, shaped as kube-apiserver's `k8s.io/apimachinery/pkg/api/errors` builds
//! them (`NewInvalid`, `NewForbidden`, `NewBadRequest`, `NewResourceExpired`, ...).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::authz::Attributes;
use super::validate::{Cause, go_quote};

/// A `Status` with `code`, `reason` and `message`, and `details` when there are any.
pub fn body(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    body
}

/// The response carrying `body(code, ...)`.
pub fn response(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    respond(body(code, reason, message, details))
}

/// Any `Status` as the response of its code.
pub fn respond(body: Value) -> Response {
    let code = body["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

/// `StatusDetails` without its empty fields (they are `omitempty`).
fn details(name: &str, group: &str, kind: &str) -> Map<String, Value> {
    let mut d = Map::new();
    for (key, value) in [("name", name), ("group", group), ("kind", kind)] {
        if !value.is_empty() {
            d.insert(key.to_owned(), json!(value));
        }
    }
    d
}

/// `NewInvalid`: 422, one cause per field error, the message listing them (once each) as
/// `Kind "name" is invalid: cause` or `... is invalid: [cause1, cause2]`.
pub fn invalid(group: &str, kind: &str, name: &str, causes: &[Cause]) -> Value {
    let mut rendered: Vec<String> = Vec::new();
    for cause in causes.iter().map(Cause::rendered) {
        if !rendered.contains(&cause) {
            rendered.push(cause);
        }
    }
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    let message = match rendered.as_slice() {
        [] => format!("{qualified} {} is invalid", go_quote(name)),
        [one] => format!("{qualified} {} is invalid: {one}", go_quote(name)),
        many => format!(
            "{qualified} {} is invalid: [{}]",
            go_quote(name),
            many.join(", ")
        ),
    };
    let causes: Vec<Value> = causes
        .iter()
        .map(|c| json!({"reason": c.kind.reason(), "message": c.message, "field": c.field}))
        .collect();
    let mut details = details(name, group, kind);
    details.insert("causes".to_owned(), Value::Array(causes));
    body(422, "Invalid", &message, Some(Value::Object(details)))
}

/// The 422 for a pod that fails validation.
pub fn invalid_pod(name: &str, causes: &[Cause]) -> Value {
    invalid("", "Pod", name, causes)
}

/// `transformDecodeError`: a body the server cannot decode into a Pod.
pub fn cannot_decode_pod(error: &str) -> Value {
    body(
        400,
        "BadRequest",
        &format!("Pod in version \"v1\" cannot be handled as a Pod: {error}"),
        None,
    )
}

/// `responsewriters.Forbidden` for a request the authorizer denied.
pub fn forbidden(attrs: &Attributes, user: &str) -> Value {
    let mut resource = attrs.resource.clone();
    if !attrs.subresource.is_empty() {
        resource = format!("{resource}/{}", attrs.subresource);
    }
    let scope = match &attrs.namespace {
        Some(ns) => format!("in the namespace {}", go_quote(ns)),
        None => "at the cluster scope".to_owned(),
    };
    let reason = format!(
        "User {} cannot {} resource {} in API group {} {scope}",
        go_quote(user),
        attrs.verb,
        go_quote(&resource),
        go_quote(&attrs.group),
    );
    let group_resource = if attrs.group.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}.{}", attrs.resource, attrs.group)
    };
    let message = match attrs.name.as_deref() {
        Some(name) => format!("{group_resource} {} is forbidden: {reason}", go_quote(name)),
        None => format!("{group_resource} is forbidden: {reason}"),
    };
    let details = details(
        attrs.name.as_deref().unwrap_or_default(),
        &attrs.group,
        &attrs.resource,
    );
    body(403, "Forbidden", &message, Some(Value::Object(details)))
}

/// `NewResourceExpired`: 410 Gone.
pub fn expired(message: &str) -> Value {
    body(410, "Expired", message, None)
}

/// `NewTooLargeResourceVersionError`: 504 asking the client to retry.
pub fn too_large_resource_version(asked: u64, current: u64) -> Value {
    let details = json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    });
    body(
        504,
        "Timeout",
        &format!("Too large resource version: {asked}, current: {current}"),
        Some(details),
    )
}

/// `pods "name" not found`.
pub fn not_found(name: &str) -> Value {
    body(
        404,
        "NotFound",
        &format!("pods {} not found", go_quote(name)),
        Some(json!({"name": name, "kind": "pods"})),
    )
}

/// `pods "name" already exists`.
pub fn already_exists(name: &str) -> Value {
    body(
        409,
        "AlreadyExists",
        &format!("pods {} already exists", go_quote(name)),
        Some(json!({"name": name, "kind": "pods"})),
    )
}

/// A `Warning: 299 - "text"` header value, as the server adds for each warning.
pub fn warning_header(text: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("299 - {}", go_quote(text))).ok()
}

/// The header name for [`warning_header`].
pub const WARNING: header::HeaderName = header::WARNING;

/// The reason a `Status` with this code carries.
pub fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}
