//! The model on small shops made here: a planted sequential pattern that
//! the network must learn and most-popular cannot, determinism under a seed,
//! the snapshot round trip, and data too small to train.

use std::collections::HashMap;

use recd::model::data::Step;
use recd::model::{top_n, train_and_evaluate, Dataset, EventRow, ModelSnapshot, TrainConfig};

/// Items: `pat-{k}-a`, `-b`, `-c`, `-d` for k < PATTERNS, and fillers.
/// Every shopper, a few times over, browses fillers, then either views a then
/// b and goes on to c, or views b then a and goes on to d. Fillers are far more popular than
/// any c or d, so most-popular never ranks the right one first.
const PATTERNS: usize = 6;
const FILLERS: usize = 30;

fn planted_shop(users: usize, seed: u64) -> Vec<EventRow> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for u in 0..users {
        let user = format!("u{u}");
        let mut ts = 1_700_000_000_000i64 + u as i64;
        let mut push = |item: String, ts: &mut i64| {
            *ts += 60_000;
            rows.push(EventRow {
                user_id: user.clone(),
                item_id: item,
                kind: 0,
                timestamp_ms: *ts,
            });
        };
        // Two or three rounds, so that the last (held out) round's pattern
        // is seen whole in other rounds' training data.
        for _ in 0..rng.gen_range(2..4) {
            for _ in 0..rng.gen_range(1..4) {
                push(format!("filler-{}", rng.gen_range(0..FILLERS)), &mut ts);
            }
            let k = rng.gen_range(0..PATTERNS);
            let order = if rng.gen_bool(0.5) {
                ["a", "b", "c"]
            } else {
                ["b", "a", "d"]
            };
            for s in order {
                push(format!("pat-{k}-{s}"), &mut ts);
            }
        }
    }
    rows
}

/// The rows as the events CSV that `recd import` and `recd eval` read.
fn write_events_csv(dir: &std::path::Path, rows: &[EventRow]) -> std::path::PathBuf {
    let path = dir.join("events.csv");
    let mut csv = String::from("user_id,item_id,type,value,timestamp\n");
    for row in rows {
        let ts = recd::clock::format_timestamp(row.timestamp_ms);
        csv.push_str(&format!("{},{},view,,{ts}\n", row.user_id, row.item_id));
    }
    std::fs::write(&path, csv).unwrap();
    path
}

fn small_config() -> TrainConfig {
    TrainConfig {
        dim: 16,
        hidden: 16,
        batch_size: 32,
        max_epochs: 40,
        patience: 40,
        learning_rate: 0.01,
        embedding_dropout: 0.0,
        hidden_dropout: 0.0,
        ..TrainConfig::default()
    }
}

fn steps(snapshot: &ModelSnapshot, ids: &[String]) -> Vec<Step> {
    ids.iter()
        .map(|id| Step {
            item: snapshot.item_index(id).expect("known item"),
            kind: 0,
        })
        .collect()
}

/// The network's own best item (co-occurrence left out) after a history.
fn network_top(snapshot: &ModelSnapshot, history: &[Step]) -> String {
    let w = snapshot.weights.as_ref().expect("a trained network");
    let state = snapshot.user_state(history, 50).expect("state");
    let mut scores = vec![0.0; snapshot.items() + 1];
    w.score_into(&w.query(&state), &mut scores);
    let seen: Vec<u32> = history.iter().map(|s| s.item).collect();
    let best = top_n(&scores, 1, |i| seen.contains(&i));
    snapshot.item_id(best[0].0).to_owned()
}

#[test]
fn the_network_learns_a_planted_order_that_popular_cannot() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let data = Dataset::from_events(planted_shop(600, 1));
    let (snapshot, report) = train_and_evaluate(&data, &small_config(), false).expect("trains");
    eprintln!("{}", report.table());
    for k in 0..PATTERNS {
        let a_then_b = steps(
            &snapshot,
            &["filler-1".to_owned(), format!("pat-{k}-a"), format!("pat-{k}-b")],
        );
        assert_eq!(network_top(&snapshot, &a_then_b), format!("pat-{k}-c"), "after a, b");
        let b_then_a = steps(
            &snapshot,
            &["filler-2".to_owned(), format!("pat-{k}-b"), format!("pat-{k}-a")],
        );
        assert_eq!(network_top(&snapshot, &b_then_a), format!("pat-{k}-d"), "after b, a");
    }
    // On the held-out last events, the model is right far more often than
    // most-popular, which ranks fillers first.
    assert!(report.model.hr > 0.8, "model HR@10 {report:?}");
    assert!(report.model.ndcg > report.popular.ndcg + 0.3, "{report:?}");
    assert_eq!(report.data.users, 600);
    assert_eq!(report.data.test_users, 600);
}

/// Category pairs: shoppers who view any item of `src-k` (150 items, each
/// seen once or twice) go on to one of `dst-k`'s 8 items. For every k, one
/// more `src-k` item is only ever a held-out last event, so the network
/// never sees it as input: only its category can say where it leads.
fn category_shop(users: usize, seed: u64) -> (Vec<EventRow>, HashMap<String, String>) {
    use rand::{Rng, SeedableRng};
    const PAIRS: usize = 6;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut categories = HashMap::new();
    for k in 0..PAIRS {
        for j in 0..150 {
            categories.insert(format!("s{k}-{j}"), format!("src-{k}"));
        }
        categories.insert(format!("s{k}-fresh"), format!("src-{k}"));
        for j in 0..8 {
            categories.insert(format!("d{k}-{j}"), format!("dst-{k}"));
        }
    }
    let mut push = |user: &str, item: String, ts: &mut i64| {
        *ts += 60_000;
        rows.push(EventRow {
            user_id: user.to_owned(),
            item_id: item,
            kind: 0,
            timestamp_ms: *ts,
        });
    };
    for u in 0..users {
        let user = format!("u{u}");
        let mut ts = 1_700_000_000_000i64 + u as i64;
        for _ in 0..rng.gen_range(2..4) {
            push(&user, format!("filler-{}", rng.gen_range(0..FILLERS)), &mut ts);
            let k = rng.gen_range(0..PAIRS);
            push(&user, format!("s{k}-{}", rng.gen_range(0..150)), &mut ts);
            push(&user, format!("d{k}-{}", rng.gen_range(0..8)), &mut ts);
        }
    }
    for k in 0..PAIRS {
        let user = format!("fresh-{k}");
        let mut ts = 1_800_000_000_000i64;
        for f in 0..3 {
            push(&user, format!("filler-{f}"), &mut ts);
        }
        push(&user, format!("s{k}-fresh"), &mut ts);
    }
    (rows, categories)
}

#[test]
fn categories_carry_an_item_the_network_never_saw_as_input() {
    let (rows, categories) = category_shop(500, 5);
    let mut data = Dataset::from_events(rows);
    data.set_categories(&categories);
    assert_eq!(data.categories, 12);
    // How many of dst-k's items the network ranks in its top 10 after
    // a history of only `s{k}-fresh`, summed over k, and the fewest for one k.
    let after_fresh = |config: &TrainConfig| {
        let (snapshot, _) = train_and_evaluate(&data, config, false).expect("trains");
        let w = snapshot.weights.as_ref().expect("a trained network");
        let mut per_pair = Vec::new();
        for k in 0..6 {
            let history = steps(&snapshot, &[format!("s{k}-fresh")]);
            let state = snapshot.user_state(&history, 50).expect("state");
            let mut scores = vec![0.0; snapshot.items() + 1];
            w.score_into(&w.query(&state), &mut scores);
            let top = top_n(&scores, 10, |i| i == history[0].item);
            let dst = top
                .iter()
                .filter(|(i, _)| snapshot.item_id(*i).starts_with(&format!("d{k}-")))
                .count();
            per_pair.push(dst);
        }
        per_pair
    };
    let with = after_fresh(&small_config());
    let without = after_fresh(&TrainConfig {
        categories: false,
        ..small_config()
    });
    eprintln!("dst-k items in the top 10 after s{{k}}-fresh: with categories {with:?}, without {without:?}");
    assert!(with.iter().all(|&n| n >= 6), "with categories: {with:?}");
    assert!(
        with.iter().sum::<usize>() > 2 * without.iter().sum::<usize>(),
        "with {with:?} against without {without:?}"
    );
}

#[test]
fn a_seed_fixes_the_model() {
    let data = Dataset::from_events(planted_shop(200, 2));
    let config = TrainConfig {
        max_epochs: 3,
        ..small_config()
    };
    let (a, ra) = train_and_evaluate(&data, &config, false).unwrap();
    let (b, rb) = train_and_evaluate(&data, &config, false).unwrap();
    assert_eq!(a.weights, b.weights);
    assert_eq!((ra.model, ra.epochs), (rb.model, rb.epochs));
    let other = TrainConfig { seed: 7, ..config };
    let (c, _) = train_and_evaluate(&data, &other, false).unwrap();
    assert_ne!(a.weights, c.weights);
}

#[test]
fn a_snapshot_scores_the_same_after_a_round_trip() {
    let data = Dataset::from_events(planted_shop(200, 3));
    let config = TrainConfig {
        max_epochs: 2,
        ..small_config()
    };
    let (snapshot, _) = train_and_evaluate(&data, &config, false).unwrap();
    let bytes = snapshot.to_bytes().unwrap();
    let loaded = ModelSnapshot::from_bytes(&bytes).unwrap();
    assert_eq!(loaded.meta.version, snapshot.meta.version);
    assert_eq!(loaded.meta.knn_weight, snapshot.meta.knn_weight);
    assert_eq!(loaded.meta.events, snapshot.meta.events);
    assert_eq!(loaded.item_ids, snapshot.item_ids);
    let history = steps(&snapshot, &["filler-3".to_owned(), "pat-1-a".to_owned()]);
    let (mut s1, mut s2) = (Vec::new(), Vec::new());
    snapshot.score_user(&history, snapshot.user_state(&history, 50).as_ref(), &mut s1);
    loaded.score_user(&history, loaded.user_state(&history, 50).as_ref(), &mut s2);
    assert_eq!(s1, s2);
    assert!(ModelSnapshot::from_bytes(b"not a snapshot").is_err());
}

#[test]
fn tiny_data_gives_an_error_or_a_popular_snapshot() {
    let empty = Dataset::from_events(Vec::new());
    let err = train_and_evaluate(&empty, &small_config(), false).unwrap_err();
    assert!(err.to_string().contains("no events"), "{err}");

    let one = Dataset::from_events(vec![EventRow {
        user_id: "solo".into(),
        item_id: "only".into(),
        kind: 0,
        timestamp_ms: 1,
    }]);
    let (snapshot, report) = train_and_evaluate(&one, &small_config(), false).unwrap();
    assert!(snapshot.weights.is_none());
    assert_eq!(snapshot.meta.kind, recd::model::snapshot::SnapshotKind::Popular);
    assert_eq!(report.data.test_users, 0);
    let mut scores = Vec::new();
    snapshot.score_user(&[], None, &mut scores);
    assert_eq!(top_n(&scores, 5, |_| false), [(1, scores[1])]);
}

/// `recd eval --json` on a CSV prints one object with exactly the promised
/// keys; without `--json`, a table; a missing file is a clear error.
#[test]
fn recd_eval_prints_the_promised_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_events_csv(dir.path(), &planted_shop(80, 4));
    let run = |flags: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_recd"))
            .args(["eval", "--events"])
            .arg(&path)
            .args(flags)
            .env("RECD_TRAIN__MAX_EPOCHS", "2")
            .env("RECD_TRAIN__DIM", "8")
            .env("RECD_TRAIN__HIDDEN", "8")
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&report),
        [
            "batches",
            "data",
            "epochs",
            "item_knn",
            "model",
            "popular",
            "train_seconds"
        ]
    );
    assert!(report["batches"].as_u64().unwrap() >= 1);
    assert_eq!(keys(&report["data"]), ["events", "items", "test_users", "users"]);
    for method in ["model", "popular", "item_knn"] {
        assert_eq!(
            keys(&report[method]),
            ["hr@10", "ndcg@10", "sampled_hr@10", "sampled_ndcg@10"]
        );
    }
    assert_eq!(report["data"]["users"], 80);
    assert!(report["epochs"].as_u64().unwrap() <= 2);

    // `--seed N` is `train.seed` for the run: the same figures as the
    // setting gives, and other seeds give other models.
    let model_of = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (report["model"].to_string(), report["epochs"].clone())
    };
    let seeded: Vec<_> = ["1", "2", "3"]
        .iter()
        .map(|seed| model_of(run(&["--json", "--seed", seed])))
        .collect();
    let by_setting = std::process::Command::new(env!("CARGO_BIN_EXE_recd"))
        .args(["eval", "--json", "--events"])
        .arg(&path)
        .env("RECD_TRAIN__MAX_EPOCHS", "2")
        .env("RECD_TRAIN__DIM", "8")
        .env("RECD_TRAIN__HIDDEN", "8")
        .env("RECD_TRAIN__SEED", "2")
        .output()
        .unwrap();
    assert_eq!(model_of(by_setting), seeded[1]);
    assert!(
        seeded[0] != seeded[1] || seeded[1] != seeded[2],
        "three seeds gave the same model: {seeded:?}"
    );

    let table = run(&[]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains("item-kNN"));

    // `--replay --json`: five trainings in time order and one from scratch.
    let replay = run(&["--replay", "--json"]);
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let replay: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
    assert_eq!(
        keys(&replay),
        [
            "batches_ratio",
            "continued_batches",
            "continued_seconds",
            "scratch",
            "seconds_ratio",
            "stages",
            "test_users"
        ]
    );
    let stages = replay["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 5);
    assert_eq!(stages[4]["events"], replay["scratch"]["events"]);

    // With a catalogue file, its categories are read as a model input.
    let items = dir.path().join("items.csv");
    let mut csv = String::from("item_id,title,category,categories\n");
    for k in 0..PATTERNS {
        for s in ["a", "b", "c", "d"] {
            csv.push_str(&format!("pat-{k}-{s},,pattern-{k},pattern-{k}|all\n"));
        }
    }
    std::fs::write(&items, csv).unwrap();
    let with_items = std::process::Command::new(env!("CARGO_BIN_EXE_recd"))
        .args(["eval", "--json", "--events"])
        .arg(&path)
        .arg("--items")
        .arg(&items)
        .env("RECD_TRAIN__MAX_EPOCHS", "2")
        .env("RECD_TRAIN__DIM", "8")
        .env("RECD_TRAIN__HIDDEN", "8")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&with_items.stderr);
    assert!(with_items.status.success(), "{stderr}");
    assert!(stderr.contains("items_with_category=24"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&with_items.stdout).unwrap();
    assert_eq!(report["data"]["users"], 80);

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_recd"))
        .args(["eval", "--events", "/nonexistent/events.csv"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/events.csv"));
}

/// `recd import` then `recd train` on an SQLite store: the snapshot lands
/// in the store and loads back; an empty store is a clear error.
#[tokio::test]
async fn recd_train_saves_a_snapshot_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("recd.db").display());
    let recd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_recd"))
            .args(args)
            .env("RECD_DATABASE_URL", &url)
            .env("RECD_TRAIN__MAX_EPOCHS", "2")
            .env("RECD_TRAIN__DIM", "8")
            .env("RECD_TRAIN__HIDDEN", "8")
            .output()
            .unwrap()
    };
    let empty = recd(&["train"]);
    assert!(!empty.status.success());
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("no events"),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );

    let path = write_events_csv(dir.path(), &planted_shop(60, 5));
    assert!(recd(&["import", "--events", path.to_str().unwrap()]).status.success());
    let out = recd(&["train"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved snapshot"));

    let store = recd::store::Store::open(&url, &Default::default()).await.unwrap();
    let (version, bytes) = store.latest_snapshot().await.unwrap().expect("a snapshot");
    let snapshot = ModelSnapshot::from_bytes(&bytes).unwrap();
    assert_eq!(snapshot.meta.version, version);
    assert_eq!(snapshot.meta.users, 60);
    assert!(snapshot.item_index("pat-0-c").is_some());
    store.close().await;
}

/// The time limit holds within an epoch: with no time at all not one
/// optimizer step is taken, with time enough every batch of every epoch is.
#[test]
fn the_time_limit_is_checked_per_batch() {
    use recd::model::data::Split;
    use recd::model::train::train_from;
    let data = Dataset::from_events(planted_shop(400, 5));
    let split = Split::leave_one_out(&data);
    let popularity = vec![1.0; data.items() + 1];
    let config = |seconds: f64| TrainConfig {
        dim: 8,
        hidden: 8,
        batch_size: 16,
        max_epochs: 2,
        patience: 10,
        max_train_seconds: seconds,
        ..TrainConfig::default()
    };
    let none = train_from(
        &data,
        &split.train_len,
        &popularity,
        &split.valid,
        &config(0.0),
        false,
        None,
    )
    .unwrap()
    .expect("a network");
    assert_eq!((none.epochs, none.batches), (1, 0));
    let all = train_from(
        &data,
        &split.train_len,
        &popularity,
        &split.valid,
        &config(600.0),
        false,
        None,
    )
    .unwrap()
    .expect("a network");
    let per_epoch = recd::model::train::windows(&data, &split.train_len, 50)
        .len()
        .div_ceil(16);
    assert!(per_epoch > 10, "{per_epoch} batches an epoch");
    assert_eq!((all.epochs, all.batches), (2, 2 * per_epoch));
}

/// The evaluation ranks the whole catalogue for a fixed, seeded sample of
/// the test users when there are more than `test_cases`.
#[test]
fn evaluation_samples_the_test_users() {
    let data = Dataset::from_events(planted_shop(400, 6));
    let config = TrainConfig {
        dim: 8,
        hidden: 8,
        max_epochs: 1,
        test_cases: 50,
        ..TrainConfig::default()
    };
    let (_, report) = train_and_evaluate(&data, &config, false).unwrap();
    assert_eq!(report.data.test_users, 50);
    assert_eq!(report.data.users, 400);
    let (_, again) = train_and_evaluate(&data, &config, false).unwrap();
    assert_eq!(
        (report.popular, report.item_knn),
        (again.popular, again.item_knn),
        "the same sample"
    );
    let all = TrainConfig {
        test_cases: 1000,
        ..config
    };
    let (_, everyone) = train_and_evaluate(&data, &all, false).unwrap();
    assert_eq!(everyone.data.test_users, 400);
}

/// A continued training starts where the served model is: its weights as
/// they were for known items, the category mean for a new item with a
/// category, whatever categories the new network learns on top.
#[test]
fn a_network_starts_from_served_weights() {
    use rand::SeedableRng;
    use recd::model::net::Network;
    use recd::model::snapshot::Weights;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut draw = {
        let mut r = rand::rngs::StdRng::seed_from_u64(10);
        move || rand::Rng::gen_range(&mut r, -1.0f32..1.0)
    };
    let served = Weights::from_fn(3, 4, 5, &mut draw);
    // Four items now: served rows 2, 1 and 3, and a new one; items 1 and 4
    // share category 1, items 2 and 3 have none.
    let categories = [0u32, 1, 0, 0, 1];
    let net = Network::new(4, 4, 5, Some((&categories, 1)), &mut rng).unwrap();
    net.start_from(&served, &[None, Some(2), Some(1), Some(3), None])
        .unwrap();
    let w = net.weights().unwrap();
    let row = |w: &Weights, i: usize| w.item_emb[i * 4..(i + 1) * 4].to_vec();
    assert_eq!(row(&w, 1), row(&served, 2));
    assert_eq!(row(&w, 2), row(&served, 1));
    assert_eq!(row(&w, 3), row(&served, 3));
    assert_eq!(row(&w, 4), row(&served, 2), "the mean of its category's known rows");
    assert_eq!(
        w.item_bias[1..4],
        [served.item_bias[2], served.item_bias[1], served.item_bias[3]]
    );
    assert_eq!((&w.w_ih, &w.w_hh, &w.b), (&served.w_ih, &served.w_hh, &served.b));
    assert_eq!(
        (&w.proj, &w.proj_b, &w.kind_emb),
        (&served.proj, &served.proj_b, &served.kind_emb)
    );
}

/// `recd eval --replay`: the oldest 80% from scratch, four increments of 5%
/// each continued from the model before, then all of it from scratch; the
/// continued model still knows the planted order, for less training.
#[test]
fn a_replay_continues_four_times_and_ends_near_scratch() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let rows = planted_shop(400, 3);
    let total = rows.len() as u64;
    let config = TrainConfig {
        patience: 5,
        ..small_config()
    };
    let report = recd::trainer::replay(rows, &HashMap::new(), &config, false).expect("replays");
    eprintln!("{}", report.table());
    let from: Vec<_> = report.stages.iter().map(|s| s.from).collect();
    assert_eq!(from, ["scratch", "continued", "continued", "continued", "continued"]);
    for (stage, share) in report.stages.iter().zip(recd::trainer::STAGES) {
        // Each reads its share of the events, oldest first, and never
        // splits one instant.
        assert!(stage.events >= (total as f64 * share).ceil() as u64, "{stage:?}");
    }
    assert!(report.stages.windows(2).all(|w| w[0].events < w[1].events));
    assert_eq!((report.stages[4].events, report.scratch.events), (total, total));
    assert_eq!(report.test_users, 400);
    let continued: usize = report.stages[1..].iter().map(|s| s.batches).sum();
    assert_eq!(report.continued_batches, continued);
    assert!(continued > 0 && report.scratch.batches > 0);
    assert!(
        (report.batches_ratio - continued as f64 / report.scratch.batches as f64).abs() < 1e-9,
        "{report:?}"
    );
    let (last, scratch) = (&report.stages[4].model, &report.scratch.model);
    assert!(last.hr > 0.8, "the continued model knows the planted order: {last:?}");
    assert!(
        last.ndcg >= scratch.ndcg - 0.05,
        "continued {last:?} against scratch {scratch:?}"
    );
}
