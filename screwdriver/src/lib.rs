//! The one call both binaries make to the Screwdriver API: `PUT {apiUri}/v4/builds/{id}` with
//! the build's own token — the scheduler for builds it ends or holds itself (dead-lettered,
//! collapsed, blocked), the agent for builds whose launcher could not report (and a pod's
//! stats). One client, so both sides agree on the URL, the token, where a token may go
//! ([`ApiUris`]), that no redirect takes it elsewhere, and what is worth retrying.

mod allowed;

use std::time::Duration;

use serde_json::Value;

pub use allowed::{AllowListError, ApiBase, ApiUris, UriError};

/// Where and as whom to tell Screwdriver about one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTarget {
    pub build_id: u64,
    /// The API's base URL, as the build's start message names it.
    pub api_uri: String,
    /// The build's own (launcher) token.
    pub token: String,
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

/// [`BuildUpdates`] cannot be set up: the HTTP client does not build (TLS back-end).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for the Screwdriver API: {0}")]
pub struct ClientError(#[source] reqwest::Error);

/// `PUT {apiUri}/v4/builds/{id}` with `body` (`{status, statusMessage}` or `{stats}`), only to
/// an allowed API.
#[derive(Debug, Clone)]
pub struct BuildUpdates {
    http: reqwest::Client,
    allowed: ApiUris,
}

impl BuildUpdates {
    /// The client follows no redirect: an answer pointing elsewhere would take the build's
    /// token with it, past the allow-list. Each request may take `timeout`.
    pub fn new(allowed: ApiUris, timeout: Duration, user_agent: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(user_agent)
            .build()
            .map_err(ClientError)?;
        Ok(Self { http, allowed })
    }

    /// The APIs this client sends to.
    pub fn allowed(&self) -> &ApiUris {
        &self.allowed
    }

    /// One try. An `apiUri` that is not allowed is refused for good, before anything is sent.
    /// Transport failures are retryable; URLs stay out of transport messages (they would
    /// repeat the API's address in every log line).
    pub async fn put(&self, target: &BuildTarget, body: &Value) -> Result<(), UpdateError> {
        let url = self
            .allowed
            .check(&target.api_uri)
            .map_err(|e| UpdateError {
                retryable: false,
                message: format!("apiUri {e}; nothing sent"),
            })?
            .build_url(target.build_id);
        let answer = self
            .http
            .put(url.clone())
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
}
