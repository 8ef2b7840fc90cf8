//! Two `recd serve` processes on one Postgres: exactly one trains, both
//! serve what it publishes, and when the trainer is killed the other takes
//! over.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recd::store::{Store, StoreOptions};
use serde_json::{json, Value};

use crate::helpers::{free_port, fresh_database, Db};

/// A replica that trains small models often.
fn spawn_replica(database_url: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_recd"))
        .arg("serve")
        .env("RECD_LISTEN", format!("127.0.0.1:{port}"))
        .env("RECD_DATABASE_URL", database_url)
        .env("RECD_API_KEYS", "")
        .env("RECD_TRAIN_INTERVAL", "1s")
        .env("RECD_TRAIN_MIN_NEW_EVENTS", "1")
        .env("RECD_SNAPSHOT_POLL", "300ms")
        .env("RECD_GATE_MARGIN", "-1")
        .env("RECD_TRAIN__DIM", "16")
        .env("RECD_TRAIN__HIDDEN", "16")
        .env("RECD_TRAIN__MAX_EPOCHS", "3")
        .env("RECD_TRAIN__VALIDATION_CASES", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("recd starts")
}

async fn get(client: &reqwest::Client, url: String) -> Option<Value> {
    let reply = client.get(url).send().await.ok()?;
    if reply.status() != 200 {
        return None;
    }
    reply.json().await.ok()
}

/// Polls until `check` holds for the value at `url`, for at most `limit`.
async fn wait_for(client: &reqwest::Client, url: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < limit {
        if let Some(body) = get(client, url.to_owned()).await {
            if check(&body) {
                return body;
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} did not get there within {limit:?}; last: {last}");
}

struct Replica {
    child: Child,
    base: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_trains_both_serve_and_the_other_takes_over() {
    let Some((url, _)) = fresh_database(Db::Postgres).await else {
        return;
    };
    let store = Store::open(&url, &StoreOptions::default()).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() - 60_000;
    let shop = recd::demo::generate(
        recd::demo::DemoSize {
            items: 60,
            users: 150,
            sessions: 2,
            seed: 5,
        },
        now,
    );
    store.put_items(&shop.items, now).await.unwrap();
    store.insert_events(&shop.events, now).await.unwrap();

    let client = reqwest::Client::new();
    let mut replicas: Vec<Replica> = (0..2)
        .map(|_| {
            let port = free_port();
            Replica {
                child: spawn_replica(&url, port),
                base: format!("http://127.0.0.1:{port}"),
            }
        })
        .collect();
    // Both serve the first model, which one of them trained.
    let mut version = String::new();
    for replica in &replicas {
        let body = wait_for(
            &client,
            &format!("{}/v1/model", replica.base),
            Duration::from_secs(120),
            |b| b["version"].is_string(),
        )
        .await;
        let v = body["version"].as_str().unwrap().to_owned();
        assert!(version.is_empty() || version == v, "{version} and {v}");
        version = v;
    }
    let mut trainers = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        let body = get(&client, format!("{}/v1/model", replica.base)).await.unwrap();
        if body["replica"]["trainer"] == true {
            trainers.push((i, body["replica"]["id"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(trainers.len(), 1, "exactly one replica leads: {trainers:?}");
    let (leader, leader_id) = trainers.pop().unwrap();
    let runs = store.trainings(100).await.unwrap();
    assert!(!runs.is_empty());
    assert!(
        runs.iter().all(|r| r.replica.as_deref() == Some(leader_id.as_str())),
        "{runs:?}"
    );

    // An event stored through one replica shows in the other's next answers.
    let (a, b) = (&replicas[0].base, &replicas[1].base);
    let recs = |base: &str| format!("{base}/v1/users/user-1/recommendations?n=5");
    let before = get(&client, recs(b)).await.unwrap();
    assert_eq!(before["strategy"], "personalized", "{before}");
    let shown = before["items"][0]["item_id"].as_str().unwrap().to_owned();
    let event = json!({"events": [{"user_id": "user-1", "item_id": shown, "type": "view"}]});
    let reply = client.post(format!("{a}/v1/events")).json(&event).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let posted = Instant::now();
    let after = wait_for(&client, &recs(b), Duration::from_secs(5), |body| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["item_id"] != shown.as_str())
    })
    .await;
    eprintln!(
        "the other replica answered with the new event after {:?}",
        posted.elapsed()
    );
    assert_eq!(after["model_version"], version.as_str());

    // Kill the trainer; new events arrive; the other takes over and trains.
    let dead = replicas.remove(leader);
    Command::new("kill")
        .args(["-9", &dead.child.id().to_string()])
        .status()
        .unwrap();
    drop(dead);
    let survivor = &replicas[0];
    let events: Vec<Value> = (0..5)
        .map(|k| json!({"user_id": format!("late-{k}"), "item_id": "item-3", "type": "view"}))
        .collect();
    let reply = client
        .post(format!("{}/v1/events", survivor.base))
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let body = wait_for(
        &client,
        &format!("{}/v1/model", survivor.base),
        Duration::from_secs(120),
        |b| b["replica"]["trainer"] == true && b["version"].is_string() && b["version"] != version.as_str(),
    )
    .await;
    let survivor_id = body["replica"]["id"].as_str().unwrap();
    assert_ne!(survivor_id, leader_id);
    assert_eq!(body["last_training"]["replica"], survivor_id, "{body}");
    assert_eq!(body["last_training"]["outcome"], "published", "{body}");
    // A run the killed replica left behind is closed, not `running` forever.
    let runs = store.trainings(100).await.unwrap();
    assert!(
        runs.iter().all(|r| r.outcome != recd::domain::TrainingOutcome::Running),
        "{runs:?}"
    );
    store.close().await;
}
