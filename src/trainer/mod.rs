//! The retrainer. Every replica runs the schedule; one of them leads
//! (`schedule`): it trains when a training is due, on a blocking thread
//! (`pipeline`), and the candidate replaces the served model only when the
//! gate says it is not worse (`gate`). Other replicas pick the published
//! snapshot up from the store (see [`crate::app`]).

mod gate;
mod pipeline;
mod replay;
mod schedule;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use gate::{Gate, Verdict};
pub use pipeline::{
    build_index, read_training_data, save_snapshot, train_candidate, Candidate, TrainingData, SNAPSHOTS_KEPT,
};
pub use replay::{replay, ReplayReport, Stage, STAGES};
pub use schedule::schedule;

use crate::app::App;
use crate::clock::now_ms;
use crate::domain::TrainingOutcome;
use crate::model::snapshot::ModelMetrics;
use crate::store::Locks;

/// How a training ended, with the candidate's held-out figures once it
/// was evaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Published {
        version: String,
        why: String,
        metrics: ModelMetrics,
    },
    Rejected {
        version: String,
        why: String,
        metrics: ModelMetrics,
    },
    Failed {
        why: String,
        metrics: Option<ModelMetrics>,
    },
}

impl Outcome {
    pub fn kind(&self) -> TrainingOutcome {
        match self {
            Outcome::Published { .. } => TrainingOutcome::Published,
            Outcome::Rejected { .. } => TrainingOutcome::Rejected,
            Outcome::Failed { .. } => TrainingOutcome::Failed,
        }
    }

    /// The candidate's version (none when training failed), why, and its
    /// held-out figures (none when it failed before they were made).
    fn parts(&self) -> (Option<&str>, &str, Option<&ModelMetrics>) {
        match self {
            Outcome::Published { version, why, metrics } | Outcome::Rejected { version, why, metrics } => {
                (Some(version), why, Some(metrics))
            }
            Outcome::Failed { why, metrics } => (None, why, metrics.as_ref()),
        }
    }
}

/// Where a training starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainFrom {
    /// From the served model's weights when it has a network of the
    /// configured shape and the training from scratch it descends from is
    /// younger than `scratch_interval`; else from scratch.
    Auto,
    /// From random weights.
    Scratch,
}

/// Why a training cannot start now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Busy {
    #[error("a training is already running in this process")]
    Here,
    #[error("a training is running on another replica")]
    Elsewhere,
}

/// The trainer's state in one process.
pub struct Trainer {
    /// Host, process and a random suffix: names this process in `trainings`.
    pub replica: String,
    running: AtomicBool,
    leader: AtomicBool,
    /// The leader and training locks (a session of their own on Postgres).
    locks: Locks,
    /// When the last scheduled training started.
    last_attempt: std::sync::Mutex<Option<Instant>>,
    created: Instant,
}

impl Trainer {
    pub fn new(locks: Locks) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Trainer {
            replica: format!("{host}:{}:{}", std::process::id(), &suffix[..8]),
            running: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            locks,
            last_attempt: std::sync::Mutex::new(None),
            created: Instant::now(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether this process schedules trainings.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }
}

/// Starts a training in the background unless one runs here or (on
/// Postgres) on another replica.
pub async fn start_training(app: &App, from: TrainFrom) -> Result<(), Busy> {
    let trainer = &app.trainer;
    if trainer
        .running
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(Busy::Here);
    }
    if !trainer.locks.try_lock_training().await {
        trainer.running.store(false, Ordering::SeqCst);
        return Err(Busy::Elsewhere);
    }
    if !app.store.one_process() {
        // With the training lock ours, a run still marked `running` is one
        // whose replica died.
        if let Err(e) = app.store.abandon_trainings(now_ms()).await {
            tracing::warn!(error = %e, "cannot close abandoned trainings");
        }
    }
    *trainer.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    let app = app.clone();
    tokio::spawn(async move {
        let outcome = train(&app, from).await;
        app.trainer.locks.unlock_training().await;
        app.trainer.running.store(false, Ordering::SeqCst);
        tracing::info!(outcome = outcome.kind().name(), ?outcome, "training finished");
    });
    Ok(())
}

/// One training: train and gate, publish; the run recorded in the store
/// and in metrics.
async fn train(app: &App, from: TrainFrom) -> Outcome {
    let id = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    if let Err(e) = app.store.start_training(&id, now_ms(), &app.trainer.replica).await {
        tracing::warn!(error = %e, "cannot record the training's start");
    }
    tracing::info!(training = %id, "training started");
    let outcome = match pipeline::train_and_gate(app, from).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Failed {
            why: format!("{e:#}"),
            metrics: None,
        },
    };
    let (version, reason, metrics) = outcome.parts();
    let metrics = metrics.and_then(|m| serde_json::to_string(m).ok());
    if let Err(e) = app
        .store
        .finish_training(&id, now_ms(), outcome.kind(), Some(reason), version, metrics.as_deref())
        .await
    {
        tracing::warn!(error = %e, "cannot record the training's end");
    }
    metrics::counter!("recd_training_runs_total", "outcome" => outcome.kind().name()).increment(1);
    metrics::histogram!("recd_training_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Outcome::Failed { why, .. } = &outcome {
        tracing::error!(training = %id, reason = %why, "training failed; the served model stays");
    }
    outcome
}
