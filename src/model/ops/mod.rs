//! The fused candle operations that the training step spends its time in:
//! a whole LSTM layer, and the two output heads (full softmax over the
//! catalogue, sampled softmax), each from the queries to the mean loss with
//! its own backward pass. Unfused, each is a dozen tensor ops with a fresh
//! buffer apiece.
//!
//! One file per operation, each with its CPU kernels and its tests:
//! [`LstmLayer`] in `lstm`, [`FullSoftmax`] in `full_softmax` and
//! [`SampledSoftmax`] in `sampled_softmax`; this module holds what they
//! share (the contiguous-slice check, `fast_exp`, the `gemm` wrappers and
//! the column sums).

use candle_core::{bail, CpuStorage, Layout, Result};

use rayon::prelude::*;

use super::simd::{multiversion, threads};

mod full_softmax;
mod lstm;
mod sampled_softmax;

pub use full_softmax::FullSoftmax;
pub use lstm::LstmLayer;
pub use sampled_softmax::SampledSoftmax;

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("expected a contiguous f32 tensor"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close() {
        for x in [-80.0f32, -10.0, -1.5, -0.1, 0.0, 0.3, 1.0, 5.0, 20.0, 80.0] {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-5, "exp({x}) = {a}, want {b}");
        }
    }
}
