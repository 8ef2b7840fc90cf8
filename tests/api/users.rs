//! Erasure.

use serde_json::{json, Value};

use crate::helpers::TestApp;

async fn erasing_a_user_removes_their_events_and_ids(app: TestApp) {
    let events = json!({"events": [
        {"event_id": "a1", "user_id": "alice", "item_id": "x", "type": "view"},
        {"event_id": "a2", "user_id": "alice", "item_id": "y", "type": "purchase", "value": 10},
        {"event_id": "b1", "user_id": "bob", "item_id": "x", "type": "view"},
    ]});
    app.post("/v1/events", &events).await;

    let response = app.delete("/v1/users/alice").await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply, json!({"deleted_events": 2}));
    assert_eq!(app.store.count_events().await.unwrap(), 1, "bob's event stays");

    // Her event ids are forgotten with her: the same id later is new.
    let again = json!({"events": [{"event_id": "a1", "user_id": "alice", "item_id": "x", "type": "view"}]});
    let reply: Value = app.post("/v1/events", &again).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 1);

    let reply: Value = app.delete("/v1/users/nobody").await.json().await.unwrap();
    assert_eq!(reply, json!({"deleted_events": 0}));
}

crate::both_stores!(erasing_a_user_removes_their_events_and_ids);
