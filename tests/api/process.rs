//! The real binary as a separate process: graceful shutdown on SIGTERM, and
//! `kill -9` in the middle of ingest. In both, every acknowledged event is in
//! the store afterwards, and a client's retries store nothing twice.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use recd::store::{Db as StoreDb, Store, StoreOptions};
use serde_json::{json, Value};

use crate::helpers::{free_port, fresh_database, Db};

/// `recd serve` on the store, on the port, with no scheduled training.
fn recd_serve(database_url: &str, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recd"));
    cmd.arg("serve")
        .env("RECD_LISTEN", format!("127.0.0.1:{port}"))
        .env("RECD_DATABASE_URL", database_url)
        .env("RECD_API_KEYS", "")
        .env("RECD_TRAIN_INTERVAL", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

fn spawn_recd(database_url: &str, port: u16) -> Child {
    recd_serve(database_url, port).spawn().expect("recd starts")
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("recd did not become ready at {base}");
}

/// The JSON answer to a request that must be answered.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn batch(writer: usize, n: usize) -> Vec<Value> {
    (0..50)
        .map(|k| {
            json!({"event_id": format!("w{writer}-b{n}-{k}"), "user_id": format!("u{writer}"),
                   "item_id": format!("i{k}"), "type": "view"})
        })
        .collect()
}

/// Writers post batches until the server goes away; returns the event ids
/// the server acknowledged and every batch that was sent.
async fn ingest_until_gone(base: String, writers: usize) -> (Vec<String>, Vec<Vec<Value>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (base, acked, sent) = (base.clone(), acked.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0..10_000 {
                let events = batch(writer, n);
                sent.lock().unwrap().push(events.clone());
                let reply = client
                    .post(format!("{base}/v1/events"))
                    .json(&json!({"events": events}))
                    .send()
                    .await;
                match reply {
                    Ok(r) if r.status() == 200 => {
                        let ids = events.iter().map(|e| e["event_id"].as_str().unwrap().to_owned());
                        acked.lock().unwrap().extend(ids);
                    }
                    _ => break,
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    (acked, sent)
}

async fn stored_ids(database_url: &str) -> Vec<String> {
    let store = Store::open(database_url, &StoreOptions::default()).await.unwrap();
    let ids = match store.db() {
        StoreDb::Postgres(pool) => sqlx::query_scalar("SELECT event_id FROM events").fetch_all(pool).await,
        StoreDb::Sqlite(sqlite) => {
            sqlx::query_scalar("SELECT event_id FROM events")
                .fetch_all(&sqlite.read)
                .await
        }
    }
    .unwrap();
    store.close().await;
    ids
}

async fn acknowledged_events_survive_sigterm(db: Db) {
    let Some((url, _dir)) = fresh_database(db).await else {
        return;
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_recd(&url, port);
    wait_ready(&reqwest::Client::new(), &base).await;

    let writers = tokio::spawn(ingest_until_gone(base, 4));
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "recd exits 0 on SIGTERM, got {status}");
    let (acked, _) = writers.await.unwrap();
    assert!(!acked.is_empty(), "some batches were acknowledged before SIGTERM");

    let stored: std::collections::HashSet<String> = stored_ids(&url).await.into_iter().collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigterm_sqlite() {
    acknowledged_events_survive_sigterm(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigterm_postgres() {
    acknowledged_events_survive_sigterm(Db::Postgres).await;
}

async fn acknowledged_events_survive_kill_9(db: Db) {
    let Some((url, _dir)) = fresh_database(db).await else {
        return;
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = spawn_recd(&url, port);
    wait_ready(&client, &base).await;

    let writers = tokio::spawn(ingest_until_gone(base.clone(), 4));
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&child, "-KILL");
    let _ = tokio::task::spawn_blocking(move || child.wait()).await.unwrap();
    let (acked, sent) = writers.await.unwrap();
    assert!(!acked.is_empty());

    // Back up; the client retries everything it sent.
    let mut child = spawn_recd(&url, port);
    wait_ready(&client, &base).await;
    let stored: std::collections::HashSet<String> = stored_ids(&url).await.into_iter().collect();
    assert!(
        acked.iter().all(|id| stored.contains(id)),
        "an acknowledged event was lost"
    );

    let mut duplicates = 0;
    for events in &sent {
        let reply = json_of(
            client
                .post(format!("{base}/v1/events"))
                .json(&json!({"events": events})),
        )
        .await;
        duplicates += reply["duplicates"].as_u64().unwrap();
    }
    assert!(
        duplicates as usize >= acked.len(),
        "acknowledged events count as duplicates on retry"
    );
    let ids = stored_ids(&url).await;
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "an event was stored twice");
    assert_eq!(
        ids.len(),
        sent.len() * 50,
        "after the retries every sent event is stored once"
    );
    signal(&child, "-TERM");
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_postgres() {
    acknowledged_events_survive_kill_9(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_sqlite() {
    acknowledged_events_survive_kill_9(Db::Sqlite).await;
}

/// SIGTERM in the middle of a long training: the service stops at once
/// (the training's result is dropped; the next start trains again), and
/// does not wait for the training's time limit. One store: what is tested
/// is the process, not the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_running_training() {
    let Some((url, _dir)) = fresh_database(Db::Sqlite).await else {
        return;
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = recd_serve(&url, port)
        .arg("--demo")
        .env("RECD_TRAIN_INTERVAL", "10m")
        .env("RECD_FIRST_TRAINING_SECONDS", "900")
        .env("RECD_TRAIN__MAX_TRAIN_SECONDS", "900")
        .env("RECD_TRAIN__MAX_EPOCHS", "10000")
        .env("RECD_TRAIN__PATIENCE", "10000")
        .spawn()
        .expect("recd starts");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let mut training = false;
    for _ in 0..600 {
        let model = json_of(client.get(format!("{base}/v1/model"))).await;
        if model["replica"]["training"] == true {
            training = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(training, "the demo's first training started");
    // Well into the training, which would run for 15 minutes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&child, "-TERM");
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("recd was still running 60 s after SIGTERM, waiting for its training");
    };
    assert!(status.success(), "recd exits 0 on SIGTERM, got {status}");
}
