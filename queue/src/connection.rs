//! The Redis connection a process shares: one multiplexed connection that reconnects by
//! itself (`ConnectionManager`), made to follow a failover as ElastiCache performs it.
//!
//! After a failover the primary endpoint names the promoted replica, but a connection opened
//! before still reaches the demoted node, which answers every write with `READONLY` for as long
//! as the connection lives: the manager only reconnects when a connection breaks. So on a
//! `READONLY` answer this connection is closed (`QUIT`), and the next command connects again,
//! to wherever the URL now leads. The command that got `READONLY` fails as any Redis error
//! does; every caller retries or re-delivers on those already.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// A shared Redis connection; clones share it.
#[derive(Clone)]
pub struct Connection {
    inner: ConnectionManager,
}

impl Connection {
    /// Connected when first used (a process starts while Redis is down), with short timeouts:
    /// a call fails fast and is retried rather than hanging on an unreachable server.
    pub fn lazy(client: Client) -> RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        Ok(Self {
            inner: ConnectionManager::new_lazy_with_config(client, config)?,
        })
    }

    /// Closes the connection after `error` when it came from a node that is no longer primary.
    async fn follow_failover(&self, error: &RedisError) {
        if is_read_only(error) {
            tracing::warn!(
                "Redis answered READONLY (a failover demoted the node behind this connection): reconnecting"
            );
            let mut conn = self.inner.clone();
            let _ = redis::cmd("QUIT").query_async::<Value>(&mut conn).await;
        }
    }
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
            let result = self.inner.req_packed_command(cmd).await;
            match &result {
                Err(e) => self.follow_failover(e).await,
                // Server errors come back as values, made errors later by the caller's parse.
                Ok(Value::ServerError(e)) => {
                    self.follow_failover(&RedisError::from(e.clone())).await;
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
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            match &result {
                Err(e) => self.follow_failover(e).await,
                Ok(values) => {
                    // A pipeline answers each command; one of them may be the READONLY.
                    if let Some(e) = values.iter().find_map(|v| match v {
                        Value::ServerError(e) => Some(RedisError::from(e.clone())),
                        _ => None,
                    }) {
                        self.follow_failover(&e).await;
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
