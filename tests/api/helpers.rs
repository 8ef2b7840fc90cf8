//! Starting recd for a test: on a fresh SQLite file or a fresh Postgres
//! database, on a free loopback port, through the real HTTP stack.
//!
//! Postgres: `RECD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) names a server where each test
//! creates its own database. When it cannot be reached the Postgres tests
//! print SKIPPED and pass, unless `RECD_REQUIRE_POSTGRES=1` (set by .ci/run)
//! demands it: then they fail.

use std::time::Duration;

use recd::app::App;
use recd::config::Settings;
use recd::store::Store;
use serde_json::Value;
use sqlx::Connection;
use tokio::sync::{oneshot, OnceCell};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub url: String,
    pub database_url: String,
    pub client: reqwest::Client,
    pub store: Store,
    /// The app the server serves (the same one, not a copy): tests drive
    /// its background steps instead of sleeping.
    pub app: App,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.at(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.at(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.at(path)).send().await.expect("request sent")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.at(path)).send().await.expect("request sent")
    }

    /// Brings the figures the app makes in the background (shop
    /// statistics, popular lists) up to the events stored so far.
    pub async fn refresh_figures(&self) {
        self.app.refresh_figures().await.expect("figures refreshed");
    }

    /// Stops the server and hands over its SQLite folder (if any), so that
    /// another server can start on the same store.
    pub async fn stop_keeping_files(mut self) -> Option<tempfile::TempDir> {
        let dir = self._dir.take();
        self.stop().await;
        dir
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

fn postgres_admin_url() -> String {
    std::env::var("RECD_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn postgres_required() -> bool {
    std::env::var("RECD_REQUIRE_POSTGRES").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether the Postgres server answers; drops the databases earlier runs left.
async fn postgres_available() -> Result<(), String> {
    static READY: OnceCell<Result<(), String>> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let url = postgres_admin_url();
            let mut conn = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url))
                .await
                .map_err(|_| format!("no answer from {url} within 5 s"))?
                .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            let idle: Vec<String> = sqlx::query_scalar(
                "SELECT datname FROM pg_database WHERE datname LIKE 'recd_test_%' AND datname NOT IN
                   (SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)",
            )
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            // Only those over an hour old: another suite running beside this
            // one may have a database with no connection for a moment.
            let now = chrono::Utc::now().timestamp();
            let stale = idle.into_iter().filter(|name| {
                let created = name
                    .strip_prefix("recd_test_")
                    .and_then(|rest| rest.split('_').next()?.parse::<i64>().ok());
                created.is_none_or(|at| now - at > 3600)
            });
            for name in stale {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                    .execute(&mut conn)
                    .await;
            }
            Ok(())
        })
        .await
        .clone()
}

/// A URL for a new, empty store; `None` when Postgres is asked for but
/// cannot be reached and is not required.
pub async fn fresh_database(db: Db) -> Option<(String, Option<tempfile::TempDir>)> {
    match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("recd.db").display());
            Some((url, Some(dir)))
        }
        Db::Postgres => {
            if let Err(why) = postgres_available().await {
                if postgres_required() {
                    panic!("Postgres is required (RECD_REQUIRE_POSTGRES) but unreachable: {why}");
                }
                eprintln!("SKIPPED: Postgres test, {why} (set RECD_TEST_POSTGRES_URL)");
                return None;
            }
            // Named with its time of creation (see `postgres_available`).
            let name = format!(
                "recd_test_{}_{}",
                chrono::Utc::now().timestamp(),
                uuid::Uuid::new_v4().simple()
            );
            let admin = postgres_admin_url();
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
            // recd creates the database itself: that is part of what is tested.
            Some((format!("{base}/{name}"), None))
        }
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

pub fn test_settings(database_url: &str) -> Settings {
    let mut settings = Settings::with_database(database_url).expect("default settings");
    settings.listen = "127.0.0.1:0".parse().expect("address");
    settings.train_interval = None;
    settings
}

pub async fn spawn_app(db: Db) -> Option<TestApp> {
    spawn_app_with(db, |_| {}).await
}

/// Starts recd in this process with settings the test may adjust.
pub async fn spawn_app_with(db: Db, adjust: impl FnOnce(&mut Settings)) -> Option<TestApp> {
    let (database_url, dir) = fresh_database(db).await?;
    let mut settings = test_settings(&database_url);
    adjust(&mut settings);
    Some(start(settings, dir).await)
}

pub async fn start(settings: Settings, dir: Option<tempfile::TempDir>) -> TestApp {
    let store = recd::server::open_store_waiting(&settings).await.expect("store opens");
    let database_url = settings.database_url.expose().to_owned();
    let listener = tokio::net::TcpListener::bind(settings.listen).await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let app = App::open(store.clone(), settings).await.expect("app opens");
    let served = app.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        recd::server::serve(listener, served, shutdown)
            .await
            .expect("server runs");
    });
    TestApp {
        url,
        database_url,
        client: reqwest::Client::new(),
        store,
        app,
        stop: Some(stop),
        server: Some(server),
        _dir: dir,
    }
}

/// Checks a problem+json reply and returns its body.
pub async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());
    body
}

/// Runs each named test function on SQLite and on Postgres (`with f;`
/// first: with settings adjusted by `f`).
#[macro_export]
macro_rules! both_stores {
    (with $adjust:path; $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::spawn_app_with($crate::helpers::Db::Sqlite, $adjust).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::spawn_app_with($crate::helpers::Db::Postgres, $adjust).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::spawn_app($crate::helpers::Db::Sqlite).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::spawn_app($crate::helpers::Db::Postgres).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
    };
}
