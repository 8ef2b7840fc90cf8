//! `recd eval --replay`: a shop's history replayed in time order, to
//! measure continued training against training from scratch. The first
//! training learns the oldest 80% of the events from scratch; four more
//! each add the next 5% and continue from the previous model's weights, as
//! a scheduled training continues from the served model; a last training
//! learns all the events from scratch. The continued model and the scratch
//! one are ranked on the same test cases (the leave-one-out split of all
//! the events), and their training costs are set side by side.

use std::collections::HashMap;

use serde::Serialize;

use super::pipeline::{train_candidate, TrainingData};
use crate::domain::EventRow;
use crate::model::data::DatasetBuilder;
use crate::model::{Metrics, ModelSnapshot, TrainConfig};

/// The share of the events (in time order) each training reads: the first
/// from scratch, the others continued.
pub const STAGES: [f64; 5] = [0.80, 0.85, 0.90, 0.95, 1.00];

/// One training of the replay.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// `scratch` or `continued`.
    pub from: &'static str,
    /// Events read (every event up to `cutoff`).
    pub events: u64,
    /// The newest event time read (RFC 3339).
    pub cutoff: String,
    pub items: u64,
    pub epochs: usize,
    /// Optimizer steps, each on one batch of `batch_size` windows.
    pub batches: usize,
    pub train_seconds: f64,
    /// The model on this stage's own held-out events.
    pub model: Metrics,
}

/// The replay's figures, as `recd eval --replay --json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The five trainings of the replay, oldest first.
    pub stages: Vec<Stage>,
    /// A training from scratch on all the events.
    pub scratch: Stage,
    /// The four continued trainings together.
    pub continued_batches: usize,
    pub continued_seconds: f64,
    /// The continued trainings' cost over the scratch training's.
    pub batches_ratio: f64,
    pub seconds_ratio: f64,
    /// Test users both final models are ranked on.
    pub test_users: u64,
}

impl ReplayReport {
    /// A plain table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::from("training            events  items  epochs  batches  seconds   HR@10  NDCG@10\n");
        let rows = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{:>3.0}% {}", STAGES[i] * 100.0, s.from), s))
            .chain(std::iter::once(("100% scratch (all)".to_string(), &self.scratch)));
        for (name, s) in rows {
            out.push_str(&format!(
                "{name:<18} {:>7} {:>6} {:>7} {:>8} {:>8.1}  {:>6.4}  {:>7.4}\n",
                s.events, s.items, s.epochs, s.batches, s.train_seconds, s.model.hr, s.model.ndcg
            ));
        }
        out.push_str(&format!(
            "\nafter the increments: NDCG@10 {:.4} against {:.4} from scratch ({} test users), \
             for {} batches ({:.2} of scratch) and {:.1} s ({:.2} of scratch)\n",
            self.stages.last().map_or(0.0, |s| s.model.ndcg),
            self.scratch.model.ndcg,
            self.test_users,
            self.continued_batches,
            self.batches_ratio,
            self.continued_seconds,
            self.seconds_ratio,
        ));
        out
    }
}

/// Replays `rows` in time order (see the module's comment). `categories`
/// gives items their first category.
pub fn replay(
    mut rows: Vec<EventRow>,
    categories: &HashMap<String, String>,
    config: &TrainConfig,
    progress: bool,
) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(rows.len() >= 20, "a replay needs at least 20 events");
    // A stable sort: equal times keep the file's order, as a store keeps
    // arrival order.
    rows.sort_by_key(|r| r.timestamp_ms);
    let mut stages = Vec::new();
    let mut served: Option<ModelSnapshot> = None;
    for share in STAGES {
        let end = cut(&rows, share);
        let (stage, snapshot) = train_stage(&rows[..end], categories, config, progress, served.as_ref())?;
        tracing::info!(
            share,
            events = stage.events,
            from = stage.from,
            ndcg = stage.model.ndcg,
            batches = stage.batches,
            "replay stage"
        );
        stages.push(stage);
        served = Some(snapshot);
    }
    let (scratch, _) = train_stage(&rows, categories, config, progress, None)?;
    let continued_batches = stages[1..].iter().map(|s| s.batches).sum();
    let continued_seconds = stages[1..].iter().map(|s| s.train_seconds).sum();
    let test_users = served.map_or(0, |s| s.meta.metrics.test_users);
    Ok(ReplayReport {
        batches_ratio: continued_batches as f64 / scratch.batches.max(1) as f64,
        seconds_ratio: continued_seconds / scratch.train_seconds.max(f64::MIN_POSITIVE),
        continued_batches,
        continued_seconds,
        test_users,
        stages,
        scratch,
    })
}

/// The end of the first `share` of `rows` (sorted by time), moved past any
/// event of the same time so that a stage never splits one instant.
fn cut(rows: &[EventRow], share: f64) -> usize {
    let mut end = ((rows.len() as f64 * share).ceil() as usize).clamp(1, rows.len());
    let last = rows[end - 1].timestamp_ms;
    while end < rows.len() && rows[end].timestamp_ms == last {
        end += 1;
    }
    end
}

/// One training on `rows`: continued from `from`'s weights when given,
/// learning the events newer than its data and a replay sample, exactly as
/// a scheduled training of the service does.
fn train_stage(
    rows: &[EventRow],
    categories: &HashMap<String, String>,
    config: &TrainConfig,
    progress: bool,
    from: Option<&ModelSnapshot>,
) -> anyhow::Result<(Stage, ModelSnapshot)> {
    let mut builder = from.map_or_else(DatasetBuilder::default, |s| {
        DatasetBuilder::fresh_after(s.meta.cutoff_ms)
    });
    for row in rows {
        builder.push(row.clone());
    }
    let input = TrainingData {
        max_seq: 0,
        data: builder.finish(),
        last_ts: HashMap::new(),
        categories: categories.clone(),
        histories: Vec::new(),
    };
    let candidate = train_candidate(input, config, progress, from)?;
    let report = &candidate.report;
    let stage = Stage {
        from: if candidate.snapshot.meta.continued_from.is_some() {
            "continued"
        } else {
            "scratch"
        },
        events: report.data.events,
        cutoff: crate::clock::format_timestamp(candidate.snapshot.meta.cutoff_ms),
        items: report.data.items,
        epochs: report.epochs,
        batches: report.batches,
        train_seconds: report.train_seconds,
        model: report.model,
    };
    Ok((stage, candidate.snapshot))
}
