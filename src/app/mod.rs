//! The App: one owner for what a serving process holds and runs. It owns
//! the store, the settings, the serving state (the model, caches, index)
//! and the trainer's handle; it loads the newest snapshot before the port
//! is bound (`open`), starts the background tasks once (`start`) and stops
//! them on shutdown (`stop`). The HTTP layer reaches it through axum state
//! and holds no lifecycle of its own.

mod dashboard;
mod rating_stats;
mod segments;
mod shop_stats;
mod tasks;

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::clock::now_ms;
use crate::config::Settings;
use crate::domain::ShopStats;
use crate::model::ann::AnnIndex;
use crate::model::snapshot::NewerFormat;
use crate::model::ModelSnapshot;
use crate::recommend::Serving;
use crate::store::{KnownItems, Locks, Store};
use crate::trainer::Trainer;
use dashboard::OverviewCache;
pub use dashboard::{dashboard_healthy, Overview};
pub use rating_stats::CategoryRatings;
use rating_stats::RatingStatsCache;
use segments::SegmentsCache;
pub use segments::SegmentsComputed;
use shop_stats::ShopStatsCache;

/// A cheap handle: clones share one allocation.
#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub settings: Settings,
    /// Items this process has seen stored, so ingest skips their insert.
    pub known_items: KnownItems,
    /// The served model, the catalogue filters, cached user states.
    pub serving: Arc<Serving>,
    pub trainer: Trainer,
    /// The shop-wide figures profiles are scored against, made in the
    /// background.
    shop_stats: ShopStatsCache,
    /// Every category's rating figures, made in the background.
    rating_stats: RatingStatsCache,
    /// When every shopper's segment was last computed (into the store).
    segments: SegmentsCache,
    /// The dashboard's overview, counted in the background.
    overview: OverviewCache,
    /// When this process opened the app (ms since the epoch), for its
    /// heartbeat.
    started_at_ms: i64,
    /// The newest event's time in the store (ms; `i64::MIN` for none) and
    /// the arrival number it was read at, kept by the popular lists' task.
    newest_event: std::sync::atomic::AtomicI64,
    newest_event_seq: std::sync::atomic::AtomicI64,
    /// The background tasks, once started; taken (and aborted) by `stop`.
    tasks: Mutex<Option<Vec<JoinHandle<()>>>>,
    /// Snapshot versions this build cannot read (a newer recd's), not
    /// fetched again.
    unreadable: Mutex<std::collections::HashSet<String>>,
    /// The newest warming of user states (aborted by `stop`, and when a
    /// newer model's warming starts).
    warming: Mutex<Option<JoinHandle<()>>>,
}

impl std::ops::Deref for App {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    /// The app over an open store: the newest snapshot and the catalogue
    /// are loaded here, before the port is bound, so a restarted service
    /// serves its last model from the first request on.
    pub async fn open(store: Store, settings: Settings) -> anyhow::Result<App> {
        store.keep_stats(settings.minute_stats_retention, settings.item_activity_retention);
        let app = App(Arc::new(Inner {
            serving: Arc::new(Serving::new(settings.train.max_len, settings.ann).with_suggestions(
                crate::recommend::SuggestSettings {
                    in_filters: settings.suggested_categories_in_filters,
                    min_confidence: settings.suggested_category_min_confidence,
                },
            )),
            trainer: Trainer::new(Locks::new(&store)),
            known_items: KnownItems::default(),
            shop_stats: ShopStatsCache::default(),
            rating_stats: RatingStatsCache::default(),
            segments: SegmentsCache::default(),
            overview: OverviewCache::default(),
            started_at_ms: now_ms(),
            newest_event: std::sync::atomic::AtomicI64::new(i64::MIN),
            newest_event_seq: std::sync::atomic::AtomicI64::new(i64::MIN),
            tasks: Mutex::new(None),
            warming: Mutex::new(None),
            unreadable: Mutex::default(),
            store,
            settings,
        }));
        app.load_latest().await?;
        app.serving.catalogue.refresh(&app.store).await?;
        // The cold-start list is ready before the first request; the shop
        // statistics follow in the background.
        app.serving
            .popular
            .refresh(&app.store, app.settings.popular_window)
            .await?;
        if app.store.one_process() {
            // A run left `running` died with the process before this one.
            app.store.abandon_trainings(now_ms()).await?;
        }
        Ok(app)
    }

    /// Starts the background tasks; a second call does nothing.
    pub fn start(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.is_none() {
            *tasks = Some(tasks::spawn_all(self));
        }
    }

    /// Stops the background tasks and hands the impressions counted so far
    /// to the store.
    pub async fn stop(&self) {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        let warming = self.warming.lock().unwrap_or_else(|e| e.into_inner()).take();
        for task in tasks.into_iter().flatten().chain(warming) {
            task.abort();
        }
        self.flush_impressions().await;
    }

    /// Serves the newest stored snapshot this build can read, if it is not
    /// served yet. A snapshot of a newer format (a newer recd publishing
    /// during a rolling upgrade) is passed over: the model served stays, or
    /// at start the newest readable one is served.
    pub async fn load_latest(&self) -> anyhow::Result<()> {
        for version in self.store.snapshot_versions().await? {
            if self.serving.version().as_deref() == Some(version.as_str()) {
                return Ok(());
            }
            if self
                .unreadable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&version)
            {
                continue;
            }
            if self.load_version(&version).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Loads and serves one stored snapshot; `false` when it is of a newer
    /// format (remembered, not fetched again).
    async fn load_version(&self, version: &str) -> anyhow::Result<bool> {
        let Some(bytes) = self.store.snapshot_bytes(version).await? else {
            return Ok(false);
        };
        let stored_index = self.store.snapshot_index(version).await?;
        let settings = self.settings.ann;
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let snapshot = ModelSnapshot::from_bytes(&bytes)?;
            // The trainer's index, unless it was built otherwise than the
            // settings now ask (then one is built here).
            let index = match stored_index {
                Some((meta, bytes)) if settings.applies_to(snapshot.items()) => {
                    AnnIndex::load(&bytes, &serde_json::from_str(&meta)?, &settings)?
                }
                _ => None,
            };
            Ok((snapshot, index))
        })
        .await?;
        let (snapshot, index) = match loaded {
            Ok(loaded) => loaded,
            Err(e) if e.downcast_ref::<NewerFormat>().is_some() => {
                tracing::warn!(version, error = %e, "cannot serve a snapshot of a newer recd; passed over");
                metrics::counter!("recd_snapshot_unreadable_total").increment(1);
                self.unreadable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(version.to_owned());
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if index.is_some() {
            metrics::counter!("recd_ann_loads_total").increment(1);
        }
        // Another replica may have published a newer one meanwhile; the next
        // look picks it up.
        self.serve_snapshot(snapshot, index);
        metrics::counter!("recd_snapshot_loads_total").increment(1);
        Ok(true)
    }

    /// Serves `snapshot` (ranked through `index`, when it has one) from now
    /// on, and warms the states of the most recently active users for it in
    /// the background.
    pub fn serve_snapshot(&self, snapshot: ModelSnapshot, index: Option<AnnIndex>) {
        record_model_metrics(&snapshot);
        self.serving.publish(snapshot, index);
        // Its churn classifier (or none) scores the segments from now on.
        self.segments.mark_stale();
        let Some(model) = self.serving.model() else {
            return;
        };
        let app = self.clone();
        let warming = tokio::spawn(async move {
            let since = app.stats_since().await;
            let info = app
                .serving
                .warm(&app.store, &model, app.settings.warm_users, since)
                .await;
            metrics::gauge!("recd_warmed_users").set(info.users as f64);
            match info.error {
                None => tracing::info!(
                    version = info.version,
                    users = info.users,
                    seconds = info.seconds,
                    "user states warmed"
                ),
                Some(error) => tracing::warn!(version = info.version, error, "warming user states failed"),
            }
        });
        let older = self.warming.lock().unwrap_or_else(|e| e.into_inner()).replace(warming);
        if let Some(older) = older {
            older.abort();
        }
    }

    /// Where `stats_window` starts: that long before the newest event.
    async fn stats_since(&self) -> i64 {
        match (self.settings.stats_window, self.store.newest_event_ms().await) {
            (Some(window), Ok(Some(newest))) => {
                newest.saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
            }
            _ => i64::MIN,
        }
    }

    /// Hands the impressions counted so far to the store (they are kept for
    /// the next try when it cannot take them).
    pub async fn flush_impressions(&self) {
        let pending = self.serving.impressions.take();
        if pending.is_empty() {
            return;
        }
        if let Err(e) = self.store.record_impressions(&pending).await {
            tracing::warn!(error = %e, impressions = pending.len(), "cannot store impressions yet");
            self.serving.impressions.put_back(pending);
        }
    }

    /// The shop-wide figures profiles are scored against, as last computed
    /// in the background: never waits for a scan.
    pub fn shop_stats(&self) -> Arc<ShopStats> {
        self.shop_stats.get()
    }

    /// One step of the shop statistics' background task: recomputes them
    /// over `stats_window` when events arrived since they were (or always,
    /// with `force`).
    pub async fn refresh_shop_stats(&self, force: bool) -> anyhow::Result<()> {
        self.shop_stats.refresh(&self.store, self.stats_since(), force).await
    }

    /// Every category's rating figures as last computed in the background
    /// (`None` before the first computation): never waits for a scan.
    pub fn category_ratings(&self) -> Option<Arc<CategoryRatings>> {
        self.rating_stats.get()
    }

    /// One step of the category ratings' background task: recomputes them
    /// when events arrived, the catalogue's categories changed or a user
    /// was erased since they were (or always, with `force`); whether it did.
    pub async fn refresh_rating_stats(&self, force: bool) -> anyhow::Result<bool> {
        self.rating_stats.refresh(&self.store, &self.serving, force).await
    }

    /// The last computation of the segment lists (`None` before the
    /// first).
    pub fn segments(&self) -> Option<SegmentsComputed> {
        self.segments.get()
    }

    /// One step of the segments' background task: brings the shop
    /// statistics up to date, then computes every shopper's segment when
    /// events arrived or were retired, or a model was served, since the last
    /// computation (or always, with `force`); whether it did.
    pub async fn refresh_segments(&self, force: bool) -> anyhow::Result<bool> {
        let shop = || async {
            self.refresh_shop_stats(false).await?;
            Ok::<_, anyhow::Error>(self.shop_stats())
        };
        self.segments
            .refresh(&self.store, shop, self.churn_model(), force)
            .await
    }

    /// The churn classifier profiles and segments score with: the served
    /// model's, when its training chose it over the formula.
    pub fn churn_model(&self) -> Option<crate::churn::ChurnModel> {
        let model = self.serving.model()?;
        model.meta.churn.as_ref()?.serving_model().cloned()
    }

    /// One step of the popular lists' background task: recomputes the
    /// lists that count fewer events than the store holds.
    pub async fn refresh_popular(&self) -> anyhow::Result<()> {
        let newest = self.store.max_event_seq().await?;
        self.refresh_newest_event(newest).await?;
        for window in self.serving.popular.stale(newest) {
            let started = std::time::Instant::now();
            self.serving.popular.refresh(&self.store, window).await?;
            metrics::histogram!("recd_popular_refresh_seconds").record(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Reads the newest event's time again when events arrived (`seq` is
    /// the store's newest arrival number) or a retirement may have changed
    /// it.
    async fn refresh_newest_event(&self, seq: i64) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        if self.newest_event_seq.load(Ordering::Acquire) == seq {
            return Ok(());
        }
        let newest = self.store.newest_event_ms().await?.unwrap_or(i64::MIN);
        self.newest_event.store(newest, Ordering::Release);
        self.newest_event_seq.store(seq, Ordering::Release);
        Ok(())
    }

    /// Events this process just stored: the newest time is known without
    /// waiting for the background read.
    pub fn saw_events(&self, newest_ms: Option<i64>) {
        if let Some(ts) = newest_ms {
            self.newest_event.fetch_max(ts, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// The newest event's time in the store as last read in the background
    /// (every `popular_refresh` while events arrive): profiles measure
    /// recency from it without a query of their own. `None` before the
    /// first read or without events.
    pub fn newest_event_ms(&self) -> Option<i64> {
        let newest = self.newest_event.load(std::sync::atomic::Ordering::Acquire);
        (newest != i64::MIN).then_some(newest)
    }

    /// Brings every figure made in the background up to the store's events
    /// now (what the background tasks do within `stats_refresh`,
    /// `rating_stats_refresh` and `popular_refresh`): for tests, and for a
    /// caller that just imported.
    pub async fn refresh_figures(&self) -> anyhow::Result<()> {
        self.refresh_shop_stats(false).await?;
        self.refresh_rating_stats(false).await?;
        self.refresh_popular().await?;
        self.refresh_segments(false).await.map(drop)
    }

    /// One step of the retention task: retires events older than
    /// `events_retention` before the newest event, and forgets the ids of
    /// events sent without a timestamp once 24 hours old.
    pub async fn retire_events(&self) -> anyhow::Result<crate::store::Retention> {
        let before = match (self.settings.events_retention, self.store.newest_event_ms().await?) {
            (Some(keep), Some(newest)) => {
                Some(newest.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)))
            }
            _ => None,
        };
        let retired = self.store.retire_events(before, now_ms()).await?;
        metrics::counter!("recd_retention_partitions_dropped_total").increment(retired.partitions);
        metrics::counter!("recd_retention_rows_deleted_total").increment(retired.rows);
        metrics::gauge!("recd_event_partitions").set(self.store.event_partitions().await?.len() as f64);
        if retired.partitions > 0 || retired.rows > 0 {
            self.rating_stats.mark_stale();
            self.segments.mark_stale();
            tracing::info!(
                partitions = retired.partitions,
                rows = retired.rows,
                "old events retired"
            );
        }
        Ok(retired)
    }

    /// Keeps shop statistics computed meanwhile from being published while
    /// the guard lives: tests use it to see what requests answer during a
    /// refresh.
    #[doc(hidden)]
    pub async fn hold_shop_stats(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.shop_stats.hold().await
    }
}

/// The model's held-out figures as gauges.
pub fn record_model_metrics(snapshot: &ModelSnapshot) {
    let m = &snapshot.meta.metrics;
    for (method, figures) in [("model", &m.model), ("popular", &m.popular), ("item_knn", &m.item_knn)] {
        metrics::gauge!("recd_model_metric", "method" => method, "metric" => "hr@10").set(figures.hr);
        metrics::gauge!("recd_model_metric", "method" => method, "metric" => "ndcg@10").set(figures.ndcg);
    }
    if let Some(churn) = &snapshot.meta.churn {
        let m = &churn.methods;
        for (method, figures) in [
            ("classifier", &m.classifier),
            ("formula", &m.formula),
            ("recency", &m.recency),
        ] {
            metrics::gauge!("recd_churn_metric", "method" => method, "metric" => "roc_auc").set(figures.roc_auc);
            metrics::gauge!("recd_churn_metric", "method" => method, "metric" => "pr_auc").set(figures.pr_auc);
        }
        let classifier = churn.serving_model().is_some();
        metrics::gauge!("recd_churn_classifier_used").set(if classifier { 1.0 } else { 0.0 });
    }
}
