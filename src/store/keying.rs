//! Which key the store's shoppers' ids are encrypted with (the fingerprint
//! in `id_key_fingerprint`; no row: they are stored in clear), the check
//! at start, and `recd rotate-id-key`, which rewrites every id column in
//! place.

use std::collections::HashMap;

use sqlx::Row;

use super::{Db, IdKey, IdKind, Ids, Result, Store, StoreError, StoreOptions, APPLICATION_NAME};

/// Rows rewritten per statement (and per progress report).
const BATCH: i64 = 5_000;

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Whether the ids were encrypted before, and are after.
    pub was_encrypted: bool,
    pub encrypted: bool,
    /// False when they were stored that way already.
    pub changed: bool,
    /// Event rows rewritten.
    pub events: u64,
    /// Rows of `recent_event_ids` rewritten (PostgreSQL).
    pub recent_event_ids: u64,
}

/// The first characters of a fingerprint, enough to tell keys apart in a
/// message.
fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(16).collect()
}

impl Store {
    /// The fingerprint of the key the store's ids are encrypted with, if
    /// they are.
    pub async fn stored_id_key_fingerprint(&self) -> Result<Option<String>> {
        let fp = on_pool!(self, pool => sqlx::query_scalar::<_, String>(
            "SELECT fingerprint FROM id_key_fingerprint WHERE one = 1",
        )
        .fetch_optional(pool)
        .await?);
        Ok(fp)
    }

    /// Whether any shopper id is stored.
    async fn holds_ids(&self) -> Result<bool> {
        let events: i64 = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM events LIMIT 1) AS one",
        )
        .fetch_one(pool)
        .await?);
        let recent: i64 = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM recent_event_ids LIMIT 1) AS one")
                    .fetch_one(pool)
                    .await?
            }
            Db::Sqlite(_) => 0,
        };
        Ok(events + recent > 0)
    }

    /// Checks that the store's ids are kept as `id_key` says: encrypted
    /// with this key (same fingerprint), or in clear without a key. A key
    /// set on a store without ids is recorded as the store's; a key set on
    /// a store with ids in clear is refused (they would mix).
    pub(super) async fn check_id_key(&self) -> Result<()> {
        let stored = self.stored_id_key_fingerprint().await?;
        match (self.ids.fingerprint(), stored) {
            (None, None) => Ok(()),
            (None, Some(stored)) => Err(StoreError::IdKeyMissing { stored: short(&stored) }),
            (Some(mine), Some(stored)) if mine == stored => Ok(()),
            (Some(mine), Some(stored)) => Err(StoreError::IdKeyMismatch {
                stored: short(&stored),
                mine: short(mine),
            }),
            (Some(mine), None) => {
                if self.holds_ids().await? {
                    return Err(StoreError::ClearIds);
                }
                let mine = mine.to_owned();
                on_writer!(self, pool => sqlx::query(
                    "INSERT INTO id_key_fingerprint (one, fingerprint, set_at) VALUES (1, $1, $2)
                     ON CONFLICT (one) DO NOTHING",
                )
                .bind(&mine)
                .bind(crate::clock::now_ms())
                .execute(pool)
                .await
                .map(drop)?);
                // Another replica may have recorded its key meanwhile.
                match self.stored_id_key_fingerprint().await? {
                    Some(stored) if stored == mine => Ok(()),
                    Some(stored) => Err(StoreError::IdKeyMismatch {
                        stored: short(&stored),
                        mine: short(&mine),
                    }),
                    None => Err(StoreError::ClearIds),
                }
            }
        }
    }

    /// Rewrites every stored shopper id (user ids and session ids of events,
    /// and on PostgreSQL the user ids of `recent_event_ids`) from how they
    /// are stored now (encrypted with `options.id_key`, or in clear) to
    /// encrypted with `new_key` (`None`: in clear), and records the new
    /// key's fingerprint, all in one transaction. A store in clear is read
    /// as such whatever `options.id_key` says. Every replica must be
    /// stopped: on PostgreSQL it refuses while another recd session is
    /// connected to the database.
    /// `progress(done, total)` follows the events rewritten.
    ///
    /// Afterwards SQLite is vacuumed and its WAL emptied, so that the old
    /// forms of the ids leave the file; PostgreSQL is vacuumed, which lets
    /// their space be reused (see docs/operations.md).
    pub async fn rotate_id_key(
        url: &str,
        options: &StoreOptions,
        new_key: Option<&IdKey>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Rotation> {
        // One connection: any other recd session on the database is a
        // replica still running.
        let options = StoreOptions {
            max_connections: 1,
            ..options.clone()
        };
        let store = Store::open_migrated(url, &options).await?;
        let result = store.rotate(new_key, progress).await;
        store.close().await;
        result
    }

    async fn rotate(&self, new_key: Option<&IdKey>, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Rotation> {
        let old = match (self.stored_id_key_fingerprint().await?, self.ids.fingerprint()) {
            (None, _) => Ids::default(),
            (Some(stored), Some(mine)) if stored == mine => self.ids.clone(),
            (Some(stored), Some(mine)) => {
                return Err(StoreError::IdKeyMismatch {
                    stored: short(&stored),
                    mine: short(mine),
                })
            }
            (Some(stored), None) => return Err(StoreError::IdKeyMissing { stored: short(&stored) }),
        };
        let new = Ids::new(new_key);
        let mut done = Rotation {
            was_encrypted: old.encrypted(),
            encrypted: new.encrypted(),
            ..Rotation::default()
        };
        if old.fingerprint() == new.fingerprint() {
            return Ok(done);
        }
        done.changed = true;
        let total = u64::try_from(self.count_events().await?).unwrap_or(0);
        progress(0, total);
        let reseal = |kind: IdKind, cache: &mut HashMap<String, String>, stored: String| -> Result<String> {
            if let Some(sealed) = cache.get(&stored) {
                return Ok(sealed.clone());
            }
            let sealed = new.seal(kind, &old.open(kind, stored.clone())?);
            cache.insert(stored, sealed.clone());
            Ok(sealed)
        };
        match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // No replica may start meanwhile: a start reads the
                // fingerprint, which waits for this transaction's end.
                sqlx::query("LOCK TABLE id_key_fingerprint IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
                // Every replica must be stopped: one still running (connected,
                // as every replica that started is) would go on writing ids
                // the old way.
                // A replica stopped a moment ago may still show while its
                // server process ends: look again for up to 5 s.
                let mut looks = 0;
                loop {
                    let others: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(APPLICATION_NAME)
                    .fetch_one(&mut *tx)
                    .await?;
                    if others == 0 {
                        break;
                    }
                    looks += 1;
                    if looks == 50 {
                        return Err(StoreError::ReplicasRunning(others));
                    }
                    // The activity view is read once per transaction unless cleared.
                    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *tx).await?;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let mut after = i64::MIN;
                loop {
                    let rows =
                        sqlx::query("SELECT seq, user_id, session_id FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                            .bind(after)
                            .bind(BATCH)
                            .fetch_all(&mut *tx)
                            .await?;
                    let Some(last) = rows.last() else { break };
                    after = last.get("seq");
                    let (mut users, mut sessions) = (HashMap::new(), HashMap::new());
                    let (mut seqs, mut user_ids, mut session_ids) = (Vec::new(), Vec::new(), Vec::new());
                    for row in &rows {
                        seqs.push(row.get::<i64, _>("seq"));
                        user_ids.push(reseal(IdKind::User, &mut users, row.get("user_id"))?);
                        let session: Option<String> = row.get("session_id");
                        session_ids.push(session.map(|s| reseal(IdKind::Session, &mut sessions, s)).transpose()?);
                    }
                    // The bounds let each partition read its index on seq.
                    sqlx::query(
                        "UPDATE events AS e SET user_id = t.u, session_id = t.s
                         FROM UNNEST($1::int8[], $2::text[], $3::text[]) AS t(seq, u, s)
                         WHERE e.seq = t.seq AND e.seq BETWEEN $4 AND $5",
                    )
                    .bind(&seqs)
                    .bind(&user_ids)
                    .bind(&session_ids)
                    .bind(seqs[0])
                    .bind(after)
                    .execute(&mut *tx)
                    .await?;
                    done.events += rows.len() as u64;
                    progress(done.events, total);
                }
                let stored: Vec<String> = sqlx::query_scalar("SELECT DISTINCT user_id FROM recent_event_ids")
                    .fetch_all(&mut *tx)
                    .await?;
                let mut users = HashMap::new();
                let resealed = stored
                    .iter()
                    .map(|u| reseal(IdKind::User, &mut users, u.clone()))
                    .collect::<Result<Vec<_>>>()?;
                done.recent_event_ids = sqlx::query(
                    "UPDATE recent_event_ids AS r SET user_id = t.n
                     FROM UNNEST($1::text[], $2::text[]) AS t(o, n) WHERE r.user_id = t.o",
                )
                .bind(&stored)
                .bind(&resealed)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // The segment lists hold ids in the old form: the next
                // refresh (at start) makes them again.
                sqlx::query("DELETE FROM user_segments").execute(&mut *tx).await?;
                sqlx::query("DELETE FROM id_key_fingerprint").execute(&mut *tx).await?;
                if let Some(fingerprint) = new.fingerprint() {
                    sqlx::query("INSERT INTO id_key_fingerprint (one, fingerprint, set_at) VALUES (1, $1, $2)")
                        .bind(fingerprint)
                        .bind(crate::clock::now_ms())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                sqlx::query("VACUUM events, recent_event_ids").execute(pool).await?;
            }
            Db::Sqlite(sqlite) => {
                let mut tx = sqlite.write.begin_with("BEGIN IMMEDIATE").await?;
                let mut after = i64::MIN;
                loop {
                    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
                        "SELECT seq, user_id, session_id FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    )
                    .bind(after)
                    .bind(BATCH)
                    .fetch_all(&mut *tx)
                    .await?;
                    let Some(last) = rows.last() else { break };
                    after = last.0;
                    let n = rows.len() as u64;
                    let (mut users, mut sessions) = (HashMap::new(), HashMap::new());
                    for (seq, user, session) in rows {
                        let user = reseal(IdKind::User, &mut users, user)?;
                        let session = session.map(|s| reseal(IdKind::Session, &mut sessions, s)).transpose()?;
                        sqlx::query("UPDATE events SET user_id = $1, session_id = $2 WHERE seq = $3")
                            .bind(user)
                            .bind(session)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await?;
                    }
                    done.events += n;
                    progress(done.events, total);
                }
                // The segment lists hold ids in the old form: the next
                // refresh (at start) makes them again.
                sqlx::query("DELETE FROM user_segments").execute(&mut *tx).await?;
                sqlx::query("DELETE FROM id_key_fingerprint").execute(&mut *tx).await?;
                if let Some(fingerprint) = new.fingerprint() {
                    sqlx::query("INSERT INTO id_key_fingerprint (one, fingerprint, set_at) VALUES (1, $1, $2)")
                        .bind(fingerprint)
                        .bind(crate::clock::now_ms())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                // The old forms stay in free pages and the WAL until
                // overwritten: rebuild the file and empty the WAL.
                sqlx::query("VACUUM").execute(&sqlite.write).await?;
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&sqlite.write)
                    .await?;
            }
        }
        Ok(done)
    }
}
