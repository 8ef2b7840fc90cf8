//! The commands that run recd: `recd serve` (open the store, waiting for
//! it; seed the demo if asked; open the app; bind; serve until SIGTERM or
//! ctrl-c), `recd train` and `recd eval`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::app::App;
use crate::clock::now_ms;
use crate::config::Settings;
use crate::store::{Store, StoreOptions};

pub fn store_options(settings: &Settings) -> StoreOptions {
    StoreOptions {
        max_connections: settings.database_max_connections,
        acquire_timeout: settings.database_acquire_timeout,
        // A write may wait its turn as long as its request may take.
        write_timeout: settings.request_timeout,
        id_key: settings.id_key.clone(),
    }
}

/// Opens the store, retrying while it does not answer: the port is bound
/// only once it does.
pub async fn open_store_waiting(settings: &Settings) -> anyhow::Result<Store> {
    let mut delay = Duration::from_millis(250);
    loop {
        match Store::open(settings.database_url.expose(), &store_options(settings)).await {
            Ok(store) => return Ok(store),
            Err(crate::store::StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, url = %settings.database_url, "store not reachable yet; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open the store at {}", settings.database_url)),
        }
    }
}

/// Without API keys, anyone who can reach the port can read and write: only
/// a loopback address is allowed then.
pub fn check_listen_address(settings: &Settings) -> anyhow::Result<()> {
    if settings.api_keys.is_empty() && !settings.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without API keys: set RECD_API_KEYS (scope:key,...) or listen on a loopback address",
            settings.listen
        );
    }
    Ok(())
}

/// One demo item in this many is seeded without categories (item-29,
/// item-59, ...).
const UNCATEGORISED: usize = 30;

/// Seeds an empty store with the demo shop.
pub async fn seed_demo(store: &Store) -> anyhow::Result<()> {
    if store.count_events().await? > 0 {
        tracing::info!("the store has events already; not seeding the demo");
        return Ok(());
    }
    let now = now_ms();
    let mut shop = crate::demo::generate(crate::demo::DemoSize::default(), now);
    // Some items come without categories, as in many a shop's feed: the
    // model suggests theirs from how they are shopped.
    for item in shop.items.iter_mut().skip(UNCATEGORISED - 1).step_by(UNCATEGORISED) {
        item.categories.clear();
    }
    store.put_items(&shop.items, now).await?;
    for chunk in shop.events.chunks(1000) {
        store.insert_events(chunk, now).await?;
    }
    tracing::info!(
        items = shop.items.len(),
        events = shop.events.len(),
        "seeded the demo shop"
    );
    Ok(())
}

pub async fn run(settings: Settings, demo: bool) -> anyhow::Result<()> {
    check_listen_address(&settings)?;
    raise_open_file_limit();
    // The metrics recorder before anything counts: the snapshot and index
    // loaded at start (`recd_snapshot_loads_total`, `recd_ann_loads_total`)
    // are counted before the router, which would otherwise install it.
    crate::telemetry::metrics_handle();
    tracing::info!(settings = ?settings, "starting recd");
    let store = open_store_waiting(&settings).await?;
    if demo {
        seed_demo(&store).await?;
    }
    // The last snapshot is served from the first request on.
    let app = App::open(store.clone(), settings).await?;
    if demo && app.serving.model().is_none() {
        // The demo answers personally within a minute, whatever the interval.
        let _ = crate::trainer::start_training(&app, crate::trainer::TrainFrom::Scratch).await;
    }
    if demo {
        tokio::spawn(crate::demo::storefront::run(app.clone()));
    }
    let listener = listen(app.settings.listen).with_context(|| format!("cannot listen on {}", app.settings.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        store = store.kind(),
        model = app.serving.version().as_deref().unwrap_or("none yet"),
        "listening"
    );
    serve(listener, app, shutdown_signal()).await?;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Connections the kernel holds for recd before it accepts them. Tokio's
/// `bind` asks for 128, which a burst of a few thousand connects overflows
/// (the kernel then drops handshakes); the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `recd eval`: train on a CSV's leave-one-out split and print the figures;
/// with `replay`, replay it in time order (see [`crate::trainer::replay`]).
pub fn eval(settings: &Settings, events: &Path, items: Option<&Path>, json: bool, replay: bool) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let spinner = if progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    spinner.set_message(format!("loading {}", events.display()));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let rows = crate::model::load_events_csv(events)?;
    let categories = match items {
        Some(items) => crate::model::data::load_item_categories_csv(items)?,
        None => HashMap::new(),
    };
    spinner.finish_and_clear();
    tracing::info!(items_with_category = categories.len(), "events and catalogue read");
    if replay {
        let report = crate::trainer::replay(rows, &categories, &settings.train, progress)?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.table());
        }
        return Ok(());
    }
    let report = crate::model::evaluate_events(rows, &categories, &settings.train, progress)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// `recd eval --categories`: the suggested categories against the most
/// common category, on items whose categories are hidden before training.
pub fn eval_categories(settings: &Settings, events: &Path, items: &Path, json: bool) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let rows = crate::model::load_events_csv(events)?;
    let categories = crate::model::data::load_item_categories_csv(items)?;
    tracing::info!(items_with_category = categories.len(), "events and catalogue read");
    let report = crate::model::suggest::evaluate_categories(rows, &categories, &settings.train, progress)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// `recd eval --churn`: churn prediction on a time split of a CSV's events:
/// the classifier against the formula and recency alone.
pub fn eval_churn(settings: &Settings, events: &Path, json: bool) -> anyhow::Result<()> {
    let histories = crate::churn::load_histories_csv(events)?;
    tracing::info!(users = histories.len(), "events read");
    let report = crate::churn::evaluate(&histories, settings.train.churn_horizon_days).ok_or_else(|| {
        anyhow::anyhow!(
            "too little history for churn prediction: at least {} users at each cutoff, some who came back and some who did not",
            crate::churn::MIN_USERS
        )
    })?;
    if json {
        println!("{}", serde_json::to_string(&crate::churn::ChurnFigures::from(&report))?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// `recd train`: train once on the store's events and save the snapshot.
pub async fn train_once(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store_waiting(settings).await?;
    let config = settings.train.clone();
    let input = crate::trainer::read_training_data(&store, &config, None).await?;
    let progress = std::io::stderr().is_terminal();
    let ann = settings.ann;
    let (candidate, index) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let candidate = crate::trainer::train_candidate(input, &config, progress, None)?;
        let index = crate::trainer::build_index(&candidate.snapshot, &ann)?;
        Ok((candidate, index))
    })
    .await??;
    let bytes = crate::trainer::save_snapshot(&store, &candidate.snapshot, index.as_ref()).await?;
    println!("{}", candidate.report.table());
    println!("saved snapshot {} ({bytes} bytes)", candidate.snapshot.meta.version);
    store.close().await;
    Ok(())
}

/// `recd rotate-id-key`: rewrites the store's shopper ids from the current
/// `id_key` (or from clear ids) to `new_key` (hex), or to clear ids with
/// `decrypt`; with neither, a store in clear is encrypted with `id_key`.
pub async fn rotate_id_key(settings: &Settings, new_key: Option<&str>, decrypt: bool) -> anyhow::Result<()> {
    use crate::store::IdKey;
    let new_key = match (new_key, decrypt) {
        (Some(_), true) => anyhow::bail!("give either --new-key or --decrypt"),
        (Some(hex), false) => Some(IdKey::parse(hex).map_err(|e| anyhow::anyhow!("--new-key: {e}"))?),
        (None, true) => None,
        // Encrypting a store in clear with the key it is to be run with.
        (None, false) => match &settings.id_key {
            Some(key) => Some(key.clone()),
            None => anyhow::bail!(
                "give the new key with --new-key (or RECD_NEW_ID_KEY), or --decrypt to store the ids in clear"
            ),
        },
    };
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("rewriting ids [{bar:40}] {pos}/{len} events ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    // One connection: every other recd session on the database is then
    // another process's, which the rotation waits for or refuses.
    let options = StoreOptions {
        max_connections: 1,
        ..store_options(settings)
    };
    let done = Store::rotate_id_key(settings.database_url.expose(), &options, new_key.as_ref(), &progress)
        .await
        .with_context(|| format!("cannot rotate the id key of the store at {}", settings.database_url))?;
    bar.finish_and_clear();
    let state = |encrypted: bool| if encrypted { "encrypted" } else { "in clear" };
    if done.changed {
        println!(
            "rewrote the ids of {} events and {} recent event ids: {} before, {} now; start every replica {}",
            done.events,
            done.recent_event_ids,
            state(done.was_encrypted),
            state(done.encrypted),
            if done.encrypted {
                "with the new id_key"
            } else {
                "without id_key"
            }
        );
    } else {
        println!(
            "nothing to do: the store's shopper ids are {} already",
            state(done.encrypted)
        );
    }
    Ok(())
}

/// Serves the API of `app` on `listener` until `shutdown` resolves, then
/// lets in-flight requests finish for at most `shutdown_grace`. The app's
/// background tasks run meanwhile and are stopped after.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = app.settings.shutdown_grace;
    let header_read_timeout = app.settings.header_read_timeout;
    app.start();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut server = std::pin::pin!(crate::http::conn::serve(
        listener,
        crate::http::router(app.clone()),
        header_read_timeout,
        rx,
    ));
    tokio::select! {
        () = &mut server => {}
        () = shutdown => {
            let _ = tx.send(true);
            if tokio::time::timeout(grace, server).await.is_err() {
                tracing::warn!("shutdown deadline passed; dropping unfinished requests");
            }
        }
    }
    app.stop().await;
    Ok(())
}

/// Each connection holds a descriptor: the soft limit (often 1,024) goes up
/// to the hard one, so that thousands of clients do not exhaust it.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Waits for SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
