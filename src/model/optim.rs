//! AdamW in one pass over each parameter. candle-nn's AdamW builds about a
//! dozen whole-size temporary tensors per parameter per step; for a
//! catalogue-sized embedding that was a large share of a training step.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

use super::simd::multiversion;

pub struct AdamW {
    params: ParamsAdamW,
    step: i32,
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Self {
        let vars = vars
            .into_iter()
            .map(|v| {
                let n = v.elem_count();
                (v, vec![0f32; n], vec![0f32; n])
            })
            .collect();
        AdamW { params, step: 0, vars }
    }

    /// Back-propagates `loss` and updates every parameter (decoupled weight
    /// decay, bias-corrected moments; the same rule as candle-nn's), in
    /// place: no parameter-sized buffer is made or copied.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let p = &self.params;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let coefs = Coefs {
            b1,
            b2,
            scale_m: 1.0 / (1.0 - b1.powi(self.step)),
            scale_v: 1.0 / (1.0 - b2.powi(self.step)),
            lr: p.lr as f32,
            eps: p.eps as f32,
            decay: 1.0 - (p.lr * p.weight_decay) as f32,
        };
        for (var, m, v) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            with_f32s(g, |g| {
                var.as_tensor().inplace_op1(&Update {
                    g,
                    moments: RefCell::new((m, v)),
                    coefs,
                })
            })??;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Coefs {
    b1: f32,
    b2: f32,
    scale_m: f32,
    scale_v: f32,
    lr: f32,
    eps: f32,
    decay: f32,
}

/// One parameter's update, applied to its storage in place.
struct Update<'a> {
    g: &'a [f32],
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    coefs: Coefs,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "recd-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            bail!("adamw: expected a contiguous f32 parameter")
        };
        let theta = &mut data[start..end];
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != self.g.len() || m.len() != theta.len() || v.len() != theta.len() {
            bail!("adamw: {} values, {} gradients", theta.len(), self.g.len())
        }
        // Blocks of a fixed size: the result does not depend on the threads.
        const BLOCK: usize = 1 << 14;
        let c = self.coefs;
        if theta.len() <= BLOCK {
            adamw(theta, m, v, self.g, c);
        } else {
            theta
                .par_chunks_mut(BLOCK)
                .zip(m.par_chunks_mut(BLOCK))
                .zip(v.par_chunks_mut(BLOCK))
                .zip(self.g.par_chunks(BLOCK))
                .for_each(|(((t, m), v), g)| adamw(t, m, v, g, c));
        }
        Ok(())
    }
}

multiversion! {
    fn adamw(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: Coefs) {
        for (((t, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = c.b1 * *m + (1.0 - c.b1) * g;
            *v = c.b2 * *v + (1.0 - c.b2) * g * g;
            *t = *t * c.decay - c.lr * (*m * c.scale_m) / ((*v * c.scale_v).sqrt() + c.eps);
        }
    }
}

/// Runs `f` on a tensor's f32 values in place when they are contiguous in
/// CPU memory (no copy), on a copy otherwise.
pub(crate) fn with_f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer;

    #[test]
    fn matches_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let start = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &dev)?;
        let (a, b) = (Var::from_tensor(&start)?, Var::from_tensor(&start)?);
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        };
        let mut ours = AdamW::new(vec![a.clone()], params.clone());
        let mut theirs = candle_nn::AdamW::new(vec![b.clone()], params)?;
        for _ in 0..5 {
            ours.backward_step(&a.as_tensor().sqr()?.sum_all()?)?;
            theirs.backward_step(&b.as_tensor().sqr()?.sum_all()?)?;
        }
        let diff = (a.as_tensor() - b.as_tensor())?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
