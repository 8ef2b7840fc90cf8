//! The demo's storefront: while `serve --demo` runs, simulated shoppers use
//! the API as a shop's pages would, `demo_traffic` events a minute. Each
//! visit asks for the shopper's recommendations; the shopper often clicks
//! one of them (the event carries the answer's `recommendation_id`, so
//! click-through is counted), else views an item of a category, and
//! sometimes puts it in the cart and buys it. The requests go through the
//! whole HTTP stack in the process (keys, limits, validation), not a socket.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::DemoSize;
use crate::app::App;
use crate::config::Scope;

/// Runs until the app stops (the task is aborted with the server).
pub async fn run(app: App) {
    let per_minute = app.settings.demo_traffic;
    if per_minute == 0 {
        return;
    }
    let keys = &app.settings.api_keys;
    let key_for = |needed: Scope| keys.iter().find(|k| k.scope.allows(needed)).map(|k| k.key.clone());
    let (read_key, write_key) = (key_for(Scope::Read), key_for(Scope::Write));
    if !keys.is_empty() && (read_key.is_none() || write_key.is_none()) {
        tracing::warn!("the demo storefront needs a key that reads and one that writes; it does not run");
        return;
    }
    let storefront = Storefront {
        router: crate::http::router(app.clone()),
        read_key,
        write_key,
        rng: StdRng::from_entropy(),
        size: DemoSize::default(),
        visitors: 0,
    };
    storefront.visit_forever(per_minute).await;
}

struct Storefront {
    router: axum::Router,
    read_key: Option<String>,
    write_key: Option<String>,
    rng: StdRng,
    size: DemoSize,
    visitors: u64,
}

impl Storefront {
    async fn visit_forever(mut self, per_minute: u32) {
        // About two events a visit.
        let mut tick = tokio::time::interval(Duration::from_secs_f64(120.0 / f64::from(per_minute)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.visit().await {
                metrics::counter!("recd_demo_visits_total", "outcome" => "failed").increment(1);
                tracing::debug!(error = %e, "a demo visit failed");
            } else {
                metrics::counter!("recd_demo_visits_total", "outcome" => "done").increment(1);
            }
        }
    }

    /// One shopper's visit: recommendations, then a click or a view, maybe
    /// a cart and a purchase.
    async fn visit(&mut self) -> anyhow::Result<()> {
        let user = if self.rng.gen_bool(0.9) {
            format!("user-{}", self.rng.gen_range(0..self.size.users))
        } else {
            self.visitors += 1;
            format!("visitor-{}", self.visitors)
        };
        let answer = self
            .call(Method::GET, &format!("/v1/users/{user}/recommendations?n=6"), None)
            .await?;
        let shown: Vec<&str> = answer["items"]
            .as_array()
            .map(|items| items.iter().filter_map(|i| i["item_id"].as_str()).collect())
            .unwrap_or_default();
        let mut events = Vec::new();
        let item = if !shown.is_empty() && self.rng.gen_bool(0.4) {
            // Earlier places are clicked more often.
            let place = ((self.rng.gen::<f64>().powi(2)) * shown.len() as f64) as usize;
            let item = shown[place.min(shown.len() - 1)].to_owned();
            events.push(json!({"user_id": user, "item_id": item, "type": "click",
                               "recommendation_id": answer["recommendation_id"]}));
            item
        } else {
            format!("item-{}", self.rng.gen_range(0..self.size.items))
        };
        events.push(json!({"user_id": user, "item_id": item, "type": "view"}));
        if self.rng.gen_bool(0.15) {
            events.push(json!({"user_id": user, "item_id": item, "type": "add_to_cart"}));
            if self.rng.gen_bool(0.5) {
                let price = f64::from(self.rng.gen_range(5u32..200)) - 0.01;
                events.push(json!({"user_id": user, "item_id": item, "type": "purchase", "value": price}));
            }
        }
        let sent = events.len() as u64;
        let stored = self
            .call(Method::POST, "/v1/events", Some(json!({ "events": events })))
            .await?;
        if stored["rejected"].as_array().is_some_and(|r| !r.is_empty()) {
            anyhow::bail!("events refused: {}", stored["rejected"]);
        }
        metrics::counter!("recd_demo_events_total").increment(sent);
        Ok(())
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let key = if method == Method::GET {
            &self.read_key
        } else {
            &self.write_key
        };
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body)?))?,
            None => request.body(Body::empty())?,
        };
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
        if status != StatusCode::OK && status != StatusCode::ACCEPTED {
            anyhow::bail!("{path}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}
