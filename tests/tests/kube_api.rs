//! The fake Kubernetes API server (`sd_testkit::kube_api`) refuses what kube-apiserver refuses,
//! with its bodies: driven through the real `kube` client, and through reqwest where the exact
//! body, headers or query parameters matter. One test per class of refusal (validation 422,
//! decoding 400, unknown fields, RBAC 403, compaction 410), and the watch semantics the
//! agent relies on (collection resourceVersions, resumed watches, bookmarks).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sd_testkit::kube_api::{FakeKube, USER};
use serde_json::{Value, json};

const NS: &str = "builds";

fn client(kube: &FakeKube) -> kube::Client {
    kube::Client::try_from(kube::Config::new(kube.url.parse().unwrap())).unwrap()
}

fn pods(kube: &FakeKube) -> Api<Pod> {
    Api::namespaced(client(kube), NS)
}

fn pods_url(kube: &FakeKube) -> String {
    format!("{}/api/v1/namespaces/{NS}/pods", kube.url)
}

/// A minimal valid pod.
fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "screwdriver"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "build", "image": "node:20"}]},
    })
}

/// POSTs `body` to the pods collection (with `query`), answering status, warnings and body.
async fn post(kube: &FakeKube, query: &str, body: &Value) -> (u16, Vec<String>, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{query}", pods_url(kube)))
        .json(body)
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    (code, warnings, response.json().await.unwrap())
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The first `n` events of a watch (or fewer if it ends first).
async fn watch_events(url: &str, n: usize) -> Vec<Value> {
    let mut response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "{url}");
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("a watch event in time")
            .unwrap();
        let Some(chunk) = chunk else { break };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            events.push(serde_json::from_slice(&line).unwrap());
        }
    }
    events
}

fn event_summary(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let name = e["object"]["metadata"]["name"].as_str().unwrap_or_default();
            (e["type"].as_str().unwrap().to_owned(), name.to_owned())
        })
        .collect()
}

fn collection_rv(list: &Value) -> u64 {
    list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

// === validation (422) ===

#[tokio::test]
async fn an_invalid_pod_gets_the_servers_422() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-1");
    body["spec"]["containers"][0]["name"] = json!("Build_1");
    let (code, _, status) = post(&kube, "", &body).await;
    assert_eq!(code, 422);
    let cause = "Invalid value: \"Build_1\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
    assert_eq!(
        status,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("Pod \"sd-1\" is invalid: spec.containers[0].name: {cause}"),
            "reason": "Invalid",
            "details": {"name": "sd-1", "kind": "Pod", "causes": [
                {"reason": "FieldValueInvalid", "message": cause, "field": "spec.containers[0].name"},
            ]},
            "code": 422,
        })
    );
    assert!(kube.pods().is_empty(), "nothing stored");
}

#[tokio::test]
async fn several_causes_are_listed_in_one_message() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-2");
    body["spec"]["containers"][0]["imagePullPolicy"] = json!("Sometimes");
    body["spec"]["containers"][0]["resources"] =
        json!({"limits": {"cpu": "1"}, "requests": {"cpu": "1500m"}});
    body["spec"]["tolerations"] = json!([{"key": "k", "operator": "Exists", "value": "v"}]);
    let (code, _, status) = post(&kube, "", &body).await;
    assert_eq!(code, 422);
    assert_eq!(
        status["message"],
        "Pod \"sd-2\" is invalid: [spec.containers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\", spec.containers[0].resources.requests: Invalid value: \"1500m\": must be less than or equal to cpu limit of 1, spec.tolerations[0].operator: Invalid value: \"v\": value must be empty when `operator` is 'Exists']"
    );
    let reasons: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "FieldValueNotSupported",
            "FieldValueInvalid",
            "FieldValueInvalid"
        ]
    );
}

#[tokio::test]
async fn the_kube_client_sees_the_refusal_as_an_api_error() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-3");
    body["spec"]["containers"] = json!([]);
    let typed: Pod = serde_json::from_value(body).unwrap();
    let Err(kube::Error::Api(status)) = pods(&kube).create(&PostParams::default(), &typed).await
    else {
        panic!("an empty pod must be refused");
    };
    assert!(status.is_invalid(), "{status:?}");
    assert_eq!(status.code, 422);
    assert_eq!(
        status.message,
        "Pod \"sd-3\" is invalid: spec.containers: Required value"
    );
}

#[tokio::test]
async fn a_valid_full_build_pod_is_accepted() {
    let kube = FakeKube::start().await;
    let full: Pod = serde_json::from_value(full_pod()).unwrap();
    let created = pods(&kube)
        .create(&PostParams::default(), &full)
        .await
        .unwrap();
    assert_eq!(created.metadata.name.as_deref(), Some("sd-100"));
    assert_eq!(
        kube.pod("sd-100").unwrap()["spec"]["containers"][0]["env"][1]["valueFrom"]["resourceFieldRef"]
            ["resource"],
        "limits.memory"
    );
}

fn full_pod() -> Value {
    let mut pod = pod("sd-100");
    let spec = &mut pod["spec"];
    spec["activeDeadlineSeconds"] = json!(1800);
    spec["serviceAccountName"] = json!("sd-build");
    spec["imagePullSecrets"] = json!([{"name": "regcred"}]);
    spec["securityContext"] = json!({"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}});
    spec["tolerations"] = json!([
        {"key": "dedicated", "operator": "Equal", "value": "builds", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    ]);
    spec["affinity"] = json!({"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]},
        ]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "ssd", "operator": "Exists"}]}},
        ],
    }});
    spec["volumes"] = json!([
        {"name": "screwdriver", "emptyDir": {}},
        {"name": "podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "build", "resource": "limits.memory", "divisor": "1Mi"}},
        ]}},
    ]);
    spec["initContainers"] = json!([{
        "name": "launcher", "image": "screwdrivercd/launcher:v6",
        "command": ["/bin/sh", "-c", "cp -a /opt/sd/. /opt/launcher/"],
        "volumeMounts": [{"name": "screwdriver", "mountPath": "/opt/launcher"}],
    }]);
    let build = &mut spec["containers"][0];
    build["env"] = json!([
        {"name": "SD_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SD_MEMORY", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "SD_JOB", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
    ]);
    build["resources"] = json!({"limits": {"cpu": "2", "memory": "4Gi"}, "requests": {"cpu": "2000m", "memory": "4096Mi"}});
    build["volumeMounts"] = json!([
        {"name": "screwdriver", "mountPath": "/opt/sd", "readOnly": true},
        {"name": "podinfo", "mountPath": "/etc/podinfo"},
    ]);
    build["lifecycle"] = json!({
        "postStart": {"exec": {"command": ["sh", "-c", "echo started"]}},
        "preStop": {"httpGet": {"path": "/stop", "port": 8080}},
    });
    build["securityContext"] = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": false});
    pod
}

// === decoding (400) and unknown fields ===

#[tokio::test]
async fn unknown_fields_are_refused_when_strict() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-4");
    body["spec"]["containers"][0]["foo"] = json!(1);
    let (code, warnings, status) = post(&kube, "?fieldValidation=Strict", &body).await;
    assert_eq!(code, 400);
    assert!(warnings.is_empty());
    assert_eq!(
        status,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Pod in version \"v1\" cannot be handled as a Pod: strict decoding error: unknown field \"spec.containers[0].foo\"",
            "reason": "BadRequest", "code": 400,
        })
    );
    assert!(kube.pods().is_empty());
}

#[tokio::test]
async fn unknown_fields_are_dropped_with_a_warning_by_default() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-5");
    body["spec"]["foo"] = json!("x");
    body["metadata"]["bar"] = json!({"a": 1});
    let (code, warnings, created) = post(&kube, "", &body).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        warnings,
        [
            "299 - \"unknown field \\\"metadata.bar\\\"\"",
            "299 - \"unknown field \\\"spec.foo\\\"\""
        ]
    );
    let stored = kube.pod("sd-5").unwrap();
    assert!(stored["spec"].get("foo").is_none() && stored["metadata"].get("bar").is_none());
    assert!(created["spec"].get("foo").is_none());

    let mut body = pod("sd-6");
    body["spec"]["foo"] = json!("x");
    let (code, warnings, _) = post(&kube, "?fieldValidation=Ignore", &body).await;
    assert_eq!((code, warnings.len()), (201, 0));
    assert!(kube.pod("sd-6").unwrap()["spec"].get("foo").is_none());

    let (code, _, status) = post(&kube, "?fieldValidation=strict", &pod("sd-7")).await;
    assert_eq!(code, 422);
    assert_eq!(
        status["message"],
        "CreateOptions.meta.k8s.io \"\" is invalid: fieldValidation: Unsupported value: \"strict\": supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
    );
}

#[tokio::test]
async fn wrong_types_and_bad_quantities_fail_decoding() {
    let kube = FakeKube::start().await;
    let mut body = pod("sd-8");
    body["spec"]["activeDeadlineSeconds"] = json!("1800");
    let (code, _, status) = post(&kube, "", &body).await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!(
        status["message"],
        "Pod in version \"v1\" cannot be handled as a Pod: json: cannot unmarshal string into Go struct field PodSpec.spec.activeDeadlineSeconds of type int64"
    );

    let mut body = pod("sd-8");
    body["spec"]["containers"][0]["resources"] = json!({"limits": {"memory": "16GB"}});
    let (code, _, status) = post(&kube, "", &body).await;
    assert_eq!(code, 400);
    assert_eq!(
        status["message"],
        "Pod in version \"v1\" cannot be handled as a Pod: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    );
    body["spec"]["containers"][0]["resources"] = json!({"limits": {"memory": "16K"}});
    let (_, _, status) = post(&kube, "", &body).await;
    assert_eq!(
        status["message"],
        "Pod in version \"v1\" cannot be handled as a Pod: unable to parse quantity's suffix"
    );
    assert!(kube.pods().is_empty());
}

// === RBAC (403) ===

#[tokio::test]
async fn denied_requests_are_forbidden_as_the_authorizer_words_it() {
    let kube = FakeKube::start().await;
    let api = pods(&kube);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-9")).unwrap(),
    )
    .await
    .unwrap();
    kube.deny("create", "pods");
    kube.deny("delete", "pods");
    kube.deny("get", "pods/log");

    let Err(kube::Error::Api(status)) = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("sd-10")).unwrap(),
        )
        .await
    else {
        panic!("create must be denied");
    };
    assert!(status.is_forbidden());
    assert_eq!(
        status.message,
        format!(
            "pods is forbidden: User \"{USER}\" cannot create resource \"pods\" in API group \"\" in the namespace \"builds\""
        )
    );

    let response = reqwest::Client::new()
        .delete(format!("{}/sd-9", pods_url(&kube)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("pods \"sd-9\" is forbidden: User \"{USER}\" cannot delete resource \"pods\" in API group \"\" in the namespace \"builds\""),
            "reason": "Forbidden", "details": {"name": "sd-9", "kind": "pods"}, "code": 403,
        })
    );
    assert!(
        kube.pod("sd-9").is_some(),
        "a denied delete deletes nothing"
    );

    let (code, status) = get(&format!("{}/sd-9/log", pods_url(&kube))).await;
    assert_eq!(code, 403);
    assert_eq!(
        status["message"],
        format!(
            "pods \"sd-9\" is forbidden: User \"{USER}\" cannot get resource \"pods/log\" in API group \"\" in the namespace \"builds\""
        )
    );

    // Still allowed: get and list.
    api.get("sd-9").await.unwrap();
    api.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn access_reviews_agree_with_the_authorizer() {
    let kube = FakeKube::start().await;
    kube.deny("watch", "pods");
    kube.deny("create", "selfsubjectaccessreviews");
    let review = |verb: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
               "spec": {"resourceAttributes": {"namespace": NS, "verb": verb, "resource": "pods"}}})
    };
    let url = format!(
        "{}/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        kube.url
    );
    for (verb, allowed) in [("watch", false), ("list", true)] {
        let answer: Value = reqwest::Client::new()
            .post(&url)
            .json(&review(verb))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"]["allowed"], allowed, "{verb}");
    }
    let (code, status) = get(&format!("{}?watch=true", pods_url(&kube))).await;
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    assert_eq!(
        status["message"],
        format!(
            "pods is forbidden: User \"{USER}\" cannot watch resource \"pods\" in API group \"\" in the namespace \"builds\""
        )
    );
}

#[tokio::test]
async fn verbs_used_are_the_authorizers_view_of_every_request() {
    let kube = FakeKube::start().await;
    let api = pods(&kube);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-11")).unwrap(),
    )
    .await
    .unwrap();
    api.get("sd-11").await.unwrap();
    api.list(&ListParams::default().labels("app=screwdriver"))
        .await
        .unwrap();
    api.delete("sd-11", &DeleteParams::default()).await.unwrap();
    let _ = get(&format!(
        "{}/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name%3Dsd-11",
        kube.url
    ))
    .await;
    let _ = watch_events(
        &format!("{}?watch=true&timeoutSeconds=1", pods_url(&kube)),
        1,
    )
    .await;
    let _ = reqwest::Client::new()
        .delete(pods_url(&kube))
        .send()
        .await
        .unwrap();
    let _ = reqwest::get(format!("{}/version", kube.url)).await.unwrap();
    let used: Vec<(String, String, String)> = kube.verbs_used().into_iter().collect();
    let expected: Vec<(String, String, String)> = [
        ("create", "pods", ""),
        ("delete", "pods", ""),
        ("deletecollection", "pods", ""),
        ("get", "pods", ""),
        ("list", "events", ""),
        ("list", "pods", ""),
        ("watch", "pods", ""),
    ]
    .iter()
    .map(|(v, r, s)| ((*v).to_owned(), (*r).to_owned(), (*s).to_owned()))
    .collect();
    assert_eq!(used, expected);
}

// === watch semantics ===

#[tokio::test]
async fn a_watch_from_a_lists_version_gets_exactly_the_later_changes() {
    let kube = FakeKube::start().await;
    let api = pods(&kube);
    for name in ["sd-20", "sd-21"] {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(pod(name)).unwrap(),
        )
        .await
        .unwrap();
    }
    let (_, list) = get(&pods_url(&kube)).await;
    let rv = collection_rv(&list);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    kube.set_phase("sd-20", "Running");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-22")).unwrap(),
    )
    .await
    .unwrap();
    api.delete("sd-21", &DeleteParams::default()).await.unwrap();

    let events = watch_events(
        &format!("{}?watch=true&resourceVersion={rv}", pods_url(&kube)),
        3,
    )
    .await;
    assert_eq!(
        event_summary(&events),
        [
            ("MODIFIED".to_owned(), "sd-20".to_owned()),
            ("ADDED".to_owned(), "sd-22".to_owned()),
            ("DELETED".to_owned(), "sd-21".to_owned()),
        ]
    );
    let versions: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]) && versions[0] > rv,
        "{versions:?}"
    );
}

#[tokio::test]
async fn bookmarks_reach_the_watches_that_allow_them() {
    let kube = FakeKube::start().await;
    pods(&kube)
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("sd-30")).unwrap(),
        )
        .await
        .unwrap();
    let (_, list) = get(&pods_url(&kube)).await;
    let rv = collection_rv(&list);
    let base = format!(
        "{}?watch=true&resourceVersion={rv}&timeoutSeconds=5",
        pods_url(&kube)
    );
    let with = tokio::spawn(watch_events_owned(
        format!("{base}&allowWatchBookmarks=true"),
        2,
    ));
    let without = tokio::spawn(watch_events_owned(base, 1));
    sd_testkit::eventually(Duration::from_secs(5), || async {
        (kube.open_watches() == 2).then_some(())
    })
    .await
    .expect("both watches open");
    kube.bookmark();
    kube.set_phase("sd-30", "Running");

    let with = with.await.unwrap();
    assert_eq!(with[0]["type"], "BOOKMARK");
    assert_eq!(
        with[0]["object"],
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}})
    );
    assert_eq!(with[1]["type"], "MODIFIED");
    let without = without.await.unwrap();
    assert_eq!(
        event_summary(&without),
        [("MODIFIED".to_owned(), "sd-30".to_owned())]
    );
}

async fn watch_events_owned(url: String, n: usize) -> Vec<Value> {
    watch_events(&url, n).await
}

#[tokio::test]
async fn compaction_makes_older_versions_gone() {
    let kube = FakeKube::start().await;
    let api = pods(&kube);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-40")).unwrap(),
    )
    .await
    .unwrap();
    let (_, list) = get(&pods_url(&kube)).await;
    let old = collection_rv(&list);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-41")).unwrap(),
    )
    .await
    .unwrap();

    // Before compaction, an exact list sees the pods as they were.
    let exact = |rv: u64| {
        format!(
            "{}?resourceVersion={rv}&resourceVersionMatch=Exact",
            pods_url(&kube)
        )
    };
    let (code, then) = get(&exact(old)).await;
    assert_eq!(code, 200);
    assert_eq!(collection_rv(&then), old);
    assert_eq!(then["items"].as_array().unwrap().len(), 1);

    kube.compact();
    let (_, now) = get(&pods_url(&kube)).await;
    let current = collection_rv(&now);
    let events = watch_events(
        &format!("{}?watch=true&resourceVersion={old}", pods_url(&kube)),
        2,
    )
    .await;
    assert_eq!(
        events,
        [json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {old} ({current})"),
            "reason": "Expired", "code": 410,
        }})],
        "one ERROR event, then the watch ends"
    );
    let (code, gone) = get(&exact(old)).await;
    assert_eq!(code, 410);
    assert_eq!(
        gone,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "The resourceVersion for the provided list is too old.",
            "reason": "Expired", "code": 410,
        })
    );
    let (code, at_compaction) = get(&exact(current)).await;
    assert_eq!(
        (code, at_compaction["items"].as_array().unwrap().len()),
        (200, 2)
    );
    let (code, ahead) = get(&format!(
        "{}?resourceVersion={}",
        pods_url(&kube),
        current + 10
    ))
    .await;
    assert_eq!((code, ahead["reason"].as_str()), (504, Some("Timeout")));

    // A watch from the current version still works.
    let resumed = tokio::spawn(watch_events_owned(
        format!("{}?watch=true&resourceVersion={current}", pods_url(&kube)),
        1,
    ));
    sd_testkit::eventually(Duration::from_secs(5), || async {
        (kube.open_watches() == 1).then_some(())
    })
    .await
    .unwrap();
    kube.set_phase("sd-41", "Running");
    assert_eq!(
        event_summary(&resumed.await.unwrap()),
        [("MODIFIED".to_owned(), "sd-41".to_owned())]
    );
}

/// The store compacts on its own past 20,000 changes, as etcd does on a schedule: a long run
/// keeps bounded memory, the oldest versions become 410 Gone, and recent ones still answer.
#[tokio::test]
async fn a_long_history_is_compacted_on_its_own() {
    let kube = FakeKube::start().await;
    let api = pods(&kube);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("sd-50")).unwrap(),
    )
    .await
    .unwrap();
    let (_, list) = get(&pods_url(&kube)).await;
    let old = collection_rv(&list);
    for i in 0..20_001 {
        kube.set_phase("sd-50", if i % 2 == 0 { "Running" } else { "Pending" });
    }
    let (_, now) = get(&pods_url(&kube)).await;
    let current = collection_rv(&now);
    let exact = |rv: u64| {
        format!(
            "{}?resourceVersion={rv}&resourceVersionMatch=Exact",
            pods_url(&kube)
        )
    };
    let (code, gone) = get(&exact(old)).await;
    assert_eq!((code, gone["reason"].as_str()), (410, Some("Expired")));
    let (code, recent) = get(&exact(current - 1)).await;
    assert_eq!(code, 200, "{recent}");
    assert_eq!(recent["items"][0]["status"]["phase"], "Pending");
    let (code, at) = get(&exact(current)).await;
    assert_eq!(code, 200);
    assert_eq!(at["items"][0]["status"]["phase"], "Running");
}
