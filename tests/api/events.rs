//! `POST /v1/events`: validation, partial acceptance, idempotency, limits.

use std::io::Write;

use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

fn view(event_id: &str, user: &str, item: &str) -> Value {
    json!({"event_id": event_id, "user_id": user, "item_id": item, "type": "view",
           "timestamp": "2024-05-01T10:00:00Z"})
}

async fn accepted_and_stored_once_across_retries(app: TestApp) {
    let batch = json!({"events": [view("e1", "u1", "a"), view("e2", "u1", "b"), view("e1", "u1", "a")]});
    let reply: Value = app.post("/v1/events", &batch).await.json().await.unwrap();
    assert_eq!(reply, json!({"accepted": 2, "duplicates": 1, "rejected": []}));

    // The collector did not see the reply and sends the batch again.
    let reply: Value = app.post("/v1/events", &batch).await.json().await.unwrap();
    assert_eq!(reply, json!({"accepted": 0, "duplicates": 3, "rejected": []}));
    assert_eq!(app.store.count_events().await.unwrap(), 2);

    // An id the user sent before, at the same time, is a duplicate whatever
    // its other fields say; from another user it is another event.
    let changed = json!({"events": [{"event_id": "e2", "user_id": "u1", "item_id": "z", "type": "purchase",
                                     "timestamp": "2024-05-01T10:00:00Z"}]});
    let reply: Value = app.post("/v1/events", &changed).await.json().await.unwrap();
    assert_eq!(reply["duplicates"], 1);
    let other_user = json!({"events": [view("e2", "u9", "b")]});
    let reply: Value = app.post("/v1/events", &other_user).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 1);
    assert_eq!(app.store.count_events().await.unwrap(), 3);

    // Sent without a timestamp (stamped on arrival), a retry is still
    // recognised by its id.
    let untimed = json!({"events": [{"event_id": "e3", "user_id": "u1", "item_id": "c", "type": "view"}]});
    let reply: Value = app.post("/v1/events", &untimed).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 1);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let reply: Value = app.post("/v1/events", &untimed).await.json().await.unwrap();
    assert_eq!(reply, json!({"accepted": 0, "duplicates": 1, "rejected": []}));

    // Events without an id are simply stored.
    let anonymous = json!({"events": [{"user_id": "u1", "item_id": "a", "type": "click"},
                                      {"user_id": "u1", "item_id": "a", "type": "click"}]});
    let reply: Value = app.post("/v1/events", &anonymous).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 2);
    assert_eq!(app.store.count_events().await.unwrap(), 6);
}

async fn invalid_events_are_named_and_the_rest_kept(app: TestApp) {
    let batch = json!({"events": [
        view("ok-1", "u1", "a"),
        {"user_id": "u1", "item_id": "a", "type": "teleport"},
        {"user_id": "u1", "type": "view"},
        {"user_id": "u1", "item_id": "a", "type": "rating", "value": 9},
        {"user_id": "u1", "item_id": "a", "type": "view", "timestamp": "2999-01-01T00:00:00Z"},
        {"user_id": "u1", "item_id": "x".repeat(129), "type": "view"},
        {"user_id": 42, "item_id": "a", "type": "view", "timestamp": "last tuesday"},
        "not an object",
        view("ok-2", "u2", "b"),
    ]});
    let response = app.post("/v1/events", &batch).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["accepted"], 2);
    let rejected = reply["rejected"].as_array().unwrap();
    let named: Vec<(u64, Vec<&str>)> = rejected
        .iter()
        .map(|r| {
            let fields = r["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            (r["index"].as_u64().unwrap(), fields)
        })
        .collect();
    assert_eq!(
        named,
        vec![
            (1, vec!["type"]),
            (2, vec!["item_id"]),
            (3, vec!["value"]),
            (4, vec!["timestamp"]),
            (5, vec!["item_id"]),
            (6, vec!["user_id", "timestamp"]),
            (7, vec!["event"]),
        ]
    );
    assert!(rejected[0]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("teleport"));
    assert_eq!(app.store.count_events().await.unwrap(), 2);
}

async fn malformed_bodies_store_nothing(app: TestApp) {
    let response = app
        .client
        .post(app.at("/v1/events"))
        .header("content-type", "application/json")
        .body("{\"events\": [")
        .send()
        .await
        .unwrap();
    problem(response, 400).await;
    problem(app.post("/v1/events", &json!({"event": []})).await, 400).await;
    problem(app.post("/v1/events", &json!([view("a", "u", "i")])).await, 400).await;

    let empty = problem(app.post("/v1/events", &json!({"events": []})).await, 422).await;
    assert_eq!(empty["errors"][0]["field"], "events");
    let many: Vec<Value> = (0..1001).map(|i| view(&format!("e{i}"), "u", "i")).collect();
    let too_many = problem(app.post("/v1/events", &json!({"events": many})).await, 422).await;
    assert_eq!(too_many["errors"][0]["field"], "events");
    assert_eq!(app.store.count_events().await.unwrap(), 0);
}

async fn a_full_batch_of_1000_is_taken(app: TestApp) {
    let many: Vec<Value> = (0..1000)
        .map(|i| view(&format!("e{i}"), &format!("u{}", i % 7), &format!("i{}", i % 50)))
        .collect();
    let reply: Value = app
        .post("/v1/events", &json!({"events": many}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], 1000);
    assert_eq!(app.store.count_events().await.unwrap(), 1000);
}

async fn oversized_bodies_are_413(app: TestApp) {
    let padding = "x".repeat(1024 * 1024);
    let response = app
        .client
        .post(app.at("/v1/events"))
        .header("content-type", "application/json")
        .body(format!("{{\"events\": [], \"pad\": \"{padding}\"}}"))
        .send()
        .await
        .unwrap();
    problem(response, 413).await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

async fn gzip_bodies_are_accepted(app: TestApp) {
    let body = json!({"events": [view("g1", "u1", "a"), view("g2", "u1", "b")]});
    let response = app
        .client
        .post(app.at("/v1/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(body.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["accepted"], 2);

    // Small on the wire, past 5 MiB once inflated.
    let bomb = format!("{{\"events\": [], \"pad\": \"{}\"}}", " ".repeat(6 * 1024 * 1024));
    let response = app
        .client
        .post(app.at("/v1/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(bomb.as_bytes()))
        .send()
        .await
        .unwrap();
    problem(response, 413).await;
}

async fn items_named_by_events_exist(app: TestApp) {
    app.post("/v1/events", &json!({"events": [view("e1", "u1", "new-item")]}))
        .await;
    let response = app.get("/v1/items/new-item").await;
    assert_eq!(response.status(), 200);
    let item: Value = response.json().await.unwrap();
    assert_eq!(item["item_id"], "new-item");
    assert_eq!(item["categories"], json!([]));
    assert_eq!(item["available"], true);
}

crate::both_stores!(
    accepted_and_stored_once_across_retries,
    invalid_events_are_named_and_the_rest_kept,
    malformed_bodies_store_nothing,
    a_full_batch_of_1000_is_taken,
    oversized_bodies_are_413,
    gzip_bodies_are_accepted,
    items_named_by_events_exist,
);
