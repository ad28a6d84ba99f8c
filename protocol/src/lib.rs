//! Wire types shared by the sd-buildcluster scheduler and agent.
//!
//! Everything here is pure data and validation: no I/O, no clocks, no randomness. The scheduler
//! and the agent agree on these types, so a change here is a change of the external contract
//! described in `DESIGN.md`.

pub mod agent_report;
pub mod annotations;
pub mod build;
pub mod claims;
pub mod cluster;
pub mod env;
pub mod error;
pub mod queue;
pub mod schema;
pub mod workers;

pub use agent_report::AgentReport;
pub use build::{PipelineRef, StartMessage, StopRequest};
pub use claims::{ClusterClaims, SignOptions, SigningAlgorithm};
pub use cluster::{Cluster, ClusterPatch, ManagedBy, NewCluster, check_cluster_name};
pub use error::{ErrorBody, FieldError};
pub use queue::{Delivery, JobKind, QueueMessage};
pub use schema::{ClusterCreate, ClusterUpdate};
pub use workers::{AckBody, Event, EventBody, Jobs, LeaseReport, NackBody};
