//! HR@10 and NDCG@10 over held-out cases, with full ranking (the user's
//! earlier items removed) and with the SASRec paper's 100 sampled negatives.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::data::{Case, Dataset, Step};

pub const K: usize = 10;
const SAMPLED_NEGATIVES: usize = 100;

/// One method's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(rename = "hr@10")]
    pub hr: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg: f64,
    #[serde(rename = "sampled_hr@10")]
    pub sampled_hr: f64,
    #[serde(rename = "sampled_ndcg@10")]
    pub sampled_ndcg: f64,
    /// NDCG over the whole ranking, without a cutoff (1 / log2(rank + 2)):
    /// it moves with every target's rank, not only those in the top 10, so
    /// training selects by it (not reported).
    #[serde(skip)]
    pub ndcg_full: f64,
}

/// The 0-based rank of `target` among the items not in `exclude` (index 0
/// never counts): items scoring higher, and equal-scoring items of lower
/// index, come first. None when the target itself is excluded.
pub fn full_rank(scores: &[f32], target: u32, exclude: &HashSet<u32>) -> Option<usize> {
    if exclude.contains(&target) {
        return None;
    }
    let t = scores[target as usize];
    let mut rank = 0;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        if s > t || (s == t && (i as u32) < target) {
            rank += 1;
        }
    }
    for &e in exclude {
        let s = scores[e as usize];
        if e != 0 && (s > t || (s == t && e < target)) {
            rank -= 1;
        }
    }
    Some(rank)
}

/// The 0-based rank of `target` among itself and `negatives`.
pub fn sampled_rank(scores: &[f32], target: u32, negatives: &[u32]) -> usize {
    let t = scores[target as usize];
    negatives
        .iter()
        .filter(|&&n| {
            let s = scores[n as usize];
            s > t || (s == t && n < target)
        })
        .count()
}

/// NDCG@10 of one case with its single relevant item at `rank`.
pub fn ndcg_at(rank: Option<usize>) -> f64 {
    match rank {
        Some(r) if r < K => 1.0 / ((r + 2) as f64).log2(),
        _ => 0.0,
    }
}

pub fn hit_at(rank: Option<usize>) -> f64 {
    match rank {
        Some(r) if r < K => 1.0,
        _ => 0.0,
    }
}

/// Evaluates a scorer on `cases`. The scorer fills a score per dense index
/// from the user's history; cases are spread over the machine's cores.
/// Negatives for the sampled protocol are drawn per case from `seed`, so
/// every method meets the same ones.
pub fn evaluate<F>(data: &Dataset, cases: &[Case], seed: u64, scorer: F) -> Metrics
where
    F: Fn(&[Step], &mut Vec<f32>) + Sync,
{
    if cases.is_empty() {
        return Metrics::default();
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = cases.len().div_ceil(threads);
    let items = data.items() as u32;
    let sums = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .chunks(chunk)
            .enumerate()
            .map(|(part, cases)| {
                let scorer = &scorer;
                scope.spawn(move || {
                    let mut scores = Vec::new();
                    let mut sums = [0f64; 5];
                    for (i, case) in cases.iter().enumerate() {
                        let seq = &data.sequences[case.user as usize];
                        let history = &seq[..case.prefix as usize];
                        scorer(history, &mut scores);
                        let seen: HashSet<u32> = history.iter().map(|s| s.item).collect();
                        let rank = full_rank(&scores, case.target, &seen);
                        sums[0] += hit_at(rank);
                        sums[1] += ndcg_at(rank);
                        sums[4] += rank.map_or(0.0, |r| 1.0 / ((r + 2) as f64).log2());
                        let touched: HashSet<u32> = seq.iter().map(|s| s.item).collect();
                        let mut rng =
                            StdRng::seed_from_u64(seed ^ ((part * chunk + i) as u64).wrapping_mul(0x9E37_79B9));
                        let mut negatives = Vec::with_capacity(SAMPLED_NEGATIVES);
                        if (touched.len() as u32) < items {
                            while negatives.len() < SAMPLED_NEGATIVES {
                                let n = rng.gen_range(1..=items);
                                if !touched.contains(&n) {
                                    negatives.push(n);
                                }
                            }
                        }
                        let rank = Some(sampled_rank(&scores, case.target, &negatives));
                        sums[2] += hit_at(rank);
                        sums[3] += ndcg_at(rank);
                    }
                    sums
                })
            })
            .collect();
        handles.into_iter().fold([0f64; 5], |mut acc, h| {
            let s = h.join().expect("evaluation thread panicked");
            for k in 0..5 {
                acc[k] += s[k];
            }
            acc
        })
    });
    let n = cases.len() as f64;
    Metrics {
        hr: sums[0] / n,
        ndcg: sums[1] / n,
        sampled_hr: sums[2] / n,
        sampled_ndcg: sums[3] / n,
        ndcg_full: sums[4] / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_metrics_by_hand() {
        // index 0 is padding; items 1..=5.
        let scores = [100.0, 0.9, 0.5, 0.7, 0.5, 0.1];
        let none = HashSet::new();
        assert_eq!(full_rank(&scores, 1, &none), Some(0));
        assert_eq!(full_rank(&scores, 3, &none), Some(1));
        // item 2 and 4 tie at 0.5: the lower index ranks first.
        assert_eq!(full_rank(&scores, 2, &none), Some(2));
        assert_eq!(full_rank(&scores, 4, &none), Some(3));
        // removing items 1 and 3 from the ranking lifts item 4 by two.
        let seen: HashSet<u32> = [1, 3].into();
        assert_eq!(full_rank(&scores, 4, &seen), Some(1));
        assert_eq!(full_rank(&scores, 1, &seen), None);
        assert_eq!(sampled_rank(&scores, 4, &[5, 1, 2]), 2);
        assert_eq!(ndcg_at(Some(0)), 1.0);
        assert!((ndcg_at(Some(1)) - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert!((ndcg_at(Some(9)) - 1.0 / 11f64.log2()).abs() < 1e-12);
        assert_eq!(ndcg_at(Some(10)), 0.0);
        assert_eq!(hit_at(Some(9)), 1.0);
        assert_eq!(hit_at(None), 0.0);
    }
}
