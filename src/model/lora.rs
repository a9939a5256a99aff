//! LoRA: y = W x + scale * B (A dropout(x)), with W frozen and A, B trainable (PEFT's math).
use super::ops::frozen_linear;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which network runs: the policy (LoRA on) or the reference (LoRA off, same weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub lora: bool,
    /// Dropout on the LoRA branch; `None` = evaluation mode.
    pub dropout: Option<DropoutKey>,
    /// Build the backprop graph through the LoRA weights. Passes whose result is detached
    /// anyway (the KL pass, evaluation) skip it so their intermediates are freed at once.
    pub grad: bool,
}

impl Forward {
    pub const REFERENCE: Forward = Forward {
        lora: false,
        dropout: None,
        grad: false,
    };
    pub const POLICY_EVAL: Forward = Forward {
        lora: true,
        dropout: None,
        grad: false,
    };

    /// The policy in training mode: dropout keyed by `key`, gradient tracked.
    pub fn train(key: DropoutKey) -> Forward {
        Forward {
            lora: true,
            dropout: Some(key),
            grad: true,
        }
    }

    pub fn with_grad(self, grad: bool) -> Forward {
        Forward { grad, ..self }
    }
}

/// Identifies one forward pass so that dropout masks are a pure function of (seed, pass, module):
/// reproducible, and resumable from a checkpoint without saving any generator state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub pass: u64,
}

#[derive(Debug, Clone)]
pub struct Lora {
    /// [r, in_features]
    pub a: Var,
    /// [out_features, r]
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// A projection with an optional LoRA branch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out_features, in_features], frozen.
    pub weight: Tensor,
    pub lora: Option<Lora>,
    /// Unique per projection in the network; keys its dropout masks.
    pub module_index: u64,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor, fwd: Forward) -> Result<Tensor> {
        let base = frozen_linear(x, &self.weight)?;
        let Some(lora) = self.lora.as_ref().filter(|_| fwd.lora) else {
            return Ok(base);
        };
        let x = match fwd.dropout {
            Some(key) if lora.dropout > 0.0 => dropout(x, lora.dropout, key, self.module_index)?,
            _ => x.clone(),
        };
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let m = x.elem_count() / k;
        // Without a gradient the pass must not record a graph: it would keep every
        // intermediate of the whole pass alive until its result is dropped.
        let (a, b) = if fwd.grad {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
        };
        let h = x.reshape((m, k))?.matmul(&a.t()?)?;
        let h = h.matmul(&b.t()?)?.affine(lora.scale, 0.0)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(self.out_features());
        base + h.reshape(out_dims)?
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finalizer: decorrelates nearby (seed, pass, module) triples.
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Inverted dropout with a mask drawn from (seed, pass, module).
fn dropout(x: &Tensor, p: f64, key: DropoutKey, module: u64) -> Result<Tensor> {
    let seed = mix(mix(mix(key.seed) ^ key.pass) ^ module);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    let threshold = (p * (u32::MAX as f64 + 1.0)) as u64;
    let n = x.elem_count();
    let mut mask = Vec::with_capacity(n);
    while mask.len() < n {
        let r: u64 = rng.random();
        for half in [r as u32, (r >> 32) as u32] {
            if mask.len() < n {
                mask.push(if (half as u64) < threshold {
                    0.0f32
                } else {
                    keep as f32
                });
            }
        }
    }
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    if super::fused::available(x) {
        super::fused::mul_const(x, &mask)
    } else {
        x.mul(&mask)
    }
}

/// PEFT's fresh LoRA init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0.
pub fn init_lora(
    rng: &mut ChaCha8Rng,
    in_features: usize,
    out_features: usize,
    r: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Var, Var)> {
    let bound = 1.0 / (in_features as f64).sqrt();
    let a: Vec<f32> = (0..r * in_features)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    let a = Tensor::from_vec(a, (r, in_features), device)?.to_dtype(dtype)?;
    let b = Tensor::zeros((out_features, r), dtype, device)?;
    Ok((Var::from_tensor(&a)?, Var::from_tensor(&b)?))
}
