//! Error shapes: the API's error body and the field-level validation error.

use serde::{Deserialize, Serialize};

/// The body of every error response: `{"statusCode":N,"error":"…","message":"…"}`, the shape
/// Screwdriver's own services (hapi/boom) use, so existing clients parse it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub status_code: u16,
    pub error: String,
    pub message: String,
}

/// A refused input, naming the field (dotted path) and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Deserializes `value` into `T`, turning serde's error into a [`FieldError`] that names the
/// path of the offending field (`pipeline.scmContext`, `blockedBy[2]`).
pub fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let reason = err.into_inner().to_string();
        // serde reports a missing field at its parent: name the field itself.
        if let Some(missing) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            let field = if path == "." {
                missing.to_owned()
            } else {
                format!("{path}.{missing}")
            };
            return FieldError::new(field, "is required");
        }
        let field = if path == "." || !nameable(&path) {
            "body".to_owned()
        } else {
            path
        };
        FieldError::new(field, reason)
    })
}

/// Refuses the first field of `body` that is not `allowed`, naming it when it can be named.
pub fn only_fields(
    body: &serde_json::Map<String, serde_json::Value>,
    allowed: &[&str],
) -> Result<(), FieldError> {
    let Some(unknown) = body.keys().find(|k| !allowed.contains(&k.as_str())) else {
        return Ok(());
    };
    let allowed = allowed.join(", ");
    Err(if nameable(unknown) {
        FieldError::new(
            unknown.as_str(),
            format!("unknown field; allowed fields are {allowed}"),
        )
    } else {
        FieldError::new(
            "body",
            format!(
                "has a field with an empty, long or unprintable name; allowed fields are {allowed}"
            ),
        )
    })
}

/// Whether a field name that came from the client (an unknown key, a path through a map) can
/// be named in an error: printed back, it must be short and printable, and not empty.
pub fn nameable(field: &str) -> bool {
    !field.is_empty() && field.chars().count() <= 64 && !field.chars().any(char::is_control)
}

/// Parses a request body as a JSON object; anything else is refused with the reason.
pub fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, FieldError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(FieldError::new("body", "must be a JSON object")),
        Err(err) => Err(FieldError::new("body", format!("invalid JSON: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_value_names_the_nested_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            inner: Inner,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            count: u32,
        }
        let err = from_value::<Outer>(serde_json::json!({"inner": {"count": "x"}})).unwrap_err();
        assert_eq!(err.field, "inner.count");
        assert!(err.reason.contains("invalid type"), "{}", err.reason);
    }

    #[test]
    fn parse_object_refuses_non_objects() {
        assert_eq!(parse_object(b"[1]").unwrap_err().field, "body");
        assert!(
            parse_object(b"{")
                .unwrap_err()
                .reason
                .contains("invalid JSON")
        );
        assert!(parse_object(b"{\"a\":1}").is_ok());
    }
}
