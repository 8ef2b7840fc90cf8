//! The rankings: a user's next items, the cold-start list, similar items;
//! and the filters every list passes (seen or purchased items, items asked
//! to be left out, a category, unavailable and deleted items).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use super::state::{CachedState, RankingKey};
use super::{Exclude, Ranked, Reason, ReasonKind, Request, Scored, Serving, Strategy};
use crate::domain::{EventType, UserEvent};
use crate::model::ann::AnnIndex;
use crate::model::{top_n, ModelSnapshot, Step, UserState};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Serving {
    /// Whether this user gets the cold-start list: no model, or none of
    /// their items known to it.
    pub fn is_cold(model: Option<&ModelSnapshot>, events: &[UserEvent]) -> bool {
        model.is_none_or(|m| !events.iter().any(|e| m.item_index(&e.item_id).is_some()))
    }

    /// Ranks items for a user with these events (newest first) by `model`.
    /// Cold users (`is_cold`) get `popular`, filtered.
    pub fn recommend(
        &self,
        model: Option<&ModelSnapshot>,
        user_id: &str,
        events: &[UserEvent],
        request: &Request,
        popular: &[(String, f64)],
    ) -> Ranked {
        let Some(model) = model else {
            return self.popular_for(None, popular, request, events);
        };
        // The same user, events, model, catalogue and question as last time:
        // the same ranking, with no scoring.
        let key = RankingKey::of(request, self.catalogue.generation());
        let entry = self.states.get(user_id);
        let cached = entry.as_ref().filter(|c| c.fits(model, events));
        let repeated = cached
            .and_then(|c| c.ranked.as_ref().filter(|(k, _)| *k == key))
            .map(|(_, best)| best.clone());
        // A repeated ranking was made from a history the model could read,
        // so it needs the history again only to explain itself.
        let history = if repeated.is_some() && !request.explain {
            Vec::new()
        } else {
            history_of(model, events)
        };
        if repeated.is_none() && history.is_empty() {
            return self.popular_for(Some(model.meta.version.clone()), popular, request, events);
        }
        let history = &history[history.len().saturating_sub(self.max_len)..];
        let best = match repeated {
            Some(best) => best,
            None => {
                let advanced = || entry.as_ref()?.advanced(model, events, self.max_len);
                let (state, from) = match cached {
                    Some(c) => (c.state.clone(), "cache"),
                    None => match advanced() {
                        Some(state) => (Some(state), "advanced"),
                        None => (model.user_state(history, history.len()), "events"),
                    },
                };
                metrics::counter!("recd_user_states_total", "from" => from).increment(1);
                let excluded_index: HashSet<u32> = excluded_ids(events, request)
                    .into_iter()
                    .filter_map(|id| model.item_index(id))
                    .collect();
                let catalogue = self.catalogue.view();
                let skip = |i: u32| {
                    excluded_index.contains(&i) || !catalogue.allows(model.item_id(i), request.category.as_deref())
                };
                let approximate = match (self.index_of(model), state.as_ref()) {
                    (Some(ready), Some(state)) => {
                        let best = approximate_top_n(model, &ready.index, history, state, request.n, skip);
                        if best.is_some() {
                            metrics::counter!("recd_ann_rankings_total").increment(1);
                        } else {
                            metrics::counter!("recd_ann_fallbacks_total").increment(1);
                        }
                        best
                    }
                    _ => None,
                };
                let best = approximate.unwrap_or_else(|| {
                    let scan = || {
                        SCORES.with(|scores| {
                            let mut scores = scores.borrow_mut();
                            model.score_user(history, state.as_ref(), &mut scores);
                            top_n(&scores, request.n, skip)
                        })
                    };
                    // Scanning a large catalogue takes milliseconds: the
                    // runtime hands this worker's other tasks to another
                    // thread meanwhile.
                    if model.items() >= LONG_SCAN_ITEMS && on_multi_thread_runtime() {
                        tokio::task::block_in_place(scan)
                    } else {
                        scan()
                    }
                });
                self.states.insert(
                    user_id.to_owned(),
                    CachedState::new(model, events, state).with_ranking(key, best.clone()),
                );
                best
            }
        };
        let items = best
            .into_iter()
            .map(|(i, score)| Scored {
                item_id: model.item_id(i).to_owned(),
                score,
                reason: request.explain.then(|| reason_for(model, history, i)),
                fields: Default::default(),
            })
            .collect();
        Ranked {
            model_version: Some(model.meta.version.clone()),
            strategy: Strategy::Personalized,
            items,
        }
    }

    /// The cold-start list: popular items, narrowed by category.
    fn popular_for(
        &self,
        version: Option<String>,
        popular: &[(String, f64)],
        request: &Request,
        events: &[UserEvent],
    ) -> Ranked {
        let excluded = excluded_ids(events, request);
        let kind = if request.category.is_some() {
            ReasonKind::Category
        } else {
            ReasonKind::Popular
        };
        let catalogue = self.catalogue.view();
        let items = popular
            .iter()
            .filter(|(id, _)| !excluded.contains(id.as_str()) && catalogue.allows(id, request.category.as_deref()))
            .take(request.n)
            .map(|(id, score)| Scored {
                item_id: id.clone(),
                score: *score as f32,
                reason: request.explain.then_some(Reason { kind, item_id: None }),
                fields: Default::default(),
            })
            .collect();
        Ranked {
            model_version: version,
            strategy: Strategy::Popular,
            items,
        }
    }

    /// Items like `item_id`: by the learned embeddings plus co-occurrence,
    /// or by co-occurrence alone for an item seen fewer than
    /// `MIN_EMBEDDED_INTERACTIONS` times (its embedding learned little).
    /// `None` when the model does not know the item.
    pub fn similar(
        &self,
        model: &ModelSnapshot,
        item_id: &str,
        n: usize,
        category: Option<&str>,
    ) -> Option<Vec<Scored>> {
        let item = model.item_index(item_id)?;
        let learned = model.weights.is_some()
            && model.popularity.get(item as usize).copied().unwrap_or(0.0) >= MIN_EMBEDDED_INTERACTIONS;
        let catalogue = self.catalogue.view();
        let best = SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            if learned {
                model.similar_scores(item, &mut scores);
            } else {
                scores.clear();
                scores.resize(model.items() + 1, f32::NEG_INFINITY);
                for (j, sim) in model.neighbours.of(item) {
                    scores[j as usize] = sim;
                }
                scores[item as usize] = f32::NEG_INFINITY;
            }
            top_n(&scores, n, |i| !catalogue.allows(model.item_id(i), category))
        });
        Some(
            best.into_iter()
                .map(|(i, score)| Scored {
                    item_id: model.item_id(i).to_owned(),
                    score,
                    reason: None,
                    fields: Default::default(),
                })
                .collect(),
        )
    }
}

/// A user's events (newest first) as the model reads them: oldest first,
/// items the model does not know left out.
pub fn history_of(model: &ModelSnapshot, events: &[UserEvent]) -> Vec<Step> {
    events
        .iter()
        .rev()
        .filter_map(|e| {
            model.item_index(&e.item_id).map(|item| Step {
                item,
                kind: e.kind as u8,
            })
        })
        .collect()
}

/// The N best items from the index's candidates and the history's
/// co-occurrence neighbours, each scored exactly as `score_user` would.
/// `None` when fewer than N of them pass `skip` (narrow filters): the
/// caller then scores every item.
pub fn approximate_top_n(
    model: &ModelSnapshot,
    index: &AnnIndex,
    history: &[Step],
    state: &UserState,
    n: usize,
    mut skip: impl FnMut(u32) -> bool,
) -> Option<Vec<(u32, f32)>> {
    let weights = model.weights.as_ref()?;
    let q = weights.query(state);
    let candidates = index
        .candidates(&q, index.candidates_for(n))
        .map_err(|e| tracing::warn!(error = %e, "index search failed; scoring every item"))
        .ok()?;
    let mut scored: HashMap<u32, f32> = candidates
        .into_iter()
        .filter(|&i| i != 0)
        .map(|i| (i, weights.score_one(&q, i)))
        .collect();
    if model.meta.knn_weight > 0.0 {
        model
            .neighbours
            .for_each_score(history, model.meta.knn_weight, |j, part| {
                *scored.entry(j).or_insert_with(|| weights.score_one(&q, j)) += part;
            });
    }
    let mut ranked: Vec<(u32, f32)> = scored.into_iter().filter(|&(_, s)| !s.is_nan()).collect();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Filters look items up by id in large maps: only as far down the
    // ranking as the answer needs.
    let best: Vec<(u32, f32)> = ranked.into_iter().filter(|&(i, _)| !skip(i)).take(n).collect();
    (best.len() >= n.min(model.items())).then_some(best)
}

/// From this many items, scoring every item (about 1 ms per 100,000) leaves
/// the async worker for the time it takes.
const LONG_SCAN_ITEMS: usize = 100_000;

pub(super) fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Below this many interactions in the training data an item's similar
/// items come from co-occurrence alone.
pub const MIN_EMBEDDED_INTERACTIONS: f32 = 5.0;

/// The item ids a request leaves out for this user.
fn excluded_ids<'a>(events: &'a [UserEvent], request: &'a Request) -> HashSet<&'a str> {
    let purchase = EventType::Purchase.code();
    let mut excluded: HashSet<&str> = match request.exclude {
        Exclude::Seen => events.iter().map(|e| e.item_id.as_str()).collect(),
        Exclude::Purchased => events
            .iter()
            .filter(|e| e.kind == purchase)
            .map(|e| e.item_id.as_str())
            .collect(),
        Exclude::None => HashSet::new(),
    };
    excluded.extend(request.exclude_items.iter().map(String::as_str));
    excluded
}

/// `similar_to` the newest of the user's items whose co-occurrence
/// neighbours include the item, else `sequence`.
fn reason_for(model: &ModelSnapshot, history: &[Step], item: u32) -> Reason {
    for step in history.iter().rev().take(20) {
        if model.neighbours.of(step.item).take(20).any(|(j, _)| j == item) {
            return Reason {
                kind: ReasonKind::SimilarTo,
                item_id: Some(model.item_id(step.item).to_owned()),
            };
        }
    }
    Reason {
        kind: ReasonKind::Sequence,
        item_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ItemFlags;
    use crate::model::ann::AnnSettings;
    use crate::model::snapshot::testing::snapshot;
    use crate::recommend::testing::user_events;

    const ITEMS: usize = 30;

    fn serving() -> Serving {
        Serving::new(10, AnnSettings::default())
    }

    /// Events newest first from `(item, type)` in time order.
    fn events(in_time_order: &[(u32, EventType)]) -> Vec<UserEvent> {
        let arrivals: Vec<_> = (1..)
            .zip(in_time_order)
            .map(|(seq, &(item, kind))| (item, kind, seq))
            .collect();
        user_events(&arrivals)
    }

    fn request(n: usize) -> Request {
        Request {
            n,
            category: None,
            exclude: Exclude::Seen,
            exclude_items: Vec::new(),
            explain: false,
        }
    }

    fn ids(ranked: &Ranked) -> Vec<&str> {
        ranked.items.iter().map(|s| s.item_id.as_str()).collect()
    }

    fn flags(item: u32, categories: &[&str], available: bool) -> ItemFlags {
        ItemFlags {
            item_id: format!("i{item}"),
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
            available,
            deleted: false,
            updated_at: 1,
            title: None,
            price: None,
            attributes: Default::default(),
        }
    }

    fn popular() -> Vec<(String, f64)> {
        (1..=ITEMS).map(|i| (format!("i{i}"), (ITEMS - i) as f64)).collect()
    }

    #[test]
    fn seen_purchased_and_listed_items_are_left_out() {
        let model = snapshot(ITEMS, true, &[], 7);
        let history = events(&[(1, EventType::View), (2, EventType::Purchase), (3, EventType::View)]);
        let all = |exclude, exclude_items: &[&str]| {
            let request = Request {
                exclude,
                exclude_items: exclude_items.iter().map(|s| (*s).to_owned()).collect(),
                ..request(ITEMS)
            };
            // A fresh cache each time: every answer is a new ranking.
            serving().recommend(Some(&model), "u", &history, &request, &[])
        };
        let seen = all(Exclude::Seen, &[]);
        assert_eq!(seen.strategy, Strategy::Personalized);
        assert_eq!(seen.items.len(), ITEMS - 3);
        assert!(!ids(&seen).iter().any(|id| ["i1", "i2", "i3"].contains(id)));
        let purchased = all(Exclude::Purchased, &[]);
        assert_eq!(purchased.items.len(), ITEMS - 1);
        assert!(!ids(&purchased).contains(&"i2") && ids(&purchased).contains(&"i1"));
        let none = all(Exclude::None, &["i9", "i10"]);
        assert_eq!(none.items.len(), ITEMS - 2);
        assert!(!ids(&none).contains(&"i9") && ids(&none).contains(&"i2"));
        // Best first.
        assert!(none.items.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn a_category_and_unavailable_items_filter_every_list() {
        let model = snapshot(ITEMS, true, &[(1, 4)], 8);
        let serving = serving();
        serving.catalogue.apply(vec![
            flags(4, &["shoes"], true),
            flags(5, &["shoes"], false),
            flags(6, &["shoes", "hats"], true),
            flags(7, &[], false),
        ]);
        let history = events(&[(1, EventType::View)]);
        let shoes = Request {
            category: Some("shoes".into()),
            ..request(10)
        };
        let ranked = serving.recommend(Some(&model), "u", &history, &shoes, &[]);
        let mut got = ids(&ranked);
        got.sort_unstable();
        assert_eq!(got, ["i4", "i6"], "only available items of the category");
        let everything = serving.recommend(Some(&model), "u", &history, &request(ITEMS), &[]);
        assert!(!ids(&everything).contains(&"i5") && !ids(&everything).contains(&"i7"));
        assert_eq!(everything.items.len(), ITEMS - 3);
        // Similar items pass the same filters.
        let similar = serving.similar(&model, "i1", 10, Some("shoes")).expect("known item");
        let mut similar: Vec<&str> = similar.iter().map(|s| s.item_id.as_str()).collect();
        similar.sort_unstable();
        assert_eq!(similar, ["i4", "i6"]);
        assert!(serving.similar(&model, "nope", 10, None).is_none());
    }

    #[test]
    fn cold_users_get_the_popular_list_filtered() {
        let model = snapshot(ITEMS, true, &[], 9);
        let serving = serving();
        serving.catalogue.apply(vec![
            flags(2, &["hats"], true),
            flags(3, &["hats"], true),
            flags(1, &[], false),
        ]);
        let unknown = events(&[(999, EventType::View)]);
        assert!(Serving::is_cold(Some(&model), &unknown));
        assert!(Serving::is_cold(None, &events(&[(1, EventType::View)])));
        let ranked = serving.recommend(Some(&model), "u", &unknown, &request(3), &popular());
        assert_eq!(ranked.strategy, Strategy::Popular);
        assert_eq!(ranked.model_version.as_deref(), Some(model.meta.version.as_str()));
        assert_eq!(
            ids(&ranked),
            ["i2", "i3", "i4"],
            "most popular first, unavailable i1 left out"
        );
        let hats = Request {
            category: Some("hats".into()),
            explain: true,
            ..request(10)
        };
        let ranked = serving.recommend(None, "u", &[], &hats, &popular());
        assert_eq!(ranked.model_version, None);
        assert_eq!(ids(&ranked), ["i2", "i3"]);
        assert!(ranked
            .items
            .iter()
            .all(|s| s.reason.as_ref().map(|r| r.kind) == Some(ReasonKind::Category)));
    }

    #[test]
    fn explained_items_name_their_neighbour() {
        let model = snapshot(ITEMS, false, &[(1, 2), (1, 2), (1, 2)], 10);
        let explain = Request {
            explain: true,
            ..request(5)
        };
        let ranked = serving().recommend(Some(&model), "u", &events(&[(1, EventType::View)]), &explain, &[]);
        let first = &ranked.items[0];
        assert_eq!(first.item_id, "i2", "co-occurrence ranks the neighbour first");
        assert_eq!(
            first.reason,
            Some(Reason {
                kind: ReasonKind::SimilarTo,
                item_id: Some("i1".into())
            })
        );
        assert!(ranked.items[1..]
            .iter()
            .all(|s| s.reason.as_ref().unwrap().kind == ReasonKind::Sequence));
    }

    #[test]
    fn the_same_question_again_gets_the_same_ranking() {
        let model = snapshot(ITEMS, true, &[], 11);
        let serving = serving();
        let history = events(&[(1, EventType::View), (2, EventType::View)]);
        let first = serving.recommend(Some(&model), "u", &history, &request(5), &[]);
        let again = serving.recommend(Some(&model), "u", &history, &request(5), &[]);
        assert_eq!(first, again);
        // A catalogue change is a new question.
        let top = first.items[0].item_id.trim_start_matches('i').parse().unwrap();
        serving.catalogue.apply(vec![flags(top, &[], false)]);
        let after = serving.recommend(Some(&model), "u", &history, &request(5), &[]);
        assert!(!ids(&after).contains(&first.items[0].item_id.as_str()));
    }
}
