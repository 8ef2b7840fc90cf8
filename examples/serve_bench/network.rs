//! The synthetic scenario's network: seeded weights of the served shape,
//! with the item embeddings and the query laid out as `--weights` says.

use clap::ValueEnum;
use rand::Rng;
use recd::model::snapshot::Weights;

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Layout {
    /// Clustered items and a network whose query follows the categories
    /// the shopper browsed, as a trained network's does.
    Aligned,
    /// Clustered items and a random network: queries unrelated to the
    /// items.
    Clustered,
    /// Every embedding and every view drawn independently.
    Random,
}

/// The network of a synthetic catalogue of `items` items (dim 64, hidden
/// 64): random weights, clustered into `categories` categories unless
/// `layout` is `Random`, and reading the history as a running average when
/// it is `Aligned`.
pub fn synthetic_weights(items: usize, layout: Layout, categories: usize, rng: &mut impl Rng) -> Weights {
    let mut weights = random_weights(items, 64, 64, rng);
    if layout != Layout::Random {
        cluster(&mut weights, categories, rng);
    }
    if layout == Layout::Aligned {
        read_history(&mut weights);
    }
    weights
}

/// Gives item i (1-based) the vector of category (i - 1) % `categories`
/// (drawn at 3x an item's own scale) plus its own, as in a model trained
/// with category embeddings.
fn cluster(weights: &mut Weights, categories: usize, rng: &mut impl Rng) {
    let dim = weights.dim;
    let centres = random_weights(categories, dim, 1, rng).item_emb;
    for (i, row) in weights.item_emb.chunks_mut(dim).enumerate().skip(1) {
        let centre = &centres[(1 + (i - 1) % categories) * dim..][..dim];
        for (x, c) in row.iter_mut().zip(centre) {
            *x += 3.0 * c;
        }
    }
}

/// Makes the network's query a running average of the shopper's recent
/// item embeddings, so that it points toward the categories they browse:
/// the cell keeps about three quarters of its memory per event and takes
/// in the new item's embedding (the cell-input weights are the identity),
/// the output gate is open, and the projection is the identity. A trained
/// network's query leans the same way (its next items are near the ones
/// before), which a random network's does not. Needs `dim == hidden`.
fn read_history(weights: &mut Weights) {
    let (d, h) = (weights.dim, weights.hidden);
    assert_eq!(d, h, "the identity maps need dim == hidden");
    weights.kind_emb.fill(0.0);
    weights.w_hh.fill(0.0);
    weights.w_ih.fill(0.0);
    weights.proj.fill(0.0);
    weights.proj_b.fill(0.0);
    // Gates in the order input, forget, cell, output.
    let bias = [-1.0, 1.0, 0.0, 4.0];
    for (gate, b) in bias.iter().enumerate() {
        weights.b[gate * h..(gate + 1) * h].fill(*b);
    }
    for k in 0..h {
        weights.w_ih[(2 * h + k) * d + k] = 2.0;
        weights.proj[k * h + k] = 1.0;
    }
}

/// Weights of the served shape drawn from N(0, 0.1), as a trained model's
/// are in scale; padding row 0 is zero.
fn random_weights(items: usize, dim: usize, hidden: usize, rng: &mut impl Rng) -> Weights {
    Weights::from_fn(items, dim, hidden, || {
        // Box-Muller.
        let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-7), rng.gen());
        0.1 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    })
}
