//! API keys and scopes.

use recd::config::parse_api_keys;
use serde_json::json;

use crate::helpers::{problem, spawn_app_with, test_settings, Db};

async fn scopes_are_enforced(db: Db) {
    let Some(app) = spawn_app_with(db, |s| {
        s.api_keys = parse_api_keys("read:r-key,write:w-key,admin:a-key").unwrap();
    })
    .await
    else {
        return;
    };
    let event = json!({"events": [{"user_id": "u", "item_id": "i", "type": "view"}]});
    let post = |key: Option<&'static str>| {
        let mut request = app.client.post(app.at("/v1/events")).json(&event);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    problem(post(None).await.unwrap(), 401).await;
    problem(post(Some("w-key-but-wrong")).await.unwrap(), 401).await;
    problem(post(Some("r-key")).await.unwrap(), 403).await;
    assert_eq!(post(Some("w-key")).await.unwrap().status(), 200);
    assert_eq!(post(Some("a-key")).await.unwrap().status(), 200, "admin implies write");

    let get = |key: &'static str| app.client.get(app.at("/v1/items/i")).bearer_auth(key).send();
    assert_eq!(get("r-key").await.unwrap().status(), 200);
    assert_eq!(get("a-key").await.unwrap().status(), 200);
    problem(get("w-key").await.unwrap(), 403).await;
    problem(app.get("/v1/items/i").await, 401).await;

    let erase = |key: &'static str| app.client.delete(app.at("/v1/users/u")).bearer_auth(key).send();
    problem(erase("w-key").await.unwrap(), 403).await;
    assert_eq!(erase("a-key").await.unwrap().status(), 200);

    // Health and metrics need no key.
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(app.get("/metrics").await.status(), 200);
}

#[tokio::test]
async fn scopes_are_enforced_sqlite() {
    scopes_are_enforced(Db::Sqlite).await;
}

#[tokio::test]
async fn scopes_are_enforced_postgres() {
    scopes_are_enforced(Db::Postgres).await;
}

#[test]
fn without_keys_only_loopback_is_allowed() {
    let mut settings = test_settings("sqlite://unused.db");
    settings.listen = "0.0.0.0:8080".parse().unwrap();
    let refused = recd::server::check_listen_address(&settings).unwrap_err();
    assert!(refused.to_string().contains("RECD_API_KEYS"));
    settings.api_keys = parse_api_keys("admin:k").unwrap();
    assert!(recd::server::check_listen_address(&settings).is_ok());
    settings.api_keys.clear();
    settings.listen = "127.0.0.1:8080".parse().unwrap();
    assert!(recd::server::check_listen_address(&settings).is_ok());
}
