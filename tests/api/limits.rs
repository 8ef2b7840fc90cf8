//! A server that holds under abuse: slow clients, answers before the body,
//! the admission queue, rate limits, CORS, and many writers at once.

use std::time::{Duration, Instant};

use recd::config::{parse_api_keys, Settings};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{problem, TestApp};

fn address(app: &TestApp) -> String {
    app.url.trim_start_matches("http://").to_owned()
}

/// Reads from `stream` until the server closes it (or `within` passes:
/// then `None`). What was read comes back.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

fn slow_clients(s: &mut Settings) {
    s.header_read_timeout = Duration::from_millis(800);
    s.body_read_timeout = Duration::from_millis(500);
}

/// A connection that sends nothing, and one that trickles its head a line
/// at a time, are both closed once the header read timeout passes; a
/// prompt request on another connection is served meanwhile.
async fn slow_heads_are_cut_off(app: TestApp) {
    let started = Instant::now();
    let mut idle = TcpStream::connect(address(&app)).await.unwrap();
    let mut trickling = TcpStream::connect(address(&app)).await.unwrap();
    let trickle = tokio::spawn(async move {
        trickling.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        for n in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickling
                .write_all(format!("x-slow-{n}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        read_until_closed(&mut trickling, Duration::from_secs(1)).await
    });
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(5)).await.is_some(),
        "the idle connection is still open after 5 s"
    );
    let idle_closed = started.elapsed();
    assert!(
        idle_closed >= Duration::from_millis(700),
        "closed after {idle_closed:?}"
    );
    let trickled = trickle.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    // Closed before the 40 header lines (4 s) were sent.
    assert!(trickled.is_some(), "the trickling connection was not closed");
}

/// A body that stalls is answered 408 (problem+json) within the body read
/// timeout; the server does not wait for the request timeout.
async fn stalled_body_is_408(app: TestApp) {
    let mut stream = TcpStream::connect(address(&app)).await.unwrap();
    let head =
        "POST /v1/events HTTP/1.1\r\nhost: recd\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(br#"{"events": ["#).await.unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("urn:recd:problem:body-timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // Nothing was stored, and the server still serves.
    assert_eq!(app.store.count_events().await.unwrap(), 0);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

mod slow {
    use super::*;
    crate::both_stores!(with crate::limits::slow_clients; slow_heads_are_cut_off, stalled_body_is_408);
}

fn keys(s: &mut Settings) {
    s.api_keys = parse_api_keys("read:r-key,write:w-key").unwrap();
}

/// A big batch, as a collector would send it.
fn batch(user: &str, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"event_id": format!("{user}-{i}"), "user_id": user, "item_id": format!("i{}", i % 50), "type": "view"}))
        .collect();
    json!({ "events": events })
}

/// Answers made before the body is read (401 without a key, 413 past the
/// size limit) reach the client every time, although it is still sending.
async fn early_answers_reach_the_client(app: TestApp) {
    let body = serde_json::to_vec(&batch("u", 9000)).unwrap();
    assert!(body.len() > 512 * 1024 && body.len() < 1024 * 1024, "{}", body.len());
    let mut too_large = body.clone();
    while too_large.len() <= 3 * 1024 * 1024 {
        too_large.extend_from_slice(&body);
    }
    for _ in 0..15 {
        // Fresh connections: each answer ends its connection.
        let client = reqwest::Client::new();
        let response = client
            .post(app.at("/v1/events"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("the 401 reached the client");
        problem(response, 401).await;
        let response = client
            .post(app.at("/v1/events"))
            .bearer_auth("w-key")
            .header("content-type", "application/json")
            .body(too_large.clone())
            .send()
            .await
            .expect("the 413 reached the client");
        problem(response, 413).await;
    }
    // Nothing was stored; a batch with the key is.
    assert_eq!(app.store.count_events().await.unwrap(), 0);
    let response = app
        .client
        .post(app.at("/v1/events"))
        .bearer_auth("w-key")
        .json(&batch("u", 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(app.store.count_events().await.unwrap(), 1000);
}

mod early {
    use super::*;
    crate::both_stores!(with crate::limits::keys; early_answers_reach_the_client);
}

/// Sends a POST whose body stalls: it holds its turn until the body read
/// timeout answers it 408.
async fn hold_a_turn(app: &TestApp) -> TcpStream {
    let mut stream = TcpStream::connect(address(app)).await.unwrap();
    let head =
        "POST /v1/events HTTP/1.1\r\nhost: recd\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

fn one_turn_long_queue(s: &mut Settings) {
    s.max_concurrent_requests = 1;
    s.queue_timeout = Duration::from_secs(5);
    s.body_read_timeout = Duration::from_millis(800);
}

/// Beyond the requests in flight, a request waits in the queue for its
/// turn and is then served, instead of being refused at once.
async fn a_request_beyond_capacity_waits_its_turn(app: TestApp) {
    let _holder = hold_a_turn(&app).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let response = app.get("/v1/items/missing").await;
    let waited = started.elapsed();
    problem(response, 404).await;
    assert!(
        waited >= Duration::from_millis(400),
        "served after {waited:?}: it did not wait"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("recd_requests_queue_wait_seconds"), "{metrics}");
}

fn one_turn_short_queue(s: &mut Settings) {
    s.max_concurrent_requests = 1;
    s.queue_timeout = Duration::from_millis(150);
    s.body_read_timeout = Duration::from_secs(3);
}

/// A request that waits past the queue timeout is answered 503 with
/// Retry-After, no sooner; the probes stay outside the queue.
async fn a_request_that_waits_too_long_is_503(app: TestApp) {
    let _holder = hold_a_turn(&app).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let response = app.get("/v1/items/missing").await;
    let waited = started.elapsed();
    assert!(response.headers().contains_key("retry-after"));
    let body = problem(response, 503).await;
    assert!(body["detail"].as_str().unwrap().contains("busy"), "{body}");
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_secs(2),
        "answered after {waited:?}"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"recd_requests_shed_total{reason="queue_timeout"}"#),
        "{metrics}"
    );
}

mod long_queue {
    use super::*;
    crate::both_stores!(with crate::limits::one_turn_long_queue; a_request_beyond_capacity_waits_its_turn);
}

mod short_queue {
    use super::*;
    crate::both_stores!(with crate::limits::one_turn_short_queue; a_request_that_waits_too_long_is_503);
}

fn read_limit(s: &mut Settings) {
    keys(s);
    s.rate_limit.read = 1.0;
    s.rate_limit.read_burst = 3;
}

/// Each API key has its own bucket: past its burst a key gets 429 with
/// Retry-After and RateLimit headers, while another key and the unlimited
/// scopes go on.
async fn rate_limit_per_key(app: TestApp) {
    let get = |key: &'static str| app.client.get(app.at("/v1/popular")).bearer_auth(key).send();
    for remaining in [2, 1, 0] {
        let response = get("r-key").await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(
            response.headers()["ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }
    let response = get("r-key").await.unwrap();
    let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry after {retry}");
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    let body = problem(response, 429).await;
    assert_eq!(body["type"], "urn:recd:problem:rate-limited");
    // The write scope has no limit here; an admin key has a bucket of its own.
    let post = app
        .client
        .post(app.at("/v1/events"))
        .bearer_auth("w-key")
        .json(&batch("u", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    assert!(!post.headers().contains_key("ratelimit-limit"));
    // A second later a token is back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get("r-key").await.unwrap().status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"recd_rate_limited_total{scope="read"}"#),
        "{metrics}"
    );
}

mod per_key {
    use super::*;
    crate::both_stores!(with crate::limits::read_limit; rate_limit_per_key);
}

fn address_limit(s: &mut Settings) {
    s.rate_limit.read = 0.5;
    s.rate_limit.read_burst = 2;
}

fn address_limit_behind_proxy(s: &mut Settings) {
    address_limit(s);
    s.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
}

async fn from(app: &TestApp, forwarded_for: &str) -> u16 {
    app.client
        .get(app.at("/v1/popular"))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Without API keys the bucket is the client's address, and a client
/// cannot escape it by sending X-Forwarded-For: the header is not believed
/// unless the peer is a trusted proxy.
async fn rate_limit_by_address_ignores_forwarded_for(app: TestApp) {
    assert_eq!(from(&app, "10.0.0.1").await, 200);
    assert_eq!(from(&app, "10.0.0.2").await, 200);
    assert_eq!(from(&app, "10.0.0.3").await, 429);
}

/// Behind a trusted proxy each forwarded client has its own bucket.
async fn rate_limit_behind_a_trusted_proxy(app: TestApp) {
    for client in ["10.0.0.1", "10.0.0.2", "192.168.1.1, 10.0.0.3"] {
        assert_eq!(from(&app, client).await, 200, "{client}");
        assert_eq!(from(&app, client).await, 200, "{client}");
        assert_eq!(from(&app, client).await, 429, "{client}");
    }
}

mod by_address {
    use super::*;
    crate::both_stores!(with crate::limits::address_limit; rate_limit_by_address_ignores_forwarded_for);
}

mod behind_proxy {
    use super::*;
    crate::both_stores!(with crate::limits::address_limit_behind_proxy; rate_limit_behind_a_trusted_proxy);
}

fn cors(s: &mut Settings) {
    keys(s);
    s.cors_origins = vec!["https://shop.example".to_owned()];
}

/// A storefront page on an allowed origin may call the read endpoints with
/// its key (the preflight needs none); other origins get no CORS headers.
async fn cors_for_allowed_origins(app: TestApp) {
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.at("/v1/popular"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");

    let get = |origin: &'static str| {
        app.client
            .get(app.at("/v1/popular"))
            .bearer_auth("r-key")
            .header("origin", origin)
            .send()
    };
    let response = get("https://shop.example").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let response = get("https://evil.example").await.unwrap();
    assert!(!response.headers().contains_key("access-control-allow-origin"));
}

/// By default no origin is allowed: no CORS headers at all.
async fn no_cors_by_default(app: TestApp) {
    let response = app
        .client
        .get(app.at("/v1/popular"))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("access-control-allow-origin"));
}

mod cors_on {
    use super::*;
    crate::both_stores!(with crate::limits::cors; cors_for_allowed_origins);
}

mod cors_off {
    use super::*;
    crate::both_stores!(no_cors_by_default);
}

/// Sixteen collectors posting 1,000-event batches at once are all answered
/// 200 (on SQLite their writes queue for the one writer) and every event
/// is stored.
async fn concurrent_collectors_are_all_served(app: TestApp) {
    let mut collectors = Vec::new();
    for c in 0..16 {
        let client = app.client.clone();
        let url = app.at("/v1/events");
        collectors.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..3 {
                let response = client
                    .post(&url)
                    .json(&batch(&format!("c{c}-r{round}"), 1000))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }));
    }
    for collector in collectors {
        assert_eq!(collector.await.unwrap(), vec![200, 200, 200]);
    }
    assert_eq!(app.store.count_events().await.unwrap(), 48_000);
}

mod collectors {
    use super::*;
    crate::both_stores!(concurrent_collectors_are_all_served);
}
