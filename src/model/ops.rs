//! The fused candle operations that the training step spends its time in:
//! a whole LSTM layer, and the two output heads (full softmax over the
//! catalogue, sampled softmax), each from the queries to the mean loss with
//! its own backward pass. Unfused, each is a dozen tensor ops with a fresh
//! buffer apiece.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::optim::with_f32s;
use super::simd::{multiversion, threads};

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("expected a contiguous f32 tensor"),
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// exp(x) for f32 by range reduction and a degree-6 polynomial; branch-free
/// so that loops over it vectorise. Relative error about 2e-7.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5 * 2^23 trick: `round()` is a libm call
    // on baseline x86-64 and stops vectorisation.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
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

/// A row-major matrix operand: its rows x cols and whether the slice holds
/// it transposed (cols x rows).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    transposed: bool,
}

/// out (m x n, row-major) (+)= a (m x k) * b (k x n) on one thread, with the
/// `gemm` crate (the kernels under candle's own matrix product) and none
/// of a graph's allocations.
fn gemm_into(m: usize, n: usize, k: usize, a: Mat<'_>, b: Mat<'_>, out: &mut [f32], accumulate: bool) {
    gemm_scaled(m, n, k, a, b, out, accumulate, 1.0, 1);
}

/// out (m x n, row-major) (+)= scale * a (m x k) * b (k x n), on `threads`
/// cores (each element of the result is summed on one of them, in the
/// same order whatever their number).
#[allow(clippy::too_many_arguments)]
fn gemm_scaled(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    out: &mut [f32],
    accumulate: bool,
    scale: f32,
    threads: usize,
) {
    assert!(
        a.data.len() >= m * k && b.data.len() >= k * n && out.len() >= m * n,
        "gemm: operand sizes"
    );
    let (a_rs, a_cs) = if a.transposed { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b.transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the sizes were checked above; the strides stay inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

fn plain(data: &[f32]) -> Mat<'_> {
    Mat {
        data,
        transposed: false,
    }
}

fn transposed(data: &[f32]) -> Mat<'_> {
    Mat { data, transposed: true }
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

/// Rows per parallel task for rows of `c` columns: tasks of at least
/// about 16K elements, below which a thread costs more than it saves.
fn rows_per_task(c: usize) -> usize {
    (1 << 14) / c.max(1) + 1
}

multiversion! {
    /// row = exp(row - lse), in place.
    fn softmax_in_place(row: &mut [f32], lse: f32) {
        for x in row.iter_mut() {
            *x = fast_exp(*x - lse);
        }
    }
}

multiversion! {
    fn add_into(acc: &mut [f32], x: &[f32]) {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

/// sums = scale * the column sums of `rows` (row-major, sums.len()
/// columns), columns split between the cores, rows added in order.
fn column_sums(sums: &mut [f32], rows: &[f32], scale: f32) {
    let c = sums.len();
    if c == 0 {
        return;
    }
    let per = c.div_ceil(threads()).max(1 << 10);
    sums.par_chunks_mut(per).enumerate().for_each(|(k, sums)| {
        let start = k * per;
        sums.fill(0.0);
        for row in rows.chunks_exact(c) {
            add_into(sums, &row[start..start + sums.len()]);
        }
        if scale != 1.0 {
            for s in sums.iter_mut() {
                *s *= scale;
            }
        }
    });
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
    fn fast_exp_is_close() {
        for x in [-80.0f32, -10.0, -1.5, -0.1, 0.0, 0.3, 1.0, 5.0, 20.0, 80.0] {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-5, "exp({x}) = {a}, want {b}");
        }
    }

    #[test]
    fn fused_ops_match_candle() -> Result<()> {
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
