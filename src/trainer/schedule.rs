//! When to train: every `snapshot_poll` the leader asks whether a training
//! is due. Leadership is the store's leader lock (always held on SQLite).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{start_training, TrainFrom};
use crate::app::App;

/// Every `snapshot_poll`: pick up new snapshots; on the leader, train when
/// due.
pub async fn schedule(app: App) {
    let poll = app.settings.snapshot_poll;
    loop {
        if let Err(e) = app.load_latest().await {
            tracing::warn!(error = %e, "cannot load the newest snapshot");
        }
        if let Some(interval) = app.settings.train_interval {
            if lead(&app).await {
                match due(&app, interval).await {
                    Ok(true) => {
                        if let Err(busy) = start_training(&app, TrainFrom::Auto).await {
                            tracing::debug!(%busy, "scheduled training skipped");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot tell whether to train"),
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Whether this process leads; records a change of leadership.
async fn lead(app: &App) -> bool {
    let trainer = &app.trainer;
    let leads = match trainer.locks.lead(trainer.is_leader()).await {
        Ok(leads) => leads,
        Err(e) => {
            tracing::debug!(error = %e, "no trainer lock session");
            false
        }
    };
    if leads != trainer.is_leader() {
        tracing::info!(replica = %trainer.replica, leads, "trainer leadership changed");
        trainer.leader.store(leads, Ordering::SeqCst);
    }
    metrics::gauge!("recd_trainer_leader").set(if leads { 1.0 } else { 0.0 });
    leads
}

/// A training is due when none ever was and there are events, or the
/// interval passed and `train_min_new_events` arrived since the served
/// model's data.
async fn due(app: &App, interval: Duration) -> anyhow::Result<bool> {
    let trainer = &app.trainer;
    if trainer.is_running() {
        return Ok(false);
    }
    let last = *trainer.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
    match (app.serving.model(), last) {
        (None, None) => Ok(app.store.count_events().await? > 0),
        (_, Some(at)) if at.elapsed() < interval => Ok(false),
        (None, Some(_)) => Ok(app.store.count_events().await? > 0),
        (Some(model), at) => {
            if at.is_none() && trainer.created.elapsed() < interval {
                return Ok(false);
            }
            let new = app.store.count_events_after(model.meta.last_seq).await?;
            Ok(new >= app.settings.train_min_new_events as i64)
        }
    }
}
