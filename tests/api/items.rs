//! The catalogue: PUT replaces, POST upserts, DELETE hides for good until PUT.

use serde_json::{json, Value};

use crate::helpers::{problem, TestApp};

async fn put_get_replace_delete(app: TestApp) {
    let shoe = json!({"title": "Trail shoe", "categories": ["shoes", "outdoor"], "price": 89.5,
                      "attributes": {"brand": "Acme", "sizes": [40, 41]}});
    let response = app.put("/v1/items/shoe-1", &shoe).await;
    assert_eq!(response.status(), 200);
    let stored: Value = response.json().await.unwrap();
    assert_eq!(stored["item_id"], "shoe-1");
    assert_eq!(stored["available"], true, "available defaults to true");

    let mut read: Value = app.get("/v1/items/shoe-1").await.json().await.unwrap();
    // A read adds the categories behaviour suggests: none for an item
    // with categories.
    assert_eq!(read["suggested_categories"], json!([]));
    read.as_object_mut().unwrap().remove("suggested_categories");
    assert_eq!(read, stored);
    assert_eq!(read["attributes"]["sizes"], json!([40, 41]));

    // PUT replaces: absent fields take their defaults.
    app.put("/v1/items/shoe-1", &json!({"available": false})).await;
    let read: Value = app.get("/v1/items/shoe-1").await.json().await.unwrap();
    assert_eq!(read["title"], Value::Null);
    assert_eq!(read["categories"], json!([]));
    assert_eq!(read["available"], false);

    assert_eq!(app.delete("/v1/items/shoe-1").await.status(), 204);
    problem(app.get("/v1/items/shoe-1").await, 404).await;
    problem(app.delete("/v1/items/shoe-1").await, 404).await;

    // Events naming a deleted item do not bring it back; a PUT does.
    let event = json!({"events": [{"user_id": "u", "item_id": "shoe-1", "type": "view"}]});
    app.post("/v1/events", &event).await;
    problem(app.get("/v1/items/shoe-1").await, 404).await;
    assert_eq!(
        app.put("/v1/items/shoe-1", &json!({"title": "Back"})).await.status(),
        200
    );
    assert_eq!(app.get("/v1/items/shoe-1").await.status(), 200);
}

async fn unknown_items_are_404(app: TestApp) {
    let body = problem(app.get("/v1/items/nothing-here").await, 404).await;
    assert!(body["detail"].as_str().unwrap().contains("nothing-here"));
}

async fn invalid_fields_are_422_by_name(app: TestApp) {
    let body = problem(app.put("/v1/items/x", &json!({"price": "cheap"})).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "price");
    let body = problem(app.put("/v1/items/x", &json!({"categories": "shoes"})).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "categories");
    let body = problem(
        app.put("/v1/items/x", &json!({"available": "yes", "colour": "red"}))
            .await,
        422,
    )
    .await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["colour", "available"]);
    let long_id = "y".repeat(129);
    let body = problem(app.put(&format!("/v1/items/{long_id}"), &json!({})).await, 422).await;
    assert_eq!(body["errors"][0]["field"], "item_id");
    problem(app.get("/v1/items/x").await, 404).await;
}

async fn bulk_upsert(app: TestApp) {
    let items = json!({"items": [
        {"item_id": "a", "title": "A", "categories": ["c1"]},
        {"item_id": "b", "price": 3},
    ]});
    let response = app.post("/v1/items", &items).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["items"].as_array().unwrap().len(), 2);
    let b: Value = app.get("/v1/items/b").await.json().await.unwrap();
    assert_eq!(b["price"], 3.0);

    let bad = json!({"items": [{"item_id": "c"}, {"title": "no id"}, {"item_id": "d", "price": -1}]});
    let body = problem(app.post("/v1/items", &bad).await, 422).await;
    let named: Vec<(u64, &str)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    assert_eq!(named, [(1, "item_id"), (2, "price")]);
    problem(app.get("/v1/items/c").await, 404).await;
    problem(app.post("/v1/items", &json!({"items": []})).await, 422).await;
}

crate::both_stores!(
    put_get_replace_delete,
    unknown_items_are_404,
    invalid_fields_are_422_by_name,
    bulk_upsert
);
