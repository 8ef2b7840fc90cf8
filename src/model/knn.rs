//! Item co-occurrence (item-kNN): items that shoppers touch near each other
//! in their sequences. The baseline of every evaluation, the fallback of
//! similar items, and a term of the served score.

use std::collections::HashMap;

use super::data::Step;

/// Per item, its nearest neighbours by co-occurrence, in CSR form indexed by
/// dense item index (0 is padding and has none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Neighbours {
    /// items + 2 offsets into `items` / `weights`.
    pub offsets: Vec<u32>,
    pub items: Vec<u32>,
    pub weights: Vec<f32>,
}

/// How far apart two events may be and still count as co-occurring.
const WINDOW: usize = 5;
/// How many of a user's newest events vote when scoring.
const HISTORY: usize = 20;

impl Neighbours {
    /// Co-occurrence within `WINDOW` positions, weighted 1/distance, cosine
    /// normalised by the items' frequencies; the best `k` per item kept.
    pub fn build<'a>(items: usize, sequences: impl Iterator<Item = &'a [Step]>, k: usize) -> Self {
        let mut pairs: HashMap<(u32, u32), f32> = HashMap::new();
        let mut freq = vec![0f32; items + 1];
        for seq in sequences {
            for (p, a) in seq.iter().enumerate() {
                freq[a.item as usize] += 1.0;
                for (dist, b) in seq[p + 1..].iter().take(WINDOW).enumerate() {
                    if a.item == b.item {
                        continue;
                    }
                    let w = 1.0 / (dist + 1) as f32;
                    *pairs.entry((a.item, b.item)).or_default() += w;
                    *pairs.entry((b.item, a.item)).or_default() += w;
                }
            }
        }
        let mut lists: Vec<Vec<(u32, f32)>> = vec![Vec::new(); items + 1];
        for ((a, b), c) in pairs {
            let sim = c / (freq[a as usize] * freq[b as usize]).sqrt();
            lists[a as usize].push((b, sim));
        }
        let mut out = Neighbours {
            offsets: Vec::with_capacity(items + 2),
            ..Neighbours::default()
        };
        out.offsets.push(0);
        for list in &mut lists {
            list.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            list.truncate(k);
            for &(j, w) in list.iter() {
                out.items.push(j);
                out.weights.push(w);
            }
            out.offsets.push(out.items.len() as u32);
        }
        out
    }

    /// The neighbours of one item, best first.
    pub fn of(&self, item: u32) -> impl Iterator<Item = (u32, f32)> + '_ {
        let i = item as usize;
        let range = match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => a as usize..b as usize,
            _ => 0..0,
        };
        self.items[range.clone()]
            .iter()
            .copied()
            .zip(self.weights[range].iter().copied())
    }

    /// Adds `weight` x the co-occurrence score of a history to `scores`: the
    /// newest events count most (1 / age).
    pub fn add_scores(&self, history: &[Step], weight: f32, scores: &mut [f32]) {
        self.for_each_score(history, weight, |j, score| scores[j as usize] += score);
    }

    /// Calls `f(item, part)` for every part of a history's co-occurrence
    /// scores (an item may come more than once; its score is the sum).
    pub fn for_each_score(&self, history: &[Step], weight: f32, mut f: impl FnMut(u32, f32)) {
        for (age, step) in history.iter().rev().take(HISTORY).enumerate() {
            let w = weight / (age + 1) as f32;
            for (j, sim) in self.of(step.item) {
                f(j, w * sim);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(items: &[u32]) -> Vec<Step> {
        items.iter().map(|&item| Step { item, kind: 0 }).collect()
    }

    #[test]
    fn near_items_are_neighbours() {
        let seqs = [seq(&[1, 2, 3]), seq(&[1, 2]), seq(&[3, 4])];
        let nb = Neighbours::build(4, seqs.iter().map(Vec::as_slice), 10);
        let of1: Vec<u32> = nb.of(1).map(|(j, _)| j).collect();
        assert_eq!(of1, [2, 3]);
        let mut scores = vec![0.0; 5];
        nb.add_scores(&seq(&[4]), 1.0, &mut scores);
        assert!(scores[3] > 0.0 && scores[1] == 0.0 && scores[2] == 0.0);
    }
}
