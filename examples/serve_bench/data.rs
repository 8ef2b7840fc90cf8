//! The scenarios' stores: the beauty events imported and trained on with
//! `recd`, or a synthetic catalogue, its shoppers' views and a seeded
//! snapshot written with the library; each cached until its inputs change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use rand::{Rng, SeedableRng};
use recd::domain::{EventType, Item, NewEvent};
use recd::model::data::Step;
use recd::model::knn::Neighbours;
use recd::model::{ModelSnapshot, SnapshotMeta};
use recd::store::{Store, StoreOptions};

use crate::network::{synthetic_weights, Layout};
use crate::server::{output_text, recd_command, sqlite_url};
use crate::system::thousands;
use crate::Args;

/// A store ready to serve, and who is in it.
pub struct Prepared {
    pub name: String,
    /// The cached SQLite file; each run serves a copy of it.
    pub db: PathBuf,
    pub users: Arc<Vec<String>>,
    pub items: usize,
    pub events: usize,
}

/// The beauty store: `recd import` then a time-capped `recd train`, cached
/// while the events file is the same.
pub fn prepare_beauty(args: &Args, recd: &Path, data: &Path, cache: &Path) -> anyhow::Result<Prepared> {
    let events = data.join("amazon-beauty/events.csv");
    ensure!(
        events.is_file(),
        "no {} (give --data DIR: the folder holding amazon-beauty/)",
        events.display()
    );
    let events = events.canonicalize()?;
    let dir = cache.join("beauty");
    let db = dir.join("bench.db");
    let key = format!(
        "events={} bytes={} train_seconds=60",
        events.display(),
        std::fs::metadata(&events)?.len()
    );
    let (users, items, count) = csv_users_items(&events)?;
    if args.fresh || !is_ready(&dir, &key) {
        println!(
            "\n## preparing beauty in {} (import, then training capped at 60 s)",
            dir.display()
        );
        reset_dir(&dir)?;
        let url = sqlite_url(&db);
        let started = Instant::now();
        let import = recd_command(recd, &url)
            .arg("import")
            .arg("--events")
            .arg(&events)
            .output()?;
        ensure!(import.status.success(), "recd import failed:\n{}", output_text(&import));
        print!("{}", String::from_utf8_lossy(&import.stdout));
        let train = recd_command(recd, &url)
            .arg("train")
            .env("RECD_TRAIN__MAX_TRAIN_SECONDS", "60")
            .output()?;
        ensure!(train.status.success(), "recd train failed:\n{}", output_text(&train));
        print!("{}", String::from_utf8_lossy(&train.stdout));
        println!("prepared in {:.0} s", started.elapsed().as_secs_f64());
        mark_ready(&dir, &key)?;
    } else {
        println!("\n## beauty: cached store {} (--fresh rebuilds it)", db.display());
    }
    Ok(Prepared {
        name: "amazon-beauty".to_owned(),
        db,
        users: Arc::new(users),
        items,
        events: count,
    })
}

/// Distinct users (in file order), distinct items and rows of an events CSV.
fn csv_users_items(path: &Path) -> anyhow::Result<(Vec<String>, usize, usize)> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut users, mut seen, mut items, mut rows) = (Vec::new(), HashSet::new(), HashSet::new(), 0);
    for record in reader.records() {
        let record = record?;
        let (user, item) = (
            record.get(0).context("no user_id")?,
            record.get(1).context("no item_id")?,
        );
        if seen.insert(user.to_owned()) {
            users.push(user.to_owned());
        }
        items.insert(item.to_owned());
        rows += 1;
    }
    Ok((users, items.len(), rows))
}

/// A synthetic store: `items` catalogue items, `synthetic_users` users with
/// `events_per_user` views each, and a seeded network snapshot of the served
/// shape (dim 64, hidden 64). Exact scoring costs the same whatever the
/// weights; a nearest-neighbour search does not, hence `--weights`.
pub async fn prepare_synthetic(args: &Args, cache: &Path) -> anyhow::Result<Prepared> {
    const SEED: u64 = 7;
    let (n, users, per_user) = (args.items, args.synthetic_users, args.events_per_user);
    ensure!(
        n > 0 && users > 0 && per_user > 0,
        "the synthetic store needs items, users and events"
    );
    let (layout, categories) = (args.weights, args.categories.clamp(1, n));
    let dir = cache.join(format!("synthetic-{n}-{layout:?}").to_lowercase());
    let db = dir.join("bench.db");
    let key = format!(
        "items={n} users={users} events_per_user={per_user} seed={SEED} dim=64 hidden=64 meta=2 catalogue=spaced \
         weights={layout:?} categories={categories}"
    );
    let user_ids: Vec<String> = (0..users).map(|u| format!("user{u:06}")).collect();
    if !args.fresh && is_ready(&dir, &key) {
        println!(
            "\n## synthetic {n} items: cached store {} (--fresh rebuilds it)",
            db.display()
        );
    } else {
        println!("\n## preparing synthetic {n} items in {}", dir.display());
        reset_dir(&dir)?;
        let started = Instant::now();
        let store = Store::open(&sqlite_url(&db), &StoreOptions::default()).await?;
        let item_ids: Vec<String> = (1..=n).map(|i| format!("item{i:07}")).collect();
        let now = chrono::Utc::now().timestamp_millis();

        // The whole catalogue, so that every snapshot item exists, written
        // as a shop's grows: in batches some time apart. (Stamped all at
        // once, every replica's catalogue refresh would read the whole
        // catalogue again every poll: it rereads the 10 s before the newest
        // change.)
        let batches = n.div_ceil(1000) as i64;
        for (k, chunk) in item_ids.chunks(1000).enumerate() {
            let stamp = now - (batches - k as i64) * 11_000;
            let items: Vec<Item> = chunk
                .iter()
                .map(|id| Item {
                    item_id: id.clone(),
                    title: None,
                    categories: Vec::new(),
                    price: None,
                    available: true,
                    attributes: serde_json::Map::new(),
                })
                .collect();
            store.put_items(&items, stamp).await?;
        }
        println!("  catalogue: {n} items ({:.0} s)", started.elapsed().as_secs_f64());

        // Views one minute apart over the last days, items skewed towards
        // the head of the catalogue as shop traffic is; with clustered
        // weights, item i is in category (i - 1) % categories and each
        // shopper browses within three categories.
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
        let per_category = n.div_ceil(categories);
        let skewed = |rng: &mut rand::rngs::StdRng, len: usize| {
            let r: f64 = rng.gen();
            ((r * r * r * len as f64) as usize).min(len - 1)
        };
        let base = now - (per_user as i64 + 1) * 60_000 - users as i64;
        let mut sequences: Vec<Vec<Step>> = Vec::with_capacity(users);
        let mut popularity = vec![0f32; n + 1];
        let mut newest = 0i64;
        let mut batch = Vec::with_capacity(10_000);
        for (u, user) in user_ids.iter().enumerate() {
            let mut seq = Vec::with_capacity(per_user);
            let browsed: Vec<usize> = (0..3).map(|_| skewed(&mut rng, categories)).collect();
            for j in 0..per_user {
                let index = match layout {
                    Layout::Random => skewed(&mut rng, n) + 1,
                    Layout::Aligned | Layout::Clustered => {
                        let c = browsed[rng.gen_range(0..browsed.len())];
                        (c + categories * skewed(&mut rng, per_category)).min(n - 1) + 1
                    }
                };
                let ts = base + j as i64 * 60_000 + u as i64;
                newest = newest.max(ts);
                popularity[index] += 1.0;
                seq.push(Step {
                    item: index as u32,
                    kind: 0,
                });
                batch.push(NewEvent {
                    event_id: None,
                    user_id: user.clone(),
                    item_id: item_ids[index - 1].clone(),
                    kind: EventType::View,
                    value: None,
                    ts,
                    timestamped: true,
                    session_id: None,
                    recommendation_id: None,
                });
            }
            sequences.push(seq);
            if batch.len() >= 10_000 {
                store.insert_events(&batch, now).await?;
                batch.clear();
            }
        }
        store.insert_events(&batch, now).await?;
        println!(
            "  events: {} ({:.0} s)",
            users * per_user,
            started.elapsed().as_secs_f64()
        );

        let neighbours = Neighbours::build(n, sequences.iter().map(Vec::as_slice), 100);
        let weights = synthetic_weights(n, layout, categories, &mut rng);
        let meta = SnapshotMeta {
            version: chrono::Utc::now().format("%Y%m%d%H%M%S%3f").to_string(),
            trained_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            cutoff_ms: newest,
            events: (users * per_user) as u64,
            users: users as u64,
            items: n as u64,
            metrics: Default::default(),
            knn_weight: 0.0,
            kind: recd::model::snapshot::SnapshotKind::Network,
            last_seq: store.max_event_seq().await?,
            scratch_at_ms: 0,
            continued_from: None,
            churn: None,
        };
        let snapshot = ModelSnapshot::new(meta, item_ids, Some(weights), popularity, neighbours);
        let version = snapshot.meta.version.clone();
        // The index the trainer would store with it (the default [ann]
        // settings, which the server runs with), so that no start builds one.
        let index = recd::trainer::build_index(&snapshot, &recd::model::ann::AnnSettings::default())?;
        let bytes = recd::trainer::save_snapshot(&store, &snapshot, index.as_ref()).await?;
        drop((snapshot, index));
        store.close().await;
        println!(
            "  snapshot {version} with its index: {:.0} MB; prepared in {:.0} s",
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        mark_ready(&dir, &key)?;
    }
    Ok(Prepared {
        name: format!("synthetic {}", thousands(n as f64)),
        db,
        users: Arc::new(user_ids),
        items: n,
        events: users * per_user,
    })
}

fn is_ready(dir: &Path, key: &str) -> bool {
    dir.join("bench.db").is_file() && std::fs::read_to_string(dir.join("ready")).is_ok_and(|k| k == key)
}

fn mark_ready(dir: &Path, key: &str) -> anyhow::Result<()> {
    Ok(std::fs::write(dir.join("ready"), key)?)
}

fn reset_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(std::fs::create_dir_all(dir)?)
}
