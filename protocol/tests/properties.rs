//! Property tests of every parser here that takes outside input: the start and stop messages
//! (Screwdriver's executor), the registry's create and update bodies, the workers' bodies
//! (agents), queue messages read back from Redis, sign options (an operator's variable) and
//! the URL redaction logs rely on.
//!
//! Each property runs proptest's case count (256, or `PROPTEST_CASES`) in-process, so CI's run
//! is bounded; the cargo-fuzz targets in `fuzz/` take the same parsers further. The properties
//! say more than "does not panic": a body that is valid but for one field is refused naming
//! that field, what is accepted survives a round trip, and no error quotes a secret.

use proptest::prelude::*;
use sd_protocol::error::parse_object;
use sd_protocol::{
    AckBody, ClusterPatch, EventBody, NackBody, NewCluster, QueueMessage, SignOptions,
    StartMessage, StopRequest,
};
use serde_json::{Map, Value, json};

// === strategies ===

/// Field names the parsers know, so random objects hit real fields, not only unknown ones.
const FIELDS: &[&str] = &[
    "buildId",
    "jobId",
    "eventId",
    "pipelineId",
    "pipeline",
    "id",
    "name",
    "scmContext",
    "apiUri",
    "container",
    "annotations",
    "blockedBy",
    "isPR",
    "token",
    "buildClusterName",
    "screwdriver.cd/buildCluster",
    "buildCluster",
    "scmOrganizations",
    "authKey",
    "signOption",
    "managedBy",
    "managedByScrewdriver",
    "managedByEmail",
    "maintainer",
    "weightage",
    "group",
    "description",
    "isActive",
    "deliveryIds",
    "reason",
    "event",
    "statusMessage",
    "job",
    "buildConfig",
    "queuedAt",
    "receivedAt",
    "algorithm",
    "expiresIn",
    "issuer",
    "audience",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => "\\PC{0,12}",
    ]
}

/// Any JSON value, nested a few levels, numbers at the edges included.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            0_u64,
            1,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX
        ])
        .prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn any_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(key(), any_json(), 0..10).prop_map(|m| m.into_iter().collect())
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![1_u64..1000, 1_u64..=sd_protocol::build::MAX_ID]
}

/// A start message Screwdriver could send: every rule holds.
fn valid_start() -> impl Strategy<Value = Map<String, Value>> {
    (
        (id(), id(), id(), prop::option::of(id())),
        ("[a-z0-9-]{1,12}", "[a-z0-9_.-]{1,12}", "[a-z]{2,8}:[a-z.]{3,20}"),
        (
            prop::sample::select(vec!["http://", "https://"]),
            "[a-z.]{1,20}(:[0-9]{2,5})?(/[a-z]{1,8}){0,2}",
        ),
        ("[a-z0-9./:-]{1,30}", prop::collection::vec(id(), 0..4)),
        (prop::option::of("[A-Za-z0-9_.-]{0,20}"), any::<bool>(), "\\PC{0,20}"),
    )
        .prop_map(
            |((build, job, pipeline, event), (org, repo, scm), (scheme, host), (image, blocked), (cluster, pr, extra))| {
                let mut m = json!({
                    "buildId": build,
                    "jobId": job,
                    "pipeline": {"id": pipeline, "name": format!("{org}/{repo}"), "scmContext": scm},
                    "apiUri": format!("{scheme}{host}"),
                    "container": image,
                    "blockedBy": blocked,
                    "isPR": pr,
                    "causeMessage": extra,
                });
                let obj = m.as_object_mut().expect("an object");
                if let Some(event) = event {
                    obj.insert("eventId".into(), event.into());
                }
                if let Some(cluster) = cluster {
                    obj.insert("annotations".into(), json!({"screwdriver.cd/buildCluster": cluster}));
                }
                obj.clone()
            },
        )
}

/// A registry create body every rule admits.
fn valid_cluster() -> impl Strategy<Value = Map<String, Value>> {
    (
        "[A-Za-z0-9_.-]{1,30}".prop_filter("a name no cluster may take", |name: &String| {
            sd_protocol::check_cluster_name(name).is_ok()
        }),
        "[a-z]{2,8}:[a-z.]{3,20}",
        prop::collection::vec("[a-z0-9-]{1,12}", 1..5),
        "[A-Z_][A-Z0-9_]{0,30}",
        prop::option::of("[A-Z_][A-Z0-9_]{0,30}"),
        prop::sample::select(vec!["screwdriver", "external"]),
        ("[a-z0-9.]{1,12}@[a-z]{1,8}\\.[a-z]{2,4}", 0_u8..=100, "[A-Za-z0-9_.-]{1,20}"),
    )
        .prop_map(|(name, scm, orgs, key, sign, managed, (email, weight, group))| {
            let mut m = json!({
                "name": name, "scmContext": scm, "scmOrganizations": orgs, "authKey": key,
                "managedBy": managed, "managedByEmail": email, "weightage": weight, "group": group,
            });
            if let Some(sign) = sign {
                m["signOption"] = sign.into();
            }
            m.as_object().expect("an object").clone()
        })
}

/// Sets `path` (dotted) in `body` to `value`.
fn put(body: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Some(Value::Object(inner)) = body.get_mut(head) {
                put(inner, rest, value);
            }
        }
        None => {
            body.insert(path.to_owned(), value);
        }
    }
}

/// Whether the refused field `field` is the one that was changed (`path`) or inside it.
fn names(field: &str, path: &str) -> bool {
    field == path
        || field.starts_with(&format!("{path}."))
        || field.starts_with(&format!("{path}["))
}

// === properties ===

proptest! {
    /// Whatever bytes arrive, the body parser answers (an object or an error naming `body`).
    #[test]
    fn any_bytes_are_an_object_or_a_body_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse_object(&bytes) {
            prop_assert_eq!(e.field, "body");
        }
    }

    /// Any JSON object is accepted or refused naming a field: no panic, no empty field name,
    /// for every body type the API and the agents read.
    #[test]
    fn any_object_is_refused_naming_a_field(body in any_object()) {
        let fields = [
            StartMessage::from_json(body.clone()).err(),
            StopRequest::from_json(body.clone()).err(),
            NewCluster::from_json(body.clone()).err(),
            ClusterPatch::from_json(body.clone()).err(),
            EventBody::from_json(body.clone()).err(),
            AckBody::from_json(body.clone()).err(),
            NackBody::from_json(body.clone()).err(),
        ];
        for e in fields.into_iter().flatten() {
            prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
        }
        let _ = serde_json::from_value::<QueueMessage>(Value::Object(body));
    }

    /// A valid start message is accepted and survives the trip through the queue (serialised
    /// by the scheduler, parsed again by the agent) unchanged.
    #[test]
    fn a_valid_start_message_round_trips(body in valid_start()) {
        let parsed = StartMessage::from_json(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let queued = QueueMessage {
            job: sd_protocol::JobKind::Start,
            build_config: serde_json::to_value(&parsed).expect("serialises"),
            queued_at: Some(1),
            received_at: None,
        };
        let wire = serde_json::to_string(&queued).expect("serialises");
        let back: QueueMessage = serde_json::from_str(&wire).expect("parses");
        prop_assert_eq!(&back, &queued);
        let Value::Object(config) = back.build_config else { panic!("an object") };
        prop_assert_eq!(StartMessage::from_json(config).expect("still valid"), parsed);
    }

    /// A start message valid but for one field is accepted, or refused naming that field.
    #[test]
    fn a_start_message_wrong_in_one_field_is_refused_naming_it(
        mut body in valid_start(),
        path in prop::sample::select(vec![
            "buildId", "jobId", "eventId", "pipeline", "pipeline.id", "pipeline.name",
            "pipeline.scmContext", "apiUri", "container", "annotations", "blockedBy", "isPR",
            "token", "buildClusterName", "prParentJobId", "jobName",
        ]),
        value in any_json(),
    ) {
        put(&mut body, path, value);
        if let Err(e) = StartMessage::from_json(body) {
            prop_assert!(names(&e.field, path), "changed {path}, refused {e}");
        }
    }

    /// A valid registry body is accepted; valid but for one field, it is accepted or refused
    /// naming that field (or the alias it contradicts).
    #[test]
    fn a_cluster_wrong_in_one_field_is_refused_naming_it(
        mut body in valid_cluster(),
        path in prop::sample::select(vec![
            "name", "scmContext", "scmOrganizations", "authKey", "signOption", "managedBy",
            "managedByScrewdriver", "managedByEmail", "maintainer", "weightage", "group",
            "description", "isActive",
        ]),
        value in any_json(),
    ) {
        prop_assert!(NewCluster::from_json(body.clone()).is_ok(), "{body:?}");
        put(&mut body, path, value);
        if let Err(e) = NewCluster::from_json(body) {
            let alias = match path {
                "managedByScrewdriver" => "managedBy",
                "maintainer" => "managedByEmail",
                other => other,
            };
            prop_assert!(
                names(&e.field, path) || e.field == alias || (path == "managedByEmail" && e.field == "maintainer"),
                "changed {path}, refused {e}"
            );
        }
    }

    /// An update either leaves a record every rule admits, with its name, or is refused; an
    /// empty one changes nothing.
    #[test]
    fn an_update_leaves_a_valid_record_or_nothing(base in valid_cluster(), patch in any_object()) {
        let current = NewCluster::from_json(base).expect("valid");
        prop_assert_eq!(
            ClusterPatch::from_json(Map::new()).expect("empty").apply(&current).expect("applies"),
            current.clone()
        );
        if let Ok(next) = ClusterPatch::from_json(patch).and_then(|p| p.apply(&current)) {
            prop_assert_eq!(&next.name, &current.name);
            prop_assert_eq!(next.clone().validate().expect("still valid"), next);
        }
    }

    /// Sign options sit beside a secret: whatever the variable holds, no error quotes it.
    #[test]
    fn sign_option_errors_never_quote_the_text(
        secret in "[A-Za-z0-9]{16,24}",
        shape in 0_usize..6,
    ) {
        let text = match shape {
            0 => secret.clone(),
            1 => format!("{{\"algorithm\":\"{secret}\"}}"),
            2 => format!("{{\"{secret}\":1}}"),
            3 => format!("{{\"issuer\":{secret}}}"),
            4 => format!("{{\"expiresIn\":\"{secret}\"}}"),
            _ => format!("{{\"audience\":[\"{secret}\"]}}"),
        };
        if let Err(e) = SignOptions::from_json(&text) {
            prop_assert!(!e.to_string().contains(&secret), "{e}");
        }
    }

    /// A URL printed for an operator never shows its password, whatever it contains.
    #[test]
    fn a_redacted_url_never_shows_the_password(
        scheme in prop::sample::select(vec!["redis", "rediss", "postgres", "postgresql", "http"]),
        user in "[a-z]{0,8}",
        password in "[A-Za-z0-9!$%&*+=@:/?#~]{12,24}",
        host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        tail in "(/[a-z0-9@?=&]{0,12}){0,2}",
    ) {
        let secret = format!("Zq{password}");
        let url = format!("{scheme}://{user}:{secret}@{host}{tail}");
        let shown = sd_protocol::env::redact_url(&url);
        prop_assert!(!shown.contains(&secret), "{url} shown as {shown}");
    }
}
