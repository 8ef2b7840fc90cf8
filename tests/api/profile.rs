//! Profiles: what a shop reads about one shopper, from their events, scored
//! against the shop's other shoppers.

use recd::clock::format_timestamp;
use recd::config::parse_api_keys;
use recd::domain::RfmCuts;
use recd::ingest::parse_timestamp;
use recd::profile::churn_risk;
use serde_json::{json, Value};

use crate::helpers::{problem, spawn_app_with, Db, TestApp};

const MINUTE: i64 = 60 * 1000;
const DAY: i64 = 24 * 60 * MINUTE;

/// An event of `user` at `ts` (ms); `extra` adds fields such as `value` or
/// `session_id`.
fn event(user: &str, item: &str, kind: &str, ts: i64, extra: Value) -> Value {
    let mut event = json!({"user_id": user, "item_id": item, "type": kind, "timestamp": format_timestamp(ts)});
    if let (Some(event), Some(extra)) = (event.as_object_mut(), extra.as_object()) {
        event.extend(extra.clone());
    }
    event
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

/// The user's profile, scored against shop figures that count every event
/// posted so far.
async fn profile_of(app: &TestApp, user: &str) -> Value {
    app.refresh_figures().await;
    let response = app.get(&format!("/v1/users/{user}/profile")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn close(value: &Value, expected: f64, tolerance: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - expected).abs() <= tolerance)
}

async fn counts_sessions_spend_and_categories(app: TestApp) {
    for (item, categories) in [
        ("shoe-1", json!(["shoes"])),
        ("shoe-2", json!(["shoes", "sale"])),
        ("hat-1", json!(["hats"])),
    ] {
        assert_eq!(
            app.put(&format!("/v1/items/{item}"), &json!({"categories": categories}))
                .await
                .status(),
            200
        );
    }
    let jan1 = parse_timestamp("2025-01-01T10:00:00Z").unwrap();
    let s1 = json!({"session_id": "s1"});
    let s2 = json!({"session_id": "s2"});
    post_events(
        &app,
        vec![
            // Two sessions by id: 10:00-10:10 and 10:20-10:25.
            event("ann", "shoe-1", "view", jan1, s1.clone()),
            event("ann", "shoe-1", "add_to_cart", jan1 + 5 * MINUTE, s1.clone()),
            event(
                "ann",
                "shoe-1",
                "purchase",
                jan1 + 10 * MINUTE,
                json!({"session_id": "s1", "value": 29.99}),
            ),
            event("ann", "hat-1", "view", jan1 + 20 * MINUTE, s2.clone()),
            event("ann", "hat-1", "like", jan1 + 25 * MINUTE, s2),
            // No id: 09:00-09:20, then 31 minutes later a new session.
            event("ann", "shoe-2", "view", jan1 + DAY - 60 * MINUTE, json!({})),
            event("ann", "shoe-2", "click", jan1 + DAY - 40 * MINUTE, json!({})),
            event("ann", "shoe-2", "view", jan1 + DAY - 9 * MINUTE, json!({})),
            // Two days later: one more session.
            event(
                "ann",
                "shoe-2",
                "purchase",
                jan1 + 2 * DAY + 120 * MINUTE,
                json!({"value": 29.99}),
            ),
            event(
                "ann",
                "hat-1",
                "remove_from_cart",
                jan1 + 2 * DAY + 125 * MINUTE,
                json!({}),
            ),
            event(
                "ann",
                "hat-1",
                "rating",
                jan1 + 2 * DAY + 130 * MINUTE,
                json!({"value": 4}),
            ),
        ],
    )
    .await;

    let profile = profile_of(&app, "ann").await;
    assert_eq!(profile["user_id"], "ann");
    assert_eq!(
        profile["events"],
        json!({"total": 11, "by_type": {"view": 4, "click": 1, "like": 1, "add_to_cart": 1,
                                         "remove_from_cart": 1, "purchase": 2, "rating": 1}})
    );
    assert_eq!(profile["first_seen"], "2025-01-01T10:00:00.000Z");
    assert_eq!(profile["last_seen"], "2025-01-03T12:10:00.000Z");
    assert_eq!(profile["as_of"], profile["last_seen"], "ann's is the newest event");
    assert_eq!(
        profile["sessions"], 5,
        "s1, s2 and three sessions cut by 30-minute gaps"
    );
    assert_eq!(profile["purchases"]["count"], 2);
    assert!(close(&profile["purchases"]["spend"], 59.98, 1e-9), "{profile}");

    // Interest 22 in all: shoes 17, sale 8 (shoe-2 only), hats 5 (view 1,
    // like 2, rating 4 → 2; removing from the cart counts 0).
    let favourites: Vec<(&str, f64)> = profile["favourite_categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["category"].as_str().unwrap(), c["weight"].as_f64().unwrap()))
        .collect();
    let expected = [("shoes", 17.0 / 22.0), ("sale", 8.0 / 22.0), ("hats", 5.0 / 22.0)];
    assert_eq!(favourites.len(), 3, "{favourites:?}");
    for ((category, weight), (want_category, want_weight)) in favourites.iter().zip(expected) {
        assert_eq!(*category, want_category);
        assert!((weight - want_weight).abs() < 1e-4, "{favourites:?}");
    }

    assert_eq!(
        profile["recent_items"],
        json!([
            {"item_id": "hat-1", "type": "rating", "timestamp": "2025-01-03T12:10:00.000Z"},
            {"item_id": "shoe-2", "type": "purchase", "timestamp": "2025-01-03T12:00:00.000Z"},
            {"item_id": "shoe-1", "type": "purchase", "timestamp": "2025-01-01T10:10:00.000Z"},
        ])
    );

    // Gaps between sessions: 10 min, 22 h 35 min, 31 min, 26 h 9 min; the
    // median is (31 min + 22 h 35 min) / 2 = 693 min.
    let usual_gap_ms = 693 * MINUTE;
    assert!(close(
        &profile["churn"]["usual_gap_days"],
        usual_gap_ms as f64 / DAY as f64,
        1e-4
    ));
    assert_eq!(profile["churn"]["usual_gap_source"], "user");
    assert_eq!(profile["churn"]["days_since_last"], 0.0);
    assert_eq!(profile["churn"]["risk"], 0.0);
    assert_eq!(profile["segment"], "new");

    // The store's aggregate query cuts the same sessions and gaps.
    let shop = app
        .store
        .shop_stats(recd::profile::SESSION_GAP_MS, recd::profile::MIN_USUAL_GAP_MS, i64::MIN)
        .await
        .unwrap();
    let last = parse_timestamp("2025-01-03T12:10:00Z").unwrap();
    assert_eq!(
        shop.rfm_cuts,
        Some(RfmCuts {
            last_seen_ms: [last; 4],
            sessions: [5; 4],
            spend: [29.99 + 29.99; 4],
        })
    );
    assert_eq!(shop.usual_gap_ms, Some(usual_gap_ms as f64));
}

/// Five shoppers over 40 days; the newest event (the `as_of`) is day 40 at
/// 12:10.
async fn churn_rfm_and_segments_are_relative_to_the_shop(app: TestApp) {
    let day0 = parse_timestamp("2025-03-01T12:00:00Z").unwrap();
    let at = |day: i64| day0 + day * DAY;
    let view = |user: &str, day: i64| event(user, "item", "view", at(day), json!({}));
    let buy = |user: &str, ts: i64, value: f64| event(user, "item", "purchase", ts, json!({"value": value}));
    let mut events = Vec::new();
    // Every 4 days from day 4 to day 40, buying 50 on the last.
    events.extend((1..=10).map(|n| view("regular", 4 * n)));
    events.push(buy("regular", at(40) + 10 * MINUTE, 50.0));
    // Days 8, 14 and 20, buying 20; away 20 days since, usually 6.
    events.extend([8, 14, 20].map(|d| view("gone", d)));
    events.push(buy("gone", at(20), 20.0));
    events.extend([9, 38].map(|d| view("monthly", d)));
    events.extend([25, 40].map(|d| view("pair", d)));
    events.push(buy("pair", at(40), 5.0));
    events.push(view("once", 39));
    post_events(&app, events).await;

    let [regular, gone, monthly, pair, once] = [
        profile_of(&app, "regular").await,
        profile_of(&app, "gone").await,
        profile_of(&app, "monthly").await,
        profile_of(&app, "pair").await,
        profile_of(&app, "once").await,
    ];
    let as_of = format_timestamp(at(40) + 10 * MINUTE);
    for profile in [&regular, &gone, &monthly, &pair, &once] {
        assert_eq!(profile["as_of"], as_of, "measured from the newest event, not the clock");
    }

    // Churn: days since the last event against the usual gap.
    assert_eq!(regular["churn"]["risk"], 0.0);
    assert!(close(&regular["churn"]["usual_gap_days"], 4.0, 1e-9));
    assert!(close(&gone["churn"]["usual_gap_days"], 6.0, 1e-9));
    assert!(close(&gone["churn"]["days_since_last"], 20.0 + 10.0 / 1440.0, 1e-4));
    let gone_risk = churn_risk((20 * DAY + 10 * MINUTE) as f64, (6 * DAY) as f64);
    assert!(close(&gone["churn"]["risk"], gone_risk, 1e-4), "{}", gone["churn"]);
    assert!(gone_risk > 0.5 && gone_risk < 0.75);
    assert!(close(&monthly["churn"]["usual_gap_days"], 29.0, 1e-9));
    let monthly_risk = monthly["churn"]["risk"].as_f64().unwrap();
    assert!(0.0 < monthly_risk && monthly_risk < gone_risk);
    assert!(close(&pair["churn"]["usual_gap_days"], 15.0, 1e-9));
    // One session: the shop's median usual gap, of 4, 6, 15 and 29 days.
    assert_eq!(once["churn"]["usual_gap_source"], "shop");
    assert!(close(&once["churn"]["usual_gap_days"], 10.5, 1e-9), "{}", once["churn"]);
    let once_risk = churn_risk((DAY + 10 * MINUTE) as f64, 10.5 * DAY as f64);
    assert!(close(&once["churn"]["risk"], once_risk, 1e-4));

    // RFM, by fifths of the five shoppers.
    let scores = |p: &Value| {
        let rfm = &p["rfm"];
        (
            rfm["recency"].clone(),
            rfm["frequency"].clone(),
            rfm["monetary"].clone(),
        )
    };
    assert_eq!(scores(&regular), (json!(5), json!(5), json!(5)));
    assert_eq!(scores(&gone), (json!(1), json!(4), json!(4)));
    assert_eq!(scores(&monthly), (json!(2), json!(2), json!(1)));
    assert_eq!(scores(&pair), (json!(4), json!(2), json!(3)));
    assert_eq!(scores(&once), (json!(3), json!(1), json!(1)));
    assert_eq!(regular["rfm"]["frequency_sessions"], 10);
    assert_eq!(regular["rfm"]["monetary_spend"], 50.0);
    assert!(close(&gone["rfm"]["recency_days"], 20.0 + 10.0 / 1440.0, 1e-4));

    assert_eq!(regular["segment"], "champion");
    assert_eq!(gone["segment"], "at_risk");
    assert_eq!(monthly["segment"], "occasional");
    assert_eq!(pair["segment"], "new");
    assert_eq!(once["segment"], "new");

    let shop = app
        .store
        .shop_stats(recd::profile::SESSION_GAP_MS, recd::profile::MIN_USUAL_GAP_MS, i64::MIN)
        .await
        .unwrap();
    assert_eq!(
        shop.rfm_cuts,
        Some(RfmCuts {
            last_seen_ms: [at(20), at(38), at(39), at(40)],
            sessions: [1, 2, 2, 3],
            spend: [0.0, 0.0, 5.0, 20.0],
        })
    );
    assert_eq!(shop.usual_gap_ms, Some(10.5 * DAY as f64));
    // A window from day 30 on: "gone" (last seen on day 20) is not counted.
    let recent = app
        .store
        .shop_stats(recd::profile::SESSION_GAP_MS, recd::profile::MIN_USUAL_GAP_MS, at(30))
        .await
        .unwrap();
    assert_eq!(
        recent.rfm_cuts.unwrap().last_seen_ms,
        [at(38), at(39), at(40), at(40) + 10 * MINUTE]
    );
}

/// Shop statistics are made in the background: while a refresh is held
/// open, profiles answer at once from the figures before it; once it is
/// published they use the new ones.
async fn a_refresh_held_open_does_not_delay_profiles(app: TestApp) {
    let day0 = parse_timestamp("2025-06-01T12:00:00Z").unwrap();
    let buy =
        |user: &str, day: i64, value: f64| event(user, "item", "purchase", day0 + day * DAY, json!({"value": value}));
    post_events(
        &app,
        vec![buy("ann", 1, 10.0), buy("ben", 2, 20.0), buy("cat", 3, 30.0)],
    )
    .await;
    let before = profile_of(&app, "cat").await;
    assert_eq!(before["rfm"]["monetary"], 4, "the biggest spender of three");

    // Twelve bigger spenders arrive; their refresh is computed but held.
    post_events(
        &app,
        (0..12).map(|u| buy(&format!("big-{u}"), 4, 100.0 + u as f64)).collect(),
    )
    .await;
    let hold = app.app.hold_shop_stats().await;
    let refresh = tokio::spawn({
        let app = app.app.clone();
        async move { app.refresh_shop_stats(false).await }
    });
    for _ in 0..3 {
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), app.get("/v1/users/cat/profile"))
            .await
            .expect("a profile does not wait for the refresh");
        let during: Value = response.json().await.unwrap();
        for score in ["recency", "frequency", "monetary"] {
            assert_eq!(
                during["rfm"][score], before["rfm"][score],
                "scored by the figures before the refresh"
            );
        }
    }
    drop(hold);
    refresh.await.unwrap().unwrap();
    let after: Value = app.get("/v1/users/cat/profile").await.json().await.unwrap();
    assert_eq!(
        after["rfm"]["monetary"], 1,
        "now among the smallest of fifteen: {}",
        after["rfm"]
    );
}

async fn unknown_and_erased_users_are_404(app: TestApp) {
    let body = problem(app.get("/v1/users/nobody/profile").await, 404).await;
    assert_eq!(body["type"], "urn:recd:problem:not-found");

    post_events(
        &app,
        vec![
            event(
                "eve",
                "x",
                "view",
                parse_timestamp("2025-01-01T00:00:00Z").unwrap(),
                json!({}),
            ),
            event(
                "bob",
                "x",
                "view",
                parse_timestamp("2025-01-02T00:00:00Z").unwrap(),
                json!({}),
            ),
        ],
    )
    .await;
    assert_eq!(profile_of(&app, "eve").await["events"]["total"], 1);
    assert_eq!(app.delete("/v1/users/eve").await.status(), 200);
    problem(app.get("/v1/users/eve/profile").await, 404).await;
    assert_eq!(profile_of(&app, "bob").await["events"]["total"], 1);
}

crate::both_stores!(
    a_refresh_held_open_does_not_delay_profiles,
    counts_sessions_spend_and_categories,
    churn_rfm_and_segments_are_relative_to_the_shop,
    unknown_and_erased_users_are_404,
);

async fn profiles_need_the_read_scope(db: Db) {
    let Some(app) = spawn_app_with(db, |s| {
        s.api_keys = parse_api_keys("read:r-key,write:w-key").unwrap();
    })
    .await
    else {
        return;
    };
    let events = json!({"events": [{"user_id": "u", "item_id": "i", "type": "view"}]});
    let posted = app
        .client
        .post(app.at("/v1/events"))
        .bearer_auth("w-key")
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);

    let get = |key: Option<&'static str>| {
        let mut request = app.client.get(app.at("/v1/users/u/profile"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    problem(get(None).await.unwrap(), 401).await;
    problem(get(Some("w-key")).await.unwrap(), 403).await;
    assert_eq!(get(Some("r-key")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn profiles_need_the_read_scope_sqlite() {
    profiles_need_the_read_scope(Db::Sqlite).await;
}

#[tokio::test]
async fn profiles_need_the_read_scope_postgres() {
    profiles_need_the_read_scope(Db::Postgres).await;
}
