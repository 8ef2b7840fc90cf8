//! What the dashboard shows of the model: the served model's items on a
//! 2-D map (`GET /v1/model/embeddings`), and each training's held-out
//! figures in `GET /v1/model`'s history, published, rejected or failed.

use std::collections::{HashMap, HashSet};

use recd::config::Settings;
use recd::model::ModelSnapshot;
use serde_json::Value;

use crate::helpers::{problem, start, test_settings, TestApp};
use crate::serving::{fast, model, seed_shop, train_now};

async fn embeddings(app: &TestApp, query: &str) -> Value {
    let reply = app.get(&format!("/v1/model/embeddings{query}")).await;
    assert_eq!(reply.status(), 200, "{query}");
    reply.json().await.unwrap()
}

fn points(map: &Value) -> &Vec<Value> {
    map["points"].as_array().expect("points")
}

/// Stops `app` and starts another server on its store.
async fn restart_with(app: TestApp, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let url = app.database_url.clone();
    let dir = app.stop_keeping_files().await;
    let mut settings = test_settings(&url);
    adjust(&mut settings);
    start(settings, dir).await
}

async fn the_map_shows_the_served_models_items(app: TestApp) {
    // Before any model: no map, and bad limits are named.
    let empty = embeddings(&app, "").await;
    assert_eq!(empty["version"], Value::Null, "{empty}");
    assert!(points(&empty).is_empty(), "{empty}");
    for bad in ["0", "50001", "-1", "many", ""] {
        let body = problem(app.get(&format!("/v1/model/embeddings?limit={bad}")).await, 422).await;
        assert_eq!(body["errors"][0]["field"], "limit", "{bad}: {body}");
    }

    let shop = seed_shop(&app, 200).await;
    let trained = train_now(&app).await;
    assert_eq!(trained["last_training"]["outcome"], "published", "{trained}");
    let version = trained["version"].as_str().unwrap();
    let items: HashMap<&str, &recd::domain::Item> = shop.items.iter().map(|i| (i.item_id.as_str(), i)).collect();

    let map = embeddings(&app, "").await;
    assert_eq!(map["version"], version, "{map}");
    let all = points(&map);
    assert_eq!(map["total"], trained["items"], "{map}");
    assert_eq!(
        all.len() as u64,
        trained["items"].as_u64().unwrap(),
        "fewer items than the default limit"
    );
    let mut ids = HashSet::new();
    let mut xs = HashSet::new();
    for point in all {
        let id = point["item_id"].as_str().unwrap();
        assert!(ids.insert(id), "{id} twice");
        let item = items.get(id).unwrap_or_else(|| panic!("{id} is no item of the shop"));
        assert_eq!(point["category"], item.categories[0].as_str(), "{point}");
        assert_eq!(point["title"], item.title.as_deref().unwrap(), "{point}");
        let (x, y) = (point["x"].as_f64().unwrap(), point["y"].as_f64().unwrap());
        assert!(x.is_finite() && y.is_finite(), "{point}");
        xs.insert(x.to_bits());
    }
    assert!(xs.len() > all.len() / 2, "the items are spread over the map");

    // `limit` keeps the most popular: the first of the whole list, in order.
    let top = embeddings(&app, "?limit=7").await;
    assert_eq!(points(&top).len(), 7);
    assert_eq!(points(&top)[..], all[..7]);
    // The most viewed item in the shop's events comes first.
    let mut views: HashMap<&str, usize> = HashMap::new();
    for event in &shop.events {
        *views.entry(event.item_id.as_str()).or_default() += 1;
    }
    let busiest = views.values().max().unwrap();
    let first = points(&top)[0]["item_id"].as_str().unwrap();
    assert!(
        views[first] * 10 >= busiest * 8,
        "{first}: {} of {busiest}",
        views[first]
    );

    // The catalogue now: a new title shows at once.
    let renamed = points(&top)[0]["item_id"].as_str().unwrap().to_owned();
    let mut item: Value = app.get(&format!("/v1/items/{renamed}")).await.json().await.unwrap();
    item["title"] = "Renamed".into();
    assert_eq!(app.put(&format!("/v1/items/{renamed}"), &item).await.status(), 200);
    assert_eq!(points(&embeddings(&app, "?limit=1").await)[0]["title"], "Renamed");

    // The map is stored with the snapshot: a restart shows the same one.
    let app = restart_with(app, fast).await;
    let again = embeddings(&app, "?limit=7").await;
    assert_eq!(again["version"], version);
    for (a, b) in points(&again).iter().zip(points(&top)) {
        assert_eq!((&a["item_id"], &a["x"], &a["y"]), (&b["item_id"], &b["x"], &b["y"]));
    }

    // A snapshot saved before maps existed (no `projection` tensor) still
    // loads and serves; its map is empty until the next training.
    let (_, bytes) = app.store.latest_snapshot().await.unwrap().expect("a snapshot");
    let mut older = ModelSnapshot::from_bytes(&bytes).unwrap();
    assert!(older.projection.is_some());
    older.projection = None;
    older.meta.version = format!("{version}-older");
    let bytes = older.to_bytes().unwrap();
    let row = recd::store::SnapshotRow {
        version: &older.meta.version,
        created_at_ms: recd::clock::now_ms(),
        meta: "{}",
        bytes: &bytes,
        index: None,
    };
    app.store.save_snapshot(&row, 5).await.unwrap();
    app.app.load_latest().await.unwrap();
    assert_eq!(model(&app).await["version"], older.meta.version.as_str());
    let map = embeddings(&app, "").await;
    assert_eq!(map["version"], older.meta.version.as_str());
    assert!(points(&map).is_empty(), "{map}");
    let recommended = app.get("/v1/users/user-1/recommendations").await;
    assert_eq!(recommended.status(), 200);
    // The next training (let through the gate whatever its figures) makes one.
    let app = restart_with(app, |s| {
        fast(s);
        s.gate_margin = -1.0;
    })
    .await;
    assert_eq!(model(&app).await["version"], older.meta.version.as_str());
    assert!(points(&embeddings(&app, "").await).is_empty());
    let next = train_now(&app).await;
    assert_eq!(next["last_training"]["outcome"], "published", "{next}");
    let map = embeddings(&app, "?limit=5").await;
    assert_eq!(map["version"], next["version"], "{map}");
    assert_eq!(points(&map).len(), 5, "{map}");
    app.stop().await;
}

/// Too few events for a network: a popular-only model has no map.
async fn a_model_without_a_network_has_no_map(app: TestApp) {
    // One event per shopper: no transition to learn.
    let events: Vec<Value> = (0..6)
        .map(|i| serde_json::json!({"user_id": format!("u{i}"), "item_id": format!("i{i}"), "type": "view"}))
        .collect();
    let reply = app.post("/v1/events", &serde_json::json!({"events": events})).await;
    assert_eq!(reply.status(), 200);
    let trained = train_now(&app).await;
    assert_eq!(trained["last_training"]["outcome"], "published", "{trained}");
    assert_eq!(trained["kind"], "popular", "{trained}");
    let map = embeddings(&app, "?limit=10").await;
    assert_eq!(map["version"], Value::Null, "{map}");
    assert!(points(&map).is_empty(), "{map}");
}

fn figures(training: &Value) -> [f64; 3] {
    let m = &training["metrics"];
    ["model", "popular", "item_knn"].map(|who| {
        let ndcg = m[who]["ndcg@10"]
            .as_f64()
            .unwrap_or_else(|| panic!("{who}: {training}"));
        let hr = m[who]["hr@10"].as_f64().unwrap_or_else(|| panic!("{who}: {training}"));
        assert!((0.0..=1.0).contains(&ndcg) && (0.0..=1.0).contains(&hr), "{training}");
        ndcg
    })
}

/// Every training in the history carries its held-out figures: a published
/// one those `GET /v1/model` shows for the served model, a rejected one its
/// own, a failed one `null`.
async fn trainings_keep_their_figures(app: TestApp) {
    seed_shop(&app, 200).await;
    let published = train_now(&app).await;
    assert_eq!(published["last_training"]["outcome"], "published", "{published}");
    let served = figures(&published);
    assert_eq!(figures(&published["last_training"]), served);
    assert_eq!(published["history"][0], published["last_training"]);
    assert_eq!(
        published["last_training"]["metrics"]["model"]["ndcg@10"],
        published["metrics"]["model"]["ndcg@10"]
    );

    // Rejected: its own figures, while the served model's stay.
    let app = restart_with(app, |s| {
        fast(s);
        s.gate_margin = 1.0;
    })
    .await;
    let rejected = train_now(&app).await;
    assert_eq!(rejected["last_training"]["outcome"], "rejected", "{rejected}");
    figures(&rejected["last_training"]);
    assert_eq!(figures(&rejected), served, "the served model's figures");
    assert_eq!(rejected["history"][1]["metrics"], published["last_training"]["metrics"]);

    // Failed before evaluating (an invalid setting): null.
    let app = restart_with(app, |s| {
        fast(s);
        s.train.dim = 0;
    })
    .await;
    let failed = train_now(&app).await;
    assert_eq!(failed["last_training"]["outcome"], "failed", "{failed}");
    assert_eq!(failed["last_training"]["metrics"], Value::Null, "{failed}");
    let history = failed["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history[1]["metrics"].is_object() && history[2]["metrics"].is_object());
    app.stop().await;
}

crate::both_stores!(with crate::serving::fast;
    the_map_shows_the_served_models_items,
    a_model_without_a_network_has_no_map,
    trainings_keep_their_figures,
);
