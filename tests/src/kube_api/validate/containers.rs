//! Containers and init containers (`validateContainers`, `validateInitContainers`,
//! `validateContainerCommon`): names, images, ports, env, mounts, pull policy, resources,
//! security context, lifecycle handlers and probes.

use std::collections::BTreeSet;

use serde_json::Value;

use super::volumes::{VolumeKind, Volumes, local_descending_path};
use super::{
    BadValue, Cause, FieldPath, bool_of, int_of, list_of, names, resources, security, set_str,
    str_of,
};

/// What container validation needs from the rest of the pod.
pub(super) struct PodContext<'a> {
    pub volumes: &'a Volumes,
    /// terminationGracePeriodSeconds, defaulted to 30.
    pub grace_period: i64,
    /// `spec.hostUsers`, defaulted to true.
    pub host_users: bool,
}

const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];
const PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];
const MESSAGE_POLICIES: [&str; 2] = ["File", "FallbackToLogsOnError"];
const PROBES: [&str; 3] = ["livenessProbe", "readinessProbe", "startupProbe"];
const INIT_ONLY_WITH_ALWAYS: &str =
    "may not be set for init containers without restartPolicy=Always";

/// `spec.containers`: required, each valid, names unique, host ports unique.
pub(super) fn containers(spec: &Value, ctx: &PodContext, path: &FieldPath, out: &mut Vec<Cause>) {
    let list = list_of(spec, "containers");
    if list.is_empty() {
        out.push(Cause::required(path, ""));
        return;
    }
    let mut seen = BTreeSet::new();
    for (i, c) in list.iter().enumerate() {
        let at = path.index(i);
        common(c, ctx, &at, out);
        let name = str_of(c, "name").unwrap_or_default();
        if !seen.insert(name) {
            out.push(Cause::duplicate(&at.child("name"), name));
        }
        if let Some(lifecycle) = c.get("lifecycle") {
            lifecycle_handlers(lifecycle, ctx.grace_period, &at.child("lifecycle"), out);
        }
        probes(c, ctx.grace_period, &at, out);
        if c.get("restartPolicy").is_some() {
            out.push(Cause::forbidden(
                &at.child("restartPolicy"),
                "may not be set for non-init containers",
            ));
        }
    }
    host_port_conflicts(list, path, out);
}

/// `spec.initContainers`: names unique across both lists; lifecycle and probes only for
/// restartable (sidecar) init containers.
pub(super) fn init_containers(
    spec: &Value,
    ctx: &PodContext,
    path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    let mut seen: BTreeSet<&str> = list_of(spec, "containers")
        .iter()
        .map(|c| str_of(c, "name").unwrap_or_default())
        .collect();
    for (i, c) in list_of(spec, "initContainers").iter().enumerate() {
        let at = path.index(i);
        common(c, ctx, &at, out);
        let always = init_restart_policy(c, &at.child("restartPolicy"), out);
        let name = str_of(c, "name").unwrap_or_default();
        if seen.contains(name) {
            out.push(Cause::duplicate(&at.child("name"), name));
        } else if !name.is_empty() {
            seen.insert(name);
        }
        host_port_conflicts(std::slice::from_ref(c), path, out);
        if always {
            if let Some(lifecycle) = c.get("lifecycle") {
                lifecycle_handlers(lifecycle, ctx.grace_period, &at.child("lifecycle"), out);
            }
            probes(c, ctx.grace_period, &at, out);
        } else {
            for field in std::iter::once("lifecycle").chain(PROBES) {
                if c.get(field).is_some() {
                    out.push(Cause::forbidden(&at.child(field), INIT_ONLY_WITH_ALWAYS));
                }
            }
        }
    }
}

/// An init container's restartPolicy may only be `Always`; true when it is.
fn init_restart_policy(c: &Value, path: &FieldPath, out: &mut Vec<Cause>) -> bool {
    match str_of(c, "restartPolicy") {
        None => false,
        Some("Always") => true,
        Some(other) => {
            out.push(Cause::not_supported(path, other, &["Always"]));
            false
        }
    }
}

/// `validateContainerOnlyForPod`: no whitespace around an image.
pub(super) fn image_whitespace(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    for (i, c) in list.iter().enumerate() {
        let image = str_of(c, "image").unwrap_or_default();
        if image.trim() != image {
            out.push(Cause::invalid(
                &path.index(i).child("image"),
                image,
                "must not have leading or trailing whitespace",
            ));
        }
    }
}

/// `validateContainerCommon`, in its order.
fn common(c: &Value, ctx: &PodContext, path: &FieldPath, out: &mut Vec<Cause>) {
    match str_of(c, "name").unwrap_or_default() {
        "" => out.push(Cause::required(&path.child("name"), "")),
        name => {
            for msg in names::dns_label(name) {
                out.push(Cause::invalid(&path.child("name"), name, &msg));
            }
        }
    }
    if str_of(c, "image").unwrap_or_default().is_empty() {
        out.push(Cause::required(&path.child("image"), ""));
    }
    one_of(c, "terminationMessagePolicy", &MESSAGE_POLICIES, path, out);
    ports(list_of(c, "ports"), &path.child("ports"), out);
    env(list_of(c, "env"), &path.child("env"), out);
    env_from(list_of(c, "envFrom"), &path.child("envFrom"), out);
    let privileged = bool_of(&c["securityContext"], "privileged");
    volume_mounts(
        list_of(c, "volumeMounts"),
        ctx.volumes,
        privileged,
        &path.child("volumeMounts"),
        out,
    );
    one_of(c, "imagePullPolicy", &PULL_POLICIES, path, out);
    if let Some(r) = c.get("resources") {
        resources::requirements(r, &path.child("resources"), out);
    }
    if let Some(sc) = c.get("securityContext") {
        security::container_security_context(
            sc,
            ctx.host_users,
            &path.child("securityContext"),
            out,
        );
    }
}

/// A defaulted enum field: empty or absent is fine, anything else must be supported.
fn one_of(v: &Value, field: &str, supported: &[&str], path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(value) = set_str(v, field)
        && !supported.contains(&value)
    {
        out.push(Cause::not_supported(&path.child(field), value, supported));
    }
}

/// `validateContainerPorts`.
fn ports(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    let mut names_seen = BTreeSet::new();
    for (i, port) in list.iter().enumerate() {
        let at = path.index(i);
        if let Some(name) = set_str(port, "name") {
            let errors = names::port_name(name);
            if !errors.is_empty() {
                out.extend(
                    errors
                        .iter()
                        .map(|m| Cause::invalid(&at.child("name"), name, m)),
                );
            } else if !names_seen.insert(name) {
                out.push(Cause::duplicate(&at.child("name"), name));
            }
        }
        match int_of(port, "containerPort").unwrap_or(0) {
            0 => out.push(Cause::required(&at.child("containerPort"), "")),
            n => port_number(n, &at.child("containerPort"), out),
        }
        if let Some(host) = int_of(port, "hostPort").filter(|p| *p != 0) {
            port_number(host, &at.child("hostPort"), out);
        }
        one_of(port, "protocol", &PROTOCOLS, &at, out);
    }
}

fn port_number(n: i64, path: &FieldPath, out: &mut Vec<Cause>) {
    if !(1..=65535).contains(&n) {
        out.push(Cause::invalid(
            path,
            n,
            &names::inclusive_range_error(1, 65535),
        ));
    }
}

/// `AccumulateUniqueHostPorts`: a `protocol/hostIP/port` once per pod.
fn host_port_conflicts(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    let mut seen = BTreeSet::new();
    for (ci, c) in list.iter().enumerate() {
        for (pi, port) in list_of(c, "ports").iter().enumerate() {
            let Some(host) = int_of(port, "hostPort").filter(|p| *p != 0) else {
                continue;
            };
            let protocol = set_str(port, "protocol").unwrap_or("TCP");
            let ip = str_of(port, "hostIP").unwrap_or_default();
            let key = format!("{protocol}/{ip}/{host}");
            if !seen.insert(key.clone()) {
                let at = path.index(ci).child("ports").index(pi).child("hostPort");
                out.push(Cause::duplicate(&at, key));
            }
        }
    }
}

/// The downward API fields an env var may read (`validEnvDownwardAPIFieldPathExpressions`).
const ENV_FIELDS: [&str; 9] = [
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];

/// `ValidateEnv`: names, and `valueFrom` (duplicate names are allowed).
fn env(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    for (i, var) in list.iter().enumerate() {
        let at = path.index(i);
        match str_of(var, "name").unwrap_or_default() {
            "" => out.push(Cause::required(&at.child("name"), "")),
            name => {
                for msg in names::env_var_name(name) {
                    out.push(Cause::invalid(&at.child("name"), name, &msg));
                }
            }
        }
        if let Some(from) = var.get("valueFrom") {
            value_from(var, from, &at.child("valueFrom"), out);
        }
    }
}

/// `validateEnvVarValueFrom`: exactly one source, and no `value` beside it.
fn value_from(var: &Value, from: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let mut sources = 0;
    if let Some(fs) = from.get("fieldRef") {
        sources += 1;
        object_field_selector(fs, &ENV_FIELDS, &path.child("fieldRef"), out);
    }
    if let Some(rs) = from.get("resourceFieldRef") {
        sources += 1;
        resources::field_selector(rs, false, &path.child("resourceFieldRef"), out);
    }
    for source in ["configMapKeyRef", "secretKeyRef"] {
        if let Some(selector) = from.get(source) {
            sources += 1;
            key_selector(selector, &path.child(source), out);
        }
    }
    let detail = if sources == 0 {
        "must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`"
    } else if set_str(var, "value").is_some() {
        "may not be specified when `value` is not empty"
    } else if sources > 1 {
        "may not have more than one field specified at a time"
    } else {
        return;
    };
    out.push(Cause::invalid(path, "", detail));
}

/// `validateObjectFieldSelector`: apiVersion `v1` (the default), a field path the downward
/// API converts, and one of `allowed` (labels and annotations only with a subscript).
pub(super) fn object_field_selector(
    fs: &Value,
    allowed: &[&str],
    path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    let version = set_str(fs, "apiVersion").unwrap_or("v1");
    let field_path = str_of(fs, "fieldPath").unwrap_or_default();
    if field_path.is_empty() {
        out.push(Cause::required(&path.child("fieldPath"), ""));
        return;
    }
    let internal = match convert_field_label(version, field_path) {
        Ok(internal) => internal,
        Err(e) => {
            let detail = format!("error converting fieldPath: {e}");
            out.push(Cause::invalid(
                &path.child("fieldPath"),
                field_path,
                &detail,
            ));
            return;
        }
    };
    match split_subscript(&internal) {
        Some(("metadata.annotations", key)) => {
            let key = key.to_lowercase();
            for msg in names::qualified_name(&key) {
                out.push(Cause::invalid(path, key.as_str(), &msg));
            }
        }
        Some(("metadata.labels", key)) => {
            for msg in names::qualified_name(key) {
                out.push(Cause::invalid(path, key, &msg));
            }
        }
        Some((other, _)) => out.push(Cause::invalid(path, other, "does not support subscript")),
        None if !allowed.contains(&internal.as_str()) => {
            out.push(Cause::not_supported(
                &path.child("fieldPath"),
                internal.as_str(),
                allowed,
            ));
        }
        None => {}
    }
}

/// `ConvertDownwardAPIFieldLabel`: the pod fields the downward API knows.
fn convert_field_label(version: &str, label: &str) -> Result<String, String> {
    const KNOWN: [&str; 15] = [
        "metadata.annotations",
        "metadata.labels",
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.serviceAccountName",
        "spec.schedulerName",
        "status.phase",
        "status.hostIP",
        "status.hostIPs",
        "status.podIP",
        "status.podIPs",
        "spec.terminationGracePeriodSeconds",
    ];
    if version != "v1" {
        return Err(format!("unsupported pod version: {version}"));
    }
    if let Some((path, _)) = split_subscript(label) {
        return match path {
            "metadata.annotations" | "metadata.labels" => Ok(label.to_owned()),
            _ => Err(format!("field label does not support subscript: {label}")),
        };
    }
    match label {
        "spec.host" => Ok("spec.nodeName".to_owned()),
        known if KNOWN.contains(&known) => Ok(known.to_owned()),
        _ => Err(format!("field label not supported: {label}")),
    }
}

/// `metadata.labels['app']` → (`metadata.labels`, `app`).
fn split_subscript(path: &str) -> Option<(&str, &str)> {
    let inner = path.strip_suffix("']")?;
    let (head, key) = inner.split_once("['")?;
    (!head.is_empty()).then_some((head, key))
}

/// `validateConfigMapKeySelector` / `validateSecretKeySelector`.
fn key_selector(selector: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let name = str_of(selector, "name").unwrap_or_default();
    for msg in names::dns_subdomain(name) {
        out.push(Cause::invalid(&path.child("name"), name, &msg));
    }
    match str_of(selector, "key").unwrap_or_default() {
        "" => out.push(Cause::required(&path.child("key"), "")),
        key => {
            for msg in names::config_map_key(key) {
                out.push(Cause::invalid(&path.child("key"), key, &msg));
            }
        }
    }
}

/// `ValidateEnvFrom`: a valid prefix and exactly one of configMapRef, secretRef.
fn env_from(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    for (i, source) in list.iter().enumerate() {
        let at = path.index(i);
        if let Some(prefix) = set_str(source, "prefix") {
            for msg in names::env_var_name(prefix) {
                out.push(Cause::invalid(&at.child("prefix"), prefix, &msg));
            }
        }
        let mut sources = 0;
        for kind in ["configMapRef", "secretRef"] {
            if let Some(reference) = source.get(kind) {
                sources += 1;
                env_source_name(reference, &at.child(kind).child("name"), out);
            }
        }
        match sources {
            0 => out.push(Cause::invalid(
                path,
                "",
                "must specify one of: `configMapRef` or `secretRef`",
            )),
            1 => {}
            _ => out.push(Cause::invalid(
                path,
                "",
                "may not have more than one field specified at a time",
            )),
        }
    }
}

fn env_source_name(reference: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    match str_of(reference, "name").unwrap_or_default() {
        "" => out.push(Cause::required(path, "")),
        name => {
            for msg in names::dns_subdomain_prefix(name) {
                out.push(Cause::invalid(path, name, &msg));
            }
        }
    }
}

const PROPAGATIONS: [&str; 3] = ["Bidirectional", "HostToContainer", "None"];
const RECURSIVE_READ_ONLY: [&str; 3] = ["Disabled", "Enabled", "IfPossible"];

/// `ValidateVolumeMounts`: a volume of the pod, a unique mountPath, relative sub paths.
fn volume_mounts(
    list: &[Value],
    volumes: &Volumes,
    privileged: bool,
    path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    let mut mount_points = BTreeSet::new();
    for (i, mount) in list.iter().enumerate() {
        let at = path.index(i);
        let name = str_of(mount, "name").unwrap_or_default();
        if name.is_empty() {
            out.push(Cause::required(&at.child("name"), ""));
        }
        if !volumes.contains_key(name) {
            out.push(Cause::not_found(&at.child("name"), name));
        }
        let mount_path = str_of(mount, "mountPath").unwrap_or_default();
        if mount_path.is_empty() {
            out.push(Cause::required(&at.child("mountPath"), ""));
        }
        if !mount_points.insert(mount_path) {
            out.push(Cause::invalid(
                &at.child("mountPath"),
                mount_path,
                "must be unique",
            ));
        }
        sub_paths(mount, volumes.get(name).copied(), &at, path, out);
        if let Some(propagation) = str_of(mount, "mountPropagation") {
            mount_propagation(
                propagation,
                privileged,
                &path.child("mountPropagation"),
                out,
            );
        }
        recursive_read_only(mount, &path.child("recursiveReadOnly"), out);
    }
}

/// subPath and subPathExpr: relative, no `..`, not both, none into an image volume. (The
/// server names the list, not the entry, for the path errors.)
fn sub_paths(
    mount: &Value,
    kind: Option<VolumeKind>,
    at: &FieldPath,
    list: &FieldPath,
    out: &mut Vec<Cause>,
) {
    let sub_path = str_of(mount, "subPath").unwrap_or_default();
    let sub_path_expr = str_of(mount, "subPathExpr").unwrap_or_default();
    if kind == Some("image") {
        for (field, value) in [("subPath", sub_path), ("subPathExpr", sub_path_expr)] {
            if !value.is_empty() {
                out.push(Cause::invalid(
                    &at.child(field),
                    value,
                    "not allowed in image volume sources",
                ));
            }
        }
    }
    if !sub_path.is_empty() {
        local_descending_path(sub_path, &list.child("subPath"), out);
    }
    if !sub_path_expr.is_empty() {
        if !sub_path.is_empty() {
            out.push(Cause::invalid(
                &at.child("subPathExpr"),
                sub_path_expr,
                "subPathExpr and subPath are mutually exclusive",
            ));
        }
        local_descending_path(sub_path_expr, &list.child("subPathExpr"), out);
    }
}

fn mount_propagation(propagation: &str, privileged: bool, path: &FieldPath, out: &mut Vec<Cause>) {
    if !PROPAGATIONS.contains(&propagation) {
        out.push(Cause::not_supported(path, propagation, &PROPAGATIONS));
    }
    if propagation == "Bidirectional" && !privileged {
        out.push(Cause::forbidden(
            path,
            "Bidirectional mount propagation is available only to privileged containers",
        ));
    }
}

fn recursive_read_only(mount: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    match str_of(mount, "recursiveReadOnly") {
        None | Some("Disabled") => {}
        Some("Enabled" | "IfPossible") => {
            if !bool_of(mount, "readOnly") {
                out.push(Cause::forbidden(
                    path,
                    "may only be specified when readOnly is true",
                ));
            }
            if set_str(mount, "mountPropagation").is_some_and(|p| p != "None") {
                out.push(Cause::forbidden(
                    path,
                    "may only be specified when mountPropagation is None or not specified",
                ));
            }
        }
        Some(other) => out.push(Cause::not_supported(path, other, &RECURSIVE_READ_ONLY)),
    }
}

// --- lifecycle handlers and probes ---

/// The kinds of handler, in the order the server counts them.
const HANDLERS: [&str; 5] = ["exec", "httpGet", "tcpSocket", "grpc", "sleep"];
const SCHEMES: [&str; 2] = ["HTTP", "HTTPS"];

/// `validateLifecycle`: postStart and preStop handlers.
fn lifecycle_handlers(
    lifecycle: &Value,
    grace_period: i64,
    path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    for hook in ["postStart", "preStop"] {
        if let Some(handler) = lifecycle.get(hook) {
            self::handler(handler, grace_period, &path.child(hook), out);
        }
    }
}

/// `validateHandler`: exactly one kind, each valid.
fn handler(h: &Value, grace_period: i64, path: &FieldPath, out: &mut Vec<Cause>) {
    let mut found = false;
    for kind in HANDLERS {
        let Some(action) = h.get(kind) else { continue };
        let at = path.child(kind);
        if found {
            out.push(Cause::forbidden(
                &at,
                "may not specify more than 1 handler type",
            ));
            continue;
        }
        found = true;
        match kind {
            "exec" if list_of(action, "command").is_empty() => {
                out.push(Cause::required(&at.child("command"), ""))
            }
            "httpGet" => http_get(action, &at, out),
            "tcpSocket" => port_num_or_name(action.get("port"), &at.child("port"), out),
            "grpc" => port_number(int_of(action, "port").unwrap_or(0), &at.child("port"), out),
            "sleep" => sleep(action, grace_period, &at, out),
            _ => {}
        }
    }
    if !found {
        out.push(Cause::required(path, "must specify a handler type"));
    }
}

/// `validateHTTPGetAction` (path and scheme are defaulted).
fn http_get(action: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    port_num_or_name(action.get("port"), &path.child("port"), out);
    one_of(action, "scheme", &SCHEMES, path, out);
    for header in list_of(action, "httpHeaders") {
        let name = str_of(header, "name").unwrap_or_default();
        for msg in names::http_header_name(name) {
            out.push(Cause::invalid(&path.child("httpHeaders"), name, &msg));
        }
    }
}

/// `ValidatePortNumOrName`: a number in 1–65535 or a port name (absent is the number 0).
fn port_num_or_name(port: Option<&Value>, path: &FieldPath, out: &mut Vec<Cause>) {
    match port {
        Some(Value::String(name)) => {
            for msg in names::port_name(name) {
                out.push(Cause::invalid(path, name.as_str(), &msg));
            }
        }
        other => port_number(other.and_then(Value::as_i64).unwrap_or(0), path, out),
    }
}

/// `validateSleepAction`: more than 0 and at most the grace period (1.30's rule).
fn sleep(action: &Value, grace_period: i64, path: &FieldPath, out: &mut Vec<Cause>) {
    let seconds = int_of(action, "seconds").unwrap_or(0);
    if seconds <= 0 || seconds > grace_period {
        let detail = format!(
            "must be greater than 0 and less than terminationGracePeriodSeconds ({grace_period}). Enable AllowPodLifecycleSleepActionZeroValue feature gate for zero sleep."
        );
        out.push(Cause::invalid(path, seconds, &detail));
    }
}

/// The liveness, readiness and startup probes.
fn probes(c: &Value, grace_period: i64, path: &FieldPath, out: &mut Vec<Cause>) {
    for kind in PROBES {
        let Some(probe) = c.get(kind) else { continue };
        let at = path.child(kind);
        self::probe(probe, grace_period, &at, out);
        let success = int_of(probe, "successThreshold")
            .filter(|s| *s != 0)
            .unwrap_or(1);
        if kind != "readinessProbe" && success != 1 {
            out.push(Cause::invalid(
                &at.child("successThreshold"),
                success,
                "must be 1",
            ));
        }
        if kind == "readinessProbe"
            && let Some(grace) = probe.get("terminationGracePeriodSeconds")
        {
            out.push(Cause::invalid(
                &at.child("terminationGracePeriodSeconds"),
                BadValue::from(grace),
                "must not be set for readinessProbes",
            ));
        }
    }
}

/// `validateProbe`: one handler, non-negative timings.
fn probe(p: &Value, grace_period: i64, path: &FieldPath, out: &mut Vec<Cause>) {
    handler(p, grace_period, path, out);
    for field in [
        "initialDelaySeconds",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
    ] {
        if let Some(n) = int_of(p, field).filter(|n| *n < 0) {
            out.push(Cause::invalid(
                &path.child(field),
                n,
                "must be greater than or equal to 0",
            ));
        }
    }
    if let Some(grace) = int_of(p, "terminationGracePeriodSeconds").filter(|g| *g <= 0) {
        out.push(Cause::invalid(
            &path.child("terminationGracePeriodSeconds"),
            grace,
            "must be greater than 0",
        ));
    }
}
