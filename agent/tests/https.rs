//! The agent and the scheduler over HTTPS (rustls on both sides), with a CA made for the test:
//! the agent trusting that CA (`scheduler.ca_file`) polls; without it, it is refused with a
//! message that says the certificate is not trusted and which setting fixes it; a scheduler
//! that requires client certificates (`listen_tls.client_ca_file`) serves an agent presenting
//! one and refuses one that does not; a renewed certificate is served after SIGHUP.

use std::sync::Arc;
use std::time::Duration;

use sd_agent::scheduler_client::{ClientError, ClientTls, SchedulerClient};
use sd_agent::signer::Signer;
use sd_protocol::SigningAlgorithm;
use sd_scheduler::Scheduler;
use sd_scheduler::cluster_auth::EnvLookup;
use sd_scheduler::config::Config;
use sd_testkit::{Backend, CertFiles, ClusterKeys, RedisServer, TestCa, TestDb, shared_keys};
use serde_json::json;

const CLUSTER: &str = "tls-farm";
const KEY_VAR: &str = "SD_CLUSTER_TLS_FARM_PUBLIC_KEY";

struct World {
    scheduler: Scheduler,
    url: String,
    signer: Arc<Signer>,
    ca: TestCa,
    dir: tempfile::TempDir,
    _redis: RedisServer,
    _db: TestDb,
}

impl World {
    async fn start(client_certs: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(&dir.path().join("pki"), "test-ca");
        let server = ca.server("scheduler");
        let redis = RedisServer::start().unwrap();
        let db = TestDb::new(Backend::Sqlite).await.unwrap();
        let api = shared_keys("api");
        let (_, api_pub) = api.write(dir.path(), "api");
        let cluster = ClusterKeys::generate(jsonwebtoken::Algorithm::RS256);
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.listen_tls.cert_file = Some(server.cert);
        config.listen_tls.key_file = Some(server.key);
        if client_certs {
            config.listen_tls.client_ca_file = Some(ca.ca_file());
        }
        config.database.url = db.url().to_owned();
        config.redis.url = redis.url();
        config.auth.api_public_key_file = Some(api_pub);
        config.screwdriver.api_uris = vec!["https://api.example.com".to_owned()];
        let public = cluster.public_pem.clone();
        let env: EnvLookup = Arc::new(move |name| (name == KEY_VAR).then(|| public.clone()));
        let scheduler = Scheduler::start_with_env(config, env).await.unwrap();
        let url = format!("https://localhost:{}", scheduler.addr().port());

        // Registered over HTTPS too, as an operator would.
        let mut admin = reqwest::Client::builder().add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca.ca_file()).unwrap()).unwrap(),
        );
        if client_certs {
            admin = admin.identity(identity(&ca.client("operator")));
        }
        let response = admin
            .build()
            .unwrap()
            .post(format!("{url}/v4/buildclusters"))
            .bearer_auth(api.api_token(&["admin"]))
            .json(&json!({
                "name": CLUSTER, "scmContext": "github:github.com", "managedBy": "screwdriver",
                "managedByEmail": "ops@example.com", "authKey": KEY_VAR,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());

        let key_file = dir.path().join("cluster.pem");
        std::fs::write(&key_file, &cluster.private_pem).unwrap();
        let signer = Signer::from_file(
            CLUSTER,
            SigningAlgorithm::RS256,
            Duration::from_secs(60),
            None,
            None,
            &key_file,
        )
        .unwrap();
        Self {
            scheduler,
            url,
            signer: Arc::new(signer),
            ca,
            dir,
            _redis: redis,
            _db: db,
        }
    }

    /// The agent's client, trusting `ca` (PEM file) and presenting `client`, as its config
    /// would make it.
    fn agent(&self, ca: Option<&std::path::Path>, client: Option<&CertFiles>) -> SchedulerClient {
        let tls = ClientTls {
            ca_pem: ca.map(|p| std::fs::read(p).unwrap()),
            identity_pem: client.map(pem_identity),
        };
        SchedulerClient::new(
            &self.url,
            CLUSTER,
            Arc::clone(&self.signer),
            &tls,
            Duration::from_secs(5),
        )
        .unwrap()
    }
}

fn pem_identity(files: &CertFiles) -> Vec<u8> {
    let mut pem = std::fs::read(&files.cert).unwrap();
    pem.push(b'\n');
    pem.extend(std::fs::read(&files.key).unwrap());
    pem
}

fn identity(files: &CertFiles) -> reqwest::Identity {
    reqwest::Identity::from_pem(&pem_identity(files)).unwrap()
}

fn refusal(result: Result<(), ClientError>) -> String {
    match result {
        Ok(()) => panic!("the scheduler was reached"),
        Err(e @ ClientError::Unavailable { status: None, .. }) => e.to_string(),
        Err(other) => panic!("not a transport refusal: {other:?}"),
    }
}

#[tokio::test]
async fn the_agent_polls_over_https_and_an_untrusted_certificate_is_refused_saying_so() {
    let w = World::start(false).await;
    w.agent(Some(&w.ca.ca_file()), None)
        .renew_nothing()
        .await
        .expect("the agent trusting the test CA reaches the scheduler");

    let message = refusal(w.agent(None, None).renew_nothing().await);
    assert!(
        message.contains("certificate is not trusted") && message.contains("scheduler.ca_file"),
        "{message}"
    );
    let other = TestCa::new(&w.dir.path().join("other"), "other-ca");
    let message = refusal(w.agent(Some(&other.ca_file()), None).renew_nothing().await);
    assert!(message.contains("not trusted"), "{message}");

    // A renewed certificate (another CA's, to tell them apart) is served after SIGHUP.
    let renewed = other.server("scheduler");
    let pki = w.dir.path().join("pki");
    std::fs::copy(&renewed.cert, pki.join("scheduler.crt")).unwrap();
    std::fs::copy(&renewed.key, pki.join("scheduler.key")).unwrap();
    // SAFETY: signals this test process; the scheduler's handler takes SIGHUP.
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    let reloaded = sd_testkit::eventually(Duration::from_secs(10), || async {
        w.agent(Some(&other.ca_file()), None)
            .renew_nothing()
            .await
            .ok()
    })
    .await;
    assert!(reloaded.is_some(), "the renewed certificate is not served");
    w.scheduler.shutdown().await;
}

#[tokio::test]
async fn a_scheduler_requiring_client_certificates_serves_only_agents_presenting_one() {
    let w = World::start(true).await;
    let ca = w.ca.ca_file();
    w.agent(Some(&ca), Some(&w.ca.client("agent")))
        .renew_nothing()
        .await
        .expect("an agent with a client certificate from the CA is served");

    let message = refusal(w.agent(Some(&ca), None).renew_nothing().await);
    assert!(
        message.contains("client certificate") && message.contains("scheduler.client_cert_file"),
        "{message}"
    );
    let stranger = TestCa::new(&w.dir.path().join("stranger"), "stranger-ca");
    let message = refusal(
        w.agent(Some(&ca), Some(&stranger.client("agent")))
            .renew_nothing()
            .await,
    );
    assert!(message.contains("client certificate"), "{message}");
    w.scheduler.shutdown().await;
}
