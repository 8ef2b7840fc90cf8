//! The background tasks of a serving process. Each is a loop around one
//! step; a failed step is logged and tried again on the next round.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::App;
use crate::clock::now_ms;
use crate::recommend::FOLLOW_EVERY;
use crate::store::Notice;

/// Impressions are handed to the store this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Events past `events_retention` are retired this often.
const RETIRE_EVERY: Duration = Duration::from_secs(600);
/// Impressions older than `impressions_retention` are forgotten this often.
const CLEANUP_EVERY: Duration = Duration::from_secs(600);
/// The dashboard's counts past their retention are deleted this often.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub(super) fn spawn_all(app: &App) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(crate::trainer::schedule(app.clone())),
        tokio::spawn(refresh_catalogue(app.clone())),
        tokio::spawn(flush_impressions(app.clone())),
        tokio::spawn(follow_events(app.clone())),
        tokio::spawn(refresh_shop_stats(app.clone())),
        tokio::spawn(refresh_rating_stats(app.clone())),
        tokio::spawn(refresh_segments(app.clone())),
        tokio::spawn(refresh_popular(app.clone())),
        tokio::spawn(retire_events(app.clone())),
        tokio::spawn(heartbeat(app.clone())),
        tokio::spawn(refresh_overview(app.clone())),
        tokio::spawn(prune_stats(app.clone())),
        tokio::spawn(fold_item_activity(app.clone())),
        tokio::spawn(fold_minutes(app.clone())),
    ];
    if !app.store.one_process() {
        tasks.push(tokio::spawn(listen(app.clone())));
    }
    tasks
}

/// Flushes impressions every `FLUSH_EVERY`, and every `CLEANUP_EVERY`
/// forgets those older than `impressions_retention`.
async fn flush_impressions(app: App) {
    let mut last_cleanup = Instant::now();
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        app.flush_impressions().await;
        if last_cleanup.elapsed() >= CLEANUP_EVERY {
            last_cleanup = Instant::now();
            let keep = i64::try_from(app.settings.impressions_retention.as_millis()).unwrap_or(i64::MAX);
            match app.store.forget_impressions(now_ms().saturating_sub(keep)).await {
                Ok(n) if n > 0 => tracing::info!(impressions = n, "old impressions forgotten"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot forget old impressions"),
            }
        }
    }
}

/// Drops cached histories of users with events stored elsewhere.
async fn follow_events(app: App) {
    loop {
        if let Err(e) = app.serving.histories.follow(&app.store).await {
            tracing::debug!(error = %e, "cannot follow new events");
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// The shop statistics, at once and then every `stats_refresh` when new
/// events arrived.
async fn refresh_shop_stats(app: App) {
    loop {
        if let Err(e) = app.refresh_shop_stats(false).await {
            metrics::counter!("recd_background_failures_total", "task" => "shop_stats").increment(1);
            tracing::warn!(error = %e, "cannot refresh the shop statistics");
        }
        tokio::time::sleep(app.settings.stats_refresh).await;
    }
}

/// The category ratings, at once and then every `rating_stats_refresh`
/// when their inputs changed.
async fn refresh_rating_stats(app: App) {
    loop {
        if let Err(e) = app.refresh_rating_stats(false).await {
            metrics::counter!("recd_background_failures_total", "task" => "rating_stats").increment(1);
            tracing::warn!(error = %e, "cannot refresh the category ratings");
        }
        tokio::time::sleep(app.settings.rating_stats_refresh).await;
    }
}

/// The segment lists, at once and then every `segments_refresh` when
/// events arrived or were retired.
async fn refresh_segments(app: App) {
    loop {
        if let Err(e) = app.refresh_segments(false).await {
            metrics::counter!("recd_background_failures_total", "task" => "segments").increment(1);
            tracing::warn!(error = %e, "cannot compute the segments");
        }
        tokio::time::sleep(app.settings.segments_refresh).await;
    }
}

/// The popular lists, every `popular_refresh` when new events arrived.
async fn refresh_popular(app: App) {
    loop {
        tokio::time::sleep(app.settings.popular_refresh).await;
        if let Err(e) = app.refresh_popular().await {
            metrics::counter!("recd_background_failures_total", "task" => "popular").increment(1);
            tracing::warn!(error = %e, "cannot refresh the popular lists");
        }
    }
}

/// Retention, every `RETIRE_EVERY` (the first a period after start).
async fn retire_events(app: App) {
    loop {
        tokio::time::sleep(RETIRE_EVERY).await;
        if let Err(e) = app.retire_events().await {
            metrics::counter!("recd_background_failures_total", "task" => "retention").increment(1);
            tracing::warn!(error = %e, "cannot retire old events");
        }
    }
}

/// This replica's heartbeat, at once and then every `heartbeat_interval`.
async fn heartbeat(app: App) {
    let every = app.settings.heartbeat_interval.max(Duration::from_millis(100));
    loop {
        if let Err(e) = app.heartbeat().await {
            metrics::counter!("recd_background_failures_total", "task" => "heartbeat").increment(1);
            tracing::warn!(error = %e, "cannot write the heartbeat");
        }
        tokio::time::sleep(every).await;
    }
}

/// The overview's counts, at once and then every `overview_refresh`.
async fn refresh_overview(app: App) {
    let every = app.settings.overview_refresh.max(Duration::from_secs(1));
    loop {
        if let Err(e) = app.refresh_overview().await {
            metrics::counter!("recd_background_failures_total", "task" => "overview").increment(1);
            tracing::warn!(error = %e, "cannot count the overview");
        }
        tokio::time::sleep(every).await;
    }
}

/// Ingest's pending per-minute counts and clicks, folded every
/// `minute_stats_fold`.
async fn fold_minutes(app: App) {
    let every = app.settings.minute_stats_fold.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = app.fold_minutes().await {
            metrics::counter!("recd_background_failures_total", "task" => "minute_stats_fold").increment(1);
            tracing::warn!(error = %e, "cannot fold the per-minute counts");
        }
    }
}

/// Ingest's pending per-item counts, folded every `item_activity_fold`.
async fn fold_item_activity(app: App) {
    let every = app.settings.item_activity_fold.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = app.fold_item_activity().await {
            metrics::counter!("recd_background_failures_total", "task" => "item_activity_fold").increment(1);
            tracing::warn!(error = %e, "cannot fold the per-item counts");
        }
    }
}

/// The dashboard's counts past their retention, every `PRUNE_EVERY`.
async fn prune_stats(app: App) {
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        if let Err(e) = app.prune_stats().await {
            metrics::counter!("recd_background_failures_total", "task" => "stats_pruning").increment(1);
            tracing::warn!(error = %e, "cannot prune the dashboard's counts");
        }
    }
}

/// Reads the catalogue's changes every `snapshot_poll`.
async fn refresh_catalogue(app: App) {
    loop {
        tokio::time::sleep(app.settings.snapshot_poll).await;
        if let Err(e) = app.serving.catalogue.refresh(&app.store).await {
            tracing::debug!(error = %e, "catalogue refresh failed");
        }
    }
}

/// New snapshots and erasures announced by other replicas, at once.
async fn listen(app: App) {
    loop {
        let heard = async {
            let Some(mut notices) = app.store.subscribe().await? else {
                return Ok(());
            };
            // Whatever was announced before we listened.
            if let Err(e) = app.load_latest().await {
                tracing::warn!(error = %e, "cannot load the newest snapshot");
            }
            loop {
                match notices.recv().await? {
                    Notice::Erasure(user_id) => app.serving.forget_user(&user_id),
                    Notice::Snapshot => {
                        if let Err(e) = app.load_latest().await {
                            tracing::warn!(error = %e, "cannot load the newest snapshot");
                        }
                    }
                }
            }
        };
        let result: Result<(), crate::store::StoreError> = heard.await;
        match result {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "listener lost; reconnecting"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
