//! Decoding a pod body as kube-apiserver does before it validates anything: JSON null is a
//! field's zero value, a value of the wrong type or an unparsable quantity is a decode error
//! (400), and unknown fields follow the request's `fieldValidation` directive (`Strict`: 400,
//! `Warn` (the default): dropped with a `Warning` header each, `Ignore`: dropped).
//!
//! Which fields exist, and their types, come from `k8s_openapi`'s `Pod`: a field present in
//! the body but absent after a round trip through it is unknown.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use super::quantity::Quantity;
use super::status;
use super::validate::{Cause, FieldPath};

/// The `fieldValidation` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Strict,
    Warn,
    Ignore,
}

impl Directive {
    /// The directive a request asks for (`Warn` when it asks for none); an unknown one is the
    /// server's 422 on the request's options.
    pub fn from_param(value: Option<&str>) -> Result<Self, Value> {
        match value.unwrap_or_default() {
            "" | "Warn" => Ok(Self::Warn),
            "Strict" => Ok(Self::Strict),
            "Ignore" => Ok(Self::Ignore),
            other => {
                let cause = Cause::not_supported(
                    &FieldPath::new("fieldValidation"),
                    other,
                    &["", "Ignore", "Strict", "Warn"],
                );
                Err(status::invalid(
                    "meta.k8s.io",
                    "CreateOptions",
                    "",
                    &[cause],
                ))
            }
        }
    }
}

/// A decoded pod body: what the server keeps of it, and the warnings it answers with.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub pod: Value,
    pub warnings: Vec<String>,
}

/// One step of a path into the body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Field(String),
    Index(usize),
}

/// Decodes a pod body (a JSON object); the error is the decode error's text, which the server
/// answers as `Pod in version "v1" cannot be handled as a Pod: <error>`.
pub fn decode_pod(body: Value, directive: Directive) -> Result<Decoded, String> {
    let mut pod = without_nulls(body);
    let typed_input = with_type_meta(&pod);
    let typed: Pod =
        serde_path_to_error::deserialize(&typed_input).map_err(|e| type_error(&typed_input, &e))?;
    if let Some(error) = quantity_error(&pod) {
        return Err(error.to_owned());
    }
    let known = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_fields(&typed_input, &known, &mut Vec::new(), &mut unknown);
    let messages: Vec<String> = unknown
        .iter()
        .map(|path| format!("unknown field \"{}\"", render(path)))
        .collect();
    if directive == Directive::Strict && !messages.is_empty() {
        return Err(format!("strict decoding error: {}", messages.join(", ")));
    }
    for path in &unknown {
        remove_at(&mut pod, path);
    }
    let warnings = match directive {
        Directive::Warn => messages,
        _ => Vec::new(),
    };
    Ok(Decoded { pod, warnings })
}

/// JSON null decodes as the field's zero value: drop null members everywhere.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// The request's URL names the kind: a body may leave apiVersion and kind out.
fn with_type_meta(pod: &Value) -> Value {
    let mut typed = pod.clone();
    if let Some(map) = typed.as_object_mut() {
        map.entry("apiVersion").or_insert_with(|| Value::from("v1"));
        map.entry("kind").or_insert_with(|| Value::from("Pod"));
    }
    typed
}

// --- type errors ---

/// Go's `json: cannot unmarshal <kind> into Go struct field <Struct>.<path> of type <type>`.
fn type_error(input: &Value, error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner().to_string();
    let steps: Vec<Step> = error.path().iter().filter_map(step).collect();
    let expected = inner.rsplit_once(", expected ").map(|(_, e)| e);
    let is_type_error = inner.starts_with("invalid type:") || inner.starts_with("invalid value:");
    let (Some(expected), true) = (expected, is_type_error) else {
        return inner;
    };
    if matches!(steps.as_slice(), [Step::Field(f)] if f == "apiVersion" || f == "kind") {
        return inner;
    }
    let go_type = go_type(expected, input, &steps);
    let kind = value_kind(get_at(input, &steps), &go_type);
    let (owner, field) = owning_struct(input, &steps);
    format!("json: cannot unmarshal {kind} into Go struct field {owner}.{field} of type {go_type}")
}

fn step(segment: &Segment) -> Option<Step> {
    match segment {
        Segment::Seq { index } => Some(Step::Index(*index)),
        Segment::Map { key } => Some(Step::Field(key.clone())),
        _ => None,
    }
}

/// The struct holding the failing field, and the field's dotted JSON path (list indices and
/// map keys left out, as Go prints it).
fn owning_struct(input: &Value, steps: &[Step]) -> (String, String) {
    let mut end = steps.len();
    while end > 0 {
        match &steps[end - 1] {
            Step::Index(_) => end -= 1,
            Step::Field(_) => match expected_at(input, &steps[..end - 1], Value::from("")) {
                Some(parent) if parent == "a map" => end -= 1,
                Some(parent) => return (parent, dotted(&steps[..end])),
                None => break,
            },
        }
    }
    ("Pod".to_owned(), dotted(&steps[..end]))
}

fn dotted(steps: &[Step]) -> String {
    let fields: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Field(f) => Some(f.as_str()),
            Step::Index(_) => None,
        })
        .collect();
    fields.join(".")
}

/// The Go type of the failing field, from what serde expected there (a list's or map's
/// element type found by probing one level down).
fn go_type(expected: &str, input: &Value, steps: &[Step]) -> String {
    match expected {
        "a sequence" => {
            let probe = Value::Array(vec![Value::Array(Vec::new())]);
            let element = expected_inside(input, steps, probe, Step::Index(0));
            format!(
                "[]{}",
                element.map_or_else(|| "string".to_owned(), |e| go_named_type(&e))
            )
        }
        "a map" => {
            let probe = Value::Object(Map::from_iter([("k".to_owned(), Value::Array(Vec::new()))]));
            match expected_inside(input, steps, probe, Step::Field("k".to_owned())).as_deref() {
                Some("Quantity") => "v1.ResourceList".to_owned(),
                Some(element) => format!("map[string]{}", go_named_type(element)),
                None => "map[string]string".to_owned(),
            }
        }
        other => go_named_type(other),
    }
}

/// Go's name for a type serde describes as `expected`.
fn go_named_type(expected: &str) -> String {
    match expected {
        "i64" => "int64",
        "i32" => "int32",
        "u64" => "uint64",
        "u32" => "uint32",
        "f64" => "float64",
        "a boolean" => "bool",
        "a string" => "string",
        "a sequence" => "[]interface {}",
        "a map" => "map[string]interface {}",
        "Quantity" => "resource.Quantity",
        "IntOrString" => "intstr.IntOrString",
        named => return format!("v1.{named}"),
    }
    .to_owned()
}

/// What serde expects at `steps` (a struct's name, `a map`, `i64`, ...), found by putting
/// `probe` (a value of the wrong type) there.
fn expected_at(input: &Value, steps: &[Step], probe: Value) -> Option<String> {
    let mut probed = input.clone();
    set_at(&mut probed, steps, probe)?;
    let error = serde_path_to_error::deserialize::<_, Pod>(&probed).err()?;
    let at: Vec<Step> = error.path().iter().filter_map(step).collect();
    if at != steps {
        return None;
    }
    let text = error.inner().to_string();
    text.rsplit_once(", expected ").map(|(_, e)| e.to_owned())
}

/// Like [`expected_at`], for the element one `inner` step below `steps`.
fn expected_inside(input: &Value, steps: &[Step], probe: Value, inner: Step) -> Option<String> {
    let mut probed = input.clone();
    set_at(&mut probed, steps, probe)?;
    let mut below = steps.to_vec();
    below.push(inner);
    let error = serde_path_to_error::deserialize::<_, Pod>(&probed).err()?;
    let at: Vec<Step> = error.path().iter().filter_map(step).collect();
    if at != below {
        return None;
    }
    let text = error.inner().to_string();
    text.rsplit_once(", expected ").map(|(_, e)| e.to_owned())
}

/// How Go names the JSON value it could not store (`number 1.5` for a number an integer
/// field cannot hold).
fn value_kind(value: Option<&Value>, go_type: &str) -> String {
    match value {
        Some(Value::String(_)) => "string".to_owned(),
        Some(Value::Bool(_)) => "bool".to_owned(),
        Some(Value::Array(_)) => "array".to_owned(),
        Some(Value::Object(_)) => "object".to_owned(),
        Some(Value::Number(n)) if go_type.starts_with("int") || go_type.starts_with("uint") => {
            format!("number {n}")
        }
        Some(Value::Number(_)) => "number".to_owned(),
        Some(Value::Null) | None => "null".to_owned(),
    }
}

// --- quantities ---

/// The first quantity in the pod that does not parse (the server fails decoding on it).
fn quantity_error(pod: &Value) -> Option<&'static str> {
    let mut values: Vec<&Value> = Vec::new();
    let spec = &pod["spec"];
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in items(spec, list) {
            values.extend(resource_lists(&c["resources"]));
            values.extend(
                items(c, "env")
                    .iter()
                    .map(|e| &e["valueFrom"]["resourceFieldRef"]["divisor"]),
            );
        }
    }
    values.extend(resource_lists(&spec["resources"]));
    values.extend(
        spec["overhead"]
            .as_object()
            .into_iter()
            .flat_map(Map::values),
    );
    for volume in items(spec, "volumes") {
        values.push(&volume["emptyDir"]["sizeLimit"]);
        values.extend(resource_lists(
            &volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"],
        ));
        let mut files: Vec<&Value> = items(&volume["downwardAPI"], "items").iter().collect();
        for source in items(&volume["projected"], "sources") {
            files.extend(items(&source["downwardAPI"], "items"));
        }
        values.extend(files.iter().map(|f| &f["resourceFieldRef"]["divisor"]));
    }
    values.into_iter().find_map(|v| {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Quantity::parse(&text).err()
    })
}

fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn resource_lists(resources: &Value) -> impl Iterator<Item = &Value> {
    ["limits", "requests"]
        .into_iter()
        .filter_map(|k| resources.get(k)?.as_object())
        .flat_map(Map::values)
}

// --- unknown fields ---

/// Paths present in `input` but absent from `known` (the same body after a round trip).
fn unknown_fields(input: &Value, known: &Value, at: &mut Vec<Step>, found: &mut Vec<Vec<Step>>) {
    match (input, known) {
        (Value::Object(input), Value::Object(known)) => {
            for (key, value) in input {
                at.push(Step::Field(key.clone()));
                match known.get(key) {
                    Some(k) => unknown_fields(value, k, at, found),
                    None => found.push(at.clone()),
                }
                at.pop();
            }
        }
        (Value::Array(input), Value::Array(known)) => {
            for (i, (value, k)) in input.iter().zip(known).enumerate() {
                at.push(Step::Index(i));
                unknown_fields(value, k, at, found);
                at.pop();
            }
        }
        _ => {}
    }
}

/// `spec.containers[0].foo`.
fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Field(f) if out.is_empty() => out.push_str(f),
            Step::Field(f) => {
                out.push('.');
                out.push_str(f);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn get_at<'a>(value: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(value, |v, s| match s {
        Step::Field(f) => v.get(f),
        Step::Index(i) => v.get(i),
    })
}

fn get_at_mut<'a>(value: &'a mut Value, steps: &[Step]) -> Option<&'a mut Value> {
    steps.iter().try_fold(value, |v, s| match s {
        Step::Field(f) => v.get_mut(f),
        Step::Index(i) => v.get_mut(i),
    })
}

fn set_at(value: &mut Value, steps: &[Step], new: Value) -> Option<()> {
    *get_at_mut(value, steps)? = new;
    Some(())
}

fn remove_at(value: &mut Value, steps: &[Step]) {
    let Some((Step::Field(last), parent)) = steps.split_last() else {
        return;
    };
    if let Some(map) = get_at_mut(value, parent).and_then(Value::as_object_mut) {
        map.remove(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec_extra: Value) -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        });
        if let (Some(spec), Value::Object(extra)) = (pod["spec"].as_object_mut(), spec_extra) {
            spec.extend(extra);
        }
        pod
    }

    #[test]
    fn unknown_fields_follow_the_directive() {
        let mut body = pod(json!({"foo": 1}));
        body["spec"]["containers"][0]["bar"] = json!(true);
        assert_eq!(
            decode_pod(body.clone(), Directive::Strict).unwrap_err(),
            "strict decoding error: unknown field \"spec.containers[0].bar\", unknown field \"spec.foo\""
        );
        let warned = decode_pod(body.clone(), Directive::Warn).unwrap();
        assert_eq!(
            warned.warnings,
            [
                "unknown field \"spec.containers[0].bar\"",
                "unknown field \"spec.foo\""
            ]
        );
        assert!(warned.pod["spec"].get("foo").is_none());
        assert!(warned.pod["spec"]["containers"][0].get("bar").is_none());
        let ignored = decode_pod(body, Directive::Ignore).unwrap();
        assert!(ignored.warnings.is_empty());
        assert!(ignored.pod["spec"].get("foo").is_none());
    }

    #[test]
    fn known_fields_and_nulls_are_kept_or_zero() {
        let body = pod(
            json!({"nodeName": null, "restartPolicy": "Never", "volumes": [{"name": "v", "emptyDir": {}}]}),
        );
        let decoded = decode_pod(body, Directive::Strict).unwrap();
        assert!(decoded.warnings.is_empty());
        assert!(decoded.pod["spec"].get("nodeName").is_none());
        assert_eq!(decoded.pod["spec"]["volumes"][0]["emptyDir"], json!({}));
        let bare =
            json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": []}});
        assert!(
            decode_pod(bare, Directive::Strict).is_ok(),
            "apiVersion and kind come from the URL"
        );
    }

    #[test]
    fn type_errors_read_like_gos() {
        let error = decode_pod(
            pod(json!({"activeDeadlineSeconds": "soon"})),
            Directive::Warn,
        )
        .unwrap_err();
        assert_eq!(
            error,
            "json: cannot unmarshal string into Go struct field PodSpec.spec.activeDeadlineSeconds of type int64"
        );
        let mut labels = pod(json!({}));
        labels["metadata"]["labels"] = json!({"app": 3});
        assert_eq!(
            decode_pod(labels, Directive::Warn).unwrap_err(),
            "json: cannot unmarshal number into Go struct field ObjectMeta.metadata.labels of type string"
        );
        let mut privileged = pod(json!({}));
        privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": "yes"});
        assert_eq!(
            decode_pod(privileged, Directive::Warn).unwrap_err(),
            "json: cannot unmarshal string into Go struct field SecurityContext.spec.containers.securityContext.privileged of type bool"
        );
        let mut command = pod(json!({}));
        command["spec"]["containers"][0]["command"] = json!(["sh", 1]);
        assert_eq!(
            decode_pod(command, Directive::Warn).unwrap_err(),
            "json: cannot unmarshal number into Go struct field Container.spec.containers.command of type string"
        );
        let ports = pod(json!({"containers": [{"name": "c", "image": "i", "ports": "80"}]}));
        assert_eq!(
            decode_pod(ports, Directive::Warn).unwrap_err(),
            "json: cannot unmarshal string into Go struct field Container.spec.containers.ports of type []v1.ContainerPort"
        );
        let fraction = pod(json!({"activeDeadlineSeconds": 1.5}));
        assert_eq!(
            decode_pod(fraction, Directive::Warn).unwrap_err(),
            "json: cannot unmarshal number 1.5 into Go struct field PodSpec.spec.activeDeadlineSeconds of type int64"
        );
    }

    #[test]
    fn bad_quantities_fail_decoding() {
        let mut body = pod(json!({}));
        body["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "lots"}});
        assert_eq!(
            decode_pod(body.clone(), Directive::Warn).unwrap_err(),
            super::super::quantity::FORMAT_WRONG
        );
        body["spec"]["containers"][0]["resources"] = json!({"requests": {"memory": "32MMi"}});
        assert_eq!(
            decode_pod(body.clone(), Directive::Warn).unwrap_err(),
            super::super::quantity::BAD_SUFFIX
        );
        body["spec"]["containers"][0]["resources"] =
            json!({"requests": {"memory": 64, "cpu": "1.5"}});
        assert!(decode_pod(body, Directive::Warn).is_ok());
    }

    #[test]
    fn directives() {
        assert_eq!(Directive::from_param(None).unwrap(), Directive::Warn);
        assert_eq!(
            Directive::from_param(Some("Strict")).unwrap(),
            Directive::Strict
        );
        assert_eq!(
            Directive::from_param(Some("Ignore")).unwrap(),
            Directive::Ignore
        );
        let refused = Directive::from_param(Some("strict")).unwrap_err();
        assert_eq!(refused["code"], 422);
        assert_eq!(
            refused["message"],
            "CreateOptions.meta.k8s.io \"\" is invalid: fieldValidation: Unsupported value: \"strict\": supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
        );
    }
}
