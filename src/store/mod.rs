//! The only code that speaks SQL. One `Store` enum over a Postgres or an
//! SQLite pool, chosen by the URL; the statements are written once where the
//! two dialects agree (both accept `$n` placeholders and `ON CONFLICT`) and
//! apart where they do not (Postgres writes batches set-based with UNNEST).

use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, PgPool, Row, SqlitePool};

use crate::domain::{Item, NewEvent};

/// How recd's sessions are named on PostgreSQL (`pg_stat_activity`).
pub const APPLICATION_NAME: &str = "recd";

static PG_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Runs the same expression on whichever pool the store holds (on SQLite,
/// the readers' pool). The body is compiled once per database, so the SQL
/// in it must suit both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            Db::Postgres($pool) => $body,
            Db::Sqlite(sqlite) => {
                let $pool = &sqlite.read;
                $body
            }
        }
    };
}

/// As `on_pool!`, for statements that write: on SQLite they go through the
/// one writer connection.
macro_rules! on_writer {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            Db::Postgres($pool) => $body,
            Db::Sqlite(sqlite) => {
                let $pool = &sqlite.write;
                $body
            }
        }
    };
}

/// The CTEs that cut each user's events into sessions and measure the gaps
/// between them, the rules of `crate::profile::sessions`: `sessionless`,
/// `numbered`, `sessions` (`user_id`, `start_ts`, `end_ts`), `raw_gaps`,
/// `gaps` (`user_id`, the session's `start_ts` and `end_ts`, the `gap`
/// before it) and `ranked_gaps` (`user_id`, `gap`, its `pos` in the user's
/// gaps and their `cnt`), each followed by a comma. `$events` is the table
/// or CTE read, `$filter` an ` AND ...` on it (or empty), `$gap` the
/// parameter that holds the session gap in ms.
macro_rules! session_gaps_sql {
    ($events:literal, $filter:literal, $gap:literal) => {
        concat!(
            "sessionless AS (
    SELECT user_id, ts, seq, ts - LAG(ts) OVER (PARTITION BY user_id ORDER BY ts, seq) AS since_prev
    FROM ",
            $events,
            " WHERE session_id IS NULL",
            $filter,
            "
),
numbered AS (
    SELECT user_id, ts,
           SUM(CASE WHEN since_prev IS NULL OR since_prev > ",
            $gap,
            " THEN 1 ELSE 0 END)
               OVER (PARTITION BY user_id ORDER BY ts, seq ROWS UNBOUNDED PRECEDING) AS session_no
    FROM sessionless
),
sessions AS (
    SELECT user_id, MIN(ts) AS start_ts, MAX(ts) AS end_ts FROM ",
            $events,
            "
    WHERE session_id IS NOT NULL",
            $filter,
            " GROUP BY user_id, session_id
    UNION ALL
    SELECT user_id, MIN(ts), MAX(ts) FROM numbered GROUP BY user_id, session_no
),
raw_gaps AS (
    SELECT user_id, start_ts, end_ts,
           start_ts - MAX(end_ts) OVER (PARTITION BY user_id ORDER BY start_ts, end_ts
                                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS gap
    FROM sessions
),
gaps AS (
    SELECT user_id, start_ts, end_ts, CAST(CASE WHEN gap < 0 THEN 0 ELSE gap END AS DOUBLE PRECISION) AS gap
    FROM raw_gaps WHERE gap IS NOT NULL
),
ranked_gaps AS (
    SELECT user_id, gap,
           ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY gap) AS pos,
           COUNT(*) OVER (PARTITION BY user_id) AS cnt
    FROM gaps
),
"
        )
    };
}

mod browse;
mod coordination;
mod events;
mod ids;
mod keying;
mod profile;
mod ratings;
mod segments;
mod serving;
mod stats;
pub use browse::ItemSearch;
pub use coordination::{Locks, Notice, Notices};
use coordination::{ERASURE_CHANNEL, SNAPSHOT_CHANNEL};
pub use events::Retention;
pub use ids::{optional_id_key, IdKey, IdKind, Ids, Undecryptable};
pub use keying::Rotation;
pub use segments::{SegmentMember, SegmentRow};
pub use serving::ITEM_SEPARATOR;
pub use stats::{floor_to, Heartbeat, StoreCounts, DAY_MS, MINUTE_MS};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or has no connection free in time; the
    /// caller may retry later (HTTP 503 with Retry-After).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("store error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid database URL {0:?}: expected sqlite://PATH or postgres://...")]
    BadUrl(String),
    /// The store's shoppers' ids are encrypted with another key than
    /// `id_key`.
    #[error(
        "the store's shopper ids are encrypted with another id_key (its fingerprint starts {stored}, this key's \
         {mine}): start with that key, or change the store's key with `recd rotate-id-key` (see docs/operations.md)"
    )]
    IdKeyMismatch { stored: String, mine: String },
    /// The store's shoppers' ids are encrypted and no `id_key` is set.
    #[error(
        "the store's shopper ids are encrypted (id_key fingerprint {stored}) but id_key (RECD_ID_KEY) is not set: \
         set it to that key, or decrypt them with `recd rotate-id-key --decrypt` (see docs/operations.md)"
    )]
    IdKeyMissing { stored: String },
    /// `id_key` is set but the store holds ids in clear.
    #[error(
        "id_key is set but the store holds shopper ids in clear: encrypt them first with `recd rotate-id-key` \
         (with the same settings), or start without id_key (see docs/operations.md)"
    )]
    ClearIds,
    #[error(transparent)]
    Undecryptable(#[from] Undecryptable),
    /// Other recd processes are connected to the database.
    #[error("{0} other recd session(s) are connected to the database: stop every replica first")]
    ReplicasRunning(i64),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Other(e)
        }
    }
}

/// Errors that say "not now" rather than "never": connection trouble, pool
/// exhaustion, a Postgres shutting down, an SQLite file locked too long.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Postgres class 08 (connection), 57P0x (shutdown), 53xxx
            // (resources); SQLite 5 (BUSY) and 6 (LOCKED).
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") || code == "5" || code == "6"
        }
        _ => false,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Item ids known to exist in the catalogue, remembered by one process to
/// spare the catalogue insert of each event batch. Bounded: past the limit
/// it starts over, which only costs a few redundant inserts.
#[derive(Debug, Default)]
pub struct KnownItems {
    ids: std::sync::Mutex<std::collections::HashSet<String>>,
}

const KNOWN_ITEMS_MAX: usize = 1_000_000;

impl KnownItems {
    /// The ids among `ids` not known yet.
    pub fn unknown<'a>(&self, ids: &[&'a str]) -> Vec<&'a str> {
        let known = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().copied().filter(|id| !known.contains(*id)).collect()
    }

    /// Call only once the rows are committed.
    pub fn remember(&self, ids: &[&str]) {
        let mut known = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() + ids.len() > KNOWN_ITEMS_MAX {
            known.clear();
        }
        known.extend(ids.iter().map(|id| (*id).to_owned()));
    }
}

/// A snapshot as stored: its bytes and metadata, and the nearest-neighbour
/// index built for it (its metadata and bytes), if any.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRow<'a> {
    pub version: &'a str,
    pub created_at_ms: i64,
    pub meta: &'a str,
    pub bytes: &'a [u8],
    pub index: Option<(&'a str, &'a [u8])>,
}

/// Pool figures for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub size: u32,
    pub idle: usize,
    pub max: u32,
}

/// The store: a database and how shoppers' ids are kept in it (as they
/// are, or encrypted with `id_key`).
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    ids: Ids,
    /// How far back ingest counts events for the dashboard.
    stats_keep: std::sync::Arc<stats::StatsKeep>,
    /// The per-item counts of batches this process stored whole, until
    /// the next fold (PostgreSQL).
    claims: std::sync::Arc<stats::Claims>,
}

#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(Sqlite),
}

/// An SQLite file allows one writer at a time. Rather than let writers
/// collide on its lock (each polling until the busy timeout, unfairly),
/// every write goes through one connection whose waiters queue in order;
/// readers have a pool of their own and, in WAL mode, never wait for it.
#[derive(Clone, Debug)]
pub struct Sqlite {
    pub read: SqlitePool,
    pub write: SqlitePool,
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite: how long a write may wait for its turn on the writer
    /// connection.
    pub write_timeout: Duration,
    /// Store shoppers' ids encrypted with this key (see `ids`).
    pub id_key: Option<IdKey>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_millis(1500),
            write_timeout: Duration::from_secs(10),
            id_key: None,
        }
    }
}

impl Store {
    /// Opens the store named by `url`, creating it (an SQLite file and its
    /// folder, or a Postgres database) when missing, and migrates it. Fails
    /// when the store's ids are not kept the way `options.id_key` says
    /// (see `check_id_key`).
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Store> {
        let store = Store::open_migrated(url, options).await?;
        if let Err(e) = store.check_id_key().await {
            store.close().await;
            return Err(e);
        }
        if let Some(fingerprint) = store.ids.fingerprint() {
            tracing::info!(
                id_key_fingerprint = &fingerprint[..16],
                "shoppers' ids are stored encrypted (id_key)"
            );
        }
        Ok(store)
    }

    /// Opens and migrates the store, whatever its ids.
    async fn open_migrated(url: &str, options: &StoreOptions) -> Result<Store> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Db::Postgres(open_postgres(url, options).await?)
        } else if url.starts_with("sqlite:") {
            Db::Sqlite(open_sqlite(url, options).await?)
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let store = Store {
            db,
            ids: Ids::new(options.id_key.as_ref()),
            stats_keep: std::sync::Arc::default(),
            claims: std::sync::Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database under the store (for tests and tools that read it
    /// directly).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// How the store keeps shoppers' ids.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    pub async fn migrate(&self) -> Result<()> {
        match &self.db {
            Db::Postgres(pool) => PG_MIGRATIONS.run(pool).await?,
            Db::Sqlite(sqlite) => SQLITE_MIGRATIONS.run(&sqlite.write).await?,
        }
        Ok(())
    }

    pub fn kind(&self) -> &'static str {
        match &self.db {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Answers when the store does.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(drop))?;
        Ok(())
    }

    pub fn pool_stats(&self) -> PoolStats {
        on_pool!(self, pool => PoolStats {
            size: pool.size(),
            idle: pool.num_idle(),
            max: pool.options().get_max_connections(),
        })
    }

    pub async fn close(&self) {
        if let Db::Sqlite(sqlite) = &self.db {
            sqlite.write.close().await;
        }
        on_pool!(self, pool => pool.close().await)
    }

    /// Stores a batch of valid events in one transaction and returns how many
    /// were new; the rest had an `event_id` stored before (or earlier in the
    /// batch). Items the events name are added to the catalogue if missing.
    /// Returns only once the rows are committed.
    pub async fn insert_events(&self, events: &[NewEvent], now_ms: i64) -> Result<u64> {
        self.insert_events_known(events, now_ms, None).await
    }

    /// As `insert_events`, skipping the catalogue insert for items `known`
    /// says exist (items are never removed, only marked deleted, so once
    /// seen they stay); most batches then write one statement, not two.
    pub async fn insert_events_known(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        known: Option<&KnownItems>,
    ) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        // Sorted so that concurrent batches lock items in one order.
        let mut item_ids: Vec<&str> = events.iter().map(|e| e.item_id.as_str()).collect();
        item_ids.sort_unstable();
        item_ids.dedup();
        if let Some(known) = known {
            item_ids = known.unknown(&item_ids);
        }
        let inserted = self.write_events(events, &item_ids, now_ms).await?;
        if let Some(known) = known {
            known.remember(&item_ids);
        }
        Ok(inserted)
    }

    /// Creates or replaces items (and brings deleted ones back).
    pub async fn put_items(&self, items: &[Item], now_ms: i64) -> Result<()> {
        const UPSERT: &str =
            "INSERT INTO items (item_id, title, categories, price, available, attributes, deleted, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7)
             ON CONFLICT (item_id) DO UPDATE SET title = excluded.title, categories = excluded.categories,
               price = excluded.price, available = excluded.available, attributes = excluded.attributes,
               deleted = FALSE, updated_at = excluded.updated_at";
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for item in items {
                sqlx::query(UPSERT)
                    .bind(&item.item_id)
                    .bind(item.title.as_deref())
                    .bind(Value::from(item.categories.clone()).to_string())
                    .bind(item.price)
                    .bind(item.available)
                    .bind(Value::Object(item.attributes.clone()).to_string())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The item, unless it was never seen or is deleted.
    pub async fn get_item(&self, item_id: &str) -> Result<Option<Item>> {
        const SELECT: &str = "SELECT item_id, title, categories, price, available, attributes
             FROM items WHERE item_id = $1 AND NOT deleted";
        let item = on_pool!(self, pool => {
            sqlx::query(SELECT).bind(item_id).fetch_optional(pool).await?.map(|row| Item {
                item_id: row.get("item_id"),
                title: row.get("title"),
                categories: serde_json::from_str(row.get::<&str, _>("categories")).unwrap_or_default(),
                price: row.get("price"),
                available: row.get("available"),
                attributes: serde_json::from_str(row.get::<&str, _>("attributes")).unwrap_or_default(),
            })
        });
        Ok(item)
    }

    /// Marks the item deleted; false if there was no such (live) item.
    pub async fn delete_item(&self, item_id: &str, now_ms: i64) -> Result<bool> {
        const DELETE: &str = "UPDATE items SET deleted = TRUE, updated_at = $2 WHERE item_id = $1 AND NOT deleted";
        let n = on_writer!(self, pool => sqlx::query(DELETE).bind(item_id).bind(now_ms).execute(pool).await?.rows_affected());
        Ok(n > 0)
    }

    /// Erases every event of the user; returns how many there were.
    pub async fn delete_user(&self, user_id: &str) -> Result<u64> {
        let user_id = &self.ids.seal(IdKind::User, user_id);
        let n = match &self.db {
            Db::Postgres(pool) => {
                // Other replicas drop what they cache of the user.
                let mut tx = pool.begin().await?;
                let n = sqlx::query("DELETE FROM events WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                // The ids of their events sent without a timestamp go too.
                sqlx::query("DELETE FROM recent_event_ids WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                // Out of the segment lists at once, not at the next refresh.
                sqlx::query("DELETE FROM user_segments WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(ERASURE_CHANNEL)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                n
            }
            Db::Sqlite(sqlite) => {
                let mut tx = sqlite.write.begin().await?;
                let n = sqlx::query("DELETE FROM events WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query("DELETE FROM user_segments WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                n
            }
        };
        Ok(n)
    }

    /// How many events the store holds.
    pub async fn count_events(&self) -> Result<i64> {
        let n = on_pool!(self, pool => sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(pool).await?);
        Ok(n)
    }

    /// Stores a snapshot and forgets all but the newest `keep`.
    pub async fn save_snapshot(&self, row: &SnapshotRow<'_>, keep: i64) -> Result<()> {
        let version = row.version;
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO snapshots (version, created_at, meta, bytes) VALUES ($1, $2, $3, $4)")
                .bind(version)
                .bind(row.created_at_ms)
                .bind(row.meta)
                .bind(row.bytes)
                .execute(&mut *tx)
                .await?;
            if let Some((meta, bytes)) = row.index {
                sqlx::query("INSERT INTO snapshot_indexes (version, meta, bytes) VALUES ($1, $2, $3)")
                    .bind(version)
                    .bind(meta)
                    .bind(bytes)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "DELETE FROM snapshots WHERE version NOT IN \
                 (SELECT version FROM snapshots ORDER BY created_at DESC, version DESC LIMIT $1)",
            )
            .bind(keep)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM snapshot_indexes WHERE version NOT IN (SELECT version FROM snapshots)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        if let Db::Postgres(pool) = &self.db {
            // Replicas listening load it at once; the others poll.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(SNAPSHOT_CHANNEL)
                .bind(version)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// The newest snapshot's version, if any.
    /// The stored snapshots' versions, newest first.
    pub async fn snapshot_versions(&self) -> Result<Vec<String>> {
        let v = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT version FROM snapshots ORDER BY created_at DESC, version DESC",
        )
        .fetch_all(pool)
        .await?);
        Ok(v)
    }

    pub async fn latest_snapshot_version(&self) -> Result<Option<String>> {
        Ok(self.snapshot_versions().await?.into_iter().next())
    }

    /// The newest snapshot: (version, bytes).
    pub async fn latest_snapshot(&self) -> Result<Option<(String, Vec<u8>)>> {
        let v = on_pool!(self, pool => sqlx::query_as::<_, (String, Vec<u8>)>(
            "SELECT version, bytes FROM snapshots ORDER BY created_at DESC, version DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await?);
        Ok(v)
    }
}

async fn open_postgres(url: &str, options: &StoreOptions) -> Result<PgPool> {
    let connect = PgConnectOptions::from_str(url)?
        .application_name(APPLICATION_NAME)
        .log_statements(tracing::log::LevelFilter::Debug);
    create_postgres_database(&connect).await?;
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await?;
    Ok(pool)
}

/// An empty server is fine: the database is created when it is missing.
async fn create_postgres_database(connect: &PgConnectOptions) -> Result<()> {
    let Some(name) = connect.get_database().map(str::to_owned) else {
        return Ok(());
    };
    match connect.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(())
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let admin = connect.clone().database("postgres");
            let mut conn = admin.connect().await?;
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            let create = format!("CREATE DATABASE {quoted}");
            let created = sqlx::query(&create).execute(&mut conn).await;
            match created {
                // Another process created it meanwhile.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
                other => other.map(drop).map_err(StoreError::from),
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn open_sqlite(url: &str, options: &StoreOptions) -> Result<Sqlite> {
    let connect = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: an acknowledged event survives a power cut, not only a crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(options.acquire_timeout)
        .foreign_keys(true);
    let path = connect.get_filename();
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Other(sqlx::Error::Io(e)))?;
        }
    }
    // The writer first: it creates the file and turns WAL on.
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.write_timeout)
        .connect_with(connect.clone())
        .await?;
    let read = SqlitePoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await?;
    Ok(Sqlite { read, write })
}
