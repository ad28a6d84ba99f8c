//! Security contexts (`ValidateSecurityContext`, `validatePodSpecSecurityContext`): user and
//! group ids, proc mount, seccomp and AppArmor profiles, sysctls, host namespaces.

use std::collections::BTreeSet;

use serde_json::Value;

use super::volumes::local_descending_path;
use super::{BadValue, Cause, FieldPath, bool_of, int_of, list_of, names, str_of};

/// The largest uid or gid every supported release accepts (1.30 caps them at MaxInt32).
const MAX_ID: i64 = i32::MAX as i64;
const PROFILE_TYPES: [&str; 3] = ["Localhost", "RuntimeDefault", "Unconfined"];
const PROC_MOUNTS: [&str; 2] = ["Default", "Unmasked"];
const FS_GROUP_POLICIES: [&str; 2] = ["Always", "OnRootMismatch"];
const SUPPLEMENTAL_POLICIES: [&str; 2] = ["Merge", "Strict"];
const SELINUX_POLICIES: [&str; 2] = ["MountOption", "Recursive"];

/// A container's securityContext.
pub(super) fn container_security_context(
    sc: &Value,
    host_users: bool,
    path: &FieldPath,
    out: &mut Vec<Cause>,
) {
    for field in ["runAsUser", "runAsGroup"] {
        id_in_range(sc, field, &path.child(field), out);
    }
    if let Some(proc_mount) = str_of(sc, "procMount") {
        if !PROC_MOUNTS.contains(&proc_mount) {
            out.push(Cause::not_supported(
                &path.child("procMount"),
                proc_mount,
                &PROC_MOUNTS,
            ));
        }
        if host_users && proc_mount == "Unmasked" {
            out.push(Cause::invalid(
                &path.child("procMount"),
                proc_mount,
                "`hostUsers` must be false to use `Unmasked`",
            ));
        }
    }
    if let Some(profile) = sc.get("seccompProfile") {
        seccomp_profile(profile, &path.child("seccompProfile"), out);
    }
    if sc.get("allowPrivilegeEscalation").and_then(Value::as_bool) == Some(false) {
        no_escalation(sc, path, out);
    }
    if let Some(profile) = sc.get("appArmorProfile") {
        apparmor_profile(profile, &path.child("appArmorProfile"), out);
    }
}

/// allowPrivilegeEscalation false contradicts privileged and CAP_SYS_ADMIN.
fn no_escalation(sc: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if bool_of(sc, "privileged") {
        out.push(Cause::invalid(
            path,
            BadValue::Json(sc.clone()),
            "cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
        ));
    }
    let adds = list_of(&sc["capabilities"], "add");
    if adds.iter().any(|c| c.as_str() == Some("CAP_SYS_ADMIN")) {
        out.push(Cause::invalid(
            path,
            BadValue::Json(sc.clone()),
            "cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN",
        ));
    }
}

/// The pod's securityContext.
pub(super) fn pod_security_context(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let Some(sc) = spec.get("securityContext") else {
        return;
    };
    for field in ["fsGroup", "runAsUser", "runAsGroup"] {
        id_in_range(sc, field, &path.child(field), out);
    }
    for (i, gid) in list_of(sc, "supplementalGroups").iter().enumerate() {
        let gid = gid.as_i64().unwrap_or_default();
        if !(0..=MAX_ID).contains(&gid) {
            let at = path.child("supplementalGroups").index(i);
            out.push(Cause::invalid(
                &at,
                gid,
                &names::inclusive_range_error(0, MAX_ID),
            ));
        }
    }
    if bool_of(spec, "shareProcessNamespace") && bool_of(spec, "hostPID") {
        out.push(Cause::invalid(
            &path.child("shareProcessNamespace"),
            BadValue::Json(Value::Bool(true)),
            "ShareProcessNamespace and HostPID cannot both be enabled",
        ));
    }
    sysctls(list_of(sc, "sysctls"), &path.child("sysctls"), out);
    for (field, supported) in [
        ("fsGroupChangePolicy", &FS_GROUP_POLICIES),
        ("supplementalGroupsPolicy", &SUPPLEMENTAL_POLICIES),
        ("seLinuxChangePolicy", &SELINUX_POLICIES),
    ] {
        if let Some(value) = str_of(sc, field).filter(|v| !supported.contains(v)) {
            out.push(Cause::not_supported(&path.child(field), value, supported));
        }
    }
    if let Some(profile) = sc.get("seccompProfile") {
        seccomp_profile(profile, &path.child("seccompProfile"), out);
    }
    if let Some(profile) = sc.get("appArmorProfile") {
        apparmor_profile(profile, &path.child("appArmorProfile"), out);
    }
}

fn id_in_range(sc: &Value, field: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(id) = int_of(sc, field).filter(|id| !(0..=MAX_ID).contains(id)) {
        out.push(Cause::invalid(
            path,
            id,
            &names::inclusive_range_error(0, MAX_ID),
        ));
    }
}

/// `validateSysctls`: names required, well-formed and unique.
fn sysctls(list: &[Value], path: &FieldPath, out: &mut Vec<Cause>) {
    let mut seen = BTreeSet::new();
    for (i, sysctl) in list.iter().enumerate() {
        let at = path.index(i).child("name");
        let name = str_of(sysctl, "name").unwrap_or_default();
        if name.is_empty() {
            out.push(Cause::required(&at, ""));
        } else if !is_sysctl_name(name) {
            out.push(Cause::invalid(
                &at,
                name,
                "must have at most 253 characters and match regex ^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$",
            ));
        } else if seen.contains(name) {
            out.push(Cause::duplicate(&at, name));
        }
        seen.insert(name);
    }
}

fn is_sysctl_name(name: &str) -> bool {
    let segment = |s: &str| {
        let b = s.as_bytes();
        let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        edge(b.first())
            && edge(b.last())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
    };
    name.len() <= 253 && name.split(['.', '/']).all(segment)
}

/// `validateSeccompProfileField`: a known type; Localhost (only) names a relative profile.
fn seccomp_profile(profile: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let kind = str_of(profile, "type").unwrap_or_default();
    if kind.is_empty() {
        out.push(Cause::required(
            &path.child("type"),
            "type is required when seccompProfile is set",
        ));
    } else if !PROFILE_TYPES.contains(&kind) {
        out.push(Cause::not_supported(
            &path.child("type"),
            kind,
            &PROFILE_TYPES,
        ));
    }
    let localhost = str_of(profile, "localhostProfile");
    match (kind, localhost) {
        ("Localhost", None) => out.push(Cause::required(
            &path.child("localhostProfile"),
            "must be set when seccomp type is Localhost",
        )),
        ("Localhost", Some(p)) => local_descending_path(p, &path.child("localhostProfile"), out),
        (_, Some(_)) => out.push(Cause::invalid(
            &path.child("localhostProfile"),
            BadValue::Json(profile.clone()),
            "can only be set when seccomp type is Localhost",
        )),
        (_, None) => {}
    }
}

/// `ValidateAppArmorProfileField`.
fn apparmor_profile(profile: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let localhost = str_of(profile, "localhostProfile");
    let at = path.child("localhostProfile");
    match str_of(profile, "type").unwrap_or_default() {
        "Localhost" => match localhost {
            None => out.push(Cause::required(
                &at,
                "must be set when AppArmor type is Localhost",
            )),
            Some(p) => apparmor_localhost(p, &at, out),
        },
        "RuntimeDefault" | "Unconfined" => {
            if let Some(p) = localhost {
                out.push(Cause::invalid(
                    &at,
                    p,
                    "can only be set when AppArmor type is Localhost",
                ));
            }
        }
        "" => out.push(Cause::required(
            &path.child("type"),
            "type is required when appArmorProfile is set",
        )),
        other => out.push(Cause::not_supported(
            &path.child("type"),
            other,
            &PROFILE_TYPES,
        )),
    }
}

fn apparmor_localhost(profile: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    if profile.trim() != profile {
        out.push(Cause::invalid(
            path,
            profile,
            "must not be padded with whitespace",
        ));
    } else if profile.is_empty() {
        out.push(Cause::required(
            path,
            "must be set when AppArmor type is Localhost",
        ));
    }
    if profile.len() > 4095 {
        out.push(Cause::too_long(path, 4095));
    }
}

/// `validateHostUsers`: a pod in its own user namespace shares no host namespace.
pub(super) fn host_users(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if spec.get("hostUsers").and_then(Value::as_bool) != Some(false) {
        return;
    }
    for (field, shown) in [
        ("hostNetwork", "hostNetwork"),
        ("hostPID", "HostPID"),
        ("hostIPC", "HostIPC"),
    ] {
        if bool_of(spec, field) {
            out.push(Cause::forbidden(
                &path.child(shown),
                "when `pod.Spec.HostUsers` is false",
            ));
        }
    }
}
