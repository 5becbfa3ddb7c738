//! [`AdamW`]: the AdamW optimiser of `candle_nn` (same parameters, same update) with one fused
//! in-place loop per tensor on the CPU.
//!
//! `candle_nn::AdamW` runs about ten tensor ops per parameter and step (each a pass over memory
//! and a new tensor); this one updates the weight, the first and the second moment in a single
//! multi-threaded pass over each f32 CPU `Var`. Other dtypes and devices run candle's formula
//! with tensor ops.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Var};
use candle_nn::Optimizer;
pub use candle_nn::ParamsAdamW;
use rayon::prelude::*;
use std::sync::Mutex;

/// Values per rayon task of the update loop.
const CHUNK: usize = 32 * 1024;

/// The moments of one parameter: f32 vectors for f32 CPU `Var`s, tensors otherwise.
#[derive(Debug)]
enum Moments {
    Cpu(Mutex<(Vec<f32>, Vec<f32>)>),
    Tensors { m: Var, v: Var },
}

#[derive(Debug)]
struct Param {
    var: Var,
    moments: Moments,
}

/// AdamW (decoupled weight decay), a drop-in replacement for `candle_nn::AdamW`: the same
/// [`ParamsAdamW`] (defaults lr 1e-3, betas 0.9 / 0.999, eps 1e-8, weight decay 0.01) and the same
/// update, implementing [`candle_nn::Optimizer`].
///
/// ```rust,ignore
/// let mut opt = internimage::AdamW::new_lr(tm.vars(), 1e-3)?;
/// opt.backward_step(&loss)?;
/// ```
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    step_t: usize,
    config: ParamsAdamW,
}

/// The fused update of one f32 tensor, applied in place to the weight.
struct Update<'a> {
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
}

impl Update<'_> {
    fn chunk(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let nm = *m * b1 + g * (1.0 - b1);
            let nv = *v * b2 + g * g * (1.0 - b2);
            *m = nm;
            *v = nv;
            let m_hat = nm * self.scale_m;
            let v_hat = nv * self.scale_v;
            *w = *w * self.decay - self.lr * (m_hat / (v_hat.sqrt() + self.eps));
        }
    }
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "internimage-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = crate::ops::contiguous_slice::<f32>(s2, l2, "AdamW", "gradient")?;
        let (a, b) = match l1.contiguous_offsets() {
            Some(o) => o,
            None => candle_core::bail!("AdamW: the parameter must be contiguous"),
        };
        let w = match s1 {
            CpuStorage::F32(w) if b <= w.len() => &mut w[a..b],
            _ => candle_core::bail!("AdamW: expected an f32 parameter"),
        };
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::msg("AdamW: poisoned moments"))?;
        let (m, v) = &mut *guard;
        if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!(
                "AdamW: parameter of {} values, gradient of {}",
                w.len(),
                g.len()
            )
        }
        if w.len() <= CHUNK {
            self.chunk(w, g, m, v);
        } else {
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (m, v))| self.chunk(w, g, m, v));
        }
        Ok(())
    }
}

impl AdamW {
    /// AdamW with learning rate `lr` and the other parameters at their defaults.
    pub fn new_lr(vars: Vec<Var>, lr: f64) -> Result<Self> {
        Self::new(
            vars,
            ParamsAdamW {
                lr,
                ..ParamsAdamW::default()
            },
        )
    }

    /// The parameters (learning rate, betas, eps, weight decay).
    pub fn params(&self) -> &ParamsAdamW {
        &self.config
    }

    /// Replaces the parameters (e.g. a new weight decay); the moments are kept.
    pub fn set_params(&mut self, config: ParamsAdamW) {
        self.config = config;
    }

    /// The `Var`s being optimised.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, config: ParamsAdamW) -> Result<Self> {
        let params = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let fused = var.device().is_cpu()
                    && var.dtype() == DType::F32
                    && var.as_tensor().is_contiguous();
                let moments = if fused {
                    let n = var.elem_count();
                    // Zeros written, not calloc'd: the first update reads them before it writes
                    // (see `ops::written_zeros`).
                    let zeros = || crate::ops::written_zeros(n, 0f32);
                    Moments::Cpu(Mutex::new((zeros(), zeros())))
                } else {
                    let z = || Var::zeros(var.shape(), var.dtype(), var.device());
                    Moments::Tensors { m: z()?, v: z()? }
                };
                Ok(Param { var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            step_t: 0,
            config,
        })
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let c = &self.config;
        let (lr, lambda) = (c.lr, c.weight_decay);
        let scale_m = 1.0 / (1.0 - c.beta1.powi(self.step_t as i32));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(self.step_t as i32));
        // One hand-off to the pool for all parameters' updates, not one per parameter (see
        // `cpu::on_pool`).
        let params = &self.params;
        let on_cpu = params.iter().all(|p| p.var.device().is_cpu());
        let update_all = || -> Result<()> {
            for p in params {
                let theta = p.var.as_tensor();
                let Some(g) = grads.get(theta) else {
                    continue;
                };
                match &p.moments {
                    Moments::Cpu(moments) if g.dtype() == DType::F32 && g.device().is_cpu() => {
                        let update = Update {
                            moments,
                            lr: lr as f32,
                            decay: (1.0 - lr * lambda) as f32,
                            beta1: c.beta1 as f32,
                            beta2: c.beta2 as f32,
                            scale_m: scale_m as f32,
                            scale_v: scale_v as f32,
                            eps: c.eps as f32,
                        };
                        theta.inplace_op2(&g.contiguous()?, &update)?;
                    }
                    Moments::Cpu(_) => {
                        candle_core::bail!(
                            "AdamW: an f32 CPU parameter got a {:?} gradient",
                            g.dtype()
                        )
                    }
                    Moments::Tensors { m, v } => {
                        let next_m = ((m.as_tensor() * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                        let next_v = ((v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                        let m_hat = (&next_m * scale_m)?;
                        let v_hat = (&next_v * scale_v)?;
                        let next_theta = (theta * (1.0 - lr * lambda))?;
                        let adjusted = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                        let next_theta = (next_theta - (adjusted * lr)?)?;
                        m.set(&next_m)?;
                        v.set(&next_v)?;
                        p.var.set(&next_theta)?;
                    }
                }
            }
            Ok(())
        };
        if on_cpu {
            crate::cpu::on_pool(update_all)
        } else {
            update_all()
        }
    }
}
