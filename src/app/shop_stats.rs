//! The shop-wide figures each profile is scored against (RFM cuts, the
//! usual gap between sessions). They take a pass over the events of
//! `stats_window`, so they are computed in the background every
//! `stats_refresh` when new events arrived, and served from memory: a
//! refresh never blocks a request, the previous figures serve until the new
//! ones are ready.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;

use crate::clock::now_ms;
use crate::domain::ShopStats;
use crate::profile::{MIN_USUAL_GAP_MS, SESSION_GAP_MS};
use crate::store::Store;

/// Figures and the newest arrival number they count.
struct Computed {
    stats: Arc<ShopStats>,
    through_seq: i64,
}

#[derive(Default)]
pub(super) struct ShopStatsCache {
    current: ArcSwapOption<Computed>,
    /// Taken (shared) to publish new figures; `hold` takes it whole.
    publish: tokio::sync::RwLock<()>,
    /// One refresh at a time.
    running: tokio::sync::Mutex<()>,
}

impl ShopStatsCache {
    /// The figures last computed (none before the first refresh: then every
    /// profile is scored as in an empty shop).
    pub(super) fn get(&self) -> Arc<ShopStats> {
        self.current
            .load()
            .as_ref()
            .map_or_else(Arc::default, |c| Arc::clone(&c.stats))
    }

    /// Recomputes the figures from the events of `since` (a future giving
    /// where the window starts) on, when events arrived since the last ones
    /// (or always, with `force`).
    pub(super) async fn refresh(
        &self,
        store: &Store,
        since: impl std::future::Future<Output = i64>,
        force: bool,
    ) -> anyhow::Result<()> {
        let _one = self.running.lock().await;
        let through_seq = store.max_event_seq().await?;
        let known = self.current.load().as_ref().map(|c| c.through_seq);
        if !force && known == Some(through_seq) {
            return Ok(());
        }
        let started = Instant::now();
        let stats = store.shop_stats(SESSION_GAP_MS, MIN_USUAL_GAP_MS, since.await).await?;
        let seconds = started.elapsed().as_secs_f64();
        let _publish = self.publish.read().await;
        self.current.store(Some(Arc::new(Computed {
            stats: Arc::new(stats),
            through_seq,
        })));
        metrics::histogram!("recd_shop_stats_refresh_seconds").record(seconds);
        metrics::gauge!("recd_shop_stats_computed_at_seconds").set(now_ms() as f64 / 1000.0);
        tracing::debug!(seconds, through_seq, "shop statistics refreshed");
        Ok(())
    }

    /// Keeps refreshes from publishing while the guard lives: for tests of
    /// what requests see meanwhile.
    pub(super) async fn hold(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.publish.write().await
    }
}
