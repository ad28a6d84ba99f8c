//! Who holds which lease, so a crashed holder's work is taken over in seconds rather than after
//! the whole lease. Each instance beats (`{tag}:instances`, scored with Redis's time) and names
//! itself on what it takes (`{tag}:q:<cluster>:holders`); any live instance takes back the
//! leases of one silent for longer than the lapse. The lease itself stays the last net: a
//! holder that never named itself is still reclaimed when its lease runs out.

use std::time::Duration;

use redis::Script;

use crate::{Lease, QueueError, Queues, timed_script};

/// `beat` and `reclaim`.
pub(crate) struct HolderScripts {
    beat: Script,
    reclaim: Script,
}

impl Default for HolderScripts {
    fn default() -> Self {
        Self {
            beat: timed_script(include_str!("holders_beat.lua")),
            reclaim: timed_script(include_str!("holders_reclaim.lua")),
        }
    }
}

impl Queues {
    /// `instance` is alive now.
    pub async fn beat(&self, instance: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .holders
            .beat
            .key(&self.keys.instances)
            .arg(instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Names `instance` as the holder of `leases` of `cluster` (just taken).
    pub async fn hold(
        &self,
        cluster: &str,
        instance: &str,
        leases: &[Lease],
    ) -> Result<(), QueueError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.keys.cluster(cluster).holders);
        for lease in leases {
            cmd.arg(&lease.id).arg(instance);
        }
        let _: i64 = cmd.query_async(&mut conn).await?;
        Ok(())
    }

    /// Takes back the leases of `cluster` held by instances silent for longer than `lapse`,
    /// and forgets holders of leases since settled (so the record holds only leases in hand);
    /// returns how many were taken back.
    pub async fn reclaim(&self, cluster: &str, lapse: Duration) -> Result<u64, QueueError> {
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        Ok(self
            .holders
            .reclaim
            .key(&self.keys.instances)
            .key(&keys.holders)
            .key(&keys.leased)
            .arg(u64::try_from(lapse.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.keys.bell)
            .arg(cluster)
            .invoke_async(&mut conn)
            .await?)
    }
}
