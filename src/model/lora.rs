//! LoRA: y = W x + scale * B (A dropout(x)), with W frozen and A, B trainable (PEFT's math). The
//! compute is [`crate::kernels::lora_linear`]; this file holds the weights, PEFT's init and the
//! dropout masks.
use super::pass::{DropoutKey, PassMode};
use crate::kernels::frozen::FrozenWeight;
use crate::kernels::fused;
use crate::kernels::gemm::GemmMode;
use crate::kernels::lora_linear::{lora_forward, lora_grads, lora_linear, LoraBranch, LoraForward};
use crate::util::hash::splitmix64;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::Rng;
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

/// The gradients of a branch's A and B.
pub(crate) type ParamGrads = [(Var, Tensor); 2];

/// A projection with an optional LoRA branch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out_features, in_features], frozen (a tensor, or only packed for bf16 products).
    pub weight: FrozenWeight,
    /// [out_features], frozen (LoRA leaves a projection's bias as it is, as PEFT does).
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Unique per projection in the network; keys its dropout masks.
    pub module_index: u64,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }

    /// `x W^T`, plus the LoRA branch when `pass` runs the policy.
    pub fn forward(&self, x: &Tensor, pass: PassMode, gemm: GemmMode) -> Result<Tensor> {
        let Some(lora) = self.lora.as_ref().filter(|_| pass.lora) else {
            return self.frozen_forward(x, gemm);
        };
        let mask = self.dropout_mask(x, lora, pass)?;
        lora_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            Self::branch(lora),
            mask,
            gemm,
            pass.grad,
        )
    }

    fn frozen_forward(&self, x: &Tensor, gemm: GemmMode) -> Result<Tensor> {
        let y = self.weight.forward(x, gemm)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// [`Linear::forward`] outside the graph, with what [`Linear::grads`] reads (a backward
    /// written by hand: `model::block_grad`). The same values as `forward`.
    pub(crate) fn forward_saved(
        &self,
        x: &Tensor,
        pass: PassMode,
        gemm: GemmMode,
    ) -> Result<(Tensor, Option<LoraForward>)> {
        let Some(lora) = self.lora.as_ref().filter(|_| pass.lora) else {
            return Ok((self.frozen_forward(&x.detach(), gemm)?, None));
        };
        let mask = self.dropout_mask(x, lora, pass)?;
        let f = lora_forward(
            x,
            &self.weight,
            self.bias.as_ref(),
            Self::branch(lora),
            mask,
            gemm,
        )?;
        Ok((f.y.clone(), Some(f)))
    }

    /// dx, and the gradients of A and B when the forward ran the LoRA branch (`saved`), for the
    /// output's gradient `g`.
    pub(crate) fn grads(
        &self,
        x: &Tensor,
        saved: Option<&LoraForward>,
        g: &Tensor,
        gemm: GemmMode,
    ) -> Result<(Tensor, Option<ParamGrads>)> {
        match (self.lora.as_ref(), saved) {
            (Some(lora), Some(f)) => {
                let (dx, da, db) = lora_grads(x, &self.weight, Self::branch(lora), f, g, gemm)?;
                Ok((dx, Some([(lora.a.clone(), da), (lora.b.clone(), db)])))
            }
            _ => {
                let n = g.dim(D::Minus1)?;
                let g2 = g.contiguous()?.reshape((g.elem_count() / n, n))?;
                Ok((self.weight.input_grad(&g2, gemm)?.reshape(x.dims())?, None))
            }
        }
    }

    fn branch(lora: &Lora) -> LoraBranch<'_> {
        LoraBranch {
            a: lora.a.as_tensor(),
            b: lora.b.as_tensor(),
            scale: lora.scale,
        }
    }

    /// This pass's inverted-dropout mask for the input `x`, if the branch has dropout.
    fn dropout_mask(&self, x: &Tensor, lora: &Lora, pass: PassMode) -> Result<Option<Tensor>> {
        Ok(match pass.dropout {
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
        })
    }
}

/// The inverted-dropout mask (0 or 1/(1-p)) of `shape`, in `like`'s dtype and device, drawn from
/// (seed, pass, module): [`fused::dropout_mask`], the same values on every device.
fn dropout_mask(
    shape: (usize, usize),
    like: &Tensor,
    p: f64,
    key: DropoutKey,
    module: u64,
) -> Result<Tensor> {
    let _p = crate::util::profile::phase("op: dropout masks");
    let seed = splitmix64(splitmix64(splitmix64(key.seed) ^ key.pass) ^ module);
    fused::dropout_mask(shape, like, seed, p)
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
