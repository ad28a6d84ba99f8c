//! Keeps this replica's [`ClusterCache`] in step with the `buildClusters` table: reloaded at
//! once after a write on this replica, on a `{sd}:registry` pub/sub announcement from any other
//! replica, and every `registry.reload_interval` as the safety net for a missed announcement.
//! After every reload it rings `on_reload`, so builds held or queued where they can no longer
//! run get another chance to route (`Intake::run` waits on that bell).
//!
//! Architecture invariant: routing never reads the database. This module is how the cache it
//! reads stays current.

use std::sync::Arc;
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
    redis_url: String,
    reload_interval: Duration,
    on_reload: Arc<Notify>,
}

impl RegistrySync {
    pub fn new(
        registry: Registry,
        cache: ClusterCache,
        queues: Queues,
        redis_url: String,
        reload_interval: Duration,
        on_reload: Arc<Notify>,
    ) -> Self {
        Self {
            registry,
            cache,
            queues,
            redis_url,
            reload_interval,
            on_reload,
        }
    }

    /// After a registry write on this replica: reload this replica's cache now, tell the other
    /// replicas, and give held builds a chance to route. Failures are logged, not returned: the
    /// write itself succeeded, and the periodic reload repairs a cache left behind.
    pub async fn written_here(&self) {
        if let Err(e) = self.cache.reload(&self.registry).await {
            tracing::error!(error = %e, "cluster cache reload failed; the periodic reload will retry");
        }
        if let Err(e) = self.queues.publish(INVALIDATION_CHANNEL, "changed").await {
            tracing::warn!(error = %e, "could not announce the registry change; other replicas pick it up at their periodic reload");
        }
        self.on_reload.notify_one();
    }

    /// Follows the announcements and reloads periodically, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::join!(
            self.follow_announcements(&shutdown),
            self.reload_periodically(&shutdown),
        );
    }

    /// Reloads the cache whenever any replica announces a registry write. Reloads on every
    /// (re)subscription too, since announcements made while disconnected are lost.
    async fn follow_announcements(&self, shutdown: &CancellationToken) {
        let mut delay = RESUBSCRIBE_MIN;
        loop {
            let subscribed = async {
                let client = redis::Client::open(self.redis_url.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(INVALIDATION_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::select! { r = subscribed => r, () = shutdown.cancelled() => return } {
                Ok(pubsub) => {
                    delay = RESUBSCRIBE_MIN;
                    self.reload().await;
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(_) => self.reload().await,
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

    /// The safety net: a reload every `reload_interval` (the first one an interval after
    /// start, which loaded the cache already).
    async fn reload_periodically(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.reload_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.reload().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn reload(&self) {
        match self.cache.reload(&self.registry).await {
            Ok(()) => self.on_reload.notify_one(),
            Err(e) => tracing::error!(error = %e, "cluster cache reload failed"),
        }
    }
}
