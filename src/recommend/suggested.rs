//! Categories suggested from behaviour for the served model's items that
//! have none (`crate::model::suggest`), computed once per model version and
//! catalogue generation, on the first request that needs them after either
//! changed, never per request.

use std::collections::HashMap;
use std::sync::Arc;

use super::rank::{on_multi_thread_runtime, MIN_EMBEDDED_INTERACTIONS};
use super::Serving;
use crate::model::suggest::{suggest, SuggestedCategory, NEIGHBOURS};

/// How suggested categories take part in the category filters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SuggestSettings {
    /// The category filters also accept an uncategorised item whose top
    /// suggestion is the category.
    pub in_filters: bool,
    /// ... when that suggestion's confidence is at least this.
    pub min_confidence: f64,
}

/// The suggestions of one model version over one catalogue generation.
#[derive(Debug, Default)]
pub struct Suggestions {
    pub version: String,
    pub generation: u64,
    /// Uncategorised items the model knows -> their suggestions (items
    /// with none left out).
    pub by_item: HashMap<String, Vec<SuggestedCategory>>,
}

impl Serving {
    /// The served model's suggestions for the catalogue as it is, computed
    /// now if the model or the catalogue's categories changed since the
    /// last; `None` without a model.
    pub fn suggestions(&self) -> Option<Arc<Suggestions>> {
        let model = self.model()?;
        let mut slot = self.suggestions.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.catalogue.generation();
        if let Some(s) = slot
            .as_ref()
            .filter(|s| s.version == model.meta.version && s.generation == generation)
        {
            return Some(s.clone());
        }
        let compute = || {
            let view = self.catalogue.view();
            let labels: Vec<&[String]> = std::iter::once(&[][..])
                .chain(model.item_ids.iter().map(|id| view.categories(id)))
                .collect();
            let targets: Vec<u32> = (1..labels.len() as u32)
                .filter(|&i| labels[i as usize].is_empty())
                .collect();
            let found = suggest(&model, &labels, &targets, NEIGHBOURS, MIN_EMBEDDED_INTERACTIONS);
            targets
                .iter()
                .zip(found)
                .filter(|(_, s)| !s.is_empty())
                .map(|(&i, s)| (model.item_id(i).to_owned(), s))
                .collect::<HashMap<_, _>>()
        };
        let started = std::time::Instant::now();
        let by_item = if on_multi_thread_runtime() {
            tokio::task::block_in_place(compute)
        } else {
            compute()
        };
        metrics::gauge!("recd_suggested_categories_items").set(by_item.len() as f64);
        metrics::histogram!("recd_suggested_categories_seconds").record(started.elapsed().as_secs_f64());
        let settings = self.suggest_settings;
        self.catalogue.set_suggested(settings.in_filters.then(|| {
            Arc::new(
                by_item
                    .iter()
                    .filter_map(|(id, s)| {
                        let top = s.first().filter(|t| t.confidence >= settings.min_confidence)?;
                        Some((id.clone(), top.category.clone()))
                    })
                    .collect(),
            )
        }));
        let fresh = Arc::new(Suggestions {
            version: model.meta.version.clone(),
            generation,
            by_item,
        });
        *slot = Some(fresh.clone());
        Some(fresh)
    }

    /// An item's suggested categories (empty for an item with categories or
    /// one the served model does not know).
    pub fn suggested_categories(&self, item_id: &str) -> Vec<SuggestedCategory> {
        self.suggestions()
            .and_then(|s| s.by_item.get(item_id).cloned())
            .unwrap_or_default()
    }

    /// Before a list narrowed to `category`: brings the suggested
    /// categories the filter uses up to date, when the shop lets it use them.
    pub fn prepare_category_filter(&self, category: Option<&str>) {
        if category.is_some() && self.suggest_settings.in_filters {
            self.suggestions();
        }
    }
}
