//! Segments for marketing: every shopper in exactly one RFM segment, the
//! sizes, the member lists (paged, CSV) and their agreement with profiles.

use std::collections::{BTreeMap, BTreeSet};

use recd::clock::format_timestamp;
use recd::config::{parse_api_keys, Settings};
use recd::ingest::parse_timestamp;
use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

const MINUTE: i64 = 60 * 1000;
const DAY: i64 = 24 * 60 * MINUTE;
const ADMIN: &str = "admin-key";
const READ: &str = "read-key";

fn keys(settings: &mut Settings) {
    settings.api_keys = parse_api_keys(&format!("read:{READ},write:write-key,admin:{ADMIN}")).unwrap();
}

async fn get_as(app: &TestApp, key: &str, path: &str) -> reqwest::Response {
    app.client
        .get(app.at(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("request sent")
}

async fn get_json(app: &TestApp, key: &str, path: &str) -> Value {
    let response = get_as(app, key, path).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

fn event(user: &str, kind: &str, ts: i64, value: Option<f64>) -> Value {
    let mut e = json!({"user_id": user, "item_id": "item", "type": kind, "timestamp": format_timestamp(ts)});
    if let Some(v) = value {
        e["value"] = json!(v);
    }
    e
}

async fn post_events(app: &TestApp, events: Vec<Value>) {
    let count = events.len();
    let reply: Value = app
        .client
        .post(app.at("/v1/events"))
        .bearer_auth("write-key")
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], count, "{reply}");
}

/// The hand-built shop of ten shoppers, and the segment each is in by the
/// rules of docs/api.md, worked out here by hand.
///
/// Days count from day 0; the newest event is on day 100 (`as_of`). Every
/// view is a session of its own (days apart); a purchase at the time of a
/// view is in its session.
///
/// RFM cuts over the 10 users (ranks ⌈10k/5⌉ = 2, 4, 6, 8):
/// - last seen (days) 10 20 40 90 96 97 98 99 100 100 → cuts 20, 90, 97, 99;
/// - sessions 1 2 2 3 3 5 5 6 6 6 → cuts 2, 3, 5, 6;
/// - spend 0 0 0 0 0 0 10 30 50 80 → cuts 0, 0, 0, 30.
///
/// Usual gaps (median own gap, days) of the users with two sessions or
/// more: 2 5 10 10 10 20 20 30 40, so the shop's is 10.
fn shop(day0: i64) -> (Vec<Value>, BTreeMap<&'static str, &'static str>) {
    let at = |d: i64| day0 + d * DAY;
    let mut events = Vec::new();
    let mut views = |user: &'static str, days: &[i64], spend: Option<f64>| {
        events.extend(days.iter().map(|&d| event(user, "view", at(d), None)));
        if let Some(value) = spend {
            events.push(event(user, "purchase", at(*days.last().unwrap()), Some(value)));
        }
    };
    let mut expected = BTreeMap::new();
    // Usual gap 2, away 90 days: risk 1 − 2^(−90/4) ≥ 0.75.
    views("lost-1", &[0, 2, 4, 6, 8, 10], None);
    expected.insert("lost-1", "lost");
    // One session: the shop's usual gap (10); away 80: risk 1 − 2^(−4) = 0.9375.
    views("lost-2", &[20], None);
    expected.insert("lost-2", "lost");
    // Usual gap 20, away 60: risk 1 − 2^(−1.5) ≈ 0.65, in 0.5..0.75.
    views("risky", &[0, 20, 40], None);
    expected.insert("risky", "at_risk");
    // First seen 5 days before as_of (< 30), risk 0.
    views("newbie", &[95, 100], None);
    expected.insert("newbie", "new");
    // R 5 (100 > 99), F 4 (6 sessions: > 5, not > 6), M 5 (80 > 30), risk 0.
    views("champ", &[0, 20, 40, 60, 80, 100], Some(80.0));
    expected.insert("champ", "champion");
    // R 4 (99: > 97, not > 99), F 4, M 1: not a champion, loyal.
    views("loyal", &[49, 59, 69, 79, 89, 99], None);
    expected.insert("loyal", "loyal");
    // R 4, F 3 (5 sessions), M 5: occasional.
    views("casual", &[58, 68, 78, 88, 98], Some(50.0));
    expected.insert("casual", "occasional");
    // R 3, F 3, M 4.
    views("casual-2", &[57, 67, 77, 87, 97], Some(30.0));
    expected.insert("casual-2", "occasional");
    // R 3, F 2, M 4 (10 > 0, not > 30); usual gap 30, away 4.
    views("mid", &[36, 66, 96], Some(10.0));
    expected.insert("mid", "occasional");
    // R 2, F 1, M 1; usual gap 40, away 10: risk ≈ 0.08.
    views("slow", &[50, 90], None);
    expected.insert("slow", "occasional");
    (events, expected)
}

/// Every member of `segment`, paging with `limit`, checking the pages.
async fn all_members(app: &TestApp, segment: &str, limit: usize) -> Vec<Value> {
    let mut members = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/segments/{segment}/users?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = get_json(app, ADMIN, &path).await;
        let users = page["users"].as_array().unwrap().clone();
        assert!(users.len() <= limit, "{page}");
        members.extend(users.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(users.len(), limit, "only the last page is short: {page}");
                cursor = Some(next.to_owned());
            }
            None => return members,
        }
    }
}

async fn membership_equals_the_rules_on_a_hand_built_shop(app: TestApp) {
    let day0 = parse_timestamp("2025-01-01T00:00:00Z").unwrap();
    let (events, expected) = shop(day0);
    post_events(&app, events).await;
    app.refresh_figures().await;

    let summary = get_json(&app, READ, "/v1/segments").await;
    assert_eq!(summary["as_of"], format_timestamp(day0 + 100 * DAY), "{summary}");
    assert!(summary["computed_at"].is_string(), "{summary}");
    let names: Vec<&str> = summary["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lost", "at_risk", "new", "champion", "loyal", "occasional"]);

    let mut got = BTreeMap::new();
    for segment in &summary["segments"].as_array().unwrap().clone() {
        let name = segment["name"].as_str().unwrap();
        assert!(segment["rule"].as_str().is_some_and(|r| !r.is_empty()));
        let members = all_members(&app, name, 2).await;
        assert_eq!(segment["size"], members.len(), "{name}: {summary}");
        for m in members {
            let user = m["user_id"].as_str().unwrap().to_owned();
            assert!(
                got.insert(user.clone(), name.to_owned()).is_none(),
                "{user} in two segments"
            );
        }
    }
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(u, s)| ((*u).to_owned(), (*s).to_owned()))
        .collect();
    assert_eq!(got, expected, "membership by the rules");
    let expected_sizes: Vec<(&str, usize, f64)> = [
        ("lost", 2),
        ("at_risk", 1),
        ("new", 1),
        ("champion", 1),
        ("loyal", 1),
        ("occasional", 4),
    ]
    .map(|(n, s)| (n, s, s as f64 / 10.0))
    .to_vec();
    for (segment, (name, size, share)) in summary["segments"].as_array().unwrap().iter().zip(expected_sizes) {
        assert_eq!(segment["name"], name);
        assert_eq!(segment["size"], size, "{segment}");
        assert_eq!(segment["share"], share, "{segment}");
    }

    // The profile's segment is the list's, for every user.
    for (user, segment) in &got {
        let profile = get_json(&app, READ, &format!("/v1/users/{user}/profile")).await;
        assert_eq!(profile["segment"], segment.as_str(), "{user}");
    }
    // The list's churn risk and last seen are the profile's.
    let champ = all_members(&app, "champion", 10).await;
    let profile = get_json(&app, READ, "/v1/users/champ/profile").await;
    assert_eq!(champ[0]["churn_risk"], profile["churn"]["risk"]);
    assert_eq!(champ[0]["last_seen"], profile["last_seen"]);
    assert_eq!(champ[0]["last_seen"], format_timestamp(day0 + 100 * DAY));
    app.stop().await;
}

async fn pages_and_csv_list_every_member_once(app: TestApp) {
    let day0 = parse_timestamp("2025-01-01T00:00:00Z").unwrap();
    // 23 shoppers, all new: one view each today, with ids that need CSV
    // quoting for one.
    let mut users: Vec<String> = (0..22).map(|n| format!("u{n:02}")).collect();
    users.push("comma,\"quoted\"".to_owned());
    let events = users.iter().map(|u| event(u, "view", day0, None)).collect();
    post_events(&app, events).await;
    app.refresh_figures().await;

    for limit in [1, 5, 23, 1000] {
        let members = all_members(&app, "new", limit).await;
        let ids: Vec<String> = members
            .iter()
            .map(|m| m["user_id"].as_str().unwrap().to_owned())
            .collect();
        let distinct: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "no duplicates at limit {limit}");
        assert_eq!(distinct, users.iter().collect(), "no gaps at limit {limit}");
    }
    // Default limit: 100.
    let page = get_json(&app, ADMIN, "/v1/segments/new/users").await;
    assert_eq!(page["users"].as_array().unwrap().len(), 23);
    assert_eq!(page["next_cursor"], Value::Null);
    let empty = get_json(&app, ADMIN, "/v1/segments/lost/users").await;
    assert_eq!(empty, json!({"users": [], "next_cursor": null}));

    let response = get_as(&app, ADMIN, "/v1/segments/new/users.csv").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    let text = response.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(reader.headers().unwrap(), vec!["user_id", "churn_risk", "last_seen"]);
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let listed: BTreeSet<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(rows.len(), 23);
    assert_eq!(listed, users.iter().map(String::as_str).collect());
    assert!(
        rows.iter().all(|r| &r[1] == "0" && r[2] == format_timestamp(day0)),
        "{text}"
    );
    let empty = get_as(&app, ADMIN, "/v1/segments/loyal/users.csv")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(empty, "user_id,churn_risk,last_seen\n");

    // Erasure takes a user out of the lists at once.
    let reply = app
        .client
        .delete(app.at("/v1/users/u03"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let members = all_members(&app, "new", 1000).await;
    assert_eq!(members.len(), 22);
    assert!(members.iter().all(|m| m["user_id"] != "u03"));
    let summary = get_json(&app, READ, "/v1/segments").await;
    assert_eq!(summary["segments"][2]["size"], 22, "{summary}");
    let csv = get_as(&app, ADMIN, "/v1/segments/new/users.csv")
        .await
        .text()
        .await
        .unwrap();
    assert!(!csv.contains("u03"), "{csv}");
    // ...and stays out after the next computation.
    app.app.refresh_segments(true).await.unwrap();
    assert_eq!(all_members(&app, "new", 7).await.len(), 22);
    app.stop().await;
}

async fn scopes_and_bad_requests(app: TestApp) {
    let day0 = parse_timestamp("2025-01-01T00:00:00Z").unwrap();
    post_events(&app, vec![event("ann", "view", day0, None)]).await;
    app.refresh_figures().await;

    // The sizes are for read keys; the members (shoppers) for admins only.
    assert_eq!(get_as(&app, READ, "/v1/segments").await.status(), 200);
    problem(get_as(&app, READ, "/v1/segments/new/users").await, 403).await;
    problem(get_as(&app, READ, "/v1/segments/new/users.csv").await, 403).await;
    problem(get_as(&app, "write-key", "/v1/segments/new/users").await, 403).await;
    problem(get_as(&app, "nope", "/v1/segments").await, 401).await;

    problem(get_as(&app, ADMIN, "/v1/segments/vip/users").await, 404).await;
    problem(get_as(&app, ADMIN, "/v1/segments/vip/users.csv").await, 404).await;
    for limit in ["0", "1001", "-1", "ten", ""] {
        let body = problem(
            get_as(&app, ADMIN, &format!("/v1/segments/new/users?limit={limit}")).await,
            422,
        )
        .await;
        assert_eq!(body["errors"][0]["field"], "limit", "{body}");
    }
    for cursor in ["zz", "", "abc"] {
        let body = problem(
            get_as(&app, ADMIN, &format!("/v1/segments/new/users?cursor={cursor}")).await,
            422,
        )
        .await;
        assert_eq!(body["errors"][0]["field"], "cursor", "{body}");
    }
    let page = get_json(&app, ADMIN, "/v1/segments/new/users?limit=1000").await;
    assert_eq!(page["users"][0]["user_id"], "ann");
    app.stop().await;
}

async fn sizes_cover_every_shopper_with_events(app: TestApp) {
    // Before any event: all six, empty.
    app.refresh_figures().await;
    let summary = get_json(&app, READ, "/v1/segments").await;
    let sizes: Vec<i64> = summary["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_i64().unwrap())
        .collect();
    assert_eq!(sizes, [0; 6], "{summary}");
    assert_eq!(summary["segments"][0]["share"], 0.0);

    let day0 = parse_timestamp("2025-01-01T00:00:00Z").unwrap();
    let events = (0..7)
        .flat_map(|u| (0..u).map(move |d| event(&format!("s{u}"), "view", day0 + i64::from(d) * 40 * DAY, None)))
        .collect::<Vec<_>>();
    post_events(&app, events).await;
    app.refresh_figures().await;
    let summary = get_json(&app, READ, "/v1/segments").await;
    let total: i64 = summary["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_i64().unwrap())
        .sum();
    // s0 has no events: six shoppers.
    assert_eq!(total, 6, "{summary}");
    let shares: f64 = summary["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["share"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-3, "{summary}");

    // The job's metrics are on /metrics.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for metric in [
        "recd_segments_refresh_seconds",
        "recd_segments_users",
        "recd_segments_computed_at_seconds",
    ] {
        assert!(metrics.contains(metric), "{metric} missing");
    }
    app.stop().await;
}

crate::both_stores!(with super::keys;
    membership_equals_the_rules_on_a_hand_built_shop,
    pages_and_csv_list_every_member_once,
    scopes_and_bad_requests,
    sizes_cover_every_shopper_with_events,
);
