//! The training loop: batches of similar length, AdamW, dropout, early
//! stopping on validation NDCG over the whole ranking (no cutoff), all seeded.

use std::time::{Duration, Instant};

use candle_nn::ParamsAdamW;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::data::{sample_cases, Case, Dataset, Step};
use super::metrics;
use super::net::{Batch, Dropouts, Network, Sampler};
use super::optim::AdamW;
use super::snapshot::Weights;

/// Every knob of a training; `recd eval --config` and the service's
/// `[train]` settings fill it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Embedding size d.
    pub dim: usize,
    /// LSTM state size.
    pub hidden: usize,
    /// The newest L events of a user form one sequence; longer histories
    /// are cut into several.
    pub max_len: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub embedding_dropout: f32,
    pub hidden_dropout: f32,
    pub max_epochs: usize,
    /// Epochs without a better validation NDCG (whole ranking) before stopping.
    pub patience: usize,
    /// Training stops after this long even without converging (seconds).
    pub max_train_seconds: f64,
    /// Full softmax up to this many items; sampled softmax past it.
    pub full_softmax_max_items: usize,
    pub negatives: usize,
    /// Negatives are drawn by popularity^alpha.
    pub negative_alpha: f64,
    /// Validation cases per epoch (a seeded sample when there are more).
    pub validation_cases: usize,
    /// Test cases the model and the baselines are ranked on (a seeded
    /// sample of the test users when there are more), and at most as many
    /// newer cases for the gate.
    pub test_cases: usize,
    /// A training from the store reads the events of at most this many
    /// days back from the newest event (`0`: no bound by time)...
    pub window_days: f64,
    /// ...and at most about this many of the newest events (`0`: no bound
    /// by count). `recd eval` reads its whole file.
    pub window_events: u64,
    /// A training continued from the served model learns from the windows
    /// with new events and this many older windows per new one.
    pub replay: f64,
    /// The learning rate of a training continued from the served model
    /// (`0`: `learning_rate`).
    pub continued_learning_rate: f64,
    /// Learn to predict items the user already touched.
    pub train_on_repeats: bool,
    /// Learn a category embedding added to each item's, where the catalogue
    /// gives items categories (each item's first).
    pub categories: bool,
    /// Co-occurrence neighbours kept per item.
    pub neighbours: usize,
    pub seed: u64,
    /// Churn prediction: no event within this many days after a cutoff is
    /// churn (`0`: twice the shop's usual gap between sessions, within 1 to
    /// 90 days and at most a third of the window's span).
    pub churn_horizon_days: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dim: 64,
            hidden: 64,
            max_len: 50,
            batch_size: 128,
            learning_rate: 2e-3,
            weight_decay: 0.0,
            embedding_dropout: 0.3,
            hidden_dropout: 0.1,
            max_epochs: 60,
            patience: 4,
            max_train_seconds: 240.0,
            full_softmax_max_items: 10_000,
            negatives: 2048,
            negative_alpha: 0.5,
            validation_cases: 5_000,
            test_cases: 20_000,
            window_days: 365.0,
            window_events: 1_000_000,
            replay: 2.0,
            continued_learning_rate: 5e-4,
            train_on_repeats: false,
            categories: true,
            neighbours: 100,
            seed: 42,
            churn_horizon_days: 0.0,
        }
    }
}

impl TrainConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=1024).contains(&self.dim), "dim must be 1..=1024");
        anyhow::ensure!((1..=1024).contains(&self.hidden), "hidden must be 1..=1024");
        anyhow::ensure!(self.max_len >= 2, "max_len must be at least 2");
        anyhow::ensure!(self.batch_size >= 1, "batch_size must be at least 1");
        anyhow::ensure!(self.max_epochs >= 1, "max_epochs must be at least 1");
        anyhow::ensure!(
            (0.0..1.0).contains(&self.embedding_dropout) && (0.0..1.0).contains(&self.hidden_dropout),
            "dropouts must be in [0, 1)"
        );
        anyhow::ensure!(self.negatives >= 1, "negatives must be at least 1");
        anyhow::ensure!(self.test_cases >= 1, "test_cases must be at least 1");
        anyhow::ensure!(
            self.window_days >= 0.0 && self.window_days.is_finite(),
            "window_days must be 0 (no bound) or more"
        );
        Ok(())
    }
}

/// What a training run produced.
pub struct Trained {
    pub weights: Weights,
    pub epochs: usize,
    /// Optimizer steps taken, over all epochs.
    pub batches: usize,
    pub best_validation_ndcg_full: f64,
    pub seconds: f64,
}

/// Training sequences: each user's training part cut into windows of at
/// most `max_len` + 1 events from the newest back (consecutive windows share
/// one event, so every transition is learned once).
pub fn windows<'a>(data: &'a Dataset, train_len: &[usize], max_len: usize) -> Vec<&'a [Step]> {
    let mut out = Vec::new();
    for_each_window(data, train_len, max_len, |_, _, window| out.push(window));
    out
}

/// Each training window with its user and where it ends in their sequence.
fn for_each_window<'a>(
    data: &'a Dataset,
    train_len: &[usize],
    max_len: usize,
    mut f: impl FnMut(usize, usize, &'a [Step]),
) {
    for (user, (seq, &n)) in data.sequences.iter().zip(train_len).enumerate() {
        let mut end = n;
        while end >= 2 {
            let start = end.saturating_sub(max_len + 1);
            f(user, end, &seq[start..end]);
            if start == 0 {
                break;
            }
            end = start + 1;
        }
    }
}

/// A training continued from a served model's weights.
pub struct WarmStart<'a> {
    pub weights: &'a Weights,
    /// Per dense item index of the data, its row in `weights` (`None`: an
    /// item the served model does not know).
    pub rows: Vec<Option<u32>>,
    /// Windows of events the served model learned from, replayed per window
    /// with a new event (1.0: as many old as new).
    pub replay: f64,
    /// The served model's blend weight of co-occurrence, kept.
    pub knn_weight: f32,
}

/// A continued training's windows: every one that holds a transition the
/// served model did not learn (an event newer than its data,
/// `Dataset::fresh_from`, or one it held out), and a seeded sample of the
/// others, `replay` of them per new one.
fn continued_windows<'a>(
    data: &'a Dataset,
    train_len: &[usize],
    max_len: usize,
    replay: f64,
    rng: &mut StdRng,
) -> Vec<&'a [Step]> {
    let (mut new, mut old) = (Vec::new(), Vec::new());
    for_each_window(data, train_len, max_len, |user, end, window| {
        // The served model's training held out each user's last two events
        // (when they had three or more): with newer events those become
        // training targets too, so a window that holds one is new.
        let from = data.fresh_from.get(user).copied().unwrap_or(0);
        let learned = if from >= 3 { from - 2 } else { from };
        if end > learned {
            new.push(window);
        } else {
            old.push(window);
        }
    });
    if new.is_empty() {
        // Nothing new: every window, from the served weights.
        return old;
    }
    old.shuffle(rng);
    old.truncate((new.len() as f64 * replay.max(0.0)).round() as usize);
    new.extend(old);
    new
}

fn bar(len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} batches ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Trains the network on the windows, stopping early on `validate`'s
/// NDCG over the whole ranking (higher is better); returns the best epoch's
/// weights, or None when no user has two events to learn a transition from.
/// With `warm`, it continues from a served model's weights, on the windows
/// with new events and a replay sample.
pub fn train_from(
    data: &Dataset,
    train_len: &[usize],
    popularity: &[f32],
    valid: &[Case],
    cfg: &TrainConfig,
    progress: bool,
    warm: Option<&WarmStart<'_>>,
) -> anyhow::Result<Option<Trained>> {
    cfg.check()?;
    let started = Instant::now();
    let budget = Duration::from_secs_f64(cfg.max_train_seconds.max(0.0));
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let categories = (cfg.categories && data.categories > 0).then(|| (&data.item_category[..], data.categories));
    let net = Network::new(data.items(), cfg.dim, cfg.hidden, categories, &mut rng)?;
    let mut opt = AdamW::new(
        net.vars(),
        ParamsAdamW {
            lr: match warm {
                Some(_) if cfg.continued_learning_rate > 0.0 => cfg.continued_learning_rate,
                _ => cfg.learning_rate,
            },
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        },
    );
    let sampled = data.items() > cfg.full_softmax_max_items;
    let sampler = if sampled {
        Some(Sampler::new(popularity, cfg.negative_alpha, cfg.negatives)?)
    } else {
        None
    };
    let drop = Dropouts {
        embedding: cfg.embedding_dropout,
        hidden: cfg.hidden_dropout,
    };
    let mut windows = match warm {
        Some(warm) => {
            net.start_from(warm.weights, &warm.rows)?;
            continued_windows(data, train_len, cfg.max_len, warm.replay, &mut rng)
        }
        None => windows(data, train_len, cfg.max_len),
    };
    if windows.is_empty() {
        return Ok(None);
    }
    let valid = sample_cases(valid, cfg.validation_cases, &mut rng);
    let mut best: Option<(f64, Weights, usize)> = None;
    if warm.is_some() && !valid.is_empty() {
        // The served weights (with the new items' rows) are epoch 0: a
        // continued training that learns nothing better keeps them.
        let weights = net.weights()?;
        let score = validate(data, &weights, &valid, cfg).ndcg_full;
        tracing::info!(validation_ndcg_full = score, "continued from");
        best = Some((score, weights, 0));
    }
    let mut since_best = 0;
    let mut epochs = 0;
    let mut steps = 0;
    let batches_per_epoch = windows.len().div_ceil(cfg.batch_size) as u64;
    for epoch in 1..=cfg.max_epochs {
        // Shuffle, then sort within blocks of 50 batches by length, so a
        // batch pads little and still varies from epoch to epoch.
        windows.shuffle(&mut rng);
        for block in windows.chunks_mut(cfg.batch_size * 50) {
            block.sort_by_key(|w| w.len());
        }
        let mut batches: Vec<&[&[Step]]> = windows.chunks(cfg.batch_size).collect();
        batches.shuffle(&mut rng);
        let progress_bar = bar(batches_per_epoch, progress);
        progress_bar.set_message(format!("epoch {epoch}"));
        let mut loss_sum = 0.0;
        let mut out_of_time = false;
        let mut stepped = 0;
        for seqs in &batches {
            // The time limit holds within an epoch too: a long epoch on a
            // large window stops where the budget ends.
            if started.elapsed() > budget {
                out_of_time = true;
                break;
            }
            let batch = Batch::new(seqs, cfg.train_on_repeats);
            if batch.targets.is_empty() {
                progress_bar.inc(1);
                continue;
            }
            let loss = match &sampler {
                Some(s) => net.sampled_loss(&batch, &drop, s, &mut rng)?,
                None => net.full_loss(&batch, &drop, &mut rng)?,
            };
            opt.backward_step(&loss)?;
            stepped += 1;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            progress_bar.inc(1);
        }
        progress_bar.finish_and_clear();
        epochs = epoch;
        steps += stepped;
        let weights = net.weights()?;
        let m = if valid.is_empty() {
            metrics::Metrics::default()
        } else {
            validate(data, &weights, &valid, cfg)
        };
        // Selection by whole-ranking NDCG: on sparse data (a few hits in the
        // top 10 among thousands of cases) NDCG@10 is mostly noise, the
        // whole ranking still moves.
        let score = m.ndcg_full;
        tracing::info!(
            epoch,
            loss = loss_sum / stepped.max(1) as f64,
            batches = stepped,
            validation_ndcg = m.ndcg,
            validation_ndcg_full = score,
            seconds = started.elapsed().as_secs_f64(),
            "epoch"
        );
        // A tie goes to the later epoch, which fits the training data better.
        let better = best.as_ref().is_none_or(|(b, _, _)| score >= *b);
        let improved = best.as_ref().is_none_or(|(b, _, _)| score > *b);
        if better {
            best = Some((score, weights, epoch));
        }
        since_best = if improved { 0 } else { since_best + 1 };
        if out_of_time || since_best >= cfg.patience || started.elapsed() > budget {
            break;
        }
    }
    let (best_validation_ndcg_full, weights, _) = best.expect("at least one epoch ran");
    Ok(Some(Trained {
        weights,
        epochs,
        batches: steps,
        best_validation_ndcg_full,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// The network alone on validation cases.
fn validate(data: &Dataset, weights: &Weights, valid: &[Case], cfg: &TrainConfig) -> metrics::Metrics {
    metrics::evaluate(data, valid, cfg.seed, |history, scores| {
        weights.score_history(history, cfg.max_len, scores)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventRow;
    use crate::model::data::DatasetBuilder;

    fn row(user: &str, item: usize, ts: i64) -> EventRow {
        EventRow {
            user_id: user.into(),
            item_id: format!("i{item}"),
            kind: 0,
            timestamp_ms: ts,
        }
    }

    /// A shopper with one event newer than the served model: the items the
    /// served model held out for them (their last two then) are now
    /// training targets, so their window is new. A shopper with nothing
    /// new has no new window.
    #[test]
    fn a_window_with_a_once_held_out_event_is_new() {
        let mut builder = DatasetBuilder::fresh_after(100);
        for (user, n) in [("a", 5), ("b", 5)] {
            for i in 0..n {
                builder.push(row(user, i, i as i64));
            }
        }
        builder.push(row("a", 9, 200));
        let data = builder.finish();
        assert_eq!(data.fresh_from, [5, 5]);
        // The split of the new data: each user's last two held out.
        let train_len = [4, 3];
        let mut rng = StdRng::seed_from_u64(1);
        let new = continued_windows(&data, &train_len, 50, 0.0, &mut rng);
        assert_eq!(new, [&data.sequences[0][..4]]);
        let all = continued_windows(&data, &train_len, 50, 1.0, &mut rng);
        assert_eq!(all.len(), 2);
    }
}
