//! The build pod, built from the start message and the config alone (pure, so the whole launcher
//! contract is unit-tested without a cluster). Mirrors Screwdriver's executor-k8s: an init
//! container copies the launcher out of `launcher_image` into a shared volume, and the build
//! container (the user's image) runs `launcher_entrypoint.sh` + `run.sh` from it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, LocalObjectReference, Pod, PodSpec, ResourceRequirements,
    Toleration as PodToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sd_protocol::StartMessage;
use serde_json::Value;

use crate::config::{KubernetesConfig, ResourceTable, ScrewdriverConfig};
use crate::executor::{ExecError, build_timeout};

/// The label selector every build pod matches (the same labels executor-k8s sets).
pub const BUILD_SELECTOR: &str = "app=screwdriver,tier=builds";
/// Label carrying the pod name, as in executor-k8s.
pub const LABEL_BUILD: &str = "sdbuild";
pub const LABEL_PIPELINE: &str = "screwdriver.cd/pipeline";
pub const LABEL_JOB: &str = "screwdriver.cd/job";
pub const ANNOTATION_CPU: &str = "screwdriver.cd/cpu";
pub const ANNOTATION_RAM: &str = "screwdriver.cd/ram";

/// The build container's name; the watcher looks at its state.
pub const BUILD_CONTAINER: &str = "build";
/// The init container that copies the launcher.
pub const LAUNCHER_CONTAINER: &str = "launcher";
const LAUNCHER_VOLUME: &str = "screwdriver";
/// Where the init container sees the shared volume.
const LAUNCHER_COPY_DIR: &str = "/opt/launcher";
/// Where the build container sees it: the launcher's scripts call `/opt/sd/launch` etc. by
/// absolute path, so the volume must sit where the launcher image keeps them.
pub const LAUNCHER_DIR: &str = "/opt/sd";
/// Copies the launcher (and its habitat packages, when the image has them) into the volume.
const LAUNCHER_COPY: &str = "cp -a /opt/sd/. /opt/launcher/ && if [ -d /hab ]; then mkdir -p /opt/launcher/hab && cp -a /hab/. /opt/launcher/hab/; fi";

/// `{prefix}{buildId}`: deterministic, so replicas and restarts agree on one pod per build.
pub fn pod_name(prefix: &str, build_id: u64) -> String {
    format!("{prefix}{build_id}")
}

/// The build id of one of our pods; `None` for pods with another prefix or shape.
pub fn build_id_of(prefix: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|id| pod_name(prefix, *id) == name)
}

/// The pod for `build`. Errors are `Rejected`: the same build would fail the same way again.
pub fn build_pod(
    build: &StartMessage,
    config: &KubernetesConfig,
    screwdriver: &ScrewdriverConfig,
) -> Result<Pod, ExecError> {
    let name = pod_name(&config.prefix, build.build_id);
    if !is_label_value(&name) {
        return Err(ExecError::Rejected(format!(
            "pod name {name:?} is not a valid Kubernetes name (at most 63 lowercase letters, digits and '-'); check executor.kubernetes.prefix"
        )));
    }
    let token = build
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ExecError::Rejected(format!(
                "build {} has no token for the launcher",
                build.build_id
            ))
        })?;
    // The run line is evaluated by a shell (and `eval`ed again by the entrypoint's error trap):
    // a value that could break out of its double quotes is refused rather than escaped.
    for (what, value) in [
        ("token", token),
        ("apiUri", build.api_uri.as_str()),
        ("screwdriver.store_uri", screwdriver.store_uri.as_str()),
        ("screwdriver.ui_uri", screwdriver.ui_uri.as_str()),
    ] {
        if let Some(c) = value.chars().find(|c| {
            matches!(c, '"' | '\\' | '$' | '`' | '\'') || c.is_whitespace() || c.is_control()
        }) {
            return Err(ExecError::Rejected(format!(
                "{what} contains {c:?}, which cannot be passed to the launcher's shell command"
            )));
        }
    }
    if build.container.trim().is_empty() {
        return Err(ExecError::Rejected(
            "the build names no container image".into(),
        ));
    }

    let timeout = build_timeout(build, config.default_timeout, config.max_timeout);
    let minutes = timeout.as_secs().div_ceil(60).max(1);
    let cpu = resource(build, ANNOTATION_CPU, &config.cpu)?;
    let ram = resource(build, ANNOTATION_RAM, &config.ram)?;
    let quantities = BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpu_quantity(cpu))),
        ("memory".to_owned(), Quantity(memory_quantity(ram))),
    ]);
    let resources = ResourceRequirements {
        limits: Some(quantities.clone()),
        requests: Some(quantities),
        ..Default::default()
    };

    let mut labels = config.extra_labels.clone();
    labels.insert("app".into(), "screwdriver".into());
    labels.insert("tier".into(), "builds".into());
    labels.insert(LABEL_BUILD.into(), name.clone());
    labels.insert(LABEL_PIPELINE.into(), build.pipeline_id().to_string());
    labels.insert(LABEL_JOB.into(), build.job_id.to_string());

    let run = format!(
        "{LAUNCHER_DIR}/run.sh \"{token}\" \"{api}\" \"{store}\" \"{minutes}\" \"{id}\" \"{ui}\"",
        api = build.api_uri,
        store = screwdriver.store_uri,
        id = build.build_id,
        ui = screwdriver.ui_uri,
    );
    let launcher = Container {
        name: LAUNCHER_CONTAINER.into(),
        image: Some(config.launcher_image.clone()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), LAUNCHER_COPY.into()]),
        volume_mounts: Some(vec![VolumeMount {
            name: LAUNCHER_VOLUME.into(),
            mount_path: LAUNCHER_COPY_DIR.into(),
            ..Default::default()
        }]),
        // An init container's request counts on its own; matching the build's keeps a
        // namespace LimitRange happy without raising the pod's effective request.
        resources: Some(resources.clone()),
        ..Default::default()
    };
    let container = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(build.container.clone()),
        command: Some(vec![format!("{LAUNCHER_DIR}/launcher_entrypoint.sh"), run]),
        volume_mounts: Some(vec![VolumeMount {
            name: LAUNCHER_VOLUME.into(),
            mount_path: LAUNCHER_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        resources: Some(resources),
        ..Default::default()
    };

    let tolerations: Vec<PodToleration> = config
        .tolerations
        .iter()
        .map(|t| PodToleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: None,
        })
        .collect();
    let pull_secrets: Vec<LocalObjectReference> = config
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: i64::try_from(minutes * 60).ok(),
            init_containers: Some(vec![launcher]),
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: LAUNCHER_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            service_account_name: config.service_account.clone(),
            // User code runs in this pod: it only gets API credentials when a service account
            // was chosen for builds on purpose.
            automount_service_account_token: Some(config.service_account.is_some()),
            image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
            ..Default::default()
        }),
        status: None,
    })
}

/// `screwdriver.cd/cpu` / `screwdriver.cd/ram`: a size name (any case) or a positive number
/// capped at the table's `max`; LOW when absent.
fn resource(build: &StartMessage, key: &str, table: &ResourceTable) -> Result<f64, ExecError> {
    let invalid = |shown: String| {
        ExecError::Rejected(format!(
            "annotation {key}: {shown} is not MICRO, LOW, HIGH, TURBO or a positive number"
        ))
    };
    let value = match build.annotations.get(key) {
        None | Some(Value::Null) => return Ok(table.low),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(table.low),
        Some(Value::String(s)) => match s.trim().to_ascii_uppercase().as_str() {
            "MICRO" => table.micro,
            "LOW" => table.low,
            "HIGH" => table.high,
            "TURBO" => table.turbo,
            other => other
                .parse::<f64>()
                .map_err(|_| invalid(format!("{s:?}")))?,
        },
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| invalid(n.to_string()))?,
        Some(other) => return Err(invalid(other.to_string())),
    };
    if !value.is_finite() || value <= 0.0 {
        return Err(invalid(value.to_string()));
    }
    Ok(value.min(table.max))
}

/// Cores as a Kubernetes quantity: whole cores plain, otherwise millicores.
fn cpu_quantity(cores: f64) -> String {
    let milli = ((cores * 1000.0).round() as u64).max(1);
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

/// GiB as a Kubernetes quantity: whole GiB as `Gi`, otherwise `Mi`.
fn memory_quantity(gib: f64) -> String {
    let mib = ((gib * 1024.0).round() as u64).max(1);
    if mib.is_multiple_of(1024) {
        format!("{}Gi", mib / 1024)
    } else {
        format!("{mib}Mi")
    }
}

/// A valid label value and pod name at once: ≤ 63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Toleration;
    use serde_json::json;
    use std::time::Duration;

    fn build(annotations: Value) -> StartMessage {
        let Value::Object(m) = json!({
            "buildId": 8609, "jobId": 1234, "eventId": 775, "jobName": "main",
            "pipeline": {"id": 42, "name": "mobile/app", "scmContext": "github:github.com"},
            "apiUri": "https://api.sd.example", "container": "node:20",
            "annotations": annotations, "token": "eyJ.token.sig",
        }) else {
            unreachable!()
        };
        StartMessage::from_json(m).unwrap()
    }

    fn config() -> KubernetesConfig {
        KubernetesConfig {
            namespace: "builds".into(),
            prefix: "sd-".into(),
            launcher_image: "screwdrivercd/launcher:v6".into(),
            ..Default::default()
        }
    }

    fn screwdriver() -> ScrewdriverConfig {
        ScrewdriverConfig {
            store_uri: "https://store.sd.example".into(),
            ui_uri: "https://cd.sd.example".into(),
        }
    }

    fn limits(pod: &Pod) -> (String, String) {
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let l = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        (l["cpu"].0.clone(), l["memory"].0.clone())
    }

    #[test]
    fn pod_follows_the_launcher_contract() {
        let pod = build_pod(
            &build(json!({"screwdriver.cd/timeout": 30})),
            &config(),
            &screwdriver(),
        )
        .unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("sd-8609"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("builds"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app"], "screwdriver");
        assert_eq!(labels["tier"], "builds");
        assert_eq!(labels["sdbuild"], "sd-8609");
        assert_eq!(labels["screwdriver.cd/pipeline"], "42");
        assert_eq!(labels["screwdriver.cd/job"], "1234");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(1800));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("screwdrivercd/launcher:v6"));
        assert_eq!(
            init.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/opt/launcher"
        );
        assert!(init.command.as_ref().unwrap()[2].starts_with("cp -a /opt/sd/. /opt/launcher/"));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("node:20"));
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/opt/sd");
        assert_eq!(
            c.command.as_ref().unwrap(),
            &vec![
                "/opt/sd/launcher_entrypoint.sh".to_owned(),
                "/opt/sd/run.sh \"eyJ.token.sig\" \"https://api.sd.example\" \"https://store.sd.example\" \"30\" \"8609\" \"https://cd.sd.example\"".to_owned(),
            ]
        );
        assert_eq!(limits(&pod), ("2".to_owned(), "2Gi".to_owned()));
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "2");
    }

    #[test]
    fn sizes_names_and_numbers() {
        let cases = [
            (
                json!({"screwdriver.cd/cpu": "micro", "screwdriver.cd/ram": "TURBO"}),
                ("500m", "16Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": "High", "screwdriver.cd/ram": "high"}),
                ("6", "12Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": 3, "screwdriver.cd/ram": "1.5"}),
                ("3", "1536Mi"),
            ),
            (
                json!({"screwdriver.cd/cpu": 99, "screwdriver.cd/ram": 64}),
                ("12", "16Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": "", "screwdriver.cd/ram": null}),
                ("2", "2Gi"),
            ),
        ];
        for (annotations, (cpu, ram)) in cases {
            let pod = build_pod(&build(annotations.clone()), &config(), &screwdriver()).unwrap();
            assert_eq!(
                limits(&pod),
                (cpu.to_owned(), ram.to_owned()),
                "{annotations}"
            );
        }
    }

    #[test]
    fn invalid_sizes_name_the_annotation() {
        for annotations in [
            json!({"screwdriver.cd/cpu": "lots"}),
            json!({"screwdriver.cd/cpu": -1}),
            json!({"screwdriver.cd/ram": true}),
            json!({"screwdriver.cd/ram": "0"}),
        ] {
            let key = annotations
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone();
            match build_pod(&build(annotations), &config(), &screwdriver()) {
                Err(ExecError::Rejected(m)) => assert!(m.contains(&key), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn timeout_is_capped_and_defaulted() {
        let mut cfg = config();
        cfg.default_timeout = Duration::from_secs(90 * 60);
        cfg.max_timeout = Duration::from_secs(120 * 60);
        let deadline = |a: Value, cfg: &KubernetesConfig| {
            build_pod(&build(a), cfg, &screwdriver())
                .unwrap()
                .spec
                .unwrap()
                .active_deadline_seconds
        };
        assert_eq!(deadline(json!({}), &cfg), Some(5400));
        assert_eq!(
            deadline(json!({"screwdriver.cd/timeout": "600"}), &cfg),
            Some(7200)
        );
        assert_eq!(
            deadline(json!({"screwdriver.cd/timeout": 0.5}), &cfg),
            Some(60)
        );
    }

    #[test]
    fn cluster_settings_reach_the_pod() {
        let mut cfg = config();
        cfg.node_selector = BTreeMap::from([("pool".into(), "builds".into())]);
        cfg.tolerations = vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("builds".into()),
            effect: Some("NoSchedule".into()),
        }];
        cfg.service_account = Some("sd-build".into());
        cfg.image_pull_secrets = vec!["regcred".into()];
        cfg.extra_labels =
            BTreeMap::from([("team".into(), "ios".into()), ("app".into(), "mine".into())]);
        let pod = build_pod(&build(json!({})), &cfg, &screwdriver()).unwrap();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "ios");
        assert_eq!(
            labels["app"], "screwdriver",
            "extra labels cannot hide a pod from the watcher"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["pool"], "builds");
        let t = &spec.tolerations.unwrap()[0];
        assert_eq!(
            (t.key.as_deref(), t.effect.as_deref()),
            (Some("dedicated"), Some("NoSchedule"))
        );
        assert_eq!(spec.service_account_name.as_deref(), Some("sd-build"));
        assert_eq!(spec.automount_service_account_token, Some(true));
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    }

    #[test]
    fn unsafe_values_and_names_are_refused() {
        let mut b = build(json!({}));
        b.token = None;
        assert!(
            matches!(build_pod(&b, &config(), &screwdriver()), Err(ExecError::Rejected(m)) if m.contains("token"))
        );
        let mut b = build(json!({}));
        b.api_uri = "https://x\"; rm -rf /; \"".into();
        assert!(
            matches!(build_pod(&b, &config(), &screwdriver()), Err(ExecError::Rejected(m)) if m.contains("apiUri"))
        );
        let mut cfg = config();
        cfg.prefix = "Build_".into();
        assert!(
            matches!(build_pod(&build(json!({})), &cfg, &screwdriver()), Err(ExecError::Rejected(m)) if m.contains("prefix"))
        );
    }

    #[test]
    fn rejection_never_shows_the_token() {
        let mut b = build(json!({"screwdriver.cd/cpu": "lots"}));
        b.token = Some("secret.jwt.value".into());
        let Err(e) = build_pod(&b, &config(), &screwdriver()) else {
            panic!()
        };
        assert!(!e.to_string().contains("secret.jwt.value"));
    }

    #[test]
    fn build_ids_come_back_from_names() {
        assert_eq!(build_id_of("sd-", "sd-8609"), Some(8609));
        assert_eq!(build_id_of("", "8609"), Some(8609));
        assert_eq!(build_id_of("sd-", "sd-8609-abcde"), None);
        assert_eq!(build_id_of("sd-", "other-8609"), None);
        assert_eq!(build_id_of("sd-", "sd-"), None);
        assert_eq!(build_id_of("sd-", "sd-007"), None);
    }
}
