//! Container resources (`ValidateContainerResourceRequirements`): resource names, quantity
//! values, requests against limits; and the downward API's `resourceFieldRef`.

use serde_json::{Map, Value};

use super::{Cause, FieldPath, names, set_str, str_of};
use crate::kube_api::quantity::Quantity;

/// `standardResources`: the unprefixed names a resource may have at all.
const STANDARD_RESOURCES: [&str; 20] = [
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "pods",
    "resourcequotas",
    "services",
    "replicationcontrollers",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "storage",
    "requests.storage",
    "services.nodeports",
    "services.loadbalancers",
];
/// `standardContainerResources`.
const CONTAINER_RESOURCES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
const HUGEPAGES: &str = "hugepages-";

/// The container resources the downward API exposes (`validContainerResourceFieldPathExpressions`).
const RESOURCE_FIELDS: [&str; 6] = [
    "limits.cpu",
    "limits.ephemeral-storage",
    "limits.memory",
    "requests.cpu",
    "requests.ephemeral-storage",
    "requests.memory",
];
const BYTE_DIVISORS: [&str; 13] = [
    "1", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei",
];
const BYTE_DIVISOR_LIST: &str = "1, 1k, 1M, 1G, 1T, 1P, 1E, 1Ki, 1Mi, 1Gi, 1Ti, 1Pi, 1Ei";

/// A quantity as decoding left it (a string, or a JSON number).
pub(super) fn quantity(v: &Value) -> Option<Quantity> {
    match v {
        Value::String(s) => Quantity::parse(s).ok(),
        Value::Number(n) => Quantity::parse(&n.to_string()).ok(),
        _ => None,
    }
}

/// `validateResourceRequirements` for a container.
pub(super) fn requirements(r: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let empty = Map::new();
    let limits = r.get("limits").and_then(Value::as_object).unwrap_or(&empty);
    let requests = r
        .get("requests")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let (limit_path, request_path) = (path.child("limits"), path.child("requests"));
    for (name, value) in limits {
        let at = limit_path.key(name);
        resource_name(name, &at, out);
        quantity_value(name, value, &at, out);
    }
    for (name, value) in requests {
        let at = request_path.key(name);
        resource_name(name, &at, out);
        quantity_value(name, value, &at, out);
        request_within_limit(
            name,
            value,
            limits.get(name),
            &request_path,
            &limit_path,
            out,
        );
    }
    let names = || limits.keys().chain(requests.keys());
    if names().any(|n| n.starts_with(HUGEPAGES)) && !names().any(|n| n == "cpu" || n == "memory") {
        out.push(Cause::forbidden(path, "HugePages require cpu or memory"));
    }
}

/// `validateContainerResourceName`: a qualified name; unprefixed ones standard container
/// resources, prefixed ones native or extended.
fn resource_name(name: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    let errors = names::qualified_name(name);
    let well_formed = errors.is_empty();
    out.extend(errors.iter().map(|m| Cause::invalid(path, name, m)));
    let prefixed = name.contains('/');
    if well_formed
        && !prefixed
        && !STANDARD_RESOURCES.contains(&name)
        && !name.starts_with(HUGEPAGES)
    {
        out.push(Cause::invalid(
            path,
            name,
            "must be a standard resource type or fully qualified",
        ));
    }
    if !prefixed {
        if !CONTAINER_RESOURCES.contains(&name) && !name.starts_with(HUGEPAGES) {
            out.push(Cause::invalid(
                path,
                name,
                "must be a standard resource for containers",
            ));
        }
    } else if !is_native(name) && !is_extended(name) {
        out.push(Cause::invalid(
            path,
            name,
            "doesn't follow extended resource name standard",
        ));
    }
}

/// `ValidateResourceQuantityValue`: not negative; extended resources whole numbers.
fn quantity_value(name: &str, value: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let Some(q) = quantity(value) else { return };
    if q.is_negative() {
        out.push(Cause::invalid(
            path,
            q.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    if is_extended(name) && !q.is_integer() {
        out.push(Cause::invalid(path, q.to_string(), "must be an integer"));
    }
}

/// A request is at most its limit; resources that cannot be overcommitted need a limit,
/// equal to the request.
fn request_within_limit(
    name: &str,
    request: &Value,
    limit: Option<&Value>,
    request_path: &FieldPath,
    limit_path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    let Some(request) = quantity(request) else {
        return;
    };
    match limit.and_then(quantity) {
        Some(limit) if !overcommit_allowed(name) && request != limit => out.push(Cause::invalid(
            request_path,
            request.to_string(),
            &format!("must be equal to {name} limit of {limit}"),
        )),
        Some(limit) if request > limit => out.push(Cause::invalid(
            request_path,
            request.to_string(),
            &format!("must be less than or equal to {name} limit of {limit}"),
        )),
        None if !overcommit_allowed(name) => out.push(Cause::required(
            limit_path,
            "Limit must be set for non overcommitable resources",
        )),
        _ => {}
    }
}

fn is_native(name: &str) -> bool {
    !name.contains('/') || name.contains("kubernetes.io/")
}

/// `IsExtendedResourceName`: prefixed, not native, and a qualified name as a quota name.
fn is_extended(name: &str) -> bool {
    !is_native(name)
        && !name.starts_with("requests.")
        && names::qualified_name(&format!("requests.{name}")).is_empty()
}

fn overcommit_allowed(name: &str) -> bool {
    is_native(name) && !name.starts_with(HUGEPAGES)
}

/// `validateContainerResourceFieldSelector`: a known resource (a volume file also names its
/// container), and a divisor the resource supports. The server does not check that the
/// container exists.
pub(super) fn field_selector(fs: &Value, volume: bool, path: &FieldPath, out: &mut Vec<Cause>) {
    let resource = str_of(fs, "resource").unwrap_or_default();
    if volume && set_str(fs, "containerName").is_none() {
        out.push(Cause::required(&path.child("containerName"), ""));
    } else if resource.is_empty() {
        out.push(Cause::required(&path.child("resource"), ""));
    } else if !RESOURCE_FIELDS.contains(&resource)
        && !resource.starts_with("requests.hugepages-")
        && !resource.starts_with("limits.hugepages-")
    {
        out.push(Cause::not_supported(
            &path.child("resource"),
            resource,
            &RESOURCE_FIELDS,
        ));
    }
    if let Some(divisor) = fs
        .get("divisor")
        .and_then(quantity)
        .filter(|d| !d.is_zero())
    {
        divisor_of(resource, &divisor.to_string(), &path.child("divisor"), out);
    }
}

/// `validateContainerResourceDivisor`.
fn divisor_of(resource: &str, divisor: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    let (allowed, what): (&[&str], &str) = match resource {
        "limits.cpu" | "requests.cpu" => (&["1m", "1"], "cpu"),
        "limits.memory" | "requests.memory" => (&BYTE_DIVISORS, "memory"),
        "limits.ephemeral-storage" | "requests.ephemeral-storage" => {
            (&BYTE_DIVISORS, "local ephemeral storage")
        }
        r if r.starts_with("requests.hugepages-") || r.starts_with("limits.hugepages-") => {
            (&BYTE_DIVISORS, "hugepages")
        }
        _ => return,
    };
    if allowed.contains(&divisor) {
        return;
    }
    let listed = if what == "cpu" {
        "1m and 1"
    } else {
        BYTE_DIVISOR_LIST
    };
    let detail = format!("only divisor's values {listed} are supported with the {what} resource");
    out.push(Cause::invalid(path, resource, &detail));
}
