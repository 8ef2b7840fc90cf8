//! Categories from behaviour: an item without categories gets the
//! categories of its nearest neighbours that have some, by the same
//! similarity `similar` ranks with (learned embeddings plus co-occurrence,
//! or co-occurrence alone for an item seen too seldom to have a learned
//! embedding), each with its share of the neighbours' vote. Co-occurrence
//! neighbours vote first; the nearest by embedding fill up to `NEIGHBOURS`.

use rayon::prelude::*;
use serde::Serialize;

use super::snapshot::{dot, ModelSnapshot};

/// Neighbours with categories that vote for an item's categories.
pub const NEIGHBOURS: usize = 20;
/// Suggestions given per item, best first.
pub const MAX_SUGGESTIONS: usize = 3;

/// A category suggested for an item without categories.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SuggestedCategory {
    pub category: String,
    /// The category's share of the neighbours' similarity-weighted vote
    /// (0..1, four decimals).
    pub confidence: f64,
}

/// Suggestions for each of `targets` (dense indices), in their order:
/// `labels[i]` are the categories of dense item `i` (empty: none; index 0
/// is padding). An item whose embedding was learned from fewer than
/// `min_interactions` events is compared by co-occurrence alone, as
/// `similar` does. Only neighbours with a positive similarity vote; each
/// splits its similarity evenly among its categories.
pub fn suggest(
    model: &ModelSnapshot,
    labels: &[&[String]],
    targets: &[u32],
    k: usize,
    min_interactions: f32,
) -> Vec<Vec<SuggestedCategory>> {
    let labelled: Vec<u32> = (1..labels.len() as u32)
        .filter(|&i| !labels[i as usize].is_empty())
        .collect();
    // Unit-length embeddings of the labelled items, row by row.
    let unit = model.weights.as_ref().map(|w| {
        let d = w.dim;
        let row = move |i: u32| {
            let r = &w.item_emb[i as usize * d..(i as usize + 1) * d];
            let n = dot(r, r).sqrt().max(1e-12);
            r.iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let rows: Vec<f32> = labelled.iter().flat_map(|&i| row(i)).collect();
        (d, row, rows)
    });
    targets
        .par_iter()
        .map(|&item| {
            let learned = model.popularity.get(item as usize).copied().unwrap_or(0.0) >= min_interactions;
            let mut scores: Vec<(u32, f32, bool)> = match (&unit, learned) {
                (Some((d, row, rows)), true) => {
                    let q = row(item);
                    let mut scores: Vec<(u32, f32, bool)> = labelled
                        .iter()
                        .zip(rows.chunks_exact(*d))
                        .map(|(&j, r)| (j, dot(&q, r), false))
                        .collect();
                    for (j, sim) in model.neighbours.of(item) {
                        if let Ok(p) = labelled.binary_search(&j) {
                            scores[p].1 += sim;
                            scores[p].2 = true;
                        }
                    }
                    scores
                }
                _ => model
                    .neighbours
                    .of(item)
                    .filter(|&(j, _)| labels.get(j as usize).is_some_and(|l| !l.is_empty()))
                    .map(|(j, s)| (j, s, true))
                    .collect(),
            };
            scores.retain(|&(j, s, _)| j != item && s > 0.0 && s.is_finite());
            // Items shoppers touched next to this one are the surest
            // evidence: they come first, then the nearest by embedding.
            scores.sort_unstable_by(|a, b| b.2.cmp(&a.2).then(b.1.total_cmp(&a.1)).then(a.0.cmp(&b.0)));
            scores.truncate(k);
            vote(scores.iter().map(|&(j, s, _)| (labels[j as usize], s)))
        })
        .collect()
}

/// The categories' shares of a vote by `(categories, weight)`, best first.
fn vote<'a>(voters: impl Iterator<Item = (&'a [String], f32)>) -> Vec<SuggestedCategory> {
    let mut tally: Vec<(&str, f64)> = Vec::new();
    let mut total = 0f64;
    for (categories, weight) in voters {
        let share = f64::from(weight) / categories.len() as f64;
        for c in categories {
            match tally.iter_mut().find(|(name, _)| name == c) {
                Some((_, sum)) => *sum += share,
                None => tally.push((c, share)),
            }
        }
        total += f64::from(weight);
    }
    if total <= 0.0 {
        return Vec::new();
    }
    tally.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    tally
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(category, sum)| SuggestedCategory {
            category: category.to_owned(),
            confidence: (sum / total * 10_000.0).round() / 10_000.0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(list: &[&[&str]]) -> Vec<Vec<String>> {
        list.iter()
            .map(|l| l.iter().map(|c| (*c).to_owned()).collect())
            .collect()
    }

    #[test]
    fn the_vote_is_shared_by_weight_and_rounded() {
        let l = labels(&[&["a"], &["a", "b"], &["c"]]);
        let got = vote([(&l[0][..], 2.0), (&l[1][..], 1.0), (&l[2][..], 0.5)].into_iter());
        assert_eq!(got[0].category, "a");
        assert_eq!(got[0].confidence, 0.7143); // 2.5 / 3.5
        assert_eq!(got[1].category, "b");
        assert_eq!(got[1].confidence, 0.1429);
        assert_eq!(got[2].category, "c");
        assert!(vote(std::iter::empty()).is_empty());
    }
}

/// What `recd eval --categories` prints: top-1 accuracy of the suggested
/// categories on items whose categories were hidden, against always
/// guessing the most common category.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CategoryReport {
    /// Items with a category among the items the model knows.
    pub labelled: usize,
    /// Of them, hidden (seeded, `HIDDEN_SHARE`) before training.
    pub hidden: usize,
    /// Share of hidden items that got a suggestion.
    pub coverage: f64,
    /// Share of hidden items whose top suggestion is their (first) category;
    /// an item without a suggestion counts as wrong.
    pub accuracy: f64,
    /// The same among the hidden items that got a suggestion.
    pub accuracy_covered: f64,
    /// The most common category among the items left labelled.
    pub baseline_category: String,
    /// Share of hidden items in it.
    pub baseline_accuracy: f64,
    pub train_seconds: f64,
}

impl CategoryReport {
    pub fn table(&self) -> String {
        format!(
            "{} labelled items, {} hidden; trained {:.1}s\n\n\
             method                    top-1 accuracy  coverage\n\
             suggested                 {:>14.4}  {:>8.4}\n\
             suggested (covered only)  {:>14.4}\n\
             most common ({})  {:>14.4}  {:>8.4}\n",
            self.labelled,
            self.hidden,
            self.train_seconds,
            self.accuracy,
            self.coverage,
            self.accuracy_covered,
            self.baseline_category,
            self.baseline_accuracy,
            1.0
        )
    }
}

/// Share of labelled items whose categories are hidden.
pub const HIDDEN_SHARE: f64 = 0.2;

/// Hides the categories of a seeded 20% of the labelled items the events
/// name, trains on the events with the rest (the model learns from
/// categories too, so the hidden ones must not reach it), suggests
/// categories for the hidden items and scores the top suggestion.
pub fn evaluate_categories(
    rows: Vec<super::EventRow>,
    primary: &std::collections::HashMap<String, String>,
    cfg: &super::TrainConfig,
    progress: bool,
) -> anyhow::Result<CategoryReport> {
    use rand::seq::SliceRandom;
    use std::collections::HashMap;

    let mut data = super::Dataset::from_events(rows);
    let mut labelled: Vec<String> = data
        .item_ids
        .iter()
        .filter(|id| primary.contains_key(id.as_str()))
        .cloned()
        .collect();
    anyhow::ensure!(!labelled.is_empty(), "no item of the events has a category");
    labelled.sort();
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(cfg.seed ^ 0xca7e);
    labelled.shuffle(&mut rng);
    let hidden_count = ((labelled.len() as f64 * HIDDEN_SHARE).round() as usize).max(1);
    let hidden: Vec<String> = labelled[..hidden_count].to_vec();
    let mut visible = primary.clone();
    for id in &hidden {
        visible.remove(id);
    }
    data.set_categories(&visible);
    let started = std::time::Instant::now();
    let (snapshot, _) = super::train_and_evaluate(&data, cfg, progress)?;
    let train_seconds = started.elapsed().as_secs_f64();

    let visible_lists: Vec<Vec<String>> = snapshot
        .item_ids
        .iter()
        .map(|id| visible.get(id).map(|c| vec![c.clone()]).unwrap_or_default())
        .collect();
    let labels: Vec<&[String]> = std::iter::once(&[][..])
        .chain(visible_lists.iter().map(Vec::as_slice))
        .collect();
    let targets: Vec<u32> = hidden.iter().filter_map(|id| snapshot.item_index(id)).collect();
    let found = suggest(
        &snapshot,
        &labels,
        &targets,
        NEIGHBOURS,
        crate::recommend::MIN_EMBEDDED_INTERACTIONS,
    );

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (id, c) in &visible {
        if snapshot.item_index(id).is_some() {
            *counts.entry(c.as_str()).or_default() += 1;
        }
    }
    let baseline = counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(c, _)| c.to_owned())
        .unwrap_or_default();
    let n = targets.len().max(1) as f64;
    let (mut covered, mut right, mut baseline_right) = (0usize, 0usize, 0usize);
    for (&i, suggestions) in targets.iter().zip(&found) {
        let truth = &primary[snapshot.item_id(i)];
        covered += usize::from(!suggestions.is_empty());
        right += usize::from(suggestions.first().is_some_and(|s| &s.category == truth));
        baseline_right += usize::from(*truth == baseline);
    }
    Ok(CategoryReport {
        labelled: labelled.len(),
        hidden: targets.len(),
        coverage: covered as f64 / n,
        accuracy: right as f64 / n,
        accuracy_covered: right as f64 / covered.max(1) as f64,
        baseline_category: baseline,
        baseline_accuracy: baseline_right as f64 / n,
        train_seconds,
    })
}
