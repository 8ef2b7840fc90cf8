//! Churn prediction, measured. A shopper has churned at a cutoff when they
//! have no event in the `horizon` after it. Each training fits a logistic
//! regression on features of every shopper's history before one cutoff
//! (labelled by the horizon after it) and measures it on the next cutoff
//! (a time split: fitted at `newest − 2·horizon`, tested at `newest −
//! horizon`), beside today's formula ([`crate::profile::churn_risk`]) and
//! recency alone. Profiles and the segment lists take their churn risk from
//! the classifier when it beat the formula's holdout ROC AUC, else from the
//! formula ([`ChurnReport::serving_model`]).
//!
//! The features are made from a user's [`Measures`] only, so the profile
//! (from the user's events) and the segment lists (from the store's per-user
//! aggregate) score alike, through `crate::profile::score`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{EventType, UserEvent};
use crate::ingest::parse_timestamp;
use crate::profile::{churn_risk, measures, median, usual_gap_from_median, Measures, DAY_MS, MIN_USUAL_GAP_MS};

/// The automatic horizon is twice the shop's usual gap between sessions,
/// within these bounds (days), and at most a third of the events' span.
pub const MIN_AUTO_HORIZON_DAYS: f64 = 1.0;
pub const MAX_AUTO_HORIZON_DAYS: f64 = 90.0;
/// At most this many users are fitted and tested at each cutoff (an even
/// sample by id when more).
pub const MAX_USERS: usize = 100_000;
/// Fewer users than this at either cutoff (or no user of either class): no
/// classifier.
pub const MIN_USERS: usize = 20;
/// The L2 penalty on the standardised weights (not the intercept).
const L2: f64 = 1.0;
const NEWTON_STEPS: usize = 50;
/// Standardised features are clipped to this many standard deviations.
const CLIP: f64 = 5.0;

/// The features' names, in the order of [`features`].
pub const FEATURES: [&str; 23] = [
    "log_recency_days",
    "log_tenure_days",
    "log_active_days",
    "log_sessions",
    "log_events",
    "log_events_per_session",
    "log_purchases",
    "log_spend",
    "log_usual_gap_days",
    "log_recency_over_usual_gap",
    "has_own_gap",
    "log_last_gap_over_usual_gap",
    "log_mean_gap_over_usual_gap",
    "log_last_gap_days",
    "log_sessions_per_tenure_day",
    "share_view",
    "share_click",
    "share_like",
    "share_add_to_cart",
    "share_remove_from_cart",
    "share_purchase",
    "share_rating",
    "formula_risk",
];

/// A user's features at `as_of_ms` from their measures and the shop's usual
/// gap (the same fallbacks as the profile's churn figures).
pub fn features(m: &Measures, shop_usual_gap_ms: Option<f64>, as_of_ms: i64) -> [f64; FEATURES.len()] {
    let as_of_ms = as_of_ms.max(m.last_ms);
    let days = |ms: f64| ms.max(0.0) / DAY_MS;
    let recency_ms = (as_of_ms - m.last_ms) as f64;
    let tenure_days = days((as_of_ms - m.first_ms) as f64);
    let (usual_ms, _) = usual_gap_from_median(m.median_gap_ms, shop_usual_gap_ms);
    let sessions = m.sessions.max(1) as f64;
    let events = m.events.max(1) as f64;
    let ratio = |gap: Option<f64>| gap.map_or(0.0, |g| ((g + MIN_USUAL_GAP_MS) / (usual_ms + MIN_USUAL_GAP_MS)).ln());
    let share = |kind: EventType| m.by_type[kind as usize] as f64 / events;
    [
        days(recency_ms).ln_1p(),
        tenure_days.ln_1p(),
        days((m.last_ms - m.first_ms) as f64).ln_1p(),
        sessions.ln_1p(),
        events.ln_1p(),
        (events / sessions).ln_1p(),
        (m.by_type[EventType::Purchase as usize] as f64).ln_1p(),
        m.spend.max(0.0).ln_1p(),
        days(usual_ms).ln_1p(),
        (recency_ms / usual_ms).ln_1p(),
        f64::from(u8::from(m.median_gap_ms.is_some())),
        ratio(m.last_gap_ms),
        ratio(m.mean_gap_ms),
        days(m.last_gap_ms.unwrap_or(0.0)).ln_1p(),
        (sessions / tenure_days.max(1.0)).ln_1p(),
        share(EventType::View),
        share(EventType::Click),
        share(EventType::Like),
        share(EventType::AddToCart),
        share(EventType::RemoveFromCart),
        share(EventType::Purchase),
        share(EventType::Rating),
        churn_risk(recency_ms, usual_ms),
    ]
}

/// A fitted logistic regression: P(churn) = σ(bias + Σ weight·z), z =
/// (x − mean)/scale clipped to ±5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnModel {
    /// The names of the features it was fitted on ([`FEATURES`]); a model
    /// fitted on others is not used.
    pub features: Vec<String>,
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl ChurnModel {
    /// The churn probability of a user with features `x`.
    pub fn risk(&self, x: &[f64]) -> f64 {
        let z = self.bias
            + x.iter()
                .zip(&self.mean)
                .zip(&self.scale)
                .zip(&self.weights)
                .map(|(((x, mean), scale), w)| w * standardise(*x, *mean, *scale))
                .sum::<f64>();
        let p = sigmoid(z);
        if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.5
        }
    }

    /// Whether it was fitted on this build's features.
    pub fn fits_features(&self) -> bool {
        self.features.iter().map(String::as_str).eq(FEATURES)
            && [self.mean.len(), self.scale.len(), self.weights.len()] == [FEATURES.len(); 3]
    }

    /// Fits on standardised `xs` by Newton's method with an L2 penalty;
    /// deterministic. `None` without both classes.
    #[allow(clippy::needless_range_loop)] // matrix code reads best by index
    pub fn fit(xs: &[[f64; FEATURES.len()]], ys: &[bool]) -> Option<ChurnModel> {
        const D: usize = FEATURES.len();
        let n = xs.len();
        let positives = ys.iter().filter(|&&y| y).count();
        if n == 0 || positives == 0 || positives == n {
            return None;
        }
        let mut mean = vec![0.0; D];
        for x in xs {
            for (m, v) in mean.iter_mut().zip(x) {
                *m += v / n as f64;
            }
        }
        let mut scale = vec![0.0; D];
        for x in xs {
            for ((s, v), m) in scale.iter_mut().zip(x).zip(&mean) {
                *s += (v - m) * (v - m) / n as f64;
            }
        }
        for s in &mut scale {
            *s = if *s > 1e-12 { s.sqrt() } else { 1.0 };
        }
        let z: Vec<[f64; D]> = xs
            .iter()
            .map(|x| std::array::from_fn(|j| standardise(x[j], mean[j], scale[j])))
            .collect();
        // theta = [bias, weights...]
        let mut theta = vec![0.0; D + 1];
        let rate = positives as f64 / n as f64;
        theta[0] = (rate / (1.0 - rate)).ln();
        // The penalised log loss, to keep each Newton step only if it
        // lowers it (halving it until it does).
        let loss = |theta: &[f64]| -> f64 {
            let data: f64 = z
                .iter()
                .zip(ys)
                .map(|(row, &y)| {
                    let t = theta[0] + row.iter().zip(&theta[1..]).map(|(a, b)| a * b).sum::<f64>();
                    // log(1 + e^t) − y·t, computed without overflow.
                    let softplus = if t > 0.0 {
                        t + (-t).exp().ln_1p()
                    } else {
                        t.exp().ln_1p()
                    };
                    softplus - if y { t } else { 0.0 }
                })
                .sum();
            data + L2 / 2.0 * theta[1..].iter().map(|w| w * w).sum::<f64>()
        };
        let mut current = loss(&theta);
        for _ in 0..NEWTON_STEPS {
            let mut grad = vec![0.0; D + 1];
            let mut hess = vec![vec![0.0; D + 1]; D + 1];
            for (row, &y) in z.iter().zip(ys) {
                let p = sigmoid(theta[0] + row.iter().zip(&theta[1..]).map(|(a, b)| a * b).sum::<f64>());
                let r = p - f64::from(u8::from(y));
                let w = (p * (1.0 - p)).max(1e-12);
                let v = |j: usize| if j == 0 { 1.0 } else { row[j - 1] };
                for j in 0..=D {
                    grad[j] += r * v(j);
                    for k in 0..=j {
                        hess[j][k] += w * v(j) * v(k);
                    }
                }
            }
            for j in 1..=D {
                grad[j] += L2 * theta[j];
                hess[j][j] += L2;
            }
            for j in 0..=D {
                for k in 0..j {
                    hess[k][j] = hess[j][k];
                }
            }
            let step = solve(hess, grad)?;
            let mut rate = 1.0;
            let mut moved = false;
            for _ in 0..30 {
                let next: Vec<f64> = theta.iter().zip(&step).map(|(t, s)| t - rate * s).collect();
                let next_loss = loss(&next);
                if next_loss <= current {
                    let change = step.iter().map(|s| (rate * s).abs()).fold(0.0, f64::max);
                    theta = next;
                    moved = change >= 1e-8 && current - next_loss > 1e-12;
                    current = next_loss;
                    break;
                }
                rate /= 2.0;
            }
            if !moved {
                break;
            }
        }
        theta.iter().all(|t| t.is_finite()).then(|| ChurnModel {
            features: FEATURES.iter().map(|&f| f.to_owned()).collect(),
            mean,
            scale,
            weights: theta[1..].to_vec(),
            bias: theta[0],
        })
    }
}

/// A feature in standard deviations from its mean, within ±[`CLIP`]: a
/// feature (nearly) constant among the fitted users must not make a user
/// unlike them all score 0 or 1.
fn standardise(x: f64, mean: f64, scale: f64) -> f64 {
    ((x - mean) / scale).clamp(-CLIP, CLIP)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Solves `a · x = b` (a symmetric positive definite) by Gaussian
/// elimination with partial pivoting; `None` when singular.
#[allow(clippy::needless_range_loop)] // matrix code reads best by index
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            if f != 0.0 {
                for k in col..n {
                    a[row][k] -= f * a[col][k];
                }
                b[row] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let sum: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - sum) / a[row][row];
    }
    Some(x)
}

/// Area under the ROC curve of `scores` (higher: more likely positive) for
/// `labels`: the chance a random positive scores above a random negative,
/// ties counting half. `None` without both classes.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&y| y).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' ranks (1-based, ties given their mean rank).
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mean_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Average precision (the area under the precision-recall curve): over the
/// thresholds at each distinct score, highest first, the precision at that
/// threshold weighted by the recall it adds. `None` without positives.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&y| y).count();
    if positives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut seen, mut hits, mut ap) = (0usize, 0usize, 0.0);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let new_hits = order[i..=j].iter().filter(|&&k| labels[k]).count();
        seen += j + 1 - i;
        hits += new_hits;
        ap += (hits as f64 / seen as f64) * (new_hits as f64 / positives as f64);
        i = j + 1;
    }
    Some(ap)
}

/// Where profiles take their churn risk from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChurnMethod {
    /// The logistic regression of the served model's training.
    Classifier,
    /// 1 − 2^(−days since last / (2 × usual gap)).
    Formula,
}

/// One method's holdout figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MethodFigures {
    pub roc_auc: f64,
    /// Average precision.
    pub pr_auc: f64,
}

/// The holdout figures of each method on the same users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChurnMethods {
    pub classifier: MethodFigures,
    pub formula: MethodFigures,
    pub recency: MethodFigures,
}

/// Users at each cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChurnUsers {
    pub train: u64,
    pub test: u64,
}

/// What a training measured of churn prediction, and the classifier it
/// fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnReport {
    /// No event within this many days after a cutoff is churn.
    pub horizon_days: f64,
    /// Whether the horizon was derived from the shop's usual gap (`auto`)
    /// or set (`train.churn_horizon_days`).
    pub horizon_source: String,
    /// The fitting cutoff and the test cutoff (ms).
    pub train_cutoff_ms: i64,
    pub test_cutoff_ms: i64,
    pub chosen: ChurnMethod,
    pub users: ChurnUsers,
    /// Share of the test users who churned (the PR AUC of a random score).
    pub positives_share: f64,
    pub methods: ChurnMethods,
    pub model: ChurnModel,
}

impl ChurnReport {
    /// The classifier, when it was chosen and fits this build's features.
    pub fn serving_model(&self) -> Option<&ChurnModel> {
        (self.chosen == ChurnMethod::Classifier && self.model.fits_features()).then_some(&self.model)
    }

    /// A plain table for the terminal.
    pub fn table(&self) -> String {
        let mut out = format!(
            "horizon {:.2} days ({}); {} users fitted at {}, {} tested at {}, {:.4} of them churned\n\n",
            self.horizon_days,
            self.horizon_source,
            self.users.train,
            crate::clock::format_timestamp(self.train_cutoff_ms),
            self.users.test,
            crate::clock::format_timestamp(self.test_cutoff_ms),
            self.positives_share,
        );
        out.push_str("method      ROC AUC  PR AUC\n");
        let m = &self.methods;
        for (name, f) in [
            ("classifier", &m.classifier),
            ("formula", &m.formula),
            ("recency", &m.recency),
        ] {
            out.push_str(&format!("{name:<10}  {:>7.4}  {:>6.4}\n", f.roc_auc, f.pr_auc));
        }
        let chosen = match self.chosen {
            ChurnMethod::Classifier => "classifier",
            ChurnMethod::Formula => "formula",
        };
        out.push_str(&format!("\nprofiles use: {chosen}\n"));
        out
    }
}

/// What `GET /v1/model` (`churn`) and `recd eval --churn --json` show of a
/// [`ChurnReport`]: churn prediction on the training's time split, fitted
/// on the users at `newest − 2·horizon`, tested on those at `newest −
/// horizon`; churn is no event within `horizon_days` after the cutoff.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChurnFigures {
    pub horizon_days: f64,
    /// `auto` (from the shop's usual gap) or `setting` (`train.churn_horizon_days`).
    pub horizon_source: String,
    /// What profiles and segments take their churn risk from: `classifier`
    /// when its holdout ROC AUC beat the formula's.
    pub chosen: ChurnMethod,
    pub users: ChurnUsers,
    /// Share of the test users who churned.
    pub positives_share: f64,
    /// `classifier`, `formula` and `recency`: each one's holdout `roc_auc`
    /// and `pr_auc` (average precision).
    pub methods: ChurnMethods,
}

impl From<&ChurnReport> for ChurnFigures {
    fn from(r: &ChurnReport) -> Self {
        ChurnFigures {
            horizon_days: r.horizon_days,
            horizon_source: r.horizon_source.clone(),
            chosen: r.chosen,
            users: r.users,
            positives_share: r.positives_share,
            methods: r.methods.clone(),
        }
    }
}

/// The users at one cutoff: features, label and the two baselines' scores.
struct Examples {
    xs: Vec<[f64; FEATURES.len()]>,
    labels: Vec<bool>,
    formula: Vec<f64>,
    recency: Vec<f64>,
}

/// The shop's usual gap from users' measures: the median of the users' own
/// usual gaps (each at least [`MIN_USUAL_GAP_MS`]), as the shop statistics
/// compute it.
fn shop_usual_gap<'a>(all: impl Iterator<Item = &'a Measures>) -> Option<f64> {
    let gaps: Vec<f64> = all
        .filter_map(|m| m.median_gap_ms)
        .map(|g| g.max(MIN_USUAL_GAP_MS))
        .collect();
    median(&gaps)
}

fn examples(users: &[&[UserEvent]], cutoff: i64, horizon_ms: i64) -> Examples {
    let before: Vec<(Measures, bool)> = users
        .iter()
        .filter_map(|events| {
            let earlier: Vec<UserEvent> = events.iter().filter(|e| e.ts <= cutoff).cloned().collect();
            let m = measures(&earlier)?;
            let came_back = events.iter().any(|e| e.ts > cutoff && e.ts <= cutoff + horizon_ms);
            Some((m, !came_back))
        })
        .collect();
    let shop_gap = shop_usual_gap(before.iter().map(|(m, _)| m));
    let mut out = Examples {
        xs: Vec::with_capacity(before.len()),
        labels: Vec::with_capacity(before.len()),
        formula: Vec::with_capacity(before.len()),
        recency: Vec::with_capacity(before.len()),
    };
    for (m, churned) in &before {
        let x = features(m, shop_gap, cutoff);
        out.formula.push(x[FEATURES.len() - 1]);
        out.recency.push((cutoff - m.last_ms) as f64);
        out.xs.push(x);
        out.labels.push(*churned);
    }
    out
}

/// Fits and measures churn prediction on users' events (each user's in
/// any order), with a horizon of `horizon_days` (`0`: twice the shop's
/// usual gap, see [`MIN_AUTO_HORIZON_DAYS`]). `None` when the events are
/// too few or too short for two cutoffs with both classes.
pub fn evaluate(users: &[Vec<UserEvent>], horizon_days: f64) -> Option<ChurnReport> {
    let mut users: Vec<&[UserEvent]> = users.iter().map(Vec::as_slice).filter(|e| !e.is_empty()).collect();
    if users.len() > MAX_USERS {
        let step = users.len().div_ceil(MAX_USERS);
        users = users.into_iter().step_by(step).collect();
    }
    let newest = users.iter().flat_map(|e| e.iter().map(|e| e.ts)).max()?;
    let oldest = users.iter().flat_map(|e| e.iter().map(|e| e.ts)).min()?;
    let (horizon_ms, source) = if horizon_days > 0.0 {
        ((horizon_days * DAY_MS) as i64, "setting")
    } else {
        let all: Vec<Measures> = users.iter().filter_map(|e| measures(e)).collect();
        let usual = shop_usual_gap(all.iter()).unwrap_or(crate::profile::DEFAULT_USUAL_GAP_MS);
        let days = (2.0 * usual / DAY_MS).clamp(MIN_AUTO_HORIZON_DAYS, MAX_AUTO_HORIZON_DAYS);
        let ms = ((days * DAY_MS) as i64).min((newest - oldest) / 3);
        (ms, "auto")
    };
    if horizon_ms <= 0 {
        return None;
    }
    let (train_cutoff, test_cutoff) = (newest - 2 * horizon_ms, newest - horizon_ms);
    let train = examples(&users, train_cutoff, horizon_ms);
    let test = examples(&users, test_cutoff, horizon_ms);
    if train.xs.len() < MIN_USERS || test.xs.len() < MIN_USERS {
        return None;
    }
    let model = ChurnModel::fit(&train.xs, &train.labels)?;
    let predicted: Vec<f64> = test.xs.iter().map(|x| model.risk(x)).collect();
    let figures = |scores: &[f64]| -> Option<MethodFigures> {
        Some(MethodFigures {
            roc_auc: round4(roc_auc(scores, &test.labels)?),
            pr_auc: round4(average_precision(scores, &test.labels)?),
        })
    };
    let methods = ChurnMethods {
        classifier: figures(&predicted)?,
        formula: figures(&test.formula)?,
        recency: figures(&test.recency)?,
    };
    let chosen = if methods.classifier.roc_auc > methods.formula.roc_auc {
        ChurnMethod::Classifier
    } else {
        ChurnMethod::Formula
    };
    let positives = test.labels.iter().filter(|&&y| y).count();
    Some(ChurnReport {
        horizon_days: round4(horizon_ms as f64 / DAY_MS),
        horizon_source: source.to_owned(),
        train_cutoff_ms: train_cutoff,
        test_cutoff_ms: test_cutoff,
        chosen,
        users: ChurnUsers {
            train: train.xs.len() as u64,
            test: test.xs.len() as u64,
        },
        positives_share: round4(positives as f64 / test.labels.len() as f64),
        methods,
        model,
    })
}

/// Collects events into per-user histories, users in id order.
#[derive(Debug, Default)]
pub struct Histories {
    users: HashMap<String, Vec<UserEvent>>,
}

impl Histories {
    /// One event of `user` (its item is not needed).
    pub fn push(&mut self, user: &str, kind: i16, value: Option<f64>, ts: i64, session_id: Option<String>) {
        let event = UserEvent {
            item_id: String::new(),
            kind,
            value,
            ts,
            session_id,
            seq: 0,
        };
        match self.users.get_mut(user) {
            Some(events) => events.push(event),
            None => {
                self.users.insert(user.to_owned(), vec![event]);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Each user's events, users in id order (so a sample is the same
    /// whatever the read order).
    pub fn into_users(self) -> Vec<Vec<UserEvent>> {
        let mut users: Vec<(String, Vec<UserEvent>)> = self.users.into_iter().collect();
        users.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        users
            .into_iter()
            .map(|(_, mut events)| {
                for (seq, e) in events.iter_mut().enumerate() {
                    e.seq = seq as i64;
                }
                events
            })
            .collect()
    }
}

/// Reads events.csv (`user_id,type,value,timestamp`, other columns
/// ignored) into per-user histories.
pub fn load_histories_csv(path: &Path) -> anyhow::Result<Vec<Vec<UserEvent>>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| column(name).with_context(|| format!("{}: no `{name}` column", path.display()));
    let (user, kind, ts) = (need("user_id")?, need("type")?, need("timestamp")?);
    let (value, session) = (column("value"), column("session_id"));
    let mut histories = Histories::default();
    for (line, record) in reader.records().enumerate() {
        let record = record?;
        let line = line + 2;
        let field = |i: usize| record.get(i).unwrap_or("");
        let kind = EventType::parse(field(kind))
            .with_context(|| format!("{}:{line}: unknown event type {:?}", path.display(), field(kind)))?;
        let ts = parse_timestamp(field(ts)).map_err(|e| anyhow::anyhow!("{}:{line}: {}", path.display(), e.message))?;
        let value = value.map(field).filter(|v| !v.is_empty()).and_then(|v| v.parse().ok());
        let session = session.map(field).filter(|s| !s.is_empty()).map(str::to_owned);
        histories.push(field(user), kind.code(), value, ts, session);
    }
    Ok(histories.into_users())
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_auc_by_hand() {
        // Positives 0.9, 0.4; negatives 0.8, 0.1: of the four pairs, 3 are
        // ordered right (0.9>0.8, 0.9>0.1, 0.4>0.1), 1 wrong.
        let scores = [0.9, 0.8, 0.4, 0.1];
        let labels = [true, false, true, false];
        assert_eq!(roc_auc(&scores, &labels), Some(0.75));
        // A tie between a positive and a negative counts half.
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(roc_auc(&[1.0, 0.0], &[true, false]), Some(1.0));
        assert_eq!(roc_auc(&[0.0, 1.0], &[true, false]), Some(0.0));
        assert_eq!(roc_auc(&[0.3, 0.2], &[true, true]), None);
    }

    #[test]
    fn average_precision_by_hand() {
        // Ranked 0.9 (+), 0.8 (−), 0.4 (+), 0.1 (−): precision 1 at the
        // first positive, 2/3 at the second; AP = (1 + 2/3) / 2.
        let ap = average_precision(&[0.9, 0.8, 0.4, 0.1], &[true, false, true, false]).unwrap();
        assert!((ap - 5.0 / 6.0).abs() < 1e-12, "{ap}");
        // All tied: one threshold, precision = the positives' share.
        let ap = average_precision(&[1.0; 4], &[true, false, false, false]).unwrap();
        assert!((ap - 0.25).abs() < 1e-12);
        assert_eq!(average_precision(&[0.1], &[false]), None);
    }

    #[test]
    fn logistic_regression_finds_a_separating_feature() {
        // Churn iff the purchase share (feature 20) is 0, whatever else.
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for i in 0..200 {
            let mut x = [0.0; FEATURES.len()];
            x[0] = (i % 7) as f64;
            x[20] = if i % 2 == 0 { 0.0 } else { 0.3 + (i % 5) as f64 * 0.1 };
            xs.push(x);
            ys.push(i % 2 == 0);
        }
        let model = ChurnModel::fit(&xs, &ys).unwrap();
        assert!(model.fits_features());
        let scores: Vec<f64> = xs.iter().map(|x| model.risk(x)).collect();
        assert_eq!(roc_auc(&scores, &ys), Some(1.0));
        assert!(model.risk(&xs[0]) > 0.9 && model.risk(&xs[1]) < 0.1);
        assert!(ChurnModel::fit(&xs, &vec![true; xs.len()]).is_none());
    }
}
