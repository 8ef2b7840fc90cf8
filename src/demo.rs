//! A generated shop: items in categories and shoppers whose sessions follow
//! patterns a sequence model can learn (each category's items are browsed in a
//! typical order, carts and purchases follow views). `recd serve --demo` seeds
//! an empty store with it and keeps simulated shoppers coming
//! ([`storefront`]); the benchmarks use it scaled up.

pub mod storefront;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map};

use crate::domain::{EventType, Item, NewEvent};

const CATEGORIES: [&str; 12] = [
    "shoes", "jackets", "shirts", "trousers", "bags", "hats", "watches", "skincare", "perfume", "books", "games",
    "kitchen",
];

/// How big a shop to make.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    pub items: usize,
    pub users: usize,
    /// Mean sessions per user.
    pub sessions: usize,
    pub seed: u64,
}

impl Default for DemoSize {
    fn default() -> Self {
        DemoSize {
            items: 360,
            users: 1500,
            sessions: 3,
            seed: 7,
        }
    }
}

pub struct DemoShop {
    pub items: Vec<Item>,
    /// In time order; the newest is `end_ms`.
    pub events: Vec<NewEvent>,
}

/// The item ids are `item-<n>`, the user ids `user-<n>`.
pub fn generate(size: DemoSize, end_ms: i64) -> DemoShop {
    let mut rng = StdRng::seed_from_u64(size.seed);
    let per_category = size.items.div_ceil(CATEGORIES.len()).max(1);
    let items: Vec<Item> = (0..size.items)
        .map(|i| {
            let category = CATEGORIES[i % CATEGORIES.len()];
            let mut attributes = Map::new();
            attributes.insert("brand".into(), json!(format!("brand-{}", i % 17)));
            Item {
                item_id: format!("item-{i}"),
                title: Some(format!("{} #{}", capitalise(category), i / CATEGORIES.len() + 1)),
                categories: vec![category.to_owned()],
                price: Some(f64::from(rng.gen_range(5u32..200)) - 0.01),
                available: rng.gen_bool(0.97),
                attributes,
            }
        })
        .collect();

    let day = 86_400_000i64;
    let start_ms = end_ms - 30 * day;
    let mut events = Vec::new();
    for u in 0..size.users {
        let user_id = format!("user-{u}");
        // Each shopper prefers one or two categories.
        let favourite = rng.gen_range(0..CATEGORIES.len());
        let second = rng.gen_range(0..CATEGORIES.len());
        let sessions = rng.gen_range(1..=size.sessions * 2 - 1);
        let mut t = start_ms + rng.gen_range(0..20 * day);
        for s in 0..sessions {
            let category = if rng.gen_bool(0.7) { favourite } else { second };
            let session_id = format!("{user_id}-s{s}");
            // Within a category, shoppers walk the items in a typical order:
            // item k is usually followed by item k+1.
            let mut position = popular_start(&mut rng, per_category);
            for _ in 0..rng.gen_range(2..9) {
                let index = position * CATEGORIES.len() + category;
                if index >= size.items {
                    break;
                }
                let item = &items[index];
                let mut push = |kind: EventType, value: Option<f64>, t: i64| {
                    events.push(NewEvent {
                        event_id: Some(format!("demo-{}", events.len())),
                        user_id: user_id.clone(),
                        item_id: item.item_id.clone(),
                        kind,
                        value,
                        ts: t,
                        timestamped: true,
                        session_id: Some(session_id.clone()),
                        recommendation_id: None,
                    });
                };
                push(EventType::View, None, t);
                if rng.gen_bool(0.25) {
                    t += rng.gen_range(5_000..60_000);
                    push(EventType::AddToCart, None, t);
                    if rng.gen_bool(0.5) {
                        t += rng.gen_range(30_000..600_000);
                        push(EventType::Purchase, item.price, t);
                        if rng.gen_bool(0.3) {
                            push(EventType::Rating, Some(f64::from(rng.gen_range(3u8..=5))), t + day);
                        }
                    }
                }
                t += rng.gen_range(10_000..180_000);
                position = if rng.gen_bool(0.8) {
                    position + 1
                } else {
                    rng.gen_range(0..per_category)
                };
            }
            t += rng.gen_range(day / 4..4 * day);
        }
    }
    events.retain(|e| e.ts <= end_ms);
    events.sort_by_key(|e| e.ts);
    DemoShop { items, events }
}

/// Sessions start more often at the first items of a category.
fn popular_start(rng: &mut StdRng, per_category: usize) -> usize {
    let x: f64 = rng.gen();
    ((x * x * x) * per_category as f64) as usize
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demo_shop_has_categories_types_and_sessions() {
        let shop = generate(DemoSize::default(), 1_700_000_000_000);
        assert_eq!(shop.items.len(), 360);
        assert!(shop.events.len() > 5_000, "{}", shop.events.len());
        assert!(shop.events.windows(2).all(|w| w[0].ts <= w[1].ts));
        for kind in [
            EventType::View,
            EventType::AddToCart,
            EventType::Purchase,
            EventType::Rating,
        ] {
            assert!(shop.events.iter().any(|e| e.kind == kind), "no {kind:?}");
        }
        let again = generate(DemoSize::default(), 1_700_000_000_000);
        assert_eq!(shop.events, again.events, "the demo is seeded");
    }
}
