//! Retention: events older than `events_retention` before the newest event
//! are retired (whole monthly partitions on PostgreSQL, rows on SQLite);
//! idempotency and erasure hold across partitions and after retention.

use std::time::Duration;

use recd::config::Settings;
use recd::store::{Store, StoreOptions};
use serde_json::{json, Value};

use crate::helpers::{Db, TestApp};

fn view(event_id: &str, user: &str, item: &str, timestamp: &str) -> Value {
    json!({"event_id": event_id, "user_id": user, "item_id": item, "type": "view", "timestamp": timestamp})
}

async fn post(app: &TestApp, events: Vec<Value>) -> Value {
    app.post("/v1/events", &json!({ "events": events }))
        .await
        .json()
        .await
        .unwrap()
}

fn sixty_days(settings: &mut Settings) {
    settings.events_retention = Some(Duration::from_secs(60 * 86_400));
}

async fn old_events_are_retired_and_ids_still_hold(app: TestApp) {
    let old = [
        view("j1", "ann", "a", "2025-01-15T10:00:00Z"),
        view("j2", "bob", "b", "2025-01-20T10:00:00Z"),
        view("f1", "ann", "c", "2025-02-10T10:00:00Z"),
    ];
    let recent = vec![
        view("r1", "ann", "d", "2025-06-01T10:00:00Z"),
        view("r2", "bob", "e", "2025-06-05T10:00:00Z"),
        view("r3", "cat", "f", "2025-06-10T10:00:00Z"),
    ];
    let reply = post(&app, old.iter().chain(&recent).cloned().collect()).await;
    assert_eq!(reply["accepted"], 6, "{reply}");
    let postgres = app.database_url.starts_with("postgres");
    let partitions = |names: Vec<(String, i64)>| names.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    if postgres {
        assert_eq!(
            partitions(app.store.event_partitions().await.unwrap()),
            ["events_202501", "events_202502", "events_202506"]
        );
    }

    // 60 days before 2025-06-10: January and February go.
    let retired = app.app.retire_events().await.unwrap();
    if postgres {
        assert_eq!(retired.partitions, 2, "{retired:?}");
        assert_eq!(
            partitions(app.store.event_partitions().await.unwrap()),
            ["events_202506"]
        );
    }
    if !postgres {
        assert_eq!(retired.rows, 3, "{retired:?}");
    }
    assert_eq!(app.store.count_events().await.unwrap(), 3);
    let ann = app.store.user_events("ann", 100).await.unwrap();
    assert_eq!(ann.iter().map(|e| e.item_id.as_str()).collect::<Vec<_>>(), ["d"]);

    // Retries of kept events are still duplicates.
    let reply = post(&app, recent.clone()).await;
    assert_eq!(reply, json!({"accepted": 0, "duplicates": 3, "rejected": []}));
    // An event for a retired month is stored again (its partition made
    // anew), and retired again on the next pass.
    let reply = post(&app, vec![view("j3", "dan", "g", "2025-01-25T10:00:00Z")]).await;
    assert_eq!(reply["accepted"], 1, "{reply}");
    app.app.retire_events().await.unwrap();
    assert_eq!(app.store.count_events().await.unwrap(), 3);
    // Nothing to retire: nothing changes.
    assert_eq!(app.app.retire_events().await.unwrap().partitions, 0);

    // Erasure reaches every partition, and the user's ids go with them.
    let reply = post(&app, vec![view("m1", "cat", "h", "2025-05-20T10:00:00Z")]).await;
    assert_eq!(reply["accepted"], 1);
    let erased: Value = app.delete("/v1/users/cat").await.json().await.unwrap();
    assert_eq!(erased["deleted_events"], 2);
    assert!(app.store.user_events("cat", 100).await.unwrap().is_empty());
    let reply = post(&app, vec![view("r3", "cat", "f", "2025-06-10T10:00:00Z")]).await;
    assert_eq!(reply["accepted"], 1, "stored as new once erased: {reply}");
}

crate::both_stores!(with super::sixty_days; old_events_are_retired_and_ids_still_hold);

/// A store made by the previous version (migrations up to 0003) with events
/// in it moves into the new schema when recd opens it: every event kept
/// with its arrival number, later arrivals numbered after them, ids per
/// user from then on.
async fn an_existing_store_migrates_in_place(db: Db) {
    use sqlx::migrate::MigrateDatabase;
    let Some((url, _dir)) = crate::helpers::fresh_database(db).await else {
        return;
    };
    let folder = match db {
        Db::Sqlite => "sqlite",
        Db::Postgres => "postgres",
    };
    let earlier = tempfile::tempdir().unwrap();
    for name in ["0001_init.sql", "0002_snapshots.sql", "0003_serving.sql"] {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(folder)
            .join(name);
        std::fs::copy(from, earlier.path().join(name)).unwrap();
    }
    let migrator = sqlx::migrate::Migrator::new(earlier.path()).await.unwrap();
    let insert = "INSERT INTO events (event_id, user_id, item_id, kind, ts, received_at) VALUES ($1, $2, $3, 0, $4, 0)";
    let rows = [
        ("e1", "ann", "a", 1_735_700_000_000i64),
        ("e2", "bob", "b", 1_740_000_000_000),
        ("e3", "ann", "c", 1_745_000_000_000),
    ];
    // The previous version's store, with its events: the same steps on
    // either database.
    macro_rules! earlier_store {
        ($db:ty, $pool:ty) => {{
            <$db>::create_database(&url).await.unwrap();
            let pool = <$pool>::connect(&url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            for (id, user, item, ts) in rows {
                let query = sqlx::query(insert).bind(id).bind(user).bind(item).bind(ts);
                query.execute(&pool).await.unwrap();
            }
            pool.close().await;
        }};
    }
    match db {
        Db::Sqlite => earlier_store!(sqlx::Sqlite, sqlx::SqlitePool),
        Db::Postgres => earlier_store!(sqlx::Postgres, sqlx::PgPool),
    }

    let store = Store::open(&url, &StoreOptions::default()).await.expect("migrated");
    assert_eq!(store.count_events().await.unwrap(), 3);
    let ann = store.user_events("ann", 10).await.unwrap();
    assert_eq!(
        ann.iter().map(|e| (e.item_id.as_str(), e.seq)).collect::<Vec<_>>(),
        [("c", 3), ("a", 1)]
    );
    if db == Db::Postgres {
        assert_eq!(store.event_partitions().await.unwrap().len(), 3, "one a month");
    }
    let event = |id: &str, user: &str| recd::domain::NewEvent {
        event_id: Some(id.into()),
        user_id: user.into(),
        item_id: "d".into(),
        kind: recd::domain::EventType::View,
        value: None,
        ts: 1_745_000_000_000,
        timestamped: true,
        session_id: None,
        recommendation_id: None,
    };
    // e3 again from ann: a duplicate; e3 from cat: another event.
    assert_eq!(
        store
            .insert_events(&[event("e3", "ann"), event("e3", "cat")], 0)
            .await
            .unwrap(),
        1
    );
    let cat = store.user_events("cat", 10).await.unwrap();
    assert!(cat[0].seq > 3, "numbered after the migrated events: {}", cat[0].seq);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_sqlite_store_migrates_in_place() {
    an_existing_store_migrates_in_place(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_postgres_store_migrates_in_place() {
    an_existing_store_migrates_in_place(Db::Postgres).await;
}
