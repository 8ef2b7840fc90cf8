//! The dashboard's background work: the overview (active shoppers, what
//! the store holds) counted every `overview_refresh` and served from
//! memory; this replica's heartbeat every `heartbeat_interval`; the folding
//! of ingest's pending per-item counts every `item_activity_fold`; and the
//! pruning of the per-minute and per-day counts past their retention.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;

use super::App;
use crate::clock::now_ms;
use crate::store::{Heartbeat, StoreCounts};

const HOUR_MS: i64 = 3_600_000;
/// Heartbeats older than this are removed.
pub const FORGET_REPLICAS_MS: i64 = 24 * HOUR_MS;

/// The overview as last counted.
#[derive(Debug, Clone, Copy)]
pub struct Overview {
    /// Distinct shoppers with an event in the last hour, day and week (by
    /// the events' timestamps against the clock).
    pub active_users: [i64; 3],
    pub store: StoreCounts,
    /// When it was counted (ms since the epoch).
    pub computed_at_ms: i64,
}

#[derive(Default)]
pub(super) struct OverviewCache {
    current: ArcSwapOption<Overview>,
    /// One count at a time.
    running: tokio::sync::Mutex<()>,
}

impl App {
    /// The overview as last counted in the background (`None` before the
    /// first count since the process started): never waits for a scan.
    pub fn overview(&self) -> Option<Overview> {
        self.overview.current.load().as_deref().copied()
    }

    /// One step of the overview's background task: counts the active
    /// shoppers and the store's contents.
    pub async fn refresh_overview(&self) -> anyhow::Result<Overview> {
        let _one = self.overview.running.lock().await;
        let started = Instant::now();
        let now = now_ms();
        let active_users = self
            .store
            .active_users([now - HOUR_MS, now - 24 * HOUR_MS, now - 7 * 24 * HOUR_MS])
            .await?;
        let store = self.store.store_counts().await?;
        let overview = Overview {
            active_users,
            store,
            computed_at_ms: now_ms(),
        };
        self.overview.current.store(Some(Arc::new(overview)));
        metrics::histogram!("recd_overview_refresh_seconds").record(started.elapsed().as_secs_f64());
        for (window, n) in ["hour", "day", "week"].into_iter().zip(active_users) {
            metrics::gauge!("recd_active_users", "window" => window).set(n as f64);
        }
        Ok(overview)
    }

    /// Writes this replica's heartbeat (and removes those a day old).
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let beat = Heartbeat {
            id: self.trainer.replica.clone(),
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now,
            version: self.serving.version(),
            trainer: self.trainer.is_leader(),
            training: self.trainer.is_running(),
        };
        self.store.heartbeat(&beat, now - FORGET_REPLICAS_MS).await?;
        metrics::gauge!("recd_heartbeat_at_seconds").set(now as f64 / 1000.0);
        Ok(())
    }

    /// One step of the minutes' folding task: folds ingest's pending
    /// per-minute counts and clicks (PostgreSQL) into the per-minute ones.
    pub async fn fold_minutes(&self) -> anyhow::Result<u64> {
        let started = Instant::now();
        let rows = self.store.fold_minutes().await?;
        metrics::histogram!("recd_minute_stats_fold_seconds").record(started.elapsed().as_secs_f64());
        Ok(rows)
    }

    /// Folds everything pending now (what the two folding tasks do within
    /// `minute_stats_fold` and `item_activity_fold`): for tests and tools.
    pub async fn fold_stats(&self) -> anyhow::Result<()> {
        self.fold_minutes().await?;
        self.fold_item_activity().await.map(drop)
    }

    /// One step of the folding task: folds ingest's pending per-item counts
    /// into the per-day ones (what `GET /v1/items/{item_id}/activity`
    /// reads).
    pub async fn fold_item_activity(&self) -> anyhow::Result<u64> {
        let started = Instant::now();
        // A claimed batch is left to its replica for five rounds.
        let folded = self.store.fold_item_days(self.settings.item_activity_fold * 5).await?;
        metrics::histogram!("recd_item_activity_fold_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("recd_item_activity_folded_batches_total", "how" => "claimed").increment(folded.claimed);
        metrics::counter!("recd_item_activity_folded_batches_total", "how" => "unclaimed").increment(folded.unclaimed);
        metrics::counter!("recd_item_activity_claims_dropped_total").increment(folded.dropped);
        Ok(folded.claimed + folded.unclaimed)
    }

    /// One step of the pruning task: deletes minutes older than
    /// `minute_stats_retention` and item days older than
    /// `item_activity_retention`.
    pub async fn prune_stats(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let deleted = self
            .store
            .prune_stats(
                now.saturating_sub(ms(self.settings.minute_stats_retention)),
                now.saturating_sub(ms(self.settings.item_activity_retention)),
            )
            .await?;
        for (table, n) in deleted {
            metrics::counter!("recd_stats_rows_pruned_total", "table" => table).increment(n);
        }
        Ok(())
    }
}

/// Whether a replica whose last heartbeat is `age_ms` old is healthy: at
/// most three heartbeat intervals.
pub fn dashboard_healthy(age_ms: i64, interval: std::time::Duration) -> bool {
    u128::try_from(age_ms).unwrap_or(0) <= 3 * interval.as_millis()
}
