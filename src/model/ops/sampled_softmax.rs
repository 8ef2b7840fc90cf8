//! The fused sampled-softmax head: cross-entropy against each query's
//! target and negatives shared by the batch, logQ-corrected, from the
//! queries to the mean loss, with its backward pass.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{column_sums, contiguous, fast_exp, gemm_scaled, plain, transposed};
use crate::model::optim::with_f32s;
use crate::model::simd::multiversion;

multiversion! {
    /// row = exp(row - lse), in place.
    fn softmax_in_place(row: &mut [f32], lse: f32) {
        for x in row.iter_mut() {
            *x = fast_exp(*x - lse);
        }
    }
}

/// Sampled softmax cross-entropy: each of N queries (N, D) against its
/// own target's embedding and K negatives shared by the batch, from `rows`
/// (N + K, D): the N targets' then the K negatives' embeddings, and their
/// biases `bias` (N + K). Every logit is corrected by its item's log q
/// (logQ), a negative that is the row's own target is masked (-1e9), and
/// the target is class 0. One operation instead of a graph of a dozen
/// (products, sums, broadcasts, a mask, a concatenation), each with a
/// fresh buffer and a gradient to add up on the way back.
pub struct SampledSoftmax {
    targets: Vec<u32>,
    negatives: Vec<u32>,
    /// log q of the N targets, then of the K negatives.
    log_q: Vec<f32>,
    /// The softmax of the forward pass: the targets' (N), the negatives' (N, K).
    probs: std::sync::Mutex<(Vec<f32>, Vec<f32>)>,
}

impl SampledSoftmax {
    pub fn new(targets: Vec<u32>, negatives: Vec<u32>, log_q: Vec<f32>) -> Self {
        SampledSoftmax {
            targets,
            negatives,
            log_q,
            probs: std::sync::Mutex::new((Vec::new(), Vec::new())),
        }
    }
}

impl CustomOp3 for SampledSoftmax {
    fn name(&self) -> &'static str {
        "recd-sampled-softmax"
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
        let (q, rows, bias) = (contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?);
        let ((n, d), (nk, d2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let k = self.negatives.len();
        if d != d2 || nk != n + k || bias.len() != nk || self.targets.len() != n || self.log_q.len() != nk {
            bail!(
                "sampled softmax: queries {:?}, rows {:?}, bias {:?}, {} targets, {k} negatives",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.targets.len()
            );
        }
        let (pos_rows, neg_rows) = rows.split_at(n * d);
        // The negatives' logits: one product, then bias - log q and the mask.
        let mut neg = vec![0f32; n * k];
        gemm_scaled(n, k, d, plain(q), transposed(neg_rows), &mut neg, false, 1.0, 1);
        let mut pos = vec![0f32; n];
        let mut losses = vec![0f32; n];
        let mut row = vec![0f32; k + 1];
        for r in 0..n {
            let qr = &q[r * d..(r + 1) * d];
            let dot = qr
                .iter()
                .zip(&pos_rows[r * d..(r + 1) * d])
                .map(|(a, b)| a * b)
                .sum::<f32>();
            row[0] = dot + bias[r] - self.log_q[r];
            let negs = &mut neg[r * k..(r + 1) * k];
            for (j, x) in negs.iter_mut().enumerate() {
                *x = *x + bias[n + j] - self.log_q[n + j];
                if self.negatives[j] == self.targets[r] {
                    *x += -1e9;
                }
            }
            row[1..].copy_from_slice(negs);
            let lse = log_sum_exp(&row);
            losses[r] = lse - row[0];
            pos[r] = fast_exp(row[0] - lse);
            softmax_in_place(negs, lse);
        }
        let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / n.max(1) as f64;
        *self.probs.lock().expect("softmax cache") = (pos, neg);
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        rows: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d) = q.dims2()?;
        let k = self.negatives.len();
        let scale = grad.to_scalar::<f32>()? / n.max(1) as f32;
        let (mut pos, neg) = std::mem::take(&mut *self.probs.lock().expect("softmax cache"));
        if pos.len() != n || neg.len() != n * k {
            bail!("sampled softmax: backward without its forward pass");
        }
        // softmax - one-hot (the target is class 0), short of the scale.
        for p in pos.iter_mut() {
            *p -= 1.0;
        }
        let mut d_q = vec![0f32; n * d];
        let mut d_rows = vec![0f32; (n + k) * d];
        with_f32s(q, |q| {
            with_f32s(rows, |rows| {
                let (pos_rows, neg_rows) = rows.split_at(n * d);
                gemm_scaled(n, d, k, plain(&neg), plain(neg_rows), &mut d_q, false, scale, 1);
                let (d_pos, d_neg) = d_rows.split_at_mut(n * d);
                gemm_scaled(k, d, n, transposed(&neg), plain(q), d_neg, false, scale, 1);
                for (r, &p) in pos.iter().enumerate() {
                    let p = p * scale;
                    let span = r * d..(r + 1) * d;
                    for ((dq, dp), (&qv, &rv)) in d_q[span.clone()]
                        .iter_mut()
                        .zip(&mut d_pos[span.clone()])
                        .zip(q[span.clone()].iter().zip(&pos_rows[span]))
                    {
                        *dq += p * rv;
                        *dp = p * qv;
                    }
                }
            })
        })??;
        let mut d_bias: Vec<f32> = pos.iter().map(|&p| p * scale).collect();
        let mut d_neg_bias = vec![0f32; k];
        column_sums(&mut d_neg_bias, &neg, scale);
        d_bias.extend_from_slice(&d_neg_bias);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(d_q, (n, d), dev)?),
            Some(Tensor::from_vec(d_rows, (n + k, d), dev)?),
            Some(Tensor::from_vec(d_bias, n + k, dev)?),
        ))
    }
}

/// log(sum(exp(row))), with eight running lanes so that the reductions
/// vectorise (a plain float sum is sequential by the language's rules).
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; 8];
    for c in chunks.clone() {
        for k in 0..8 {
            lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
        }
    }
    let max = rest
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut sums = [0f32; 8];
    for c in chunks {
        for k in 0..8 {
            sums[k] += fast_exp(c[k] - max);
        }
    }
    let sum = sums.iter().sum::<f32>() + rest.iter().map(|&x| fast_exp(x - max)).sum::<f32>();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn sampled_softmax_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3), &dev)?)?;

        // Sampled: 5 queries, their targets' rows then 4 negatives' rows,
        // the second negative being the third query's own target.
        let (targets, negatives) = (vec![1u32, 2, 3, 4, 5], vec![9u32, 3, 8, 7]);
        let log_q: Vec<f32> = (0..9).map(|i| -1.0 - 0.1 * i as f32).collect();
        let rows = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 3), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, 9, &dev)?)?;
        let fused = q.apply_op3(
            rows.as_tensor(),
            bias.as_tensor(),
            SampledSoftmax::new(targets.clone(), negatives.clone(), log_q.clone()),
        )?;
        let lq = Tensor::new(log_q.as_slice(), &dev)?;
        let pos = ((q.as_tensor() * rows.narrow(0, 0, 5)?)?.sum(1)? + bias.narrow(0, 0, 5)?)?;
        let pos = (pos - lq.narrow(0, 0, 5)?)?;
        let mask: Vec<f32> = targets
            .iter()
            .flat_map(|&t| negatives.iter().map(move |&j| if j == t { -1e9 } else { 0.0 }))
            .collect();
        let neg = q
            .matmul(&rows.narrow(0, 5, 4)?.t()?)?
            .broadcast_add(&bias.narrow(0, 5, 4)?)?
            .broadcast_sub(&lq.narrow(0, 5, 4)?)?;
        let neg = (neg + Tensor::from_vec(mask, (5, 4), &dev)?)?;
        let logits = Tensor::cat(&[&pos.unsqueeze(1)?, &neg], 1)?;
        let plain = candle_nn::loss::cross_entropy(&logits, &Tensor::zeros(5, candle_core::DType::U32, &dev)?)?;
        assert!((fused.to_scalar::<f32>()? - plain.to_scalar::<f32>()?).abs() < 1e-5);
        let (ga, gb) = ((fused * 3.0)?.backward()?, (plain * 3.0)?.backward()?);
        for v in [&q, &rows, &bias] {
            let diff = (ga.get(v).unwrap() - gb.get(v).unwrap())?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-5);
        }
        Ok(())
    }
}
