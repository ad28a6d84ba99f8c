//! What the manifests in `deploy/kubernetes/` and the build pods the agent makes may do, checked
//! three ways:
//!
//! - the Pod Security Standards, their controls evaluated here ([`violations`]): every workload
//!   at the level its namespace enforces (`restricted` for the agent's and the scheduler's),
//!   and build pods at `executor.kubernetes.pod_security`, which must be the label of the
//!   builds' namespace; the config refuses exactly the settings that break its level;
//! - the NetworkPolicies, evaluated here over a matrix of connections ([`reachable`]): builds
//!   reach DNS and the internet, never the agents' health port, their Redis, the nodes or the
//!   cloud's metadata service;
//! - checkov's Kubernetes checks (PyPI, pinned in `scripts/lib/deps.sh`, which `scripts/test`
//!   installs and names in `SD_CHECKOV`) over the manifests and the pods the manifests' own
//!   config makes: any failed check fails the test, and every skipped check says why where it
//!   is skipped (a `checkov.io/skipN` annotation in the manifest; [`BUILD_POD_SKIPS`] for build
//!   pods, written into each scanned pod as the same annotations).
//!
//! YAML is read with the Python of checkov's virtual environment (checkov depends on PyYAML).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{deploy_manifests, start_message, workspace};
use sd_agent::config::{
    BuildSecret, BuildSecretFile, Config, HostVolume, KubernetesConfig, PodSecurity, Toleration,
};
use sd_agent::executor::kubernetes::build_pod;
use sd_protocol::StartMessage;
use serde_json::{Value, json};

const HINT: &str = "run scripts/test (it installs checkov under target/tools), or `. scripts/lib/deps.sh && ensure_checkov`, or set SD_CHECKOV to a checkov command installed in a virtual environment";

/// `SD_CHECKOV`, else where `ensure_checkov` installs it. Never skips.
fn checkov() -> PathBuf {
    let path = std::env::var_os("SD_CHECKOV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/tools/checkov/bin/checkov"));
    assert!(
        path.is_file(),
        "checkov not found at {}: {HINT}",
        path.display()
    );
    path
}

/// The Python beside checkov, which has PyYAML.
fn python() -> PathBuf {
    let checkov = checkov();
    let python = checkov.with_file_name("python");
    assert!(
        python.is_file(),
        "no python beside {} (checkov outside a virtual environment?): {HINT}",
        checkov.display()
    );
    python
}

/// Every document of the YAML files, in order (documents of comments only left out).
fn read_yaml(files: &[PathBuf]) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d is not None]\n\
        print(json.dumps(docs))";
    let output = Command::new(python())
        .args(["-c", SCRIPT])
        .args(files)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "reading {files:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

fn objects<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == kind)
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("?")
}

/// The config the DaemonSet's ConfigMap holds, loaded as the agent loads it (with the key and
/// the Redis password at temporary paths, where the pod has its mounted Secrets).
fn deployed_config(docs: &[Value]) -> Config {
    let text = objects(docs, "ConfigMap")
        .find_map(|c| c["data"]["agent.toml"].as_str())
        .expect("a ConfigMap with agent.toml in deploy/kubernetes");
    let dir = tempfile::tempdir().unwrap();
    let (key, password) = (dir.path().join("key.pem"), dir.path().join("password"));
    std::fs::write(&key, "unused here").unwrap();
    std::fs::write(&password, "0123abcd").unwrap();
    Config::parse(
        text,
        Path::new("agent.yaml"),
        [
            ("SD_AGENT_AUTH_PRIVATE_KEY_FILE", &key),
            ("SD_AGENT_REDIS_PASSWORD_FILE", &password),
        ]
        .map(|(k, v)| (k.to_owned(), v.display().to_string())),
    )
    .unwrap_or_else(|e| panic!("the DaemonSet's agent.toml: {e}"))
}

/// The builds every config is tried with: plain, every size and a timeout, a PR of a template.
fn builds() -> Vec<(&'static str, StartMessage)> {
    let mut pr = start_message(json!({
        "screwdriver.cd/cpu": "TURBO", "screwdriver.cd/ram": "HIGH",
        "screwdriver.cd/timeout": 240, "screwdriver.cd/terminationGracePeriodSeconds": 90,
    }));
    pr.job_name = Some("PR-17:main".into());
    pr.extra.insert("prNum".into(), json!(17));
    pr.extra.insert(
        "template".into(),
        json!({"fullName": "screwdriver-cd/node build", "version": "2.1.0"}),
    );
    vec![
        ("plain", start_message(json!({}))),
        (
            "sized",
            start_message(json!({"screwdriver.cd/cpu": "MICRO", "screwdriver.cd/ram": 7.5})),
        ),
        ("pr", pr),
    ]
}

/// The deployed config with every setting a baseline namespace admits turned on.
fn everything_at_baseline(deployed: &KubernetesConfig) -> KubernetesConfig {
    KubernetesConfig {
        node_selectors: BTreeMap::from([("pool".into(), "builds".into())]),
        tolerations: vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("builds".into()),
            effect: Some("NoSchedule".into()),
        }],
        runtime_class: Some("gvisor".into()),
        service_account: Some("sd-build".into()),
        image_pull_secrets: vec!["regcred".into()],
        lifecycle_hooks: Some(
            serde_json::from_value(
                json!({"preStop": {"exec": {"command": ["/bin/sh", "-c", "sleep 5"]}}}),
            )
            .unwrap(),
        ),
        build_secrets: vec![BuildSecret {
            env: "SSH_CA".into(),
            secret_name: "sd-secret".into(),
            key: "private".into(),
        }],
        build_secret_files: vec![BuildSecretFile {
            name: "signing".into(),
            mount_path: "/etc/signing".into(),
            secret_name: "sd-signing".into(),
            read_only: true,
        }],
        pod_annotations: BTreeMap::from([(
            "cluster-autoscaler.kubernetes.io/safe-to-evict".into(),
            "false".into(),
        )]),
        ..deployed.clone()
    }
}

fn pod_json(start: &StartMessage, config: &KubernetesConfig, sd: &Config) -> Value {
    let pod = build_pod(start, config, &sd.screwdriver)
        .unwrap_or_else(|e| panic!("the pod builder refused a build: {e}"));
    serde_json::to_value(pod).unwrap()
}

// === Pod Security Standards ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    fn of_label(value: &str) -> Level {
        match value {
            "privileged" => Level::Privileged,
            "baseline" => Level::Baseline,
            "restricted" => Level::Restricted,
            other => panic!("not a Pod Security level: {other:?}"),
        }
    }

    fn of_config(level: PodSecurity) -> Level {
        Level::of_label(level.label())
    }
}

/// Capabilities baseline lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// The sysctls baseline calls safe (as of Kubernetes 1.29).
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
/// The volume types restricted allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// The controls of `level` that `pod` (a Pod, or a workload's pod template: `metadata` and
/// `spec`) breaks, each named with the container or field at fault. Follows the Pod Security
/// Standards' published controls; empty for `privileged`.
fn violations(pod: &Value, level: Level) -> Vec<String> {
    let mut found = Vec::new();
    if level == Level::Privileged {
        return found;
    }
    let spec = &pod["spec"];
    let pod_sc = &spec["securityContext"];
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect();
    let name = |c: &Value| c["name"].as_str().unwrap_or("?").to_owned();
    let mut contexts: Vec<(String, &Value)> = vec![("the pod".to_owned(), pod_sc)];
    contexts.extend(
        containers
            .iter()
            .map(|c| (format!("container {}", name(c)), &c["securityContext"])),
    );

    // Baseline.
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[field] == json!(true) {
            found.push(format!("host namespaces: {field}"));
        }
    }
    for (who, sc) in &contexts {
        if sc["windowsOptions"]["hostProcess"] == json!(true) {
            found.push(format!("HostProcess: {who}"));
        }
        if sc["appArmorProfile"]["type"] == "Unconfined" {
            found.push(format!("AppArmor: {who} is unconfined"));
        }
        if sc["seccompProfile"]["type"] == "Unconfined" {
            found.push(format!("seccomp: {who} is unconfined"));
        }
        let selinux = &sc["seLinuxOptions"];
        let selinux_type = selinux["type"].as_str().unwrap_or("");
        if ![
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ]
        .contains(&selinux_type)
            || !selinux["user"].is_null()
            || !selinux["role"].is_null()
        {
            found.push(format!("SELinux: {who} sets {selinux}"));
        }
    }
    for c in &containers {
        let sc = &c["securityContext"];
        if sc["privileged"] == json!(true) {
            found.push(format!("privileged: container {}", name(c)));
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or("?");
            if !BASELINE_CAPABILITIES.contains(&cap) {
                found.push(format!("capabilities: container {} adds {cap}", name(c)));
            }
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().unwrap_or(0) != 0 {
                found.push(format!("host ports: container {}", name(c)));
            }
        }
        if !sc["procMount"].is_null() && sc["procMount"] != "Default" {
            found.push(format!("/proc mount: container {}", name(c)));
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        if volume.get("hostPath").is_some() {
            found.push(format!("hostPath volume {}", volume["name"]));
        }
    }
    for sysctl in pod_sc["sysctls"].as_array().into_iter().flatten() {
        let sysctl = sysctl["name"].as_str().unwrap_or("?");
        if !SAFE_SYSCTLS.contains(&sysctl) {
            found.push(format!("sysctls: {sysctl}"));
        }
    }
    for (key, value) in pod["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let value = value.as_str().unwrap_or("");
        if key.starts_with("container.apparmor.security.beta.kubernetes.io/")
            && value != "runtime/default"
            && !value.starts_with("localhost/")
        {
            found.push(format!("AppArmor: annotation {key}: {value}"));
        }
    }
    if level == Level::Baseline {
        return found;
    }

    // Restricted.
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let types: Vec<&String> = volume
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .filter(|k| *k != "name")
            .collect();
        if types
            .iter()
            .any(|t| !RESTRICTED_VOLUMES.contains(&t.as_str()))
        {
            found.push(format!("volume types: {} is {types:?}", volume["name"]));
        }
    }
    let pod_non_root = pod_sc["runAsNonRoot"] == json!(true);
    let pod_seccomp = matches!(
        pod_sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault" | "Localhost")
    );
    if pod_sc["runAsUser"] == json!(0) {
        found.push("running as non-root user: the pod's runAsUser is 0".into());
    }
    for c in &containers {
        let sc = &c["securityContext"];
        let who = name(c);
        if sc["allowPrivilegeEscalation"] != json!(false) {
            found.push(format!("privilege escalation: container {who}"));
        }
        let non_root = &sc["runAsNonRoot"];
        if non_root == &json!(false) || (!pod_non_root && non_root != &json!(true)) {
            found.push(format!("running as non-root: container {who}"));
        }
        if sc["runAsUser"] == json!(0) {
            found.push(format!("running as non-root user: container {who}"));
        }
        let seccomp = sc["seccompProfile"]["type"].as_str();
        if !(matches!(seccomp, Some("RuntimeDefault" | "Localhost"))
            || (seccomp.is_none() && pod_seccomp))
        {
            found.push(format!("seccomp: container {who} has no profile"));
        }
        let caps = &sc["capabilities"];
        if !caps["drop"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("ALL")))
        {
            found.push(format!("capabilities: container {who} does not drop ALL"));
        }
        if caps["add"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c != "NET_BIND_SERVICE")
        {
            found.push(format!(
                "capabilities: container {who} adds more than NET_BIND_SERVICE"
            ));
        }
    }
    found
}

/// Each namespace's enforced level, from the Namespace objects' labels.
fn enforced_levels(docs: &[Value]) -> BTreeMap<String, Level> {
    objects(docs, "Namespace")
        .map(|ns| {
            let label = ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!(
                        "namespace {} has no pod-security.kubernetes.io/enforce label",
                        name_of(ns)
                    )
                });
            (name_of(ns).to_owned(), Level::of_label(label))
        })
        .collect()
}

/// The workloads of the manifests: (kind/name, namespace, pod template).
fn workloads(docs: &[Value]) -> Vec<(String, String, &Value)> {
    docs.iter()
        .filter_map(|d| {
            let template = match d["kind"].as_str()? {
                "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                    &d["spec"]["template"]
                }
                "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"],
                "Pod" => d,
                _ => return None,
            };
            Some((
                format!("{}/{}", d["kind"].as_str()?, name_of(d)),
                d["metadata"]["namespace"].as_str()?.to_owned(),
                template,
            ))
        })
        .collect()
}

#[test]
fn every_workload_meets_the_level_its_namespace_enforces() {
    let docs = read_yaml(&deploy_manifests());
    let levels = enforced_levels(&docs);
    for ns in ["sd-agent", "sd-scheduler"] {
        assert_eq!(levels.get(ns), Some(&Level::Restricted), "namespace {ns}");
    }
    let workloads = workloads(&docs);
    assert!(
        workloads.len() >= 3,
        "the agent, its Redis, the scheduler: {workloads:?}"
    );
    for (what, ns, template) in &workloads {
        let level = levels
            .get(ns)
            .unwrap_or_else(|| panic!("{what}: namespace {ns} is not in deploy/kubernetes"));
        let found = violations(template, *level);
        assert!(
            found.is_empty(),
            "{what} breaks Pod Security {level:?}: {found:#?}"
        );
    }
}

#[test]
fn build_pods_meet_the_level_of_the_builds_namespace() {
    let docs = read_yaml(&deploy_manifests());
    let levels = enforced_levels(&docs);
    let sd = deployed_config(&docs);
    let deployed = &sd.executor.kubernetes;
    let level = Level::of_config(deployed.pod_security);
    assert_eq!(
        levels.get(&deployed.namespace),
        Some(&level),
        "the builds' namespace ({}) enforces what executor.kubernetes.pod_security says",
        deployed.namespace
    );
    assert_eq!(level, Level::Baseline);
    let everything = everything_at_baseline(deployed);
    for config in [deployed, &everything] {
        config.check().expect("a config the agent starts with");
        for (name, start) in builds() {
            let pod = pod_json(&start, config, &sd);
            let found = violations(&pod, Level::Baseline);
            assert!(found.is_empty(), "build {name}: {found:#?}");
            // Not restricted, and why: the launcher must be able to run as root.
            let restricted = violations(&pod, Level::Restricted);
            assert!(
                restricted
                    .iter()
                    .any(|v| v.starts_with("running as non-root: container build")),
                "{restricted:#?}"
            );
        }
    }
}

/// The config refuses a setting at a level exactly when the pods it makes would break it.
#[test]
fn the_config_refuses_what_the_namespace_would() {
    let docs = read_yaml(&deploy_manifests());
    let sd = deployed_config(&docs);
    let base = sd.executor.kubernetes.clone();
    let (plain, dind) = (
        start_message(json!({})),
        start_message(json!({"screwdriver.cd/dockerEnabled": true})),
    );
    let cases: Vec<(&str, KubernetesConfig)> = vec![
        (
            "privileged",
            KubernetesConfig {
                privileged: true,
                ..base.clone()
            },
        ),
        (
            "docker_enabled",
            KubernetesConfig {
                docker_enabled: true,
                ..base.clone()
            },
        ),
        (
            "host_volumes",
            KubernetesConfig {
                host_volumes: vec![HostVolume {
                    name: "kvm".into(),
                    mount_path: "/dev/kvm".into(),
                    path: "/dev/kvm".into(),
                    r#type: Some("CharDevice".into()),
                    read_only: false,
                }],
                ..base.clone()
            },
        ),
        (
            "allow_privilege_escalation",
            KubernetesConfig {
                allow_privilege_escalation: true,
                drop_capabilities: Vec::new(),
                ..base.clone()
            },
        ),
    ];
    for (what, config) in cases {
        let start = if config.docker_enabled { &dind } else { &plain };
        let pod = pod_json(start, &config, &sd);
        let broken = violations(&pod, Level::Baseline);
        let refused = config.check();
        assert_eq!(
            refused.is_err(),
            !broken.is_empty(),
            "{what}: config says {refused:?}, the pod breaks {broken:?}"
        );
        if let Err(e) = refused {
            assert!(e.to_string().contains(what), "{what}: {e}");
            let admitted = KubernetesConfig {
                pod_security: PodSecurity::Privileged,
                ..config
            };
            admitted
                .check()
                .unwrap_or_else(|e| panic!("{what} at privileged: {e}"));
        }
    }
}

/// The evaluator must see what Pod Security admission sees: a checker that finds nothing passes
/// every test above. Each control is broken in a pod that otherwise meets the level: a build pod
/// for baseline, the agent's own for restricted.
#[test]
fn the_pod_security_evaluator_catches_each_control() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let docs = read_yaml(&deploy_manifests());
    let sd = deployed_config(&docs);
    let a_build = pod_json(&start_message(json!({})), &sd.executor.kubernetes, &sd);
    let agent_pod = workloads(&docs)
        .into_iter()
        .find(|(what, ..)| what == "DaemonSet/sd-agent")
        .expect("the agent's DaemonSet")
        .2
        .clone();
    assert!(violations(&a_build, Level::Baseline).is_empty());
    assert!(violations(&agent_pod, Level::Restricted).is_empty());
    let baseline: Vec<(&str, Edit)> = vec![
        (
            "host namespaces",
            Box::new(|p: &mut Value| p["spec"]["hostPID"] = json!(true)),
        ),
        (
            "privileged",
            Box::new(|p: &mut Value| {
                p["spec"]["initContainers"][0]["securityContext"]["privileged"] = json!(true)
            }),
        ),
        (
            "capabilities",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                    json!(["SYS_ADMIN"])
            }),
        ),
        (
            "hostPath",
            Box::new(|p: &mut Value| {
                p["spec"]["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}))
            }),
        ),
        (
            "host ports",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 80}])
            }),
        ),
        (
            "seccomp",
            Box::new(|p: &mut Value| {
                p["spec"]["securityContext"]["seccompProfile"]["type"] = json!("Unconfined")
            }),
        ),
        (
            "sysctls",
            Box::new(|p: &mut Value| {
                p["spec"]["securityContext"]["sysctls"] =
                    json!([{"name": "kernel.msgmax", "value": "1"}])
            }),
        ),
        (
            "SELinux",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["seLinuxOptions"] =
                    json!({"type": "spc_t"})
            }),
        ),
        (
            "AppArmor",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["appArmorProfile"] =
                    json!({"type": "Unconfined"})
            }),
        ),
    ];
    let restricted: Vec<(&str, Edit)> = vec![
        (
            "privilege escalation",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
                    json!(true)
            }),
        ),
        (
            "capabilities",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] =
                    json!(["NET_RAW"])
            }),
        ),
        (
            "capabilities",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                    json!(["CHOWN"])
            }),
        ),
        (
            "running as non-root",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = json!(false)
            }),
        ),
        (
            "running as non-root user",
            Box::new(|p: &mut Value| p["spec"]["securityContext"]["runAsUser"] = json!(0)),
        ),
        (
            "seccomp",
            Box::new(|p: &mut Value| {
                p["spec"]["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("seccompProfile");
            }),
        ),
        (
            "volume types",
            Box::new(|p: &mut Value| {
                p["spec"]["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "nfs", "nfs": {"server": "nfs", "path": "/"}}))
            }),
        ),
    ];
    let cases = baseline
        .into_iter()
        .map(|(control, edit)| (control, Level::Baseline, &a_build, edit))
        .chain(
            restricted
                .into_iter()
                .map(|(control, edit)| (control, Level::Restricted, &agent_pod, edit)),
        );
    for (control, level, pod, edit) in cases {
        let mut broken = pod.clone();
        edit(&mut broken);
        let found = violations(&broken, level);
        assert!(
            found.iter().any(|v| v.starts_with(control)),
            "{control} at {level:?}: found {found:?}"
        );
    }
}

// === NetworkPolicies ===

/// One end of a connection: a pod (namespace and labels) or an address outside the cluster.
struct Peer {
    namespace: Option<&'static str>,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
}

fn pod(namespace: &'static str, labels: &[(&str, &str)], ip: [u8; 4]) -> Peer {
    Peer {
        namespace: Some(namespace),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ip: Ipv4Addr::from(ip),
    }
}

fn outside(ip: [u8; 4]) -> Peer {
    Peer {
        namespace: None,
        labels: BTreeMap::new(),
        ip: Ipv4Addr::from(ip),
    }
}

/// A label selector (`matchLabels`, `matchExpressions`) against labels; `{}` selects all.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let by_expression = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let value = labels.get(e["key"].as_str().unwrap_or(""));
            let listed = |v: &String| {
                e["values"]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|x| x == v.as_str()))
            };
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(listed),
                Some("NotIn") => !value.is_some_and(listed),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                other => panic!("selector operator {other:?}"),
            }
        });
    by_label && by_expression
}

fn in_cidr(cidr: &str, ip: Ipv4Addr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        panic!("CIDR {cidr:?}")
    };
    let Ok(net) = net.parse::<Ipv4Addr>() else {
        return false; // IPv6: the addresses here are IPv4
    };
    let bits: u32 = bits.parse().expect("prefix length");
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    u32::from(net) & mask == u32::from(ip) & mask
}

/// The labels a namespace's selector sees: its name label, and the manifests' labels.
fn namespace_labels(docs: &[Value], namespace: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_owned(),
        namespace.to_owned(),
    )]);
    if let Some(ns) = objects(docs, "Namespace").find(|n| name_of(n) == namespace) {
        for (k, v) in ns["metadata"]["labels"].as_object().into_iter().flatten() {
            labels.insert(k.clone(), v.as_str().unwrap_or("").to_owned());
        }
    }
    labels
}

/// Whether the policies of `subject`'s namespace let it talk to `other` (`direction` Egress)
/// or be talked to by it (Ingress) on `protocol`/`port`. No policy selecting it: allowed.
fn admits(
    docs: &[Value],
    subject: &Peer,
    other: &Peer,
    direction: &str,
    protocol: &str,
    port: u16,
) -> bool {
    let Some(ns) = subject.namespace else {
        return true;
    };
    let (rules, peers) = match direction {
        "Ingress" => ("ingress", "from"),
        _ => ("egress", "to"),
    };
    let applying: Vec<&Value> = objects(docs, "NetworkPolicy")
        .filter(|p| p["metadata"]["namespace"] == ns)
        .filter(|p| selects(&p["spec"]["podSelector"], &subject.labels))
        .filter(|p| {
            let types = p["spec"]["policyTypes"].as_array();
            match types {
                Some(types) => types.iter().any(|t| t == direction),
                None => direction == "Ingress" || p["spec"].get("egress").is_some(),
            }
        })
        .collect();
    if applying.is_empty() {
        return true;
    }
    let peer_matches = |peer: &Value| {
        if let Some(block) = peer.get("ipBlock") {
            let cidr = block["cidr"].as_str().expect("ipBlock.cidr");
            return in_cidr(cidr, other.ip)
                && !block["except"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| in_cidr(e.as_str().unwrap_or(""), other.ip));
        }
        let Some(other_ns) = other.namespace else {
            return false; // selectors pick pods only
        };
        let ns_ok = match peer.get("namespaceSelector") {
            Some(selector) => selects(selector, &namespace_labels(docs, other_ns)),
            None => other_ns == ns,
        };
        ns_ok
            && peer
                .get("podSelector")
                .is_none_or(|selector| selects(selector, &other.labels))
    };
    let port_matches = |p: &Value| {
        let same_protocol = p["protocol"].as_str().unwrap_or("TCP") == protocol;
        let first = match &p["port"] {
            Value::Null => return same_protocol,
            Value::Number(n) => n.as_u64().expect("port"),
            named => panic!("named port {named}: not modelled here"),
        };
        let last = p["endPort"].as_u64().unwrap_or(first);
        same_protocol && (first..=last).contains(&u64::from(port))
    };
    applying.iter().any(|p| {
        p["spec"][rules]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let peers_ok = match rule[peers].as_array() {
                    Some(list) if !list.is_empty() => list.iter().any(peer_matches),
                    _ => true,
                };
                let ports_ok = match rule["ports"].as_array() {
                    Some(list) if !list.is_empty() => list.iter().any(port_matches),
                    _ => true,
                };
                peers_ok && ports_ok
            })
    })
}

/// `from` may open a connection to `to` on `protocol`/`port`: both ends' policies admit it.
fn reachable(docs: &[Value], from: &Peer, to: &Peer, protocol: &str, port: u16) -> bool {
    admits(docs, from, to, "Egress", protocol, port)
        && admits(docs, to, from, "Ingress", protocol, port)
}

#[test]
fn network_policies_keep_builds_to_dns_and_the_internet() {
    let docs = read_yaml(&deploy_manifests());
    let build = pod(
        "sd-builds",
        &[("app", "screwdriver"), ("tier", "builds")],
        [10, 244, 1, 5],
    );
    let other_build = pod(
        "sd-builds",
        &[("app", "screwdriver"), ("tier", "builds")],
        [10, 244, 3, 9],
    );
    let agent = pod("sd-agent", &[("app", "sd-agent")], [10, 244, 2, 3]);
    let redis = pod("sd-agent", &[("app", "sd-agent-redis")], [10, 244, 2, 4]);
    let scheduler = pod("sd-scheduler", &[("app", "sd-scheduler")], [10, 244, 4, 2]);
    let dns = pod("kube-system", &[("k8s-app", "kube-dns")], [10, 244, 0, 10]);
    let prometheus = pod("monitoring", &[("app", "prometheus")], [10, 244, 5, 7]);
    let github = outside([140, 82, 112, 3]);
    let remote_scheduler = outside([203, 0, 113, 10]);
    let api_server = outside([10, 0, 0, 1]);
    let kubelet = outside([10, 0, 0, 5]);
    let metadata = outside([169, 254, 169, 254]);
    let database = outside([198, 51, 100, 20]);
    let load_balancer = outside([198, 51, 100, 7]);

    let cases: Vec<(&str, &Peer, &Peer, &str, u16, bool)> = vec![
        ("a build resolves names", &build, &dns, "UDP", 53, true),
        ("a build fetches sources", &build, &github, "TCP", 443, true),
        (
            "a build reaches an agent's health port",
            &build,
            &agent,
            "TCP",
            8081,
            false,
        ),
        (
            "a build reaches the agents' Redis",
            &build,
            &redis,
            "TCP",
            6379,
            false,
        ),
        (
            "a build reaches the kubelet",
            &build,
            &kubelet,
            "TCP",
            10250,
            false,
        ),
        (
            "a build reaches the metadata service",
            &build,
            &metadata,
            "TCP",
            80,
            false,
        ),
        (
            "a build reaches another build",
            &build,
            &other_build,
            "TCP",
            8080,
            false,
        ),
        (
            "a build reaches an in-cluster scheduler",
            &build,
            &scheduler,
            "TCP",
            8080,
            false,
        ),
        (
            "Prometheus scrapes an agent",
            &prometheus,
            &agent,
            "TCP",
            8081,
            true,
        ),
        (
            "Prometheus reaches the agents' Redis",
            &prometheus,
            &redis,
            "TCP",
            6379,
            false,
        ),
        ("an agent uses its Redis", &agent, &redis, "TCP", 6379, true),
        ("an agent resolves names", &agent, &dns, "UDP", 53, true),
        (
            "an agent polls the scheduler",
            &agent,
            &remote_scheduler,
            "TCP",
            443,
            true,
        ),
        (
            "an agent calls the API server",
            &agent,
            &api_server,
            "TCP",
            6443,
            true,
        ),
        (
            "an agent opens a build's port",
            &agent,
            &build,
            "TCP",
            8080,
            false,
        ),
        ("Redis calls out", &redis, &github, "TCP", 443, false),
        (
            "agents reach the scheduler's API",
            &load_balancer,
            &scheduler,
            "TCP",
            8080,
            true,
        ),
        (
            "the scheduler reaches its database",
            &scheduler,
            &database,
            "TCP",
            5432,
            true,
        ),
        (
            "the scheduler reports to Screwdriver",
            &scheduler,
            &github,
            "TCP",
            443,
            true,
        ),
        (
            "the scheduler opens SSH",
            &scheduler,
            &github,
            "TCP",
            22,
            false,
        ),
        (
            "anyone reaches the scheduler's other ports",
            &load_balancer,
            &scheduler,
            "TCP",
            9090,
            false,
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, from, to, protocol, port, expected)| {
            reachable(&docs, from, to, protocol, *port) != *expected
        })
        .map(|(what, .., expected)| {
            format!(
                "{what}: expected {}",
                if *expected { "allowed" } else { "denied" }
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Every namespace we deploy into denies by default: a new workload starts closed.
    for ns in ["sd-agent", "sd-builds", "sd-scheduler"] {
        let stranger = pod(ns, &[("app", "something-new")], [10, 244, 9, 9]);
        assert!(
            !reachable(&docs, &stranger, &github, "TCP", 443) || ns == "sd-builds",
            "{ns}: a new pod may call out"
        );
        assert!(
            !reachable(&docs, &prometheus, &stranger, "TCP", 80),
            "{ns}: a new pod may be called"
        );
    }
}

// === Images ===

/// Every image in the manifests, and the launcher the deployed config names, is pinned: a
/// version tag (never `latest` or `stable`) or a digest; ours carry this crate's version.
#[test]
fn images_are_pinned_by_version() {
    let docs = read_yaml(&deploy_manifests());
    let sd = deployed_config(&docs);
    let mut images: Vec<String> = workloads(&docs)
        .iter()
        .flat_map(|(_, _, t)| {
            ["initContainers", "containers"]
                .iter()
                .flat_map(|k| t["spec"][*k].as_array().into_iter().flatten())
                .map(|c| c["image"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    images.push(sd.executor.kubernetes.launcher_image.clone());
    assert!(images.len() >= 4, "{images:?}");
    for image in &images {
        let (name, tag) = match image.split_once('@') {
            Some((_, digest)) => {
                assert!(digest.starts_with("sha256:"), "{image}");
                continue;
            }
            None => image
                .rsplit_once(':')
                .filter(|(_, tag)| !tag.contains('/'))
                .unwrap_or_else(|| panic!("{image}: no tag")),
        };
        assert!(
            tag.chars().any(|c| c.is_ascii_digit()) && !["latest", "stable"].contains(&tag),
            "{image}: not a version"
        );
        if name.starts_with("sd-buildcluster/") {
            assert_eq!(
                tag,
                env!("CARGO_PKG_VERSION"),
                "{image}: our images carry the workspace's version; raise the tag with it"
            );
        }
    }
}

// === checkov ===

/// Checks skipped on every build pod, and why. Each becomes a `checkov.io/skipN` annotation on
/// the scanned pod, checkov's in-place form.
const BUILD_POD_SKIPS: &[(&str, &str)] = &[
    (
        "CKV_K8S_8",
        "a build runs to completion and the agent watches its pod; there is nothing to probe",
    ),
    (
        "CKV_K8S_9",
        "a build runs to completion and the agent watches its pod; there is nothing to probe",
    ),
    (
        "CKV_K8S_22",
        "the launcher creates /sd at the build image's root and builds install packages; the launcher's init container has a read-only root",
    ),
    (
        "CKV_K8S_23",
        "builds run as the build image's user, root in most images, and the launcher copies its files as root; Pod Security baseline admits it",
    ),
    (
        "CKV_K8S_37",
        "root builds need the runtime's default capabilities (package managers chown and setuid); NET_RAW is dropped (drop_capabilities) and the init container drops ALL",
    ),
    (
        "CKV_K8S_25",
        "the launcher copy (cp -a as root) keeps owners and modes: after dropping ALL it adds back CHOWN, DAC_OVERRIDE, FOWNER and FSETID, all within baseline",
    ),
    (
        "CKV_K8S_40",
        "builds run as the build image's user, root in most images",
    ),
    (
        "CKV_K8S_43",
        "the build image is the pipeline's choice (screwdriver.yaml); the launcher image is the operator's launcher_image, which may name a digest",
    ),
];
/// More, on the pod of the config that uses them.
const BUILD_SECRETS_SKIP: (&str, &str) = (
    "CKV_K8S_35",
    "build_secrets is executor-k8s's buildSecrets, environment variables by the operator's choice; build_secret_files mounts them as files",
);

/// `pod` with the skips as checkov's annotations.
fn with_skips(mut pod: Value, skips: &[(&str, &str)]) -> Value {
    let annotations = pod["metadata"]
        .as_object_mut()
        .unwrap()
        .entry("annotations")
        .or_insert_with(|| json!({}));
    for (i, (id, why)) in skips.iter().enumerate() {
        annotations[format!("checkov.io/skip{}", i + 1)] = json!(format!("{id}={why}"));
    }
    pod
}

/// checkov's JSON report as one list of results (it prints one object per framework).
fn results(report: &Value, kind: &str) -> Vec<Value> {
    let reports = match report {
        Value::Array(list) => list.clone(),
        one => vec![one.clone()],
    };
    reports
        .iter()
        .flat_map(|r| r["results"][kind].as_array().cloned().unwrap_or_default())
        .collect()
}

fn shown(result: &Value) -> String {
    format!(
        "{} {} on {} in {}",
        result["check_id"].as_str().unwrap_or("?"),
        result["check_name"].as_str().unwrap_or(""),
        result["resource"].as_str().unwrap_or("?"),
        result["file_path"].as_str().unwrap_or("?")
    )
}

#[test]
fn checkov_passes_the_manifests_and_the_build_pods() {
    let docs = read_yaml(&deploy_manifests());
    let sd = deployed_config(&docs);
    let deployed = sd.executor.kubernetes.clone();
    let everything = everything_at_baseline(&deployed);
    // Not tempfile's default `.tmpXXXX`: checkov leaves hidden directories out.
    let dir = tempfile::Builder::new()
        .prefix("checkov-scan-")
        .tempdir()
        .unwrap();
    // Each manifest, and a copy without its skips (`unskipped-*`), which must fail exactly the
    // checks skipped in the original: no skip is stale or hides more than it says.
    for file in deploy_manifests() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(dir.path().join(&name), &text).unwrap();
        std::fs::write(
            dir.path().join(format!("unskipped-{name}")),
            without_skips(&text),
        )
        .unwrap();
    }
    let mut pods = Vec::new();
    for (config_name, config, extra) in [
        ("deployed", &deployed, None),
        ("everything", &everything, Some(BUILD_SECRETS_SKIP)),
    ] {
        for (build_name, start) in builds() {
            let skips: Vec<(&str, &str)> = BUILD_POD_SKIPS.iter().copied().chain(extra).collect();
            let pod = with_skips(pod_json(&start, config, &sd), &skips);
            let file = format!("pod-{config_name}-{build_name}.yaml");
            std::fs::write(
                dir.path().join(&file),
                serde_json::to_string_pretty(&pod).unwrap(),
            )
            .unwrap();
            pods.push(file);
        }
    }
    // The canary: a build pod made privileged, on the host's PID namespace and docker socket,
    // with the same skips. checkov must flag it (the scan works) and skip what it is told (the
    // annotations are read).
    let mut canary = with_skips(pod_json(&builds()[0].1, &deployed, &sd), BUILD_POD_SKIPS);
    canary["metadata"]["name"] = json!("canary");
    canary["spec"]["hostPID"] = json!(true);
    canary["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    canary["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}));
    canary["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "docker", "mountPath": "/var/run/docker.sock"}));
    std::fs::write(
        dir.path().join("canary.yaml"),
        serde_json::to_string_pretty(&canary).unwrap(),
    )
    .unwrap();
    // A build pod of the deployed config without the skips: it fails exactly those.
    std::fs::write(
        dir.path().join("unskipped-pod.yaml"),
        serde_json::to_string_pretty(&pod_json(&builds()[0].1, &deployed, &sd)).unwrap(),
    )
    .unwrap();
    let expected_to_fail = |file: &str| file == "canary.yaml" || file.starts_with("unskipped-");

    let started = Instant::now();
    let output = Command::new(checkov())
        .args([
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-download",
            "--directory",
        ])
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run checkov: {e}: {HINT}"));
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON report ({e}, {}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let (passed, failed, skipped) = (
        results(&report, "passed_checks"),
        results(&report, "failed_checks"),
        results(&report, "skipped_checks"),
    );
    let errors = results(&report, "parsing_errors");
    assert!(errors.is_empty(), "checkov could not parse: {errors:?}");
    let in_file = |r: &Value, file: &str| {
        // checkov names files as `/<scanned directory's name>/<file>`.
        r["file_path"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("/{file}")))
    };

    let file_of = |r: &Value| -> String {
        let path = r["file_path"].as_str().unwrap_or("");
        path.rsplit('/').next().unwrap_or(path).to_owned()
    };
    let failures: Vec<String> = failed
        .iter()
        .filter(|r| !expected_to_fail(&file_of(r)))
        .map(shown)
        .collect();
    assert!(
        failures.is_empty(),
        "checkov fails {} check(s); fix them, or skip one where it applies with the reason (a checkov.io/skipN annotation, or BUILD_POD_SKIPS):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every skip says why.
    for r in &skipped {
        let why = r["check_result"]["suppress_comment"].as_str().unwrap_or("");
        assert!(
            why.split_whitespace().count() >= 5,
            "skipped without a reason: {}",
            shown(r)
        );
    }
    // Each scanned file was checked (a file checkov did not read would pass vacuously), and
    // checks that must pass on every pod did.
    let files: Vec<String> = deploy_manifests()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .chain(pods.iter().cloned())
        .collect();
    for file in &files {
        assert!(
            passed.iter().any(|r| in_file(r, file)),
            "checkov checked nothing in {file}"
        );
    }
    for file in &pods {
        for id in ["CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_28", "CKV_K8S_31"] {
            assert!(
                passed
                    .iter()
                    .any(|r| in_file(r, file) && r["check_id"] == id),
                "{file}: {id} did not pass"
            );
        }
        let ids: BTreeSet<&str> = skipped
            .iter()
            .filter(|r| in_file(r, file))
            .filter_map(|r| r["check_id"].as_str())
            .collect();
        assert!(
            BUILD_POD_SKIPS.iter().all(|(id, _)| ids.contains(id)),
            "{file}: skipped {ids:?}"
        );
    }
    let canary_failed: BTreeSet<&str> = failed
        .iter()
        .filter(|r| in_file(r, "canary.yaml"))
        .filter_map(|r| r["check_id"].as_str())
        .collect();
    for id in ["CKV_K8S_16", "CKV_K8S_17"] {
        assert!(
            canary_failed.contains(id),
            "the canary passed {id}: {canary_failed:?}"
        );
    }
    let canary_skipped: BTreeSet<&str> = skipped
        .iter()
        .filter(|r| in_file(r, "canary.yaml"))
        .filter_map(|r| r["check_id"].as_str())
        .collect();
    assert!(
        BUILD_POD_SKIPS
            .iter()
            .all(|(id, _)| canary_skipped.contains(id) && !canary_failed.contains(id)),
        "the canary's skips were not all honoured: skipped {canary_skipped:?}, failed {canary_failed:?}"
    );
    // Every skip is needed: without them, exactly the skipped checks fail.
    let checks_in = |results: &[Value], file: &str| -> BTreeSet<(String, String)> {
        results
            .iter()
            .filter(|r| in_file(r, file))
            .map(|r| {
                (
                    r["resource"].as_str().unwrap_or("?").to_owned(),
                    r["check_id"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    };
    let mut unskipped: Vec<(String, BTreeSet<(String, String)>)> = deploy_manifests()
        .iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let skips = checks_in(&skipped, &name);
            (format!("unskipped-{name}"), skips)
        })
        .collect();
    let pod_resource = checks_in(&passed, &pods[0])
        .into_iter()
        .next()
        .map(|(resource, _)| resource)
        .expect("the first pod was checked");
    unskipped.push((
        "unskipped-pod.yaml".into(),
        BUILD_POD_SKIPS
            .iter()
            .map(|(id, _)| (pod_resource.clone(), (*id).to_owned()))
            .collect(),
    ));
    for (file, skips) in &unskipped {
        assert_eq!(
            &checks_in(&failed, file),
            skips,
            "{file}: what fails without the skips (left) is not what is skipped (right): drop a skip that is no longer needed"
        );
    }
    eprintln!(
        "checkov: {} passed, {} skipped (each with its reason, each needed), 0 failed over {} manifest file(s) and {} build pods in {elapsed:.1?}",
        passed
            .iter()
            .filter(|r| !expected_to_fail(&file_of(r)))
            .count(),
        skipped
            .iter()
            .filter(|r| !expected_to_fail(&file_of(r)))
            .count(),
        files.len() - pods.len(),
        pods.len()
    );
}

/// `text` (a manifest) without its `checkov.io/skipN` annotations; an `annotations:` left
/// empty becomes `annotations: {}`.
fn without_skips(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("checkov.io/skip"))
        .collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        let next = lines.get(i + 1).copied().unwrap_or("");
        if line.trim_end().ends_with("annotations:") && indent(next) <= indent(line) {
            out.push_str(" {}");
        }
        out.push('\n');
    }
    assert_ne!(out, format!("{text}\n"), "no skips to take out");
    out
}
