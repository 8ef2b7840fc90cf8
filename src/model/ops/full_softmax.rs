//! The fused full-softmax head: cross-entropy over the whole catalogue,
//! from the queries to the mean loss, with its backward pass.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{column_sums, contiguous, fast_exp, gemm_scaled, plain, transposed};
use crate::model::optim::with_f32s;
use crate::model::simd::{multiversion, threads};

/// Rows per parallel task for rows of `c` columns: tasks of at least
/// about 16K elements, below which a thread costs more than it saves.
fn rows_per_task(c: usize) -> usize {
    (1 << 14) / c.max(1) + 1
}

/// Mean softmax cross-entropy over the whole catalogue, from the queries:
/// (queries (N, D), item embeddings (C, D), item bias (C)) with the target
/// columns fixed at construction. The logits are one product, the bias is
/// added inside, and the softmax is kept for the backward pass, which
/// turns it into the logits' gradient in place and gives the queries', the
/// embeddings' (as a contiguous (C, D) product, not a transposed view to be
/// added elementwise) and the bias's, without a graph's temporaries.
pub struct FullSoftmax {
    targets: Vec<u32>,
    /// (N, C) softmax of the forward pass.
    probs: std::sync::Mutex<Vec<f32>>,
}

impl FullSoftmax {
    pub fn new(targets: Vec<u32>) -> Self {
        FullSoftmax {
            targets,
            probs: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl CustomOp3 for FullSoftmax {
    fn name(&self) -> &'static str {
        "recd-full-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, emb, bias) = (contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?);
        let ((n, d), (c, d2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if d != d2 || bias.len() != c || self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= c) {
            bail!(
                "full softmax: queries {:?}, embeddings {:?}, bias {:?}, {} targets",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.targets.len()
            );
        }
        let mut probs = vec![0f32; n * c];
        gemm_scaled(n, c, d, plain(q), transposed(emb), &mut probs, false, 1.0, threads());
        let mut losses = vec![0f32; n];
        probs
            .par_chunks_mut(c.max(1))
            .zip(losses.par_iter_mut().zip(&self.targets))
            .with_min_len(rows_per_task(c))
            .for_each(|(row, (loss, &t))| {
                *loss = biased_softmax_in_place(row, bias, t as usize);
            });
        let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / n.max(1) as f64;
        *self.probs.lock().expect("softmax cache") = probs;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        emb: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((n, d), (c, _)) = (q.dims2()?, emb.dims2()?);
        let scale = grad.to_scalar::<f32>()? / n.max(1) as f32;
        let mut probs = std::mem::take(&mut *self.probs.lock().expect("softmax cache"));
        if probs.len() != n * c {
            bail!("full softmax: backward without its forward pass");
        }
        // softmax - one-hot: the logits' gradient, short of the scale.
        for (row, &t) in probs.chunks_exact_mut(c).zip(&self.targets) {
            row[t as usize] -= 1.0;
        }
        let mut d_q = vec![0f32; n * d];
        let mut d_emb = vec![0f32; c * d];
        with_f32s(emb, |emb| {
            gemm_scaled(n, d, c, plain(&probs), plain(emb), &mut d_q, false, scale, threads())
        })?;
        with_f32s(q, |q| {
            gemm_scaled(
                c,
                d,
                n,
                transposed(&probs),
                plain(q),
                &mut d_emb,
                false,
                scale,
                threads(),
            )
        })?;
        let mut d_bias = vec![0f32; c];
        column_sums(&mut d_bias, &probs, scale);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(d_q, (n, d), dev)?),
            Some(Tensor::from_vec(d_emb, (c, d), dev)?),
            Some(Tensor::from_vec(d_bias, c, dev)?),
        ))
    }
}

multiversion! {
    /// row = softmax(row + bias), in place, with one exp per element;
    /// returns the cross-entropy of class `target`.
    fn biased_softmax_in_place(row: &mut [f32], bias: &[f32], target: usize) -> f32 {
        for (x, &b) in row.iter_mut().zip(bias) {
            *x += b;
        }
        let logit = row[target];
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for k in 0..8 {
                lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for k in 0..8 {
                c[k] = fast_exp(c[k] - max);
                sums[k] += c[k];
            }
        }
        let mut sum = sums.iter().sum::<f32>();
        for x in chunks.into_remainder() {
            *x = fast_exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        max + sum.ln() - logit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn full_softmax_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let targets = Tensor::new(&[0u32, 3, 6, 2, 2], &dev)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, 7, &dev)?)?;

        // The whole head: queries and embeddings to the loss.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3), &dev)?)?;
        let emb = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 3), &dev)?)?;
        let fused = q.apply_op3(
            emb.as_tensor(),
            bias.as_tensor(),
            FullSoftmax::new(targets.to_vec1::<u32>()?),
        )?;
        let logits = q.matmul(&emb.t()?)?.broadcast_add(bias.as_tensor())?;
        let plain = candle_nn::loss::cross_entropy(&logits, &targets)?;
        assert!((fused.to_scalar::<f32>()? - plain.to_scalar::<f32>()?).abs() < 1e-5);
        let (ga, gb) = ((fused * 3.0)?.backward()?, (plain * 3.0)?.backward()?);
        for v in [&q, &emb, &bias] {
            let diff = (ga.get(v).unwrap() - gb.get(v).unwrap())?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-5);
        }
        Ok(())
    }
}
