//! Keeps this replica's [`ClusterCache`] in step with the `buildClusters` table: reloaded at
//! once after a write on this replica, on a `{sd}:registry` pub/sub announcement from any other
//! replica, and every `registry.reload_interval` as the safety net for a missed announcement.
//! After every reload it rings `on_reload`, so builds held or queued where they can no longer
//! run get another chance to route (`Intake::run` waits on that bell).
//!
//! A reload reads the whole table, so announcements only mark the cache stale, and one reload
//! answers every announcement heard before it started: a burst of a thousand registrations
//! costs other replicas a few reloads, not a thousand reloads of a thousand rows each, queued
//! one behind the other and keeping the CPU busy long after the burst. A replica skips its own
//! announcements: it reloaded before making them.
//!
//! Architecture invariant: routing never reads the database. This module is how the cache it
//! reads stays current.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::Queues;
use crate::registry::{ClusterCache, INVALIDATION_CHANNEL, Registry};

/// First and longest wait before subscribing again after the subscription failed.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// Shared (`Arc`) by the API's registry writes (through `AppState::registry_changed`) and its
/// own background task.
pub struct RegistrySync {
    registry: Registry,
    cache: ClusterCache,
    /// Where announcements are published (the master queues' Redis).
    queues: Queues,
    /// The same Redis, for the subscription: pub/sub needs a connection of its own.
    redis: sd_queue::RedisTarget,
    reload_interval: Duration,
    on_reload: Arc<Notify>,
    /// Rung when the cache may be behind the table; its single stored permit is what folds a
    /// burst of announcements into one reload.
    stale: Notify,
    /// What this replica publishes, so it can tell its own announcements from others'.
    announcement: String,
    /// Announcements of other replicas heard, and reloads run by the background task: what
    /// the coalescing is observed by (tests).
    heard: AtomicU64,
    reloads: AtomicU64,
}

impl RegistrySync {
    pub fn new(
        registry: Registry,
        cache: ClusterCache,
        queues: Queues,
        redis: sd_queue::RedisTarget,
        reload_interval: Duration,
        on_reload: Arc<Notify>,
    ) -> Self {
        Self {
            registry,
            cache,
            queues,
            redis,
            reload_interval,
            on_reload,
            stale: Notify::new(),
            announcement: format!("changed by {:016x}", rand::random::<u64>()),
            heard: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
        }
    }

    /// Other replicas' announcements heard since start.
    pub fn announcements_heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// Reloads the background task has run since start (announcements, resubscriptions and
    /// the periodic safety net; not the reloads after this replica's own writes).
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// After a registry write on this replica: reload this replica's cache now, tell the other
    /// replicas, and give held builds a chance to route. Failures are logged, not returned: the
    /// write itself succeeded, and the background reload repairs a cache left behind.
    pub async fn written_here(&self) {
        if let Err(e) = self.cache.reload(&self.registry).await {
            tracing::error!(error = %e, "cluster cache reload failed; the background reload will retry");
            self.stale.notify_one();
        }
        if let Err(e) = self
            .queues
            .publish(INVALIDATION_CHANNEL, &self.announcement)
            .await
        {
            tracing::warn!(error = %e, "could not announce the registry change; other replicas pick it up at their periodic reload");
        }
        self.on_reload.notify_one();
    }

    /// Follows the announcements and reloads periodically, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::join!(
            self.follow_announcements(&shutdown),
            self.reload_periodically(&shutdown),
            self.reload_when_stale(&shutdown),
        );
    }

    /// Marks the cache stale whenever another replica announces a registry write, and on every
    /// (re)subscription too, since announcements made while disconnected are lost. Never waits
    /// for a reload, so announcements arriving during one are taken together by the next.
    async fn follow_announcements(&self, shutdown: &CancellationToken) {
        let mut delay = RESUBSCRIBE_MIN;
        loop {
            let subscribed = async {
                let client = self.redis.client()?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(INVALIDATION_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::select! { r = subscribed => r, () = shutdown.cancelled() => return } {
                Ok(pubsub) => {
                    delay = RESUBSCRIBE_MIN;
                    self.stale.notify_one();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(msg) => self.announced(&msg),
                                None => break,
                            },
                            () = shutdown.cancelled() => return,
                        }
                    }
                    tracing::warn!("registry invalidation subscription lost; resubscribing");
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot subscribe to registry invalidations");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(RESUBSCRIBE_MAX);
        }
    }

    /// One announcement: stale unless it is this replica's own (already reloaded).
    fn announced(&self, msg: &redis::Msg) {
        if msg.get_payload_bytes() == self.announcement.as_bytes() {
            return;
        }
        self.heard.fetch_add(1, Ordering::Relaxed);
        self.stale.notify_one();
    }

    /// The safety net: a reload every `reload_interval` (the first one an interval after
    /// start, which loaded the cache already).
    async fn reload_periodically(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.reload_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.stale.notify_one(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Reloads once each time the cache was marked stale, however often it was marked while
    /// the previous reload ran.
    async fn reload_when_stale(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = self.stale.notified() => {}
                () = shutdown.cancelled() => return,
            }
            match self.cache.reload(&self.registry).await {
                Ok(()) => self.on_reload.notify_one(),
                Err(e) => tracing::error!(error = %e, "cluster cache reload failed"),
            }
            self.reloads.fetch_add(1, Ordering::Relaxed);
        }
    }
}
