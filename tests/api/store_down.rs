//! The store goes away and comes back: 503 with Retry-After fast, then
//! recovery without a restart. Postgres is reached through a proxy the test
//! can cut, so the shared server itself stays up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{fresh_database, problem, start, test_settings, Db};

/// A TCP proxy that can refuse and cut connections.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (open2, links2) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links2.lock().unwrap().push(link);
            }
        });
        Proxy { port, open, links }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_503_then_recovers() {
    let Some((url, _)) = fresh_database(Db::Postgres).await else {
        return;
    };
    // postgres://user@host:port/db -> host:port, and the same URL via the proxy.
    let (head, rest) = url.split_once('@').unwrap();
    let (host_port, db) = rest.split_once('/').unwrap();
    let proxy = Proxy::start(host_port.to_owned()).await;
    let proxied = format!("{head}@127.0.0.1:{}/{db}", proxy.port);
    let app = start(test_settings(&proxied), None).await;

    let event = |id: &str| json!({"events": [{"event_id": id, "user_id": "u", "item_id": "i", "type": "view"}]});
    assert_eq!(app.post("/v1/events", &event("before")).await.status(), 200);

    proxy.cut();
    let started = Instant::now();
    let response = app.post("/v1/events", &event("during")).await;
    let waited = started.elapsed();
    assert!(response.headers().contains_key("retry-after"));
    problem(response, 503).await;
    // The pool gives up after its acquire timeout (1.5 s), not after 30 s.
    assert!(waited < Duration::from_secs(5), "503 took {waited:?}");
    problem(app.get("/readyz").await, 503).await;
    assert_eq!(app.get("/healthz").await.status(), 200, "the process is alive");

    proxy.restore();
    let mut recovered = false;
    for _ in 0..50 {
        if app.post("/v1/events", &event("after")).await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "recd did not recover when the store came back");
    assert_eq!(app.get("/readyz").await.status(), 200);
    // "during" was answered 503, so it was not acknowledged; it is not stored.
    let reply: Value = app.post("/v1/events", &event("during")).await.json().await.unwrap();
    assert_eq!(reply["accepted"], 1);
    assert_eq!(app.store.count_events().await.unwrap(), 3);
    app.stop().await;
}
