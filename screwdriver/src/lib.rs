//! The one call both binaries make to the Screwdriver API: `PUT {apiUri}/v4/builds/{id}` with
//! the build's own token — the scheduler for builds it ends or holds itself (dead-lettered,
//! collapsed, blocked), the agent for builds whose launcher could not report (and a pod's
//! stats). One client, so both sides agree on the URL, the token and what is worth retrying.

use serde_json::Value;

/// Where and as whom to tell Screwdriver about one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTarget {
    pub build_id: u64,
    /// The API's base URL, as the build's start message names it.
    pub api_uri: String,
    /// The build's own (launcher) token.
    pub token: String,
}

impl BuildTarget {
    /// `{apiUri}/v4/builds/{id}`, whatever trailing slashes `apiUri` has.
    pub fn url(&self) -> String {
        format!(
            "{}/v4/builds/{}",
            self.api_uri.trim_end_matches('/'),
            self.build_id
        )
    }
}

/// A refused or failed update; `retryable` when another try may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UpdateError {
    pub retryable: bool,
    pub message: String,
}

/// Whether an answer with this status is worth another try: server errors, throttling (429)
/// and a request timeout (408). Any other 4xx will answer the same again.
pub fn retryable(status: u16) -> bool {
    (500..600).contains(&status) || status == 429 || status == 408
}

/// `PUT {apiUri}/v4/builds/{id}` with `body` (`{status, statusMessage}` or `{stats}`).
#[derive(Debug, Clone)]
pub struct BuildUpdates {
    http: reqwest::Client,
}

impl BuildUpdates {
    /// Uses `http` as configured by the caller (timeouts, TLS, user agent).
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    /// One try. Transport failures are retryable; URLs in errors stay out of transport
    /// messages (they would repeat the API's address in every log line).
    pub async fn put(&self, target: &BuildTarget, body: &Value) -> Result<(), UpdateError> {
        let url = target.url();
        let answer = self
            .http
            .put(&url)
            .bearer_auth(&target.token)
            .json(body)
            .send()
            .await
            .map_err(|e| UpdateError {
                retryable: true,
                message: e.without_url().to_string(),
            })?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        Err(UpdateError {
            retryable: retryable(status.as_u16()),
            message: format!("{url} answered {status}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_retried() {
        for status in [500, 502, 503, 504, 429, 408] {
            assert!(retryable(status), "{status}");
        }
        for status in [400, 401, 403, 404, 409, 422] {
            assert!(!retryable(status), "{status}");
        }
    }

    #[test]
    fn the_url_ignores_trailing_slashes() {
        let target = BuildTarget {
            build_id: 8609,
            api_uri: "https://api.sd.example//".into(),
            token: "t".into(),
        };
        assert_eq!(target.url(), "https://api.sd.example/v4/builds/8609");
    }
}
