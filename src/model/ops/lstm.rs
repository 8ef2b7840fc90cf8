//! The fused LSTM layer: the whole recurrence over a batch of sequences
//! as one candle operation, with its backward pass through time.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{column_sums, contiguous, fast_exp, gemm_into, gemm_scaled, plain, transposed};
use crate::model::simd::{multiversion, threads};

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// A whole LSTM layer as one operation: (input projections (T, B, 4H),
/// gates in the order i, f, g, o; recurrent weights (4H, H); bias (4H))
/// -> (T, B, H): the hidden state of every step. The cell states and the
/// activated gates stay with the operation for the backward pass (through
/// time, in plain Rust with one matrix product per step), which reads them
/// back instead of recomputing.
/// As separate candle ops, every step's slice of the input would send a
/// full-size zero-padded gradient back: quadratic in the sequence length.
#[derive(Default)]
pub struct LstmLayer {
    /// (T, B, 6H): per step h, c and the gates i, f, g, o.
    saved: std::sync::Mutex<Vec<f32>>,
}

impl CustomOp3 for LstmLayer {
    fn name(&self) -> &'static str {
        "recd-lstm-layer"
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
        let xw = contiguous(s1, l1)?;
        let bias = contiguous(s3, l3)?;
        let (t_len, b, h4) = l1.shape().dims3()?;
        let h = h4 / 4;
        if l2.shape().dims2()? != (h4, h) || bias.len() != h4 {
            bail!(
                "lstm layer: weights {:?} and bias {:?} for inputs {:?}",
                l2.shape(),
                l3.shape(),
                l1.shape()
            );
        }
        let w_hh = contiguous(s2, l2)?;
        let w = 6 * h;
        let mut out = vec![0f32; t_len * b * w];
        // The batch's rows are independent sequences: each core runs the
        // whole recurrence for its share of them.
        let per = rows_per_part(b);
        split_steps(&mut out, t_len, b * w, per * w)
            .into_par_iter()
            .enumerate()
            .for_each(|(part, steps)| {
                let (r0, rows) = (part * per, steps.first().map_or(0, |s| s.len() / w));
                let mut h_prev = vec![0f32; rows * h];
                let mut c_prev = vec![0f32; rows * h];
                let mut rec = vec![0f32; rows * h4];
                for (t, out) in steps.into_iter().enumerate() {
                    for row in rec.chunks_exact_mut(h4) {
                        row.copy_from_slice(bias);
                    }
                    if t > 0 {
                        // bias + h_prev (rows, H) x W_hh^T (H, 4H).
                        gemm_into(rows, h4, h, plain(&h_prev), transposed(w_hh), &mut rec, true);
                    }
                    let x = &xw[(t * b + r0) * h4..(t * b + r0 + rows) * h4];
                    lstm_cells(h, x, &rec, out, &mut h_prev, &mut c_prev);
                }
            });
        let mut hidden = Vec::with_capacity(t_len * b * h);
        for row in out.chunks_exact(w) {
            hidden.extend_from_slice(&row[..h]);
        }
        *self.saved.lock().expect("lstm cache") = out;
        Ok((CpuStorage::F32(hidden), Shape::from((t_len, b, h))))
    }

    fn bwd(
        &self,
        xw: &Tensor,
        w_hh: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t_len, b, h4) = xw.dims3()?;
        let h = h4 / 4;
        let w = 6 * h;
        let saved = self.saved.lock().expect("lstm cache");
        let out: &[f32] = &saved;
        if out.len() != t_len * b * w {
            bail!("lstm layer: backward without its forward pass");
        }
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let w_hh = w_hh.flatten_all()?.to_vec1::<f32>()?;
        let mut d_xw = vec![0f32; t_len * b * h4];
        // Previous hidden states, (T * B, H), for the recurrent weights' gradient.
        let mut h_prevs = vec![0f32; t_len * b * h];
        let per = rows_per_part(b);
        split_steps(&mut d_xw, t_len, b * h4, per * h4)
            .into_par_iter()
            .zip(split_steps(&mut h_prevs, t_len, b * h, per * h))
            .enumerate()
            .for_each(|(part, (mut d_steps, mut hp_steps))| {
                let (r0, rows) = (part * per, d_steps.first().map_or(0, |s| s.len() / h4));
                let mut dh_next = vec![0f32; rows * h];
                let mut dc_next = vec![0f32; rows * h];
                let zeros = vec![0f32; rows * w];
                let at = |t: usize| (t * b + r0) * w..(t * b + r0 + rows) * w;
                for t in (0..t_len).rev() {
                    let prev = if t > 0 { &out[at(t - 1)] } else { &zeros[..] };
                    let d = &mut *d_steps[t];
                    lstm_cells_backward(
                        h,
                        &out[at(t)],
                        prev,
                        &grad[(t * b + r0) * h..(t * b + r0 + rows) * h],
                        d,
                        hp_steps[t],
                        &mut dh_next,
                        &mut dc_next,
                    );
                    if t > 0 {
                        // d gates (rows, 4H) x W_hh (4H, H).
                        gemm_into(rows, h, h4, plain(d), plain(&w_hh), &mut dh_next, false);
                    }
                }
            });
        // d W_hh = sum over steps of d gates^T (4H, B) x h_prev (B, H).
        let mut d_w_hh = vec![0f32; h4 * h];
        gemm_scaled(
            h4,
            h,
            t_len * b,
            transposed(&d_xw),
            plain(&h_prevs),
            &mut d_w_hh,
            false,
            1.0,
            threads(),
        );
        let mut d_bias = vec![0f32; h4];
        column_sums(&mut d_bias, &d_xw, 1.0);
        let dev = xw.device();
        Ok((
            Some(Tensor::from_vec(d_xw, (t_len, b, h4), dev)?),
            Some(Tensor::from_vec(d_w_hh, (h4, h), dev)?),
            Some(Tensor::from_vec(d_bias, h4, dev)?),
        ))
    }
}

/// Rows of a batch per core for the recurrence (at least 16: a smaller
/// share is not worth a thread).
fn rows_per_part(b: usize) -> usize {
    b.div_ceil(threads()).max(16)
}

/// A (steps, rows * width) buffer as, for each part of `part` elements of a
/// step (rows * width elements), its slice of every step.
fn split_steps(buf: &mut [f32], steps: usize, step: usize, part: usize) -> Vec<Vec<&mut [f32]>> {
    let parts = if part == 0 { 0 } else { step.div_ceil(part) };
    let mut out: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::with_capacity(steps)).collect();
    for chunk in buf.chunks_mut(step.max(1)).take(steps) {
        for (k, piece) in chunk.chunks_mut(part.max(1)).enumerate() {
            out[k].push(piece);
        }
    }
    out
}

/// `len`-element slices `k * len..(k + 1) * len` of `s`, for k < N.
#[inline(always)]
fn parts<const N: usize>(s: &[f32], len: usize) -> [&[f32]; N] {
    std::array::from_fn(|k| &s[k * len..(k + 1) * len])
}

multiversion! {
    /// One step of the LSTM for B rows: input projections `xw` and bias +
    /// recurrent products `rec` (B, 4H) to the saved (B, 6H) `out` (h, c,
    /// i, f, g, o), the state carried in `h_prev` and `c_prev` (B, H).
    fn lstm_cells(h: usize, xw: &[f32], rec: &[f32], out: &mut [f32], h_prev: &mut [f32], c_prev: &mut [f32]) {
        let rows = xw
            .chunks_exact(4 * h)
            .zip(rec.chunks_exact(4 * h))
            .zip(out.chunks_exact_mut(6 * h))
            .zip(h_prev.chunks_exact_mut(h).zip(c_prev.chunks_exact_mut(h)));
        for (((x, g), o), (hp, cp)) in rows {
            let [xi, xf, xg, xo] = parts::<4>(x, h);
            let [gi, gf, gg, go] = parts::<4>(g, h);
            let (hp, cp) = (&mut hp[..h], &mut cp[..h]);
            let (oh, o) = o.split_at_mut(h);
            let (oc, o) = o.split_at_mut(h);
            let (oi, o) = o.split_at_mut(h);
            let (of, o) = o.split_at_mut(h);
            let (og, oo) = o.split_at_mut(h);
            let (oh, oc, oi, of, og, oo) = (&mut oh[..h], &mut oc[..h], &mut oi[..h], &mut of[..h], &mut og[..h], &mut oo[..h]);
            for k in 0..h {
                let ig = sigmoid(xi[k] + gi[k]);
                let fg = sigmoid(xf[k] + gf[k]);
                let g = tanh(xg[k] + gg[k]);
                let o = sigmoid(xo[k] + go[k]);
                let c = fg * cp[k] + ig * g;
                let hn = o * tanh(c);
                oh[k] = hn;
                oc[k] = c;
                oi[k] = ig;
                of[k] = fg;
                og[k] = g;
                oo[k] = o;
                hp[k] = hn;
                cp[k] = c;
            }
        }
    }
}

multiversion! {
    /// The backward of one step for B rows: the saved `out` of this step
    /// and `prev` of the one before (zeros at the first), the hidden
    /// states' gradient `grad` (B, H) to the gates' `d` (B, 4H); records the
    /// previous hidden states in `h_prevs` and carries `dh_next` (in: from
    /// the later step's recurrence) and `dc_next`.
    #[allow(clippy::too_many_arguments)]
    fn lstm_cells_backward(
        h: usize,
        out: &[f32],
        prev: &[f32],
        grad: &[f32],
        d: &mut [f32],
        h_prevs: &mut [f32],
        dh_next: &mut [f32],
        dc_next: &mut [f32],
    ) {
        let rows = out
            .chunks_exact(6 * h)
            .zip(prev.chunks_exact(6 * h))
            .zip(grad.chunks_exact(h))
            .zip(d.chunks_exact_mut(4 * h))
            .zip(h_prevs.chunks_exact_mut(h).zip(dh_next.chunks_exact_mut(h).zip(dc_next.chunks_exact_mut(h))));
        for ((((o, p), gr), d), (hps, (dhn, dcn))) in rows {
            let [_, c, i, f, g, og] = parts::<6>(o, h);
            let [hp, cp, ..] = parts::<6>(p, h);
            let gr = &gr[..h];
            let (hps, dhn, dcn) = (&mut hps[..h], &mut dhn[..h], &mut dcn[..h]);
            let (di, d) = d.split_at_mut(h);
            let (df, d) = d.split_at_mut(h);
            let (dg, do_) = d.split_at_mut(h);
            let (di, df, dg, do_) = (&mut di[..h], &mut df[..h], &mut dg[..h], &mut do_[..h]);
            for k in 0..h {
                hps[k] = hp[k];
                let tc = tanh(c[k]);
                let dh = gr[k] + dhn[k];
                let dc = dcn[k] + dh * og[k] * (1.0 - tc * tc);
                di[k] = dc * g[k] * i[k] * (1.0 - i[k]);
                df[k] = dc * cp[k] * f[k] * (1.0 - f[k]);
                dg[k] = dc * i[k] * (1.0 - g[k] * g[k]);
                do_[k] = dh * tc * og[k] * (1.0 - og[k]);
                dcn[k] = dc * f[k];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn lstm_layer_matches_candle() -> Result<()> {
        let dev = Device::Cpu;

        // The layer against the same recurrence in plain candle ops.
        let (t_len, b, h) = (4, 3, 2);
        let xw = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t_len, b, 4 * h), &dev)?)?;
        let w_hh = Var::from_tensor(&Tensor::randn(0f32, 0.5, (4 * h, h), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 4 * h, &dev)?)?;
        let fused = xw.apply_op3(w_hh.as_tensor(), bias.as_tensor(), LstmLayer::default())?;
        let s = candle_nn::ops::sigmoid;
        let (mut hs, mut hp, mut cp) = (
            Vec::new(),
            Tensor::zeros((b, h), candle_core::DType::F32, &dev)?,
            Tensor::zeros((b, h), candle_core::DType::F32, &dev)?,
        );
        for t in 0..t_len {
            let pre = (xw.get(t)? + hp.matmul(&w_hh.t()?)?)?.broadcast_add(bias.as_tensor())?;
            let gate = |i: usize| pre.narrow(1, i * h, h);
            cp = ((s(&gate(1)?)? * &cp)? + (s(&gate(0)?)? * gate(2)?.tanh()?)?)?;
            hp = (s(&gate(3)?)? * cp.tanh()?)?;
            hs.push(hp.clone());
        }
        let plain = Tensor::stack(&hs, 0)?;
        assert!((fused.clone() - &plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let w = Tensor::randn(0f32, 1.0, (t_len, b, h), &dev)?;
        let (ga, gb) = (
            (fused * &w)?.sum_all()?.backward()?,
            (plain * &w)?.sum_all()?.backward()?,
        );
        for v in [&xw, &w_hh, &bias] {
            let diff = (ga.get(v).unwrap() - gb.get(v).unwrap())?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-4, "{diff}");
        }
        Ok(())
    }
}
