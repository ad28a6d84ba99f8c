//! Volumes (`ValidateVolumes`, `validateVolumeSource`): names, exactly one source each, and
//! the sources a build pod may use checked as the server checks them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::containers::object_field_selector;
use super::{BadValue, Cause, FieldPath, int_of, list_of, names, resources, set_str, str_of};

/// A volume's source, by its JSON key (`emptyDir`, `secret`, ...).
pub(super) type VolumeKind = &'static str;
/// The pod's valid volumes, by name.
pub(super) type Volumes = BTreeMap<String, VolumeKind>;

/// The volume sources in the order the server counts them, with the name its "more than 1
/// volume type" error gives each (`cephFS`, and its `downwarAPI` typo, are the server's).
const SOURCES: [(&str, &str); 30] = [
    ("emptyDir", "emptyDir"),
    ("hostPath", "hostPath"),
    ("gitRepo", "gitRepo"),
    ("gcePersistentDisk", "gcePersistentDisk"),
    ("awsElasticBlockStore", "awsElasticBlockStore"),
    ("secret", "secret"),
    ("nfs", "nfs"),
    ("iscsi", "iscsi"),
    ("glusterfs", "glusterfs"),
    ("flocker", "flocker"),
    ("persistentVolumeClaim", "persistentVolumeClaim"),
    ("rbd", "rbd"),
    ("cinder", "cinder"),
    ("cephfs", "cephFS"),
    ("quobyte", "quobyte"),
    ("downwardAPI", "downwarAPI"),
    ("fc", "fc"),
    ("flexVolume", "flexVolume"),
    ("configMap", "configMap"),
    ("azureFile", "azureFile"),
    ("vsphereVolume", "vsphereVolume"),
    ("photonPersistentDisk", "photonPersistentDisk"),
    ("portworxVolume", "portworxVolume"),
    ("azureDisk", "azureDisk"),
    ("storageos", "storageos"),
    ("projected", "projected"),
    ("scaleIO", "scaleIO"),
    ("csi", "csi"),
    ("ephemeral", "ephemeral"),
    ("image", "image"),
];
const HOST_PATH_TYPES: [&str; 8] = [
    "",
    "BlockDevice",
    "CharDevice",
    "Directory",
    "DirectoryOrCreate",
    "File",
    "FileOrCreate",
    "Socket",
];
/// The fields a downward API volume may read (`validVolumeDownwardAPIFieldPathExpressions`).
const VOLUME_FIELDS: [&str; 5] = [
    "metadata.annotations",
    "metadata.labels",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
];
const FILE_MODE: &str = "must be a number between 0 and 0777 (octal), both inclusive";
const MORE_THAN_ONE: &str = "may not specify more than 1 volume type";

/// Validates `spec.volumes` and returns the valid ones (a volume with errors is left out, so
/// its mounts are not found either, as on the server).
pub(super) fn volumes(spec: &Value, path: &FieldPath, out: &mut Vec<Cause>) -> Volumes {
    let mut valid = Volumes::new();
    let mut names_seen = BTreeSet::new();
    for (i, volume) in list_of(spec, "volumes").iter().enumerate() {
        let at = path.index(i);
        let mut errors = Vec::new();
        let kind = source(volume, &at, &mut errors);
        let name = str_of(volume, "name").unwrap_or_default();
        if name.is_empty() {
            errors.push(Cause::required(&at.child("name"), ""));
        } else {
            errors.extend(
                names::dns_label(name)
                    .iter()
                    .map(|m| Cause::invalid(&at.child("name"), name, m)),
            );
        }
        if names_seen.contains(name) {
            errors.push(Cause::duplicate(&at.child("name"), name));
        }
        match kind {
            Some(kind) if errors.is_empty() => {
                names_seen.insert(name);
                valid.insert(name.to_owned(), kind);
            }
            _ => out.append(&mut errors),
        }
    }
    valid
}

/// Exactly one source, validated; returns its kind.
fn source(volume: &Value, path: &FieldPath, out: &mut Vec<Cause>) -> Option<VolumeKind> {
    let mut kind = None;
    for (key, shown) in SOURCES {
        let Some(src) = volume.get(key) else { continue };
        if kind.is_some() {
            out.push(Cause::forbidden(&path.child(shown), MORE_THAN_ONE));
            continue;
        }
        kind = Some(key);
        source_fields(key, src, &path.child(key), out);
    }
    if kind.is_none() {
        out.push(Cause::required(path, "must specify a volume type"));
    }
    kind
}

fn source_fields(kind: &str, src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    match kind {
        "emptyDir" => empty_dir(src, path, out),
        "hostPath" => host_path(src, path, out),
        "secret" => files_source(src, "secretName", path, out),
        "configMap" => files_source(src, "name", path, out),
        "downwardAPI" => downward_api(src, path, out),
        "projected" => projected(src, path, out),
        "persistentVolumeClaim" => required_fields(src, &["claimName"], path, out),
        "nfs" => nfs(src, path, out),
        "gitRepo" => git_repo(src, path, out),
        "csi" => csi(src, path, out),
        "ephemeral" => required_fields(src, &["volumeClaimTemplate"], path, out),
        "image" => required_fields(src, &["reference"], path, out),
        _ => {}
    }
}

/// Each named field must be set (non-empty).
fn required_fields(src: &Value, fields: &[&str], path: &FieldPath, out: &mut Vec<Cause>) {
    for field in fields {
        let set = match src.get(*field) {
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
            None => false,
        };
        if !set {
            out.push(Cause::required(&path.child(field), ""));
        }
    }
}

fn empty_dir(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    if src
        .get("sizeLimit")
        .and_then(resources::quantity)
        .is_some_and(|q| q.is_negative())
    {
        out.push(Cause::forbidden(
            &path.child("sizeLimit"),
            "SizeLimit field must be a valid resource quantity",
        ));
    }
}

/// `validateHostPathVolumeSource`: a path without `..`, a known type.
fn host_path(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let host = str_of(src, "path").unwrap_or_default();
    if host.is_empty() {
        out.push(Cause::required(&path.child("path"), ""));
        return;
    }
    no_backsteps(host, &path.child("path"), out);
    if let Some(kind) = str_of(src, "type").filter(|t| !HOST_PATH_TYPES.contains(t)) {
        out.push(Cause::not_supported(
            &path.child("type"),
            kind,
            &HOST_PATH_TYPES,
        ));
    }
}

/// Secret and config map volumes: the object's name, a default mode, key-to-path items.
fn files_source(src: &Value, name_field: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    required_fields(src, &[name_field], path, out);
    file_mode(src, "defaultMode", path, out);
    for (i, item) in list_of(src, "items").iter().enumerate() {
        key_to_path(item, &path.child("items").index(i), out);
    }
}

fn file_mode(v: &Value, field: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    if let Some(mode) = int_of(v, field).filter(|m| !(0..=0o777).contains(m)) {
        out.push(Cause::invalid(&path.child(field), mode, FILE_MODE));
    }
}

/// `validateKeyToPath`.
fn key_to_path(item: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    required_fields(item, &["key"], path, out);
    let file = str_of(item, "path").unwrap_or_default();
    if file.is_empty() {
        out.push(Cause::required(&path.child("path"), ""));
    }
    local_non_reserved_path(file, &path.child("path"), out);
    file_mode(item, "mode", path, out);
}

/// `validateDownwardAPIVolumeSource`: the server validates every item at the volume's path.
fn downward_api(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    file_mode(src, "defaultMode", path, out);
    for item in list_of(src, "items") {
        downward_api_file(item, path, out);
    }
}

/// `validateDownwardAPIVolumeFile`: a relative path, and exactly one of fieldRef (pod
/// metadata) and resourceFieldRef (a container's resources).
fn downward_api_file(item: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let file = str_of(item, "path").unwrap_or_default();
    if file.is_empty() {
        out.push(Cause::required(&path.child("path"), ""));
    }
    local_non_reserved_path(file, &path.child("path"), out);
    match (item.get("fieldRef"), item.get("resourceFieldRef")) {
        (Some(fs), resource) => {
            object_field_selector(fs, &VOLUME_FIELDS, &path.child("fieldRef"), out);
            if resource.is_some() {
                out.push(Cause::invalid(
                    path,
                    "resource",
                    "fieldRef and resourceFieldRef can not be specified simultaneously",
                ));
            }
        }
        (None, Some(rs)) => {
            resources::field_selector(rs, true, &path.child("resourceFieldRef"), out)
        }
        (None, None) => out.push(Cause::required(
            path,
            "one of fieldRef and resourceFieldRef is required",
        )),
    }
    file_mode(item, "mode", path, out);
}

/// `validateProjectionSources`: one kind per source, file paths unique across sources.
fn projected(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    file_mode(src, "defaultMode", path, out);
    let mut paths = BTreeSet::new();
    for (i, source) in list_of(src, "sources").iter().enumerate() {
        let at = path.child("sources").index(i);
        let mut kinds = 0;
        for kind in ["secret", "configMap"] {
            if let Some(s) = source.get(kind) {
                kinds += 1;
                projected_files(s, &at.child(kind), path, &mut paths, out);
            }
        }
        if let Some(d) = source.get("downwardAPI") {
            kinds += 1;
            for item in list_of(d, "items") {
                downward_api_file(item, &at.child("downwardAPI"), out);
                unique_path(
                    str_of(item, "path").unwrap_or_default(),
                    path,
                    &mut paths,
                    out,
                );
            }
        }
        if let Some(token) = source.get("serviceAccountToken") {
            kinds += 1;
            service_account_token(token, &at.child("serviceAccountToken"), path, out);
        }
        kinds += usize::from(source.get("clusterTrustBundle").is_some());
        if kinds > 1 {
            out.push(Cause::forbidden(
                &at,
                "may not specify more than 1 volume type per source",
            ));
        }
    }
}

fn projected_files(
    s: &Value,
    at: &FieldPath,
    volume: &FieldPath,
    paths: &mut BTreeSet<String>,
    out: &mut Vec<Cause>,
) {
    required_fields(s, &["name"], at, out);
    for (i, item) in list_of(s, "items").iter().enumerate() {
        key_to_path(item, &at.child("items").index(i), out);
        let name = str_of(s, "name").unwrap_or_default();
        let file = str_of(item, "path").unwrap_or_default();
        if !file.is_empty() && !paths.insert(file.to_owned()) {
            out.push(Cause::invalid(volume, name, "conflicting duplicate paths"));
        }
    }
}

fn unique_path(file: &str, volume: &FieldPath, paths: &mut BTreeSet<String>, out: &mut Vec<Cause>) {
    if !file.is_empty() && !paths.insert(file.to_owned()) {
        out.push(Cause::invalid(volume, file, "conflicting duplicate paths"));
    }
}

/// A projected service account token: at least 10 minutes (the default is an hour), at
/// most 2^32 s, a relative path (the server names the volume's path for it).
fn service_account_token(token: &Value, at: &FieldPath, volume: &FieldPath, out: &mut Vec<Cause>) {
    let expiration = int_of(token, "expirationSeconds").unwrap_or(3600);
    if expiration < 600 {
        out.push(Cause::invalid(
            &at.child("expirationSeconds"),
            expiration,
            "may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > 1 << 32 {
        out.push(Cause::invalid(
            &at.child("expirationSeconds"),
            expiration,
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    match str_of(token, "path").unwrap_or_default() {
        "" => out.push(Cause::required(&volume.child("path"), "")),
        file => local_non_reserved_path(file, &volume.child("path"), out),
    }
}

fn nfs(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    required_fields(src, &["server", "path"], path, out);
    let export = str_of(src, "path").unwrap_or_default();
    if !export.starts_with('/') {
        out.push(Cause::invalid(
            &path.child("path"),
            export,
            "must be an absolute path",
        ));
    }
}

fn git_repo(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    required_fields(src, &["repository"], path, out);
    local_descending_path(
        str_of(src, "directory").unwrap_or_default(),
        &path.child("directory"),
        out,
    );
}

/// `ValidateCSIDriverName`.
fn csi(src: &Value, path: &FieldPath, out: &mut Vec<Cause>) {
    let driver = str_of(src, "driver").unwrap_or_default();
    let at = path.child("driver");
    if driver.is_empty() {
        out.push(Cause::required(&at, ""));
    }
    if driver.len() > 63 {
        out.push(Cause::too_long(&at, 63));
    }
    for msg in names::dns_subdomain(&driver.to_lowercase()) {
        out.push(Cause::invalid(&at, driver, &msg));
    }
    if let Some(secret) = src.get("nodePublishSecretRef")
        && set_str(secret, "name").is_none()
    {
        out.push(Cause::required(
            &path.child("nodePublishSecretRef").child("name"),
            "",
        ));
    }
}

/// `validateLocalDescendingPath`: relative, without `..` elements.
pub(super) fn local_descending_path(p: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    if p.starts_with('/') {
        out.push(Cause::invalid(path, p, "must be a relative path"));
    }
    no_backsteps(p, path, out);
}

/// `ValidateLocalNonReservedPath`: relative, no `..` element, not starting with `..`.
fn local_non_reserved_path(p: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    local_descending_path(p, path, out);
    if p.starts_with("..") && !p.starts_with("../") {
        out.push(Cause::invalid(path, p, "must not start with '..'"));
    }
}

/// `validatePathNoBacksteps`.
fn no_backsteps(p: &str, path: &FieldPath, out: &mut Vec<Cause>) {
    if p.split('/').any(|part| part == "..") {
        out.push(Cause::invalid(
            path,
            BadValue::from(p),
            "must not contain '..'",
        ));
    }
}
