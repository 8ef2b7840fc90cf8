//! Train and evaluate in one pass, the same code in `recd eval` and in every
//! retrain: leave-one-out split, the network, the popular and item-kNN
//! baselines on the same test cases, and the snapshot that is served.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::data::{sample_cases, Case, Dataset, Split};
use super::knn::Neighbours;
use super::metrics::{self, Metrics};
use super::snapshot::{ModelMetrics, ModelSnapshot, SnapshotKind, SnapshotMeta, Weights};
use super::train::{train_from, TrainConfig, WarmStart};
use crate::domain::EventRow;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataSummary {
    pub users: u64,
    pub items: u64,
    pub events: u64,
    pub test_users: u64,
}

/// The figures of one run, as `recd eval --json` prints them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub data: DataSummary,
    pub train_seconds: f64,
    pub epochs: usize,
    /// Optimizer steps over all epochs, each on one batch of windows.
    #[serde(default)]
    pub batches: usize,
    pub model: Metrics,
    pub popular: Metrics,
    pub item_knn: Metrics,
}

impl EvalReport {
    /// A plain table for the terminal.
    pub fn table(&self) -> String {
        let d = &self.data;
        let mut out = format!(
            "{} users, {} items, {} events, {} test users; trained {:.1}s, {} epochs, {} batches\n\n",
            d.users, d.items, d.events, d.test_users, self.train_seconds, self.epochs, self.batches
        );
        out.push_str("method     HR@10   NDCG@10  sampled HR@10  sampled NDCG@10\n");
        for (name, m) in [
            ("model", &self.model),
            ("popular", &self.popular),
            ("item-kNN", &self.item_knn),
        ] {
            out.push_str(&format!(
                "{name:<9} {:>6.4}  {:>7.4}  {:>13.4}  {:>15.4}\n",
                m.hr, m.ndcg, m.sampled_hr, m.sampled_ndcg
            ));
        }
        out
    }
}

/// Interaction counts per dense index over each user's first `lens` events.
fn counts(data: &Dataset, lens: &[usize]) -> Vec<f32> {
    let mut counts = vec![0f32; data.items() + 1];
    for (seq, &n) in data.sequences.iter().zip(lens) {
        for step in &seq[..n] {
            counts[step.item as usize] += 1.0;
        }
    }
    counts
}

fn prefixes<'a>(data: &'a Dataset, lens: &'a [usize]) -> impl Iterator<Item = &'a [super::data::Step]> {
    data.sequences.iter().zip(lens).map(|(s, &n)| &s[..n])
}

/// Network scores plus `knn_weight` x co-occurrence.
fn blended<'a>(
    weights: &'a Weights,
    knn: &'a Neighbours,
    knn_weight: f32,
    max_len: usize,
) -> impl Fn(&[super::data::Step], &mut Vec<f32>) + Sync + 'a {
    move |history, scores| {
        weights.score_history(history, max_len, scores);
        if knn_weight > 0.0 {
            knn.add_scores(history, knn_weight, scores);
        }
    }
}

/// The co-occurrence weight that serves validation best by NDCG over the
/// whole ranking (0 = network alone).
fn choose_knn_weight(data: &Dataset, weights: &Weights, knn: &Neighbours, valid: &[Case], cfg: &TrainConfig) -> f32 {
    let mut best = (f64::NEG_INFINITY, 0.0);
    for w in [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0] {
        let score = metrics::evaluate(data, valid, cfg.seed, blended(weights, knn, w, cfg.max_len)).ndcg_full;
        tracing::debug!(knn_weight = w, validation_ndcg_full = score, "blend");
        if score > best.0 {
            best = (score, w);
        }
    }
    best.1
}

/// Trains on the leave-one-out split of `data`, evaluates the model and both
/// baselines on the test cases, and returns the snapshot to serve with its
/// report. Errors only when there are no events at all; data too small to
/// train a network gives a co-occurrence and popularity snapshot.
pub fn train_and_evaluate(
    data: &Dataset,
    cfg: &TrainConfig,
    progress: bool,
) -> anyhow::Result<(ModelSnapshot, EvalReport)> {
    train_and_evaluate_from(data, cfg, progress, None)
}

/// As `train_and_evaluate`, the network continued from a served model's
/// weights when `warm` is given.
pub fn train_and_evaluate_from(
    data: &Dataset,
    cfg: &TrainConfig,
    progress: bool,
    warm: Option<&WarmStart<'_>>,
) -> anyhow::Result<(ModelSnapshot, EvalReport)> {
    cfg.check()?;
    anyhow::ensure!(data.events > 0, "no events to train on");
    let started = Instant::now();
    let split = Split::leave_one_out(data);
    let but_test: Vec<usize> = data
        .sequences
        .iter()
        .map(|s| if s.len() >= 3 { s.len() - 1 } else { s.len() })
        .collect();
    let popularity = counts(data, &but_test);
    let knn = Neighbours::build(data.items(), prefixes(data, &but_test), cfg.neighbours);

    let trained = train_from(
        data,
        &split.train_len,
        &counts(data, &split.train_len),
        &split.valid,
        cfg,
        progress,
        warm,
    )?;
    let mut rng = rand::SeedableRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let valid = sample_cases(&split.valid, cfg.validation_cases, &mut rng);
    let knn_weight = match (&trained, warm) {
        // A continued training keeps the served model's blend, as it keeps
        // its shape.
        (Some(_), Some(warm)) => warm.knn_weight,
        (Some(t), None) if !valid.is_empty() => {
            let knn_train = Neighbours::build(data.items(), prefixes(data, &split.train_len), cfg.neighbours);
            choose_knn_weight(data, &t.weights, &knn_train, &valid, cfg)
        }
        _ => 0.0,
    };
    let train_seconds = started.elapsed().as_secs_f64();
    let epochs = trained.as_ref().map_or(0, |t| t.epochs);
    let batches = trained.as_ref().map_or(0, |t| t.batches);
    let network = trained.map(|t| t.weights);

    let meta = SnapshotMeta {
        version: chrono::Utc::now().format("%Y%m%d%H%M%S%3f").to_string(),
        trained_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        cutoff_ms: data.newest_ms,
        events: data.events as u64,
        users: data.users() as u64,
        items: data.items() as u64,
        metrics: ModelMetrics::default(),
        knn_weight,
        scratch_at_ms: 0,
        continued_from: None,
        churn: None,
        kind: if network.is_some() {
            SnapshotKind::Network
        } else {
            SnapshotKind::Popular
        },
        last_seq: 0,
    };
    let mut snapshot = ModelSnapshot::new(meta, data.item_ids.clone(), network, popularity, knn);
    let max_len = cfg.max_len;
    // The whole catalogue is ranked for a fixed, seeded sample of the test
    // users: the cost of evaluation stays bounded as the shop grows.
    let test = sample_cases(
        &split.test,
        cfg.test_cases,
        &mut rand::SeedableRng::seed_from_u64(cfg.seed ^ 0x7e57),
    );
    let model = metrics::evaluate(data, &test, cfg.seed, |history, scores| {
        let state = snapshot.user_state(history, max_len);
        snapshot.score_user(history, state.as_ref(), scores);
    });
    let popular = metrics::evaluate(data, &test, cfg.seed, |_, scores| {
        scores.clone_from(&snapshot.popularity);
    });
    let item_knn = metrics::evaluate(data, &test, cfg.seed, |history, scores| {
        scores.clear();
        scores.resize(data.items() + 1, 0.0);
        snapshot.neighbours.add_scores(history, 1.0, scores);
    });
    if let Some(w) = &snapshot.weights {
        let alone = metrics::evaluate(data, &test, cfg.seed, blended(w, &snapshot.neighbours, 0.0, max_len));
        tracing::info!(
            knn_weight,
            network_alone_ndcg = alone.ndcg,
            network_alone_hr = alone.hr,
            "network alone on test"
        );
    }
    let report = EvalReport {
        data: DataSummary {
            users: data.users() as u64,
            items: data.items() as u64,
            events: data.events as u64,
            test_users: test.len() as u64,
        },
        train_seconds,
        epochs,
        batches,
        model,
        popular,
        item_knn,
    };
    snapshot.meta.metrics = ModelMetrics {
        model: report.model,
        popular: report.popular,
        item_knn: report.item_knn,
        test_users: report.data.test_users,
    };
    Ok((snapshot, report))
}

/// `recd eval`: events in, report out.
pub fn evaluate_events(
    rows: Vec<EventRow>,
    categories: &HashMap<String, String>,
    cfg: &TrainConfig,
    progress: bool,
) -> anyhow::Result<EvalReport> {
    let mut data = Dataset::from_events(rows);
    data.set_categories(categories);
    Ok(train_and_evaluate(&data, cfg, progress)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_how_many_batches_and_older_json_still_reads() {
        let report = EvalReport {
            data: DataSummary {
                users: 3,
                items: 4,
                events: 5,
                test_users: 1,
            },
            train_seconds: 1.5,
            epochs: 2,
            batches: 17,
            model: Metrics::default(),
            popular: Metrics::default(),
            item_knn: Metrics::default(),
        };
        assert!(report
            .table()
            .starts_with("3 users, 4 items, 5 events, 1 test users; trained 1.5s, 2 epochs, 17 batches\n"));
        // `recd eval --json` output from before the field.
        let mut old = serde_json::to_value(&report).unwrap();
        old.as_object_mut().unwrap().remove("batches");
        let read: EvalReport = serde_json::from_value(old).unwrap();
        assert_eq!(read.batches, 0);
    }
}
