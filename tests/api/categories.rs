//! Categories from behaviour: items without categories get the categories
//! of the items shoppers treat them like (`suggested_categories` on
//! `GET /v1/items/{item_id}`), and the category filters use them when the
//! shop allows it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recd::config::Settings;
use serde_json::{json, Value};

use crate::helpers::TestApp;
use crate::serving::{fast, ids, recommend, train_now};

const CATEGORIES: [&str; 4] = ["lamps", "rugs", "mugs", "socks"];
const PER_CATEGORY: usize = 30;
/// The first this many items of each category are sent without categories.
const UNLABELLED: usize = 2;

fn item(category: usize, k: usize) -> String {
    // Ids that do not give the category away.
    format!("item-{}", k * CATEGORIES.len() + category)
}

/// A shop where behaviour determines the category: each shopper views
/// items of one category only; the first items of each category are sent
/// with no categories. Returns the items sent without categories, each
/// with its true category.
async fn seed(app: &TestApp) -> Vec<(String, &'static str)> {
    let mut items = Vec::new();
    let mut unlabelled = Vec::new();
    for (c, name) in CATEGORIES.iter().enumerate() {
        for k in 0..PER_CATEGORY {
            let categories = if k < UNLABELLED {
                unlabelled.push((item(c, k), *name));
                json!([])
            } else {
                json!([name])
            };
            items.push(json!({"item_id": item(c, k), "categories": categories}));
        }
    }
    assert_eq!(app.post("/v1/items", &json!({"items": items})).await.status(), 200);
    let mut rng = StdRng::seed_from_u64(7);
    let start = chrono::Utc::now().timestamp_millis() - 86_400_000;
    let mut events = Vec::new();
    for u in 0..240 {
        let c = u % CATEGORIES.len();
        for step in 0..15 {
            let k = rng.gen_range(0..PER_CATEGORY);
            events.push(
                json!({"user_id": format!("shopper-{u}"), "item_id": item(c, k), "type": "view",
                               "timestamp": recd::clock::format_timestamp(start + (u * 100 + step) as i64 * 1000)}),
            );
        }
    }
    for chunk in events.chunks(1000) {
        let reply: Value = app
            .post("/v1/events", &json!({"events": chunk}))
            .await
            .json()
            .await
            .unwrap();
        assert!(
            reply["rejected"].as_array().unwrap().is_empty(),
            "{}",
            reply["rejected"][0]
        );
    }
    app.refresh_figures().await;
    let model = train_now(app).await;
    assert_eq!(model["last_training"]["outcome"], "published", "{model}");
    unlabelled
}

async fn item_json(app: &TestApp, id: &str) -> Value {
    let reply = app.get(&format!("/v1/items/{id}")).await;
    assert_eq!(reply.status(), 200, "{id}");
    reply.json().await.unwrap()
}

fn popular_ids(reply: &Value) -> Vec<String> {
    ids(reply)
}

pub fn shop(settings: &mut Settings) {
    fast(settings);
    // Publish whatever the training makes: this test is about what a
    // served model suggests, not about the gate.
    settings.gate_margin = -1.0;
    settings.train.max_epochs = 10;
    settings.train.patience = 10;
}

pub fn shop_with_filters(settings: &mut Settings) {
    shop(settings);
    settings.suggested_categories_in_filters = true;
    settings.suggested_category_min_confidence = 0.4;
}

async fn suggested_categories_follow_behaviour(app: TestApp) {
    let unlabelled = seed(&app).await;
    for (id, truth) in &unlabelled {
        let body = item_json(&app, id).await;
        assert_eq!(body["categories"], json!([]));
        let suggested = body["suggested_categories"].as_array().expect("a list");
        assert!(!suggested.is_empty() && suggested.len() <= 3, "{body}");
        assert_eq!(suggested[0]["category"], *truth, "{id}: {body}");
        let confidences: Vec<f64> = suggested.iter().map(|s| s["confidence"].as_f64().unwrap()).collect();
        assert!(confidences[0] > 0.4 && confidences[0] <= 1.0, "{body}");
        assert!(confidences.windows(2).all(|w| w[0] >= w[1]), "best first: {body}");
        assert!(confidences.iter().sum::<f64>() <= 1.0 + 1e-3, "{body}");
    }
    // Items with categories get none; so do items the model never saw.
    assert_eq!(item_json(&app, &item(0, 5)).await["suggested_categories"], json!([]));
    assert_eq!(app.put("/v1/items/new-one", &json!({})).await.status(), 200);
    assert_eq!(item_json(&app, "new-one").await["suggested_categories"], json!([]));

    // The setting is off: the category filters see only real categories.
    let popular: Value = app.get("/v1/popular?category=lamps&n=100").await.json().await.unwrap();
    let listed = popular_ids(&popular);
    assert_eq!(listed.len(), PER_CATEGORY - UNLABELLED, "{popular}");
    assert!(!listed.contains(&item(0, 0)), "{popular}");
    let recommended = recommend(&app, "shopper-0", "category=lamps&n=100&exclude=none").await;
    assert!(!ids(&recommended).contains(&item(0, 0)), "{recommended}");
}

async fn category_filters_use_suggestions_when_allowed(app: TestApp) {
    let unlabelled = seed(&app).await;
    let popular: Value = app.get("/v1/popular?category=lamps&n=100").await.json().await.unwrap();
    let listed = popular_ids(&popular);
    assert!(
        listed.contains(&item(0, 0)) && listed.contains(&item(0, 1)),
        "{popular}"
    );
    assert_eq!(listed.len(), PER_CATEGORY, "{popular}");
    for (id, truth) in &unlabelled {
        let body = item_json(&app, id).await;
        assert_eq!(listed.contains(id), *truth == "lamps", "{id}: {body} {popular}");
    }
    let recommended = recommend(&app, "shopper-0", "category=lamps&n=100&exclude=none").await;
    assert!(ids(&recommended).contains(&item(0, 0)), "{recommended}");
    assert!(!ids(&recommended).contains(&item(1, 0)), "{recommended}");
    let similar: Value = app
        .get(&format!("/v1/items/{}/similar?category=rugs&n=100", item(1, 5)))
        .await
        .json()
        .await
        .unwrap();
    assert!(ids(&similar).contains(&item(1, 0)), "{similar}");

    // The metric counts the items with a suggestion.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("recd_suggested_categories_items"), "gauge exported");
}

mod off {
    crate::both_stores!(with crate::categories::shop; suggested_categories_follow_behaviour);
    use super::suggested_categories_follow_behaviour;
}

mod on {
    crate::both_stores!(with crate::categories::shop_with_filters; category_filters_use_suggestions_when_allowed);
    use super::category_filters_use_suggestions_when_allowed;
}
