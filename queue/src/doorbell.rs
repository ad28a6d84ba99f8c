//! Waking consumers that wait for work. Every script that makes a message ready publishes the
//! cluster's name on one channel, `{tag}:bell`; each process holds a single subscription to it
//! and wakes its waiters in memory. A waiting long-poll therefore costs no Redis connection:
//! ten thousand of them share the one subscription.
//!
//! Pub/sub forgets what it sent while a subscriber was away, so the bell is a hint, never the
//! truth: waiters still look at the queue after at most the slice they wait for, and after every
//! (re)subscription all of them are woken to look again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use tokio::sync::watch;

/// How long to wait for a connection or an answer on the subscription's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a quiet subscription is checked with a PING (a half-open connection would
/// otherwise look like a quiet one for ever).
const PING_EVERY: Duration = Duration::from_secs(15);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The channel every bell of the hash tag `tag` rings on; its payload is the cluster's name.
pub fn channel(tag: &str) -> String {
    format!("{{{tag}}}:bell")
}

/// The doorbells of one process; cheap to clone.
#[derive(Clone, Default)]
pub struct Doorbell {
    bells: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

/// One waiter's ear on a cluster's bell. Arm it before looking for work, then wait: a ring that
/// comes in between is not missed.
pub struct Listener {
    cluster: String,
    rx: watch::Receiver<u64>,
    bells: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl Doorbell {
    /// Starts listening for `cluster`'s bell.
    pub fn listen(&self, cluster: &str) -> Listener {
        let mut bells = self.lock();
        let rx = bells
            .entry(cluster.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Listener {
            cluster: cluster.to_owned(),
            rx,
            bells: Arc::clone(&self.bells),
        }
    }

    /// Wakes everyone waiting for `cluster`; nothing when nobody is.
    pub fn ring(&self, cluster: &str) {
        if let Some(bell) = self.lock().get(cluster) {
            bell.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every waiter (rings may have been missed).
    pub fn ring_all(&self) {
        for bell in self.lock().values() {
            bell.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Clusters with at least one waiter.
    pub fn waiting_clusters(&self) -> usize {
        self.lock().len()
    }

    /// Holds the subscription to `channel` on `client` until `stop` resolves, reconnecting with
    /// back-off; every ring received wakes that cluster's waiters.
    pub async fn run(&self, client: Client, channel: String, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                outcome = self.subscribe_and_relay(&client, &channel) => {
                    if let Err(e) = outcome {
                        tracing::warn!(error = %e, "doorbell subscription lost; waiters fall back to re-checking the queue");
                    }
                }
                () = &mut stop => return,
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut stop => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One subscription's life: subscribe, wake everyone (rings may have been missed before),
    /// then relay rings until the connection fails.
    async fn subscribe_and_relay(&self, client: &Client, channel: &str) -> redis::RedisResult<()> {
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("connecting"))??;
        let (mut sink, mut stream) = pubsub.split();
        tokio::time::timeout(CONNECT_TIMEOUT, sink.subscribe(channel))
            .await
            .map_err(|_| timed_out("subscribing"))??;
        self.ring_all();
        loop {
            match tokio::time::timeout(PING_EVERY, stream.next()).await {
                Ok(Some(message)) => {
                    if let Ok(cluster) = message.get_payload::<String>() {
                        self.ring(&cluster);
                    }
                }
                Ok(None) => return Err(timed_out("reading (connection closed)")),
                Err(_) => {
                    let _: () = tokio::time::timeout(CONNECT_TIMEOUT, sink.ping())
                        .await
                        .map_err(|_| timed_out("pinging"))??;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.bells.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "doorbell subscription",
        what.to_owned(),
    ))
}

impl Listener {
    /// Marks every ring so far as heard; call right before looking for work.
    pub fn arm(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Waits until the bell rings after the last [`arm`](Self::arm), at most `timeout`; `true`
    /// when it rang.
    pub async fn rung(&mut self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

impl Drop for Listener {
    /// The last listener of a cluster takes its bell away, so the map holds only clusters with
    /// waiters.
    fn drop(&mut self) {
        let mut bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        if bells
            .get(&self.cluster)
            .is_some_and(|bell| bell.receiver_count() <= 1)
        {
            bells.remove(&self.cluster);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ring_between_arm_and_wait_is_not_missed() {
        let bell = Doorbell::default();
        let mut ear = bell.listen("c1");
        ear.arm();
        bell.ring("c1");
        assert!(ear.rung(Duration::from_millis(10)).await);
        ear.arm();
        assert!(
            !ear.rung(Duration::from_millis(10)).await,
            "heard once only"
        );
    }

    #[tokio::test]
    async fn rings_reach_only_their_cluster() {
        let bell = Doorbell::default();
        let mut one = bell.listen("c1");
        let mut two = bell.listen("c2");
        one.arm();
        two.arm();
        bell.ring("c2");
        assert!(!one.rung(Duration::from_millis(10)).await);
        assert!(two.rung(Duration::from_millis(10)).await);
        bell.ring_all();
        assert!(one.rung(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn the_last_listener_takes_the_bell_away() {
        let bell = Doorbell::default();
        let a = bell.listen("c1");
        let b = bell.listen("c1");
        assert_eq!(bell.waiting_clusters(), 1);
        drop(a);
        assert_eq!(bell.waiting_clusters(), 1);
        drop(b);
        assert_eq!(bell.waiting_clusters(), 0);
        bell.ring("c1"); // nobody waits: nothing to do, nothing kept
        assert_eq!(bell.waiting_clusters(), 0);
    }
}
