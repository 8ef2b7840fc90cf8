//! What the replicas of one shop agree on through the store:
//!
//! - who schedules trainings (the leader) and that one training runs at a
//!   time: Postgres advisory locks, held on a session of their own, so that
//!   they go when the process holding them dies;
//! - announcements of a new snapshot or an erased user (LISTEN/NOTIFY), so
//!   that other replicas act at once instead of at their next poll.
//!
//! One process serves an SQLite file: it always leads, may always train,
//! and has nobody to hear from.

use sqlx::{Connection, PgConnection, PgPool};

use super::{Db, Result, Store};

/// Advisory lock keys: the scheduling replica, and a training in progress.
const LEADER_KEY: i64 = 0x7265_6364_0001;
const TRAINING_KEY: i64 = 0x7265_6364_0002;

/// Postgres channels: a new snapshot's version, and an erased user's id.
pub(super) const SNAPSHOT_CHANNEL: &str = "recd_snapshots";
pub(super) const ERASURE_CHANNEL: &str = "recd_erasures";

/// This process's locks. On Postgres they live on one session, opened on
/// first use and opened again after it is lost.
pub struct Locks {
    pool: Option<PgPool>,
    session: tokio::sync::Mutex<Option<PgConnection>>,
}

impl Locks {
    pub fn new(store: &Store) -> Self {
        Locks {
            pool: match &store.db {
                Db::Postgres(pool) => Some(pool.clone()),
                Db::Sqlite(_) => None,
            },
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether this process leads: takes the leader lock, or (when `held`)
    /// checks that the session holding it is still alive. An error means
    /// the session is lost, and with it the lock.
    pub async fn lead(&self, held: bool) -> Result<bool> {
        let Some(pool) = &self.pool else {
            return Ok(true);
        };
        let mut slot = self.session.lock().await;
        let conn = session(&mut slot, pool).await?;
        let query = if held {
            // The lock is ours while the session is.
            sqlx::query_scalar::<_, bool>("SELECT TRUE").fetch_one(&mut *conn).await
        } else {
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_KEY)
                .fetch_one(&mut *conn)
                .await
        };
        query.map_err(|e| {
            *slot = None;
            e.into()
        })
    }

    /// Takes the training lock if no replica holds it.
    pub async fn try_lock_training(&self) -> bool {
        let Some(pool) = &self.pool else {
            return true;
        };
        let mut slot = self.session.lock().await;
        match session(&mut slot, pool).await {
            Ok(conn) => sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(TRAINING_KEY)
                .fetch_one(&mut *conn)
                .await
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Lets the training lock go (it goes anyway with a lost session).
    pub async fn unlock_training(&self) {
        if self.pool.is_none() {
            return;
        }
        if let Some(conn) = self.session.lock().await.as_mut() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(TRAINING_KEY)
                .execute(&mut *conn)
                .await;
        }
    }
}

async fn session<'a>(slot: &'a mut Option<PgConnection>, pool: &PgPool) -> Result<&'a mut PgConnection> {
    if slot.is_none() {
        *slot = Some(PgConnection::connect_with(&pool.connect_options()).await?);
    }
    Ok(slot.as_mut().expect("just set"))
}

/// What another replica announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A new snapshot was saved.
    Snapshot,
    /// This user was erased.
    Erasure(String),
}

/// A subscription to other replicas' announcements (Postgres only).
pub struct Notices(sqlx::postgres::PgListener, super::Ids);

impl Notices {
    /// The next announcement. An error means the subscription is lost:
    /// subscribe again (and look for what was missed meanwhile).
    pub async fn recv(&mut self) -> Result<Notice> {
        let note = self.0.recv().await?;
        Ok(if note.channel() == ERASURE_CHANNEL {
            // The id as stored (encrypted with `id_key` if set).
            Notice::Erasure(self.1.open(super::IdKind::User, note.payload().to_owned())?)
        } else {
            Notice::Snapshot
        })
    }
}

impl Store {
    /// Subscribes to announcements; `None` on SQLite, where no other
    /// process announces anything.
    pub async fn subscribe(&self) -> Result<Option<Notices>> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen_all([SNAPSHOT_CHANNEL, ERASURE_CHANNEL]).await?;
        Ok(Some(Notices(listener, self.ids.clone())))
    }

    /// Whether one process serves this store (SQLite): then a training
    /// marked running at start died with an earlier process.
    pub fn one_process(&self) -> bool {
        matches!(self.db, Db::Sqlite(_))
    }
}
