//! Training from the store: events POSTed through the API, with the
//! catalogue's categories, become a model whose snapshot, saved in the store
//! and loaded back, scores the same.

use recd::model::{train_and_evaluate, Dataset, ModelSnapshot, TrainConfig};
use serde_json::{json, Value};

use crate::helpers::TestApp;

async fn events_train_into_a_snapshot_that_loads_back(app: TestApp) {
    // 40 shoppers who view fillers, then a, b and go on to c.
    let mut events = Vec::new();
    for u in 0..40 {
        for (i, item) in [format!("filler-{}", u % 7), "a".into(), "b".into(), "c".into()]
            .iter()
            .enumerate()
        {
            events.push(
                json!({"event_id": format!("e-{u}-{i}"), "user_id": format!("u{u}"), "item_id": item,
                               "type": "view", "timestamp": format!("2026-01-01T00:{:02}:{:02}Z", u, i)}),
            );
        }
    }
    let reply: Value = app
        .post("/v1/events", &json!({"events": events}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], 160);

    // The catalogue's categories reach the model: each item's first one.
    for (item, categories) in [
        ("a", json!(["shoes", "sale"])),
        ("b", json!(["socks"])),
        ("c", json!([])),
    ] {
        let put = app
            .put(&format!("/v1/items/{item}"), &json!({"categories": categories}))
            .await;
        assert!(put.status().is_success(), "PUT {item}: {}", put.status());
    }
    let primary = app.store.primary_categories().await.unwrap();
    assert_eq!(primary.len(), 2, "{primary:?}");
    assert_eq!(primary["a"], "shoes");
    assert_eq!(primary["b"], "socks");

    let rows = app.store.training_events().await.unwrap();
    assert_eq!(rows.len(), 160);
    let config = TrainConfig {
        dim: 8,
        hidden: 8,
        max_epochs: 3,
        ..TrainConfig::default()
    };
    let mut data = Dataset::from_events(rows);
    data.set_categories(&primary);
    assert_eq!(data.categories, 2);
    let (snapshot, report) = train_and_evaluate(&data, &config, false).unwrap();
    assert_eq!(report.data.users, 40);
    let bytes = snapshot.to_bytes().unwrap();
    for _ in 0..2 {
        let version = format!("{}-{}", snapshot.meta.version, uuid::Uuid::new_v4());
        app.store
            .save_snapshot(&version, 1, &serde_json::to_string(&snapshot.meta).unwrap(), &bytes, 5)
            .await
            .unwrap();
    }
    let (version, stored) = app.store.latest_snapshot().await.unwrap().expect("a snapshot");
    assert_eq!(app.store.latest_snapshot_version().await.unwrap(), Some(version));
    let loaded = ModelSnapshot::from_bytes(&stored).unwrap();

    let history = data.sequences[0][..2].to_vec();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    snapshot.score_user(&history, snapshot.user_state(&history, 50).as_ref(), &mut before);
    loaded.score_user(&history, loaded.user_state(&history, 50).as_ref(), &mut after);
    assert_eq!(before, after);
    assert_eq!(loaded.item_ids, snapshot.item_ids);
}

crate::both_stores!(events_train_into_a_snapshot_that_loads_back);
