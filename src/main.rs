//! The `recd` command line: serve | train | eval | import | migrate |
//! rotate-id-key.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use recd::config::Settings;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "recd", version, about = "An online recommendation service for web shops")]
struct Cli {
    /// A settings file layered over config/default.toml (RECD_* variables win).
    #[arg(long, global = true, env = "RECD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Seed an empty store with a generated demo shop.
        #[arg(long)]
        demo: bool,
    },
    /// Import events (and items) from CSV files into the store.
    Import {
        /// events.csv: user_id,item_id,type,value,timestamp
        #[arg(long)]
        events: Option<PathBuf>,
        /// items.csv: item_id,title,category,categories
        #[arg(long)]
        items: Option<PathBuf>,
    },
    /// Create the store if needed and apply the migrations.
    Migrate,
    /// Train once on every event in the store and save the snapshot there.
    Train,
    /// Rewrite every stored shopper id (user and session ids) from the
    /// current `id_key` (or clear ids) to a new key (or, with --decrypt, to
    /// clear ids), in place and in one transaction; stop every replica
    /// first. On a store with clear ids and `id_key` set, encrypts them
    /// with `id_key`.
    RotateIdKey {
        /// The new key: 64 hex digits. Prefer the environment variable, so
        /// that it does not show in the process list.
        #[arg(long, env = "RECD_NEW_ID_KEY", hide_env_values = true, conflicts_with = "decrypt")]
        new_key: Option<String>,
        /// Store the ids in clear again.
        #[arg(long)]
        decrypt: bool,
    },
    /// Train on a CSV of events and print the held-out figures of the model
    /// and of the popular and item-kNN baselines.
    Eval {
        /// events.csv: user_id,item_id,type,value,timestamp
        #[arg(long, required_unless_present_any = ["categories", "churn"])]
        events: Option<PathBuf>,
        /// items.csv: each item's first category is an input of the model.
        #[arg(long)]
        items: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Replay the events in time order: train on the oldest 80% from
        /// scratch, continue on four increments of 5%, and set the result
        /// against a training from scratch on all of them.
        #[arg(long, conflicts_with = "categories")]
        replay: bool,
        /// Measure the categories suggested from behaviour instead: hide
        /// the categories of a seeded 20% of the labelled items, train on
        /// the rest, and print the top-1 accuracy of the suggestions against
        /// the most common category. DIR holds events.csv and items.csv
        /// (--events and --items name other files).
        #[arg(long, value_name = "DIR")]
        categories: Option<PathBuf>,
        /// Measure churn prediction instead: on a time split of the FILE's
        /// events (an events.csv), the ROC AUC and PR AUC of the classifier
        /// a training fits, of the churn formula and of recency alone.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["categories", "replay", "events"])]
        churn: Option<PathBuf>,
        /// The seed of everything random in the run (initial weights,
        /// sampling, the test users): `train.seed` for this run only.
        #[arg(long, value_name = "N")]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // candle's worker pool spins 25,000 times before parking; on a small
    // machine the spinning takes the core the request path or the training
    // loop's own threads need. Runs before any other thread exists.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    recd::telemetry::init_logging(settings.log_format);
    // Evaluation is CPU work from a file, with no store and no runtime.
    if let Command::Eval {
        events,
        items,
        json,
        replay,
        categories,
        churn,
        seed,
    } = &cli.command
    {
        if let Some(seed) = seed {
            settings.train.seed = *seed;
        }
        if let Some(file) = churn {
            return recd::server::eval_churn(&settings, file, *json);
        }
        if let Some(dir) = categories {
            let events = events.clone().unwrap_or_else(|| dir.join("events.csv"));
            let items = items.clone().unwrap_or_else(|| dir.join("items.csv"));
            return recd::server::eval_categories(&settings, &events, &items, *json);
        }
        let events = events.as_deref().expect("clap requires --events");
        return recd::server::eval(&settings, events, items.as_deref(), *json, *replay);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { demo } => recd::server::run(settings, demo).await,
            Command::Import { events, items } => {
                anyhow::ensure!(
                    events.is_some() || items.is_some(),
                    "give --events FILE and/or --items FILE"
                );
                let store = recd::server::open_store_waiting(&settings).await?;
                if let Some(path) = items {
                    let report = recd::import::import_items(&store, &path).await?;
                    println!("items: {}", serde_json::to_string(&report)?);
                }
                if let Some(path) = events {
                    let report = recd::import::import_events(&store, &path).await?;
                    println!("events: {}", serde_json::to_string(&report)?);
                }
                store.close().await;
                Ok(())
            }
            Command::Train => recd::server::train_once(&settings).await,
            Command::RotateIdKey { new_key, decrypt } => {
                recd::server::rotate_id_key(&settings, new_key.as_deref(), decrypt).await
            }
            Command::Eval { .. } => Ok(()),
            Command::Migrate => {
                let store = recd::server::open_store_waiting(&settings).await?;
                store.close().await;
                tracing::info!(store = %settings.database_url, "migrated");
                Ok(())
            }
        }
    });
    // A training (or an index build) still running on a blocking thread
    // when the service has stopped does not hold the process: what it would
    // have published is dropped, and the next start trains again.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
