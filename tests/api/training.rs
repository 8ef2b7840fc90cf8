//! Training from the store: events POSTed through the API, with the
//! catalogue's categories, become a model whose snapshot, saved in the store
//! and loaded back, scores the same.

use recd::domain::{EventType, NewEvent};
use recd::model::{train_and_evaluate, Dataset, ModelSnapshot, TrainConfig};
use recd::trainer::read_training_data;
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

    let rows = app.store.training_events_upto(i64::MAX).await.unwrap();
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
            .save_snapshot(
                &recd::store::SnapshotRow {
                    version: &version,
                    created_at_ms: 1,
                    meta: &serde_json::to_string(&snapshot.meta).unwrap(),
                    bytes: &bytes,
                    index: None,
                },
                5,
            )
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

const DAY_MS: i64 = 86_400_000;

/// The training window, streamed from the store, holds the same sequences
/// as reading every event at once; bounded by count or by age, it keeps the
/// newest events.
async fn the_training_window_is_streamed_and_bounded(app: TestApp) {
    // 30 shoppers with one view a day for ten days; the newest day is today.
    let first_day = chrono::Utc::now().timestamp_millis() - 9 * DAY_MS;
    let mut events = Vec::new();
    for day in 0..10 {
        for u in 0..30 {
            events.push(NewEvent {
                event_id: Some(format!("e-{u}-{day}")),
                user_id: format!("u{u}"),
                item_id: format!("i{}", (u * 7 + day * 3) % 50),
                kind: EventType::View,
                value: None,
                ts: first_day + day as i64 * DAY_MS + u as i64,
                timestamped: true,
                session_id: None,
                recommendation_id: None,
            });
        }
    }
    // Stored out of time order: the window is read in time order anyway.
    events.reverse();
    app.store.insert_events(&events, first_day).await.unwrap();

    let every = Dataset::from_events(app.store.training_events_upto(i64::MAX).await.unwrap());
    let unbounded = TrainConfig {
        window_days: 0.0,
        window_events: 0,
        ..TrainConfig::default()
    };
    let read = read_training_data(&app.store, &unbounded, None).await.unwrap();
    assert_eq!(read.data.events, 300);
    assert_eq!(read.data.sequences, every.sequences);
    assert_eq!(read.data.user_ids, every.user_ids);
    assert_eq!(read.data.item_ids, every.item_ids);
    assert_eq!(read.data.newest_ms, every.newest_ms);
    assert_eq!(read.last_ts.len(), 30);
    assert_eq!(read.last_ts["u3"], first_day + 9 * DAY_MS + 3);

    // The newest 60 events: the last two days of each shopper.
    let by_count = TrainConfig {
        window_events: 60,
        ..unbounded.clone()
    };
    let read = read_training_data(&app.store, &by_count, None).await.unwrap();
    assert_eq!(read.data.events, 60);
    assert!(read.data.sequences.iter().all(|s| s.len() == 2));
    let tail: Vec<_> = every.sequences.iter().map(|s| &s[8..]).collect();
    let mapped: Vec<Vec<String>> = read
        .data
        .sequences
        .iter()
        .map(|s| {
            s.iter()
                .map(|step| read.data.item_ids[step.item as usize - 1].clone())
                .collect()
        })
        .collect();
    let expected: Vec<Vec<String>> = tail
        .iter()
        .map(|s| {
            s.iter()
                .map(|step| every.item_ids[step.item as usize - 1].clone())
                .collect()
        })
        .collect();
    assert_eq!(mapped, expected);

    // 3.5 days back from the newest event: days 6 to 9.
    let by_age = TrainConfig {
        window_days: 3.5,
        ..unbounded.clone()
    };
    let read = read_training_data(&app.store, &by_age, None).await.unwrap();
    assert_eq!(read.data.events, 120);
    // Both bounds: the tighter one holds.
    let both = TrainConfig {
        window_days: 3.5,
        window_events: 90,
        ..unbounded
    };
    assert_eq!(
        read_training_data(&app.store, &both, None).await.unwrap().data.events,
        90
    );
}

crate::both_stores!(
    events_train_into_a_snapshot_that_loads_back,
    the_training_window_is_streamed_and_bounded
);
