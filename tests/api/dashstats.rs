//! The dashboard's figures: events per minute by type, recommendation
//! answers and clicks per model version, the overview, the replicas'
//! heartbeats and an item's activity per day.

use recd::clock::format_timestamp;
use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

const MINUTE: i64 = 60 * 1000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn event(id: &str, user: &str, item: &str, kind: &str, ts: i64) -> Value {
    let mut e = json!({"event_id": id, "user_id": user, "item_id": item, "type": kind,
                       "timestamp": format_timestamp(ts)});
    if kind == "rating" {
        e["value"] = json!(4);
    }
    e
}

async fn post_events(app: &TestApp, events: Vec<Value>) -> Value {
    let reply = app.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let reply = app.get(path).await;
    assert_eq!(reply.status(), 200, "{path}");
    reply.json().await.unwrap()
}

/// The bucket of `series` (its `t` and `step_seconds`) that holds `ts`.
fn bucket_of(series: &Value, ts: i64) -> usize {
    let step = series["step_seconds"].as_i64().unwrap() * 1000;
    let t: Vec<i64> = series["t"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    t.iter()
        .position(|start| *start <= ts && ts < start + step)
        .unwrap_or_else(|| panic!("no bucket holds {ts} in {t:?}"))
}

fn sum(values: &Value) -> i64 {
    values.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).sum()
}

/// Every series of a response has as many numbers as `t`, and `t` is
/// contiguous.
fn check_shape(series: &Value, step_seconds: i64, buckets: usize) {
    assert_eq!(series["step_seconds"], step_seconds, "{series}");
    let t = series["t"].as_array().unwrap();
    assert_eq!(t.len(), buckets);
    for pair in t.windows(2) {
        assert_eq!(
            pair[1].as_i64().unwrap() - pair[0].as_i64().unwrap(),
            step_seconds * 1000
        );
    }
    let last = t[buckets - 1].as_i64().unwrap();
    let minute = now() / MINUTE * MINUTE;
    assert!(
        last <= minute && minute < last + step_seconds * 1000,
        "ends at the current minute"
    );
    for kind in [
        "view",
        "click",
        "like",
        "add_to_cart",
        "remove_from_cart",
        "purchase",
        "rating",
    ] {
        assert_eq!(series["counts"][kind].as_array().unwrap().len(), buckets, "{kind}");
    }
}

async fn events_show_in_buckets_by_kind(app: TestApp) {
    let at = now() - 3 * MINUTE;
    let earlier = now() - 20 * MINUTE;
    let hours_ago = now() - 5 * HOUR;
    let reply = post_events(
        &app,
        vec![
            event("e1", "u1", "i1", "view", at),
            event("e2", "u2", "i1", "view", at),
            event("e3", "u1", "i2", "purchase", at),
            event("e4", "u3", "i2", "click", earlier),
            event("e5", "u3", "i3", "rating", hours_ago),
        ],
    )
    .await;
    assert_eq!(reply["accepted"], 5);
    // A retry stores nothing and counts nothing.
    let retry = post_events(&app, vec![event("e1", "u1", "i1", "view", at)]).await;
    assert_eq!(retry["duplicates"], 1);

    // On PostgreSQL ingest leaves them pending until the background folds
    // them in.
    app.app.fold_stats().await.unwrap();
    let hour = get_json(&app, "/v1/stats/events").await;
    assert_eq!(hour["range"], "hour");
    check_shape(&hour, 60, 60);
    let counts = &hour["counts"];
    let i = bucket_of(&hour, at);
    assert_eq!(counts["view"][i], 2, "{hour}");
    assert_eq!(counts["purchase"][i], 1);
    assert_eq!(counts["click"][bucket_of(&hour, earlier)], 1);
    assert_eq!(sum(&counts["view"]), 2);
    assert_eq!(sum(&counts["click"]), 1);
    assert_eq!(sum(&counts["rating"]), 0, "five hours ago is outside the hour");

    let day = get_json(&app, "/v1/stats/events?range=day").await;
    assert_eq!(day["range"], "day");
    check_shape(&day, 900, 96);
    assert_eq!(day["counts"]["rating"][bucket_of(&day, hours_ago)], 1, "{day}");
    assert_eq!(sum(&day["counts"]["view"]), 2);

    let week = get_json(&app, "/v1/stats/events?range=week").await;
    check_shape(&week, 3600, 168);
    let total: i64 = ["view", "click", "purchase", "rating"]
        .iter()
        .map(|k| sum(&week["counts"][*k]))
        .sum();
    assert_eq!(total, 5);
    assert_eq!(week["counts"]["view"][bucket_of(&week, at)], 2, "{week}");
    // A later batch in a minute already counted adds to that minute, and
    // the week's hours (kept from the minutes) follow.
    let reply = post_events(&app, vec![event("e6", "u4", "i1", "view", at)]).await;
    assert_eq!(reply["accepted"], 1);
    app.app.fold_stats().await.unwrap();
    let week = get_json(&app, "/v1/stats/events?range=week").await;
    assert_eq!(week["counts"]["view"][bucket_of(&week, at)], 3, "{week}");
    let hour = get_json(&app, "/v1/stats/events").await;
    assert_eq!(hour["counts"]["view"][bucket_of(&hour, at)], 3, "{hour}");

    for path in ["/v1/stats/events?range=month", "/v1/stats/recommendations?range=1h"] {
        let body = problem(app.get(path).await, 422).await;
        assert_eq!(body["errors"][0]["field"], "range", "{body}");
    }
    app.stop().await;
}

async fn answers_and_clicks_show_per_version(app: TestApp) {
    // Items for the popular list (no model yet: version null).
    let t = now() - 30 * MINUTE;
    let seed: Vec<Value> = (0..6)
        .map(|n| {
            event(
                &format!("s{n}"),
                &format!("seed-{n}"),
                &format!("item-{}", n % 3),
                "view",
                t,
            )
        })
        .collect();
    post_events(&app, seed).await;
    app.refresh_figures().await;

    let answer = |user: &'static str| {
        let app = &app;
        async move {
            let body = get_json(app, &format!("/v1/users/{user}/recommendations?n=3")).await;
            let id = body["recommendation_id"].as_str().unwrap().to_owned();
            let first = body["items"][0]["item_id"].as_str().unwrap().to_owned();
            (id, first)
        }
    };
    let click = |id: &str, user: &str, item: &str, rec: &str| json!({"event_id": id, "user_id": user, "item_id": item, "type": "click", "recommendation_id": rec});

    // A click that arrives before its answer reached the store...
    let (early, early_item) = answer("shopper-1").await;
    post_events(&app, vec![click("c1", "shopper-1", &early_item, &early)]).await;
    app.app.flush_impressions().await;
    // ... and one after; a click on an item the answer did not show is
    // not one.
    let (late, late_item) = answer("shopper-2").await;
    app.app.flush_impressions().await;
    post_events(
        &app,
        vec![
            click("c2", "shopper-2", &late_item, &late),
            click("c3", "shopper-2", "item-not-shown", &late),
        ],
    )
    .await;

    app.app.fold_stats().await.unwrap();
    let stats = get_json(&app, "/v1/stats/recommendations").await;
    assert_eq!(stats["range"], "hour");
    assert_eq!(stats["step_seconds"], 60);
    assert_eq!(stats["t"].as_array().unwrap().len(), 60);
    let versions = stats["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{stats}");
    assert_eq!(versions[0]["version"], Value::Null);
    assert_eq!(versions[0]["impressions"].as_array().unwrap().len(), 60);
    assert_eq!(sum(&versions[0]["impressions"]), 2, "{stats}");
    assert_eq!(sum(&versions[0]["clicks"]), 2, "{stats}");
    let i = bucket_of(&stats, now());
    let j = bucket_of(&stats, now() - MINUTE);
    assert!(versions[0]["impressions"][i].as_i64().unwrap() + versions[0]["impressions"][j].as_i64().unwrap() == 2);

    let week = get_json(&app, "/v1/stats/recommendations?range=week").await;
    assert_eq!(week["t"].as_array().unwrap().len(), 168);
    assert_eq!(sum(&week["versions"][0]["clicks"]), 2);
    assert_eq!(sum(&week["versions"][0]["impressions"]), 2, "{week}");
    app.stop().await;
}

async fn overview_counts_shoppers_and_store(app: TestApp) {
    let n = now();
    post_events(
        &app,
        vec![
            event("o1", "a", "x", "view", n - 10 * MINUTE),
            event("o2", "a", "y", "view", n - 20 * MINUTE),
            event("o3", "b", "x", "view", n - 3 * HOUR),
            event("o4", "c", "z", "purchase", n - 3 * DAY),
            event("o5", "d", "z", "view", n - 30 * DAY),
        ],
    )
    .await;
    app.app.fold_stats().await.unwrap();
    let before = get_json(&app, "/v1/stats/overview").await;
    assert_eq!(before["events_last_hour"], 2, "{before}");
    app.app.refresh_overview().await.unwrap();
    let body = get_json(&app, "/v1/stats/overview").await;
    assert_eq!(body["active_users"], json!({"hour": 1, "day": 2, "week": 3}), "{body}");
    assert_eq!(body["store"]["events"], 5);
    assert_eq!(body["store"]["users"], 4);
    assert_eq!(body["store"]["items"], 3);
    assert!(body["store"]["bytes"].as_i64().unwrap() > 0);
    assert_eq!(body["events_last_hour"], 2);
    assert!(body["computed_at"].as_str().is_some_and(|s| s.ends_with('Z')), "{body}");
    app.stop().await;
}

async fn this_replica_is_listed_and_healthy(app: TestApp) {
    app.app.heartbeat().await.unwrap();
    let body = get_json(&app, "/v1/replicas").await;
    let replicas = body["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{body}");
    let me = &replicas[0];
    assert_eq!(me["id"], app.app.trainer.replica.as_str());
    assert_eq!(me["healthy"], true);
    assert!(me["age_seconds"].as_f64().unwrap() < 5.0);
    assert_eq!(me["version"], Value::Null);
    assert_eq!(me["training"], false);
    assert!(me["trainer"].is_boolean());
    for field in ["started_at", "heartbeat_at"] {
        assert!(me[field].as_str().is_some_and(|s| s.ends_with('Z')), "{field}");
    }
    app.stop().await;
}

async fn item_activity_per_day(app: TestApp) {
    let n = now();
    let today = n - n.rem_euclid(DAY);
    let three_days_ago = today - 3 * DAY + HOUR;
    // Today, whatever the time of day.
    let earlier_today = today + (n - today) / 2;
    post_events(
        &app,
        vec![
            event("a1", "u1", "sku-1", "view", earlier_today),
            event("a2", "u2", "sku-1", "view", earlier_today),
            event("a3", "u2", "sku-1", "add_to_cart", earlier_today),
            event("a4", "u1", "sku-1", "purchase", three_days_ago),
            event("a5", "u1", "sku-2", "view", earlier_today),
        ],
    )
    .await;
    // Ingest leaves them pending until the background folds them in.
    app.app.fold_stats().await.unwrap();
    let body = get_json(&app, "/v1/items/sku-1/activity?days=7").await;
    assert_eq!(body["item_id"], "sku-1");
    assert_eq!(body["step_seconds"], 86400);
    let t = body["t"].as_array().unwrap();
    assert_eq!(t.len(), 7);
    assert_eq!(t[6], today);
    assert_eq!(t[0], today - 6 * DAY);
    let counts = &body["counts"];
    assert_eq!(counts["view"][6], 2, "{body}");
    assert_eq!(counts["add_to_cart"][6], 1);
    assert_eq!(counts["purchase"][3], 1);
    assert_eq!(sum(&counts["view"]), 2, "sku-2's view is not sku-1's");
    assert_eq!(counts["rating"].as_array().unwrap().len(), 7);

    // A retry counts nothing; folding again adds nothing.
    let retry = post_events(&app, vec![event("a1", "u1", "sku-1", "view", earlier_today)]).await;
    assert_eq!(retry["duplicates"], 1);
    app.app.fold_stats().await.unwrap();
    app.app.fold_stats().await.unwrap();
    let again = get_json(&app, "/v1/items/sku-1/activity?days=7").await;
    assert_eq!(again["counts"], body["counts"]);

    let default = get_json(&app, "/v1/items/sku-1/activity").await;
    assert_eq!(default["t"].as_array().unwrap().len(), 30);

    problem(app.get("/v1/items/no-such-item/activity").await, 404).await;
    for days in ["0", "366", "week"] {
        let body = problem(app.get(&format!("/v1/items/sku-1/activity?days={days}")).await, 422).await;
        assert_eq!(body["errors"][0]["field"], "days", "{body}");
    }
    app.stop().await;
}

/// A year of an item's history, posted and folded in two rounds: every day
/// shows its own count, across the 32-day blocks the counts are kept in.
async fn item_activity_over_a_year(app: TestApp) {
    let n = now();
    let today = n - n.rem_euclid(DAY);
    let views = |round: &str| -> Vec<Value> {
        (0..365)
            .map(|d| {
                event(
                    &format!("{round}-{d}"),
                    "u1",
                    "sku-9",
                    "view",
                    today - d * DAY + HOUR.min(n - today),
                )
            })
            .collect()
    };
    post_events(&app, views("first")).await;
    app.app.fold_stats().await.unwrap();
    // The second round adds to rows the first one wrote, and buys on every
    // seventh day.
    let mut second = views("second");
    second.extend(
        (0..365)
            .step_by(7)
            .map(|d| event(&format!("buy-{d}"), "u2", "sku-9", "purchase", today - d * DAY)),
    );
    post_events(&app, second).await;
    app.app.fold_stats().await.unwrap();
    let body = get_json(&app, "/v1/items/sku-9/activity?days=365").await;
    let counts = &body["counts"];
    let view: Vec<i64> = counts["view"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(view, vec![2; 365], "{body}");
    let purchase = counts["purchase"].as_array().unwrap();
    for (i, n) in purchase.iter().enumerate() {
        let days_ago = 364 - i;
        assert_eq!(n.as_i64(), Some(i64::from(days_ago % 7 == 0)), "{days_ago} days ago");
    }
    app.stop().await;
}

crate::both_stores!(
    item_activity_over_a_year,
    events_show_in_buckets_by_kind,
    answers_and_clicks_show_per_version,
    overview_counts_shoppers_and_store,
    this_replica_is_listed_and_healthy,
    item_activity_per_day,
);

/// Two replicas on one PostgreSQL store: both listed, both healthy; one
/// that stops beating turns unhealthy after three intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_are_listed_and_healthy() {
    let Some((url, _)) = crate::helpers::fresh_database(crate::helpers::Db::Postgres).await else {
        return;
    };
    let settings = |url: &str| {
        let mut s = crate::helpers::test_settings(url);
        s.heartbeat_interval = std::time::Duration::from_millis(300);
        s
    };
    let first = crate::helpers::start(settings(&url), None).await;
    let second = crate::helpers::start(settings(&url), None).await;
    first.app.heartbeat().await.unwrap();
    second.app.heartbeat().await.unwrap();
    let body = get_json(&first, "/v1/replicas").await;
    let ids: Vec<&str> = body["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{body}");
    assert!(ids.contains(&first.app.trainer.replica.as_str()));
    assert!(ids.contains(&second.app.trainer.replica.as_str()));
    assert!(
        body["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["healthy"] == true),
        "{body}"
    );

    // The second stops: its heartbeats stop, the first's go on.
    let gone = second.app.trainer.replica.clone();
    second.stop().await;
    second_stops_beating(&first, &gone).await;
    first.stop().await;
}

/// Batches a replica stored whole are claimed: it folds them from memory.
/// If it stops before it does, another replica folds their rows once the
/// grace is past, and a late fold of the first writes nothing twice. A
/// batch with a repeated event is not claimed and is folded from its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_counts_are_folded_once_whoever_folds_them() {
    let Some((url, _)) = crate::helpers::fresh_database(crate::helpers::Db::Postgres).await else {
        return;
    };
    let first = crate::helpers::start(crate::helpers::test_settings(&url), None).await;
    let other = recd::store::Store::open(&url, &recd::store::StoreOptions::default())
        .await
        .unwrap();
    let today = now() - now().rem_euclid(DAY);
    let at = today + (now() - today) / 2;
    let views = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| event(&format!("v{i}"), "u1", "sku-1", "view", at))
            .collect()
    };
    let grace = std::time::Duration::from_secs(300);

    // Claimed and folded by the replica that stored them.
    post_events(&first, views(0, 3)).await;
    post_events(&first, views(3, 5)).await;
    let folded = first.app.store.fold_item_days(grace).await.unwrap();
    assert_eq!((folded.claimed, folded.unclaimed, folded.dropped), (2, 0, 0));
    assert_eq!(activity(&first).await, 5);

    // Within the grace another replica leaves a claimed row alone.
    post_events(&first, views(5, 9)).await;
    let folded = other.fold_item_days(grace).await.unwrap();
    assert_eq!((folded.claimed, folded.unclaimed), (0, 0));
    // Batches stored at once share the sequence, so another transaction's
    // event may fall in a claimed row's range of `seq`: one written here
    // with SQL (counted nowhere) must not be counted with the row.
    let recd::store::Db::Postgres(pool) = other.db() else {
        unreachable!()
    };
    let (low, high): (i64, i64) =
        sqlx::query_as("SELECT seq_min, seq_max FROM item_days_pending WHERE claimed_at IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(high - low, 3, "the batch of four in one range");
    sqlx::query(
        "INSERT INTO events (seq, event_id, user_id, item_id, kind, ts, received_at)
         VALUES ($1 + 1, 'other', 'u2', 'sku-1', 0, $2, $2)",
    )
    .bind(low)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    // Past the grace (the first replica stopped, say), the other replica
    // folds the row, counting its events again from `events`.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let folded = other.fold_item_days(std::time::Duration::ZERO).await.unwrap();
    assert_eq!((folded.claimed, folded.unclaimed), (0, 1));
    assert_eq!(activity(&first).await, 9);
    // The first replica's fold finds its row gone and drops the claim.
    let folded = first.app.store.fold_item_days(grace).await.unwrap();
    assert_eq!((folded.claimed, folded.unclaimed, folded.dropped), (0, 0, 1));
    assert_eq!(activity(&first).await, 9);

    // A batch with an event stored before is not claimed.
    post_events(&first, views(8, 11)).await;
    let folded = first.app.store.fold_item_days(grace).await.unwrap();
    assert_eq!((folded.claimed, folded.unclaimed, folded.dropped), (0, 1, 0));
    assert_eq!(activity(&first).await, 11);
    first.stop().await;
}

/// sku-1's views today, as the activity endpoint shows them.
async fn activity(app: &TestApp) -> i64 {
    let body = get_json(app, "/v1/items/sku-1/activity?days=2").await;
    body["counts"]["view"][1].as_i64().unwrap()
}

async fn second_stops_beating(first: &TestApp, gone: &str) {
    let started = std::time::Instant::now();
    loop {
        let body = get_json(first, "/v1/replicas").await;
        let replicas = body["replicas"].as_array().unwrap();
        let of = |id: &str| replicas.iter().find(|r| r["id"] == id).cloned().unwrap();
        if of(gone)["healthy"] == false {
            assert_eq!(of(first.app.trainer.replica.as_str())["healthy"], true, "{body}");
            return;
        }
        assert!(started.elapsed().as_secs() < 10, "still healthy: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
