//! `sd-scheduler clusters|pause|resume|drain|dead-letters [requeue|fail]`: what operators did by hand with
//! curl, through the same API, with an admin (or, to read, user) Screwdriver token. The calls
//! are here; what to print is decided by the pure `*_table` functions.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Where the scheduler is and how to call it.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Why an admin command failed, in words for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no token: set SD_SCHEDULER_TOKEN or --token-file to a Screwdriver API token with scope admin (user is enough to read)"
    )]
    NoToken,
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable certificate: {source}")]
    Ca {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("cannot reach the scheduler at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the scheduler answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("{0}")]
    Timeout(String),
    #[error("not a cluster name: {0}")]
    BadName(sd_protocol::FieldError),
    #[error("not a dead letter's id: {0:?} (a build id, or stop:<buildId>)")]
    BadLetter(String),
    #[error("{refused} of {of} refused (see above)")]
    Partly { refused: usize, of: usize },
}

pub use crate::dead_letters::Verb as LetterVerb;

impl AdminClient {
    /// `url` is the scheduler's base URL; the token comes from `token` (the environment) or
    /// `token_file`; `ca_file` is a CA to trust for https beside the system's.
    pub fn new(
        url: &str,
        token: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, AdminError> {
        let token = match (token, token_file) {
            (_, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|source| AdminError::TokenFile { path, source })?
                .trim()
                .to_owned(),
            (Some(token), None) => token.trim().to_owned(),
            (None, None) => String::new(),
        };
        if token.is_empty() {
            return Err(AdminError::NoToken);
        }
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = ca_file {
            let pem = std::fs::read(&path).map_err(|source| AdminError::CaFile {
                path: path.clone(),
                source,
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|source| AdminError::Ca { path, source })?;
            http = http.add_root_certificate(certificate);
        }
        let http = http.build().map_err(|source| AdminError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, AdminError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| AdminError::Unreachable {
                url: self.base.clone(),
                source: source.without_url(),
            })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(AdminError::Refused {
                status,
                message: body["message"]
                    .as_str()
                    .unwrap_or("(no message)")
                    .to_owned(),
            })
        }
    }

    /// Every cluster's status.
    pub async fn statuses(&self) -> Result<Value, AdminError> {
        self.call(Method::GET, "/v4/buildclusters/status", None)
            .await
    }

    pub async fn status(&self, cluster: &str) -> Result<Value, AdminError> {
        self.call(
            Method::GET,
            &format!("/v4/buildclusters/{}/status", path(cluster)),
            None,
        )
        .await
    }

    /// Pauses (`active` false) or resumes a cluster.
    pub async fn set_active(&self, cluster: &str, active: bool) -> Result<Value, AdminError> {
        self.call(
            Method::PUT,
            &format!("/v4/buildclusters/{}", path(cluster)),
            Some(json!({"isActive": active})),
        )
        .await
    }

    pub async fn dead_letters(&self, cluster: &str) -> Result<Value, AdminError> {
        self.call(
            Method::GET,
            &format!("/v4/buildclusters/{}/deadletters", path(cluster)),
            None,
        )
        .await
    }

    /// Requeues or fails one dead letter of `cluster`; `id` was checked ([`check_letter_ids`]).
    pub async fn resolve_dead_letter(
        &self,
        cluster: &str,
        id: &str,
        verb: LetterVerb,
    ) -> Result<Value, AdminError> {
        self.call(
            Method::POST,
            &format!(
                "/v4/buildclusters/{}/deadletters/{}/{}",
                path(cluster),
                path(id),
                verb.segment()
            ),
            None,
        )
        .await
    }

    /// Pauses `cluster` and waits until nothing of it waits or is being handed over: its
    /// waiting builds move to other clusters that may take them, its agents finish what they
    /// hold. Calls `progress` with each reading; gives up after `timeout`.
    pub async fn drain(
        &self,
        cluster: &str,
        timeout: Duration,
        every: Duration,
        mut progress: impl FnMut(&Value),
    ) -> Result<Value, AdminError> {
        self.set_active(cluster, false).await?;
        let started = Instant::now();
        loop {
            let status = self.status(cluster).await?;
            progress(&status);
            if remaining(&status) == 0 {
                return Ok(status);
            }
            if started.elapsed() >= timeout {
                return Err(AdminError::Timeout(format!(
                    "{cluster} still holds {} after {}: paused, left as it is (see sd-scheduler clusters)",
                    queue_line(&status),
                    crate::status::human(timeout)
                )));
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// A cluster name as one path segment. Names are checked first (`check_name`); escaping the
/// rest is a second fence, so no text typed here reaches another path.
fn path(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Refuses what cannot be a cluster's name (as the registry would), before any call.
pub fn check_name(name: &str) -> Result<(), AdminError> {
    sd_protocol::check_cluster_name(name).map_err(AdminError::BadName)
}

/// Refuses what cannot be a dead letter's id, before any call.
pub fn check_letter_ids(ids: &[String]) -> Result<Vec<String>, AdminError> {
    ids.iter()
        .map(|id| match crate::dead_letters::LetterId::parse(id) {
            Some(_) => Ok(id.clone()),
            None => Err(AdminError::BadLetter(id.chars().take(40).collect())),
        })
        .collect()
}

/// The ids of the dead letters a `deadletters` answer lists.
pub fn letter_ids(dead: &Value) -> Vec<String> {
    dead["deadLetters"]
        .as_array()
        .map(|letters| {
            letters
                .iter()
                .filter_map(|l| l["id"].as_str())
                .filter(|id| crate::dead_letters::LetterId::parse(id).is_some())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Builds a draining cluster still has on its queue (dead letters aside: they stay).
pub fn remaining(status: &Value) -> u64 {
    ["ready", "leased", "deferred", "blocked"]
        .iter()
        .map(|kind| status["queue"][kind].as_u64().unwrap_or(0))
        .sum()
}

fn queue_line(status: &Value) -> String {
    let q = &status["queue"];
    format!(
        "{} ready, {} leased, {} deferred, {} blocked",
        q["ready"], q["leased"], q["deferred"], q["blocked"]
    )
}

/// `sd-scheduler clusters`: one line per cluster.
pub fn clusters_table(all: &Value) -> String {
    let mut rows = vec![
        [
            "CLUSTER",
            "HEALTH",
            "LAST POLL",
            "AGENTS",
            "IN FLIGHT",
            "READY",
            "LEASED",
            "BLOCKED",
            "DEAD",
            "OLDEST",
            "LAST HOUR",
        ]
        .map(str::to_owned),
    ];
    let mut reasons = String::new();
    for c in all["clusters"].as_array().into_iter().flatten() {
        let agents = c["agents"].as_array().cloned().unwrap_or_default();
        let (held, capacity) = agents.iter().fold((0, 0), |(h, cap), a| {
            (
                h + a["inFlight"].as_u64().unwrap_or(0),
                cap + a["capacity"].as_u64().unwrap_or(0),
            )
        });
        let unknown = agents.iter().filter(|a| a["version"].is_null()).count();
        let seconds = |v: &Value| {
            v.as_u64()
                .map(|s| format!("{}s ago", s))
                .unwrap_or_else(|| "never".into())
        };
        rows.push([
            c["name"].as_str().unwrap_or("?").to_owned(),
            c["health"].as_str().unwrap_or("?").to_owned(),
            seconds(&c["silentForSeconds"]),
            if unknown > 0 {
                format!("{} ({unknown} unknown)", agents.len())
            } else {
                agents.len().to_string()
            },
            format!("{held}/{capacity}"),
            c["queue"]["ready"].to_string(),
            c["queue"]["leased"].to_string(),
            c["queue"]["blocked"].to_string(),
            c["queue"]["dead"].to_string(),
            c["oldestWaiting"]["ageSeconds"]
                .as_u64()
                .map(|s| crate::status::human(Duration::from_secs(s)))
                .unwrap_or_else(|| "-".into()),
            c["dispatchedLastHour"].to_string(),
        ]);
        if c["health"] != "healthy" {
            let _ = writeln!(
                reasons,
                "{}: {}",
                c["name"].as_str().unwrap_or("?"),
                c["reason"].as_str().unwrap_or("")
            );
        }
    }
    let mut out = table(&rows);
    if !reasons.is_empty() {
        out.push('\n');
        out.push_str(&reasons);
    }
    out
}

/// `sd-scheduler dead-letters NAME`.
pub fn dead_letters_table(cluster: &str, dead: &Value) -> String {
    let letters = dead["deadLetters"].as_array().cloned().unwrap_or_default();
    if letters.is_empty() {
        return format!("{cluster} has no dead letters\n");
    }
    let mut rows =
        vec![["ID", "DEAD SINCE", "HELD UNTIL", "BUILD", "JOB", "PIPELINE"].map(str::to_owned)];
    for l in &letters {
        let text = |v: &Value| match v {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        rows.push([
            text(&l["id"]),
            text(&l["deadSince"]),
            text(&l["heldUntil"]),
            text(&l["buildId"]),
            text(&l["jobId"]),
            text(&l["pipeline"]),
        ]);
    }
    let mut out = table(&rows);
    let total = dead["total"].as_u64().unwrap_or(letters.len() as u64);
    if total > letters.len() as u64 {
        let _ = writeln!(out, "(the latest {} of {total})", letters.len());
    }
    let _ = writeln!(
        out,
        "Each is held, still QUEUED in Screwdriver, until its time; then a build is failed and a stop dropped.\nFix the cause, then: sd-scheduler dead-letters {cluster} requeue ID... (or --all), or fail ID... (docs/operations.md#dead-letters)."
    );
    out
}

/// Columns padded to their widest cell.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_table_says_what_is_wrong_and_counts_unknown_agents() {
        let all = json!({"clusters": [
            {"name": "east", "health": "healthy", "reason": "last poll 3s ago", "silentForSeconds": 3,
             "agents": [{"version": "1.0", "inFlight": 2, "capacity": 10}, {"version": null, "inFlight": null, "capacity": null}],
             "queue": {"ready": 4, "leased": 1, "deferred": 0, "blocked": 2, "dead": 0},
             "oldestWaiting": {"buildId": "7", "ageSeconds": 125}, "dispatchedLastHour": 40},
            {"name": "west", "health": "silent", "reason": "silent for 5m", "silentForSeconds": 300,
             "agents": [], "queue": {"ready": 0, "leased": 0, "deferred": 0, "blocked": 0, "dead": 3},
             "oldestWaiting": null, "dispatchedLastHour": 0},
        ]});
        let text = clusters_table(&all);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("CLUSTER  HEALTH   LAST POLL"),
            "{text}"
        );
        assert!(
            lines[1].contains("2 (1 unknown)") && lines[1].contains("2/10"),
            "{text}"
        );
        assert!(lines[1].contains("2m 5s"), "{text}");
        assert!(
            lines[2].contains("never") || lines[2].contains("300s ago"),
            "{text}"
        );
        assert_eq!(lines.last(), Some(&"west: silent for 5m"));
    }

    #[test]
    fn names_cannot_leave_their_path_segment() {
        assert_eq!(path("east-1.a_b"), "east-1.a_b");
        assert_eq!(path("../x?y"), "..%2Fx%3Fy");
    }

    #[test]
    fn draining_counts_all_but_dead_letters() {
        let status =
            json!({"queue": {"ready": 1, "leased": 2, "deferred": 3, "blocked": 4, "dead": 9}});
        assert_eq!(remaining(&status), 10);
    }
}
