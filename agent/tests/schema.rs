//! Every build pod the agent makes, and every object in `deploy/kubernetes/*.yaml`, against the
//! official Kubernetes OpenAPI schemas in strict mode (unknown fields are errors), for the oldest
//! and the newest Kubernetes we support.
//!
//! The validator is `kubernetes-validate` (PyPI), which `scripts/test` installs through
//! `ensure_kubernetes_validate` in `scripts/lib/deps.sh` and names in `SD_KUBERNETES_VALIDATE`.
//! It runs once per Kubernetes version over all files at once (a few hundred milliseconds each).
//!
//! To cover a new pod feature, add cases to [`cases`].

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{deploy_manifests, start_message, workspace};
use sd_agent::config::{
    BuildSecret, BuildSecretFile, DnsPolicy, HostVolume, KubernetesConfig, PodSecurity, PullPolicy,
    ResourceTable, ScrewdriverConfig, Toleration,
};
use sd_agent::executor::kubernetes::build_pod;
use sd_protocol::StartMessage;
use serde_json::{Value, json};

/// The Kubernetes minors every object must validate against: the oldest and newest we support.
///
/// Newest, 1.37: the newest schemas kubernetes-validate ships (1.37.0, pinned in
/// `scripts/lib/deps.sh`; each release carries 1.25 up to its own version), and the version
/// k8s-openapi's `latest` feature (the one the workspace builds with) stands for.
///
/// Oldest, 1.33: in December 2026 upstream maintains 1.35–1.37, and EKS extended support (26
/// months after EKS's release) still covers 1.32 (until 2027-03-23) and 1.33 (until 2027-07-29).
/// But the agent speaks to the API server through k8s-openapi 0.29 (`Cargo.lock`), whose oldest
/// supported Kubernetes is 1.33 (features `v1_33`…`v1_37`, `earliest = ["v1_33"]`); 1.32 is out
/// of reach for that reason. Move this when k8s-openapi is upgraded (its `earliest` feature) or
/// 1.33 leaves EKS extended support, whichever drops 1.33 first; raise the newest together with
/// the pin in `scripts/lib/deps.sh`.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33", "1.37"];

/// The `KubernetesConfig` every case starts from: `KubernetesConfig { field: .., ..base() }`.
fn base() -> KubernetesConfig {
    KubernetesConfig {
        namespace: "sd-builds".into(),
        prefix: "sd-".into(),
        launcher_image: "screwdrivercd/launcher:v6.0.200".into(),
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

/// The matrix: every case's pod must pass the schemas. Names become file names (`[a-z0-9-.]`)
/// and show in failures. Add cases here as the pod builder grows.
fn cases() -> Vec<(String, StartMessage, KubernetesConfig)> {
    let mut cases = vec![
        ("defaults".to_owned(), start_message(json!({})), base()),
        (
            "no-prefix-default-namespace".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                prefix: String::new(),
                namespace: "default".into(),
                ..base()
            },
        ),
    ];

    // Sizes: every name, in any case, numbers (as numbers and strings), tiny values, values
    // above the cap, and empty/null (LOW).
    let sizes = [
        (json!("MICRO"), json!("MICRO")),
        (json!("LOW"), json!("LOW")),
        (json!("HIGH"), json!("HIGH")),
        (json!("TURBO"), json!("TURBO")),
        (json!("micro"), json!("Turbo")),
        (json!(3), json!("1.5")),
        (json!("0.25"), json!(0.5)),
        (json!(0.0001), json!(0.0001)),
        (json!(99), json!(1024)),
        (json!(""), Value::Null),
    ];
    for (i, (cpu, ram)) in sizes.into_iter().enumerate() {
        cases.push((
            format!("size-{i}-cpu-{}-ram-{}", shown(&cpu), shown(&ram)),
            start_message(json!({"screwdriver.cd/cpu": cpu, "screwdriver.cd/ram": ram})),
            base(),
        ));
    }
    cases.push((
        "size-custom-tables".to_owned(),
        start_message(json!({"screwdriver.cd/cpu": "TURBO", "screwdriver.cd/ram": "MICRO"})),
        KubernetesConfig {
            cpu: ResourceTable {
                micro: 0.1,
                low: 0.5,
                high: 1.5,
                turbo: 64.0,
                max: 64.0,
            },
            ram: ResourceTable {
                micro: 0.25,
                low: 0.75,
                high: 3.0,
                turbo: 256.0,
                max: 256.0,
            },
            ..base()
        },
    ));

    // Timeouts: minutes as numbers and strings, fractions, above the cap, invalid (default).
    for (name, timeout) in [
        ("timeout-1", json!(1)),
        ("timeout-half-minute", json!(0.5)),
        ("timeout-string-45", json!("45")),
        ("timeout-above-max", json!(100_000)),
        ("timeout-invalid", json!("soon")),
    ] {
        cases.push((
            name.to_owned(),
            start_message(json!({"screwdriver.cd/timeout": timeout})),
            base(),
        ));
    }
    cases.push((
        "timeout-week-long-max".to_owned(),
        start_message(json!({"screwdriver.cd/timeout": 10_080})),
        KubernetesConfig {
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(7 * 24 * 3600),
            ..base()
        },
    ));

    // Cluster settings, one at a time and all together.
    let node_selector = BTreeMap::from([
        ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
        ("pool".to_owned(), "builds".to_owned()),
    ]);
    let tolerations = vec![
        Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("builds".into()),
            effect: Some("NoSchedule".into()),
        },
        Toleration {
            key: Some("spot".into()),
            operator: Some("Exists".into()),
            value: None,
            effect: Some("NoExecute".into()),
        },
        // Tolerates every taint.
        Toleration {
            key: None,
            operator: Some("Exists".into()),
            value: None,
            effect: None,
        },
    ];
    let extra_labels = BTreeMap::from([
        ("team".to_owned(), "ios".to_owned()),
        ("example.com/cost-center".to_owned(), "ci-1234".to_owned()),
        // Overridden by the builder: the watcher's selector must keep matching.
        ("app".to_owned(), "mine".to_owned()),
    ]);
    let pull_secrets = vec!["regcred".to_owned(), "ghcr-pull".to_owned()];
    cases.extend([
        (
            "node-selector".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                node_selector: node_selector.clone(),
                ..base()
            },
        ),
        (
            "tolerations".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                tolerations: tolerations.clone(),
                ..base()
            },
        ),
        (
            "service-account".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                service_account: Some("sd-build".into()),
                ..base()
            },
        ),
        (
            "image-pull-secrets".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                image_pull_secrets: pull_secrets.clone(),
                ..base()
            },
        ),
        (
            "extra-labels".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                extra_labels: extra_labels.clone(),
                ..base()
            },
        ),
        (
            "everything".to_owned(),
            start_message(json!({
                "screwdriver.cd/cpu": "HIGH", "screwdriver.cd/ram": 7.5,
                "screwdriver.cd/timeout": 240, "screwdriver.cd/buildCluster": "ios-farm",
            })),
            KubernetesConfig {
                namespace: "ci-builds".into(),
                prefix: "build-".into(),
                launcher_image: "registry.example.com:5000/sd/launcher@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
                node_selector,
                tolerations,
                service_account: Some("sd-build".into()),
                image_pull_secrets: pull_secrets,
                extra_labels,
                ..base()
            },
        ),
    ]);

    // Screwdriver's settings and annotations, one feature a case, then all of them together.
    let screwdriver_everything = KubernetesConfig {
        node_selectors: BTreeMap::from([("pool".into(), "builds".into())]),
        preferred_node_selectors: BTreeMap::from([(
            "topology.kubernetes.io/zone".into(),
            "us-east-1a".into(),
        )]),
        disk_speed_label: Some("screwdriver.cd/diskSpeed".into()),
        docker_enabled: true,
        runtime_class: Some("gvisor".into()),
        dns_policy: DnsPolicy::ClusterFirstWithHostNet,
        image_pull_policy: PullPolicy::IfNotPresent,
        privileged: true,
        pod_security: PodSecurity::Privileged,
        automount_service_account_token: true,
        service_account: Some("sd-build".into()),
        hab_enabled: false,
        pod_annotations: BTreeMap::from([(
            "cluster-autoscaler.kubernetes.io/safe-to-evict".into(),
            "false".into(),
        )]),
        lifecycle_hooks: Some(
            serde_json::from_value(
                json!({"preStop": {"exec": {"command": ["/bin/sh", "-c", "sleep 5"]}}}),
            )
            .unwrap(),
        ),
        host_volumes: vec![HostVolume {
            name: "kvm".into(),
            mount_path: "/dev/kvm".into(),
            path: "/dev/kvm".into(),
            r#type: Some("CharDevice".into()),
            read_only: false,
        }],
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
        termination_grace_period: Duration::from_secs(45),
        ..base()
    };
    let mut pr = start_message(json!({
        "beta.screwdriver.cd/cpu": "TURBO", "beta.screwdriver.cd/ram": "HIGH",
        "screwdriver.cd/timeout": 60, "screwdriver.cd/terminationGracePeriodSeconds": 90,
        "screwdriver.cd/dockerEnabled": true, "screwdriver.cd/dockerCpu": "HIGH",
        "screwdriver.cd/dockerRam": 3, "screwdriver.cd/diskSpeed": "FAST",
        "screwdriver.cd/disk": "HIGH",
    }));
    pr.job_name = Some("PR-17:main".into());
    pr.extra.insert("prNum".into(), json!(17));
    pr.extra.insert(
        "template".into(),
        json!({"fullName": "screwdriver-cd/node build", "version": "2.1.0"}),
    );
    cases.extend([
        (
            "screwdriver-node-selectors".to_owned(),
            start_message(json!({"screwdriver.cd/diskSpeed": "slow"})),
            KubernetesConfig {
                node_selectors: screwdriver_everything.node_selectors.clone(),
                preferred_node_selectors: screwdriver_everything.preferred_node_selectors.clone(),
                disk_speed_label: screwdriver_everything.disk_speed_label.clone(),
                ..base()
            },
        ),
        (
            "docker-in-docker".to_owned(),
            start_message(json!({"screwdriver.cd/dockerEnabled": true})),
            KubernetesConfig {
                docker_enabled: true,
                pod_security: PodSecurity::Privileged,
                ..base()
            },
        ),
        (
            "privilege-escalation-all-capabilities-dropped".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                allow_privilege_escalation: true,
                drop_capabilities: vec!["ALL".into()],
                ..base()
            },
        ),
        (
            "no-capabilities-dropped".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                drop_capabilities: Vec::new(),
                ..base()
            },
        ),
        (
            "lifecycle-volumes-secrets".to_owned(),
            start_message(json!({})),
            KubernetesConfig {
                pod_security: PodSecurity::Privileged,
                lifecycle_hooks: screwdriver_everything.lifecycle_hooks.clone(),
                host_volumes: screwdriver_everything.host_volumes.clone(),
                build_secrets: screwdriver_everything.build_secrets.clone(),
                build_secret_files: screwdriver_everything.build_secret_files.clone(),
                ..base()
            },
        ),
        (
            "screwdriver-everything".to_owned(),
            pr,
            screwdriver_everything,
        ),
    ]);
    cases
}

/// An annotation value as part of a case name.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "empty".into(),
        Value::String(s) => s.to_ascii_lowercase(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// `SD_KUBERNETES_VALIDATE`, else where `ensure_kubernetes_validate` installs it. Never skips.
fn validator() -> PathBuf {
    const HINT: &str = "run scripts/test (it installs kubernetes-validate under target/tools), or `. scripts/lib/deps.sh && ensure_kubernetes_validate`, or set SD_KUBERNETES_VALIDATE to a kubernetes-validate command";
    if let Some(path) = std::env::var_os("SD_KUBERNETES_VALIDATE") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SD_KUBERNETES_VALIDATE={} does not exist: {HINT}",
            path.display()
        );
        return path;
    }
    let installed = workspace().join("target/tools/kubernetes-validate/bin/kubernetes-validate");
    assert!(
        installed.is_file(),
        "kubernetes-validate not found (SD_KUBERNETES_VALIDATE is unset and {} does not exist): {HINT}",
        installed.display()
    );
    installed
}

/// Runs the validator in strict mode over `files`, one process per Kubernetes version, all at
/// once; returns `(version, output)` in the order of [`KUBERNETES_VERSIONS`].
fn validate_strict(files: &[PathBuf]) -> Vec<(&'static str, Output)> {
    let validator = validator();
    let children: Vec<_> = KUBERNETES_VERSIONS
        .iter()
        .map(|version| {
            let child = Command::new(&validator)
                .args(["--strict", "--kubernetes-version", version])
                .args(files)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {}: {e}; run scripts/test or set SD_KUBERNETES_VALIDATE",
                        validator.display()
                    )
                });
            (*version, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(version, child)| (version, child.wait_with_output().unwrap()))
        .collect()
}

/// The index of the file among `files` a validator line is about (`LEVEL FILE …`; the longest
/// match wins).
fn file_of(line: &str, files: &[(PathBuf, String)]) -> Option<usize> {
    let rest = line.split_once(' ')?.1;
    (0..files.len())
        .filter(|&i| rest.starts_with(&format!("{} ", files[i].0.display())))
        .max_by_key(|&i| files[i].0.as_os_str().len())
}

/// Non-empty documents of a multi-document YAML file (`---` lines separate them; a document of
/// comments only does not count, as the validator skips it).
fn yaml_documents(text: &str) -> usize {
    text.split('\n')
        .collect::<Vec<_>>()
        .split(|line| line.trim_end() == "---" || line.starts_with("--- "))
        .filter(|doc| {
            doc.iter().any(|line| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with('#')
            })
        })
        .count()
}

#[test]
fn every_pod_and_manifest_passes_the_strict_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    // (file, what it is for failure messages); the objects each holds; the pods' JSON.
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let mut expected: Vec<usize> = Vec::new();
    let mut shown: BTreeMap<PathBuf, String> = BTreeMap::new();

    let cases = cases();
    let mut names = BTreeSet::new();
    for (name, start, config) in &cases {
        assert!(names.insert(name.clone()), "two cases are named {name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)),
            "case name {name:?}: use [a-z0-9.-], it becomes a file name"
        );
        config
            .check()
            .unwrap_or_else(|e| panic!("case {name}: not a config the agent starts with: {e}"));
        let pod = build_pod(start, config, &screwdriver())
            .unwrap_or_else(|e| panic!("case {name}: the pod builder refused it: {e}"));
        let text = serde_json::to_string_pretty(&pod).unwrap();
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, &text).unwrap();
        files.push((path.clone(), format!("case {name}")));
        expected.push(1);
        shown.insert(path, text);
    }
    for path in deploy_manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        let what = format!(
            "manifest {}",
            path.strip_prefix(workspace()).unwrap_or(&path).display()
        );
        expected.push(yaml_documents(&text));
        files.push((path, what));
    }

    let started = Instant::now();
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let runs = validate_strict(&paths);
    let elapsed = started.elapsed();

    let mut failures = Vec::new();
    for (version, output) in &runs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut passed = vec![0usize; files.len()];
        let mut problems = Vec::new();
        for line in stdout.lines() {
            match (line.starts_with("INFO "), file_of(line, &files)) {
                (true, Some(i))
                    if line.contains(" passed for resource ")
                        && line.ends_with(&format!(" against version {version}")) =>
                {
                    passed[i] += 1
                }
                (_, Some(i)) => problems.push((Some(i), line.to_owned())),
                (_, None) => problems.push((None, line.to_owned())),
            }
        }
        for (i, (&passed, &expected)) in passed.iter().zip(&expected).enumerate() {
            if passed != expected && !problems.iter().any(|(p, _)| *p == Some(i)) {
                problems.push((
                    Some(i),
                    format!("{passed} object(s) passed, {expected} expected"),
                ));
            }
        }
        if !output.status.success() || !problems.is_empty() {
            let mut report = format!(
                "kubernetes-validate --strict --kubernetes-version {version}: {}",
                output.status
            );
            for (i, line) in &problems {
                match i {
                    Some(i) => report += &format!("\n  {}: {line}", files[*i].1),
                    None => report += &format!("\n  {line}"),
                }
            }
            for i in problems
                .iter()
                .filter_map(|(i, _)| *i)
                .collect::<BTreeSet<_>>()
            {
                if let Some(text) = shown.get(&files[i].0) {
                    report += &format!("\n  {} as validated:\n{text}", files[i].1);
                }
            }
            if !stderr.trim().is_empty() {
                report += &format!("\n  stderr:\n{stderr}");
            }
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "objects fail the Kubernetes schemas:\n{}",
        failures.join("\n\n")
    );
    eprintln!(
        "{} pods and {} manifest objects pass Kubernetes {} (strict) in {elapsed:.2?}",
        cases.len(),
        expected[cases.len()..].iter().sum::<usize>(),
        KUBERNETES_VERSIONS.join(" and ")
    );
}

/// The validator must reject what the API server would: without this a validator that checks
/// nothing (wrong schema directory, non-strict mode, a YAML loader reading one document) passes.
#[test]
fn the_validator_rejects_broken_pods() {
    let (name, start, config) = cases().into_iter().next().unwrap();
    let pod = serde_json::to_value(build_pod(&start, &config, &screwdriver()).unwrap()).unwrap();
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut pod = pod.clone();
        edit(&mut pod);
        pod
    };
    // (file, content, what the validator must say about it)
    let mut cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown-container-field.json",
            broken(&|p| p["spec"]["containers"][0]["imagePullPolicyy"] = json!("Always"))
                .to_string(),
            "'imagePullPolicyy' was unexpected",
        ),
        (
            "unknown-init-container-resources-field.json",
            broken(&|p| {
                p["spec"]["initContainers"][0]["resources"]["limitz"] = json!({"cpu": "1"})
            })
            .to_string(),
            "'limitz' was unexpected",
        ),
        (
            "unknown-metadata-field.json",
            broken(&|p| p["metadata"]["label"] = json!({"app": "screwdriver"})).to_string(),
            "'label' was unexpected",
        ),
        (
            "deadline-as-string.json",
            broken(&|p| p["spec"]["activeDeadlineSeconds"] = json!("600")).to_string(),
            "is not of type 'integer'",
        ),
        (
            "container-without-name.json",
            broken(&|p| {
                p["spec"]["containers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("name");
            })
            .to_string(),
            "'name' is a required property",
        ),
    ];
    // The last document of a multi-document YAML file is read too.
    let agent_yaml = std::fs::read_to_string(workspace().join("deploy/kubernetes/agent.yaml"))
        .expect("deploy/kubernetes/agent.yaml");
    cases.push((
        "manifest-with-a-broken-last-document.yaml",
        format!(
            "{agent_yaml}\n---\n{}\n",
            broken(&|p| p["spec"]["restartPolicyy"] = json!("Never"))
        ),
        "'restartPolicyy' was unexpected",
    ));

    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(PathBuf, String)> = cases
        .iter()
        .map(|(file, content, _)| {
            let path = dir.path().join(file);
            std::fs::write(&path, content).unwrap();
            (path, format!("broken {file} (from case {name})"))
        })
        .collect();
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    for (version, output) in validate_strict(&paths) {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "kubernetes-validate {version} accepted broken pods:\n{stdout}"
        );
        for (i, ((_, what), (_, _, reason))) in files.iter().zip(&cases).enumerate() {
            let said = stdout.lines().any(|line| {
                line.starts_with("ERROR ")
                    && file_of(line, &files) == Some(i)
                    && line.contains(&format!(" against version {version}: "))
                    && line.contains(reason)
            });
            assert!(
                said,
                "kubernetes-validate {version} did not reject {what} with \"{reason}\":\n{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// The same matrix through the test API server, which validates as kube-apiserver does (names,
/// label values, quantities, requests ≤ limits, volume references, … that a schema cannot
/// express), with unknown fields refused (`fieldValidation=Strict`): every pod is created.
#[tokio::test]
async fn every_pod_is_accepted_by_an_api_server_that_validates() {
    let kube = sd_testkit::kube_api::FakeKube::start().await;
    let http = reqwest::Client::new();
    for (name, start, config) in cases() {
        let pod = build_pod(&start, &config, &screwdriver())
            .unwrap_or_else(|e| panic!("case {name}: the builder refused: {e}"));
        let url = format!(
            "{}/api/v1/namespaces/{}/pods?fieldValidation=Strict",
            kube.url, config.namespace
        );
        let answer = http.post(&url).json(&pod).send().await.unwrap();
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 201, "case {name}: {body}");
        // Start over for the next case: pod names repeat.
        let created: Value = serde_json::from_str(&body).unwrap();
        kube.delete_unwatched(created["metadata"]["name"].as_str().unwrap());
    }
}
