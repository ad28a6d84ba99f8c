//! Who holds which lease, so a crashed holder's work is taken over in seconds rather than after
//! the whole lease. Each instance beats (`{tag}:instances`, scored with Redis's time) and names
//! itself on what it takes (`{tag}:q:<cluster>:holders`); any live instance takes back the
//! leases of one silent for longer than the lapse, or at once those of one known to be dead (a
//! restarted agent's previous run). The lease itself stays the last net: a holder that never
//! named itself is still reclaimed when its lease runs out.

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
        self.run_reclaim(cluster, Some(lapse), None).await
    }

    /// Takes back at once the leases of `cluster` held by `instance`, known to be dead (a
    /// restarted agent's previous run: no lapse to wait out), and forgets it; returns how many
    /// were taken back. The same script as [`reclaim`](Self::reclaim), told who is dead rather
    /// than judging by silence.
    pub async fn reclaim_instance(&self, cluster: &str, instance: &str) -> Result<u64, QueueError> {
        self.run_reclaim(cluster, None, Some(instance)).await
    }

    /// `holders_reclaim.lua`: instances silent past `lapse` are dead (none judged by silence
    /// without one), and so is `dead`.
    async fn run_reclaim(
        &self,
        cluster: &str,
        lapse: Option<Duration>,
        dead: Option<&str>,
    ) -> Result<u64, QueueError> {
        // The script's ARGV[1]: milliseconds, or empty for no lapse.
        let lapse = lapse.map_or_else(String::new, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).to_string()
        });
        let keys = self.keys.cluster(cluster);
        let mut conn = self.conn.clone();
        let mut invocation = self.holders.reclaim.prepare_invoke();
        invocation
            .key(&self.keys.instances)
            .key(&keys.holders)
            .key(&keys.leased)
            .arg(&lapse)
            .arg(&self.keys.bell)
            .arg(cluster);
        if let Some(instance) = dead {
            invocation.arg(instance);
        }
        Ok(invocation.invoke_async(&mut conn).await?)
    }
}
