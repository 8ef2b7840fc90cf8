//! The prepared store: a synthetic shop written as CSV files, imported with
//! `recd import` and trained on with `recd train` (capped), cached until its
//! inputs change.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use rand::{Rng, SeedableRng};

use crate::server::{output_text, recd_command, sqlite_url};
use crate::system::thousands;
use crate::Args;

const SEED: u64 = 15;
/// Items per category.
const PER_CATEGORY: usize = 40;

/// The store every scenario serves a copy of, and who is in it.
pub struct Prepared {
    pub db: PathBuf,
    pub users: Arc<Vec<String>>,
    pub items: Arc<Vec<String>>,
}

pub fn item_id(i: usize) -> String {
    format!("item{i:05}")
}

pub fn user_id(u: usize) -> String {
    format!("user{u:06}")
}

/// The store for `args`' shop under `cache`, made unless cached.
pub fn prepare(args: &Args, recd: &Path, cache: &Path) -> anyhow::Result<Prepared> {
    let (n, users, per_user) = (args.items, args.users, args.events_per_user);
    ensure!(
        n >= PER_CATEGORY && users > 0 && per_user >= 2,
        "the shop needs at least {PER_CATEGORY} items, a user and 2 events per user"
    );
    let dir = cache.join("store");
    let db = dir.join("bench.db");
    let key = format!(
        "items={n} users={users} events_per_user={per_user} seed={SEED} per_category={PER_CATEGORY} train_seconds={}",
        args.train_seconds
    );
    let ready = db.is_file() && std::fs::read_to_string(dir.join("ready")).is_ok_and(|k| k == key);
    if ready && !args.fresh {
        println!("store: cached {} (--fresh rebuilds it)", db.display());
    } else {
        println!("\n## preparing the store in {}", dir.display());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let started = Instant::now();
        let (items_csv, events_csv) = (dir.join("items.csv"), dir.join("events.csv"));
        write_shop(&items_csv, &events_csv, n, users, per_user)?;
        let url = sqlite_url(&db);
        let import = recd_command(recd, &url)
            .arg("import")
            .arg("--items")
            .arg(&items_csv)
            .arg("--events")
            .arg(&events_csv)
            .output()?;
        ensure!(import.status.success(), "recd import failed:\n{}", output_text(&import));
        print!("{}", String::from_utf8_lossy(&import.stdout));
        let train = recd_command(recd, &url)
            .arg("train")
            .env("RECD_TRAIN__MAX_TRAIN_SECONDS", args.train_seconds.to_string())
            .output()?;
        ensure!(train.status.success(), "recd train failed:\n{}", output_text(&train));
        print!("{}", String::from_utf8_lossy(&train.stdout));
        std::fs::remove_file(&items_csv)?;
        std::fs::remove_file(&events_csv)?;
        println!("prepared in {:.0} s", started.elapsed().as_secs_f64());
        std::fs::write(dir.join("ready"), &key)?;
    }
    println!(
        "shop: {} items in {} categories, {} users with {} events each",
        thousands(n as f64),
        n.div_ceil(PER_CATEGORY),
        thousands(users as f64),
        per_user
    );
    Ok(Prepared {
        db,
        users: Arc::new((0..users).map(user_id).collect()),
        items: Arc::new((0..n).map(item_id).collect()),
    })
}

/// The catalogue (item i in category i / PER_CATEGORY) and each shopper's
/// events: a walk through two favourite categories, mostly views, now and
/// then a click, a cart or a purchase, a minute apart over the last days.
fn write_shop(items: &Path, events: &Path, n: usize, users: usize, per_user: usize) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(items)?);
    writeln!(file, "item_id,title,category")?;
    for i in 0..n {
        writeln!(file, "{},Item {i},cat{:03}", item_id(i), i / PER_CATEGORY)?;
    }
    file.flush()?;

    let categories = n.div_ceil(PER_CATEGORY);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut file = std::io::BufWriter::new(std::fs::File::create(events)?);
    writeln!(file, "user_id,item_id,type,value,timestamp")?;
    let now = chrono::Utc::now();
    for u in 0..users {
        // Popular categories more often: the square skews toward the first.
        let favourites: Vec<usize> = (0..2)
            .map(|_| ((rng.gen::<f64>().powi(2)) * categories as f64) as usize)
            .collect();
        let start = now - chrono::Duration::minutes((per_user as i64 + 1) * 2 + (u as i64 % 10_000));
        let mut item = favourites[0] * PER_CATEGORY + rng.gen_range(0..PER_CATEGORY);
        for j in 0..per_user {
            // Mostly the next item of the same category; sometimes a jump.
            if rng.gen_bool(0.3) {
                let c = favourites[rng.gen_range(0..2)];
                item = c * PER_CATEGORY + rng.gen_range(0..PER_CATEGORY);
            } else {
                let c = item / PER_CATEGORY;
                item = c * PER_CATEGORY + (item % PER_CATEGORY + 1) % PER_CATEGORY;
            }
            let item = item.min(n - 1);
            let (kind, value) = match rng.gen_range(0..20) {
                0 => ("purchase", "19.99"),
                1 | 2 => ("add_to_cart", ""),
                3..=5 => ("click", ""),
                _ => ("view", ""),
            };
            let ts = start + chrono::Duration::minutes(2 * j as i64);
            writeln!(
                file,
                "{},{},{kind},{value},{}",
                user_id(u),
                item_id(item),
                ts.format("%Y-%m-%dT%H:%M:%SZ")
            )?;
        }
    }
    file.flush()?;
    Ok(())
}
