//! One training, from the store's events to a published snapshot: read,
//! train and evaluate on a blocking thread, gate, save. `recd train` runs
//! the same steps without the gate.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use futures::StreamExt;

use super::{Gate, Outcome, TrainFrom, Verdict};
use crate::app::App;
use crate::churn;
use crate::clock::now_ms;
use crate::domain::UserEvent;
use crate::model::ann::{AnnIndex, AnnSettings};
use crate::model::data::DatasetBuilder;
use crate::model::train::WarmStart;
use crate::model::{self, Dataset, EvalReport, ModelSnapshot, TrainConfig};
use crate::store::{SnapshotRow, Store};

const DAY_MS: f64 = 86_400_000.0;

/// Snapshots kept in the store; older ones are deleted.
pub const SNAPSHOTS_KEPT: i64 = 5;

/// What a training reads from the store: its window of events as
/// sequences, each user's newest event time, the items' categories.
pub struct TrainingData {
    /// The newest arrival number read: later arrivals are the new events
    /// the next training waits for.
    pub max_seq: i64,
    pub data: Dataset,
    /// Each user's newest event time in the window.
    pub last_ts: HashMap<String, i64>,
    /// Item id -> its first category.
    pub categories: HashMap<String, String>,
    /// The window's events per user (a sample of the users when more than
    /// `churn::MAX_USERS`), for churn prediction.
    pub histories: Vec<Vec<UserEvent>>,
}

/// Streams the training window from the store: the events of at most
/// `window_days` before the newest one, and about the newest
/// `window_events` of them (`0`: no bound of that kind). Memory is bounded
/// by the window, never by the table. With `fresh_after` (a served model's
/// cutoff), notes where each user's newer events begin.
pub async fn read_training_data(
    store: &Store,
    config: &TrainConfig,
    fresh_after: Option<i64>,
) -> anyhow::Result<TrainingData> {
    let max_seq = store.max_event_seq().await?;
    let (newest, nth) = store
        .newest_timestamps(max_seq, config.window_events.saturating_sub(1))
        .await?;
    let mut since = i64::MIN;
    if let (Some(newest), true) = (newest, config.window_days > 0.0) {
        since = newest.saturating_sub((config.window_days * DAY_MS) as i64);
    }
    if let (Some(nth), true) = (nth, config.window_events > 0) {
        since = since.max(nth);
    }
    let mut builder = fresh_after.map_or_else(DatasetBuilder::default, DatasetBuilder::fresh_after);
    let mut last_ts = HashMap::new();
    let mut rows = store.training_window(max_seq, since);
    while let Some(row) = rows.next().await {
        let row = row?;
        match last_ts.get_mut(&row.user_id) {
            Some(ts) => *ts = row.timestamp_ms,
            None => {
                last_ts.insert(row.user_id.clone(), row.timestamp_ms);
            }
        }
        builder.push(row);
    }
    drop(rows);
    let data = builder.finish();
    metrics::gauge!("recd_training_window_events").set(data.events as f64);
    if let (Some(newest), true) = (newest, since > i64::MIN) {
        metrics::gauge!("recd_training_window_days").set((newest - since) as f64 / DAY_MS);
    }
    tracing::info!(
        events = data.events,
        users = data.users(),
        items = data.items(),
        "training window read"
    );
    let histories = read_histories(store, max_seq, since, data.users()).await?;
    Ok(TrainingData {
        max_seq,
        data,
        last_ts,
        categories: store.primary_categories().await?,
        histories,
    })
}

/// The window's events per user for churn prediction: every user's, or
/// those of a sample of about `churn::MAX_USERS` users (by a hash of the id)
/// when the window has more.
async fn read_histories(store: &Store, max_seq: i64, since: i64, users: usize) -> anyhow::Result<Vec<Vec<UserEvent>>> {
    use std::hash::{Hash, Hasher};
    let every = users.div_ceil(churn::MAX_USERS).max(1) as u64;
    let mut histories = churn::Histories::default();
    let mut rows = store.churn_window(max_seq, since);
    while let Some(row) = rows.next().await {
        let (user, kind, value, ts, session) = row?;
        if every > 1 {
            // Fixed keys: the same users every time.
            let mut hasher = std::hash::DefaultHasher::new();
            user.hash(&mut hasher);
            if hasher.finish() % every != 0 {
                continue;
            }
        }
        histories.push(&user, kind, value, ts, session);
    }
    Ok(histories.into_users())
}

/// A trained model with its held-out figures, and what the gate needs.
pub struct Candidate {
    pub snapshot: ModelSnapshot,
    pub report: EvalReport,
    pub data: Dataset,
    /// Each user's newest event time.
    pub last_ts: HashMap<String, i64>,
}

/// Trains and evaluates (CPU work: call on a blocking thread): from
/// scratch, or continued from `from`'s weights (then in its shape).
pub fn train_candidate(
    input: TrainingData,
    config: &TrainConfig,
    progress: bool,
    from: Option<&ModelSnapshot>,
) -> anyhow::Result<Candidate> {
    let TrainingData {
        max_seq,
        mut data,
        last_ts,
        categories,
        histories,
    } = input;
    data.set_categories(&categories);
    let warm = from.and_then(|served| {
        let weights = served.weights.as_ref()?;
        Some(WarmStart {
            weights,
            rows: std::iter::once(None)
                .chain(data.item_ids.iter().map(|id| served.item_index(id)))
                .collect(),
            replay: config.replay,
            knn_weight: served.meta.knn_weight,
        })
    });
    let (mut snapshot, report) = model::train_and_evaluate_from(&data, config, progress, warm.as_ref())?;
    snapshot.meta.last_seq = max_seq;
    let projecting = std::time::Instant::now();
    snapshot.project();
    if snapshot.projection.is_some() {
        tracing::debug!(
            items = snapshot.items(),
            seconds = projecting.elapsed().as_secs_f64(),
            "item embeddings projected to 2-D"
        );
    }
    snapshot.meta.churn = churn_report(&histories, config.churn_horizon_days);
    match from.filter(|_| warm.is_some()) {
        Some(served) => {
            snapshot.meta.scratch_at_ms = served.meta.scratch_at_ms;
            snapshot.meta.continued_from = Some(served.meta.version.clone());
        }
        None => snapshot.meta.scratch_at_ms = now_ms(),
    }
    Ok(Candidate {
        snapshot,
        report,
        data,
        last_ts,
    })
}

/// Churn prediction fitted and measured on the window's histories (none
/// when too few).
fn churn_report(histories: &[Vec<UserEvent>], horizon_days: f64) -> Option<churn::ChurnReport> {
    let started = std::time::Instant::now();
    let report = churn::evaluate(histories, horizon_days);
    match &report {
        Some(r) => tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            horizon_days = r.horizon_days,
            classifier_roc_auc = r.methods.classifier.roc_auc,
            formula_roc_auc = r.methods.formula.roc_auc,
            recency_roc_auc = r.methods.recency.roc_auc,
            chosen = ?r.chosen,
            "churn prediction measured"
        ),
        None => tracing::info!(
            users = histories.len(),
            "too little history to measure churn prediction"
        ),
    }
    report
}

/// The nearest-neighbour index of `snapshot` when its catalogue is large
/// enough for one (CPU work of minutes for a million items: call on a
/// blocking thread). Built once here and stored with the snapshot, so that
/// no replica builds its own.
pub fn build_index(snapshot: &ModelSnapshot, settings: &AnnSettings) -> anyhow::Result<Option<AnnIndex>> {
    let Some(weights) = snapshot
        .weights
        .as_ref()
        .filter(|_| settings.applies_to(snapshot.items()))
    else {
        return Ok(None);
    };
    let index = AnnIndex::build(weights, settings, &AtomicBool::new(false))?;
    if let Some(index) = &index {
        tracing::info!(
            version = snapshot.meta.version,
            items = index.items,
            seconds = index.build_seconds,
            "nearest-neighbour index built"
        );
        metrics::gauge!("recd_ann_build_seconds").set(index.build_seconds);
    }
    Ok(index)
}

/// Saves the snapshot and its index in the store (other replicas are
/// told), keeping the newest `SNAPSHOTS_KEPT`; returns the bytes stored.
pub async fn save_snapshot(store: &Store, snapshot: &ModelSnapshot, index: Option<&AnnIndex>) -> anyhow::Result<usize> {
    let bytes = snapshot.to_bytes()?;
    let meta = serde_json::to_string(&snapshot.meta)?;
    let index_meta = index.map(|i| serde_json::to_string(&i.meta())).transpose()?;
    let row = SnapshotRow {
        version: &snapshot.meta.version,
        created_at_ms: now_ms(),
        meta: &meta,
        bytes: &bytes,
        index: index_meta.as_deref().zip(index.map(AnnIndex::bytes)),
    };
    store.save_snapshot(&row, SNAPSHOTS_KEPT).await?;
    Ok(bytes.len() + index.map_or(0, |i| i.bytes().len()))
}

/// Trains on the store's events, gates the candidate against the served
/// model, and publishes it when the gate accepts it.
pub(super) async fn train_and_gate(app: &App, from: TrainFrom) -> anyhow::Result<Outcome> {
    let served = app.serving.model();
    let mut config = app.settings.train.clone();
    let continue_from = served
        .clone()
        .filter(|served| from == TrainFrom::Auto && continues(served, &config, app.settings.scratch_interval));
    let input = read_training_data(&app.store, &config, continue_from.as_ref().map(|s| s.meta.cutoff_ms)).await?;
    if served.is_none() {
        // The first model comes quickly (a fresh service answers personally
        // within a minute); later trainings take their full time.
        config.max_train_seconds = config.max_train_seconds.min(app.settings.first_training_seconds);
    }
    let gate = Gate {
        margin: app.settings.gate_margin,
        min_cases: app.settings.gate_min_cases,
    };
    let ann = app.settings.ann;
    let decided = tokio::task::spawn_blocking(move || -> anyhow::Result<(ModelSnapshot, Verdict, Option<AnnIndex>)> {
        let candidate = train_candidate(input, &config, false, continue_from.as_deref())?;
        let verdict = gate.judge(&candidate, served.as_deref(), &config);
        let index = match verdict {
            Verdict::Accept(_) => build_index(&candidate.snapshot, &ann)?,
            Verdict::Reject(_) => None,
        };
        Ok((candidate.snapshot, verdict, index))
    })
    .await;
    let (snapshot, verdict, index) = match decided {
        Ok(result) => result?,
        Err(e) if e.is_panic() => anyhow::bail!("training panicked"),
        Err(e) => anyhow::bail!("training was cancelled: {e}"),
    };
    let version = snapshot.meta.version.clone();
    let metrics = snapshot.meta.metrics.clone();
    let start = match &snapshot.meta.continued_from {
        Some(served) => format!("continued from {served}"),
        None => "from scratch".to_owned(),
    };
    let verdict = match verdict {
        Verdict::Accept(why) => Verdict::Accept(format!("{start}: {why}")),
        Verdict::Reject(why) => Verdict::Reject(format!("{start}: {why}")),
    };
    match verdict {
        Verdict::Reject(why) => {
            tracing::warn!(version, reason = %why, "candidate rejected; the served model stays");
            Ok(Outcome::Rejected { version, why, metrics })
        }
        Verdict::Accept(why) => {
            if let Err(e) = save_snapshot(&app.store, &snapshot, index.as_ref()).await {
                // Evaluated, not published: the figures stay with the run.
                return Ok(Outcome::Failed {
                    why: format!("{e:#}"),
                    metrics: Some(metrics),
                });
            }
            app.serve_snapshot(snapshot, index);
            Ok(Outcome::Published { version, why, metrics })
        }
    }
}

/// Whether a training may continue from `served`: it has a network of the
/// configured shape, and the training from scratch it descends from is
/// younger than `scratch_interval`.
fn continues(served: &ModelSnapshot, config: &TrainConfig, scratch_interval: std::time::Duration) -> bool {
    let shape = served
        .weights
        .as_ref()
        .is_some_and(|w| w.dim == config.dim && w.hidden == config.hidden);
    let age_ms = now_ms().saturating_sub(served.meta.scratch_at_ms);
    shape && served.meta.scratch_at_ms > 0 && (age_ms as u128) < scratch_interval.as_millis()
}
