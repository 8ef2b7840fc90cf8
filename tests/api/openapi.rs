//! The OpenAPI document at /openapi.json and the reference page at /docs.

use std::collections::BTreeSet;

use recd::config::{parse_api_keys, Settings};
use reqwest::Method;
use serde_json::Value;

use crate::helpers::TestApp;

/// Every route recd serves. A route added to the router must be added here,
/// and the document must list exactly these.
const ROUTES: [(&str, &str); 30] = [
    ("POST", "/v1/events"),
    ("POST", "/v1/items"),
    ("GET", "/v1/items"),
    ("GET", "/v1/items/{item_id}"),
    ("PUT", "/v1/items/{item_id}"),
    ("DELETE", "/v1/items/{item_id}"),
    ("GET", "/v1/items/{item_id}/similar"),
    ("GET", "/v1/items/{item_id}/stats"),
    ("GET", "/v1/popular"),
    ("GET", "/v1/users/{user_id}/recommendations"),
    ("GET", "/v1/users/{user_id}/profile"),
    ("GET", "/v1/users/{user_id}/events"),
    ("DELETE", "/v1/users/{user_id}"),
    ("GET", "/v1/segments"),
    ("GET", "/v1/segments/{name}/users"),
    ("GET", "/v1/segments/{name}/users.csv"),
    ("GET", "/v1/model"),
    ("GET", "/v1/model/embeddings"),
    ("POST", "/v1/model/train"),
    ("GET", "/v1/stats/events"),
    ("GET", "/v1/stats/recommendations"),
    ("GET", "/v1/stats/overview"),
    ("GET", "/v1/replicas"),
    ("GET", "/v1/key"),
    ("GET", "/v1/items/{item_id}/activity"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
];

const ADMIN_KEY: &str = "admin-key";

pub fn with_keys(settings: &mut Settings) {
    settings.api_keys = parse_api_keys(&format!("read:read-key,admin:{ADMIN_KEY}")).unwrap();
}

fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&method.as_str()) {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    found
}

/// The document lists every route and no other, and every route it lists
/// is served (a route the router lacks answers 404 `no such resource`, or
/// 405 for another method on a known path).
async fn every_route_is_documented_and_served(app: TestApp) {
    // No key needed for the document.
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(
        operations(&document),
        listed,
        "the document and the list of routes differ"
    );

    for (method, path) in ROUTES {
        // `from=nowhere` keeps a training from starting: the route answers 422.
        let url = path
            .replace("{item_id}", "no-such-item")
            .replace("{user_id}", "no-such-user")
            .replace("{name}", "no-such-segment")
            + if path == "/v1/model/train" { "?from=nowhere" } else { "" };
        let response = app
            .client
            .request(Method::from_bytes(method.as_bytes()).unwrap(), app.at(&url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert_ne!(status, 405, "{method} {path} is not served");
        if status == 404 {
            let body: Value = response.json().await.unwrap();
            assert_ne!(body["detail"], "no such resource", "{method} {path} is not served");
        }
    }
}

/// Scopes, problem answers and parameters come with every operation.
async fn operations_name_scopes_and_problems(app: TestApp) {
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    let scheme = &document["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    let paths = &document["paths"];
    for (method, path, scope) in [
        ("get", "/v1/items/{item_id}", "read"),
        ("put", "/v1/items/{item_id}", "write"),
        ("post", "/v1/events", "write"),
        ("delete", "/v1/users/{user_id}", "admin"),
        ("post", "/v1/model/train", "admin"),
        ("get", "/v1/model", "read"),
        ("get", "/v1/items/{item_id}/stats", "read"),
        ("get", "/v1/segments", "read"),
        ("get", "/v1/segments/{name}/users", "admin"),
        ("get", "/v1/segments/{name}/users.csv", "admin"),
        ("get", "/v1/stats/events", "read"),
        ("get", "/v1/replicas", "read"),
        ("get", "/v1/items/{item_id}/activity", "read"),
    ] {
        let operation = &paths[path][method];
        assert_eq!(operation["security"][0]["api_key"][0], scope, "{method} {path}");
        for status in ["401", "403", "500", "503"] {
            assert!(
                operation["responses"][status].is_object(),
                "{method} {path} lacks {status}"
            );
        }
    }
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"] {
        let operation = &paths[path]["get"];
        assert!(operation.get("security").is_none(), "{path} needs no key");
        assert!(operation["responses"]["401"].is_null(), "{path} answers no 401");
    }
    let not_found = &paths["/v1/items/{item_id}"]["get"]["responses"]["404"];
    assert!(not_found["content"]["application/problem+json"]["schema"]["$ref"]
        .as_str()
        .unwrap()
        .ends_with("/Problem"));
    let events = &paths["/v1/events"]["post"];
    assert!(events["requestBody"]["content"]["application/json"].is_object());
    assert!(events["responses"]["413"].is_object());
    let parameters = paths["/v1/users/{user_id}/recommendations"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = parameters.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "user_id",
            "n",
            "category",
            "exclude",
            "exclude_items",
            "explain",
            "fields"
        ]
    );
    for path in ["/v1/items/{item_id}/similar", "/v1/popular"] {
        let parameters = paths[path]["get"]["parameters"].as_array().unwrap();
        assert!(
            parameters.iter().any(|p| p["name"] == "fields"),
            "{path} documents fields"
        );
    }
    let problem = &document["components"]["schemas"]["Problem"];
    for field in ["type", "title", "status", "detail"] {
        assert!(
            problem["required"].as_array().unwrap().contains(&field.into()),
            "{field}"
        );
    }
}

/// The reference page needs no key, carries its script, and may load
/// nothing from another host.
async fn docs_page_works_offline(app: TestApp) {
    let response = app.get("/docs").await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
    ] {
        assert!(policy.contains(directive), "{policy} lacks {directive}");
    }
    let page = response.text().await.unwrap();
    assert!(page.contains(r#"Redoc.init("openapi.json""#));
    assert!(page.len() > 1_000_000, "the Redoc bundle is in the page");
    for outside in ["<link", "<script src", "@import", "fonts.googleapis"] {
        assert!(!page.contains(outside), "the page refers to {outside:?}");
    }
}

crate::both_stores!(with crate::openapi::with_keys;
    every_route_is_documented_and_served,
    operations_name_scopes_and_problems,
    docs_page_works_offline,
);
