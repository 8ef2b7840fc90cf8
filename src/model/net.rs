//! The network in candle, for training: item + event-type embeddings, an
//! LSTM, a projection to the embedding size, and scores as dot products with
//! the (tied) item embeddings plus an item bias. Where the catalogue has
//! categories, an item's embedding is its own vector plus its category's, so
//! that an item seen once still lands near the rest of its category; the
//! sum is what a snapshot stores.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::distributions::{Distribution, WeightedIndex};
use rand::rngs::StdRng;
use rand::Rng;

use super::ops::{FullSoftmax, LstmLayer, SampledSoftmax};
use super::snapshot::{Weights, KINDS, PAD_KIND};

/// A batch in time-major layout: position (t, b) is row t * B + b.
pub struct Batch {
    pub steps: usize,
    pub rows: usize,
    /// (T * B) dense item indexes, 0 for padding.
    pub items: Vec<u32>,
    pub kinds: Vec<u32>,
    /// Rows whose next item is a training target.
    pub positions: Vec<u32>,
    /// The 1-based dense index predicted at each position.
    pub targets: Vec<u32>,
}

impl Batch {
    /// Right-padded sequences, each predicting its next item at every
    /// position; positions whose target already occurred earlier in the
    /// sequence are left out unless `repeats` (the served lists exclude
    /// items a shopper has seen).
    pub fn new(seqs: &[&[super::data::Step]], repeats: bool) -> Self {
        let rows = seqs.len();
        let steps = seqs.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        let mut batch = Batch {
            steps,
            rows,
            items: vec![0; steps * rows],
            kinds: vec![PAD_KIND as u32; steps * rows],
            positions: Vec::new(),
            targets: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        for (b, seq) in seqs.iter().enumerate() {
            seen.clear();
            for t in 0..seq.len().saturating_sub(1) {
                let row = t * rows + b;
                batch.items[row] = seq[t].item;
                batch.kinds[row] = seq[t].kind as u32;
                seen.insert(seq[t].item);
                let target = seq[t + 1].item;
                if repeats || !seen.contains(&target) {
                    batch.positions.push(row as u32);
                    batch.targets.push(target);
                }
            }
        }
        // Time-major rows of a position-sorted batch keep the gather local.
        let mut order: Vec<usize> = (0..batch.positions.len()).collect();
        order.sort_by_key(|&i| batch.positions[i]);
        batch.positions = order.iter().map(|&i| batch.positions[i]).collect();
        batch.targets = order.iter().map(|&i| batch.targets[i]).collect();
        batch
    }
}

/// Negatives for sampled softmax: drawn by popularity^alpha, with the
/// log-probabilities that correct the logits (logQ).
pub struct Sampler {
    dist: WeightedIndex<f64>,
    /// log q per dense index (0 unused).
    log_q: Vec<f32>,
    pub count: usize,
}

impl Sampler {
    pub fn new(popularity: &[f32], alpha: f64, count: usize) -> anyhow::Result<Self> {
        let weights: Vec<f64> = popularity
            .iter()
            .enumerate()
            .map(|(i, &p)| if i == 0 { 0.0 } else { (p as f64 + 1.0).powf(alpha) })
            .collect();
        let total: f64 = weights.iter().sum();
        let log_q = weights.iter().map(|&w| (w / total).max(1e-30).ln() as f32).collect();
        Ok(Sampler {
            dist: WeightedIndex::new(&weights)?,
            log_q,
            count,
        })
    }
}

pub struct Network {
    pub items: usize,
    pub dim: usize,
    pub hidden: usize,
    pub item_emb: Var,
    pub kind_emb: Var,
    pub w_ih: Var,
    pub w_hh: Var,
    pub b: Var,
    pub proj: Var,
    pub proj_b: Var,
    pub item_bias: Var,
    /// Category embeddings (row 0: items without one), when used.
    pub category_emb: Option<Var>,
    /// Per dense item index, its dense category index.
    item_category: Vec<u32>,
}

fn uniform(rng: &mut StdRng, shape: (usize, usize), bound: f32) -> Result<Var> {
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.gen_range(-bound..bound)).collect();
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Inverted dropout with a seeded mask.
fn dropout(x: &Tensor, p: f32, rng: &mut StdRng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

pub struct Dropouts {
    pub embedding: f32,
    pub hidden: f32,
}

impl Network {
    /// Uniform initialisation within +-sqrt(6 / (fan_in + fan_out)); the
    /// forget gate starts open (bias 1).
    /// `categories`: each dense item's category index (0: none) and how many
    /// categories there are; None trains without them.
    pub fn new(
        items: usize,
        dim: usize,
        hidden: usize,
        categories: Option<(&[u32], usize)>,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let glorot = |a: usize, b: usize| (6.0 / (a + b) as f32).sqrt();
        let item_emb = uniform(rng, (items + 1, dim), glorot(dim, dim) * 0.5)?;
        let kind_emb = uniform(rng, (KINDS, dim), glorot(dim, dim) * 0.5)?;
        let w_ih = uniform(rng, (4 * hidden, dim), glorot(dim, 4 * hidden))?;
        let w_hh = uniform(rng, (4 * hidden, hidden), glorot(hidden, 4 * hidden))?;
        let mut bias = vec![0f32; 4 * hidden];
        bias[hidden..2 * hidden].fill(1.0);
        let b = Var::from_tensor(&Tensor::from_vec(bias, 4 * hidden, &Device::Cpu)?)?;
        let proj = uniform(rng, (dim, hidden), glorot(hidden, dim))?;
        let proj_b = Var::zeros(dim, DType::F32, &Device::Cpu)?;
        let item_bias = Var::zeros(items + 1, DType::F32, &Device::Cpu)?;
        // Drawn last: without categories, the draws above match a run
        // that never had them.
        let (category_emb, item_category) = match categories {
            Some((of_item, count)) => (
                Some(uniform(rng, (count + 1, dim), glorot(dim, dim) * 0.5)?),
                of_item.to_vec(),
            ),
            None => (None, Vec::new()),
        };
        Ok(Network {
            items,
            dim,
            hidden,
            item_emb,
            kind_emb,
            w_ih,
            w_hh,
            b,
            proj,
            proj_b,
            item_bias,
            category_emb,
            item_category,
        })
    }

    /// Starts from a served model's weights instead of random ones: the
    /// recurrent and output weights as they are, each item's row from
    /// `rows[i]` (its row in `weights`, which hold the category part
    /// already), or, for an item new since, the mean of the served rows of
    /// its category (random when it has none). Category vectors start at
    /// zero, so every known item scores as it did.
    pub fn start_from(&self, weights: &Weights, rows: &[Option<u32>]) -> Result<()> {
        let d = self.dim;
        anyhow_shape(weights.dim == d && weights.hidden == self.hidden)?;
        let mut item_emb = self.item_emb.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut item_bias = vec![0f32; self.items + 1];
        let mut sums: std::collections::HashMap<u32, (Vec<f32>, usize)> = std::collections::HashMap::new();
        for (i, row) in rows.iter().enumerate().skip(1) {
            if let Some(r) = row {
                let r = *r as usize;
                item_emb[i * d..(i + 1) * d].copy_from_slice(&weights.item_emb[r * d..(r + 1) * d]);
                item_bias[i] = weights.item_bias[r];
                if let Some(&c) = self.item_category.get(i).filter(|&&c| c > 0) {
                    let (sum, n) = sums.entry(c).or_insert_with(|| (vec![0f32; d], 0));
                    sum.iter_mut()
                        .zip(&item_emb[i * d..(i + 1) * d])
                        .for_each(|(s, x)| *s += x);
                    *n += 1;
                }
            }
        }
        for (i, row) in rows.iter().enumerate().skip(1) {
            let category = self.item_category.get(i).copied().unwrap_or(0);
            if let (None, Some((sum, n))) = (row, sums.get(&category)) {
                for (x, s) in item_emb[i * d..(i + 1) * d].iter_mut().zip(sum) {
                    *x = s / *n as f32;
                }
            }
        }
        let dev = Device::Cpu;
        self.item_emb
            .set(&Tensor::from_vec(item_emb, (self.items + 1, d), &dev)?)?;
        self.item_bias
            .set(&Tensor::from_vec(item_bias, self.items + 1, &dev)?)?;
        self.kind_emb
            .set(&Tensor::from_slice(&weights.kind_emb, (KINDS, d), &dev)?)?;
        let h = self.hidden;
        self.w_ih.set(&Tensor::from_slice(&weights.w_ih, (4 * h, d), &dev)?)?;
        self.w_hh.set(&Tensor::from_slice(&weights.w_hh, (4 * h, h), &dev)?)?;
        self.b.set(&Tensor::from_slice(&weights.b, 4 * h, &dev)?)?;
        self.proj.set(&Tensor::from_slice(&weights.proj, (d, h), &dev)?)?;
        self.proj_b.set(&Tensor::from_slice(&weights.proj_b, d, &dev)?)?;
        if let Some(emb) = &self.category_emb {
            emb.set(&emb.as_tensor().zeros_like()?)?;
        }
        Ok(())
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut vars = vec![
            self.item_emb.clone(),
            self.kind_emb.clone(),
            self.w_ih.clone(),
            self.w_hh.clone(),
            self.b.clone(),
            self.proj.clone(),
            self.proj_b.clone(),
            self.item_bias.clone(),
        ];
        vars.extend(self.category_emb.clone());
        vars
    }

    /// The embeddings of `ids` (dense indexes), category part included.
    fn item_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = Device::Cpu;
        let rows = self
            .item_emb
            .index_select(&Tensor::from_slice(ids, ids.len(), &dev)?, 0)?;
        let Some(emb) = &self.category_emb else {
            return Ok(rows);
        };
        let cats: Vec<u32> = ids.iter().map(|&i| self.item_category[i as usize]).collect();
        rows + emb.index_select(&Tensor::from_vec(cats, ids.len(), &dev)?, 0)?
    }

    /// The whole item table as scored: own vectors plus category vectors.
    fn item_table(&self) -> Result<Tensor> {
        match &self.category_emb {
            Some(emb) => {
                let cats = Tensor::from_slice(&self.item_category, self.item_category.len(), &Device::Cpu)?;
                self.item_emb.as_tensor() + emb.index_select(&cats, 0)?
            }
            None => Ok(self.item_emb.as_tensor().clone()),
        }
    }

    /// Query vectors (N, dim) at the batch's target positions.
    pub fn queries(&self, batch: &Batch, drop: &Dropouts, rng: &mut StdRng) -> Result<Tensor> {
        Ok(self.queries_and_rows(batch, &[], drop, rng)?.0)
    }

    /// The queries, and the embeddings of `extra` items taken in the same
    /// gather: each gather's gradient is a catalogue-sized tensor, so one
    /// instead of several saves whole passes over the table.
    pub fn queries_and_rows(
        &self,
        batch: &Batch,
        extra: &[u32],
        drop: &Dropouts,
        rng: &mut StdRng,
    ) -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        let (t_len, b_len, h) = (batch.steps, batch.rows, self.hidden);
        let mut ids = Vec::with_capacity(batch.items.len() + extra.len());
        ids.extend_from_slice(&batch.items);
        ids.extend_from_slice(extra);
        let all = self.item_rows(&ids)?;
        let rows = all.narrow(0, t_len * b_len, extra.len())?;
        let kinds = Tensor::from_slice(&batch.kinds, t_len * b_len, &dev)?;
        let x = (all.narrow(0, 0, t_len * b_len)? + self.kind_emb.index_select(&kinds, 0)?)?;
        let x = dropout(&x, drop.embedding, rng)?;
        // Input projections of every step in one product.
        let xw = x.matmul(&self.w_ih.t()?)?.reshape((t_len, b_len, 4 * h))?;
        let hs = xw
            .apply_op3(self.w_hh.as_tensor(), self.b.as_tensor(), LstmLayer::default())?
            .reshape((t_len * b_len, h))?;
        let positions = Tensor::from_slice(&batch.positions, batch.positions.len(), &dev)?;
        let sel = dropout(&hs.index_select(&positions, 0)?, drop.hidden, rng)?;
        Ok((sel.matmul(&self.proj.t()?)?.broadcast_add(&self.proj_b)?, rows))
    }

    /// Cross-entropy of the next item over the whole catalogue: the logits,
    /// the item bias and the loss in one fused operation.
    pub fn full_loss(&self, batch: &Batch, drop: &Dropouts, rng: &mut StdRng) -> Result<Tensor> {
        let q = self.queries(batch, drop, rng)?;
        // Column 0 is the padding row: never a target, it only learns to
        // score low, which costs less than slicing it off.
        q.apply_op3(
            &self.item_table()?,
            self.item_bias.as_tensor(),
            FullSoftmax::new(batch.targets.clone()),
        )
    }

    /// Sampled softmax: the target against negatives shared by the batch,
    /// all logits corrected by log q; a negative that is the row's own
    /// target is masked.
    pub fn sampled_loss(&self, batch: &Batch, drop: &Dropouts, sampler: &Sampler, rng: &mut StdRng) -> Result<Tensor> {
        let dev = Device::Cpu;
        let negs: Vec<u32> = (0..sampler.count).map(|_| sampler.dist.sample(rng) as u32).collect();
        let mut wanted = batch.targets.clone();
        wanted.extend_from_slice(&negs);
        let (q, rows) = self.queries_and_rows(batch, &wanted, drop, rng)?;
        let bias = self
            .item_bias
            .index_select(&Tensor::from_slice(&wanted, wanted.len(), &dev)?, 0)?;
        let log_q = wanted.iter().map(|&i| sampler.log_q[i as usize]).collect();
        q.apply_op3(&rows, &bias, SampledSoftmax::new(batch.targets.clone(), negs, log_q))
    }

    pub fn weights(&self) -> Result<Weights> {
        let flat = |v: &Var| v.as_tensor().flatten_all()?.to_vec1::<f32>();
        Ok(Weights {
            dim: self.dim,
            hidden: self.hidden,
            item_emb: self.item_table()?.flatten_all()?.to_vec1::<f32>()?,
            kind_emb: flat(&self.kind_emb)?,
            w_ih: flat(&self.w_ih)?,
            w_hh: flat(&self.w_hh)?,
            b: flat(&self.b)?,
            proj: flat(&self.proj)?,
            proj_b: flat(&self.proj_b)?,
            item_bias: flat(&self.item_bias)?,
        })
    }
}

fn anyhow_shape(same: bool) -> Result<()> {
    if same {
        Ok(())
    } else {
        Err(candle_core::Error::Msg("the served weights have another shape".into()))
    }
}
