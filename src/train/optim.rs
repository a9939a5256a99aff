//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments),
//! with its state exposed so checkpoints can restore it exactly (candle-nn's keeps it private).
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    /// First and second moments, one pair per var.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    t: u64,
}

/// Everything of an [`AdamW`] that a checkpoint carries.
pub struct AdamWState {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// The moments and the step count, for a checkpoint.
    pub fn state(&self) -> AdamWState {
        AdamWState {
            m: self.m.clone(),
            v: self.v.clone(),
            t: self.t,
        }
    }

    /// Continues from a checkpoint's state; its moments must match the parameters' shapes.
    pub fn restore(&mut self, state: AdamWState) -> Result<()> {
        if state.m.len() != self.vars.len() || state.v.len() != self.vars.len() {
            bail!(
                "optimizer state has {} / {} moments for {} parameters",
                state.m.len(),
                state.v.len(),
                self.vars.len()
            );
        }
        for (i, var) in self.vars.iter().enumerate() {
            if state.m[i].dims() != var.dims() || state.v[i].dims() != var.dims() {
                bail!(
                    "optimizer state: moment {i} has shape {:?}, parameter {:?}",
                    state.m[i].dims(),
                    var.dims()
                );
            }
        }
        self.m = state.m;
        self.v = state.v;
        self.t = state.t;
        Ok(())
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr` from gradients `grads[i]` (aligned with `vars`).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            );
        }
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            self.m[i] = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let theta = self.vars[i].as_tensor();
            let theta = if p.weight_decay != 0.0 {
                (theta * (1.0 - lr * p.weight_decay))?
            } else {
                theta.clone()
            };
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&self.m[i] / denom)? * (lr / bc1))?;
            self.vars[i].set(&(theta - update)?)?;
        }
        Ok(())
    }
}

/// Global L2 norm of a set of gradients (f64 accumulation).
pub(crate) fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for g in grads {
        s += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
pub(crate) fn clip_grads(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(())
}
