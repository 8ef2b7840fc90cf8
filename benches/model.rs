//! One training step of the network in the three settings the PyTorch
//! reference was timed in (batch 128, length 20, 20,000 items, d = 64), and
//! one batch-1 top-10 scoring of the served snapshot.
//!
//!     cargo bench --bench model
//!
//! PyTorch 2 on this machine's CPU, same shapes: last-position full softmax
//! 23-28 ms, every position with 128 sampled negatives 15-16 ms, every
//! position full softmax 537-565 ms; batch-1 top-10 0.34 ms.

use candle_nn::ParamsAdamW;
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recd::model::data::Step;
use recd::model::net::{Batch, Dropouts, Network, Sampler};
use recd::model::optim::AdamW;
use recd::model::snapshot::{top_n, ModelSnapshot, SnapshotMeta};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ITEMS: usize = 20_000;
const BATCH: usize = 128;
const LEN: usize = 20;
const DIM: usize = 64;

fn sequences(rng: &mut StdRng) -> Vec<Vec<Step>> {
    (0..BATCH)
        .map(|_| {
            (0..=LEN)
                .map(|_| Step {
                    item: rng.gen_range(1..=ITEMS as u32),
                    kind: 0,
                })
                .collect()
        })
        .collect()
}

fn training_steps(c: &mut Criterion) {
    // As `recd` itself does (see main.rs): candle's pool spins less.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let mut rng = StdRng::seed_from_u64(1);
    let seqs = sequences(&mut rng);
    let refs: Vec<&[Step]> = seqs.iter().map(Vec::as_slice).collect();
    let every = Batch::new(&refs, true);
    let mut last = Batch::new(&refs, true);
    let keep: Vec<usize> = (0..last.positions.len())
        .filter(|&i| last.positions[i] as usize / BATCH == LEN - 1)
        .collect();
    last.positions = keep.iter().map(|&i| last.positions[i]).collect();
    last.targets = keep.iter().map(|&i| last.targets[i]).collect();
    assert_eq!(last.positions.len(), BATCH);
    let drop = Dropouts {
        embedding: 0.2,
        hidden: 0.1,
    };
    let popularity: Vec<f32> = (0..=ITEMS).map(|i| 1.0 + (ITEMS - i) as f32).collect();
    let sampler = Sampler::new(&popularity, 0.5, 128).unwrap();

    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    let mut run = |name: &str, f: &mut dyn FnMut(&Network, &mut StdRng) -> candle_core::Tensor| {
        let mut rng = StdRng::seed_from_u64(2);
        let net = Network::new(ITEMS, DIM, DIM, None, &mut rng).unwrap();
        let mut opt = AdamW::new(net.vars(), ParamsAdamW::default());
        group.bench_function(name, |b| {
            b.iter(|| {
                let loss = f(&net, &mut rng);
                opt.backward_step(&loss).unwrap();
            })
        });
    };
    run("last_position_full_softmax", &mut |net, rng| {
        net.full_loss(&last, &drop, rng).unwrap()
    });
    run("every_position_128_sampled", &mut |net, rng| {
        net.sampled_loss(&every, &drop, &sampler, rng).unwrap()
    });
    run("every_position_full_softmax", &mut |net, rng| {
        net.full_loss(&every, &drop, rng).unwrap()
    });
    group.finish();
}

fn scoring(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let net = Network::new(ITEMS, DIM, DIM, None, &mut rng).unwrap();
    let meta = SnapshotMeta {
        version: "bench".into(),
        trained_at: String::new(),
        cutoff_ms: 0,
        events: 0,
        users: 0,
        items: ITEMS as u64,
        metrics: Default::default(),
        knn_weight: 0.0,
        kind: recd::model::snapshot::SnapshotKind::Network,
        last_seq: 0,
        scratch_at_ms: 0,
        continued_from: None,
        churn: None,
    };
    let ids = (0..ITEMS).map(|i| format!("i{i}")).collect();
    let neighbours = recd::model::knn::Neighbours::build(ITEMS, std::iter::empty(), 10);
    let snapshot = ModelSnapshot::new(
        meta,
        ids,
        Some(net.weights().unwrap()),
        vec![0.0; ITEMS + 1],
        neighbours,
    );
    let history: Vec<Step> = (0..LEN)
        .map(|_| Step {
            item: rng.gen_range(1..=ITEMS as u32),
            kind: 0,
        })
        .collect();
    let state = snapshot.user_state(&history, 50).unwrap();
    let mut scores = Vec::new();
    c.bench_function("score_top10_batch1", |b| {
        b.iter(|| {
            snapshot.score_user(&history, Some(&state), &mut scores);
            top_n(&scores, 10, |i| history.iter().any(|s| s.item == i))
        })
    });
    // A first request: the user's LSTM state over the whole history.
    c.bench_function("user_state_history", |b| b.iter(|| snapshot.user_state(&history, 50)));
}

criterion_group!(benches, training_steps, scoring);
criterion_main!(benches);
