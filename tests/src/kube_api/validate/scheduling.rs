//! Where and how a pod runs: restart and DNS policies, affinity, tolerations, topology
//! spread, priority and runtime classes, OS, host network ports.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{BadValue, Cause, FieldPath, bool_of, int_of, labels, list_of, names, set_str, str_of};

const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
const DNS_POLICIES: [&str; 4] = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const TOLERATION_OPERATORS: [&str; 2] = ["Equal", "Exists"];
const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
const WHEN_UNSATISFIABLE: [&str; 2] = ["DoNotSchedule", "ScheduleAnyway"];
const INCLUSION_POLICIES: [&str; 2] = ["Honor", "Ignore"];
const PREEMPTION_POLICIES: [&str; 2] = ["PreemptLowerPriority", "Never"];
const OPERATOR_INVALID: &str = "not a valid selector operator";
const WEIGHT_RANGE: &str = "must be in the range 1-100";

/// restartPolicy (defaulted to `Always`).
pub(super) fn restart_policy(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(policy) = set_str(spec, "restartPolicy").filter(|p| !RESTART_POLICIES.contains(p)) {
        out.push(Cause::not_supported(path, policy, &RESTART_POLICIES));
    }
}

/// dnsPolicy (defaulted to `ClusterFirst`).
pub(super) fn dns_policy(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(policy) = set_str(spec, "dnsPolicy").filter(|p| !DNS_POLICIES.contains(p)) {
        out.push(Cause::not_supported(path, policy, &DNS_POLICIES));
    }
}

/// `validatePodDNSConfig`: policy `None` needs nameservers; bounded lists; named options.
pub(super) fn dns_config(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let config = spec.get("dnsConfig");
    if str_of(spec, "dnsPolicy") == Some("None") {
        let Some(config) = config else {
            out.push(Cause::required(
                path,
                "must provide `dnsConfig` when `dnsPolicy` is None",
            ));
            return;
        };
        if list_of(config, "nameservers").is_empty() {
            out.push(Cause::required(
                &path.child("nameservers"),
                "must provide at least one DNS nameserver when `dnsPolicy` is None",
            ));
            return;
        }
    }
    let Some(config) = config else { return };
    for (field, max, what) in [
        ("nameservers", 3, "nameservers"),
        ("searches", 32, "search paths"),
    ] {
        let list = list_of(config, field);
        if list.len() > max {
            let detail = format!("must not have more than {max} {what}");
            out.push(Cause::invalid(
                &path.child(field),
                BadValue::Json(Value::Array(list.to_vec())),
                &detail,
            ));
        }
    }
    for (i, option) in list_of(config, "options").iter().enumerate() {
        if set_str(option, "name").is_none() {
            out.push(Cause::required(
                &path.child("options").index(i),
                "must not be empty",
            ));
        }
    }
}

/// With hostNetwork, a pod's hostPort (defaulted to containerPort) must equal containerPort.
pub(super) fn host_network_ports(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if !bool_of(spec, "hostNetwork") {
        return;
    }
    for (ci, c) in list_of(spec, "containers").iter().enumerate() {
        for (pi, port) in list_of(c, "ports").iter().enumerate() {
            let host = int_of(port, "hostPort").unwrap_or(0);
            if host != 0 && Some(host) != int_of(port, "containerPort") {
                let at = path
                    .child("containers")
                    .index(ci)
                    .child("ports")
                    .index(pi)
                    .child("hostPort");
                out.push(Cause::invalid(
                    &at,
                    host,
                    "must match `containerPort` when `hostNetwork` is true",
                ));
            }
        }
    }
}

/// `validateAffinity`.
pub(super) fn affinity(affinity: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(node) = affinity.get("nodeAffinity") {
        node_affinity(node, &path.child("nodeAffinity"), out);
    }
    for kind in ["podAffinity", "podAntiAffinity"] {
        if let Some(pod) = affinity.get(kind) {
            pod_affinity(pod, &path.child(kind), out);
        }
    }
}

fn node_affinity(node: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    const REQUIRED: &str = "requiredDuringSchedulingIgnoredDuringExecution";
    const PREFERRED: &str = "preferredDuringSchedulingIgnoredDuringExecution";
    if let Some(selector) = node.get(REQUIRED) {
        let terms_path = path.child(REQUIRED).child("nodeSelectorTerms");
        let terms = list_of(selector, "nodeSelectorTerms");
        if terms.is_empty() {
            out.push(Cause::required(
                &terms_path,
                "must have at least one node selector term",
            ));
        }
        for (i, term) in terms.iter().enumerate() {
            node_selector_term(term, &terms_path.index(i), out);
        }
    }
    for (i, term) in list_of(node, PREFERRED).iter().enumerate() {
        let at = path.child(PREFERRED).index(i);
        weight(term, &at, out);
        node_selector_term(&term["preference"], &at.child("preference"), out);
    }
}

fn weight(term: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let weight = int_of(term, "weight").unwrap_or(0);
    if !(1..=100).contains(&weight) {
        out.push(Cause::invalid(&path.child("weight"), weight, WEIGHT_RANGE));
    }
}

/// `ValidateNodeSelectorTerm`. (Values of required terms are not checked as label values:
/// not every supported release does.)
fn node_selector_term(term: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    for (i, rq) in list_of(term, "matchExpressions").iter().enumerate() {
        node_selector_requirement(rq, &path.child("matchExpressions").index(i), out);
    }
    for (i, rq) in list_of(term, "matchFields").iter().enumerate() {
        node_field_requirement(rq, &path.child("matchFields").index(i), out);
    }
}

/// `ValidateNodeSelectorRequirement`: values as the operator needs them; a qualified key.
fn node_selector_requirement(rq: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let values = list_of(rq, "values").len();
    let values_path = path.child("values");
    match str_of(rq, "operator").unwrap_or_default() {
        "In" | "NotIn" if values == 0 => out.push(Cause::required(
            &values_path,
            "must be specified when `operator` is 'In' or 'NotIn'",
        )),
        "Exists" | "DoesNotExist" if values > 0 => out.push(Cause::forbidden(
            &values_path,
            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
        )),
        "Gt" | "Lt" if values != 1 => out.push(Cause::required(
            &values_path,
            "must be specified single value when `operator` is 'Lt' or 'Gt'",
        )),
        "In" | "NotIn" | "Exists" | "DoesNotExist" | "Gt" | "Lt" => {}
        other => out.push(Cause::invalid(
            &path.child("operator"),
            other,
            OPERATOR_INVALID,
        )),
    }
    label_name(
        str_of(rq, "key").unwrap_or_default(),
        &path.child("key"),
        out,
    );
}

/// `ValidateNodeFieldSelectorRequirement`: only `metadata.name`, with one node name.
fn node_field_requirement(rq: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let values = list_of(rq, "values");
    match str_of(rq, "operator").unwrap_or_default() {
        "In" | "NotIn" if values.len() != 1 => out.push(Cause::required(
            &path.child("values"),
            "must be only one value when `operator` is 'In' or 'NotIn' for node field selector",
        )),
        "In" | "NotIn" => {}
        other => out.push(Cause::invalid(
            &path.child("operator"),
            other,
            OPERATOR_INVALID,
        )),
    }
    let key = str_of(rq, "key").unwrap_or_default();
    if key != "metadata.name" {
        out.push(Cause::invalid(
            &path.child("key"),
            key,
            "not a valid field selector key",
        ));
        return;
    }
    for (i, value) in values.iter().filter_map(Value::as_str).enumerate() {
        for msg in names::dns_subdomain(value) {
            out.push(Cause::invalid(&path.child("values").index(i), value, &msg));
        }
    }
}

fn label_name(key: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    for msg in names::qualified_name(key) {
        out.push(Cause::invalid(path, key, &msg));
    }
}

/// `validatePodAffinity` / `validatePodAntiAffinity`.
fn pod_affinity(pod: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    const REQUIRED: &str = "requiredDuringSchedulingIgnoredDuringExecution";
    const PREFERRED: &str = "preferredDuringSchedulingIgnoredDuringExecution";
    for (i, term) in list_of(pod, REQUIRED).iter().enumerate() {
        pod_affinity_term(term, &path.child(REQUIRED).index(i), out);
    }
    for (i, term) in list_of(pod, PREFERRED).iter().enumerate() {
        let at = path.child(PREFERRED).index(i);
        weight(term, &at, out);
        pod_affinity_term(&term["podAffinityTerm"], &at.child("podAffinityTerm"), out);
    }
}

/// `validatePodAffinityTerm`: selectors, namespace names, a topology key.
fn pod_affinity_term(term: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    for selector in ["labelSelector", "namespaceSelector"] {
        if let Some(s) = term.get(selector) {
            label_selector(s, &path.child(selector), out);
        }
    }
    for ns in list_of(term, "namespaces").iter().filter_map(Value::as_str) {
        for msg in names::dns_label(ns) {
            out.push(Cause::invalid(&path.child("namespace"), ns, &msg));
        }
    }
    let key = str_of(term, "topologyKey").unwrap_or_default();
    if key.is_empty() {
        out.push(Cause::required(
            &path.child("topologyKey"),
            "can not be empty",
        ));
    }
    label_name(key, &path.child("topologyKey"), out);
}

/// `ValidateLabelSelector`.
fn label_selector(selector: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    labels(selector.get("matchLabels"), &path.child("matchLabels"), out);
    for (i, rq) in list_of(selector, "matchExpressions").iter().enumerate() {
        let at = path.child("matchExpressions").index(i);
        let values = list_of(rq, "values").len();
        match str_of(rq, "operator").unwrap_or_default() {
            "In" | "NotIn" if values == 0 => out.push(Cause::required(
                &at.child("values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if values > 0 => out.push(Cause::forbidden(
                &at.child("values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push(Cause::invalid(
                &at.child("operator"),
                other,
                OPERATOR_INVALID,
            )),
        }
        label_name(str_of(rq, "key").unwrap_or_default(), &at.child("key"), out);
    }
}

/// `ValidateTolerations`.
pub(super) fn tolerations(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    for (i, t) in list.iter().enumerate() {
        toleration(t, &path.index(i), out);
    }
}

fn toleration(t: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let key = str_of(t, "key").unwrap_or_default();
    let operator = str_of(t, "operator").unwrap_or_default();
    let value = str_of(t, "value").unwrap_or_default();
    let effect = str_of(t, "effect").unwrap_or_default();
    let operator_path = path.child("operator");
    if !key.is_empty() {
        label_name(key, &path.child("key"), out);
    }
    if key.is_empty() && operator != "Exists" {
        out.push(Cause::invalid(
            &operator_path,
            operator,
            "operator must be Exists when `key` is empty, which means \"match all values and all keys\"",
        ));
    }
    if t.get("tolerationSeconds").is_some() && effect != "NoExecute" {
        out.push(Cause::invalid(
            &path.child("effect"),
            effect,
            "effect must be 'NoExecute' when `tolerationSeconds` is set",
        ));
    }
    match operator {
        "Equal" | "" => {
            let errors = names::label_value(value);
            if !errors.is_empty() {
                out.push(Cause::invalid(&operator_path, value, &errors.join(";")));
            }
        }
        "Exists" if !value.is_empty() => out.push(Cause::invalid(
            &operator_path,
            value,
            "value must be empty when `operator` is 'Exists'",
        )),
        "Exists" => {}
        other => out.push(Cause::not_supported(
            &operator_path,
            other,
            &TOLERATION_OPERATORS,
        )),
    }
    if !effect.is_empty() && !TAINT_EFFECTS.contains(&effect) {
        out.push(Cause::not_supported(
            &path.child("effect"),
            effect,
            &TAINT_EFFECTS,
        ));
    }
}

/// `validateTopologySpreadConstraints`.
pub(super) fn topology_spread(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    let mut seen = BTreeSet::new();
    for (i, c) in list.iter().enumerate() {
        let at = path.index(i);
        let skew = int_of(c, "maxSkew").unwrap_or(0);
        if skew <= 0 {
            out.push(Cause::invalid(
                &at.child("maxSkew"),
                skew,
                "must be greater than zero",
            ));
        }
        let key = str_of(c, "topologyKey").unwrap_or_default();
        if key.is_empty() {
            out.push(Cause::required(
                &at.child("topologyKey"),
                "can not be empty",
            ));
        }
        let action = str_of(c, "whenUnsatisfiable").unwrap_or_default();
        if !WHEN_UNSATISFIABLE.contains(&action) {
            out.push(Cause::not_supported(
                &at.child("whenUnsatisfiable"),
                action,
                &WHEN_UNSATISFIABLE,
            ));
        }
        if !seen.insert((key, action)) {
            out.push(Cause::duplicate(
                &at.child("{topologyKey, whenUnsatisfiable}"),
                format!("{{{key}, {action}}}"),
            ));
        }
        for field in ["nodeAffinityPolicy", "nodeTaintsPolicy"] {
            if let Some(policy) = str_of(c, field).filter(|p| !INCLUSION_POLICIES.contains(p)) {
                out.push(Cause::not_supported(
                    &at.child(field),
                    policy,
                    &INCLUSION_POLICIES,
                ));
            }
        }
        if let Some(selector) = c.get("labelSelector") {
            label_selector(selector, &at.child("labelSelector"), out);
        }
    }
}

/// priorityClassName, runtimeClassName (a DNS subdomain whenever set) and preemptionPolicy.
pub(super) fn priority_and_runtime(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(name) = set_str(spec, "priorityClassName") {
        subdomain(name, &path.child("priorityClassName"), out);
    }
    if let Some(name) = str_of(spec, "runtimeClassName") {
        subdomain(name, &path.child("runtimeClassName"), out);
    }
    match str_of(spec, "preemptionPolicy") {
        Some("") => out.push(Cause::required(&path.child("preemptionPolicy"), "")),
        Some(policy) if !PREEMPTION_POLICIES.contains(&policy) => {
            out.push(Cause::not_supported(
                &path.child("preemptionPolicy"),
                policy,
                &PREEMPTION_POLICIES,
            ));
        }
        _ => {}
    }
}

fn subdomain(name: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    for msg in names::dns_subdomain(name) {
        out.push(Cause::invalid(path, name, &msg));
    }
}

/// `validateOS`.
pub(super) fn os(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let Some(os) = spec.get("os") else { return };
    match str_of(os, "name").unwrap_or_default() {
        "" => out.push(Cause::required(&path.child("name"), "cannot be empty")),
        "linux" | "windows" => {}
        other => out.push(Cause::not_supported(path, other, &["linux", "windows"])),
    }
}
