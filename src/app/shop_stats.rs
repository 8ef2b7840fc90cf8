//! The shop-wide figures each profile is scored against, reused for a
//! minute. The lock is held while they are recomputed, so concurrent
//! requests wait for one query instead of each running their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::domain::ShopStats;
use crate::profile::{MIN_USUAL_GAP_MS, SESSION_GAP_MS};
use crate::store::{Store, StoreError};

/// How long the shop-wide figures are reused before they are recomputed.
pub const SHOP_STATS_TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
pub(super) struct ShopStatsCache(Arc<Mutex<Option<Computed>>>);

struct Computed {
    at: Instant,
    stats: Arc<ShopStats>,
}

impl ShopStatsCache {
    /// A store error comes back as a `StoreError` inside the `anyhow`.
    pub(super) async fn get(&self, store: &Store) -> anyhow::Result<Arc<ShopStats>> {
        let slot = Arc::clone(&self.0);
        let store = store.clone();
        // A task of its own: a request that times out meanwhile does not
        // throw the query's work away, the next one finds it done.
        let refresh = tokio::spawn(async move {
            let mut cached = slot.lock_owned().await;
            if let Some(computed) = cached.as_ref().filter(|c| c.at.elapsed() < SHOP_STATS_TTL) {
                return Ok::<_, StoreError>(Arc::clone(&computed.stats));
            }
            let stats = Arc::new(store.shop_stats(SESSION_GAP_MS, MIN_USUAL_GAP_MS).await?);
            *cached = Some(Computed {
                at: Instant::now(),
                stats: Arc::clone(&stats),
            });
            Ok(stats)
        });
        match refresh.await {
            Ok(result) => Ok(result?),
            Err(e) => Err(anyhow::anyhow!("shop statistics task failed: {e}")),
        }
    }
}
