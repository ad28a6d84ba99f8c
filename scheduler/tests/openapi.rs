//! The OpenAPI document (`GET /openapi.json`) against the API it describes.
//!
//! - `documented_operations_are_the_routes`: the document's operations are the routes the
//!   router serves (written out in [`ROUTES`]), and on each of their paths the router serves
//!   those methods and no other.
//! - `every_status_answered_is_documented`: every operation of the document is sent the requests
//!   that provoke its error paths (no or malformed token, wrong scope, malformed and oversize
//!   bodies, invalid values, unknown names and ids, conflicts, caps, a busy scheduler, Redis and
//!   the database down). Each status answered must be listed for that operation, its body must
//!   match the schema listed with it, and a `Retry-After` must be documented where sent; and
//!   every listed status must have been provoked, but for those [`NOT_PROVOKED`] names.
//! - `schemas_accept_what_the_api_accepts`: request bodies, valid ones and ones breaking each
//!   rule, are judged by the document's schema and by the API (2xx or 422): the verdicts must
//!   agree. The rules the schema cannot state are tested apart: the schema accepts such a body,
//!   the API refuses it, and the schema's description states the rule.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::{CTX, Harness, build, cluster};
use reqwest::{Method, StatusCode};
use sd_testkit::{Backend, ClusterKeys, eventually};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What `api::router` serves, written out: a route added there (or removed) must be documented
/// (or no longer be), and this list follows it.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v4/buildclusters"),
    ("POST", "/v4/buildclusters"),
    ("GET", "/v4/buildclusters/{name}"),
    ("PUT", "/v4/buildclusters/{name}"),
    ("DELETE", "/v4/buildclusters/{name}"),
    ("GET", "/buildClusters"),
    ("POST", "/buildClusters"),
    ("GET", "/buildClusters/{name}"),
    ("PUT", "/buildClusters/{name}"),
    ("DELETE", "/buildClusters/{name}"),
    ("GET", "/v4/buildclusters/status"),
    ("GET", "/v4/buildclusters/{name}/status"),
    ("GET", "/buildClusters/status"),
    ("GET", "/buildClusters/{name}/status"),
    ("GET", "/v4/buildclusters/{name}/deadletters"),
    ("GET", "/buildClusters/{name}/deadletters"),
    ("POST", "/v4/buildclusters/{name}/deadletters/{id}/requeue"),
    ("POST", "/buildClusters/{name}/deadletters/{id}/requeue"),
    ("POST", "/v4/buildclusters/{name}/deadletters/{id}/fail"),
    ("POST", "/buildClusters/{name}/deadletters/{id}/fail"),
    ("POST", "/v1/queue/message"),
    ("DELETE", "/v1/queue/message"),
    ("GET", "/v1/builds/{build_id}"),
    ("GET", "/v1/jobs/{cluster}"),
    ("POST", "/v1/jobs/{cluster}/ack"),
    ("POST", "/v1/jobs/{cluster}/nack"),
    ("POST", "/v1/jobs/{cluster}/renew"),
    ("POST", "/v1/jobs/{cluster}/events"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// Documented statuses no request of this test provokes, and why.
const NOT_PROVOKED: &[(&str, &str, u16, &str)] = &[(
    "POST",
    "/v1/queue/message",
    404,
    "only when a build's row vanishes between a conflicting insert and the read after it",
)];

/// The long-poll: the one route outside the in-flight cap and the request timeout.
const POLL: (&str, &str) = ("GET", "/v1/jobs/{cluster}");

/// (method, documented path).
type Op = (String, String);

fn op(method: &str, path: &str) -> Op {
    (method.to_owned(), path.to_owned())
}

async fn document(h: &Harness) -> Value {
    let (status, doc) = h.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    doc
}

fn operations(doc: &Value) -> BTreeSet<Op> {
    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|m| methods.contains(&m.as_str()))
                .map(|m| op(&m.to_uppercase(), path))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A validator of `schema`, its `$ref`s resolved in the document's components.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    root.as_object_mut()
        .expect("a schema is an object")
        .insert("components".to_owned(), doc["components"].clone());
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

fn oversize() -> Vec<u8> {
    format!("{{\"x\":\"{}\"}}", "y".repeat(1024 * 1024 + 10)).into_bytes()
}

// === the routes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_operations_are_the_routes() {
    let h = Harness::start(Backend::Sqlite).await;
    h.register(&cluster("alpha", "screwdriver", &[])).await;
    let doc = document(&h).await;
    let documented = operations(&doc);
    let routes: BTreeSet<Op> = ROUTES.iter().map(|(m, p)| op(m, p)).collect();
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "routes the document lacks: {undocumented:?}; documented operations the router does not serve: {unserved:?}"
    );
    // The list is the router's: on each of its paths the router serves exactly its methods.
    let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
    for path in paths {
        let concrete = path
            .replace("{name}", "alpha")
            .replace("{cluster}", "alpha")
            .replace("{build_id}", "1");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let (status, body) = h
                .call(
                    Method::from_bytes(method.as_bytes()).expect("method"),
                    &concrete,
                    None,
                    None,
                )
                .await;
            let fallback = status == 404
                && body["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no such endpoint"));
            let served = status != 405 && !fallback;
            assert_eq!(
                served,
                routes.contains(&op(method, path)),
                "{method} {concrete}: {status} {body}"
            );
        }
    }
}

// === the walk ===

enum Body {
    Empty,
    Json(Value),
    Raw(Vec<u8>),
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

/// Sends requests to documented operations and checks every answer against the document.
struct Walk {
    http: reqwest::Client,
    base: String,
    doc: Value,
    validators: HashMap<String, jsonschema::Validator>,
    /// The statuses each operation answered.
    seen: BTreeMap<Op, BTreeSet<u16>>,
    problems: Vec<String>,
}

impl Walk {
    async fn new(h: &Harness) -> Self {
        let doc = document(h).await;
        Self {
            http: h.http.clone(),
            base: h.base.clone(),
            doc,
            validators: HashMap::new(),
            seen: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    /// Sends `method path` as operation `template` and checks the answer against the document.
    async fn send(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: &Body,
    ) -> Answer {
        let mut req = self.http.request(
            Method::from_bytes(method.as_bytes()).expect("method"),
            format!("{}{path}", self.base),
        );
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req = match body {
            Body::Empty => req,
            Body::Json(v) => req.json(v),
            Body::Raw(bytes) => req
                .header("content-type", "application/json")
                .body(bytes.clone()),
        };
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let answer = Answer {
            status,
            retry_after,
            body,
        };
        self.check(&op(method, template), path, &answer);
        answer
    }

    /// Like [`Walk::send`], and the answer must be `want` (the request provoked what it meant).
    #[allow(clippy::too_many_arguments)]
    async fn expect(
        &mut self,
        method: &str,
        template: &str,
        why: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
        want: u16,
    ) -> Answer {
        let answer = self.send(method, template, path, token, &body).await;
        if answer.status != want {
            self.problems.push(format!(
                "{method} {path} ({why}): answered {} where the test meant to provoke {want}: {}",
                answer.status, answer.body
            ));
        }
        answer
    }

    fn check(&mut self, op: &Op, path: &str, answer: &Answer) {
        self.seen
            .entry(op.clone())
            .or_default()
            .insert(answer.status);
        let (method, template) = op;
        let documented = &self.doc["paths"][template][method.to_lowercase()]["responses"]
            [answer.status.to_string()];
        if documented.is_null() {
            self.problems.push(format!(
                "{method} {template}: answered {} to {method} {path}, which the document does not list: {}",
                answer.status, answer.body
            ));
            return;
        }
        if answer.retry_after.is_some() && documented["headers"]["Retry-After"].is_null() {
            self.problems.push(format!(
                "{method} {template}: {} with Retry-After, which the document does not list",
                answer.status
            ));
        }
        let Some(schema) = documented["content"]["application/json"]["schema"]
            .as_object()
            .map(|s| Value::Object(s.clone()))
        else {
            if documented.get("content").is_none() && !answer.body.is_null() {
                self.problems.push(format!(
                    "{method} {template}: {} documented without a body, answered {}",
                    answer.status, answer.body
                ));
            }
            return;
        };
        let key = schema.to_string();
        let doc = &self.doc;
        let validator = self
            .validators
            .entry(key)
            .or_insert_with(|| validator(doc, &schema));
        if let Err(e) = validator.validate(&answer.body) {
            self.problems.push(format!(
                "{method} {template}: the {} body {} does not match its documented schema {schema}: {e}",
                answer.status, answer.body
            ));
        }
        if schema["$ref"] == "#/components/schemas/ErrorBody"
            && answer.body["statusCode"] != answer.status
        {
            self.problems.push(format!(
                "{method} {template}: {} answered with an ErrorBody of statusCode {}",
                answer.status, answer.body["statusCode"]
            ));
        }
    }

    /// Fails on every problem found, and on documented statuses no request provoked.
    fn finish(self) {
        let mut problems = self.problems;
        for (method, template) in operations(&self.doc) {
            let listed: BTreeSet<u16> =
                self.doc["paths"][&template][method.to_lowercase()]["responses"]
                    .as_object()
                    .expect("responses")
                    .keys()
                    .map(|s| s.parse().expect("a status"))
                    .collect();
            let seen = self
                .seen
                .get(&op(&method, &template))
                .cloned()
                .unwrap_or_default();
            for status in listed.difference(&seen) {
                let excused = NOT_PROVOKED.iter().any(|(m, p, s, _)| {
                    (*m, *p, *s) == (method.as_str(), template.as_str(), *status)
                });
                if !excused {
                    problems.push(format!(
                        "{method} {template}: documents {status}, which no request provoked"
                    ));
                }
            }
            for (m, p, s, why) in NOT_PROVOKED {
                if (*m, *p) == (method.as_str(), template.as_str()) && seen.contains(s) {
                    problems.push(format!(
                        "{m} {p}: {s} is listed as not provoked ({why}), yet it was"
                    ));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

/// A start message routed to `cluster`, carrying its launcher token (the walk's scheduler
/// mints none).
fn start(build_id: u64, cluster: &str) -> Value {
    let mut body = build(
        build_id,
        "org/repo",
        json!({"screwdriver.cd/buildCluster": cluster}),
    );
    body["token"] = json!("launcher-token");
    body
}

/// Queues `ids` on alpha and lets each die: one delivery (the walk's `queue.max_attempts`), its
/// lease left to lapse, then the poll that finds it lapsed. Each is then held.
async fn let_die(h: &Harness, token: &str, ids: &[u64]) {
    for &id in ids {
        let (status, body) = h.submit(&start(id, "alpha")).await;
        assert_eq!(status, 201, "{body}");
    }
    for _ in 0..2 {
        let (status, body) = common::call_at(
            &h.http,
            &h.base,
            Method::GET,
            "/v1/jobs/alpha?wait=0&max=10",
            Some(token),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for &id in ids {
        let (_, view) = h
            .call(
                Method::GET,
                &format!("/v1/builds/{id}"),
                Some(&h.sdapi()),
                None,
            )
            .await;
        assert_eq!(view["state"], "dead", "build {id}: {view}");
    }
}

#[rustfmt::skip]
async fn every_status_answered_is_documented(backend: Backend) {
    let mut h = Harness::start_with(backend, |c| {
        // One request in flight at a time, so one stalled request makes the scheduler busy.
        c.http.max_in_flight = 1;
        c.queue.max_polls_per_token = 1;
        // No launcher key: a start without a token cannot be served (500).
        c.auth.private_key_file = None;
        // A lease lapses fast and one delivery is all: dead letters are quick to make.
        c.queue.visibility_timeout = Duration::from_millis(300);
        c.queue.max_attempts = 1;
    }).await;
    let alpha = h.cluster_with_key(&cluster("alpha", "screwdriver", &[])).await;
    let beta = h.cluster_with_key(&cluster("beta", "screwdriver", &[])).await;
    h.register(&cluster("ext", "external", &["mobile"])).await;
    let misconf = h.cluster_with_key(&cluster("misconf", "screwdriver", &[])).await;
    h.env.lock().expect("env").remove("SD_CLUSTER_MISCONF_PUBLIC_KEY");
    let nosuch = ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);

    let (admin, user, sdapi) = (h.admin(), h.user(), h.sdapi());
    let guest = h.api.api_token(&["guest"]);
    let scopeless = h.api.api_token(&["nothing"]);
    let bad = "not-a-jwt".to_owned();
    let mut w = Walk::new(&h).await;

    // --- the registry, at its paths and at the seed's ---
    for (n, prefix) in ["/v4/buildclusters", "/buildClusters"].into_iter().enumerate() {
        let one = format!("{prefix}/{{name}}");
        let fresh = format!("fresh{n}");
        let fresh_body = cluster(&fresh, "screwdriver", &[]);
        h.set_env(
            fresh_body["authKey"].as_str().expect("authKey"),
            &sd_testkit::shared_keys("other").public_pem,
        );
        let (m, t) = ("GET", prefix);
        w.expect(m, t, "no token", t, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", t, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", t, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "sdapi scope", t, Some(&sdapi), Body::Empty, 403).await;
        w.expect(m, t, "user", t, Some(&user), Body::Empty, 200).await;

        let m = "POST";
        let valid = || Body::Json(fresh_body.clone());
        w.expect(m, t, "no token", t, None, valid(), 401).await;
        w.expect(m, t, "not a JWT", t, Some(&bad), valid(), 401).await;
        w.expect(m, t, "guest", t, Some(&guest), valid(), 403).await;
        w.expect(m, t, "user scope", t, Some(&user), valid(), 403).await;
        w.expect(m, t, "malformed JSON", t, Some(&admin), Body::Raw(b"{".to_vec()), 400).await;
        w.expect(m, t, "not an object", t, Some(&admin), Body::Raw(b"[1]".to_vec()), 400).await;
        w.expect(m, t, "oversize", t, Some(&admin), Body::Raw(oversize()), 413).await;
        let mut unknown = fresh_body.clone();
        unknown["colour"] = json!("blue");
        w.expect(m, t, "unknown field", t, Some(&admin), Body::Json(unknown), 422).await;
        let mut invalid = fresh_body.clone();
        invalid["weightage"] = json!(101);
        w.expect(m, t, "invalid value", t, Some(&admin), Body::Json(invalid), 422).await;
        let mut unset = fresh_body.clone();
        unset["authKey"] = json!("SD_CLUSTER_UNSET_KEY");
        w.expect(m, t, "key variable unset", t, Some(&admin), Body::Json(unset), 422).await;
        w.expect(m, t, "new", t, Some(&admin), valid(), 201).await;
        w.expect(m, t, "name taken", t, Some(&admin), valid(), 409).await;
        h.set_env(
            "SD_CLUSTER_OTHER_KEY",
            &sd_testkit::shared_keys("other").public_pem,
        );
        let mut alike = fresh_body.clone();
        alike["name"] = json!(fresh.to_uppercase());
        alike["authKey"] = json!("SD_CLUSTER_OTHER_KEY");
        let alike = Body::Json(alike);
        w.expect(m, t, "name sharing key variables", t, Some(&admin), alike, 409).await;

        let (m, t) = ("GET", one.as_str());
        let alpha_path = format!("{prefix}/alpha");
        let a = alpha_path.as_str();
        w.expect(m, t, "no token", a, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", a, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", a, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "sdapi scope", a, Some(&sdapi), Body::Empty, 403).await;
        w.expect(m, t, "found", a, Some(&user), Body::Empty, 200).await;
        let ctx = format!("{a}?scmContext={CTX}");
        w.expect(m, t, "found in its context", &ctx, Some(&user), Body::Empty, 200).await;
        let other_ctx = format!("{a}?scmContext=gitlab:gitlab.com");
        w.expect(m, t, "another context", &other_ctx, Some(&user), Body::Empty, 404).await;
        let unknown = format!("{prefix}/nosuch");
        w.expect(m, t, "unknown name", &unknown, Some(&user), Body::Empty, 404).await;
        let undecodable = format!("{prefix}/%FF");
        w.expect(m, t, "invalid UTF-8", &undecodable, Some(&user), Body::Empty, 400).await;
        let twice = format!("{a}?scmContext=a&scmContext=b");
        w.expect(m, t, "parameter twice", &twice, Some(&user), Body::Empty, 400).await;

        let m = "PUT";
        let pause = || Body::Json(json!({"isActive": true}));
        w.expect(m, t, "no token", a, None, pause(), 401).await;
        w.expect(m, t, "not a JWT", a, Some(&bad), pause(), 401).await;
        w.expect(m, t, "guest", a, Some(&guest), pause(), 403).await;
        w.expect(m, t, "user scope", a, Some(&user), pause(), 403).await;
        w.expect(m, t, "malformed JSON", a, Some(&admin), Body::Raw(b"{".to_vec()), 400).await;
        w.expect(m, t, "oversize", a, Some(&admin), Body::Raw(oversize()), 413).await;
        let invalid = Body::Json(json!({"isActive": 2}));
        w.expect(m, t, "invalid value", a, Some(&admin), invalid, 422).await;
        let unknown_field = Body::Json(json!({"colour": "blue"}));
        w.expect(m, t, "unknown field", a, Some(&admin), unknown_field, 422).await;
        let rename = Body::Json(json!({"name": "renamed"}));
        w.expect(m, t, "renaming", a, Some(&admin), rename, 422).await;
        w.expect(m, t, "unknown name", &unknown, Some(&admin), pause(), 404).await;
        w.expect(m, t, "invalid UTF-8", &undecodable, Some(&admin), pause(), 400).await;
        w.expect(m, t, "parameter twice", &twice, Some(&admin), pause(), 400).await;
        let taken = Body::Json(json!({"authKey": "SD_CLUSTER_ALPHA_PUBLIC_KEY"}));
        let beta_path = format!("{prefix}/beta");
        w.expect(m, t, "another's authKey", &beta_path, Some(&admin), taken, 409).await;
        w.expect(m, t, "update", a, Some(&admin), pause(), 200).await;

        let m = "DELETE";
        let fresh_path = format!("{prefix}/{fresh}");
        let f = fresh_path.as_str();
        w.expect(m, t, "no token", f, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", f, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", f, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "user scope", f, Some(&user), Body::Empty, 403).await;
        w.expect(m, t, "unknown name", &unknown, Some(&admin), Body::Empty, 404).await;
        w.expect(m, t, "invalid UTF-8", &undecodable, Some(&admin), Body::Empty, 400).await;
        let twice = format!("{f}?scmContext=a&scmContext=b");
        w.expect(m, t, "parameter twice", &twice, Some(&admin), Body::Empty, 400).await;
        w.expect(m, t, "delete", f, Some(&admin), Body::Empty, 204).await;

        let (m, all) = ("GET", format!("{prefix}/status"));
        let t = all.as_str();
        w.expect(m, t, "no token", t, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", t, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", t, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "sdapi scope", t, Some(&sdapi), Body::Empty, 403).await;
        w.expect(m, t, "user", t, Some(&user), Body::Empty, 200).await;
        let (one_status, alpha_status) = (format!("{one}/status"), format!("{a}/status"));
        let (t, s) = (one_status.as_str(), alpha_status.as_str());
        w.expect(m, t, "no token", s, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", s, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", s, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "sdapi scope", s, Some(&sdapi), Body::Empty, 403).await;
        w.expect(m, t, "found", s, Some(&user), Body::Empty, 200).await;
        let unknown_status = format!("{unknown}/status");
        w.expect(m, t, "unknown name", &unknown_status, Some(&user), Body::Empty, 404).await;
        let undecodable_status = format!("{undecodable}/status");
        w.expect(m, t, "invalid UTF-8", &undecodable_status, Some(&user), Body::Empty, 400).await;
        let (one_dead, alpha_dead) = (format!("{one}/deadletters"), format!("{a}/deadletters"));
        let (t, s) = (one_dead.as_str(), alpha_dead.as_str());
        w.expect(m, t, "no token", s, None, Body::Empty, 401).await;
        w.expect(m, t, "not a JWT", s, Some(&bad), Body::Empty, 401).await;
        w.expect(m, t, "guest", s, Some(&guest), Body::Empty, 403).await;
        w.expect(m, t, "sdapi scope", s, Some(&sdapi), Body::Empty, 403).await;
        w.expect(m, t, "found", s, Some(&user), Body::Empty, 200).await;
        let unknown_dead = format!("{unknown}/deadletters");
        w.expect(m, t, "unknown name", &unknown_dead, Some(&user), Body::Empty, 404).await;
        let undecodable_dead = format!("{undecodable}/deadletters");
        w.expect(m, t, "invalid UTF-8", &undecodable_dead, Some(&user), Body::Empty, 400).await;
    }

    // --- build intake ---
    let (m, t) = ("POST", "/v1/queue/message");
    let valid = |id| Body::Json(start(id, "alpha"));
    w.expect(m, t, "no token", t, None, valid(1), 401).await;
    w.expect(m, t, "not a JWT", t, Some(&bad), valid(1), 401).await;
    w.expect(m, t, "guest", t, Some(&guest), valid(1), 403).await;
    w.expect(m, t, "admin scope", t, Some(&admin), valid(1), 403).await;
    w.expect(m, t, "malformed JSON", t, Some(&sdapi), Body::Raw(b"{".to_vec()), 400).await;
    w.expect(m, t, "oversize", t, Some(&sdapi), Body::Raw(oversize()), 413).await;
    let twice = format!("{t}?type=a&type=b");
    w.expect(m, t, "parameter twice", &twice, Some(&sdapi), valid(1), 400).await;
    let periodic = format!("{t}?type=periodic");
    w.expect(m, t, "another type", &periodic, Some(&sdapi), valid(1), 501).await;
    let mut invalid = start(1, "alpha");
    invalid["buildId"] = json!(0);
    w.expect(m, t, "invalid value", t, Some(&sdapi), Body::Json(invalid), 422).await;
    let mut foreign = start(1, "alpha");
    foreign["apiUri"] = json!("https://elsewhere.example");
    w.expect(m, t, "apiUri not allowed", t, Some(&sdapi), Body::Json(foreign), 422).await;
    let unknown = Body::Json(start(1, "nosuch"));
    w.expect(m, t, "unknown cluster", t, Some(&sdapi), unknown, 422).await;
    let refused = Body::Json(start(1, "ext"));
    w.expect(m, t, "organization refused", t, Some(&sdapi), refused, 403).await;
    w.expect(m, t, "accepted", t, Some(&sdapi), valid(1), 201).await;
    w.expect(m, t, "repeated", t, Some(&sdapi), valid(1), 200).await;
    let mut tokenless = start(9, "alpha");
    tokenless.as_object_mut().expect("object").remove("token");
    w.expect(m, t, "no token to mint", t, Some(&sdapi), Body::Json(tokenless), 500).await;
    w.expect(m, t, "accepted", t, Some(&sdapi), valid(2), 201).await;
    w.expect(m, t, "accepted", t, Some(&sdapi), valid(3), 201).await;

    let m = "DELETE";
    let valid = || Body::Json(json!({"buildId": 3}));
    w.expect(m, t, "no token", t, None, valid(), 401).await;
    w.expect(m, t, "not a JWT", t, Some(&bad), valid(), 401).await;
    w.expect(m, t, "guest", t, Some(&guest), valid(), 403).await;
    w.expect(m, t, "admin scope", t, Some(&admin), valid(), 403).await;
    w.expect(m, t, "malformed JSON", t, Some(&sdapi), Body::Raw(b"{".to_vec()), 400).await;
    w.expect(m, t, "oversize", t, Some(&sdapi), Body::Raw(oversize()), 413).await;
    w.expect(m, t, "parameter twice", &twice, Some(&sdapi), valid(), 400).await;
    w.expect(m, t, "another type", &periodic, Some(&sdapi), valid(), 501).await;
    let invalid = Body::Json(json!({"buildId": 0}));
    w.expect(m, t, "invalid value", t, Some(&sdapi), invalid, 422).await;
    let unknown = Body::Json(json!({"buildId": 999_999}));
    w.expect(m, t, "unknown build", t, Some(&sdapi), unknown, 404).await;
    w.expect(m, t, "stopped", t, Some(&sdapi), valid(), 200).await;

    let (m, t) = ("GET", "/v1/builds/{build_id}");
    let p = "/v1/builds/1";
    w.expect(m, t, "no token", p, None, Body::Empty, 401).await;
    w.expect(m, t, "not a JWT", p, Some(&bad), Body::Empty, 401).await;
    w.expect(m, t, "guest", p, Some(&guest), Body::Empty, 403).await;
    w.expect(m, t, "no scope", p, Some(&scopeless), Body::Empty, 403).await;
    w.expect(m, t, "not a number", "/v1/builds/abc", Some(&user), Body::Empty, 400).await;
    w.expect(m, t, "zero", "/v1/builds/0", Some(&user), Body::Empty, 400).await;
    let too_big = "/v1/builds/9223372036854775808";
    w.expect(m, t, "past 2^63-1", too_big, Some(&user), Body::Empty, 400).await;
    w.expect(m, t, "unknown", "/v1/builds/999999", Some(&user), Body::Empty, 404).await;
    w.expect(m, t, "found", p, Some(&sdapi), Body::Empty, 200).await;

    // --- the workers' calls ---
    let a = alpha.token("alpha", 60);
    // Signed with alpha's key, claiming beta: 403 on alpha's paths.
    let wrong = alpha.token("beta", 60);
    let b = beta.token("beta", 60);
    let unregistered = nosuch.token("nosuch", 60);
    let misconfigured = misconf.token("misconf", 60);
    let (m, t) = POLL;
    let p = "/v1/jobs/alpha?wait=0";
    w.expect(m, t, "no token", p, None, Body::Empty, 401).await;
    w.expect(m, t, "not a JWT", p, Some(&bad), Body::Empty, 401).await;
    w.expect(m, t, "API token", p, Some(&admin), Body::Empty, 401).await;
    w.expect(m, t, "another cluster's", p, Some(&wrong), Body::Empty, 403).await;
    let unknown = "/v1/jobs/nosuch?wait=0";
    w.expect(m, t, "unknown cluster", unknown, Some(&unregistered), Body::Empty, 404).await;
    let impossible = "/v1/jobs/bad%20name?wait=0";
    w.expect(m, t, "impossible name", impossible, Some(&a), Body::Empty, 404).await;
    w.expect(m, t, "invalid UTF-8", "/v1/jobs/%FF", Some(&a), Body::Empty, 400).await;
    let twice = "/v1/jobs/alpha?wait=0&wait=1";
    w.expect(m, t, "parameter twice", twice, Some(&a), Body::Empty, 400).await;
    let wait = "/v1/jobs/alpha?wait=abc";
    w.expect(m, t, "wait not a number", wait, Some(&a), Body::Empty, 422).await;
    let long = "/v1/jobs/alpha?wait=100000";
    w.expect(m, t, "wait too long", long, Some(&a), Body::Empty, 422).await;
    let max = "/v1/jobs/alpha?wait=0&max=0";
    w.expect(m, t, "max zero", max, Some(&a), Body::Empty, 422).await;
    let misconfigured_path = "/v1/jobs/misconf?wait=0";
    w.expect(m, t, "key variable gone", misconfigured_path, Some(&misconfigured), Body::Empty, 500).await;
    w.expect(m, t, "poll", "/v1/jobs/alpha?wait=0&max=10", Some(&a), Body::Empty, 200).await;
    // Past the per-token cap (1 here): a second poll of the same token while one waits.
    let waiting = {
        let (http, base, token) = (h.http.clone(), h.base.clone(), b.clone());
        tokio::spawn(async move {
            common::call_at(&http, &base, Method::GET, "/v1/jobs/beta?wait=3", Some(&token), None)
                .await
        })
    };
    let limits = &h.scheduler.state().poll_limits;
    let entered = eventually(Duration::from_secs(5), || async {
        (limits.waiting() == 1).then_some(())
    }).await;
    assert!(entered.is_some(), "the first poll never waited");
    w.expect(m, t, "past the token cap", "/v1/jobs/beta?wait=0", Some(&b), Body::Empty, 429).await;
    let (status, body) = waiting.await.expect("waiting poll");
    assert_eq!(status, 200, "{body}");

    for action in ["ack", "nack", "renew"] {
        let t = format!("/v1/jobs/{{cluster}}/{action}");
        let (m, t) = ("POST", t.as_str());
        let p = format!("/v1/jobs/alpha/{action}");
        let p = p.as_str();
        let ids = || Body::Json(json!({"deliveryIds": ["1@1"]}));
        w.expect(m, t, "no token", p, None, ids(), 401).await;
        w.expect(m, t, "not a JWT", p, Some(&bad), ids(), 401).await;
        w.expect(m, t, "another cluster's", p, Some(&wrong), ids(), 403).await;
        let unknown = format!("/v1/jobs/nosuch/{action}");
        w.expect(m, t, "unknown cluster", &unknown, Some(&unregistered), ids(), 404).await;
        let impossible = format!("/v1/jobs/bad%20name/{action}");
        w.expect(m, t, "impossible name", &impossible, Some(&a), ids(), 404).await;
        let undecodable = format!("/v1/jobs/%FF/{action}");
        w.expect(m, t, "invalid UTF-8", &undecodable, Some(&a), ids(), 400).await;
        w.expect(m, t, "malformed JSON", p, Some(&a), Body::Raw(b"{".to_vec()), 400).await;
        w.expect(m, t, "oversize", p, Some(&a), Body::Raw(oversize()), 413).await;
        w.expect(m, t, "no ids", p, Some(&a), Body::Json(json!({"deliveryIds": []})), 422).await;
        let extra = Body::Json(json!({"deliveryIds": ["1@1"], "colour": 1}));
        w.expect(m, t, "unknown field", p, Some(&a), extra, 422).await;
        let misconfigured_path = format!("/v1/jobs/misconf/{action}");
        w.expect(m, t, "key variable gone", &misconfigured_path, Some(&misconfigured), ids(), 500).await;
        w.expect(m, t, "stale ids", p, Some(&a), ids(), 200).await;
    }

    let (m, t) = ("POST", "/v1/jobs/{cluster}/events");
    let p = "/v1/jobs/alpha/events";
    let running = |id: u64| Body::Json(json!({"buildId": id, "event": "running"}));
    w.expect(m, t, "no token", p, None, running(2), 401).await;
    w.expect(m, t, "not a JWT", p, Some(&bad), running(2), 401).await;
    w.expect(m, t, "another cluster's", p, Some(&wrong), running(2), 403).await;
    let unknown = "/v1/jobs/nosuch/events";
    w.expect(m, t, "unknown cluster", unknown, Some(&unregistered), running(2), 404).await;
    let impossible = "/v1/jobs/bad%20name/events";
    w.expect(m, t, "impossible name", impossible, Some(&a), running(2), 404).await;
    w.expect(m, t, "invalid UTF-8", "/v1/jobs/%FF/events", Some(&a), running(2), 400).await;
    w.expect(m, t, "malformed JSON", p, Some(&a), Body::Raw(b"{".to_vec()), 400).await;
    w.expect(m, t, "oversize", p, Some(&a), Body::Raw(oversize()), 413).await;
    let exploded = Body::Json(json!({"buildId": 2, "event": "exploded"}));
    w.expect(m, t, "unknown event", p, Some(&a), exploded, 422).await;
    w.expect(m, t, "unknown build", p, Some(&a), running(999_999), 404).await;
    let not_beta = "/v1/jobs/beta/events";
    w.expect(m, t, "another cluster's build", not_beta, Some(&b), running(2), 403).await;
    let misconfigured_path = "/v1/jobs/misconf/events";
    w.expect(m, t, "key variable gone", misconfigured_path, Some(&misconfigured), running(2), 500).await;
    w.expect(m, t, "running", p, Some(&a), running(2), 200).await;

    // --- dead letters: held, then requeued or failed by an admin
    for (n, prefix) in ["/v4/buildclusters", "/buildClusters"].into_iter().enumerate() {
        let (first, second) = (20 + 2 * n as u64, 21 + 2 * n as u64);
        let_die(&h, &a, &[first, second]).await;
        for verb in ["requeue", "fail"] {
            let t = format!("{prefix}/{{name}}/deadletters/{{id}}/{verb}");
            let (m, t) = ("POST", t.as_str());
            let id = if verb == "requeue" { first } else { second };
            let p = format!("{prefix}/alpha/deadletters/{id}/{verb}");
            let p = p.as_str();
            w.expect(m, t, "no token", p, None, Body::Empty, 401).await;
            w.expect(m, t, "not a JWT", p, Some(&bad), Body::Empty, 401).await;
            w.expect(m, t, "guest", p, Some(&guest), Body::Empty, 403).await;
            w.expect(m, t, "user scope", p, Some(&user), Body::Empty, 403).await;
            let unknown = format!("{prefix}/ghost/deadletters/{id}/{verb}");
            w.expect(m, t, "unknown cluster", &unknown, Some(&admin), Body::Empty, 404).await;
            let theirs = format!("{prefix}/beta/deadletters/{id}/{verb}");
            w.expect(m, t, "another cluster's", &theirs, Some(&admin), Body::Empty, 404).await;
            let undecodable = format!("{prefix}/%FF/deadletters/{id}/{verb}");
            w.expect(m, t, "invalid UTF-8", &undecodable, Some(&admin), Body::Empty, 400).await;
            let not_an_id = format!("{prefix}/alpha/deadletters/stop:x/{verb}");
            w.expect(m, t, "not an id", &not_an_id, Some(&admin), Body::Empty, 400).await;
            let none = format!("{prefix}/alpha/deadletters/999999/{verb}");
            w.expect(m, t, "no such letter", &none, Some(&admin), Body::Empty, 404).await;
            w.expect(m, t, "held", p, Some(&admin), Body::Empty, 200).await;
        }
        let t = format!("{prefix}/{{name}}/deadletters/{{id}}/requeue");
        let failed = format!("{prefix}/alpha/deadletters/{second}/requeue");
        w.expect("POST", &t, "failed already", &failed, Some(&admin), Body::Empty, 409).await;
        let t = format!("{prefix}/{{name}}/deadletters/{{id}}/fail");
        let failed = format!("{prefix}/alpha/deadletters/{second}/fail");
        w.expect("POST", &t, "failed already", &failed, Some(&admin), Body::Empty, 409).await;
    }

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        w.expect("GET", path, "up", path, None, Body::Empty, 200).await;
    }

    // --- a busy scheduler: one request stalls (its body never comes) and holds the only slot
    let head = format!(
        "POST /v4/buildclusters HTTP/1.1\r\nhost: scheduler\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    // The stalled request must be the one holding the slot: were any other request in flight
    // as it arrives (on a busy test machine, a stray client on a reused port), it is answered
    // 503 at once, and the stall is tried again.
    let mut stalled = None;
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(h.scheduler.addr()).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut answer = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut answer)).await;
        if early.is_err() {
            stalled = Some(stream);
            break;
        }
    }
    let stalled = stalled.expect("a stalled request that holds the only slot");
    let busy = eventually(Duration::from_secs(5), || async {
        let (status, _) = h.call(Method::GET, "/healthz", None, None).await;
        (status == 503).then_some(())
    }).await;
    assert!(busy.is_some(), "the stalled request did not make the scheduler busy");
    for (method, template) in operations(&w.doc.clone()) {
        let path = template.replace("{name}", "alpha").replace("{cluster}", "alpha").replace("{build_id}", "1").replace("{id}", "1");
        if (method.as_str(), template.as_str()) == POLL {
            // The long-poll is outside the cap: it is served all the same.
            let path = format!("{path}?wait=0");
            w.expect(&method, &template, "busy", &path, Some(&a), Body::Empty, 200).await;
            continue;
        }
        let answer = w.expect(&method, &template, "busy", &path, None, Body::Empty, 503).await;
        assert_eq!(answer.retry_after.as_deref(), Some("1"), "{method} {template}");
    }
    drop(stalled);
    let idle = eventually(Duration::from_secs(5), || async {
        let (status, _) = h.call(Method::GET, "/healthz", None, None).await;
        (status == 200).then_some(())
    }).await;
    assert!(idle.is_some(), "the scheduler stayed busy");

    // --- Redis down ---
    let held = [30, 31, 32, 33];
    let_die(&h, &a, &held).await;
    let t = "/v1/queue/message";
    w.expect("POST", t, "accepted", t, Some(&sdapi), Body::Json(start(4, "alpha")), 201).await;
    h.redis.kill();
    w.expect("POST", t, "Redis down", t, Some(&sdapi), Body::Json(start(5, "alpha")), 503).await;
    let stop = Body::Json(json!({"buildId": 4}));
    w.expect("DELETE", t, "Redis down", t, Some(&sdapi), stop, 503).await;
    let p = "/v1/jobs/alpha?wait=0";
    w.expect("GET", POLL.1, "Redis down", p, Some(&a), Body::Empty, 503).await;
    for action in ["ack", "nack", "renew"] {
        let t = format!("/v1/jobs/{{cluster}}/{action}");
        let p = format!("/v1/jobs/alpha/{action}");
        let ids = Body::Json(json!({"deliveryIds": ["1@1"]}));
        w.expect("POST", &t, "Redis down", &p, Some(&a), ids, 503).await;
    }
    for prefix in ["/v4/buildclusters", "/buildClusters"] {
        let (all, one) = (format!("{prefix}/status"), format!("{prefix}/{{name}}/status"));
        w.expect("GET", &all, "Redis down", &all, Some(&user), Body::Empty, 503).await;
        let alpha = format!("{prefix}/alpha/status");
        w.expect("GET", &one, "Redis down", &alpha, Some(&user), Body::Empty, 503).await;
        let (one, alpha) = (format!("{prefix}/{{name}}/deadletters"), format!("{prefix}/alpha/deadletters"));
        w.expect("GET", &one, "Redis down", &alpha, Some(&user), Body::Empty, 503).await;
    }
    for (prefix, ids) in [("/v4/buildclusters", [30, 31]), ("/buildClusters", [32, 33])] {
        for (verb, id) in ["requeue", "fail"].into_iter().zip(ids) {
            let t = format!("{prefix}/{{name}}/deadletters/{{id}}/{verb}");
            let p = format!("{prefix}/alpha/deadletters/{id}/{verb}");
            w.expect("POST", &t, "Redis down", &p, Some(&admin), Body::Empty, 503).await;
        }
    }
    let answer = w.expect("GET", "/readyz", "Redis down", "/readyz", None, Body::Empty, 503).await;
    assert_eq!(answer.body["ready"], false, "{}", answer.body);
    assert_ne!(answer.body["redis"], "ok", "{}", answer.body);

    // --- the database down ---
    h.scheduler.state().db.pool.close().await;
    for prefix in ["/v4/buildclusters", "/buildClusters"] {
        let one = format!("{prefix}/{{name}}");
        let a_path = format!("{prefix}/alpha");
        w.expect("GET", prefix, "database down", prefix, Some(&user), Body::Empty, 503).await;
        let mut body = cluster("later", "screwdriver", &[]);
        body["authKey"] = json!("SD_CLUSTER_ALPHA_PUBLIC_KEY");
        w.expect("POST", prefix, "database down", prefix, Some(&admin), Body::Json(body), 503).await;
        w.expect("GET", &one, "database down", &a_path, Some(&user), Body::Empty, 503).await;
        let pause = Body::Json(json!({"isActive": false}));
        w.expect("PUT", &one, "database down", &a_path, Some(&admin), pause, 503).await;
        w.expect("DELETE", &one, "database down", &a_path, Some(&admin), Body::Empty, 503).await;
        for verb in ["requeue", "fail"] {
            let t = format!("{prefix}/{{name}}/deadletters/{{id}}/{verb}");
            let p = format!("{prefix}/alpha/deadletters/31/{verb}");
            w.expect("POST", &t, "database down", &p, Some(&admin), Body::Empty, 503).await;
        }
    }
    w.expect("GET", "/v1/builds/{build_id}", "database down", "/v1/builds/1", Some(&user), Body::Empty, 503).await;
    w.expect("POST", "/v1/jobs/{cluster}/events", "database down", "/v1/jobs/alpha/events", Some(&a), running(2), 503).await;

    w.finish();
}

both_backends!(every_status_answered_is_documented);

// === the schemas ===

/// Marks a field to remove from the base body.
const ABSENT: &str = "<absent>";
/// Stands for the name of the cluster an update goes to.
const NAME: &str = "<name>";

/// `base` with `patch` applied: objects merge, [`ABSENT`] removes, anything else replaces.
fn merged(mut base: Value, patch: &Value) -> Value {
    fn apply(target: &mut Value, patch: &Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(target), Some(patch)) => {
                for (k, v) in patch {
                    if v == ABSENT {
                        target.remove(k);
                    } else if v.is_object() && target.get(k).is_some_and(Value::is_object) {
                        apply(target.get_mut(k).expect("present"), v);
                    } else {
                        target.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }
    apply(&mut base, patch);
    base
}

/// Replaces every string [`NAME`] in `v` with `name`.
fn named(v: &Value, name: &str) -> Value {
    match v {
        Value::String(s) if s == NAME => json!(name),
        Value::Array(items) => Value::Array(items.iter().map(|i| named(i, name)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), named(v, name)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The schema the document gives the request body of `method path`.
fn request_schema(doc: &Value, method: &str, path: &str) -> Value {
    let schema = &doc["paths"][path][method.to_lowercase()]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} documents no JSON request body"
    );
    schema.clone()
}

/// The descriptions in a schema and in the schemas it refers to, white space made single
/// spaces.
fn descriptions(doc: &Value, schema: &Value) -> String {
    fn collect(doc: &Value, v: &Value, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("description", Value::String(text)) => out.push(text.clone()),
                        ("$ref", Value::String(r)) => {
                            if seen.insert(r.clone()) {
                                let name = r.trim_start_matches("#/components/schemas/");
                                collect(doc, &doc["components"]["schemas"][name], seen, out);
                            }
                        }
                        _ => collect(doc, v, seen, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| collect(doc, i, seen, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    collect(doc, schema, &mut BTreeSet::new(), &mut out);
    out.join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Judges bodies by the document's schema and by the API, and collects disagreements.
struct Judge {
    doc: Value,
    problems: Vec<String>,
    judged: usize,
}

impl Judge {
    /// Whether the schema of `method path` accepts `body`.
    fn schema_accepts(&self, method: &str, path: &str, body: &Value) -> bool {
        validator(&self.doc, &request_schema(&self.doc, method, path)).is_valid(body)
    }

    /// The API's verdict: 2xx accepts, 422 refuses; anything else is a problem of the case.
    fn api_accepts(&mut self, label: &str, status: u16, answer: &Value) -> Option<bool> {
        match status {
            200..=299 => Some(true),
            422 => Some(false),
            other => {
                self.problems.push(format!(
                    "{label}: the API answered {other}, neither 2xx nor 422: {answer}"
                ));
                None
            }
        }
    }

    /// `valid` is what the case is written to be; the schema and the API must both say so.
    fn agree(
        &mut self,
        label: &str,
        method: &str,
        path: &str,
        body: &Value,
        valid: bool,
        api: (StatusCode, Value),
    ) {
        self.judged += 1;
        let schema = self.schema_accepts(method, path, body);
        let Some(api_ok) = self.api_accepts(label, api.0.as_u16(), &api.1) else {
            return;
        };
        if schema != valid || api_ok != valid {
            self.problems.push(format!(
                "{label}: written {}, the schema {} it, the API {} it ({} {}); body {body}",
                if valid { "valid" } else { "invalid" },
                if schema { "accepts" } else { "refuses" },
                if api_ok { "accepts" } else { "refuses" },
                api.0,
                api.1
            ));
        }
    }

    /// A rule the schema cannot state: the schema accepts `body`, the API refuses it, and the
    /// schema's description says the rule (`words` are in it).
    fn described(
        &mut self,
        label: &str,
        method: &str,
        path: &str,
        body: &Value,
        words: &str,
        api: (StatusCode, Value),
    ) {
        self.judged += 1;
        let schema = request_schema(&self.doc, method, path);
        if !self.schema_accepts(method, path, body) {
            self.problems.push(format!(
                "{label}: the schema now refuses {body}: move the case to the agreement table"
            ));
        }
        if self.api_accepts(label, api.0.as_u16(), &api.1) != Some(false) {
            self.problems
                .push(format!("{label}: the API accepted {body}: {}", api.1));
        }
        if !descriptions(&self.doc, &schema).contains(words) {
            self.problems.push(format!(
                "{label}: the schema of {method} {path} does not say {words:?}"
            ));
        }
    }
}

/// A create body whose name and key variable are the case's own.
fn create_base(i: usize) -> Value {
    json!({
        "name": format!("c{i}"),
        "scmContext": CTX,
        "managedBy": "screwdriver",
        "managedByEmail": "team@example.com",
        "authKey": format!("SD_CLUSTER_C{i}_KEY"),
    })
}

/// Create bodies: (label, patch over [`create_base`], valid).
#[rustfmt::skip]
fn create_cases() -> Vec<(&'static str, Value, bool)> {
    let ws_org = "a\u{85}b"; // white space to Rust, not to ECMA-262's \s
    vec![
        ("the base", json!({}), true),
        ("a name of 100 characters", json!({"name": "n".repeat(99) + "x"}), true),
        ("a name with . - _", json!({"name": "a.b-c_d9"}), true),
        ("managedByScrewdriver true", json!({"managedBy": ABSENT, "managedByScrewdriver": true}), true),
        ("managedByScrewdriver 1", json!({"managedBy": ABSENT, "managedByScrewdriver": 1}), true),
        ("both, agreeing", json!({"managedByScrewdriver": true}), true),
        ("external with organizations", json!({"managedBy": "external", "scmOrganizations": ["mobile"]}), true),
        ("managedByScrewdriver 0 and joined organizations", json!({"managedBy": ABSENT, "managedByScrewdriver": 0, "scmOrganizations": "mobile, web"}), true),
        ("external, joined with blanks", json!({"managedBy": "external", "scmOrganizations": " , mobile ,, "}), true),
        ("duplicate organizations", json!({"scmOrganizations": ["a", "a"]}), true),
        ("an organization of 100 characters", json!({"scmOrganizations": ["o".repeat(100)]}), true),
        ("organizations null", json!({"scmOrganizations": null}), true),
        ("organizations empty string", json!({"scmOrganizations": ""}), true),
        ("maintainer for managedByEmail", json!({"managedByEmail": ABSENT, "maintainer": "ops@example.com"}), true),
        ("both emails, equal", json!({"maintainer": "team@example.com"}), true),
        ("a dotted email", json!({"managedByEmail": "first.last@mail.example.co"}), true),
        ("an email of 100 characters", json!({"managedByEmail": format!("{}@example.com", "e".repeat(88))}), true),
        ("isActive 0", json!({"isActive": 0}), true),
        ("isActive false", json!({"isActive": false}), true),
        ("isActive null", json!({"isActive": null}), true),
        ("weightage 0", json!({"weightage": 0}), true),
        ("weightage 100", json!({"weightage": 100}), true),
        ("weightage null", json!({"weightage": null}), true),
        ("group", json!({"group": "g-1.x"}), true),
        ("group null", json!({"group": null}), true),
        ("description empty", json!({"description": ""}), true),
        ("description of 100 wide characters", json!({"description": "é".repeat(100)}), true),
        ("signOption null", json!({"signOption": null}), true),
        ("scmContext with a port", json!({"scmContext": "gitlab:gitlab.example.com:8080"}), true),
        ("scmContext with U+FEFF (not white space to Rust)", json!({"scmContext": "github:github.com\u{feff}"}), true),
        ("name absent", json!({"name": ABSENT}), false),
        ("name null", json!({"name": null}), false),
        ("name empty", json!({"name": ""}), false),
        ("name with a space", json!({"name": "bad name"}), false),
        ("name of 101 characters", json!({"name": "n".repeat(101)}), false),
        ("name not ASCII", json!({"name": "ü"}), false),
        ("name a number", json!({"name": 5}), false),
        ("scmContext absent", json!({"scmContext": ABSENT}), false),
        ("scmContext without ':'", json!({"scmContext": "github"}), false),
        ("scmContext with a space", json!({"scmContext": "git hub:x"}), false),
        ("scmContext with U+0085", json!({"scmContext": "github:x\u{85}"}), false),
        ("scmContext of 201 characters", json!({"scmContext": format!("github:{}", "h".repeat(194))}), false),
        ("authKey absent", json!({"authKey": ABSENT}), false),
        ("authKey starting with a digit", json!({"authKey": "1KEY"}), false),
        ("authKey a PEM", json!({"authKey": "-----BEGIN PUBLIC KEY-----"}), false),
        ("authKey of 101 characters", json!({"authKey": format!("SD_CLUSTER_{}", "K".repeat(90))}), false),
        ("signOption starting with a digit", json!({"signOption": "1X"}), false),
        ("signOption empty", json!({"signOption": ""}), false),
        ("no managedBy", json!({"managedBy": ABSENT}), false),
        ("managedBy null", json!({"managedBy": null}), false),
        ("managedBy unknown", json!({"managedBy": "them"}), false),
        ("managedByScrewdriver 2", json!({"managedBy": ABSENT, "managedByScrewdriver": 2}), false),
        ("managedByScrewdriver a string", json!({"managedBy": ABSENT, "managedByScrewdriver": "yes"}), false),
        ("managedBy and its alias disagree", json!({"managedByScrewdriver": false}), false),
        ("external but managedByScrewdriver 1", json!({"managedBy": "external", "managedByScrewdriver": 1, "scmOrganizations": ["a"]}), false),
        ("external without organizations", json!({"managedBy": "external"}), false),
        ("external with none listed", json!({"managedBy": "external", "scmOrganizations": []}), false),
        ("external with an empty string", json!({"managedBy": "external", "scmOrganizations": ""}), false),
        ("external with only commas", json!({"managedBy": "external", "scmOrganizations": " , "}), false),
        ("no email", json!({"managedByEmail": ABSENT}), false),
        ("email null", json!({"managedByEmail": null}), false),
        ("email without @", json!({"managedByEmail": "nope"}), false),
        ("email without a dot", json!({"managedByEmail": "a@b"}), false),
        ("email ending in a dot", json!({"managedByEmail": "a@b."}), false),
        ("email with an empty label", json!({"managedByEmail": "a@.b"}), false),
        ("email with a space", json!({"managedByEmail": "a b@c.d"}), false),
        ("email with two @", json!({"managedByEmail": "a@b@c.d"}), false),
        ("email without a local part", json!({"managedByEmail": "@b.c"}), false),
        ("email with a control character", json!({"managedByEmail": "a@b.c\u{7f}"}), false),
        ("email of 101 characters", json!({"managedByEmail": format!("{}@example.com", "e".repeat(89))}), false),
        ("maintainer invalid", json!({"managedByEmail": ABSENT, "maintainer": "nope"}), false),
        ("isActive 2", json!({"isActive": 2}), false),
        ("isActive a string", json!({"isActive": "yes"}), false),
        ("weightage 101", json!({"weightage": 101}), false),
        ("weightage -1", json!({"weightage": -1}), false),
        ("weightage a string", json!({"weightage": "5"}), false),
        ("group empty", json!({"group": ""}), false),
        ("group with a space", json!({"group": "a b"}), false),
        ("group of 51 characters", json!({"group": "g".repeat(51)}), false),
        ("description of 101 characters", json!({"description": "d".repeat(101)}), false),
        ("description a number", json!({"description": 5}), false),
        ("an organization with /", json!({"scmOrganizations": ["a/b"]}), false),
        ("an organization with a space", json!({"scmOrganizations": ["a b"]}), false),
        ("an organization with U+0085", json!({"scmOrganizations": [ws_org]}), false),
        ("an organization with a comma", json!({"scmOrganizations": ["a,b"]}), false),
        ("an organization not a string", json!({"scmOrganizations": [1]}), false),
        ("an organization of 101 characters", json!({"scmOrganizations": ["o".repeat(101)]}), false),
        ("joined, one with a space", json!({"scmOrganizations": "a b, c"}), false),
        ("joined, one with /", json!({"scmOrganizations": "a/b"}), false),
        ("joined, one of 101 characters", json!({"scmOrganizations": format!("a, {}", "o".repeat(101))}), false),
        ("organizations an object", json!({"scmOrganizations": {"a": 1}}), false),
        ("an unknown field", json!({"colour": "blue"}), false),
        ("an id", json!({"id": 7}), false),
    ]
}

/// Update bodies: (label, patch, valid); [`NAME`] stands for the cluster's own name.
#[rustfmt::skip]
fn update_cases() -> Vec<(&'static str, Value, bool)> {
    vec![
        ("nothing", json!({}), true),
        ("pause", json!({"isActive": false}), true),
        ("isActive 1", json!({"isActive": 1}), true),
        ("its own name", json!({"name": NAME}), true),
        ("name null", json!({"name": null}), true),
        ("weightage", json!({"weightage": 5}), true),
        ("to external, with organizations", json!({"managedBy": "external", "scmOrganizations": ["a"]}), true),
        ("to external by the alias", json!({"managedByScrewdriver": 0, "scmOrganizations": "a"}), true),
        ("description null", json!({"description": null}), true),
        ("maintainer", json!({"maintainer": "x@y.example"}), true),
        ("scmContext null", json!({"scmContext": null}), true),
        ("authKey null", json!({"authKey": null}), true),
        ("group", json!({"group": "g2"}), true),
        ("isActive 2", json!({"isActive": 2}), false),
        ("an unknown field", json!({"colour": 1}), false),
        ("an id", json!({"id": 3}), false),
        ("a name with a space", json!({"name": "bad name"}), false),
        ("weightage 101", json!({"weightage": 101}), false),
        ("managedBy and its alias disagree", json!({"managedBy": "screwdriver", "managedByScrewdriver": false}), false),
        ("email without @", json!({"managedByEmail": "nope"}), false),
        ("an organization with /", json!({"scmOrganizations": ["a/b"]}), false),
        ("group empty", json!({"group": ""}), false),
        ("authKey starting with a digit", json!({"authKey": "1X"}), false),
        ("scmContext without ':'", json!({"scmContext": "nocolon"}), false),
        ("managedBy unknown", json!({"managedBy": "them"}), false),
    ]
}

const MAX_ID: u64 = 9_223_372_036_854_775_807;

/// Start messages: (label, patch over a build's body, valid).
#[rustfmt::skip]
fn start_cases() -> Vec<(&'static str, Value, bool)> {
    vec![
        ("Screwdriver's payload", json!({}), true),
        ("the required fields only", json!({"eventId": ABSENT, "jobName": ABSENT, "jobState": ABSENT, "jobArchived": ABSENT, "annotations": ABSENT, "blockedBy": ABSENT, "isPR": ABSENT, "prParentJobId": ABSENT, "causeMessage": ABSENT, "freezeWindows": ABSENT, "build": ABSENT, "pipeline": {"configPipelineId": ABSENT}}), true),
        ("buildId 2^63-1", json!({"buildId": MAX_ID}), true),
        ("eventId null", json!({"eventId": null}), true),
        ("pipelineId equal to pipeline.id", json!({"pipelineId": 7}), true),
        ("pipelineId null", json!({"pipelineId": null}), true),
        ("the cluster annotation", json!({"annotations": {"screwdriver.cd/buildCluster": "alpha"}}), true),
        ("the short annotation", json!({"annotations": {"buildCluster": "alpha"}}), true),
        ("another annotation, not a string", json!({"annotations": {"screwdriver.cd/cpu": 5}}), true),
        ("blockedBy empty", json!({"blockedBy": []}), true),
        ("blockedBy 2^63-1", json!({"blockedBy": [MAX_ID]}), true),
        ("a pipeline name with two slashes", json!({"pipeline": {"name": "org/repo/sub"}}), true),
        ("a container padded", json!({"container": " node "}), true),
        ("a container of U+FEFF (not white space to Rust)", json!({"container": "\u{feff}"}), true),
        ("unknown fields", json!({"whatever": {"a": 1}, "pipeline": {"more": true}}), true),
        ("a token", json!({"token": "t"}), true),
        ("token null", json!({"token": null}), true),
        ("buildClusterName empty", json!({"buildClusterName": ""}), true),
        ("buildClusterName null", json!({"buildClusterName": null}), true),
        ("jobName null", json!({"jobName": null}), true),
        ("isPR true", json!({"isPR": true}), true),
        ("prParentJobId", json!({"prParentJobId": 5}), true),
        ("pipeline annotations", json!({"pipeline": {"annotations": {"buildCluster": "alpha"}}}), true),
        ("buildId 0", json!({"buildId": 0}), false),
        ("buildId -1", json!({"buildId": -1}), false),
        ("buildId 2^63", json!({"buildId": MAX_ID + 1}), false),
        ("buildId a string", json!({"buildId": "abc"}), false),
        ("buildId absent", json!({"buildId": ABSENT}), false),
        ("buildId null", json!({"buildId": null}), false),
        ("jobId 0", json!({"jobId": 0}), false),
        ("jobId absent", json!({"jobId": ABSENT}), false),
        ("eventId 0", json!({"eventId": 0}), false),
        ("eventId a string", json!({"eventId": "5"}), false),
        ("pipelineId 0", json!({"pipelineId": 0}), false),
        ("pipeline absent", json!({"pipeline": ABSENT}), false),
        ("pipeline.id 0", json!({"pipeline": {"id": 0}}), false),
        ("pipeline.name without a slash", json!({"pipeline": {"name": "noslash"}}), false),
        ("pipeline.name without an organization", json!({"pipeline": {"name": "/repo"}}), false),
        ("pipeline.name without a repository", json!({"pipeline": {"name": "org/"}}), false),
        ("pipeline.name absent", json!({"pipeline": {"name": ABSENT}}), false),
        ("pipeline.scmContext without ':'", json!({"pipeline": {"scmContext": "github"}}), false),
        ("apiUri not http", json!({"apiUri": "ftp://x"}), false),
        ("apiUri in capitals", json!({"apiUri": "HTTPS://api.screwdriver.example"}), false),
        ("apiUri absent", json!({"apiUri": ABSENT}), false),
        ("container blank", json!({"container": " "}), false),
        ("container empty", json!({"container": ""}), false),
        ("container U+0085", json!({"container": "\u{85}"}), false),
        ("container absent", json!({"container": ABSENT}), false),
        ("container a number", json!({"container": 5}), false),
        ("the cluster annotation a number", json!({"annotations": {"screwdriver.cd/buildCluster": 5}}), false),
        ("the short annotation null", json!({"annotations": {"buildCluster": null}}), false),
        ("annotations null", json!({"annotations": null}), false),
        ("annotations a string", json!({"annotations": "x"}), false),
        ("blockedBy 0", json!({"blockedBy": [0]}), false),
        ("blockedBy with a string", json!({"blockedBy": [1, "x"]}), false),
        ("blockedBy a string", json!({"blockedBy": "1"}), false),
        ("blockedBy null", json!({"blockedBy": null}), false),
        ("isPR a string", json!({"isPR": "yes"}), false),
        ("isPR null", json!({"isPR": null}), false),
        ("token a number", json!({"token": 5}), false),
    ]
}

/// Ack and renew bodies (label, body, valid).
#[rustfmt::skip]
fn ack_cases() -> Vec<(&'static str, Value, bool)> {
    let ids = |n: usize| (0..n).map(|i| format!("{i}@1")).collect::<Vec<_>>();
    vec![
        ("one id", json!({"deliveryIds": ["1@1"]}), true),
        ("1000 ids", json!({"deliveryIds": ids(1000)}), true),
        ("nothing", json!({}), false),
        ("no ids", json!({"deliveryIds": []}), false),
        ("1001 ids", json!({"deliveryIds": ids(1001)}), false),
        ("ids a string", json!({"deliveryIds": "1@1"}), false),
        ("an id a number", json!({"deliveryIds": [1]}), false),
        ("ids null", json!({"deliveryIds": null}), false),
        ("a reason", json!({"deliveryIds": ["1@1"], "reason": "x"}), false),
    ]
}

#[rustfmt::skip]
fn nack_cases() -> Vec<(&'static str, Value, bool)> {
    vec![
        ("no reason", json!({"deliveryIds": ["1@1"]}), true),
        ("a reason", json!({"deliveryIds": ["1@1"], "reason": "local Redis is down"}), true),
        ("a reason of 1000 wide characters", json!({"deliveryIds": ["1@1"], "reason": "é".repeat(1000)}), true),
        ("a reason of 1001 characters", json!({"deliveryIds": ["1@1"], "reason": "r".repeat(1001)}), false),
        ("reason null", json!({"deliveryIds": ["1@1"], "reason": null}), false),
        ("reason a number", json!({"deliveryIds": ["1@1"], "reason": 1}), false),
        ("no ids", json!({"deliveryIds": [], "reason": "x"}), false),
        ("an unknown field", json!({"deliveryIds": ["1@1"], "why": "x"}), false),
    ]
}

/// Event bodies; `B` builds exist on the cluster (2^63-1 too).
#[rustfmt::skip]
fn event_cases(b: u64) -> Vec<(&'static str, Value, bool)> {
    vec![
        ("running", json!({"buildId": b, "event": "running"}), true),
        ("a status message null", json!({"buildId": b, "event": "running", "statusMessage": null}), true),
        ("a status message of 1000 wide characters", json!({"buildId": b, "event": "failed", "statusMessage": "é".repeat(1000)}), true),
        ("finished", json!({"buildId": b, "event": "finished"}), true),
        ("stopped", json!({"buildId": b, "event": "stopped"}), true),
        ("buildId 2^63-1", json!({"buildId": MAX_ID, "event": "running"}), true),
        ("an unknown event", json!({"buildId": b, "event": "exploded"}), false),
        ("an event in capitals", json!({"buildId": b, "event": "Running"}), false),
        ("buildId 0", json!({"buildId": 0, "event": "running"}), false),
        ("buildId 2^63", json!({"buildId": MAX_ID + 1, "event": "running"}), false),
        ("no event", json!({"buildId": b}), false),
        ("a status message of 1001 characters", json!({"buildId": b, "event": "failed", "statusMessage": "m".repeat(1001)}), false),
        ("a status message a number", json!({"buildId": b, "event": "failed", "statusMessage": 5}), false),
        ("an unknown field", json!({"buildId": b, "event": "running", "extra": true}), false),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_accept_what_the_api_accepts() {
    let h = Harness::start(Backend::Sqlite).await;
    let alpha = h
        .cluster_with_key(&cluster("alpha", "screwdriver", &[]))
        .await;
    let doc = document(&h).await;
    let mut judge = Judge {
        doc,
        problems: Vec::new(),
        judged: 0,
    };
    let (admin, sdapi) = (h.admin(), h.sdapi());
    let key = sd_testkit::shared_keys("other").public_pem;

    let t = "/v4/buildclusters";
    for (i, (label, patch, valid)) in create_cases().into_iter().enumerate() {
        let body = merged(create_base(i), &patch);
        if let Some(var) = body["authKey"].as_str() {
            h.set_env(var, &key);
        }
        let answer = h.call(Method::POST, t, Some(&admin), Some(&body)).await;
        judge.agree(&format!("create: {label}"), "POST", t, &body, valid, answer);
    }
    let one = "/v4/buildclusters/{name}";
    for (i, (label, patch, valid)) in update_cases().into_iter().enumerate() {
        let name = format!("u{i}");
        h.register(&cluster(&name, "screwdriver", &[])).await;
        let body = named(&patch, &name);
        let answer = h
            .call(
                Method::PUT,
                &format!("{t}/{name}"),
                Some(&admin),
                Some(&body),
            )
            .await;
        judge.agree(
            &format!("update: {label}"),
            "PUT",
            one,
            &body,
            valid,
            answer,
        );
    }

    // Stops and events are for builds that exist, on alpha (the start cases repeat the
    // highest id).
    let mut highest = start(1, "alpha");
    highest["buildId"] = json!(MAX_ID);
    for body in [start(1, "alpha"), highest] {
        let (status, answer) = h.submit(&body).await;
        assert!(status.is_success(), "{answer}");
    }
    let t = "/v1/queue/message";
    for (i, (label, patch, valid)) in start_cases().into_iter().enumerate() {
        let body = merged(build(1000 + i as u64, "org/repo", json!({})), &patch);
        let answer = h.call(Method::POST, t, Some(&sdapi), Some(&body)).await;
        judge.agree(&format!("start: {label}"), "POST", t, &body, valid, answer);
    }
    let stops = [
        ("a build", json!({"buildId": 1}), true),
        ("with its job", json!({"buildId": 1, "jobId": 3}), true),
        ("jobId null", json!({"buildId": 1, "jobId": null}), true),
        (
            "unknown fields",
            json!({"buildId": 1, "blockedBy": [2]}),
            true,
        ),
        ("nothing", json!({}), false),
        ("buildId 0", json!({"buildId": 0}), false),
        ("buildId a string", json!({"buildId": "1"}), false),
        ("buildId 2^63", json!({"buildId": MAX_ID + 1}), false),
        ("buildId null", json!({"buildId": null}), false),
        ("jobId -1", json!({"buildId": 1, "jobId": -1}), false),
        ("jobId a string", json!({"buildId": 1, "jobId": "x"}), false),
    ];
    for (label, body, valid) in stops {
        let answer = h.call(Method::DELETE, t, Some(&sdapi), Some(&body)).await;
        judge.agree(&format!("stop: {label}"), "DELETE", t, &body, valid, answer);
    }

    let token = alpha.token("alpha", 60);
    for (action, cases) in [
        ("ack", ack_cases()),
        ("renew", ack_cases()),
        ("nack", nack_cases()),
        ("events", event_cases(1)),
    ] {
        let t = format!("/v1/jobs/{{cluster}}/{action}");
        let p = format!("/v1/jobs/alpha/{action}");
        for (label, body, valid) in cases {
            let answer = h.call(Method::POST, &p, Some(&token), Some(&body)).await;
            judge.agree(
                &format!("{action}: {label}"),
                "POST",
                &t,
                &body,
                valid,
                answer,
            );
        }
    }

    // The rules the schema cannot state: the schema accepts, the API refuses, the description says.
    let t = "/v4/buildclusters";
    let cases = [
        (
            "emails that differ",
            json!({"maintainer": "other@example.com"}),
            "must be equal",
        ),
        (
            "organizations past 500 characters joined",
            json!({"scmOrganizations": (0..60).map(|i| format!("organization{i:02}")).collect::<Vec<_>>()}),
            "500 characters",
        ),
        (
            "a key variable not set",
            json!({"authKey": "SD_CLUSTER_NOT_SET_KEY"}),
            "set on every scheduler replica",
        ),
        (
            "a key variable outside the prefix",
            json!({"authKey": "OTHER_KEY"}),
            "registry.variable_prefix",
        ),
        (
            "a weightage written 50.0",
            json!({"weightage": 50.0}),
            "written as integers",
        ),
    ];
    for (i, (label, patch, words)) in cases.into_iter().enumerate() {
        let body = merged(create_base(500 + i), &patch);
        if body["authKey"] == format!("SD_CLUSTER_C{}_KEY", 500 + i)
            || body["authKey"] == "OTHER_KEY"
        {
            h.set_env(body["authKey"].as_str().expect("authKey"), &key);
        }
        let answer = h.call(Method::POST, t, Some(&admin), Some(&body)).await;
        judge.described(&format!("create: {label}"), "POST", t, &body, words, answer);
    }
    let cases = [
        (
            "another name",
            json!({"name": "renamed"}),
            "must be the cluster's own",
        ),
        (
            "external without organizations",
            json!({"managedBy": "external"}),
            "after the update",
        ),
        (
            "emails that differ",
            json!({"managedByEmail": "a@b.example", "maintainer": "c@d.example"}),
            "must be equal",
        ),
    ];
    for (i, (label, body, words)) in cases.into_iter().enumerate() {
        let name = format!("d{i}");
        h.register(&cluster(&name, "screwdriver", &[])).await;
        let answer = h
            .call(
                Method::PUT,
                &format!("{t}/{name}"),
                Some(&admin),
                Some(&body),
            )
            .await;
        judge.described(
            &format!("update: {label}"),
            "PUT",
            one,
            &body,
            words,
            answer,
        );
    }
    let t = "/v1/queue/message";
    let cases = [
        (
            "pipelineId unlike pipeline.id",
            json!({"pipelineId": 8}),
            "must equal `pipeline.id`",
        ),
        (
            "an apiUri not allowed",
            json!({"apiUri": "https://elsewhere.example"}),
            "screwdriver.api_uris",
        ),
        (
            "an unknown cluster",
            json!({"annotations": {"screwdriver.cd/buildCluster": "nosuch"}}),
            "must exist",
        ),
        (
            "an unknown cluster by buildClusterName",
            json!({"buildClusterName": "nosuch"}),
            "must exist",
        ),
        (
            "a buildId written 5.0",
            json!({"buildId": 5.0}),
            "written as integers",
        ),
    ];
    for (i, (label, patch, words)) in cases.into_iter().enumerate() {
        let body = merged(build(5000 + i as u64, "org/repo", json!({})), &patch);
        let answer = h.call(Method::POST, t, Some(&sdapi), Some(&body)).await;
        judge.described(&format!("start: {label}"), "POST", t, &body, words, answer);
    }

    assert!(judge.judged > 200, "only {} bodies judged", judge.judged);
    assert!(judge.problems.is_empty(), "{}", judge.problems.join("\n"));
}
