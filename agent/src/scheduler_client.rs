//! The agent's calls to sd-scheduler: long-poll, ack, nack, events. Every call carries a token
//! from the current [`Signer`]; the signer is swapped on SIGHUP without interrupting a poll.
//! The bodies and answers are `sd_protocol::workers`' (the scheduler parses the same types).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use sd_protocol::workers::{AckBody, Event, EventBody, Jobs, LeaseReport, NackBody};
use sd_protocol::{AgentReport, Delivery};
use serde::Serialize;
use serde_json::Value;

use crate::signer::Signer;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The scheduler refused our token (401/403/404): wrong key, clock, or cluster name.
    #[error("the scheduler refused this agent ({status}): {message}")]
    Refused { status: u16, message: String },
    /// Worth retrying; `retry_after` when the scheduler said how long to wait; `status` when
    /// it answered at all (5xx, 429, 408) rather than being unreachable, `source` when it was
    /// not (the transport's error, without the URL).
    #[error("scheduler unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
        status: Option<u16>,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The request itself was wrong (a bug here, or a version mismatch); `source` when the
    /// answer was a success this agent cannot read.
    #[error("the scheduler rejected the request ({status}): {message}")]
    Rejected {
        status: u16,
        message: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error(transparent)]
    Sign(#[from] crate::signer::SignerError),
}

/// Why [`SchedulerClient::new`] cannot build its HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// The CA certificate (`scheduler.ca_file`'s content) is refused as it is read (by TLS
    /// back-ends that parse it at once).
    #[error("scheduler.ca_file: {0}")]
    CaFile(#[source] reqwest::Error),
    /// The client certificate and key (`scheduler.client_cert_file`, `client_key_file`) are
    /// not a usable PEM certificate and key.
    #[error("scheduler.client_cert_file / client_key_file: {0}")]
    Identity(#[source] reqwest::Error),
    /// The HTTP client cannot be built; with rustls this is also where a CA certificate that is
    /// not usable PEM is found.
    #[error("{0}")]
    Build(#[source] reqwest::Error),
}

/// What the agent brings to the scheduler's TLS: a CA to trust beyond the system's, and a
/// client certificate (its PEM chain followed by its key) to present.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    pub identity_pem: Option<Vec<u8>>,
}

impl ClientError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct SchedulerClient {
    http: reqwest::Client,
    base: String,
    cluster: String,
    signer: Arc<RwLock<Arc<Signer>>>,
    timeout: Duration,
}

impl SchedulerClient {
    pub fn new(
        base: &str,
        cluster: &str,
        signer: Arc<Signer>,
        tls: &ClientTls,
        timeout: Duration,
    ) -> Result<Self, ClientSetupError> {
        // No redirects: an answer pointing elsewhere would take the cluster's token with it.
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("sd-agent/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5));
        if let Some(pem) = &tls.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem).map_err(ClientSetupError::CaFile)?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some(pem) = &tls.identity_pem {
            let identity = reqwest::Identity::from_pem(pem).map_err(ClientSetupError::Identity)?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(ClientSetupError::Build)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            cluster: cluster.to_owned(),
            signer: Arc::new(RwLock::new(signer)),
            timeout,
        })
    }

    /// Uses `signer` from the next call on (key rotation on SIGHUP).
    pub fn set_signer(&self, signer: Arc<Signer>) {
        *self
            .signer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = signer;
    }

    fn token(&self) -> Result<String, ClientError> {
        let signer = Arc::clone(
            &self
                .signer
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Ok(signer.token()?)
    }

    /// Long-poll for up to `max` jobs, waiting at most `wait`.
    /// Long-polls for up to `max` jobs, telling the scheduler who asks (`report`).
    pub async fn poll(
        &self,
        wait: Duration,
        max: u32,
        report: &AgentReport,
    ) -> Result<Vec<Delivery>, ClientError> {
        let url = format!(
            "{}/v1/jobs/{}?wait={}&max={max}",
            self.base,
            self.cluster,
            wait.as_secs()
        );
        let mut request = self
            .http
            .get(url)
            .bearer_auth(self.token()?)
            .timeout(wait + self.timeout);
        for (name, value) in report.headers() {
            request = request.header(name, value);
        }
        let body = self.send(request).await?;
        // An answer that is not an object (or lacks `jobs`) brings nothing.
        if !body.is_object() {
            return Ok(Vec::new());
        }
        serde_json::from_value::<Jobs>(body)
            .map(|answer| answer.jobs)
            .map_err(|e| ClientError::Rejected {
                status: 200,
                message: format!("unexpected poll answer: {e}"),
                source: Some(e),
            })
    }

    pub async fn ack(&self, delivery_ids: &[String]) -> Result<LeaseReport, ClientError> {
        self.lease_call("ack", &AckBody::new(delivery_ids)).await
    }

    pub async fn nack(
        &self,
        delivery_ids: &[String],
        reason: &str,
    ) -> Result<LeaseReport, ClientError> {
        self.lease_call("nack", &NackBody::new(delivery_ids, reason))
            .await
    }

    async fn lease_call(
        &self,
        action: &str,
        body: &impl Serialize,
    ) -> Result<LeaseReport, ClientError> {
        let url = format!("{}/v1/jobs/{}/{action}", self.base, self.cluster);
        let request = self
            .http
            .post(url)
            .bearer_auth(self.token()?)
            .json(body)
            .timeout(self.timeout);
        let answer = self.send(request).await?;
        serde_json::from_value(answer).map_err(|e| ClientError::Rejected {
            status: 200,
            message: format!("unexpected {action} answer: {e}"),
            source: Some(e),
        })
    }

    /// A signed call that changes nothing (renews a lease that does not exist): proves the
    /// scheduler is reachable and accepts this agent's token.
    pub async fn renew_nothing(&self) -> Result<(), ClientError> {
        let probe = AckBody::new(&["sd-agent-check@0".to_owned()]);
        self.lease_call("renew", &probe).await.map(|_| ())
    }

    /// Reports a build's lifecycle. A longer `message` is cut to the protocol's cap.
    pub async fn event(
        &self,
        build_id: u64,
        event: Event,
        message: Option<&str>,
    ) -> Result<(), ClientError> {
        let url = format!("{}/v1/jobs/{}/events", self.base, self.cluster);
        let body = EventBody::new(build_id, event, message);
        let request = self
            .http
            .post(url)
            .bearer_auth(self.token()?)
            .json(&body)
            .timeout(self.timeout);
        self.send(request).await.map(|_| ())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| {
            let e = e.without_url();
            ClientError::Unavailable {
                message: tls_refusal(&e).unwrap_or_else(|| e.to_string()),
                retry_after: None,
                status: None,
                source: Some(e),
            }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error"))
            .to_owned();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                ClientError::Refused {
                    status: status.as_u16(),
                    message,
                }
            }
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                ClientError::Unavailable {
                    message,
                    retry_after,
                    status: Some(s.as_u16()),
                    source: None,
                }
            }
            s => ClientError::Rejected {
                status: s.as_u16(),
                message,
                source: None,
            },
        })
    }
}

/// What a failed TLS handshake means for the operator, when that is why `e` happened: the
/// scheduler's certificate not trusted (or not for this name), or a client certificate wanted.
fn tls_refusal(e: &reqwest::Error) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(describe_tls(tls));
        }
        // std::io::Error leaves its payload out of source(): step into it.
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn describe_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match e {
        E::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => format!(
            "the scheduler's TLS certificate is not trusted ({e}): set scheduler.ca_file to the CA that issued it"
        ),
        E::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!("the scheduler's TLS certificate is not for the host in scheduler.url ({e})")
        }
        E::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            format!("the scheduler's TLS certificate has expired ({e})")
        }
        E::AlertReceived(Alert::CertificateRequired | Alert::BadCertificate | Alert::UnknownCA) => {
            format!(
                "the scheduler refused this agent's TLS client certificate, or wants one ({e}): set scheduler.client_cert_file and client_key_file to a certificate its listen_tls.client_ca_file issued"
            )
        }
        other => format!("TLS with the scheduler failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use sd_protocol::SigningAlgorithm;

    use super::*;

    fn signer() -> Signer {
        let key = crate::keygen::generate(SigningAlgorithm::ES256).unwrap();
        Signer::from_pem(
            "ios-farm",
            SigningAlgorithm::ES256,
            Duration::from_secs(300),
            None,
            None,
            key.private_pem.as_bytes(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_redirect_from_the_scheduler_is_not_followed() {
        let elsewhere = sd_testkit::CountingServer::start().await;
        let scheduler = sd_testkit::CountingServer::redirecting_to(&elsewhere.url).await;
        let client = SchedulerClient::new(
            &scheduler.url,
            "ios-farm",
            Arc::new(signer()),
            &ClientTls::default(),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = client
            .event(7, Event::Running, None)
            .await
            .expect_err("a redirect is not an answer");
        assert!(
            matches!(e, ClientError::Rejected { status: 307, .. }),
            "{e:?}"
        );
        assert_eq!(scheduler.hits(), 1);
        assert_eq!(elsewhere.hits(), 0, "the token followed the redirect");
    }

    #[test]
    fn a_client_that_cannot_be_built_keeps_why() {
        let signer = signer();
        let bad_ca = b"-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n";
        let Err(e) = SchedulerClient::new(
            "http://127.0.0.1:1",
            "ios-farm",
            Arc::new(signer),
            &ClientTls {
                ca_pem: Some(bad_ca.to_vec()),
                identity_pem: None,
            },
            Duration::from_secs(5),
        ) else {
            panic!("a CA that is not PEM was accepted")
        };
        assert!(
            matches!(e, ClientSetupError::CaFile(_) | ClientSetupError::Build(_)),
            "{e:?}"
        );
        assert!(
            e.source().is_some_and(|s| s.is::<reqwest::Error>()),
            "{e:?}"
        );
    }
}
