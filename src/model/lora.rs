//! LoRA: y = W x + scale * B (A dropout(x)), with W frozen and A, B trainable (PEFT's math). The
//! compute is [`crate::kernels::lora_linear`]; this file holds the weights, PEFT's init and the
//! dropout masks.
use super::pass::{DropoutKey, PassMode};
use crate::kernels::gemm::GemmMode;
use crate::kernels::lora_linear::{lora_linear, LoraBranch};
use crate::kernels::products::frozen_linear;
use crate::util::hash::splitmix64;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    /// [out_features], frozen (LoRA leaves a projection's bias as it is, as PEFT does).
    pub bias: Option<Tensor>,
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

    /// `x W^T`, plus the LoRA branch when `pass` runs the policy.
    pub fn forward(&self, x: &Tensor, pass: PassMode, gemm: GemmMode) -> Result<Tensor> {
        let Some(lora) = self.lora.as_ref().filter(|_| pass.lora) else {
            let y = frozen_linear(x, &self.weight, gemm)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        };
        let mask = match pass.dropout {
            Some(key) if lora.dropout > 0.0 => {
                let k = x.dim(D::Minus1)?;
                let rows = x.elem_count() / k;
                Some(dropout_mask(
                    (rows, k),
                    x,
                    lora.dropout,
                    key,
                    self.module_index,
                )?)
            }
            _ => None,
        };
        let branch = LoraBranch {
            a: lora.a.as_tensor(),
            b: lora.b.as_tensor(),
            scale: lora.scale,
        };
        lora_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            branch,
            mask,
            gemm,
            pass.grad,
        )
    }
}

/// The inverted-dropout mask (0 or 1/(1-p)) of `shape`, in `like`'s dtype and device, drawn from
/// (seed, pass, module).
fn dropout_mask(
    shape: (usize, usize),
    like: &Tensor,
    p: f64,
    key: DropoutKey,
    module: u64,
) -> Result<Tensor> {
    let _p = crate::util::profile::phase("op: dropout masks");
    let seed = splitmix64(splitmix64(splitmix64(key.seed) ^ key.pass) ^ module);
    let n = shape.0 * shape.1;
    let mask = mask_values(seed, p, n);
    Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())
}

/// `n` inverted-dropout values from the ChaCha8 stream of `seed`, one 32-bit word per value
/// (dropped when the word is below p * 2^32). Filled in parallel chunks, each seeking the stream
/// to its first word, so the values are those of one sequential pass (tested below).
fn mask_values(seed: u64, p: f64, n: usize) -> Vec<f32> {
    use rand::RngCore;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let keep = (1.0 / (1.0 - p)) as f32;
    let threshold = (p * (u32::MAX as f64 + 1.0)) as u64;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos((c * CHUNK) as u128);
        for v in out {
            *v = if (rng.next_u32() as u64) < threshold {
                0.0
            } else {
                keep
            };
        }
    });
    mask
}

/// PEFT's fresh LoRA init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0.
pub(crate) fn init_lora(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel fill equals one sequential pass over the stream (two values per u64 draw,
    /// low half first), for sizes that split unevenly into chunks.
    #[test]
    fn parallel_masks_equal_one_sequential_pass() {
        for (seed, p, n) in [(7u64, 0.05, 1usize), (8, 0.05, 16_385), (9, 0.5, 100_003)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let keep = (1.0 / (1.0 - p)) as f32;
            let threshold = (p * (u32::MAX as f64 + 1.0)) as u64;
            let mut want = Vec::with_capacity(n);
            while want.len() < n {
                let r: u64 = rng.random();
                for half in [r as u32, (r >> 32) as u32] {
                    if want.len() < n {
                        want.push(if (half as u64) < threshold { 0.0 } else { keep });
                    }
                }
            }
            assert_eq!(mask_values(seed, p, n), want, "seed {seed} n {n}");
        }
    }
}
