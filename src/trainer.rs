//! The background work of a serving process:
//!
//! - the retrainer: every `train_interval`, when enough new events arrived,
//!   train on a blocking thread, gate the candidate, publish it as a snapshot
//!   row. On Postgres only the replica holding an advisory lock (on its own
//!   connection) schedules trainings; when it dies its session ends, the lock
//!   goes, and another replica takes it on its next look.
//! - snapshot pickup: every replica serves the newest snapshot row, told by
//!   NOTIFY on Postgres and by polling on both stores (a notification is not
//!   replayed to a replica that was not listening).
//! - the catalogue refresh, impressions flushed to the store, erasures
//!   announced by other replicas.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;

use crate::http::AppState;
use crate::model::{self, Dataset, EvalReport, EventRow, ModelSnapshot, Split};
use crate::store::{Store, ERASURE_CHANNEL, SNAPSHOT_CHANNEL};

/// Advisory lock keys: the scheduling replica, and a training in progress.
const LEADER_KEY: i64 = 0x7265_6364_0001;
const TRAINING_KEY: i64 = 0x7265_6364_0002;

/// How a training ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Published { version: String, why: String },
    Rejected { version: String, why: String },
    Failed { why: String },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Published { .. } => "published",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// Why a training cannot start now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Busy {
    #[error("a training is already running in this process")]
    Here,
    #[error("a training is running on another replica")]
    Elsewhere,
}

/// The trainer's state in one process.
pub struct Trainer {
    /// Host, process and a random suffix: names this process in `trainings`.
    pub replica: String,
    running: AtomicBool,
    leader: AtomicBool,
    /// Postgres: the session that holds the advisory locks.
    lock: tokio::sync::Mutex<Option<PgConnection>>,
    /// When the last scheduled training started.
    last_attempt: std::sync::Mutex<Option<Instant>>,
    started: std::sync::OnceLock<()>,
    created: Instant,
}

impl Default for Trainer {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Trainer {
            replica: format!("{host}:{}:{}", std::process::id(), &suffix[..8]),
            running: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            lock: tokio::sync::Mutex::new(None),
            last_attempt: std::sync::Mutex::new(None),
            started: std::sync::OnceLock::new(),
            created: Instant::now(),
        }
    }
}

impl Trainer {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether this process schedules trainings.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }
}

/// Loads the newest snapshot and the catalogue: done before the port is
/// bound, so a restarted service serves its last model at once.
pub async fn prepare(state: &AppState) -> anyhow::Result<()> {
    load_latest(state).await?;
    state.serving.catalogue.refresh(&state.store).await?;
    if matches!(state.store, Store::Sqlite(_)) {
        // One process serves an SQLite file: a run left `running` died
        // with the process before this one.
        state.store.abandon_trainings(crate::http::now_ms()).await?;
    }
    Ok(())
}

/// Serves the newest stored snapshot if it is not served yet.
pub async fn load_latest(state: &AppState) -> anyhow::Result<()> {
    let Some(version) = state.store.latest_snapshot_version().await? else {
        return Ok(());
    };
    if state.serving.version().as_deref() == Some(version.as_str()) {
        return Ok(());
    }
    let Some(bytes) = state.store.snapshot_bytes(&version).await? else {
        return Ok(());
    };
    let snapshot = tokio::task::spawn_blocking(move || ModelSnapshot::from_bytes(&bytes)).await??;
    // Another replica may have published a newer one meanwhile; the next
    // look picks it up.
    serve(state, snapshot);
    metrics::counter!("recd_snapshot_loads_total").increment(1);
    Ok(())
}

/// The background tasks of a serving process; they stop when dropped.
pub struct Background(Vec<JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the background tasks (once per process state).
pub fn start(state: &AppState) -> Option<Background> {
    state.trainer.started.set(()).ok()?;
    let poll = state.settings.snapshot_poll;
    let mut tasks = vec![
        tokio::spawn(schedule(state.clone())),
        tokio::spawn(refresh_catalogue(state.clone(), poll)),
        tokio::spawn(flush_impressions_every(state.clone(), Duration::from_secs(1))),
        tokio::spawn(follow_events(state.clone())),
    ];
    if matches!(state.store, Store::Postgres(_)) {
        tasks.push(tokio::spawn(listen(state.clone())));
    }
    Some(Background(tasks))
}

/// Hands the impressions counted so far to the store.
pub async fn flush_impressions(state: &AppState) {
    let pending = state.serving.take_impressions();
    if pending.is_empty() {
        return;
    }
    if let Err(e) = state.store.record_impressions(&pending).await {
        tracing::warn!(error = %e, impressions = pending.len(), "cannot store impressions yet");
        state.serving.return_impressions(pending);
    }
}

/// Flushes impressions every `period`, and every ten minutes forgets those
/// older than `impressions_retention`.
async fn flush_impressions_every(state: AppState, period: Duration) {
    let mut last_cleanup = std::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        flush_impressions(&state).await;
        if last_cleanup.elapsed() >= Duration::from_secs(600) {
            last_cleanup = std::time::Instant::now();
            let keep = i64::try_from(state.settings.impressions_retention.as_millis()).unwrap_or(i64::MAX);
            match state
                .store
                .forget_impressions(crate::http::now_ms().saturating_sub(keep))
                .await
            {
                Ok(n) if n > 0 => tracing::info!(impressions = n, "old impressions forgotten"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot forget old impressions"),
            }
        }
    }
}

/// Drops cached histories of users with events stored elsewhere.
async fn follow_events(state: AppState) {
    loop {
        if let Err(e) = state.serving.histories.follow(&state.store).await {
            tracing::debug!(error = %e, "cannot follow new events");
        }
        tokio::time::sleep(crate::recommend::FOLLOW_EVERY).await;
    }
}

async fn refresh_catalogue(state: AppState, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = state.serving.catalogue.refresh(&state.store).await {
            tracing::debug!(error = %e, "catalogue refresh failed");
        }
    }
}

/// Postgres: new snapshots and erasures from other replicas, at once.
async fn listen(state: AppState) {
    let Store::Postgres(pool) = &state.store else {
        return;
    };
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
            listener.listen_all([SNAPSHOT_CHANNEL, ERASURE_CHANNEL]).await?;
            // Whatever was announced before we listened.
            if let Err(e) = load_latest(&state).await {
                tracing::warn!(error = %e, "cannot load the newest snapshot");
            }
            loop {
                let note = listener.recv().await?;
                if note.channel() == ERASURE_CHANNEL {
                    state.serving.forget_user(note.payload());
                } else if let Err(e) = load_latest(&state).await {
                    tracing::warn!(error = %e, "cannot load the newest snapshot");
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        if let Err(e) = listener.await {
            tracing::debug!(error = %e, "listener lost; reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every `snapshot_poll`: pick up new snapshots; on the leader, train when
/// due.
async fn schedule(state: AppState) {
    let poll = state.settings.snapshot_poll;
    loop {
        if let Err(e) = load_latest(&state).await {
            tracing::warn!(error = %e, "cannot load the newest snapshot");
        }
        if let Some(interval) = state.settings.train_interval {
            if lead(&state).await {
                match due(&state, interval).await {
                    Ok(true) => {
                        if let Err(busy) = start_training(&state).await {
                            tracing::debug!(%busy, "scheduled training skipped");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot tell whether to train"),
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Whether this process leads (takes or keeps the lock on Postgres; always
/// on SQLite, whose file one process serves).
async fn lead(state: &AppState) -> bool {
    let leads = match &state.store {
        Store::Sqlite(_) => true,
        Store::Postgres(pool) => {
            let mut lock = state.trainer.lock.lock().await;
            let held = state.trainer.is_leader();
            match lock_session(&mut lock, pool).await {
                Ok(conn) => {
                    let query = if held {
                        // Still alive: the lock is ours while the session is.
                        sqlx::query_scalar::<_, bool>("SELECT TRUE").fetch_one(&mut *conn).await
                    } else {
                        sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                            .bind(LEADER_KEY)
                            .fetch_one(&mut *conn)
                            .await
                    };
                    match query {
                        Ok(leads) => leads,
                        Err(e) => {
                            tracing::warn!(error = %e, "trainer lock session lost");
                            *lock = None;
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the trainer lock session");
                    false
                }
            }
        }
    };
    if leads != state.trainer.is_leader() {
        tracing::info!(replica = %state.trainer.replica, leads, "trainer leadership changed");
        state.trainer.leader.store(leads, Ordering::SeqCst);
    }
    metrics::gauge!("recd_trainer_leader").set(if leads { 1.0 } else { 0.0 });
    leads
}

async fn lock_session<'a>(
    slot: &'a mut Option<PgConnection>,
    pool: &sqlx::PgPool,
) -> Result<&'a mut PgConnection, sqlx::Error> {
    if slot.is_none() {
        let options = pool.connect_options();
        *slot = Some(PgConnection::connect_with(&options).await?);
    }
    Ok(slot.as_mut().expect("just set"))
}

/// A training is due when none ever was and there are events, or the
/// interval passed and `train_min_new_events` arrived since the served
/// model's data.
async fn due(state: &AppState, interval: Duration) -> anyhow::Result<bool> {
    if state.trainer.is_running() {
        return Ok(false);
    }
    let last = *state.trainer.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
    let served = state.serving.model();
    match (served, last) {
        (None, None) => Ok(state.store.count_events().await? > 0),
        (_, Some(at)) if at.elapsed() < interval => Ok(false),
        (None, Some(_)) => Ok(state.store.count_events().await? > 0),
        (Some(model), at) => {
            if at.is_none() && state.trainer.created.elapsed() < interval {
                return Ok(false);
            }
            let new = state.store.count_events_after(model.meta.last_seq).await?;
            Ok(new >= state.settings.train_min_new_events as i64)
        }
    }
}

/// Starts a training in the background unless one runs here or (on
/// Postgres) on another replica.
pub async fn start_training(state: &AppState) -> Result<(), Busy> {
    if state
        .trainer
        .running
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(Busy::Here);
    }
    if let Store::Postgres(pool) = &state.store {
        let mut lock = state.trainer.lock.lock().await;
        let taken = match lock_session(&mut lock, pool).await {
            Ok(conn) => sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(TRAINING_KEY)
                .fetch_one(&mut *conn)
                .await
                .unwrap_or(false),
            Err(_) => false,
        };
        if !taken {
            state.trainer.running.store(false, Ordering::SeqCst);
            return Err(Busy::Elsewhere);
        }
        // With the training lock ours, a run still marked `running` is one
        // whose replica died.
        if let Err(e) = state.store.abandon_trainings(crate::http::now_ms()).await {
            tracing::warn!(error = %e, "cannot close abandoned trainings");
        }
    }
    *state.trainer.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    let state = state.clone();
    tokio::spawn(async move {
        let outcome = train(&state).await;
        if let Store::Postgres(_) = &state.store {
            let mut lock = state.trainer.lock.lock().await;
            if let Some(conn) = lock.as_mut() {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(TRAINING_KEY)
                    .execute(&mut *conn)
                    .await;
            }
        }
        state.trainer.running.store(false, Ordering::SeqCst);
        tracing::info!(outcome = outcome.name(), ?outcome, "training finished");
    });
    Ok(())
}

/// One training: read the events, train and evaluate on a blocking thread,
/// gate, publish. Records the run in the store and in metrics.
async fn train(state: &AppState) -> Outcome {
    let id = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    if let Err(e) = state
        .store
        .start_training(&id, crate::http::now_ms(), &state.trainer.replica)
        .await
    {
        tracing::warn!(error = %e, "cannot record the training's start");
    }
    tracing::info!(training = %id, "training started");
    let outcome = match train_and_gate(state).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Failed { why: format!("{e:#}") },
    };
    let (version, reason) = match &outcome {
        Outcome::Published { version, why } | Outcome::Rejected { version, why } => {
            (Some(version.as_str()), why.as_str())
        }
        Outcome::Failed { why } => (None, why.as_str()),
    };
    if let Err(e) = state
        .store
        .finish_training(&id, crate::http::now_ms(), outcome.name(), Some(reason), version)
        .await
    {
        tracing::warn!(error = %e, "cannot record the training's end");
    }
    metrics::counter!("recd_training_runs_total", "outcome" => outcome.name()).increment(1);
    metrics::histogram!("recd_training_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Outcome::Failed { why } = &outcome {
        tracing::error!(training = %id, reason = %why, "training failed; the served model stays");
    }
    outcome
}

async fn train_and_gate(state: &AppState) -> anyhow::Result<Outcome> {
    let max_seq = state.store.max_event_seq().await?;
    let rows = state.store.training_events_upto(max_seq).await?;
    let categories = state.store.primary_categories().await?;
    let served = state.serving.model();
    let mut config = state.settings.train.clone();
    if served.is_none() {
        // The first model comes quickly (a fresh service answers personally
        // within a minute); later trainings take their full time.
        config.max_train_seconds = config.max_train_seconds.min(state.settings.first_training_seconds);
    }
    let gate = Gate {
        margin: state.settings.gate_margin,
        min_cases: state.settings.gate_min_cases,
    };
    let decided = tokio::task::spawn_blocking(move || -> anyhow::Result<(ModelSnapshot, Result<String, String>)> {
        let last_ts = last_event_times(&rows);
        let mut data = Dataset::from_events(rows);
        data.set_categories(&categories);
        let (mut snapshot, report) = model::train_and_evaluate(&data, &config, false)?;
        snapshot.meta.last_seq = max_seq;
        let verdict = gate.judge(&data, &last_ts, &snapshot, &report, served.as_deref(), &config);
        Ok((snapshot, verdict))
    })
    .await;
    let (snapshot, verdict) = match decided {
        Ok(result) => result?,
        Err(e) if e.is_panic() => anyhow::bail!("training panicked"),
        Err(e) => anyhow::bail!("training was cancelled: {e}"),
    };
    let version = snapshot.meta.version.clone();
    match verdict {
        Err(why) => {
            tracing::warn!(version, reason = %why, "candidate rejected; the served model stays");
            Ok(Outcome::Rejected { version, why })
        }
        Ok(why) => {
            let bytes = snapshot.to_bytes()?;
            state
                .store
                .save_snapshot(
                    &version,
                    crate::http::now_ms(),
                    &serde_json::to_string(&snapshot.meta)?,
                    &bytes,
                    crate::server::SNAPSHOTS_KEPT,
                )
                .await?;
            serve(state, snapshot);
            Ok(Outcome::Published { version, why })
        }
    }
}

/// Serves `snapshot` from now on, and warms the states of the most
/// recently active users for it in the background.
fn serve(state: &AppState, snapshot: ModelSnapshot) {
    record_model_metrics(&snapshot);
    state.serving.publish(snapshot);
    let Some(model) = state.serving.model() else {
        return;
    };
    let state = state.clone();
    tokio::spawn(async move {
        let info = state
            .serving
            .warm(&state.store, &model, state.settings.warm_users)
            .await;
        metrics::gauge!("recd_warmed_users").set(info.users as f64);
        match info.error {
            None => tracing::info!(
                version = info.version,
                users = info.users,
                seconds = info.seconds,
                "user states warmed"
            ),
            Some(error) => tracing::warn!(version = info.version, error, "warming user states failed"),
        }
    });
}

/// The model's held-out figures as gauges.
pub fn record_model_metrics(snapshot: &ModelSnapshot) {
    let m = &snapshot.meta.metrics;
    for (method, key) in [("model", "model"), ("popular", "popular"), ("item_knn", "item_knn")] {
        for metric in ["hr@10", "ndcg@10"] {
            if let Some(v) = m[key][metric].as_f64() {
                metrics::gauge!("recd_model_metric", "method" => method, "metric" => metric).set(v);
            }
        }
    }
}

/// Each user's last event time, from rows in time order.
fn last_event_times(rows: &[EventRow]) -> std::collections::HashMap<String, i64> {
    let mut last = std::collections::HashMap::new();
    for row in rows {
        last.insert(row.user_id.clone(), row.timestamp_ms);
    }
    last
}

/// DESIGN.md section 1: a candidate replaces the served model only when it
/// is not worse on events the served model has not seen; with too few of
/// those (or no served model) it must do at least as well as the baselines
/// on its own holdout.
#[derive(Debug, Clone, Copy)]
struct Gate {
    /// NDCG@10 the candidate must add over what it is compared with.
    margin: f64,
    /// Held-out cases newer than the served model needed to compare the two.
    min_cases: usize,
}

impl Gate {
    fn judge(
        &self,
        data: &Dataset,
        last_ts: &std::collections::HashMap<String, i64>,
        candidate: &ModelSnapshot,
        report: &EvalReport,
        served: Option<&ModelSnapshot>,
        config: &model::TrainConfig,
    ) -> Result<String, String> {
        let m = self.margin;
        if let Some(served) = served {
            let split = Split::leave_one_out(data);
            let newer: Vec<_> = split
                .test
                .iter()
                .copied()
                .filter(|c| last_ts.get(&data.user_ids[c.user as usize]).copied().unwrap_or(0) > served.meta.cutoff_ms)
                .collect();
            if newer.len() >= self.min_cases {
                let max_len = config.max_len;
                let cand = model::metrics::evaluate(data, &newer, config.seed, |history, scores| {
                    let state = candidate.user_state(history, max_len);
                    candidate.score_user(history, state.as_ref(), scores);
                });
                let to_served: Vec<Option<u32>> = std::iter::once(None)
                    .chain(data.item_ids.iter().map(|id| served.item_index(id)))
                    .collect();
                let old = model::metrics::evaluate(data, &newer, config.seed, |history, scores| {
                    let mapped: Vec<model::Step> = history
                        .iter()
                        .filter_map(|s| to_served[s.item as usize].map(|item| model::Step { item, kind: s.kind }))
                        .collect();
                    let mut theirs = Vec::new();
                    let state = served.user_state(&mapped, max_len);
                    served.score_user(&mapped, state.as_ref(), &mut theirs);
                    scores.clear();
                    scores.extend(
                        to_served
                            .iter()
                            .map(|i| i.map_or(f32::NEG_INFINITY, |i| theirs[i as usize])),
                    );
                });
                return if cand.ndcg >= old.ndcg + m {
                    Ok(format!(
                        "NDCG@10 {:.4} against the served model's {:.4} on {} users' newer events",
                        cand.ndcg,
                        old.ndcg,
                        newer.len()
                    ))
                } else {
                    Err(format!(
                        "NDCG@10 {:.4} does not reach the served model's {:.4} (+{m}) on {} users' newer events",
                        cand.ndcg,
                        old.ndcg,
                        newer.len()
                    ))
                };
            }
        }
        let model = report.model.ndcg;
        let mut baselines = vec![("most-popular", report.popular.ndcg)];
        if served.is_some() {
            baselines.push(("item-kNN", report.item_knn.ndcg));
        }
        let against = baselines
            .iter()
            .map(|(name, ndcg)| format!("{name} {ndcg:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        if baselines.iter().all(|(_, ndcg)| model >= ndcg + m) {
            Ok(format!("holdout NDCG@10 {model:.4} against {against}"))
        } else {
            Err(format!(
                "holdout NDCG@10 {model:.4} does not reach the baselines' (+{m}): {against}"
            ))
        }
    }
}
