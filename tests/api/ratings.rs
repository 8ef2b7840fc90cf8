//! Shopper satisfaction: rating summaries per item and per category
//! (`GET /v1/items/{item_id}/stats`) and in the profile, worked out by hand
//! on a small shop with known dates.

use recd::clock::format_timestamp;
use recd::ingest::parse_timestamp;
use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

const DAY: i64 = 24 * 3600 * 1000;

fn rating(user: &str, item: &str, value: f64, ts: i64) -> Value {
    json!({"user_id": user, "item_id": item, "type": "rating", "value": value, "timestamp": format_timestamp(ts)})
}

async fn post_events(app: &TestApp, events: Vec<Value>) {
    let count = events.len();
    let reply: Value = app
        .post("/v1/events", &json!({"events": events}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], count, "{reply}");
}

async fn stats_of(app: &TestApp, item: &str) -> Value {
    let response = app.get(&format!("/v1/items/{item}/stats")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A summary as the API writes it.
fn summary(count: i64, mean: Value, last: (i64, Value), previous: (i64, Value), trend: Value) -> Value {
    json!({"count": count, "mean": mean,
           "last_30_days": {"count": last.0, "mean": last.1},
           "previous_30_days": {"count": previous.0, "mean": previous.1},
           "trend": trend})
}

fn none() -> Value {
    Value::Null
}

async fn put_shop(app: &TestApp) {
    for (item, categories) in [
        ("shoe-1", json!(["shoes", "sale", "shoes"])),
        ("shoe-2", json!(["shoes"])),
        ("hat-1", json!(["hats"])),
    ] {
        let response = app
            .put(&format!("/v1/items/{item}"), &json!({"categories": categories}))
            .await;
        assert_eq!(response.status(), 200);
    }
}

/// Means, counts and the 30-day trend of items and categories, by hand:
/// a user's newest rating of an item replaces their older ones, windows
/// are measured back from the newest event in the store, a rating exactly
/// 30 days old is in the previous window.
async fn item_and_category_summaries_by_hand(app: TestApp) {
    put_shop(&app).await;

    // Before any event: nothing rated, and no time to measure from.
    let empty = stats_of(&app, "shoe-1").await;
    assert_eq!(empty["as_of"], Value::Null);
    let nothing = summary(0, none(), (0, none()), (0, none()), none());
    assert_eq!(empty["ratings"], nothing);
    assert_eq!(
        empty["categories"],
        json!([{"category": "shoes", "ratings": nothing}, {"category": "sale", "ratings": nothing}]),
        "each category once, in the item's order"
    );

    // "Now" is the newest event: zed's view at T.
    let t = parse_timestamp("2025-03-02T12:00:00Z").unwrap();
    post_events(
        &app,
        vec![
            // shoe-1: ann changed her mind (2, then 5: the 5 counts, in the
            // last 30 days); bob 2 at 45 days, dan 3 at exactly 30 days
            // (previous window); cid 4 at 10 days; eve 1 at 90 days (in
            // neither window, in the overall figures).
            rating("ann", "shoe-1", 2.0, t - 40 * DAY),
            rating("ann", "shoe-1", 5.0, t - 5 * DAY),
            rating("bob", "shoe-1", 2.0, t - 45 * DAY),
            rating("cid", "shoe-1", 4.0, t - 10 * DAY),
            rating("dan", "shoe-1", 3.0, t - 30 * DAY),
            rating("eve", "shoe-1", 1.0, t - 90 * DAY),
            // shoe-2: two recent ratings, none before.
            rating("ann", "shoe-2", 4.0, t - DAY),
            rating("bob", "shoe-2", 3.0, t - 2 * DAY),
            // hat-1: one rating 50 days old.
            rating("cid", "hat-1", 1.0, t - 50 * DAY),
            // An item in no category (made by the event).
            rating("eve", "plain-1", 5.0, t - 3 * DAY),
            json!({"user_id": "zed", "item_id": "hat-1", "type": "view", "timestamp": format_timestamp(t)}),
        ],
    )
    .await;
    app.refresh_figures().await;

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for metric in [
        "recd_rating_stats_refresh_seconds",
        "recd_rating_stats_computed_at_seconds",
        "recd_rating_stats_categories",
    ] {
        assert!(metrics.contains(metric), "{metric} is not in /metrics");
    }

    let shoe = stats_of(&app, "shoe-1").await;
    assert_eq!(shoe["item_id"], "shoe-1");
    assert_eq!(shoe["as_of"], "2025-03-02T12:00:00.000Z");
    assert_eq!(shoe["categories_as_of"], "2025-03-02T12:00:00.000Z");
    // 5 + 2 + 4 + 3 + 1 = 15 over 5; last: (5 + 4) / 2; previous: (2 + 3) / 2.
    let shoe_1 = summary(5, json!(3.0), (2, json!(4.5)), (2, json!(2.5)), json!(2.0));
    assert_eq!(shoe["ratings"], shoe_1);
    // shoes = shoe-1 and shoe-2: 15 + 7 = 22 over 7 = 3.1429; last: (9 + 7) / 4 = 4;
    // previous: shoe-1's 2.5; trend 1.5. sale = shoe-1 alone.
    assert_eq!(
        shoe["categories"],
        json!([
            {"category": "shoes", "ratings": summary(7, json!(3.1429), (4, json!(4.0)), (2, json!(2.5)), json!(1.5))},
            {"category": "sale", "ratings": shoe_1},
        ])
    );

    let shoe_2 = stats_of(&app, "shoe-2").await;
    assert_eq!(
        shoe_2["ratings"],
        summary(2, json!(3.5), (2, json!(3.5)), (0, none()), none()),
        "no trend without ratings in the previous window"
    );
    let hat = stats_of(&app, "hat-1").await;
    assert_eq!(
        hat["ratings"],
        summary(1, json!(1.0), (0, none()), (1, json!(1.0)), none())
    );
    assert_eq!(hat["categories"][0]["ratings"], hat["ratings"]);
    let plain = stats_of(&app, "plain-1").await;
    assert_eq!(plain["ratings"]["count"], 1);
    assert_eq!(plain["categories"], json!([]));

    // ann rates shoe-2 again, 2 this time: the item's figures change at
    // once (her 4 is replaced), the category's with the next refresh.
    post_events(&app, vec![rating("ann", "shoe-2", 2.0, t)]).await;
    let shoe_2 = stats_of(&app, "shoe-2").await;
    assert_eq!(
        shoe_2["ratings"],
        summary(2, json!(2.5), (2, json!(2.5)), (0, none()), none())
    );
    app.refresh_figures().await;
    let shoe_2 = stats_of(&app, "shoe-2").await;
    // shoes: 15 + 5 = 20 over 7 = 2.8571; last: (9 + 5) / 4 = 3.5; trend 1.
    assert_eq!(
        shoe_2["categories"][0],
        json!({"category": "shoes", "ratings": summary(7, json!(2.8571), (4, json!(3.5)), (2, json!(2.5)), json!(1.0))})
    );

    // A category change in the catalogue moves the item's ratings with it.
    let response = app.put("/v1/items/hat-1", &json!({"categories": ["shoes"]})).await;
    assert_eq!(response.status(), 200);
    app.refresh_figures().await;
    let shoe_2 = stats_of(&app, "shoe-2").await;
    assert_eq!(shoe_2["categories"][0]["ratings"]["count"], 8);
    assert_eq!(shoe_2["categories"][0]["ratings"]["previous_30_days"]["count"], 3);

    // An erased user's ratings leave every figure.
    assert_eq!(app.delete("/v1/users/eve").await.status(), 200);
    assert_eq!(stats_of(&app, "shoe-1").await["ratings"]["count"], 4);
    app.refresh_figures().await;
    assert_eq!(stats_of(&app, "shoe-2").await["categories"][0]["ratings"]["count"], 7);
}

/// Unknown and deleted items are 404; an invalid id is 422 naming it.
async fn stats_of_unknown_deleted_and_invalid_items(app: TestApp) {
    let body = problem(app.get("/v1/items/nothing-here/stats").await, 404).await;
    assert!(body["detail"].as_str().unwrap().contains("nothing-here"), "{body}");

    put_shop(&app).await;
    post_events(&app, vec![rating("ann", "shoe-1", 4.0, 1_700_000_000_000)]).await;
    assert_eq!(app.get("/v1/items/shoe-1/stats").await.status(), 200);
    assert_eq!(app.delete("/v1/items/shoe-1").await.status(), 204);
    problem(app.get("/v1/items/shoe-1/stats").await, 404).await;

    let long = "x".repeat(129);
    let body = problem(app.get(&format!("/v1/items/{long}/stats")).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "item_id");
    let body = problem(app.get("/v1/items/bad%01id/stats").await, 422).await;
    assert_eq!(body["errors"][0]["field"], "item_id");
}

/// The profile's ratings: the shopper's mean (newest rating of each item)
/// against the shop's (by the same rule, over `stats_window`).
async fn profile_ratings_against_the_shop(app: TestApp) {
    let t = parse_timestamp("2025-03-02T12:00:00Z").unwrap();
    post_events(
        &app,
        vec![
            rating("ann", "a", 1.0, t - 3 * DAY),
            rating("ann", "a", 5.0, t - 2 * DAY),
            rating("ann", "b", 4.0, t - DAY),
            rating("bob", "a", 2.0, t - DAY),
            rating("bob", "c", 3.0, t),
            json!({"user_id": "zed", "item_id": "a", "type": "view", "timestamp": format_timestamp(t)}),
        ],
    )
    .await;
    app.refresh_figures().await;
    // The shop: ann 5 and 4, bob 2 and 3 (ann's 1 replaced): 14 / 4 = 3.5.
    let ann: Value = app.get("/v1/users/ann/profile").await.json().await.unwrap();
    assert_eq!(ann["ratings"], json!({"count": 2, "mean": 4.5, "shop_mean": 3.5}));
    let zed: Value = app.get("/v1/users/zed/profile").await.json().await.unwrap();
    assert_eq!(zed["ratings"], json!({"count": 0, "mean": null, "shop_mean": 3.5}));
    // bob rates once more: 14 - 3 + 1 = 12 over 4 = 3 for the shop once
    // refreshed; bob's own mean at once.
    post_events(&app, vec![rating("bob", "c", 1.0, t)]).await;
    let bob: Value = app.get("/v1/users/bob/profile").await.json().await.unwrap();
    assert_eq!(bob["ratings"]["mean"], 1.5);
    app.refresh_figures().await;
    let bob: Value = app.get("/v1/users/bob/profile").await.json().await.unwrap();
    assert_eq!(bob["ratings"], json!({"count": 2, "mean": 1.5, "shop_mean": 3.0}));
}

crate::both_stores!(
    item_and_category_summaries_by_hand,
    stats_of_unknown_deleted_and_invalid_items,
    profile_ratings_against_the_shop,
);
