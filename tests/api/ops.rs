//! Health, readiness, metrics, and the errors the layers make.

use serde_json::json;

use crate::helpers::{problem, spawn_app_with, Db, TestApp};

async fn health_ready_and_metrics(app: TestApp) {
    assert_eq!(app.get("/healthz").await.status(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);

    let events = json!({"events": [
        {"event_id": "m1", "user_id": "u", "item_id": "i", "type": "view"},
        {"event_id": "m1", "user_id": "u", "item_id": "i", "type": "view"},
        {"user_id": "u", "type": "view"},
    ]});
    app.post("/v1/events", &events).await;
    app.get("/v1/items/missing").await;

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for needle in [
        r#"recd_http_requests_total{method="POST",route="/v1/events",status="200"}"#,
        r#"recd_http_requests_total{method="GET",route="/v1/items/{item_id}",status="404"}"#,
        r#"recd_http_request_duration_seconds_bucket{method="POST",route="/v1/events",status="200",le="0.005"}"#,
        "recd_events_accepted_total",
        "recd_events_duplicate_total",
        "recd_events_rejected_total",
        "recd_store_pool_connections",
        "recd_store_pool_max",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
}

async fn layer_errors_are_problems(app: TestApp) {
    problem(app.get("/v1/no-such-route").await, 404).await;
    let response = app.client.patch(app.at("/v1/events")).send().await.unwrap();
    problem(response, 405).await;
}

crate::both_stores!(health_ready_and_metrics, layer_errors_are_problems);

/// With no room for another request and the queue full, the API answers
/// 503 at once, with Retry-After; the probes still answer.
#[tokio::test]
async fn overload_is_shed_fast() {
    let Some(app) = spawn_app_with(Db::Sqlite, |s| {
        s.max_concurrent_requests = 0;
        s.max_queued_requests = 0;
    })
    .await
    else {
        return;
    };
    let response = app.get("/v1/items/x").await;
    assert!(response.headers().contains_key("retry-after"));
    let body = problem(response, 503).await;
    assert!(body["detail"].as_str().unwrap().contains("busy"));
    assert_eq!(app.get("/healthz").await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"recd_requests_shed_total{reason="queue_full"}"#),
        "{metrics}"
    );
}
