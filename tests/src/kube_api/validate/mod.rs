//! Pod validation on create, as kube-apiserver's `ValidatePodCreate` does it for the fields a
//! build pod uses: the same rules, field paths, cause types and messages
//! (`pkg/apis/core/validation/validation.go`, `k8s.io/apimachinery/.../validation`).
//!
//! Pure: it reads a pod that already decoded (types are right, nulls are gone) and returns the
//! causes, in the order the server finds them. Defaults the server applies before validating
//! (restartPolicy `Always`, imagePullPolicy, terminationGracePeriodSeconds 30, ...) are taken
//! as applied: an absent or empty defaulted field is fine. Where releases 1.30–1.37 differ, a
//! pod is refused if the oldest supported release refuses it; where the rule is unsure, it is
//! not refused.

mod containers;
mod names;
mod resources;
mod scheduling;
mod security;
mod volumes;

use std::fmt::Write as _;

use serde_json::Value;

/// A field-level error, as `StatusCause` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub kind: CauseType,
    /// `spec.containers[0].name`
    pub field: String,
    /// The error without its field (`ErrorBody`): `Invalid value: "x": must be ...`.
    pub message: String,
}

/// The cause types (`field.ErrorType`) this validation produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CauseType {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    TooLong,
    Forbidden,
    NotFound,
}

impl CauseType {
    /// The `reason` of a `StatusCause`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Required => "FieldValueRequired",
            Self::Invalid => "FieldValueInvalid",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Duplicate => "FieldValueDuplicate",
            Self::TooLong => "FieldValueTooLong",
            Self::Forbidden => "FieldValueForbidden",
            Self::NotFound => "FieldValueNotFound",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Required => "Required value",
            Self::Invalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Duplicate => "Duplicate value",
            Self::TooLong => "Too long",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Not found",
        }
    }
}

/// The offending value, printed as the server prints it: strings quoted as Go's `%q`,
/// numbers and booleans bare, anything else as JSON.
#[derive(Debug, Clone)]
pub enum BadValue {
    Str(String),
    Int(i64),
    Json(Value),
}

impl From<&str> for BadValue {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}

impl From<String> for BadValue {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<i64> for BadValue {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl From<&Value> for BadValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::String(s) => Self::Str(s.clone()),
            Value::Number(n) if n.is_i64() => Self::Int(n.as_i64().unwrap_or_default()),
            other => Self::Json(other.clone()),
        }
    }
}

impl BadValue {
    fn render(&self) -> String {
        match self {
            Self::Str(s) => go_quote(s),
            Self::Int(n) => n.to_string(),
            Self::Json(Value::Bool(b)) => b.to_string(),
            Self::Json(v) => v.to_string(),
        }
    }
}

impl Cause {
    fn new(kind: CauseType, field: &FieldPath, detail: &str, value: Option<BadValue>) -> Self {
        let mut message = kind.label().to_owned();
        if let Some(v) = value {
            let _ = write!(message, ": {}", v.render());
        }
        if !detail.is_empty() {
            let _ = write!(message, ": {detail}");
        }
        Self {
            kind,
            field: field.to_string(),
            message,
        }
    }

    pub fn required(field: &FieldPath, detail: &str) -> Self {
        Self::new(CauseType::Required, field, detail, None)
    }

    pub fn invalid(field: &FieldPath, value: impl Into<BadValue>, detail: &str) -> Self {
        Self::new(CauseType::Invalid, field, detail, Some(value.into()))
    }

    /// `Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(
        field: &FieldPath,
        value: impl Into<BadValue>,
        supported: &[&str],
    ) -> Self {
        let listed: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        let detail = if listed.is_empty() {
            String::new()
        } else {
            format!("supported values: {}", listed.join(", "))
        };
        Self::new(CauseType::NotSupported, field, &detail, Some(value.into()))
    }

    pub fn duplicate(field: &FieldPath, value: impl Into<BadValue>) -> Self {
        Self::new(CauseType::Duplicate, field, "", Some(value.into()))
    }

    pub fn not_found(field: &FieldPath, value: impl Into<BadValue>) -> Self {
        Self::new(CauseType::NotFound, field, "", Some(value.into()))
    }

    /// `Too long: may not be more than N bytes`.
    pub fn too_long(field: &FieldPath, max: usize) -> Self {
        let unit = if max == 1 { "byte" } else { "bytes" };
        let detail = format!("may not be more than {max} {unit}");
        Self::new(CauseType::TooLong, field, &detail, None)
    }

    pub fn forbidden(field: &FieldPath, detail: &str) -> Self {
        Self::new(CauseType::Forbidden, field, detail, None)
    }

    /// `field: message`, as the Status message lists it.
    pub fn rendered(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// A field path as the server prints it: `spec.containers[0].resources.limits[cpu]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    pub fn new(root: &str) -> Self {
        Self(root.to_owned())
    }

    pub fn child(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self::new(name)
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    pub fn key(&self, key: &str) -> Self {
        Self(format!("{}[{key}]", self.0))
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Go's `%q`: double quotes, escapes for quotes, backslashes and control characters.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_control() && u32::from(c) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every cause the server finds in `pod` on create.
pub fn validate_pod(pod: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let metadata = &pod["metadata"];
    object_meta(metadata, &FieldPath::new("metadata"), &mut out);
    pod_annotations(metadata, &mut out);
    let spec = &pod["spec"];
    let spec_path = FieldPath::new("spec");
    pod_spec(spec, &spec_path, &mut out);
    for list in ["containers", "initContainers"] {
        containers::image_whitespace(list_of(spec, list), &spec_path.child(list), &mut out);
    }
    create_only(spec, &spec_path, &mut out);
    out
}

/// `ValidateObjectMeta` for a namespaced object named as a DNS subdomain.
fn object_meta(meta: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(prefix) = str_of(meta, "generateName").filter(|g| !g.is_empty()) {
        for msg in names::dns_subdomain_prefix(prefix) {
            out.push(Cause::invalid(&path.child("generateName"), prefix, &msg));
        }
    }
    match str_of(meta, "name").unwrap_or_default() {
        "" => out.push(Cause::required(
            &path.child("name"),
            "name or generateName is required",
        )),
        name => {
            for msg in names::dns_subdomain(name) {
                out.push(Cause::invalid(&path.child("name"), name, &msg));
            }
        }
    }
    match str_of(meta, "namespace").unwrap_or_default() {
        "" => out.push(Cause::required(&path.child("namespace"), "")),
        ns => {
            for msg in names::dns_label(ns) {
                out.push(Cause::invalid(&path.child("namespace"), ns, &msg));
            }
        }
    }
    labels(meta.get("labels"), &path.child("labels"), out);
    annotations(meta.get("annotations"), &path.child("annotations"), out);
    finalizers(list_of(meta, "finalizers"), &path.child("finalizers"), out);
}

/// `ValidateLabels`: keys are qualified names, values label values (the field is the map's).
pub(crate) fn labels(labels: Option<&Value>, path: &FieldPath, out: &mut Vec<Cause>) {
    for (key, value) in labels.and_then(Value::as_object).into_iter().flatten() {
        for msg in names::qualified_name(key) {
            out.push(Cause::invalid(path, key.as_str(), &msg));
        }
        let value = value.as_str().unwrap_or_default();
        for msg in names::label_value(value) {
            out.push(Cause::invalid(path, value, &msg));
        }
    }
}

/// The total size of a pod's annotation keys and values.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// `ValidateAnnotations`: keys are qualified names (case-insensitively); 256 KiB in all.
fn annotations(annotations: Option<&Value>, path: &FieldPath, out: &mut Vec<Cause>) {
    let Some(map) = annotations.and_then(Value::as_object) else {
        return;
    };
    for key in map.keys() {
        for msg in names::qualified_name(&key.to_lowercase()) {
            out.push(Cause::invalid(path, key.as_str(), &msg));
        }
    }
    let size: usize = map
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size > ANNOTATIONS_MAX_BYTES {
        out.push(Cause::too_long(path, ANNOTATIONS_MAX_BYTES));
    }
}

/// Finalizers are qualified names; unprefixed ones must be the standard ones.
fn finalizers(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    for name in list.iter().filter_map(Value::as_str) {
        for msg in names::qualified_name(name) {
            out.push(Cause::invalid(path, name, &msg));
        }
        if !name.contains('/') && !["kubernetes", "orphan", "foregroundDeletion"].contains(&name) {
            out.push(Cause::invalid(
                path,
                name,
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
}

/// `ValidatePodSpecificAnnotations`, for the annotation a build pod could carry by mistake.
fn pod_annotations(meta: &Value, out: &mut Vec<Cause>) {
    const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
    let Some(cost) = meta["annotations"][DELETION_COST].as_str() else {
        return;
    };
    if cost.trim() != cost || cost.parse::<i32>().is_err() {
        let path = FieldPath::new("metadata")
            .child("annotations")
            .key(DELETION_COST);
        out.push(Cause::invalid(&path, cost, "must be a 32bit integer"));
    }
}

/// `ValidatePodSpec`, in its order.
fn pod_spec(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let volumes = volumes::volumes(spec, &path.child("volumes"), out);
    let ctx = containers::PodContext {
        volumes: &volumes,
        grace_period: int_of(spec, "terminationGracePeriodSeconds").unwrap_or(30),
        host_users: spec
            .get("hostUsers")
            .and_then(Value::as_bool)
            .unwrap_or(true),
    };
    containers::containers(spec, &ctx, &path.child("containers"), out);
    containers::init_containers(spec, &ctx, &path.child("initContainers"), out);
    scheduling::host_network_ports(spec, path, out);
    scheduling::restart_policy(spec, &path.child("restartPolicy"), out);
    scheduling::dns_policy(spec, &path.child("dnsPolicy"), out);
    labels(spec.get("nodeSelector"), &path.child("nodeSelector"), out);
    security::pod_security_context(spec, &path.child("securityContext"), out);
    if let Some(affinity) = spec.get("affinity") {
        scheduling::affinity(affinity, &path.child("affinity"), out);
    }
    scheduling::dns_config(spec, &path.child("dnsConfig"), out);
    scheduling::topology_spread(
        list_of(spec, "topologySpreadConstraints"),
        &path.child("topologySpreadConstraints"),
        out,
    );
    security::host_users(spec, path, out);
    names_of_spec(spec, path, out);
    scheduling::tolerations(
        list_of(spec, "tolerations"),
        &path.child("tolerations"),
        out,
    );
    scheduling::priority_and_runtime(spec, path, out);
    scheduling::os(spec, &path.child("os"), out);
}

/// The spec's names and the deadline: serviceAccountName, nodeName, activeDeadlineSeconds,
/// hostname, subdomain.
fn names_of_spec(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    for field in ["serviceAccountName", "nodeName"] {
        if let Some(name) = str_of(spec, field).filter(|n| !n.is_empty()) {
            for msg in names::dns_subdomain(name) {
                out.push(Cause::invalid(&path.child(field), name, &msg));
            }
        }
    }
    if let Some(deadline) = int_of(spec, "activeDeadlineSeconds")
        && !(1..=i64::from(i32::MAX)).contains(&deadline)
    {
        out.push(Cause::invalid(
            &path.child("activeDeadlineSeconds"),
            deadline,
            &names::inclusive_range_error(1, i64::from(i32::MAX)),
        ));
    }
    for field in ["hostname", "subdomain"] {
        if let Some(name) = str_of(spec, field).filter(|n| !n.is_empty()) {
            for msg in names::dns_label(name) {
                out.push(Cause::invalid(&path.child(field), name, &msg));
            }
        }
    }
}

/// What only a create refuses.
fn create_only(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if !list_of(spec, "ephemeralContainers").is_empty() {
        out.push(Cause::forbidden(
            &path.child("ephemeralContainers"),
            "cannot be set on create",
        ));
    }
    if str_of(spec, "nodeName").is_some_and(|n| !n.is_empty())
        && !list_of(spec, "schedulingGates").is_empty()
    {
        out.push(Cause::forbidden(
            &path.child("nodeName"),
            "cannot be set until all schedulingGates have been cleared",
        ));
    }
}

// --- reading the decoded pod ---

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)?.as_str()
}

fn int_of(v: &Value, key: &str) -> Option<i64> {
    v.get(key)?.as_i64()
}

fn bool_of(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn list_of<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A set field whose value is not the empty string (defaulted fields may be left empty).
fn set_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    str_of(v, key).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
