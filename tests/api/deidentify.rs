//! De-identified storage (`id_key`): with a key, no shopper id is stored in
//! clear, anywhere in the database, and every endpoint answers as without
//! one; the store remembers its key, refuses another, and
//! `recd rotate-id-key` changes it in place.

use std::collections::BTreeSet;

use recd::config::Settings;
use recd::model::ModelSnapshot;
use recd::store::{Db as StoreDb, IdKey, SnapshotRow, Store};
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, start, test_settings, Db, TestApp};
use crate::serving::{fast, recommend, train_now};

const KEY_A: &str = "5f0c9a3e7d214b6a8e0f1c2d3b4a59687f0e1d2c3b4a5968778695a4b3c2d1e0";
const KEY_B: &str = "c0ffee00deadbeef0123456789abcdefa1b2c3d4e5f60718293a4b5c6d7e8f90";

fn key(hex: &str) -> Option<IdKey> {
    Some(IdKey::parse(hex).unwrap())
}

fn keyed(settings: &mut Settings) {
    fast(settings);
    settings.id_key = key(KEY_A);
}

fn db_of(app: &TestApp) -> Db {
    if app.database_url.starts_with("sqlite") {
        Db::Sqlite
    } else {
        Db::Postgres
    }
}

/// A shopper whose ids are easy to find, and events that use the 24-hour
/// memory of ids sent without a timestamp (PostgreSQL).
const SHOPPER: &str = "shopper-Zq8@example.com";
const SESSION: &str = "sess-Zq8@example.com-1";

/// Another whose event comes without a timestamp (its id is remembered
/// for 24 hours on PostgreSQL).
const WALK_IN: &str = "walk-in-Qx7";

async fn add_shopper(app: &TestApp, base_ms: i64) -> Value {
    let at = |s: i64| recd::clock::format_timestamp(base_ms + s * 1000);
    let events = json!({"events": [
        {"event_id": "z1", "user_id": SHOPPER, "item_id": "item-1", "type": "view", "session_id": SESSION,
         "timestamp": at(1)},
        {"event_id": "z2", "user_id": SHOPPER, "item_id": "item-2", "type": "add_to_cart", "session_id": SESSION,
         "timestamp": at(2)},
        {"event_id": "z3", "user_id": SHOPPER, "item_id": "item-2", "type": "purchase", "value": 12.5,
         "session_id": SESSION, "timestamp": at(3)},
        // A retry: stored once.
        {"event_id": "z1", "user_id": SHOPPER, "item_id": "item-1", "type": "view", "session_id": SESSION,
         "timestamp": at(1)},
    ]});
    let reply: Value = app.post("/v1/events", &events).await.json().await.unwrap();
    reply
}

async fn add_walk_in(app: &TestApp) {
    let events = json!({"events": [{"event_id": "w1", "user_id": WALK_IN, "item_id": "item-1", "type": "view"}]});
    let reply: Value = app.post("/v1/events", &events).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 1, "{reply}");
    let reply: Value = app.post("/v1/events", &events).await.json().await.unwrap();
    assert_eq!(reply["duplicates"], 1, "a retry is recognised: {reply}");
}

/// The small demo shop of `serving::seed_shop`, its events at fixed times,
/// sent through the API (`serving::send_shop`).
async fn seed(app: &TestApp, base_ms: i64) -> recd::demo::DemoShop {
    let shop = recd::demo::generate(
        recd::demo::DemoSize {
            items: 60,
            users: 60,
            sessions: 3,
            seed: 11,
        },
        base_ms,
    );
    crate::serving::send_shop(app, &shop).await;
    shop
}

/// Without the fields that differ from one answer to the next whatever the
/// store (a new recommendation id, the time of the answer).
fn comparable(mut reply: Value) -> Value {
    if let Some(obj) = reply.as_object_mut() {
        obj.remove("recommendation_id");
        obj.remove("as_of");
    }
    reply
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let reply = app.get(path).await;
    let status = reply.status().as_u16();
    json!([status, comparable(reply.json::<Value>().await.unwrap_or(Value::Null))])
}

/// The same calls on a store with a key and on one without: what a shop
/// sees.
async fn answers(app: &TestApp, users: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for user in users {
        for query in ["n=10", "n=5&exclude=none&explain=true"] {
            let reply = recommend(app, user, query).await;
            out.push(json!([user, query, comparable(reply)]));
        }
        out.push(json!([
            user,
            "profile",
            get_json(app, &format!("/v1/users/{user}/profile")).await
        ]));
    }
    out.push(json!(["popular", get_json(app, "/v1/popular?n=10").await]));
    // The segment lists: sizes, and each segment's members (in the order of
    // the ids as stored, which a key changes: compared as sets) and CSV rows.
    let mut segments = get_json(app, "/v1/segments").await;
    segments[1].as_object_mut().map(|o| o.remove("computed_at"));
    out.push(json!(["segments", segments]));
    for name in ["lost", "at_risk", "new", "champion", "loyal", "occasional"] {
        let mut members = Vec::new();
        let mut path = format!("/v1/segments/{name}/users?limit=3");
        loop {
            let page = app.get(&path).await.json::<Value>().await.unwrap();
            members.extend(page["users"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(next) => path = format!("/v1/segments/{name}/users?limit=3&cursor={next}"),
                None => break,
            }
        }
        members.sort_by_key(|m| m["user_id"].as_str().unwrap_or_default().to_owned());
        out.push(json!(["segment", name, members]));
        let csv = app
            .get(&format!("/v1/segments/{name}/users.csv"))
            .await
            .text()
            .await
            .unwrap();
        let mut rows: Vec<&str> = csv.lines().collect();
        rows.sort_unstable();
        out.push(json!(["segment.csv", name, rows]));
    }
    out.push(json!(["similar", get_json(app, "/v1/items/item-3/similar?n=5").await]));
    out
}

/// Serves `from`'s newest snapshot on `to` too, so that both answer with
/// the same model.
async fn copy_model(from: &TestApp, to: &TestApp) {
    let (version, bytes) = from.store.latest_snapshot().await.unwrap().expect("a snapshot");
    let snapshot = ModelSnapshot::from_bytes(&bytes).unwrap();
    let row = SnapshotRow {
        version: &version,
        created_at_ms: recd::clock::now_ms(),
        meta: &serde_json::to_string(&snapshot.meta).unwrap(),
        bytes: &bytes,
        index: None,
    };
    to.store.save_snapshot(&row, 5).await.unwrap();
    to.app.load_latest().await.unwrap();
}

/// Every text the database holds, as raw bytes: the SQLite file and its WAL,
/// or every row of every table on PostgreSQL (as text, with byte columns in
/// hex).
async fn database_bytes(app: &TestApp) -> Vec<u8> {
    match app.store.db() {
        StoreDb::Sqlite(_) => {
            let path = app.database_url.trim_start_matches("sqlite://").to_owned();
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm"] {
                if let Ok(b) = std::fs::read(format!("{path}{suffix}")) {
                    bytes.extend(b);
                }
            }
            assert!(bytes.len() > 4096, "the database file was read");
            bytes
        }
        StoreDb::Postgres(pool) => {
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            assert!(tables.iter().any(|t| t.starts_with("events_")), "{tables:?}");
            let mut text = String::new();
            for table in tables {
                let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM \"{table}\" AS t"))
                    .fetch_all(pool)
                    .await
                    .unwrap();
                for row in rows {
                    text.push_str(&row);
                    text.push('\n');
                }
            }
            text.into_bytes()
        }
    }
}

/// The ids among `ids` found in the database (as text, or in hex in a byte
/// column).
async fn ids_found(app: &TestApp, ids: &BTreeSet<String>) -> Vec<String> {
    let haystack = database_bytes(app).await;
    let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    ids.iter()
        .filter(|id| contains(id.as_bytes()) || contains(hex::encode(id.as_bytes()).as_bytes()))
        .cloned()
        .collect()
}

async fn no_shopper_id_is_stored_and_every_endpoint_answers_the_same(app: TestApp) {
    assert!(app.store.ids().encrypted());
    let clear = spawn_app_with(db_of(&app), fast).await.expect("a second store");
    assert!(!clear.store.ids().encrypted());

    // The same shop on both, a model trained on the one without a key and
    // served by both.
    let base_ms = recd::clock::now_ms() - 120_000;
    let shop = seed(&clear, base_ms).await;
    seed(&app, base_ms).await;
    for store in [&clear, &app] {
        let reply = add_shopper(store, base_ms).await;
        assert_eq!(reply["accepted"], 3, "{reply}");
        assert_eq!(reply["duplicates"], 1, "{reply}");
    }
    let trained = train_now(&clear).await;
    assert_eq!(trained["last_training"]["outcome"], "published", "{trained}");
    copy_model(&clear, &app).await;
    app.refresh_figures().await;
    clear.refresh_figures().await;

    let mut users: Vec<String> = (0..12).map(|u| format!("user-{u}")).collect();
    users.extend([SHOPPER.to_owned(), "nobody".to_owned()]);
    let expected = answers(&clear, &users).await;
    let got = answers(&app, &users).await;
    assert!(
        expected
            .iter()
            .any(|a| a[2]["strategy"] == "personalized" && a[2]["items"].as_array().is_some_and(|i| !i.is_empty())),
        "the model answers: {expected:?}"
    );
    assert!(
        expected
            .iter()
            .any(|a| a[0] == "segment" && a[2].as_array().is_some_and(|m| !m.is_empty())),
        "the segment lists list shoppers: {expected:?}"
    );
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e, "with a key, then without");
    }
    assert_eq!(got.len(), expected.len());
    for store in [&clear, &app] {
        add_walk_in(store).await;
    }

    // Every shopper id: the users', their sessions' (which embed them), and
    // the easily found one.
    let mut ids: BTreeSet<String> = shop.events.iter().map(|e| e.user_id.clone()).collect();
    ids.extend(shop.events.iter().filter_map(|e| e.session_id.clone()));
    ids.extend([SHOPPER.to_owned(), SESSION.to_owned(), WALK_IN.to_owned()]);
    assert!(ids.len() > 60, "{}", ids.len());
    let found = ids_found(&app, &ids).await;
    assert!(found.is_empty(), "stored in clear despite id_key: {found:?}");
    // ...while the store without a key shows them: the search finds ids.
    let found = ids_found(&clear, &ids).await;
    assert_eq!(found.len(), ids.len(), "without id_key every id is stored as sent");

    // Erasure: the same number of events, and the user is gone the same
    // way; a retry of an erased event id is new again.
    for store in [&clear, &app] {
        let reply: Value = store
            .delete(&format!("/v1/users/{SHOPPER}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(reply, json!({"deleted_events": 3}));
        let reply: Value = store.delete("/v1/users/user-3").await.json().await.unwrap();
        assert!(reply["deleted_events"].as_u64().unwrap() > 0, "{reply}");
        // Its event came at each store's own time: gone, the newest events
        // are the same again.
        let reply: Value = store
            .delete(&format!("/v1/users/{WALK_IN}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(reply, json!({"deleted_events": 1}));
    }
    clear.refresh_figures().await;
    app.refresh_figures().await;
    let expected = answers(&clear, &users).await;
    let got = answers(&app, &users).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e, "after erasure, with a key, then without");
    }
    for store in [&clear, &app] {
        assert_eq!(add_shopper(store, base_ms).await["accepted"], 3);
    }
    // A training reads the encrypted store as well.
    let trained = train_now(&app).await;
    let outcome = &trained["last_training"]["outcome"];
    assert!(outcome == "published" || outcome == "rejected", "{trained}");
    let found = ids_found(&app, &ids).await;
    assert!(found.is_empty(), "stored in clear despite id_key: {found:?}");
    clear.stop().await;
    app.stop().await;
}

fn settings_with(url: &str, id_key: Option<&str>) -> Settings {
    let mut settings = test_settings(url);
    settings.id_key = id_key.and_then(key);
    settings
}

/// The error a start on `url` with `id_key` fails with.
async fn start_error(url: &str, id_key: Option<&str>) -> String {
    match recd::server::open_store_waiting(&settings_with(url, id_key)).await {
        Ok(store) => {
            store.close().await;
            panic!("the store opened with id_key {id_key:?}")
        }
        Err(e) => format!("{e:#}"),
    }
}

/// Stops the server and lets its connections go, so that the store can be
/// rotated; returns what keeps an SQLite file.
async fn stop_all(app: TestApp) -> Option<tempfile::TempDir> {
    let store: Store = app.store.clone();
    let dir = app.stop_keeping_files().await;
    store.close().await;
    dir
}

async fn profile_of(app: &TestApp, user: &str) -> Value {
    app.refresh_figures().await;
    let reply = app.get(&format!("/v1/users/{user}/profile")).await;
    assert_eq!(reply.status(), 200);
    comparable(reply.json().await.unwrap())
}

async fn the_store_keeps_its_key_and_rotates_it(app: TestApp) {
    let url = app.database_url.clone();
    assert_eq!(add_shopper(&app, recd::clock::now_ms() - 60_000).await["accepted"], 3);
    let profile = profile_of(&app, SHOPPER).await;
    assert_eq!(profile["events"]["total"], 3, "{profile}");
    let postgres = db_of(&app) == Db::Postgres;
    if postgres {
        // Not while a replica runs.
        let error = recd::server::rotate_id_key(&settings_with(&url, Some(KEY_A)), Some(KEY_B), false)
            .await
            .unwrap_err();
        assert!(format!("{error:#}").contains("stop every replica"), "{error:#}");
    }
    let dir = stop_all(app).await;

    // Another key, or none: refused, saying why.
    let error = start_error(&url, Some(KEY_B)).await;
    assert!(error.contains("encrypted with another id_key"), "{error}");
    let error = start_error(&url, None).await;
    assert!(error.contains("id_key (RECD_ID_KEY) is not set"), "{error}");
    assert!(
        !error.contains(KEY_A) && !error.contains(&KEY_A[..12]),
        "the key never prints: {error}"
    );

    // A to B: the old key is refused after, the new one serves the same.
    recd::server::rotate_id_key(&settings_with(&url, Some(KEY_A)), Some(KEY_B), false)
        .await
        .unwrap();
    let error = start_error(&url, Some(KEY_A)).await;
    assert!(error.contains("encrypted with another id_key"), "{error}");
    let app = start(settings_with(&url, Some(KEY_B)), dir).await;
    assert_eq!(profile_of(&app, SHOPPER).await, profile);
    let ids: BTreeSet<String> = [SHOPPER.to_owned(), SESSION.to_owned()].into();
    assert!(ids_found(&app, &ids).await.is_empty());
    let dir = stop_all(app).await;

    // B to clear: served without a key, and the ids are stored as sent.
    recd::server::rotate_id_key(&settings_with(&url, Some(KEY_B)), None, true)
        .await
        .unwrap();
    let app = start(settings_with(&url, None), dir).await;
    assert_eq!(profile_of(&app, SHOPPER).await, profile);
    assert_eq!(ids_found(&app, &ids).await.len(), 2);
    let dir = stop_all(app).await;

    // A key on a store in clear: refused (the ids would mix) until the
    // store is encrypted with it; then nothing of the clear ids is left.
    let error = start_error(&url, Some(KEY_A)).await;
    assert!(error.contains("holds shopper ids in clear"), "{error}");
    recd::server::rotate_id_key(&settings_with(&url, Some(KEY_A)), None, false)
        .await
        .unwrap();
    let app = start(settings_with(&url, Some(KEY_A)), dir).await;
    assert_eq!(profile_of(&app, SHOPPER).await, profile);
    if !postgres {
        // SQLite is rebuilt after a rotation; PostgreSQL keeps dead row
        // versions until vacuumed space is reused (docs/operations.md).
        assert!(ids_found(&app, &ids).await.is_empty());
    }
    let reply: Value = app.delete(&format!("/v1/users/{SHOPPER}")).await.json().await.unwrap();
    assert_eq!(reply, json!({"deleted_events": 3}));
    app.stop().await;
}

/// On PostgreSQL an erasure is announced to the other replicas with the
/// user's stored (encrypted) id: they drop what they cached of the shop's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_replicas_forget_an_erased_user() {
    let Some(first) = spawn_app_with(Db::Postgres, keyed).await else {
        return;
    };
    let mut settings = test_settings(&first.database_url);
    keyed(&mut settings);
    let second = start(settings, None).await;
    seed(&first, recd::clock::now_ms() - 120_000).await;
    let trained = train_now(&first).await;
    assert_eq!(trained["last_training"]["outcome"], "published", "{trained}");
    second.app.load_latest().await.unwrap();
    let before = recommend(&second, "user-7", "n=5").await;
    assert_eq!(before["strategy"], "personalized", "{before}");

    let reply: Value = first.delete("/v1/users/user-7").await.json().await.unwrap();
    assert!(reply["deleted_events"].as_u64().unwrap() > 0, "{reply}");
    let mut after = Value::Null;
    for _ in 0..100 {
        after = recommend(&second, "user-7", "n=5").await;
        if after["strategy"] == "popular" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        after["strategy"], "popular",
        "the other replica forgot the user: {after}"
    );
    second.stop().await;
    first.stop().await;
}

/// The binary: a start with another key fails with the clear error (and
/// never prints a key); `recd rotate-id-key` takes the new key from
/// `RECD_NEW_ID_KEY`.
async fn the_binary_refuses_another_key_and_rotates(db: Db) {
    let Some((url, _dir)) = crate::helpers::fresh_database(db).await else {
        return;
    };
    let recd = |args: &[&str], id_key: &str, new_key: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_recd"));
        cmd.args(args)
            .env("RECD_DATABASE_URL", &url)
            .env("RECD_ID_KEY", id_key)
            .env("RECD_LISTEN", format!("127.0.0.1:{}", crate::helpers::free_port()))
            .env("RECD_API_KEYS", "")
            .env("RECD_TRAIN_INTERVAL", "0")
            .env_remove("RECD_NEW_ID_KEY")
            .env("RUST_LOG", "warn");
        if let Some(key) = new_key {
            cmd.env("RECD_NEW_ID_KEY", key);
        }
        // Waiting for the process must not hold up this runtime's worker:
        // a task queued on it (the store's connections closing) would wait
        // too, and the rotation would see them as another replica.
        let out = tokio::task::block_in_place(|| cmd.output()).expect("recd runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    // The first start records the key.
    let (ok, text) = recd(&["migrate"], KEY_A, None);
    assert!(ok, "{text}");
    let store = Store::open(
        &url,
        &recd::store::StoreOptions {
            id_key: key(KEY_A),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let events: Vec<recd::domain::NewEvent> = (0..3)
        .map(|k| recd::domain::NewEvent {
            event_id: Some(format!("e{k}")),
            user_id: SHOPPER.into(),
            item_id: format!("item-{k}"),
            kind: recd::domain::EventType::View,
            value: None,
            ts: 1_700_000_000_000 + k,
            timestamped: true,
            session_id: Some(SESSION.into()),
            recommendation_id: None,
        })
        .collect();
    assert_eq!(store.insert_events(&events, 1_700_000_000_000).await.unwrap(), 3);
    store.close().await;

    let (ok, text) = recd(&["serve"], KEY_B, None);
    assert!(!ok, "serve must refuse another key: {text}");
    assert!(text.contains("encrypted with another id_key"), "{text}");
    assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "no key printed: {text}");

    // The refused start's sessions end when its server processes do, which a
    // loaded machine may take a while over; a rotation refuses meanwhile.
    if db == Db::Postgres {
        wait_for_no_recd_sessions(&url).await;
    }
    let (ok, text) = recd(&["rotate-id-key"], KEY_A, Some(KEY_B));
    assert!(ok, "{text}");
    assert!(text.contains("rewrote the ids of 3 events"), "{text}");
    assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "no key printed: {text}");
    let (ok, text) = recd(&["migrate"], KEY_A, None);
    assert!(!ok && text.contains("encrypted with another id_key"), "{text}");
    let (ok, text) = recd(&["migrate"], KEY_B, None);
    assert!(ok, "{text}");
    let (ok, text) = recd(&["rotate-id-key", "--decrypt", "--new-key", KEY_A], KEY_B, None);
    assert!(!ok, "--decrypt and --new-key conflict: {text}");

    let store = Store::open(
        &url,
        &recd::store::StoreOptions {
            id_key: key(KEY_B),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let events = store.user_events(SHOPPER, 10).await.unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.session_id.as_deref() == Some(SESSION)));
    store.close().await;
}

/// Waits (up to 60 s) until no session named `recd` is connected to the
/// database at `url`; fails naming those left.
async fn wait_for_no_recd_sessions(url: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("a connection");
    let started = std::time::Instant::now();
    loop {
        let left: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT pid, state, query FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(recd::store::APPLICATION_NAME)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "recd sessions still connected after 60 s: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    conn.close().await.unwrap();
}

mod binary {
    use crate::helpers::Db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::the_binary_refuses_another_key_and_rotates(Db::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::the_binary_refuses_another_key_and_rotates(Db::Postgres).await;
    }
}

crate::both_stores!(with super::keyed;
    no_shopper_id_is_stored_and_every_endpoint_answers_the_same,
    the_store_keeps_its_key_and_rotates_it,
);
