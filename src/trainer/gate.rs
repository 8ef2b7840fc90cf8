//! The gate: a candidate replaces the served model only when it is not
//! worse on events the served model has not seen. With too few of those
//! (or no served model) it must do at least as well as the baselines on
//! its own holdout: most-popular always, item-kNN once a model is served
//! (the first model of a shop may only match popularity).

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::Candidate;
use crate::model::data::{sample_cases, Case};
use crate::model::{self, ModelSnapshot, Split, TrainConfig};

/// The gate's settings.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// NDCG@10 the candidate must add over what it is compared with.
    pub margin: f64,
    /// Held-out cases newer than the served model needed to compare the two.
    pub min_cases: usize,
}

/// The gate's decision, and why, in words for logs and `GET /v1/model`.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Accept(String),
    Reject(String),
}

impl Gate {
    /// Judges a candidate: against the served model on the held-out
    /// cases of users active after it was trained, when there are
    /// `min_cases` of them; else against the baselines.
    pub fn judge(&self, candidate: &Candidate, served: Option<&ModelSnapshot>, config: &TrainConfig) -> Verdict {
        if let Some(served) = served {
            let newer = newer_cases(candidate, served, config);
            if newer.len() >= self.min_cases {
                let (cand, old) = head_to_head(candidate, served, &newer, config);
                return self.against_served(cand, old, newer.len());
            }
        }
        let report = &candidate.report;
        let item_knn = served.is_some().then_some(report.item_knn.ndcg);
        self.against_baselines(report.model.ndcg, report.popular.ndcg, item_knn)
    }

    /// Candidate and served model's NDCG@10 on the same newer cases.
    pub fn against_served(&self, candidate: f64, served: f64, cases: usize) -> Verdict {
        let m = self.margin;
        if candidate >= served + m {
            Verdict::Accept(format!(
                "NDCG@10 {candidate:.4} against the served model's {served:.4} on {cases} users' newer events"
            ))
        } else {
            Verdict::Reject(format!(
                "NDCG@10 {candidate:.4} does not reach the served model's {served:.4} (+{m}) on {cases} users' newer events"
            ))
        }
    }

    /// The candidate's holdout NDCG@10 against most-popular's and, when
    /// given, item-kNN's.
    pub fn against_baselines(&self, model: f64, popular: f64, item_knn: Option<f64>) -> Verdict {
        let m = self.margin;
        let mut baselines = vec![("most-popular", popular)];
        if let Some(knn) = item_knn {
            baselines.push(("item-kNN", knn));
        }
        let against = baselines
            .iter()
            .map(|(name, ndcg)| format!("{name} {ndcg:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        if baselines.iter().all(|(_, ndcg)| model >= ndcg + m) {
            Verdict::Accept(format!("holdout NDCG@10 {model:.4} against {against}"))
        } else {
            Verdict::Reject(format!(
                "holdout NDCG@10 {model:.4} does not reach the baselines' (+{m}): {against}"
            ))
        }
    }
}

/// The held-out cases of users whose newest event is newer than the served
/// model's data: at most `test_cases` of them, a seeded sample.
fn newer_cases(candidate: &Candidate, served: &ModelSnapshot, config: &TrainConfig) -> Vec<Case> {
    let data = &candidate.data;
    let newer: Vec<Case> = Split::leave_one_out(data)
        .test
        .into_iter()
        .filter(|c| {
            let user = &data.user_ids[c.user as usize];
            candidate.last_ts.get(user).copied().unwrap_or(0) > served.meta.cutoff_ms
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x6a7e);
    sample_cases(&newer, config.test_cases, &mut rng)
}

/// NDCG@10 of the candidate and of the served model on `cases`. The served
/// model knows items by its own indexes: histories are mapped to them, and
/// items it does not know score lowest.
fn head_to_head(candidate: &Candidate, served: &ModelSnapshot, newer: &[Case], config: &TrainConfig) -> (f64, f64) {
    let data = &candidate.data;
    let max_len = config.max_len;
    let snapshot = &candidate.snapshot;
    let cand = model::metrics::evaluate(data, newer, config.seed, |history, scores| {
        let state = snapshot.user_state(history, max_len);
        snapshot.score_user(history, state.as_ref(), scores);
    });
    let to_served: Vec<Option<u32>> = std::iter::once(None)
        .chain(data.item_ids.iter().map(|id| served.item_index(id)))
        .collect();
    let old = model::metrics::evaluate(data, newer, config.seed, |history, scores| {
        let mapped: Vec<model::Step> = history
            .iter()
            .filter_map(|s| to_served[s.item as usize].map(|item| model::Step { item, kind: s.kind }))
            .collect();
        let mut theirs = Vec::new();
        let state = served.user_state(&mapped, max_len);
        served.score_user(&mapped, state.as_ref(), &mut theirs);
        scores.clear();
        scores.extend(
            to_served
                .iter()
                .map(|i| i.map_or(f32::NEG_INFINITY, |i| theirs[i as usize])),
        );
    });
    (cand.ndcg, old.ndcg)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::domain::EventRow;
    use crate::model::eval::DataSummary;
    use crate::model::snapshot::testing::snapshot;
    use crate::model::{Dataset, EvalReport, Metrics};

    const PAIRS: usize = 10;

    fn gate(margin: f64, min_cases: usize) -> Gate {
        Gate { margin, min_cases }
    }

    fn ndcg(value: f64) -> Metrics {
        Metrics {
            ndcg: value,
            ..Metrics::default()
        }
    }

    /// Items i1..i20 in pairs (i1, i2), (i3, i4), ...; user k views
    /// i(2k+1) then i(2k+2) then... holds out i(2k+2): whoever knows the
    /// pairs ranks the target first.
    fn candidate(knows_pairs: bool, holdout: (f64, f64, f64)) -> Candidate {
        let items = 2 * PAIRS;
        let mut rows: Vec<EventRow> = (1..=items)
            .map(|i| EventRow {
                user_id: "catalogue".into(),
                item_id: format!("i{i}"),
                kind: 0,
                timestamp_ms: 0,
            })
            .collect();
        for k in 0..PAIRS as u32 {
            for (t, item) in [(1, 2 * ((k + 5) % PAIRS as u32) + 1), (2, 2 * k + 1), (3, 2 * k + 2)] {
                rows.push(EventRow {
                    user_id: format!("u{k}"),
                    item_id: format!("i{item}"),
                    kind: 0,
                    timestamp_ms: t * 1000,
                });
            }
        }
        let last_ts: HashMap<String, i64> = rows.iter().map(|r| (r.user_id.clone(), r.timestamp_ms)).collect();
        let data = Dataset::from_events(rows);
        let pairs: Vec<(u32, u32)> = (0..PAIRS as u32).map(|k| (2 * k + 1, 2 * k + 2)).collect();
        let snapshot = snapshot(items, false, if knows_pairs { &pairs } else { &[] }, 1);
        let (model, popular, item_knn) = holdout;
        Candidate {
            snapshot,
            report: EvalReport {
                data: DataSummary {
                    users: 0,
                    items: 0,
                    events: 0,
                    test_users: 0,
                },
                train_seconds: 0.0,
                epochs: 0,
                batches: 0,
                model: ndcg(model),
                popular: ndcg(popular),
                item_knn: ndcg(item_knn),
            },
            data,
            last_ts,
        }
    }

    fn config() -> TrainConfig {
        TrainConfig::default()
    }

    fn accepted(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Accept(_))
    }

    #[test]
    fn against_the_served_model_the_margin_decides() {
        let g = gate(0.01, 1);
        assert!(accepted(&g.against_served(0.215, 0.20, 50)));
        assert!(accepted(&g.against_served(0.30, 0.20, 50)));
        let Verdict::Reject(why) = g.against_served(0.205, 0.20, 50) else {
            panic!("a candidate within the margin is rejected");
        };
        assert!(why.contains("0.2050") && why.contains("50 users"), "{why}");
    }

    #[test]
    fn against_the_baselines_each_must_be_beaten() {
        let g = gate(0.0, 1);
        assert!(accepted(&g.against_baselines(0.10, 0.05, None)));
        assert!(accepted(&g.against_baselines(0.10, 0.05, Some(0.10))));
        assert!(!accepted(&g.against_baselines(0.10, 0.05, Some(0.11))));
        assert!(!accepted(&g.against_baselines(0.04, 0.05, None)));
        let Verdict::Reject(why) = gate(0.02, 1).against_baselines(0.06, 0.05, None) else {
            panic!("the margin applies to the baselines too");
        };
        assert!(why.contains("most-popular 0.0500"), "{why}");
    }

    #[test]
    fn the_first_model_need_only_beat_popularity() {
        // Below item-kNN, above most-popular: enough with nothing served.
        let cand = candidate(true, (0.10, 0.05, 0.20));
        assert!(accepted(&gate(0.0, 1).judge(&cand, None, &config())));
        let cand = candidate(true, (0.04, 0.05, 0.01));
        assert!(!accepted(&gate(0.0, 1).judge(&cand, None, &config())));
    }

    #[test]
    fn a_better_candidate_replaces_the_served_model_on_newer_events() {
        let served = snapshot(2 * PAIRS, false, &[], 2);
        // The holdout figures would reject it: the head-to-head decides.
        let better = candidate(true, (0.0, 1.0, 1.0));
        let Verdict::Accept(why) = gate(0.01, PAIRS).judge(&better, Some(&served), &config()) else {
            panic!("the candidate that knows the pairs wins");
        };
        assert!(why.contains(&format!("on {PAIRS} users' newer events")), "{why}");
        let knowing = snapshot(
            2 * PAIRS,
            false,
            &(0..PAIRS as u32).map(|k| (2 * k + 1, 2 * k + 2)).collect::<Vec<_>>(),
            3,
        );
        let worse = candidate(false, (1.0, 0.0, 0.0));
        assert!(!accepted(&gate(0.0, PAIRS).judge(&worse, Some(&knowing), &config())));
    }

    #[test]
    fn too_few_newer_events_fall_back_to_both_baselines() {
        let served = snapshot(2 * PAIRS, false, &[], 2);
        // Above most-popular, below item-kNN: rejected once a model is served.
        let cand = candidate(true, (0.10, 0.05, 0.20));
        let Verdict::Reject(why) = gate(0.0, PAIRS + 1).judge(&cand, Some(&served), &config()) else {
            panic!("item-kNN counts once a model is served");
        };
        assert!(why.contains("item-kNN 0.2000"), "{why}");
        // Users whose events the served model saw are not newer.
        let mut seen = snapshot(2 * PAIRS, false, &[], 2);
        seen.meta.cutoff_ms = 10_000;
        let cand = candidate(true, (0.30, 0.05, 0.20));
        let Verdict::Accept(why) = gate(0.0, 1).judge(&cand, Some(&seen), &config()) else {
            panic!("the holdout decides");
        };
        assert!(why.starts_with("holdout"), "{why}");
    }
}
