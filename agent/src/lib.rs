//! `sd-agent`: the queue-worker daemon each build cluster runs.
//!
//! It proves who it is with a JWT signed by its cluster's private key, long-polls the scheduler
//! for its cluster's jobs, moves them into the cluster's own Redis and acknowledges only after
//! that push landed, then launches them through an executor (Kubernetes or local processes)
//! and reports their lifecycle. See `ARCHITECTURE.md`.

pub mod app;
pub mod check;
pub mod config;
pub mod events;
pub mod executor;
pub mod fetcher;
pub mod health;
pub mod instance;
pub mod keygen;
pub mod kube_names;
pub mod launcher;
pub mod local;
pub mod outbox;
pub mod reporter;
pub mod scheduler_client;
pub mod signer;
pub mod status;
pub mod systemd;

/// The verifier-side name of a signing algorithm.
pub fn jwt_algorithm(a: sd_protocol::SigningAlgorithm) -> jsonwebtoken::Algorithm {
    a.as_str().parse().unwrap_or(jsonwebtoken::Algorithm::RS256)
}
