//! Runs training steps of the benchmark's shapes (batch 128, length 20,
//! 20,000 items, d = 64) in one setting and prints each step's loss, the
//! time per step, and a checksum of the parameters at the end: a fixed-seed
//! trace to compare two versions of the code by, and a loop to profile.
//!
//!     cargo run --release --example train_steps -- last|sampled|every [STEPS]
//!     valgrind --tool=callgrind target/release/examples/train_steps last 3

use std::time::Instant;

use candle_nn::ParamsAdamW;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recd::model::data::Step;
use recd::model::net::{Batch, Dropouts, Network, Sampler};
use recd::model::optim::AdamW;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ITEMS: usize = 20_000;
const BATCH: usize = 128;
const LEN: usize = 20;
const DIM: usize = 64;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let mut args = std::env::args().skip(1);
    let setting = args.next().unwrap_or_else(|| "last".into());
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);

    let mut rng = StdRng::seed_from_u64(1);
    let seqs: Vec<Vec<Step>> = (0..BATCH)
        .map(|_| {
            (0..=LEN)
                .map(|_| Step {
                    item: rng.gen_range(1..=ITEMS as u32),
                    kind: 0,
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[Step]> = seqs.iter().map(Vec::as_slice).collect();
    let mut batch = Batch::new(&refs, true);
    if setting == "last" {
        let keep: Vec<usize> = (0..batch.positions.len())
            .filter(|&i| batch.positions[i] as usize / BATCH == LEN - 1)
            .collect();
        batch.positions = keep.iter().map(|&i| batch.positions[i]).collect();
        batch.targets = keep.iter().map(|&i| batch.targets[i]).collect();
    }
    let drop = Dropouts {
        embedding: 0.2,
        hidden: 0.1,
    };
    let popularity: Vec<f32> = (0..=ITEMS).map(|i| 1.0 + (ITEMS - i) as f32).collect();
    let sampler = Sampler::new(&popularity, 0.5, 128)?;

    let mut rng = StdRng::seed_from_u64(2);
    let net = Network::new(ITEMS, DIM, DIM, None, &mut rng)?;
    let mut opt = AdamW::new(net.vars(), ParamsAdamW::default());
    for step in 0..steps {
        let start = Instant::now();
        let loss = match setting.as_str() {
            "last" | "every" => net.full_loss(&batch, &drop, &mut rng)?,
            "sampled" => net.sampled_loss(&batch, &drop, &sampler, &mut rng)?,
            other => anyhow::bail!("unknown setting {other}: last, sampled or every"),
        };
        opt.backward_step(&loss)?;
        println!(
            "step {step}: loss {:.6} in {:.1} ms",
            loss.to_scalar::<f32>()?,
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    let mut sums = Vec::new();
    for var in net.vars() {
        let v = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        sums.push(format!("{:.6}", v.iter().map(|&x| x.abs() as f64).sum::<f64>()));
    }
    println!("parameter |sums|: {}", sums.join(" "));
    Ok(())
}
