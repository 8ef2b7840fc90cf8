//! Two fused candle operations that the training step spends its time in:
//! an LSTM cell (gates to the next hidden and cell state) and softmax
//! cross-entropy (logits to mean loss, with the softmax-minus-one-hot
//! gradient). Unfused, each is a dozen tensor ops with a fresh buffer apiece.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("expected a contiguous f32 tensor"),
    }
}

fn contiguous_u32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let data = storage.as_slice::<u32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("expected a contiguous u32 tensor"),
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[inline]
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// exp(x) for f32 by range reduction and a degree-6 polynomial; branch-free
/// so that loops over it vectorise. Relative error about 2e-7.
#[inline]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// (pre-activations (B, 4H) in gate order i, f, g, o; previous cell (B, H))
/// -> (B, 2H): the new hidden state, then the new cell state.
pub struct LstmCell;

impl CustomOp2 for LstmCell {
    fn name(&self) -> &'static str {
        "recd-lstm-cell"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (pre, c_prev) = (contiguous(s1, l1)?, contiguous(s2, l2)?);
        let (b, h4) = l1.shape().dims2()?;
        let h = h4 / 4;
        if l2.shape().dims2()? != (b, h) {
            bail!(
                "lstm cell: cell state shape {:?} for gates {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let mut out = vec![0f32; b * 2 * h];
        for r in 0..b {
            let g = &pre[r * h4..(r + 1) * h4];
            let cp = &c_prev[r * h..(r + 1) * h];
            let (oh, oc) = out[r * 2 * h..(r + 1) * 2 * h].split_at_mut(h);
            for k in 0..h {
                let (i, f, gg, o) = (
                    sigmoid(g[k]),
                    sigmoid(g[h + k]),
                    tanh(g[2 * h + k]),
                    sigmoid(g[3 * h + k]),
                );
                let c = f * cp[k] + i * gg;
                oc[k] = c;
                oh[k] = o * tanh(c);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 2 * h))))
    }

    fn bwd(
        &self,
        pre: &Tensor,
        c_prev: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, h4) = pre.dims2()?;
        let h = h4 / 4;
        let pre_v = pre.flatten_all()?.to_vec1::<f32>()?;
        let cp_v = c_prev.flatten_all()?.to_vec1::<f32>()?;
        let res_v = res.flatten_all()?.to_vec1::<f32>()?;
        let grad_v = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut d_pre = vec![0f32; b * h4];
        let mut d_cp = vec![0f32; b * h];
        for r in 0..b {
            let g = &pre_v[r * h4..(r + 1) * h4];
            for k in 0..h {
                let (i, f, gg, o) = (
                    sigmoid(g[k]),
                    sigmoid(g[h + k]),
                    tanh(g[2 * h + k]),
                    sigmoid(g[3 * h + k]),
                );
                let c = res_v[r * 2 * h + h + k];
                let tc = tanh(c);
                let dh = grad_v[r * 2 * h + k];
                let dc = grad_v[r * 2 * h + h + k] + dh * o * (1.0 - tc * tc);
                let dp = &mut d_pre[r * h4..(r + 1) * h4];
                dp[k] = dc * gg * i * (1.0 - i);
                dp[h + k] = dc * cp_v[r * h + k] * f * (1.0 - f);
                dp[2 * h + k] = dc * i * (1.0 - gg * gg);
                dp[3 * h + k] = dh * tc * o * (1.0 - o);
                d_cp[r * h + k] = dc * f;
            }
        }
        Ok((
            Some(Tensor::from_vec(d_pre, (b, h4), pre.device())?),
            Some(Tensor::from_vec(d_cp, (b, h), pre.device())?),
        ))
    }
}

/// Runs `f` over row blocks of `rows` rows of width `width` on the machine's
/// cores; `f(first_row, block)`.
fn par_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / width.max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.max(1));
    if threads <= 1 || out.len() < 1 << 16 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, block) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            scope.spawn(move || f(t * per, block));
        }
    });
}

/// Mean softmax cross-entropy of logits (N, C) against target columns (N,
/// u32). The backward pass is the fused softmax-minus-one-hot.
pub struct SoftmaxCrossEntropy;

impl CustomOp2 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "recd-softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets) = (contiguous(s1, l1)?, contiguous_u32(s2, l2)?);
        let (n, c) = l1.shape().dims2()?;
        if targets.len() != n {
            bail!("cross-entropy: {} targets for {n} rows", targets.len());
        }
        let mut losses = vec![0f32; n];
        par_rows(&mut losses, 1, |first, block| {
            for (k, loss) in block.iter_mut().enumerate() {
                let r = first + k;
                let row = &logits[r * c..(r + 1) * c];
                let lse = log_sum_exp(row);
                *loss = lse - row[targets[r] as usize];
            }
        });
        let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / n.max(1) as f64;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = logits.dims2()?.0;
        let scale = grad.to_scalar::<f32>()? / n.max(1) as f32;
        let d = logits.apply_op2_no_bwd(targets, &SoftmaxGrad { scale })?;
        Ok((Some(d), None))
    }
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| fast_exp(x - max)).sum();
    max + sum.ln()
}

struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "recd-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, targets) = (contiguous(s1, l1)?, contiguous_u32(s2, l2)?);
        let (n, c) = l1.shape().dims2()?;
        let mut out = vec![0f32; n * c];
        par_rows(&mut out, c, |first, block| {
            for (k, d) in block.chunks_exact_mut(c).enumerate() {
                let r = first + k;
                let row = &logits[r * c..(r + 1) * c];
                let lse = log_sum_exp(row);
                for (d, &x) in d.iter_mut().zip(row) {
                    *d = fast_exp(x - lse) * self.scale;
                }
                d[targets[r] as usize] -= self.scale;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fast_exp_is_close() {
        for x in [-80.0f32, -10.0, -1.5, -0.1, 0.0, 0.3, 1.0, 5.0, 20.0, 80.0] {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-5, "exp({x}) = {a}, want {b}");
        }
    }

    #[test]
    fn fused_ops_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 2.0, (5, 7), &dev)?)?;
        let targets = Tensor::new(&[0u32, 3, 6, 2, 2], &dev)?;
        let fused = logits.apply_op2(&targets, SoftmaxCrossEntropy)?;
        let plain = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets)?;
        let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5);
        let (ga, gb) = (fused.backward()?, plain.backward()?);
        let diff = (ga.get(&logits).unwrap() - gb.get(&logits).unwrap())?
            .abs()?
            .max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-5);

        let pre = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 8), &dev)?)?;
        let c = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2), &dev)?)?;
        let fused = pre.apply_op2(c.as_tensor(), LstmCell)?;
        let gate = |i: usize| pre.narrow(1, 2 * i, 2);
        let s = candle_nn::ops::sigmoid;
        let cn = ((s(&gate(1)?)? * c.as_tensor())? + (s(&gate(0)?)? * gate(2)?.tanh()?)?)?;
        let hn = (s(&gate(3)?)? * cn.tanh()?)?;
        let plain = Tensor::cat(&[&hn, &cn], 1)?;
        assert!((fused.clone() - &plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let w = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let (ga, gb) = (
            (fused * &w)?.sum_all()?.backward()?,
            (plain * &w)?.sum_all()?.backward()?,
        );
        for v in [&pre, &c] {
            let diff = (ga.get(v).unwrap() - gb.get(v).unwrap())?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-4);
        }
        Ok(())
    }
}
