//! The build pod, built from the start message and the config alone (pure, so the whole launcher
//! contract is unit-tested without a cluster). It follows Screwdriver's executor-k8s
//! (`config/pod.yaml.hbs` in its npm package): an init container copies the launcher out of
//! `launcher_image` into a shared volume, and the build container (the user's image) runs
//! `launcher_entrypoint.sh` + `run.sh` from it, with the environment the launcher and its tools
//! read. Where we differ on purpose, the comparison test (`agent/tests/screwdriver_pod.rs`) says
//! why.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource, LocalObjectReference,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    Pod, PodSecurityContext, PodSpec, PreferredSchedulingTerm, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Toleration as PodToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sd_protocol::StartMessage;
use sd_protocol::annotations::{self as annotation, key};
use serde_json::Value;

use crate::config::{DnsPolicy, KubernetesConfig, PullPolicy, ResourceTable, ScrewdriverConfig};
use crate::executor::{ExecError, Timing};
use crate::kube_names::{is_dns_label, label_value_of};

/// The label selector every build pod matches (the same labels executor-k8s sets).
pub const BUILD_SELECTOR: &str = "app=screwdriver,tier=builds";
/// Label carrying the pod name, as in executor-k8s.
pub const LABEL_BUILD: &str = "sdbuild";
/// Screwdriver's labels: names made label-safe, as executor-k8s writes them.
pub const LABEL_PIPELINE: &str = "screwdriver.cd/pipeline";
pub const LABEL_JOB: &str = "screwdriver.cd/job";
/// Our own labels for the ids (Screwdriver's keys carry names).
pub const LABEL_PIPELINE_ID: &str = "sd-buildcluster/pipeline-id";
pub const LABEL_JOB_ID: &str = "sd-buildcluster/job-id";
pub const LABEL_EVENT_ID: &str = "sd-buildcluster/event-id";

/// The build container's name; the watcher looks at its state.
pub const BUILD_CONTAINER: &str = "build";
/// The init container that copies the launcher.
pub const LAUNCHER_CONTAINER: &str = "launcher";
/// The docker-in-docker sidecar (`screwdriver.cd/dockerEnabled`).
pub const DIND_CONTAINER: &str = "dind";
/// Where the init container sees the launcher volume.
const LAUNCHER_COPY_DIR: &str = "/opt/launcher";
/// Where the build container sees it: the launcher's scripts call `/opt/sd/launch` etc. by
/// absolute path, so the volume must sit where the launcher image keeps them.
pub const LAUNCHER_DIR: &str = "/opt/sd";
/// Copies the launcher (and its habitat packages, when the image has them) into the volume,
/// and leaves the copy's start and end times in `/workspace/metrics`, which `run.sh` pushes to
/// the pushgateway as the launcher's set-up time.
const LAUNCHER_COPY: &str = "echo launcher_start_ts:`date +%s` > /workspace/metrics && cp -a /opt/sd/. /opt/launcher/ && if [ -d /hab ]; then mkdir -p /opt/launcher/hab && cp -a /hab/. /opt/launcher/hab/; fi && echo launcher_end_ts:`date +%s` >> /workspace/metrics";
/// `sd-cmd` keeps binary commands here (writable; `/opt/sd` is the read-only launcher mount).
const BASE_COMMAND_PATH: &str = "/sd/commands/";
/// The launcher's scratch directory (`SD_TEMP`).
const SD_TEMP: &str = "/opt/sd_tmp";
const DIND_SHARE: &str = "/opt/sd_dind_share";
const DIND_CERTS: &str = "/certs/client";

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

/// The pod for `build`. Errors are `Rejected`: the same build would fail the same way again,
/// and the message (which names the annotation or setting at fault) reaches the user.
pub fn build_pod(
    build: &StartMessage,
    config: &KubernetesConfig,
    screwdriver: &ScrewdriverConfig,
) -> Result<Pod, ExecError> {
    let name = pod_name(&config.prefix, build.build_id);
    if !is_dns_label(&name) {
        return Err(ExecError::Rejected(format!(
            "pod name {name:?} is not a valid Kubernetes name (at most 63 lowercase letters, digits and '-'); check executor.kubernetes.prefix"
        )));
    }
    let timing = Timing::of(build, &config.limits());
    let run = run_line(build, timing.minutes, screwdriver)?;
    let features = Features::of(build, config)?;
    let cpu = resource(build, annotation::CPU, &config.cpu)?;
    let ram = resource(build, annotation::RAM, &config.ram)?;

    let storage = Storage::of(config, features.docker.is_some());
    let mut env = launcher_env(build, config, screwdriver, &timing);
    env.extend(storage.env);
    env.extend(secret_env(config));
    let build_resources = resources(cpu, ram);
    let mut containers = vec![Container {
        name: BUILD_CONTAINER.into(),
        image: Some(build.container.clone()),
        image_pull_policy: Some(pull_policy(config.image_pull_policy).into()),
        security_context: Some(build_security(config)),
        resources: Some(build_resources.clone()),
        env: Some(env),
        command: Some(vec![format!("{LAUNCHER_DIR}/launcher_entrypoint.sh")]),
        args: Some(vec![run]),
        volume_mounts: Some(storage.mounts),
        lifecycle: config.lifecycle_hooks.clone(),
        ..Default::default()
    }];
    containers.extend(features.docker.as_ref().map(|d| dind_sidecar(config, d)));
    let (affinity, tolerations) = placement(config, features.disk_speed);
    let pull_secrets: Vec<LocalObjectReference> = config
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels(build, config, &name, cpu, ram)),
            annotations: (!config.pod_annotations.is_empty())
                .then(|| config.pod_annotations.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            // A backstop only: the launcher enforces the timeout itself and must get to report
            // it and run teardown first.
            active_deadline_seconds: i64::try_from(timing.backstop.as_secs()).ok(),
            termination_grace_period_seconds: i64::try_from(timing.grace.as_secs()).ok(),
            dns_policy: Some(dns_policy(config.dns_policy).into()),
            // The runtime's default seccomp profile for every container (a privileged one, which
            // only `pod_security = "privileged"` allows, runs unconfined whatever is set).
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            runtime_class_name: config.runtime_class.clone(),
            init_containers: Some(vec![launcher_container(config, build_resources)]),
            containers,
            volumes: Some(storage.volumes),
            node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
            affinity,
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            service_account_name: config.service_account.clone(),
            // User code runs in this pod: it only gets API credentials when asked for.
            automount_service_account_token: Some(config.automount_service_account_token),
            image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
            ..Default::default()
        }),
        status: None,
    })
}

/// The pod's volumes and the build container's mounts (and the environment that points at
/// them): the launcher's, docker-in-docker's, the operator's host paths and secret files.
struct Storage {
    env: Vec<EnvVar>,
    mounts: Vec<VolumeMount>,
    volumes: Vec<Volume>,
}

impl Storage {
    fn of(config: &KubernetesConfig, docker: bool) -> Self {
        let mut env = Vec::new();
        let mut mounts = vec![
            mount("podinfo", "/etc/podinfo", true),
            mount("screwdriver", LAUNCHER_DIR, true),
            mount("sdtemp", SD_TEMP, false),
            mount("workspace", "/workspace", false),
        ];
        let mut volumes = vec![
            podinfo_volume(),
            empty_dir("screwdriver"),
            empty_dir("sdtemp"),
            empty_dir("workspace"),
        ];
        if docker {
            env.extend([
                plain("SD_DIND_SHARE_PATH", DIND_SHARE),
                plain("DOCKER_HOST", "tcp://localhost:2376"),
                plain("DOCKER_CERT_PATH", DIND_CERTS),
                plain("DOCKER_TLS_VERIFY", "1"),
            ]);
            mounts.extend([
                mount("dind-share", DIND_SHARE, false),
                mount("dind-client-certs", DIND_CERTS, false),
            ]);
            volumes.extend(["dind-storage", "dind-share", "dind-client-certs"].map(empty_dir));
        }
        for v in &config.host_volumes {
            mounts.push(mount(&v.name, &v.mount_path, v.read_only));
            volumes.push(Volume {
                name: v.name.clone(),
                host_path: Some(HostPathVolumeSource {
                    path: v.path.clone(),
                    type_: v.r#type.clone().filter(|t| !t.is_empty()),
                }),
                ..Default::default()
            });
        }
        for f in &config.build_secret_files {
            mounts.push(mount(&f.name, &f.mount_path, f.read_only));
            volumes.push(Volume {
                name: f.name.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(f.secret_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        Storage {
            env,
            mounts,
            volumes,
        }
    }
}

/// The operator's `build_secrets`, each a Secret key as an environment variable.
fn secret_env(config: &KubernetesConfig) -> impl Iterator<Item = EnvVar> + '_ {
    config.build_secrets.iter().map(|s| EnvVar {
        name: s.env.clone(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.secret_name.clone(),
                key: s.key.clone(),
                optional: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The build container's: what Pod Security baseline admits, hardened as far as builds allow.
/// Builds run as the image's user (root in most images, installing packages), so they keep the
/// runtime's default capabilities less `drop_capabilities`, and a writable root file system
/// (the launcher creates `/sd` there). A privileged container gets only `privileged`: the API
/// server refuses it with `allowPrivilegeEscalation: false`, and dropping capabilities from it
/// would mean nothing.
fn build_security(config: &KubernetesConfig) -> SecurityContext {
    if config.privileged {
        return SecurityContext {
            privileged: Some(true),
            ..Default::default()
        };
    }
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(config.allow_privilege_escalation),
        capabilities: (!config.drop_capabilities.is_empty()).then(|| Capabilities {
            add: None,
            drop: Some(config.drop_capabilities.clone()),
        }),
        ..Default::default()
    }
}

/// Capabilities the launcher copy keeps: `cp -a` as root keeps each file's owner, mode and
/// times (`CHOWN`, `FOWNER`, `FSETID`) and reads whatever the image holds (`DAC_OVERRIDE`).
/// All four are in the set Pod Security baseline allows.
const LAUNCHER_CAPABILITIES: [&str; 4] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"];

/// The init container's: it only copies files from its image into the pod's volumes, so it
/// needs no privilege escalation, no write to its own root and no capability beyond the copy's.
fn launcher_security() -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            add: Some(LAUNCHER_CAPABILITIES.map(str::to_owned).to_vec()),
            drop: Some(vec!["ALL".into()]),
        }),
        ..Default::default()
    }
}

/// The init container that copies the launcher into the pod.
fn launcher_container(config: &KubernetesConfig, resources: ResourceRequirements) -> Container {
    Container {
        name: LAUNCHER_CONTAINER.into(),
        image: Some(config.launcher_image.clone()),
        // The pod's pull policy: a moving tag (`stable`, the default) is otherwise never
        // refreshed on a node that has it.
        image_pull_policy: Some(pull_policy(config.image_pull_policy).into()),
        security_context: Some(launcher_security()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), LAUNCHER_COPY.into()]),
        volume_mounts: Some(vec![
            mount("screwdriver", LAUNCHER_COPY_DIR, false),
            mount("workspace", "/workspace", false),
        ]),
        // An init container's request counts on its own; matching the build's keeps a
        // namespace LimitRange happy without raising the pod's effective request.
        resources: Some(resources),
        ..Default::default()
    }
}

/// The docker-in-docker sidecar (`screwdriver.cd/dockerEnabled`).
fn dind_sidecar(config: &KubernetesConfig, dind: &Dind) -> Container {
    Container {
        name: DIND_CONTAINER.into(),
        image: Some(config.dind_image.clone()),
        image_pull_policy: Some(pull_policy(config.image_pull_policy).into()),
        resources: Some(resources(dind.cpu, dind.ram)),
        // dockerd needs it: docker-in-docker is privileged by nature, which is why the
        // cluster must opt in (`docker_enabled`).
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("dind-storage", "/var/lib/docker", false),
            mount("dind-share", DIND_SHARE, false),
            mount("dind-client-certs", DIND_CERTS, false),
        ]),
        ..Default::default()
    }
}

/// Where the pod may run: required affinity from the disk speed and `node_selectors` (each
/// also tolerated as a `NoSchedule` taint, as executor-k8s does, so a pool reserved for builds
/// can be tainted against everything else), preferred affinity, the operator's tolerations.
fn placement(
    config: &KubernetesConfig,
    disk_speed: Option<(String, String)>,
) -> (Option<Affinity>, Vec<PodToleration>) {
    // The disk speed first, then the cluster's selectors, in executor-k8s's order.
    let required: Vec<(String, String)> = disk_speed
        .into_iter()
        .chain(config.node_selectors.clone())
        .collect();
    let preferred: Vec<(String, String)> = config
        .preferred_node_selectors
        .clone()
        .into_iter()
        .collect();
    let tolerations = config
        .tolerations
        .iter()
        .map(|t| PodToleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: None,
        })
        .chain(required.iter().map(|(k, v)| PodToleration {
            key: Some(k.clone()),
            operator: Some("Equal".into()),
            value: Some(v.clone()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        }))
        .collect();
    (affinity(&required, &preferred), tolerations)
}

/// `run.sh "{token}" "{apiUri}" "{storeUri}" "{timeout}" "{buildId}" "{uiUri}"`, as executor-k8s
/// writes it. The line is evaluated by a shell (and `eval`ed again by the entrypoint's error
/// trap): a value that could break out of its double quotes is refused rather than escaped.
fn run_line(
    build: &StartMessage,
    minutes: u64,
    screwdriver: &ScrewdriverConfig,
) -> Result<String, ExecError> {
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
    Ok(format!(
        "{LAUNCHER_DIR}/run.sh \"{token}\" \"{api}\" \"{store}\" \"{minutes}\" \"{id}\" \"{ui}\"",
        api = build.api_uri,
        store = screwdriver.store_uri,
        id = build.build_id,
        ui = screwdriver.ui_uri,
    ))
}

/// What a build asks of the pod beyond its own container, checked against what this cluster
/// offers. A build asking for something the cluster does not offer is refused with a message
/// naming the annotation: running it without would silently break it.
struct Features {
    /// The docker-in-docker sidecar's cores and GiB.
    docker: Option<Dind>,
    /// `(node label, value)` from `screwdriver.cd/diskSpeed`.
    disk_speed: Option<(String, String)>,
}

struct Dind {
    cpu: f64,
    ram: f64,
}

impl Features {
    fn of(build: &StartMessage, config: &KubernetesConfig) -> Result<Self, ExecError> {
        if build.annotation_flag(annotation::ROOTLESS_BUILDKIT_ENABLED) {
            return Err(unsupported(
                annotation::ROOTLESS_BUILDKIT_ENABLED,
                "this build cluster does not offer rootless BuildKit sidecars",
            ));
        }
        let docker = if build.annotation_flag(annotation::DOCKER_ENABLED) {
            if !config.docker_enabled {
                return Err(unsupported(
                    annotation::DOCKER_ENABLED,
                    "this build cluster does not offer docker-in-docker (executor.kubernetes.docker_enabled is off)",
                ));
            }
            Some(Dind {
                cpu: resource(build, annotation::DOCKER_CPU, &config.cpu)?,
                ram: resource(build, annotation::DOCKER_RAM, &config.ram)?,
            })
        } else {
            None
        };
        let disk_speed = match build.annotation(annotation::DISK_SPEED) {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => {
                let Some(label) = &config.disk_speed_label else {
                    return Err(unsupported(
                        annotation::DISK_SPEED,
                        "this build cluster does not place builds by disk speed (executor.kubernetes.disk_speed_label is not set)",
                    ));
                };
                let value = s.trim().to_ascii_lowercase();
                if !crate::kube_names::is_label_value(&value) {
                    return Err(ExecError::Rejected(format!(
                        "annotation {}: {s:?} is not a disk speed a node can be labelled with",
                        key(annotation::DISK_SPEED)
                    )));
                }
                Some((label.clone(), value))
            }
            Some(other) => {
                return Err(ExecError::Rejected(format!(
                    "annotation {}: {other} is not a disk speed (a string such as \"fast\")",
                    key(annotation::DISK_SPEED)
                )));
            }
        };
        Ok(Features { docker, disk_speed })
    }
}

fn unsupported(name: &str, why: &str) -> ExecError {
    ExecError::Rejected(format!(
        "annotation {}: {why}; remove the annotation or run the job on a cluster that offers it",
        key(name)
    ))
}

/// What the launcher and its tools read from the build container's environment, in
/// executor-k8s's order.
fn launcher_env(
    build: &StartMessage,
    config: &KubernetesConfig,
    screwdriver: &ScrewdriverConfig,
    timing: &Timing,
) -> Vec<EnvVar> {
    let optional = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: (!value.is_empty()).then(|| value.to_owned()),
        ..Default::default()
    };
    let from = |name: &str, source: EnvVarSource| EnvVar {
        name: name.into(),
        value_from: Some(source),
        ..Default::default()
    };
    let limit = |resource: &str| EnvVarSource {
        resource_field_ref: Some(ResourceFieldSelector {
            container_name: Some(BUILD_CONTAINER.into()),
            resource: resource.into(),
            divisor: None,
        }),
        ..Default::default()
    };
    vec![
        plain(
            "SD_HAB_ENABLED",
            if config.hab_enabled { "true" } else { "false" },
        ),
        optional(
            "SD_RUNTIME_CLASS",
            config.runtime_class.as_deref().unwrap_or_default(),
        ),
        optional("SD_PUSHGATEWAY_URL", &screwdriver.pushgateway_url),
        // run.sh's SIGTERM trap sleeps this minus one: unset, it fails at once and the
        // launcher is killed before it can abort the step, run teardown and report.
        plain(
            "SD_TERMINATION_GRACE_PERIOD_SECONDS",
            &timing.grace.as_secs().to_string(),
        ),
        plain("CONTAINER_IMAGE", &build.container),
        plain("SD_PIPELINE_ID", &build.pipeline_id().to_string()),
        plain("SD_BUILD_PREFIX", &config.prefix),
        // The launcher sends it as the build's host in every status update.
        from(
            "NODE_ID",
            EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    api_version: None,
                }),
                ..Default::default()
            },
        ),
        plain("SD_BASE_COMMAND_PATH", BASE_COMMAND_PATH),
        plain("SD_TEMP", SD_TEMP),
        from("CONTAINER_CPU_LIMIT", limit("limits.cpu")),
        from("CONTAINER_MEMORY_LIMIT", limit("limits.memory")),
    ]
}

/// Screwdriver's labels (names made label-safe, sizes), then ours with the ids. Extra labels
/// come first so they cannot hide a pod from the watcher's selector or relabel a build.
fn labels(
    build: &StartMessage,
    config: &KubernetesConfig,
    name: &str,
    cpu: f64,
    ram: f64,
) -> BTreeMap<String, String> {
    let mut labels = config.extra_labels.clone();
    let mut set = |key: &str, value: String| {
        if !value.is_empty() {
            labels.insert(key.to_owned(), value);
        }
    };
    set("app", "screwdriver".into());
    set("tier", "builds".into());
    set(LABEL_BUILD, name.to_owned());
    set(LABEL_PIPELINE, label_value_of(&build.pipeline.name));
    set(
        LABEL_JOB,
        label_value_of(build.job_name.as_deref().unwrap_or_default()),
    );
    let template = build.extra.get("template");
    for (label, field) in [
        ("screwdriver.cd/template_name", "fullName"),
        ("screwdriver.cd/template_version", "version"),
    ] {
        if let Some(text) = template.and_then(|t| t.get(field)).and_then(scalar_text) {
            set(label, label_value_of(&text));
        }
    }
    if let Some(pr) = build.extra.get("prNum").and_then(scalar_text) {
        set("screwdriver.cd/pr_number", label_value_of(&pr));
    }
    set(
        "screwdriver.cd/cpu",
        number_text(milli(cpu) as f64 / 1000.0),
    );
    set("screwdriver.cd/memory", number_text(ram));
    set("screwdriver.cd/disk", disk_size(build).into());
    set(LABEL_PIPELINE_ID, build.pipeline_id().to_string());
    set(LABEL_JOB_ID, build.job_id.to_string());
    if let Some(event) = build.event_id {
        set(LABEL_EVENT_ID, event.to_string());
    }
    labels
}

/// `screwdriver.cd/disk`: a size name, LOW when absent or anything else (it only labels the
/// pod, as in executor-k8s).
fn disk_size(build: &StartMessage) -> &'static str {
    let asked = build
        .annotation(annotation::DISK)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_ascii_uppercase());
    match asked.as_deref() {
        Some("MICRO") => "MICRO",
        Some("HIGH") => "HIGH",
        Some("TURBO") => "TURBO",
        _ => "LOW",
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `screwdriver.cd/<name>` (or its `beta.` form): a size name (any case) or a positive number
/// capped at the table's `max`; LOW when absent. Anything else is refused: a misspelt size
/// must not silently run the build on LOW.
fn resource(build: &StartMessage, name: &str, table: &ResourceTable) -> Result<f64, ExecError> {
    let invalid = |shown: String| {
        ExecError::Rejected(format!(
            "annotation {}: {shown} is not MICRO, LOW, HIGH, TURBO or a positive number",
            key(name)
        ))
    };
    let value = match build.annotation(name) {
        None => return Ok(table.low),
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

/// Limits as executor-k8s writes them (`{millicores}m`, `{GiB}Gi`), and requests equal to them
/// (what Kubernetes defaults to when only limits are set; written out so a LimitRange's
/// default request cannot lower them).
fn resources(cores: f64, gib: f64) -> ResourceRequirements {
    let quantities = BTreeMap::from([
        ("cpu".to_owned(), Quantity(format!("{}m", milli(cores)))),
        (
            "memory".to_owned(),
            Quantity(format!("{}Gi", number_text(gib))),
        ),
    ]);
    ResourceRequirements {
        limits: Some(quantities.clone()),
        requests: Some(quantities),
        ..Default::default()
    }
}

fn milli(cores: f64) -> u64 {
    ((cores * 1000.0).round() as u64).max(1)
}

/// A number as a quantity or label writes it: `12`, `0.5`, `1.25` (at most 3 decimals).
fn number_text(n: f64) -> String {
    let text = format!("{:.3}", (n * 1000.0).round() / 1000.0);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn pull_policy(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
}

fn dns_policy(p: DnsPolicy) -> &'static str {
    match p {
        DnsPolicy::ClusterFirst => "ClusterFirst",
        DnsPolicy::ClusterFirstWithHostNet => "ClusterFirstWithHostNet",
        DnsPolicy::Default => "Default",
        DnsPolicy::None => "None",
    }
}

/// Required node affinity from `required` (one term, every pair must hold) and preferred
/// affinity (weight 100) from `preferred`, as executor-k8s builds them.
fn affinity(required: &[(String, String)], preferred: &[(String, String)]) -> Option<Affinity> {
    let expressions = |pairs: &[(String, String)]| {
        pairs
            .iter()
            .map(|(k, v)| NodeSelectorRequirement {
                key: k.clone(),
                operator: "In".into(),
                values: Some(vec![v.clone()]),
            })
            .collect::<Vec<_>>()
    };
    if required.is_empty() && preferred.is_empty() {
        return None;
    }
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: (!required.is_empty()).then(
                || NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(expressions(required)),
                        match_fields: None,
                    }],
                },
            ),
            preferred_during_scheduling_ignored_during_execution: (!preferred.is_empty()).then(
                || {
                    vec![PreferredSchedulingTerm {
                        weight: 100,
                        preference: NodeSelectorTerm {
                            match_expressions: Some(expressions(preferred)),
                            match_fields: None,
                        },
                    }]
                },
            ),
        }),
        ..Default::default()
    })
}

fn plain(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

/// The pod's labels and annotations as files under `/etc/podinfo`, as executor-k8s mounts them.
fn podinfo_volume() -> Volume {
    let item = |path: &str, field: &str| DownwardAPIVolumeFile {
        path: path.into(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field.into(),
            api_version: None,
        }),
        ..Default::default()
    };
    Volume {
        name: "podinfo".into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![
                item("labels", "metadata.labels"),
                item("annotations", "metadata.annotations"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BuildSecret, HostVolume, Toleration};
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
            ..Default::default()
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
        assert_eq!(labels["screwdriver.cd/pipeline"], "mobile.app");
        assert_eq!(labels["screwdriver.cd/job"], "main");
        assert_eq!(labels[LABEL_PIPELINE_ID], "42");
        assert_eq!(labels[LABEL_JOB_ID], "1234");
        assert_eq!(labels[LABEL_EVENT_ID], "775");
        assert_eq!(
            (
                &labels["screwdriver.cd/cpu"],
                &labels["screwdriver.cd/memory"],
                &labels["screwdriver.cd/disk"]
            ),
            (&"2".to_owned(), &"2".to_owned(), &"LOW".to_owned())
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        // The launcher's 30 minutes, its 30 s grace, the 10 min margin.
        assert_eq!(spec.active_deadline_seconds, Some(1800 + 30 + 600));
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("screwdrivercd/launcher:v6"));
        assert_eq!(init.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            init.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/opt/launcher"
        );
        assert!(init.command.as_ref().unwrap()[2].contains("cp -a /opt/sd/. /opt/launcher/"));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("node:20"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(c.volume_mounts.as_ref().unwrap()[1].mount_path, "/opt/sd");
        assert_eq!(
            c.command.as_ref().unwrap(),
            &vec!["/opt/sd/launcher_entrypoint.sh".to_owned()]
        );
        assert_eq!(
            c.args.as_ref().unwrap(),
            &vec!["/opt/sd/run.sh \"eyJ.token.sig\" \"https://api.sd.example\" \"https://store.sd.example\" \"30\" \"8609\" \"https://cd.sd.example\"".to_owned()]
        );
        assert_eq!(limits(&pod), ("2000m".to_owned(), "2Gi".to_owned()));
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "2000m");
        let env: BTreeMap<&str, Option<&str>> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(env["SD_TERMINATION_GRACE_PERIOD_SECONDS"], Some("30"));
        assert_eq!(env["SD_BASE_COMMAND_PATH"], Some("/sd/commands/"));
        assert_eq!(env["SD_HAB_ENABLED"], Some("true"));
        assert_eq!(env["CONTAINER_IMAGE"], Some("node:20"));
        assert_eq!(env["SD_PIPELINE_ID"], Some("42"));
        assert_eq!(env["SD_BUILD_PREFIX"], Some("sd-"));
        assert_eq!(env["SD_TEMP"], Some("/opt/sd_tmp"));
        assert_eq!(env["NODE_ID"], None, "from the downward API");
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
                ("6000m", "12Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": 3, "screwdriver.cd/ram": "1.5"}),
                ("3000m", "1.5Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": 99, "screwdriver.cd/ram": 64}),
                ("12000m", "16Gi"),
            ),
            (
                json!({"beta.screwdriver.cd/cpu": "TURBO", "beta.screwdriver.cd/ram": "HIGH"}),
                ("12000m", "12Gi"),
            ),
            (
                json!({"screwdriver.cd/cpu": "", "screwdriver.cd/ram": null}),
                ("2000m", "2Gi"),
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
            json!({"beta.screwdriver.cd/ram": "BIG"}),
        ] {
            let key = annotations
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone();
            match build_pod(&build(annotations), &config(), &screwdriver()) {
                Err(ExecError::Rejected(m)) => {
                    assert!(m.contains(key.trim_start_matches("beta.")), "{m}")
                }
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
        cfg.timeout_margin = Duration::ZERO;
        // Timeout + the 30 s grace period: the backstop never comes before the launcher's own.
        assert_eq!(deadline(json!({}), &cfg), Some(5400 + 30));
        assert_eq!(
            deadline(json!({"screwdriver.cd/timeout": "600"}), &cfg),
            Some(7200 + 30)
        );
        assert_eq!(
            deadline(json!({"screwdriver.cd/timeout": 0.5}), &cfg),
            Some(30 + 30)
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
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "a service account does not mean its token: that is asked for on its own"
        );
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    }

    #[test]
    fn screwdriver_node_selectors_become_affinity_and_tolerations() {
        let mut cfg = config();
        cfg.node_selectors = BTreeMap::from([("pool".into(), "builds".into())]);
        cfg.preferred_node_selectors = BTreeMap::from([("zone".into(), "a".into())]);
        cfg.disk_speed_label = Some("screwdriver.cd/diskSpeed".into());
        let pod = build_pod(
            &build(json!({"screwdriver.cd/diskSpeed": "FAST"})),
            &cfg,
            &screwdriver(),
        )
        .unwrap();
        let spec = pod.spec.unwrap();
        let tolerated: Vec<_> = spec
            .tolerations
            .unwrap()
            .into_iter()
            .map(|t| (t.key.unwrap(), t.value.unwrap(), t.effect.unwrap()))
            .collect();
        assert_eq!(
            tolerated,
            vec![
                (
                    "screwdriver.cd/diskSpeed".into(),
                    "fast".into(),
                    "NoSchedule".into()
                ),
                ("pool".into(), "builds".into(), "NoSchedule".into()),
            ]
        );
        let affinity = spec.affinity.unwrap().node_affinity.unwrap();
        let required = &affinity
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let keys: Vec<_> = required
            .match_expressions
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e.key.as_str(),
                    e.operator.as_str(),
                    e.values.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("screwdriver.cd/diskSpeed", "In", vec!["fast".to_owned()]),
                ("pool", "In", vec!["builds".to_owned()]),
            ]
        );
        let preferred = &affinity
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(preferred.weight, 100);
    }

    #[test]
    fn what_a_cluster_does_not_offer_is_refused_naming_the_annotation() {
        let cases = [
            (
                json!({"screwdriver.cd/dockerEnabled": true}),
                "screwdriver.cd/dockerEnabled",
            ),
            (
                json!({"beta.screwdriver.cd/rootlessBuildkitEnabled": true}),
                "screwdriver.cd/rootlessBuildkitEnabled",
            ),
            (
                json!({"screwdriver.cd/diskSpeed": "fast"}),
                "screwdriver.cd/diskSpeed",
            ),
        ];
        for (annotations, named) in cases {
            match build_pod(&build(annotations.clone()), &config(), &screwdriver()) {
                Err(ExecError::Rejected(m)) => assert!(m.contains(named), "{annotations}: {m}"),
                other => panic!("{annotations}: {other:?}"),
            }
        }
        // Off is off: no sidecar, nothing refused.
        let off = build_pod(
            &build(json!({"screwdriver.cd/dockerEnabled": false})),
            &config(),
            &screwdriver(),
        )
        .unwrap();
        assert_eq!(off.spec.unwrap().containers.len(), 1);
    }

    #[test]
    fn docker_in_docker_when_the_cluster_offers_it() {
        let mut cfg = config();
        cfg.docker_enabled = true;
        let pod = build_pod(
            &build(
                json!({"screwdriver.cd/dockerEnabled": "true", "screwdriver.cd/dockerCpu": "HIGH"}),
            ),
            &cfg,
            &screwdriver(),
        )
        .unwrap();
        let spec = pod.spec.unwrap();
        let dind = &spec.containers[1];
        assert_eq!(dind.name, "dind");
        assert_eq!(
            dind.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
        assert_eq!(
            dind.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0,
            "6000m"
        );
        let build_env: Vec<_> = spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(build_env.contains(&"DOCKER_HOST") && build_env.contains(&"DOCKER_TLS_VERIFY"));
        assert_eq!(
            spec.containers[0]
                .security_context
                .as_ref()
                .unwrap()
                .privileged,
            Some(false),
            "only the sidecar is privileged"
        );
    }

    #[test]
    fn build_pods_are_hardened_as_far_as_the_launcher_allows() {
        let pod = build_pod(&build(json!({})), &config(), &screwdriver()).unwrap();
        let spec = pod.spec.unwrap();
        let seccomp = spec.security_context.unwrap().seccomp_profile.unwrap();
        assert_eq!(seccomp.type_, "RuntimeDefault");
        let c = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(
            (c.privileged, c.allow_privilege_escalation),
            (Some(false), Some(false))
        );
        let caps = c.capabilities.unwrap();
        assert_eq!(
            (caps.add, caps.drop),
            (None, Some(vec!["NET_RAW".to_owned()]))
        );
        assert_eq!(
            c.read_only_root_filesystem, None,
            "the launcher creates /sd at the image's root"
        );
        assert_eq!(c.run_as_non_root, None, "builds run as the image's user");
        let init = spec.init_containers.unwrap()[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(
            (
                init.allow_privilege_escalation,
                init.read_only_root_filesystem
            ),
            (Some(false), Some(true))
        );
        let caps = init.capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            caps.add,
            Some(LAUNCHER_CAPABILITIES.map(str::to_owned).to_vec())
        );

        // What builds that need more can be given.
        let build_context = |cfg: &KubernetesConfig| {
            let pod = build_pod(&build(json!({})), cfg, &screwdriver()).unwrap();
            pod.spec.unwrap().containers[0]
                .security_context
                .clone()
                .unwrap()
        };
        let mut cfg = config();
        cfg.allow_privilege_escalation = true;
        cfg.drop_capabilities = Vec::new();
        let c = build_context(&cfg);
        assert_eq!(
            (c.allow_privilege_escalation, c.capabilities),
            (Some(true), None)
        );
        // A privileged container carries nothing the API server would refuse beside it.
        cfg.privileged = true;
        let c = build_context(&cfg);
        assert_eq!(
            c,
            SecurityContext {
                privileged: Some(true),
                ..Default::default()
            }
        );
    }

    #[test]
    fn operator_settings_reach_the_pod() {
        let mut cfg = config();
        cfg.image_pull_policy = PullPolicy::IfNotPresent;
        cfg.dns_policy = DnsPolicy::Default;
        cfg.runtime_class = Some("gvisor".into());
        cfg.privileged = true;
        cfg.hab_enabled = false;
        cfg.pod_annotations = BTreeMap::from([("a.example/x".into(), "y".into())]);
        cfg.host_volumes = vec![HostVolume {
            name: "kvm".into(),
            mount_path: "/dev/kvm".into(),
            path: "/dev/kvm".into(),
            r#type: Some("CharDevice".into()),
            read_only: false,
        }];
        cfg.build_secrets = vec![BuildSecret {
            env: "SSH_CA".into(),
            secret_name: "sd-secret".into(),
            key: "private".into(),
        }];
        let mut b = build(json!({"screwdriver.cd/terminationGracePeriodSeconds": 90}));
        b.extra.insert("prNum".into(), json!(17));
        b.extra.insert(
            "template".into(),
            json!({"fullName": "sd/node build", "version": "2.1.0"}),
        );
        let pod = build_pod(&b, &cfg, &screwdriver()).unwrap();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["screwdriver.cd/pr_number"], "17");
        assert_eq!(labels["screwdriver.cd/template_name"], "sd.node.build");
        assert_eq!(labels["screwdriver.cd/template_version"], "2.1.0");
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["a.example/x"],
            "y"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(90));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
        let c = &spec.containers[0];
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
        let env = c.env.as_ref().unwrap();
        let value = |n: &str| env.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(
            value("SD_TERMINATION_GRACE_PERIOD_SECONDS")
                .value
                .as_deref(),
            Some("90")
        );
        assert_eq!(value("SD_RUNTIME_CLASS").value.as_deref(), Some("gvisor"));
        assert_eq!(value("SD_HAB_ENABLED").value.as_deref(), Some("false"));
        assert_eq!(
            value("SSH_CA")
                .value_from
                .unwrap()
                .secret_key_ref
                .unwrap()
                .name,
            "sd-secret"
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == "kvm" && m.mount_path == "/dev/kvm")
        );
        assert!(
            spec.volumes
                .unwrap()
                .iter()
                .any(|v| v.name == "kvm"
                    && v.host_path.as_ref().is_some_and(|h| h.path == "/dev/kvm"))
        );
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
