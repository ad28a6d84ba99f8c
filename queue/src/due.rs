//! A due set: items kept in Redis until done, each due at a time, claimed with a lease by
//! whichever process asks first. The scheduler's status reports and the agent's build event
//! outbox are both one (`{sd}:reports`, `{sd-agent}:events`): a report survives the process
//! that made it, is worked on by one claimant at a time, and is retried after a failure or a
//! crash without any process remembering it.

use std::time::Duration;

use crate::Connection;
use redis::Script;

use crate::{QueueError, millis, timed_script};

/// What [`DueSet::claim_json`] claimed: the items, and the fields dropped as unreadable.
pub struct Claimed<T> {
    pub items: Vec<T>,
    pub dropped: Vec<(String, serde_json::Error)>,
}

/// One due set: a HASH of items (field → body) and a ZSET of when each may be claimed.
#[derive(Clone)]
pub struct DueSet {
    items: String,
    due: String,
    keep: Script,
    claim: Script,
}

impl DueSet {
    /// The due set of `items` (HASH) and `due` (ZSET); both keys must share a hash tag.
    pub fn new(items: impl Into<String>, due: impl Into<String>) -> Self {
        Self {
            items: items.into(),
            due: due.into(),
            keep: timed_script(include_str!("due_keep.lua")),
            claim: timed_script(include_str!("due_claim.lua")),
        }
    }

    /// The HASH of items.
    pub fn items_key(&self) -> &str {
        &self.items
    }

    /// The ZSET of due times.
    pub fn due_key(&self) -> &str {
        &self.due
    }

    /// Keeps `body` under `field`, due after `delay` (replacing what was there).
    pub async fn keep(
        &self,
        conn: &mut Connection,
        field: &str,
        body: &str,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let _: i64 = self
            .keep
            .key(&self.items)
            .key(&self.due)
            .arg(field)
            .arg(body)
            .arg(millis(delay))
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// Up to `max` due items, each claimed for `lease`: `(field, body)`.
    pub async fn claim(
        &self,
        conn: &mut Connection,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<(String, String)>, QueueError> {
        let flat: Vec<String> = self
            .claim
            .key(&self.items)
            .key(&self.due)
            .arg(max)
            .arg(millis(lease))
            .invoke_async(conn)
            .await?;
        Ok(crate::pairs(flat))
    }

    /// Up to `max` due items decoded as JSON `T`, each claimed for `lease`. Items that do not
    /// decode are dropped (they never would) and returned with why, for the caller to log.
    pub async fn claim_json<T: serde::de::DeserializeOwned>(
        &self,
        conn: &mut Connection,
        max: usize,
        lease: Duration,
    ) -> Result<Claimed<T>, QueueError> {
        let mut claimed = Claimed {
            items: Vec::new(),
            dropped: Vec::new(),
        };
        for (field, body) in self.claim(conn, max, lease).await? {
            match serde_json::from_str::<T>(&body) {
                Ok(item) => claimed.items.push(item),
                Err(e) => {
                    self.forget(conn, &field).await?;
                    claimed.dropped.push((field, e));
                }
            }
        }
        Ok(claimed)
    }

    /// Drops `field`: done, or unreadable.
    pub async fn forget(&self, conn: &mut Connection, field: &str) -> Result<(), QueueError> {
        let _: () = redis::pipe()
            .atomic()
            .hdel(&self.items, field)
            .ignore()
            .zrem(&self.due, field)
            .ignore()
            .query_async(conn)
            .await?;
        Ok(())
    }

    /// How many items are kept.
    pub async fn len(&self, conn: &mut Connection) -> Result<u64, QueueError> {
        let n: u64 = redis::cmd("HLEN")
            .arg(&self.items)
            .query_async(conn)
            .await?;
        Ok(n)
    }
}
