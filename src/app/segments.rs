//! The segment lists: every shopper's RFM scores, churn risk and segment,
//! computed in the background every `segments_refresh` when events arrived
//! (or a retirement removed some), with the profile's own code path
//! (`crate::profile::score`) against the shop statistics in memory, and
//! written to the store's `user_segments` table, which the lists read.
//!
//! Users are read in batches of `BATCH` (their measures aggregated by the
//! store), so a large shop's events are never in memory at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;

use crate::churn::ChurnModel;
use crate::clock::now_ms;
use crate::domain::ShopStats;
use crate::profile::{score, SESSION_GAP_MS};
use crate::store::{SegmentRow, Store};

/// Users per batch.
const BATCH: i64 = 1000;

/// What the last computation was.
#[derive(Debug, Clone, Copy)]
pub struct SegmentsComputed {
    /// When it finished writing (ms since the epoch).
    pub computed_at_ms: i64,
    /// The newest event in the store then: "now" for every churn risk.
    pub as_of_ms: Option<i64>,
    /// Shoppers it placed.
    pub users: u64,
    through_seq: i64,
}

#[derive(Default)]
pub(super) struct SegmentsCache {
    current: ArcSwapOption<SegmentsComputed>,
    /// Set when events went without a new arrival (retention).
    stale: AtomicBool,
    /// One computation at a time.
    running: tokio::sync::Mutex<()>,
}

impl SegmentsCache {
    pub(super) fn get(&self) -> Option<SegmentsComputed> {
        self.current.load().as_deref().copied()
    }

    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    /// Computes every shopper's segment when events arrived since the last
    /// computation, or a new model was served (or always, with `force`);
    /// whether it did. `shop` gives the shop statistics to score against,
    /// once they are brought up to date; `churn` the served model's churn
    /// classifier, when it was chosen.
    pub(super) async fn refresh<F, Fut>(
        &self,
        store: &Store,
        shop: F,
        churn: Option<ChurnModel>,
        force: bool,
    ) -> anyhow::Result<bool>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Arc<ShopStats>>>,
    {
        let _one = self.running.lock().await;
        let through_seq = store.max_event_seq().await?;
        let previous = self.get();
        let stale = self.stale.swap(false, Ordering::AcqRel);
        if !force && !stale && previous.map(|p| p.through_seq) == Some(through_seq) {
            return Ok(false);
        }
        let result = self.compute(store, shop, churn.as_ref(), through_seq, previous).await;
        if result.is_err() && stale {
            self.stale.store(true, Ordering::Release);
        }
        result.map(|()| true)
    }

    async fn compute<F, Fut>(
        &self,
        store: &Store,
        shop: F,
        churn: Option<&ChurnModel>,
        through_seq: i64,
        previous: Option<SegmentsComputed>,
    ) -> anyhow::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Arc<ShopStats>>>,
    {
        let started = Instant::now();
        let shop = shop().await?;
        let as_of_ms = store.newest_event_ms().await?;
        // Rows older than this stamp are dropped at the end: it must be
        // newer than the previous computation's.
        let stamp = now_ms().max(previous.map_or(i64::MIN, |p| p.computed_at_ms + 1));
        let mut after = String::new();
        let mut users = 0u64;
        loop {
            let batch = store.user_measures(&after, BATCH, SESSION_GAP_MS).await?;
            let Some((last, _)) = batch.last() else { break };
            after = last.clone();
            let rows: Vec<SegmentRow> = batch
                .into_iter()
                .map(|(user_id, measures)| {
                    let scores = score(&measures, &shop, as_of_ms.unwrap_or(i64::MIN), churn);
                    SegmentRow {
                        user_id,
                        segment: scores.segment.name(),
                        churn_risk: round4(scores.risk),
                        last_seen_ms: measures.last_ms,
                        recency: scores.rfm.recency,
                        frequency: scores.rfm.frequency,
                        monetary: scores.rfm.monetary,
                    }
                })
                .collect();
            users += rows.len() as u64;
            store.write_segments(&rows, stamp).await?;
            tokio::task::yield_now().await;
        }
        store.prune_segments(stamp).await?;
        self.current.store(Some(Arc::new(SegmentsComputed {
            computed_at_ms: stamp,
            as_of_ms,
            users,
            through_seq,
        })));
        let seconds = started.elapsed().as_secs_f64();
        metrics::histogram!("recd_segments_refresh_seconds").record(seconds);
        metrics::gauge!("recd_segments_users").set(users as f64);
        metrics::gauge!("recd_segments_computed_at_seconds").set(stamp as f64 / 1000.0);
        tracing::debug!(seconds, users, through_seq, "segments computed");
        Ok(())
    }
}

/// As the profile rounds its churn risk.
fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}
