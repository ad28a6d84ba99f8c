//! The Redis connection a process shares: one multiplexed connection that reconnects by
//! itself, made to follow a failover as ElastiCache performs it, with cluster mode disabled
//! (`ConnectionManager`) or enabled (the cluster client).
//!
//! After a failover the primary endpoint names the promoted replica, but a connection opened
//! before still reaches the demoted node, which answers every write with `READONLY` for as long
//! as the connection lives: the manager only reconnects when a connection breaks. So on a
//! `READONLY` answer this connection is closed (`QUIT`), and the next command connects again,
//! to wherever the URL now leads. The command that got `READONLY` fails as any Redis error
//! does; every caller retries or re-delivers on those already.
//!
//! In cluster mode the cluster client follows `MOVED` and `ASK` (a slot resharded), and waits
//! and retries on `CLUSTERDOWN` and `TRYAGAIN` (a node failing, a slot migrating), a few times
//! within a bounded wait; then the command fails like any other and the caller retries. Every key
//! of a process sits under one hash tag, so one node holds them all: commands without a key
//! (TIME, SCAN, WAITAOF, INFO, …) are sent to that node too, where a random node would answer
//! about other data.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterConfig;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::RedisTarget;

/// A shared Redis connection; clones share it.
#[derive(Clone)]
pub struct Connection {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster {
        conn: ClusterConnection,
        /// The slot of the process's hash tag, where keyless commands go.
        home: Route,
    },
}

/// How long a connection attempt, or one answer, may take before the call fails.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Cluster mode: retries of a command answered `CLUSTERDOWN`/`TRYAGAIN` or cut off, waiting
/// 50 ms doubling to 1 s between them: a slot migration or a failover in progress gets a few
/// seconds before the caller sees the error.
const CLUSTER_RETRIES: u32 = 6;
/// Cluster mode: the longest a command may take, retries included.
const CLUSTER_OVERALL: Duration = Duration::from_secs(8);

impl Connection {
    /// The connection to `target`, connected when first used, whose keys all live under the
    /// hash tag `tag`.
    pub fn open(target: &RedisTarget, tag: &str) -> RedisResult<Self> {
        if !target.cluster {
            return Self::lazy(target.client()?);
        }
        let client = target
            .cluster_client()?
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(50)
            .max_retry_wait(1000)
            .retry_wait_formula(50, 2)
            .overall_response_timeout(Some(CLUSTER_OVERALL))
            .build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(TIMEOUT)
            .set_response_timeout(TIMEOUT);
        Ok(Self {
            inner: Inner::Cluster {
                conn: client.get_pending_async_connection_with_config(config),
                home: Route::with_key(format!("{{{tag}}}"), SlotAddr::Master),
            },
        })
    }

    /// Connected when first used (a process starts while Redis is down), with short timeouts:
    /// a call fails fast and is retried rather than hanging on an unreachable server.
    /// A Redis with cluster mode disabled (see [`open`](Self::open)).
    pub fn lazy(client: Client) -> RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        Ok(Self {
            inner: Inner::Single(ConnectionManager::new_lazy_with_config(client, config)?),
        })
    }
}

/// Closes `conn` after `error` when it came from a node that is no longer primary.
async fn follow_failover(conn: &ConnectionManager, error: &RedisError) {
    if is_read_only(error) {
        tracing::warn!(
            "Redis answered READONLY (a failover demoted the node behind this connection): reconnecting"
        );
        let mut conn = conn.clone();
        let _ = redis::cmd("QUIT").query_async::<Value>(&mut conn).await;
    }
}

/// Whether `cmd` names no key, so a cluster client would send it to any node. These are the
/// keyless commands the project sends; each is about the node that holds its keys.
pub(crate) fn keyless(cmd: &Cmd) -> bool {
    const KEYLESS: [&[u8]; 8] = [
        b"TIME", b"SCAN", b"WAITAOF", b"WAIT", b"INFO", b"PING", b"DBSIZE", b"CONFIG",
    ];
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return false;
    };
    KEYLESS.iter().any(|k| k.eq_ignore_ascii_case(name))
}

/// `READONLY`, whether a command's own answer or the error of a write inside a script.
fn is_read_only(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    ) || error.to_string().contains("READONLY")
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let single = match &mut self.inner {
                Inner::Cluster { conn, home } if keyless(cmd) => {
                    let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(*home));
                    return conn.route_command(cmd.clone(), to).await;
                }
                Inner::Cluster { conn, .. } => return conn.req_packed_command(cmd).await,
                Inner::Single(single) => single,
            };
            let result = single.req_packed_command(cmd).await;
            match &result {
                Err(e) => follow_failover(single, e).await,
                // Server errors come back as values, made errors later by the caller's parse.
                Ok(Value::ServerError(e)) => {
                    follow_failover(single, &RedisError::from(e.clone())).await;
                }
                Ok(_) => {}
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let single = match &mut self.inner {
                Inner::Cluster { conn, .. } => {
                    return conn.req_packed_commands(pipeline, offset, count).await;
                }
                Inner::Single(single) => single,
            };
            let result = single.req_packed_commands(pipeline, offset, count).await;
            match &result {
                Err(e) => follow_failover(single, e).await,
                Ok(values) => {
                    // A pipeline answers each command; one of them may be the READONLY.
                    if let Some(e) = values.iter().find_map(|v| match v {
                        Value::ServerError(e) => Some(RedisError::from(e.clone())),
                        _ => None,
                    }) {
                        follow_failover(single, &e).await;
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keyless;

    #[test]
    fn commands_without_a_key_are_told_from_those_with_one() {
        for name in ["TIME", "scan", "WAITAOF", "INFO", "PING", "CONFIG"] {
            assert!(keyless(&redis::cmd(name)), "{name}");
        }
        for name in ["EVALSHA", "HGET", "ZADD", "PUBLISH", "SCRIPT"] {
            assert!(!keyless(&redis::cmd(name)), "{name}");
        }
    }
}
