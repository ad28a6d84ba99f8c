use serde_json::{Value, json};

use super::*;

/// A build pod using every kind of field the rules cover, valid as it stands.
fn full_pod() -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "sd-42", "namespace": "builds",
            "labels": {"app": "screwdriver", "screwdriver.cd/pipeline": "42", "empty": ""},
            "annotations": {"screwdriver.cd/timeout": "30", "Example.com/Key": "x"},
        },
        "spec": {
            "restartPolicy": "Never", "dnsPolicy": "ClusterFirst",
            "activeDeadlineSeconds": 1800, "terminationGracePeriodSeconds": 30,
            "serviceAccountName": "sd-build", "runtimeClassName": "gvisor",
            "automountServiceAccountToken": false,
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "builds"},
            "securityContext": {"runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        },
    });
    let spec = &mut pod["spec"];
    spec["tolerations"] = tolerations_of_builds();
    spec["affinity"] = affinity_of_builds();
    spec["volumes"] = volumes_of_builds();
    spec["initContainers"] = json!([launcher()]);
    spec["containers"] = json!([build_container()]);
    pod
}

fn tolerations_of_builds() -> Value {
    json!([
        {"key": "dedicated", "operator": "Equal", "value": "builds", "effect": "NoSchedule"},
        {"operator": "Exists"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    ])
}

fn affinity_of_builds() -> Value {
    let required = json!({"nodeSelectorTerms": [
        {"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
            {"key": "cores", "operator": "Gt", "values": ["4"]},
            {"key": "spot", "operator": "DoesNotExist"},
        ]},
    ]});
    let preferred = json!([
        {"weight": 100, "preference": {"matchExpressions": [{"key": "fast", "operator": "Exists"}]}},
    ]);
    json!({"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": required,
        "preferredDuringSchedulingIgnoredDuringExecution": preferred,
    }})
}

fn volumes_of_builds() -> Value {
    let downward = json!({"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "cpu", "resourceFieldRef": {"containerName": "build", "resource": "limits.cpu", "divisor": "1m"}},
    ]});
    json!([
        {"name": "screwdriver", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "podinfo", "downwardAPI": downward},
        {"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}},
        {"name": "token", "secret": {"secretName": "build-token", "defaultMode": 420, "items": [{"key": "t", "path": "token"}]}},
    ])
}

fn launcher() -> Value {
    json!({
        "name": "launcher", "image": "screwdrivercd/launcher:v6",
        "command": ["/bin/sh", "-c", "cp -a /opt/sd/. /opt/launcher/"],
        "volumeMounts": [{"name": "screwdriver", "mountPath": "/opt/launcher"}],
        "resources": {"limits": {"cpu": "2", "memory": "2Gi"}, "requests": {"cpu": "500m", "memory": "2048Mi"}},
    })
}

fn build_container() -> Value {
    let mut c = json!({
        "name": "build", "image": "node:20", "imagePullPolicy": "IfNotPresent",
        "command": ["/opt/sd/launcher_entrypoint.sh", "/opt/sd/run.sh \"token\""],
        "args": ["anything", "goes", ""],
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "screwdriver", "mountPath": "/opt/sd", "readOnly": true},
            {"name": "podinfo", "mountPath": "/etc/podinfo"},
            {"name": "docker", "mountPath": "/var/run/docker.sock", "subPath": "x/y"},
        ],
        "resources": {"limits": {"cpu": "6", "memory": "16Gi", "example.com/gpu": "1"},
                      "requests": {"cpu": "6000m", "memory": "16Gi", "example.com/gpu": "1"}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "readinessProbe": {"tcpSocket": {"port": 8080}},
    });
    c["env"] = json!([
        {"name": "SD_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SD_LABEL", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels['app']"}}},
        {"name": "SD_CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
        {"name": "SD_TOKEN", "valueFrom": {"secretKeyRef": {"name": "build-token", "key": "t"}}},
        {"name": "SD_PLAIN", "value": "x"},
        {"name": "SD_PLAIN", "value": "duplicates are allowed"},
    ]);
    c["lifecycle"] = json!({
        "postStart": {"exec": {"command": ["touch", "/tmp/started"]}},
        "preStop": {"sleep": {"seconds": 5}},
    });
    c["securityContext"] = json!({
        "privileged": false, "allowPrivilegeEscalation": false, "runAsUser": 1000,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/build.json"},
    });
    c
}

/// The causes of `pod`, as `field: message`.
fn causes(pod: &Value) -> Vec<String> {
    validate_pod(pod).iter().map(Cause::rendered).collect()
}

/// The causes after `change` to the full pod.
fn with(change: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut pod = full_pod();
    change(&mut pod);
    causes(&pod)
}

fn reasons(pod: &Value) -> Vec<&'static str> {
    validate_pod(pod).iter().map(|c| c.kind.reason()).collect()
}

const SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

#[test]
fn the_full_pod_is_valid() {
    assert_eq!(causes(&full_pod()), Vec::<String>::new());
}

#[test]
fn metadata() {
    assert_eq!(
        with(|p| p["metadata"]["name"] = json!("Sd_42")),
        [format!(
            "metadata.name: Invalid value: \"Sd_42\": {SUBDOMAIN}"
        )]
    );
    assert_eq!(
        with(|p| {
            p["metadata"].as_object_mut().unwrap().remove("name");
        }),
        ["metadata.name: Required value: name or generateName is required"]
    );
    assert_eq!(
        with(|p| p["metadata"]["labels"]["bad key"] = json!("x")),
        [
            "metadata.labels: Invalid value: \"bad key\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        ]
    );
    assert_eq!(
        with(|p| p["metadata"]["labels"]["team"] = json!("-ios")),
        [
            "metadata.labels: Invalid value: \"-ios\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        ]
    );
    assert_eq!(
        with(|p| p["metadata"]["labels"]["long"] = json!("v".repeat(64))),
        [format!(
            "metadata.labels: Invalid value: \"{}\": must be no more than 63 characters",
            "v".repeat(64)
        )]
    );
    assert_eq!(
        with(|p| p["metadata"]["annotations"]["a/b/c"] = json!("x")),
        [
            "metadata.annotations: Invalid value: \"a/b/c\": a valid label key must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    );
    assert_eq!(
        with(|p| p["metadata"]["annotations"]["big"] = json!("x".repeat(256 * 1024))),
        ["metadata.annotations: Too long: may not be more than 262144 bytes"]
    );
}

#[test]
fn containers_are_required_named_and_unique() {
    assert_eq!(
        with(|p| p["spec"]["containers"] = json!([])),
        ["spec.containers: Required value"]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["name"] = json!("Build_1")),
        [format!(
            "spec.containers[0].name: Invalid value: \"Build_1\": {LABEL}"
        )]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["name"] = json!("launcher")),
        ["spec.initContainers[0].name: Duplicate value: \"launcher\""]
    );
    assert_eq!(
        with(|p| {
            p["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("image");
        }),
        ["spec.containers[0].image: Required value"]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["image"] = json!(" node:20")),
        [
            "spec.containers[0].image: Invalid value: \" node:20\": must not have leading or trailing whitespace"
        ]
    );
    let mut two = full_pod();
    let second = two["spec"]["containers"][0].clone();
    two["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(second);
    assert_eq!(
        causes(&two),
        ["spec.containers[1].name: Duplicate value: \"build\""]
    );
}

#[test]
fn enumerations_list_the_supported_values() {
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["imagePullPolicy"] = json!("Sometimes")),
        [
            "spec.containers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\""
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["restartPolicy"] = json!("Maybe")),
        [
            "spec.restartPolicy: Unsupported value: \"Maybe\": supported values: \"Always\", \"OnFailure\", \"Never\""
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["dnsPolicy"] = json!("Google")),
        [
            "spec.dnsPolicy: Unsupported value: \"Google\": supported values: \"ClusterFirstWithHostNet\", \"ClusterFirst\", \"Default\", \"None\""
        ]
    );
    assert_eq!(
        reasons(&{
            let mut p = full_pod();
            p["spec"]["restartPolicy"] = json!("Maybe");
            p
        }),
        ["FieldValueNotSupported"]
    );
    // Defaulted fields may be empty.
    assert!(
        with(|p| {
            p["spec"]["restartPolicy"] = json!("");
            p["spec"]["containers"][0]["imagePullPolicy"] = json!("");
        })
        .is_empty()
    );
}

#[test]
fn resources() {
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("7")),
        [
            "spec.containers[0].resources.requests: Invalid value: \"7\": must be less than or equal to cpu limit of 6"
        ]
    );
    assert!(
        with(|p| p["spec"]["containers"][0]["resources"]["requests"]["memory"] = json!("16384Mi"))
            .is_empty(),
        "compared as numbers"
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["resources"]["limits"]["cpu"] = json!("-1")),
        [
            "spec.containers[0].resources.limits[cpu]: Invalid value: \"-1\": must be greater than or equal to 0",
            "spec.containers[0].resources.requests: Invalid value: \"6\": must be less than or equal to cpu limit of -1",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["resources"]["limits"]["gpu"] = json!("1")),
        [
            "spec.containers[0].resources.limits[gpu]: Invalid value: \"gpu\": must be a standard resource type or fully qualified",
            "spec.containers[0].resources.limits[gpu]: Invalid value: \"gpu\": must be a standard resource for containers",
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["resources"]["requests"]["example.com/gpu"] = json!("2")
        ),
        [
            "spec.containers[0].resources.requests: Invalid value: \"2\": must be equal to example.com/gpu limit of 1"
        ]
    );
    assert_eq!(
        with(|p| {
            p["spec"]["containers"][0]["resources"]["limits"]["example.com/gpu"] = json!("500m");
            p["spec"]["containers"][0]["resources"]["requests"]["example.com/gpu"] = json!("500m");
        }),
        [
            "spec.containers[0].resources.limits[example.com/gpu]: Invalid value: \"500m\": must be an integer",
            "spec.containers[0].resources.requests[example.com/gpu]: Invalid value: \"500m\": must be an integer",
        ]
    );
    assert_eq!(
        with(|p| {
            p["spec"]["containers"][0]["resources"]["limits"]
                .as_object_mut()
                .unwrap()
                .remove("example.com/gpu");
        }),
        [
            "spec.containers[0].resources.limits: Required value: Limit must be set for non overcommitable resources"
        ]
    );
}

#[test]
fn env() {
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["env"][4]["name"] = json!("1X")),
        [
            "spec.containers[0].env[4].name: Invalid value: \"1X\": a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit (e.g. 'my.env-name',  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["env"][0]["value"] = json!("x")),
        [
            "spec.containers[0].env[0].valueFrom: Invalid value: \"\": may not be specified when `value` is not empty"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["env"][0]["valueFrom"] = json!({})),
        [
            "spec.containers[0].env[0].valueFrom: Invalid value: \"\": must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`"
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] =
                json!({"name": "s", "key": "k"})
        ),
        [
            "spec.containers[0].env[0].valueFrom: Invalid value: \"\": may not have more than one field specified at a time"
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] =
                json!("status.phase")
        ),
        [
            "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath: Unsupported value: \"status.phase\": supported values: \"metadata.name\", \"metadata.namespace\", \"metadata.uid\", \"spec.nodeName\", \"spec.serviceAccountName\", \"status.hostIP\", \"status.hostIPs\", \"status.podIP\", \"status.podIPs\""
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] =
                json!("metadata.whoops")
        ),
        [
            "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath: Invalid value: \"metadata.whoops\": error converting fieldPath: field label not supported: metadata.whoops"
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][2]["valueFrom"]["resourceFieldRef"]["resource"] =
                json!("limits.gpu")
        ),
        [
            "spec.containers[0].env[2].valueFrom.resourceFieldRef.resource: Unsupported value: \"limits.gpu\": supported values: \"limits.cpu\", \"limits.ephemeral-storage\", \"limits.memory\", \"requests.cpu\", \"requests.ephemeral-storage\", \"requests.memory\""
        ]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][2]["valueFrom"]["resourceFieldRef"]["divisor"] =
                json!("1Mi")
        ),
        [
            "spec.containers[0].env[2].valueFrom.resourceFieldRef.divisor: Invalid value: \"limits.cpu\": only divisor's values 1m and 1 are supported with the cpu resource"
        ]
    );
    assert!(
        with(|p| p["spec"]["containers"][0]["env"][2]["valueFrom"]["resourceFieldRef"]["containerName"] = json!("nope"))
            .is_empty(),
        "the server does not check the container exists"
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["env"][3]["valueFrom"]["secretKeyRef"]["key"] =
                json!("")
        ),
        ["spec.containers[0].env[3].valueFrom.secretKeyRef.key: Required value"]
    );
}

#[test]
fn volumes_and_mounts() {
    assert_eq!(
        with(|p| p["spec"]["volumes"][0]["name"] = json!("podinfo")),
        [
            "spec.volumes[1].name: Duplicate value: \"podinfo\"",
            "spec.containers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
            "spec.initContainers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["volumes"][0] = json!({"name": "screwdriver"})),
        [
            "spec.volumes[0]: Required value: must specify a volume type",
            "spec.containers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
            "spec.initContainers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["volumes"][0]["secret"] = json!({"secretName": "s"})),
        [
            "spec.volumes[0].secret: Forbidden: may not specify more than 1 volume type",
            "spec.containers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
            "spec.initContainers[0].volumeMounts[0].name: Not found: \"screwdriver\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["volumes"][2]["hostPath"]["type"] = json!("Pipe")),
        [
            "spec.volumes[2].hostPath.type: Unsupported value: \"Pipe\": supported values: \"\", \"BlockDevice\", \"CharDevice\", \"Directory\", \"DirectoryOrCreate\", \"File\", \"FileOrCreate\", \"Socket\"",
            "spec.containers[0].volumeMounts[2].name: Not found: \"docker\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["volumes"][3]["secret"]["secretName"] = json!("")),
        ["spec.volumes[3].secret.secretName: Required value",]
    );
    assert_eq!(
        with(
            |p| p["spec"]["volumes"][1]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] =
                json!("spec.nodeName")
        ),
        [
            "spec.volumes[1].downwardAPI.fieldRef.fieldPath: Unsupported value: \"spec.nodeName\": supported values: \"metadata.annotations\", \"metadata.labels\", \"metadata.name\", \"metadata.namespace\", \"metadata.uid\"",
            "spec.containers[0].volumeMounts[1].name: Not found: \"podinfo\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["volumes"][1]["downwardAPI"]["items"][0]["path"] = json!("/abs")),
        [
            "spec.volumes[1].downwardAPI.path: Invalid value: \"/abs\": must be a relative path",
            "spec.containers[0].volumeMounts[1].name: Not found: \"podinfo\"",
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["volumeMounts"][1]["mountPath"] = json!("/opt/sd")),
        [
            "spec.containers[0].volumeMounts[1].mountPath: Invalid value: \"/opt/sd\": must be unique"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["volumeMounts"][2]["subPath"] = json!("../x")),
        ["spec.containers[0].volumeMounts.subPath: Invalid value: \"../x\": must not contain '..'"]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = json!("")),
        ["spec.containers[0].volumeMounts[0].mountPath: Required value"]
    );
}

#[test]
fn pod_level_fields() {
    assert_eq!(
        with(|p| p["spec"]["activeDeadlineSeconds"] = json!(0)),
        [
            "spec.activeDeadlineSeconds: Invalid value: 0: must be between 1 and 2147483647, inclusive"
        ]
    );
    assert!(
        with(|p| p["spec"]["terminationGracePeriodSeconds"] = json!(-1)).len() == 1,
        "a negative grace period is set to 1 by the server, not refused; only the preStop sleep now exceeds it"
    );
    assert_eq!(
        with(|p| p["spec"]["serviceAccountName"] = json!("SD")),
        [format!(
            "spec.serviceAccountName: Invalid value: \"SD\": {SUBDOMAIN}"
        )]
    );
    assert_eq!(
        with(|p| p["spec"]["runtimeClassName"] = json!("")),
        [format!(
            "spec.runtimeClassName: Invalid value: \"\": {SUBDOMAIN}"
        )]
    );
    assert!(
        with(|p| p["spec"]["imagePullSecrets"] = json!([{"name": ""}])).is_empty(),
        "the server accepts it"
    );
    assert_eq!(
        with(|p| p["spec"]["nodeSelector"]["pool"] = json!("a b")),
        [
            "spec.nodeSelector: Invalid value: \"a b\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        ]
    );
}

#[test]
fn tolerations() {
    assert_eq!(
        with(|p| p["spec"]["tolerations"][1] = json!({"operator": "Equal"})),
        [
            "spec.tolerations[1].operator: Invalid value: \"Equal\": operator must be Exists when `key` is empty, which means \"match all values and all keys\""
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["tolerations"][1] =
            json!({"key": "k", "operator": "Exists", "value": "v"})),
        [
            "spec.tolerations[1].operator: Invalid value: \"v\": value must be empty when `operator` is 'Exists'"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["tolerations"][0]["operator"] = json!("Gte")),
        [
            "spec.tolerations[0].operator: Unsupported value: \"Gte\": supported values: \"Equal\", \"Exists\""
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["tolerations"][0]["effect"] = json!("NoRun")),
        [
            "spec.tolerations[0].effect: Unsupported value: \"NoRun\": supported values: \"NoSchedule\", \"PreferNoSchedule\", \"NoExecute\""
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["tolerations"][0]["tolerationSeconds"] = json!(60)),
        [
            "spec.tolerations[0].effect: Invalid value: \"NoSchedule\": effect must be 'NoExecute' when `tolerationSeconds` is set"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["tolerations"][0]["key"] = json!("a/b/c")).len(),
        1
    );
}

#[test]
fn affinity() {
    let terms = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms";
    assert_eq!(
        with(
            |p| p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"] = json!([])
        ),
        [format!(
            "{terms}: Required value: must have at least one node selector term"
        )]
    );
    let expr = |p: &mut Value, i: usize, v: Value| {
        p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][i] = v;
    };
    assert_eq!(
        with(|p| expr(p, 0, json!({"key": "a", "operator": "In"}))),
        [format!(
            "{terms}[0].matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or 'NotIn'"
        )]
    );
    assert_eq!(
        with(|p| expr(
            p,
            1,
            json!({"key": "a", "operator": "Lt", "values": ["1", "2"]})
        )),
        [format!(
            "{terms}[0].matchExpressions[1].values: Required value: must be specified single value when `operator` is 'Lt' or 'Gt'"
        )]
    );
    assert_eq!(
        with(|p| expr(
            p,
            2,
            json!({"key": "a", "operator": "Exists", "values": ["x"]})
        )),
        [format!(
            "{terms}[0].matchExpressions[2].values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
        )]
    );
    assert_eq!(
        with(|p| expr(p, 2, json!({"key": "a", "operator": "Near"}))),
        [format!(
            "{terms}[0].matchExpressions[2].operator: Invalid value: \"Near\": not a valid selector operator"
        )]
    );
    assert_eq!(
        with(
            |p| p["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                [0]["weight"] = json!(101)
        ),
        [
            "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight: Invalid value: 101: must be in the range 1-100"
        ]
    );
}

#[test]
fn lifecycle_and_probes() {
    let hook = "spec.containers[0].lifecycle";
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["lifecycle"]["postStart"] = json!({})),
        [format!(
            "{hook}.postStart: Required value: must specify a handler type"
        )]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["lifecycle"]["postStart"]["tcpSocket"] =
                json!({"port": 80})
        ),
        [format!(
            "{hook}.postStart.tcpSocket: Forbidden: may not specify more than 1 handler type"
        )]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] = json!(31)
        ),
        [format!(
            "{hook}.preStop.sleep: Invalid value: 31: must be greater than 0 and less than terminationGracePeriodSeconds (30). Enable AllowPodLifecycleSleepActionZeroValue feature gate for zero sleep."
        )]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = json!(0)),
        [
            "spec.containers[0].livenessProbe.httpGet.port: Invalid value: 0: must be between 1 and 65535, inclusive"
        ]
    );
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["livenessProbe"]["successThreshold"] = json!(2)),
        ["spec.containers[0].livenessProbe.successThreshold: Invalid value: 2: must be 1"]
    );
    assert_eq!(
        with(|p| p["spec"]["initContainers"][0]["lifecycle"] =
            json!({"preStop": {"exec": {"command": ["x"]}}})),
        [
            "spec.initContainers[0].lifecycle: Forbidden: may not be set for init containers without restartPolicy=Always"
        ]
    );
}

#[test]
fn security_contexts() {
    let sc = "spec.containers[0].securityContext";
    assert_eq!(
        with(|p| p["spec"]["containers"][0]["securityContext"]["runAsUser"] = json!(-1)),
        [format!(
            "{sc}.runAsUser: Invalid value: -1: must be between 0 and 2147483647, inclusive"
        )]
    );
    assert_eq!(
        with(
            |p| p["spec"]["containers"][0]["securityContext"]["seccompProfile"] =
                json!({"type": "Localhost"})
        ),
        [format!(
            "{sc}.seccompProfile.localhostProfile: Required value: must be set when seccomp type is Localhost"
        )]
    );
    assert_eq!(
        with(|p| p["spec"]["securityContext"]["seccompProfile"] = json!({"type": "Strict"})),
        [
            "spec.securityContext.seccompProfile.type: Unsupported value: \"Strict\": supported values: \"Localhost\", \"RuntimeDefault\", \"Unconfined\""
        ]
    );
    let escalation =
        with(|p| p["spec"]["containers"][0]["securityContext"]["privileged"] = json!(true));
    assert_eq!(escalation.len(), 1);
    assert!(
        escalation[0].starts_with(&format!("{sc}: Invalid value: {{"))
            && escalation[0].ends_with(
                "cannot set `allowPrivilegeEscalation` to false and `privileged` to true"
            ),
        "{escalation:?}"
    );
}

#[test]
fn several_causes_are_all_reported() {
    let mut pod = full_pod();
    pod["spec"]["containers"][0]["imagePullPolicy"] = json!("Sometimes");
    pod["spec"]["restartPolicy"] = json!("Maybe");
    assert_eq!(
        reasons(&pod),
        ["FieldValueNotSupported", "FieldValueNotSupported"]
    );
}
