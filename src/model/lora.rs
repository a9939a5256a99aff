//! LoRA: y = W x + scale * B (A dropout(x)), with W frozen and A, B trainable (PEFT's math).
use super::gemm::{self, GemmMode};
use super::ops::{self, frozen_linear, frozen_linear_with};
use crate::util::hash::splitmix64;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, Var, D};
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
        let Some(lora) = self.lora.as_ref().filter(|_| fwd.lora) else {
            return frozen_linear(x, &self.weight);
        };
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let m = x.elem_count() / k;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(self.out_features());
        let x2 = x.reshape((m, k))?;
        let mask = match fwd.dropout {
            Some(key) if lora.dropout > 0.0 => {
                Some(dropout_mask(&x2, lora.dropout, key, self.module_index)?)
            }
            _ => None,
        };
        if fwd.grad && super::fused::available(x) {
            return self.lora_node(x, &x2, lora, mask, &out_dims);
        }
        // Without a gradient the pass must not record a graph: it would keep every
        // intermediate of the whole pass alive until its result is dropped.
        let (a, b) = if fwd.grad {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
        };
        let xd = match &mask {
            Some(mask) => apply_mask(&x2, mask)?,
            None => x2.clone(),
        };
        add_lora_branch(frozen_linear(&x2, &self.weight)?, &xd, &a, &b, lora.scale)?
            .reshape(out_dims)
    }

    /// The whole projection as one node of the backprop graph (CPU): candle's backward zero-fills
    /// and adds a gradient buffer for every node, and the composite form has about ten nodes per
    /// projection (reshapes, transposes, two products, scale, add). The value is computed by
    /// the same ops as the composite form; [`LoraNode`] only holds what its backward needs.
    /// `x` is the input as given (any leading dims), `x2` its [M, K] view: the node takes `x`
    /// itself, since every reshape node would cost its own zero-fill and add in the backward.
    fn lora_node(
        &self,
        x: &Tensor,
        x2: &Tensor,
        lora: &Lora,
        mask: Option<Tensor>,
        out_dims: &[usize],
    ) -> Result<Tensor> {
        let mode = gemm::gemm_mode();
        let xv = x2.detach();
        let xd = match &mask {
            Some(mask) => apply_mask(&xv, mask)?,
            None => xv.clone(),
        };
        let (a, b) = (lora.a.as_tensor().detach(), lora.b.as_tensor().detach());
        let base = frozen_linear_with(&xv, &self.weight, mode)?;
        let y = add_lora_branch(base, &xd, &a, &b, lora.scale)?.reshape(out_dims)?;
        let node = LoraNode {
            w: self.weight.clone(),
            mode,
            scale: lora.scale,
            mask,
            value: ops::HandOff::new(y),
        };
        x.apply_op3(lora.a.as_tensor(), lora.b.as_tensor(), node)
    }
}

/// base + scale * (xd A^T) B^T: the scale goes on the rank-wide factor, and the last product
/// accumulates into `base` where it can (ops::add_product).
fn add_lora_branch(
    base: Tensor,
    xd: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let h = ops::matmul(xd, &a.t()?)?.affine(scale, 0.0)?;
    ops::add_product(base, &h, b)
}

fn apply_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if super::fused::available(x) {
        super::fused::mul_const(x, mask)
    } else {
        x.mul(mask)
    }
}

/// y = x W^T + s (m * x) A^T B^T for x [M, K], A [r, K], B [N, r], frozen W and dropout mask m.
struct LoraNode {
    w: Tensor,
    mode: GemmMode,
    scale: f64,
    mask: Option<Tensor>,
    /// The forward's value, handed to candle once by `cpu_fwd`.
    value: ops::HandOff,
}

impl CustomOp3 for LoraNode {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _a: &CpuStorage,
        _la: &Layout,
        _b: &CpuStorage,
        _lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu("lora-linear")
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Computed on [M, K] / [M, N] views; dx is returned in x's own shape.
        let k = x.dim(D::Minus1)?;
        let n = g.dim(D::Minus1)?;
        let m = x.elem_count() / k;
        let x_dims = x.dims().to_vec();
        let (x, a, b) = (x.detach().reshape((m, k))?, a.detach(), b.detach());
        let g = g.contiguous()?.reshape((m, n))?;
        let gb = ops::matmul(&g, &b)?; // [M, r]
        let dxd = ops::matmul(&gb, &a)?.affine(self.scale, 0.0)?;
        let xd = match &self.mask {
            Some(mask) => apply_mask(&x, mask)?,
            None => x,
        };
        let dxd = match &self.mask {
            Some(mask) => apply_mask(&dxd, mask)?,
            None => dxd,
        };
        let dx = (ops::frozen_linear_input_grad(&g, &self.w, self.mode)? + dxd)?.reshape(x_dims)?;
        let h = ops::matmul(&xd, &a.t()?)?; // [M, r]
        let da = ops::matmul(&gb.t()?, &xd)?.affine(self.scale, 0.0)?;
        let db = ops::matmul(&g.t()?, &h)?.affine(self.scale, 0.0)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The inverted-dropout mask (0 or 1/(1-p)) for `x`'s shape, drawn from (seed, pass, module).
fn dropout_mask(x: &Tensor, p: f64, key: DropoutKey, module: u64) -> Result<Tensor> {
    let seed = splitmix64(splitmix64(splitmix64(key.seed) ^ key.pass) ^ module);
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
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
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
