//! Browsing for the dashboard: the catalogue searched a page at a time
//! (`GET /v1/items`), and a shopper's events newest first
//! (`GET /v1/users/{user_id}/events`), also with de-identified storage.

use std::collections::BTreeSet;

use recd::config::Settings;
use recd::store::IdKey;
use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

async fn get_json(app: &TestApp, path: &str) -> Value {
    let reply = app.get(path).await;
    assert_eq!(reply.status(), 200, "{path}");
    reply.json().await.unwrap()
}

/// Every page of a listing: the items (or events) in order, and the page
/// sizes.
async fn every_page(app: &TestApp, path: &str, key: &str) -> (Vec<Value>, Vec<usize>) {
    let joiner = if path.contains('?') { '&' } else { '?' };
    let (mut all, mut sizes) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            None => path.to_owned(),
            Some(c) => format!("{path}{joiner}cursor={c}"),
        };
        let page = get_json(app, &url).await;
        let entries = page[key].as_array().unwrap().clone();
        sizes.push(entries.len());
        all.extend(entries);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (all, sizes),
        }
    }
    panic!("more than 100 pages");
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn the_catalogue_is_searched_a_page_at_a_time(app: TestApp) {
    // 30 shoes SHOE-00..29 ("Trail shoe n" for even n, "Boot n" for odd),
    // 12 bags whose titles say "shoe bag", one deleted shoe, one item known
    // only from an event.
    let mut items = Vec::new();
    for n in 0..30 {
        let title = if n % 2 == 0 {
            format!("Trail shoe {n}")
        } else {
            format!("Boot {n}")
        };
        items.push(json!({"item_id": format!("SHOE-{n:02}"), "title": title, "categories": ["shoes", "sale"]}));
    }
    for n in 0..12 {
        items.push(
            json!({"item_id": format!("bag-{n:02}"), "title": format!("Big SHOE bag {n}"),
                          "categories": ["bags"], "price": 10.0 + f64::from(n)}),
        );
    }
    items.push(json!({"item_id": "shoe-gone", "title": "Old shoe", "categories": ["shoes"]}));
    items.push(json!({"item_id": "100%_cotton", "title": "Tee", "categories": ["shirts\"x"]}));
    assert_eq!(app.post("/v1/items", &json!({"items": items})).await.status(), 200);
    assert_eq!(app.delete("/v1/items/shoe-gone").await.status(), 204);
    let event = json!({"events": [{"user_id": "u1", "item_id": "shoebox-1", "type": "view"}]});
    assert_eq!(app.post("/v1/events", &event).await.status(), 200);

    // Everything, by default 20 a page, in id order, each as GET /v1/items/{id}.
    let (all, sizes) = every_page(&app, "/v1/items", "items").await;
    assert_eq!(all.len(), 30 + 12 + 1 + 1, "{sizes:?}");
    assert_eq!(sizes, [20, 20, 4]);
    let listed = ids(&all);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    assert!(
        !listed.contains(&"shoe-gone".to_owned()),
        "deleted items are not listed"
    );
    let one = get_json(&app, "/v1/items/bag-03").await;
    assert_eq!(all.iter().find(|i| i["item_id"] == "bag-03").unwrap(), &one);

    // Id prefix or title substring, ignoring case; pages cover every match once.
    let (shoes, sizes) = every_page(&app, "/v1/items?q=shoe&limit=7", "items").await;
    assert!(sizes.iter().all(|&n| n <= 7), "{sizes:?}");
    let found: BTreeSet<String> = ids(&shoes).into_iter().collect();
    assert_eq!(found.len(), shoes.len(), "no item twice");
    let mut expected: BTreeSet<String> = (0..30).map(|n| format!("SHOE-{n:02}")).collect();
    expected.extend((0..12).map(|n| format!("bag-{n:02}")));
    expected.insert("shoebox-1".to_owned());
    assert_eq!(found, expected);

    // Title only (not a prefix of the id): the even shoes' "Trail".
    let trail = ids(&every_page(&app, "/v1/items?q=TRAIL&limit=100", "items").await.0);
    assert_eq!(
        trail,
        (0..30).step_by(2).map(|n| format!("SHOE-{n:02}")).collect::<Vec<_>>()
    );
    let boot = ids(&every_page(&app, "/v1/items?q=boot 1", "items").await.0);
    assert_eq!(boot, ["SHOE-01", "SHOE-11", "SHOE-13", "SHOE-15", "SHOE-17", "SHOE-19"]);
    // An id matches by its start only: "hoe-" is inside every shoe's id.
    assert!(ids(&every_page(&app, "/v1/items?q=hoe-", "items").await.0).is_empty());

    // Category exactly, alone and with q.
    let bags = ids(&every_page(&app, "/v1/items?category=bags&limit=5", "items").await.0);
    assert_eq!(bags, (0..12).map(|n| format!("bag-{n:02}")).collect::<Vec<_>>());
    let sale = ids(&every_page(&app, "/v1/items?category=sale&q=boot", "items").await.0);
    assert_eq!(sale.len(), 15);
    assert!(ids(&every_page(&app, "/v1/items?category=bag", "items").await.0).is_empty());
    assert!(ids(&every_page(&app, "/v1/items?category=shoes&q=bag", "items").await.0).is_empty());
    let quoted = every_page(&app, "/v1/items?category=shirts%22x", "items").await.0;
    assert_eq!(ids(&quoted), ["100%_cotton"]);

    // LIKE's wildcards match only themselves.
    assert_eq!(
        ids(&every_page(&app, "/v1/items?q=100%25_", "items").await.0),
        ["100%_cotton"]
    );
    assert!(ids(&every_page(&app, "/v1/items?q=%25", "items").await.0).is_empty());
    assert!(ids(&every_page(&app, "/v1/items?q=SHOE_", "items").await.0).is_empty());
    assert!(get_json(&app, "/v1/items?q=nothing-like-it").await["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // Bad parameters are named, all at once.
    for (query, fields) in [
        ("limit=0", vec!["limit"]),
        ("limit=101", vec!["limit"]),
        ("limit=ten", vec!["limit"]),
        ("cursor=zz", vec!["cursor"]),
        ("category=", vec!["category"]),
        ("limit=0&cursor=%21&category=", vec!["category", "limit", "cursor"]),
    ] {
        let body = problem(app.get(&format!("/v1/items?{query}")).await, 422).await;
        let named: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(named, fields, "{query}: {body}");
    }
    let long = "x".repeat(1001);
    let body = problem(app.get(&format!("/v1/items?q={long}")).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "q");
}

/// A shopper with 23 events: 20 at distinct times, 3 at the same time.
async fn add_events(app: &TestApp, user: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(
            json!({"event_id": format!("{user}-{i}"), "user_id": user, "item_id": format!("item-{i}"),
                           "type": if i % 5 == 4 { "purchase" } else { "view" },
                           "value": if i % 5 == 4 { json!(9.5) } else { Value::Null },
                           "session_id": format!("s-{}", i / 10),
                           "timestamp": format!("2026-01-01T10:{i:02}:00.000Z")}),
        );
    }
    for i in 0..3 {
        events.push(
            json!({"event_id": format!("{user}-tie-{i}"), "user_id": user, "item_id": format!("tie-{i}"),
                           "type": "rating", "value": 4,
                           "timestamp": "2026-01-01T09:00:00.000Z"}),
        );
    }
    let reply: Value = app
        .post("/v1/events", &json!({"events": events}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], 23, "{reply}");
    events
}

async fn a_shoppers_events_newest_first(app: TestApp) {
    let user = "shopper-Zq8@example.com";
    add_events(&app, user).await;
    add_events(&app, "someone-else").await;

    let (events, sizes) = every_page(&app, &format!("/v1/users/{user}/events?limit=6"), "events").await;
    assert_eq!(sizes, [6, 6, 6, 5]);
    assert_eq!(events.len(), 23);
    // Newest first; the three at one time, the later arrival first.
    let items: Vec<&str> = events.iter().map(|e| e["item_id"].as_str().unwrap()).collect();
    let mut expected: Vec<String> = (0..20).rev().map(|i| format!("item-{i}")).collect();
    expected.extend(["tie-2", "tie-1", "tie-0"].map(str::to_owned));
    assert_eq!(items, expected);
    assert_eq!(
        events[0],
        json!({"type": "purchase", "item_id": "item-19", "timestamp": "2026-01-01T10:19:00.000Z",
               "value": 9.5, "session_id": "s-1"})
    );
    assert_eq!(events[1]["type"], "view");
    assert_eq!(events[1]["value"], Value::Null);
    assert_eq!(events[22]["type"], "rating");
    assert_eq!(events[22]["session_id"], Value::Null);

    let first = get_json(&app, &format!("/v1/users/{user}/events")).await;
    assert_eq!(first["user_id"], user);
    assert_eq!(first["events"].as_array().unwrap().len(), 23, "default 50 a page");
    assert_eq!(first["next_cursor"], Value::Null);

    // An event arriving while paging does not shift the pages.
    let page = get_json(&app, &format!("/v1/users/{user}/events?limit=10")).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let newer = json!({"events": [{"user_id": user, "item_id": "late", "type": "view"}]});
    assert_eq!(app.post("/v1/events", &newer).await.status(), 200);
    let rest = get_json(&app, &format!("/v1/users/{user}/events?limit=100&cursor={cursor}")).await;
    assert_eq!(
        rest["events"].as_array().unwrap()[..],
        events[10..],
        "the rest, as before"
    );

    // Unknown and erased shoppers are 404; bad parameters 422.
    problem(app.get("/v1/users/nobody/events").await, 404).await;
    for (query, field) in [("limit=0", "limit"), ("limit=501", "limit"), ("cursor=abc", "cursor")] {
        let body = problem(app.get(&format!("/v1/users/{user}/events?{query}")).await, 422).await;
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }
    assert_eq!(app.delete(&format!("/v1/users/{user}")).await.status(), 200);
    problem(app.get(&format!("/v1/users/{user}/events")).await, 404).await;
    problem(app.get(&format!("/v1/users/{user}/events?cursor={cursor}")).await, 404).await;
    let other = get_json(&app, "/v1/users/someone-else/events?limit=500").await;
    assert_eq!(other["events"].as_array().unwrap().len(), 23);
}

pub fn keyed(settings: &mut Settings) {
    settings.id_key = Some(IdKey::parse("5f0c9a3e7d214b6a8e0f1c2d3b4a59687f0e1d2c3b4a5968778695a4b3c2d1e0").unwrap());
}

/// With `id_key` the store holds the ids encrypted; the API takes and
/// gives the shop's own.
async fn events_read_the_same_with_de_identified_storage(app: TestApp) {
    let user = "shopper-Zq8@example.com";
    add_events(&app, user).await;
    let (events, _) = every_page(&app, &format!("/v1/users/{user}/events?limit=5"), "events").await;
    assert_eq!(events.len(), 23);
    let page = get_json(&app, &format!("/v1/users/{user}/events?limit=1")).await;
    assert_eq!(page["user_id"], user);
    assert_eq!(page["events"][0]["session_id"], "s-1");
    assert_eq!(page["events"][0]["item_id"], "item-19");
    let stored: Vec<String> = match app.store.db() {
        recd::store::Db::Sqlite(db) => sqlx::query_scalar("SELECT DISTINCT user_id FROM events")
            .fetch_all(&db.read)
            .await
            .unwrap(),
        recd::store::Db::Postgres(pool) => sqlx::query_scalar("SELECT DISTINCT user_id FROM events")
            .fetch_all(pool)
            .await
            .unwrap(),
    };
    assert!(!stored.iter().any(|u| u.contains("shopper")), "{stored:?}");
    problem(app.get("/v1/users/nobody/events").await, 404).await;
}

crate::both_stores!(
    the_catalogue_is_searched_a_page_at_a_time,
    a_shoppers_events_newest_first
);

mod de_identified {
    use super::events_read_the_same_with_de_identified_storage;
    crate::both_stores!(with crate::browse::keyed; events_read_the_same_with_de_identified_storage);
}
