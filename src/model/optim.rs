//! AdamW in one pass over each parameter. candle-nn's AdamW builds about a
//! dozen whole-size temporary tensors per parameter per step; for a
//! catalogue-sized embedding that was a large share of a training step.

use candle_core::{Result, Tensor, Var};
use candle_nn::ParamsAdamW;

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
    /// decay, bias-corrected moments; the same rule as candle-nn's).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let p = &self.params;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let scale_m = 1.0 / (1.0 - b1.powi(self.step));
        let scale_v = 1.0 / (1.0 - b2.powi(self.step));
        let (lr, eps) = (p.lr as f32, p.eps as f32);
        let decay = 1.0 - (p.lr * p.weight_decay) as f32;
        for (var, m, v) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            let theta = with_f32s(g, |g| {
                with_f32s(var.as_tensor(), |theta| {
                    let mut next = Vec::with_capacity(theta.len());
                    for (((t, m), v), g) in theta.iter().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        next.push(t * decay - lr * (*m * scale_m) / ((*v * scale_v).sqrt() + eps));
                    }
                    next
                })
            })??;
            var.set(&Tensor::from_vec(theta, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

/// Runs `f` on a tensor's f32 values in place when they are contiguous in
/// CPU memory (no copy), on a copy otherwise.
fn with_f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
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
