//! One training, from the store's events to a published snapshot: read,
//! train and evaluate on a blocking thread, gate, save. `recd train` runs
//! the same steps without the gate.

use std::collections::HashMap;

use super::{Gate, Outcome, Verdict};
use crate::app::App;
use crate::clock::now_ms;
use crate::domain::EventRow;
use crate::model::{self, Dataset, EvalReport, ModelSnapshot, TrainConfig};
use crate::store::Store;

/// Snapshots kept in the store; older ones are deleted.
pub const SNAPSHOTS_KEPT: i64 = 5;

/// What a training reads from the store.
pub struct TrainingData {
    /// The newest arrival number among `rows`: later arrivals are the new
    /// events the next training waits for.
    pub max_seq: i64,
    pub rows: Vec<EventRow>,
    /// Item id -> its first category.
    pub categories: HashMap<String, String>,
}

/// Reads every event up to the newest arrival, and the item categories.
pub async fn read_training_data(store: &Store) -> anyhow::Result<TrainingData> {
    let max_seq = store.max_event_seq().await?;
    let rows = store.training_events_upto(max_seq).await?;
    let categories = store.primary_categories().await?;
    Ok(TrainingData {
        max_seq,
        rows,
        categories,
    })
}

/// A trained model with its held-out figures, and what the gate needs.
pub struct Candidate {
    pub snapshot: ModelSnapshot,
    pub report: EvalReport,
    pub data: Dataset,
    /// Each user's newest event time.
    pub last_ts: HashMap<String, i64>,
}

/// Trains and evaluates (CPU work: call on a blocking thread).
pub fn train_candidate(input: TrainingData, config: &TrainConfig, progress: bool) -> anyhow::Result<Candidate> {
    let last_ts = last_event_times(&input.rows);
    let mut data = Dataset::from_events(input.rows);
    data.set_categories(&input.categories);
    let (mut snapshot, report) = model::train_and_evaluate(&data, config, progress)?;
    snapshot.meta.last_seq = input.max_seq;
    Ok(Candidate {
        snapshot,
        report,
        data,
        last_ts,
    })
}

/// Saves the snapshot in the store (other replicas are told), keeping the
/// newest `SNAPSHOTS_KEPT`; returns its size in bytes.
pub async fn save_snapshot(store: &Store, snapshot: &ModelSnapshot) -> anyhow::Result<usize> {
    let bytes = snapshot.to_bytes()?;
    store
        .save_snapshot(
            &snapshot.meta.version,
            now_ms(),
            &serde_json::to_string(&snapshot.meta)?,
            &bytes,
            SNAPSHOTS_KEPT,
        )
        .await?;
    Ok(bytes.len())
}

/// Trains on the store's events, gates the candidate against the served
/// model, and publishes it when the gate accepts it.
pub(super) async fn train_and_gate(app: &App) -> anyhow::Result<Outcome> {
    let input = read_training_data(&app.store).await?;
    let served = app.serving.model();
    let mut config = app.settings.train.clone();
    if served.is_none() {
        // The first model comes quickly (a fresh service answers personally
        // within a minute); later trainings take their full time.
        config.max_train_seconds = config.max_train_seconds.min(app.settings.first_training_seconds);
    }
    let gate = Gate {
        margin: app.settings.gate_margin,
        min_cases: app.settings.gate_min_cases,
    };
    let decided = tokio::task::spawn_blocking(move || -> anyhow::Result<(ModelSnapshot, Verdict)> {
        let candidate = train_candidate(input, &config, false)?;
        let verdict = gate.judge(&candidate, served.as_deref(), &config);
        Ok((candidate.snapshot, verdict))
    })
    .await;
    let (snapshot, verdict) = match decided {
        Ok(result) => result?,
        Err(e) if e.is_panic() => anyhow::bail!("training panicked"),
        Err(e) => anyhow::bail!("training was cancelled: {e}"),
    };
    let version = snapshot.meta.version.clone();
    match verdict {
        Verdict::Reject(why) => {
            tracing::warn!(version, reason = %why, "candidate rejected; the served model stays");
            Ok(Outcome::Rejected { version, why })
        }
        Verdict::Accept(why) => {
            save_snapshot(&app.store, &snapshot).await?;
            app.serve_snapshot(snapshot);
            Ok(Outcome::Published { version, why })
        }
    }
}

/// Each user's last event time, from rows in time order.
fn last_event_times(rows: &[EventRow]) -> HashMap<String, i64> {
    let mut last = HashMap::new();
    for row in rows {
        last.insert(row.user_id.clone(), row.timestamp_ms);
    }
    last
}
