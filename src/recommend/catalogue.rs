//! What the filters know of the catalogue, in memory: which items are
//! unavailable or deleted, and each item's categories; and the fields
//! answers may carry (`fields=title,price,categories,attributes`), so that
//! they need no query per item. Refreshed from the
//! store's changes since the last look, so every replica sees every write
//! within a refresh period, and at once after its own writes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::domain::ItemFlags;
use crate::store::{Store, StoreError};

/// While the newest change seen is this recent (ms, by the wall clock),
/// changes are read again from this far before it, so that a write
/// committed late, or stamped by a replica whose clock lags a little, is not
/// missed. Older than that, only newer changes are read.
const OVERLAP_MS: i64 = 3_000;

#[derive(Debug, Clone, Default, PartialEq)]
struct Entry {
    blocked: bool,
    categories: Vec<String>,
    /// Shared with the answers that show it.
    details: Option<Arc<Details>>,
}

/// An item's title, price and attributes, when it has any.
#[derive(Debug, Clone, PartialEq)]
struct Details {
    title: Option<String>,
    price: Option<f64>,
    attributes: Map<String, Value>,
}

/// Which catalogue fields an answer shows with each item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields {
    pub title: bool,
    pub price: bool,
    pub categories: bool,
    pub attributes: bool,
}

impl Fields {
    pub const NAMES: [&'static str; 4] = ["title", "price", "categories", "attributes"];

    /// Parses `title,price,categories,attributes` (any of them, any order);
    /// the unknown name on failure.
    pub fn parse(list: &str) -> Result<Fields, String> {
        let mut fields = Fields::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "title" => fields.title = true,
                "price" => fields.price = true,
                "categories" => fields.categories = true,
                "attributes" => fields.attributes = true,
                other => return Err(other.to_owned()),
            }
        }
        Ok(fields)
    }

    pub fn any(self) -> bool {
        self.title || self.price || self.categories || self.attributes
    }
}

/// The catalogue fields an item in an answer carries when they are asked
/// for (`fields=title,price,categories,attributes`): only those asked for
/// are present.
// Describes, for the OpenAPI document, the members `View::fields` adds.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CatalogueFields {
    /// The item's title; `null` when it has none.
    title: Option<String>,
    /// The item's price; `null` when it has none.
    price: Option<f64>,
    /// The item's categories (empty when it has none).
    categories: Option<Vec<String>>,
    /// The item's attributes (empty when it has none).
    attributes: Option<Map<String, Value>>,
}

/// Only items that are blocked, have categories or have details take
/// memory: an item absent here is recommendable, in no category, and has
/// no title, price or attributes.
#[derive(Debug, Default)]
pub struct Catalogue {
    items: RwLock<HashMap<String, Entry>>,
    /// The newest change seen; one refresh at a time.
    since: tokio::sync::Mutex<Option<i64>>,
    /// Bumped whenever what the filters see changes.
    generation: std::sync::atomic::AtomicU64,
    /// When the shop lets the category filters use suggested categories
    /// (`suggested_categories_in_filters`): each uncategorised item's top
    /// suggestion that is confident enough.
    suggested: RwLock<Option<Arc<HashMap<String, String>>>>,
}

/// A read view for one request: one lock for every check.
pub struct View<'a>(
    std::sync::RwLockReadGuard<'a, HashMap<String, Entry>>,
    Option<Arc<HashMap<String, String>>>,
);

impl View<'_> {
    /// Whether the item may be recommended, in `category` if one is given.
    /// An item without categories is in its suggested category when the
    /// shop allows it (`Catalogue::set_suggested`).
    pub fn allows(&self, item_id: &str, category: Option<&str>) -> bool {
        let suggested = |c: &str| self.1.as_ref().is_some_and(|s| s.get(item_id).is_some_and(|x| x == c));
        match self.0.get(item_id) {
            None => category.is_none_or(suggested),
            Some(e) if e.blocked => false,
            Some(e) if e.categories.is_empty() => category.is_none_or(suggested),
            Some(e) => category.is_none_or(|c| e.categories.iter().any(|x| x == c)),
        }
    }

    pub fn categories(&self, item_id: &str) -> &[String] {
        self.0.get(item_id).map_or(&[], |e| e.categories.as_slice())
    }

    /// The item's title, if it has one.
    pub fn title(&self, item_id: &str) -> Option<&str> {
        self.0.get(item_id)?.details.as_deref()?.title.as_deref()
    }

    /// The fields asked for of an item, as JSON members to add to its entry
    /// in an answer (`null` for a title or price it does not have).
    pub fn fields(&self, item_id: &str, fields: Fields) -> Map<String, Value> {
        let entry = self.0.get(item_id);
        let details = entry.and_then(|e| e.details.as_deref());
        let mut out = Map::new();
        if fields.title {
            out.insert("title".into(), details.and_then(|d| d.title.clone()).into());
        }
        if fields.price {
            out.insert("price".into(), details.and_then(|d| d.price).into());
        }
        if fields.categories {
            out.insert("categories".into(), self.categories(item_id).to_vec().into());
        }
        if fields.attributes {
            let attributes = details.map(|d| d.attributes.clone()).unwrap_or_default();
            out.insert("attributes".into(), Value::Object(attributes));
        }
        out
    }
}

impl Catalogue {
    /// Changes whenever an item's flags or categories change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn view(&self) -> View<'_> {
        let suggested = self.suggested.read().unwrap_or_else(|e| e.into_inner()).clone();
        View(self.items.read().unwrap_or_else(|e| e.into_inner()), suggested)
    }

    /// The category each uncategorised item counts as in the category
    /// filters (item id -> its top suggested category); `None`: none.
    pub fn set_suggested(&self, suggested: Option<Arc<HashMap<String, String>>>) {
        *self.suggested.write().unwrap_or_else(|e| e.into_inner()) = suggested;
    }

    /// Reads the catalogue's changes since the last refresh.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let mut since = self.since.lock().await;
        let now = crate::clock::now_ms();
        let changes = match *since {
            None => {
                // The first load: only items the filters must know of, and
                // the newest change of all, to go on from.
                let newest = store.newest_item_change_ms().await?;
                let changes = store.catalogue_changes(i64::MIN, true).await?;
                *since = newest;
                changes
            }
            Some(s) if now - s <= OVERLAP_MS => store.catalogue_changes(s - OVERLAP_MS, false).await?,
            Some(s) => store.catalogue_changes(s + 1, false).await?,
        };
        if let Some(newest) = self.apply(changes) {
            *since = Some(since.map_or(newest, |s| s.max(newest)));
        }
        Ok(())
    }

    /// Takes in items' changes; returns the newest change time among them.
    pub fn apply(&self, changes: Vec<ItemFlags>) -> Option<i64> {
        let newest = changes.iter().map(|c| c.updated_at).max()?;
        let mut items = self.items.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for change in changes {
            let blocked = change.deleted || !change.available;
            let details =
                (change.title.is_some() || change.price.is_some() || !change.attributes.is_empty()).then(|| {
                    Arc::new(Details {
                        title: change.title,
                        price: change.price,
                        attributes: change.attributes,
                    })
                });
            let known = items.get(&change.item_id);
            let filters_change = known.map_or(blocked || !change.categories.is_empty(), |e| {
                e.blocked != blocked || e.categories != change.categories
            });
            changed |= filters_change;
            if blocked || !change.categories.is_empty() || details.is_some() {
                let entry = Entry {
                    blocked,
                    categories: change.categories,
                    details,
                };
                if known != Some(&entry) {
                    items.insert(change.item_id, entry);
                }
            } else {
                items.remove(&change.item_id);
            }
        }
        if changed {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Some(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, title: Option<&str>, categories: &[&str], available: bool) -> ItemFlags {
        ItemFlags {
            item_id: id.to_owned(),
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
            available,
            deleted: false,
            updated_at: 1,
            title: title.map(str::to_owned),
            price: title.map(|_| 9.5),
            attributes: Map::new(),
        }
    }

    /// Suggested categories count in the filters only for items without
    /// categories of their own, and never for blocked ones.
    #[test]
    fn suggested_categories_fill_in_for_missing_ones() {
        let catalogue = Catalogue::default();
        catalogue.apply(vec![
            change("tagged", None, &["c1"], true),
            change("untagged", Some("Lamp"), &[], true),
            change("gone", None, &[], false),
        ]);
        assert!(!catalogue.view().allows("untagged", Some("c2")));
        let suggested: HashMap<String, String> =
            [("tagged", "c2"), ("untagged", "c2"), ("gone", "c2"), ("absent", "c2")]
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect();
        catalogue.set_suggested(Some(Arc::new(suggested)));
        let view = catalogue.view();
        assert!(view.allows("untagged", Some("c2")));
        assert!(
            view.allows("absent", Some("c2")),
            "an item the catalogue holds nothing of"
        );
        assert!(!view.allows("untagged", Some("c1")));
        assert!(!view.allows("tagged", Some("c2")), "own categories win");
        assert!(view.allows("tagged", Some("c1")));
        assert!(!view.allows("gone", Some("c2")), "unavailable");
        drop(view);
        catalogue.set_suggested(None);
        assert!(!catalogue.view().allows("untagged", Some("c2")));
    }

    #[test]
    fn fields_parse_and_name_the_unknown_one() {
        let fields = Fields::parse("title, price").unwrap();
        assert!(fields.title && fields.price && !fields.categories && !fields.attributes);
        assert!(!Fields::parse("").unwrap().any());
        assert_eq!(Fields::parse("title,colour"), Err("colour".to_owned()));
    }

    /// Titles and prices are kept for the answers; a change of title alone
    /// does not touch what the filters see.
    #[test]
    fn details_are_kept_without_changing_the_filters() {
        let catalogue = Catalogue::default();
        catalogue.apply(vec![
            change("a", Some("Lamp"), &[], true),
            change("b", None, &["c1"], true),
        ]);
        let generation = catalogue.generation();
        let all = Fields::parse("title,price,categories,attributes").unwrap();
        let view = catalogue.view();
        let a = view.fields("a", all);
        assert_eq!(a["title"], "Lamp");
        assert_eq!(a["price"], 9.5);
        assert_eq!(a["categories"], Value::Array(vec![]));
        assert_eq!(a["attributes"], Value::Object(Map::new()));
        let b = view.fields("b", all);
        assert_eq!(b["title"], Value::Null);
        assert_eq!(b["categories"][0], "c1");
        assert_eq!(
            view.fields("unknown", Fields::parse("title").unwrap())["title"],
            Value::Null
        );
        drop(view);

        catalogue.apply(vec![change("a", Some("Desk lamp"), &[], true)]);
        assert_eq!(catalogue.generation(), generation, "a new title is no filter change");
        assert_eq!(catalogue.view().fields("a", all)["title"], "Desk lamp");
        catalogue.apply(vec![change("a", Some("Desk lamp"), &[], false)]);
        assert_ne!(catalogue.generation(), generation);
        assert!(!catalogue.view().allows("a", None));
        catalogue.apply(vec![change("a", None, &[], true)]);
        assert!(catalogue.view().allows("a", None));
        assert_eq!(catalogue.view().fields("a", all)["title"], Value::Null);
    }
}
