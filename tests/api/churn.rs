//! Churn prediction, measured: a shop where shoppers who only look leave
//! and shoppers who buy stay, laid out so that recency alone cannot tell
//! them apart at the test cutoff. The training's classifier must find the
//! pattern, beat the formula and recency on the holdout, be shown by `GET
//! /v1/model`, and score the profiles and the segment lists alike.

use std::collections::BTreeMap;

use recd::clock::format_timestamp;
use recd::config::Settings;
use serde_json::{json, Value};

use crate::helpers::TestApp;

const MINUTE: i64 = 60 * 1000;
const DAY: i64 = 24 * 60 * MINUTE;
const HORIZON_DAYS: i64 = 10;

fn horizon(settings: &mut Settings) {
    settings.train.churn_horizon_days = HORIZON_DAYS as f64;
    settings.train.dim = 8;
    settings.train.hidden = 8;
    settings.train.max_epochs = 1;
    settings.train.validation_cases = 100;
}

/// One visit of `user` at `ts`: a view, and for a buyer a purchase a
/// minute later.
fn visit(events: &mut Vec<Value>, user: &str, ts: i64, buys: bool, n: usize) {
    let item = format!("item-{}", n % 20);
    events.push(json!({"user_id": user, "item_id": item, "type": "view", "timestamp": format_timestamp(ts)}));
    if buys {
        events.push(
            json!({"user_id": user, "item_id": item, "type": "purchase", "value": 20.0,
                           "timestamp": format_timestamp(ts + MINUTE)}),
        );
    } else {
        events.push(
            json!({"user_id": user, "item_id": format!("item-{}", (n + 7) % 20), "type": "view",
                           "timestamp": format_timestamp(ts + MINUTE)}),
        );
    }
}

/// The shop, newest event `newest`; fitted at `newest − 20 days`, tested at
/// `newest − 10 days`. Each user visits every 2 to 4 days.
/// - `buyer-*` (60): buy at every visit, from 60 days back to the end.
/// - `early-*` (40): only look, from 50 days back; their last visit is in
///   the 4 days before the fitting cutoff, then they leave.
/// - `late-*` (40): only look, first seen after the fitting cutoff; their
///   last visit is in the 4 days before the test cutoff, then they leave.
///
/// At the test cutoff the late lookers (churned) were last seen as
/// recently as the buyers (who come back): only what they did tells.
fn shop(newest: i64) -> (Vec<Value>, BTreeMap<String, &'static str>) {
    let fit = newest - 2 * HORIZON_DAYS * DAY;
    let test = newest - HORIZON_DAYS * DAY;
    let mut events = Vec::new();
    let mut kinds = BTreeMap::new();
    let mut walk = |user: String, from: i64, last: i64, buys: bool, u: i64| {
        let gap = (2 + u % 3) * DAY;
        // Backwards from the last visit, so it lands where it must.
        let mut ts = last;
        let mut n = 0;
        while ts >= from {
            visit(&mut events, &user, ts, buys, n + u as usize);
            ts -= gap + (u * 37 % 60) * MINUTE;
            n += 1;
        }
        user
    };
    for u in 0..60 {
        let last = newest - (u % 4) * DAY / 2 - u * MINUTE;
        kinds.insert(walk(format!("buyer-{u}"), newest - 60 * DAY, last, true, u), "buyer");
    }
    for u in 0..40 {
        let last = fit - (u % 8) * DAY / 2 - u * MINUTE;
        kinds.insert(walk(format!("early-{u}"), newest - 50 * DAY, last, false, u), "early");
    }
    for u in 0..40 {
        let last = test - (u % 8) * DAY / 2 - u * MINUTE;
        kinds.insert(walk(format!("late-{u}"), fit + DAY, last, false, u), "late");
    }
    (events, kinds)
}

async fn the_classifier_finds_who_leaves_where_recency_cannot(app: TestApp) {
    let newest = chrono::Utc::now().timestamp_millis() - 60 * MINUTE;
    let (events, kinds) = shop(newest);
    for chunk in events.chunks(1000) {
        let reply: Value = app
            .post("/v1/events", &json!({"events": chunk}))
            .await
            .json()
            .await
            .unwrap();
        assert!(reply["rejected"].as_array().unwrap().is_empty(), "{reply}");
    }
    app.refresh_figures().await;

    // Before any training: the formula, and no figures.
    let model: Value = app.get("/v1/model").await.json().await.unwrap();
    assert!(model["churn"].is_null(), "{model}");
    let profile: Value = app.get("/v1/users/late-3/profile").await.json().await.unwrap();
    assert_eq!(profile["churn"]["method"], "formula", "{profile}");

    // A training as `recd train` runs it (no gate: the figures are what
    // this test is about, not the recommendations).
    let config = app.app.settings.train.clone();
    let input = recd::trainer::read_training_data(&app.store, &config, None)
        .await
        .unwrap();
    let candidate = tokio::task::spawn_blocking(move || recd::trainer::train_candidate(input, &config, false, None))
        .await
        .unwrap()
        .unwrap();
    recd::trainer::save_snapshot(&app.store, &candidate.snapshot, None)
        .await
        .unwrap();
    app.app.serve_snapshot(candidate.snapshot, None);

    let model: Value = app.get("/v1/model").await.json().await.unwrap();
    let churn = &model["churn"];
    assert_eq!(churn["horizon_days"], 10.0, "{churn}");
    assert_eq!(churn["horizon_source"], "setting", "{churn}");
    // Fitted on buyers and early lookers; tested on everyone.
    assert_eq!(churn["users"]["train"], 100, "{churn}");
    assert_eq!(churn["users"]["test"], 140, "{churn}");
    // Early and late lookers churned at the test cutoff.
    assert_eq!(churn["positives_share"], 0.5714, "{churn}");
    let figure = |method: &str, metric: &str| churn["methods"][method][metric].as_f64().unwrap();
    for metric in ["roc_auc", "pr_auc"] {
        assert!(
            figure("classifier", metric) > figure("recency", metric) + 0.05,
            "{metric}: {churn}"
        );
        assert!(
            figure("classifier", metric) > figure("formula", metric) + 0.05,
            "{metric}: {churn}"
        );
    }
    assert!(figure("classifier", "roc_auc") > 0.95, "{churn}");
    // Recency tells the early lookers (gone 10 days) from the rest, but not
    // the late ones from the buyers.
    assert!(figure("recency", "roc_auc") < 0.9, "{churn}");
    assert_eq!(churn["chosen"], "classifier", "{churn}");

    // Profiles take their risk from the classifier now: a looker who
    // visited a few days ago is at risk, a buyer not.
    let profile: Value = app.get("/v1/users/late-3/profile").await.json().await.unwrap();
    assert_eq!(profile["churn"]["method"], "classifier", "{profile}");
    let buyer: Value = app.get("/v1/users/buyer-3/profile").await.json().await.unwrap();
    assert_eq!(buyer["churn"]["method"], "classifier");
    assert!(
        profile["churn"]["risk"].as_f64().unwrap() > buyer["churn"]["risk"].as_f64().unwrap(),
        "{profile} {buyer}"
    );

    // The segment lists score with the same classifier: every shopper's
    // listed risk and segment are their profile's.
    app.refresh_figures().await;
    let summary: Value = app.get("/v1/segments").await.json().await.unwrap();
    let mut listed = BTreeMap::new();
    for segment in summary["segments"].as_array().unwrap() {
        let name = segment["name"].as_str().unwrap();
        let page: Value = app
            .get(&format!("/v1/segments/{name}/users?limit=1000"))
            .await
            .json()
            .await
            .unwrap();
        for member in page["users"].as_array().unwrap() {
            listed.insert(
                member["user_id"].as_str().unwrap().to_owned(),
                (name.to_owned(), member["churn_risk"].clone()),
            );
        }
    }
    assert_eq!(listed.len(), kinds.len());
    for (user, (segment, risk)) in &listed {
        let profile: Value = app
            .get(&format!("/v1/users/{user}/profile"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(&profile["segment"], segment.as_str(), "{user}");
        assert_eq!(&profile["churn"]["risk"], risk, "{user}");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("recd_churn_metric"), "recd_churn_metric missing");
    app.stop().await;
}

/// The classifier's features come from a user's measures: the store's
/// aggregate (segment lists) and the profile's Rust (from the events) must
/// give the same, sessions with ids, overlapping and alike included.
async fn measures_in_sql_are_the_profiles(app: TestApp) {
    let at = |day: i64, minute: i64| 1_700_000_000_000 + day * DAY + minute * MINUTE;
    let mut events = Vec::new();
    let mut push = |user: &str, kind: &str, ts: i64, session: Option<&str>, value: Option<f64>| {
        let mut e = json!({"user_id": user, "item_id": "i", "type": kind, "timestamp": format_timestamp(ts)});
        if let Some(s) = session {
            e["session_id"] = json!(s);
        }
        if let Some(v) = value {
            e["value"] = json!(v);
        }
        events.push(e);
    };
    // a: sessions without ids, growing gaps, a purchase and a rating.
    for (day, minute, kind) in [
        (0, 0, "view"),
        (0, 10, "click"),
        (1, 0, "view"),
        (3, 0, "add_to_cart"),
        (8, 0, "view"),
    ] {
        push("a", kind, at(day, minute), None, None);
    }
    push("a", "purchase", at(8, 5), None, Some(12.5));
    push("a", "rating", at(8, 6), None, Some(4.0));
    // b: one session.
    push("b", "like", at(2, 0), None, None);
    // c: a session id spanning days, overlapping sessions without ids, and
    // two alike sessions (same start and end) last.
    push("c", "view", at(0, 0), Some("s1"), None);
    push("c", "view", at(2, 0), Some("s1"), None);
    push("c", "view", at(1, 0), None, None);
    push("c", "remove_from_cart", at(5, 0), Some("s2"), None);
    push("c", "view", at(5, 0), Some("s3"), None);
    push("c", "view", at(4, 0), None, None);
    let reply: Value = app
        .post("/v1/events", &json!({"events": events}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["rejected"].as_array().unwrap().len(), 0, "{reply}");

    let from_sql = app
        .store
        .user_measures("", 100, recd::profile::SESSION_GAP_MS)
        .await
        .unwrap();
    assert_eq!(from_sql.len(), 3);
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-6,
        (a, b) => a == b,
    };
    for (user, sql) in from_sql {
        let events = app.store.user_events(&user, 1000).await.unwrap();
        let rust = recd::profile::measures(&events).unwrap();
        assert_eq!(
            (sql.first_ms, sql.last_ms, sql.sessions, sql.events, sql.by_type),
            (rust.first_ms, rust.last_ms, rust.sessions, rust.events, rust.by_type),
            "{user}"
        );
        assert!(close(Some(sql.spend), Some(rust.spend)), "{user}");
        assert!(close(sql.median_gap_ms, rust.median_gap_ms), "{user}: {sql:?} {rust:?}");
        assert!(close(sql.mean_gap_ms, rust.mean_gap_ms), "{user}: {sql:?} {rust:?}");
        assert!(close(sql.last_gap_ms, rust.last_gap_ms), "{user}: {sql:?} {rust:?}");
        // The checks have something to check.
        match user.as_str() {
            "a" => assert_eq!(rust.last_gap_ms, Some((5 * DAY) as f64), "{rust:?}"),
            "b" => assert_eq!(rust.last_gap_ms, None),
            _ => assert_eq!(rust.last_gap_ms, Some(0.0), "{rust:?}"),
        }
    }
    app.stop().await;
}

crate::both_stores!(with super::horizon;
    the_classifier_finds_who_leaves_where_recency_cannot,
    measures_in_sql_are_the_profiles,
);

/// `recd eval --churn FILE`: the same measurement from a CSV, as a table and
/// as JSON.
#[test]
fn eval_churn_measures_a_csv() {
    let newest = 1_800_000_000_000;
    let (events, _) = shop(newest);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.csv");
    let mut csv = String::from("user_id,item_id,type,value,timestamp\n");
    for e in &events {
        let value = e["value"].as_f64().map_or(String::new(), |v| v.to_string());
        csv.push_str(&format!(
            "{},{},{},{value},{}\n",
            e["user_id"].as_str().unwrap(),
            e["item_id"].as_str().unwrap(),
            e["type"].as_str().unwrap(),
            e["timestamp"].as_str().unwrap()
        ));
    }
    std::fs::write(&path, csv).unwrap();
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_recd"));
        cmd.args(["eval", "--churn"])
            .arg(&path)
            .env("RECD_TRAIN__CHURN_HORIZON_DAYS", HORIZON_DAYS.to_string());
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let report: Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(report["chosen"], "classifier", "{report}");
    assert_eq!(report["users"], json!({"train": 100, "test": 140}), "{report}");
    let roc = |method: &str| report["methods"][method]["roc_auc"].as_f64().unwrap();
    assert!(roc("classifier") > roc("recency") + 0.05, "{report}");
    assert!(roc("classifier") > roc("formula") + 0.05, "{report}");
    let table = run(false);
    for line in [
        "method      ROC AUC  PR AUC",
        "classifier",
        "formula",
        "recency",
        "profiles use: classifier",
    ] {
        assert!(table.contains(line), "{line}: {table}");
    }
}
