//! A frozen projection matrix W [out, in]: a tensor, or, for bf16 products on the tile kernel,
//! only its packed forms.
//!
//! The tile kernel reads frozen weights packed (`gemm::PackedB`), once per orientation: W^T for
//! the forward x W^T and W for the input gradient g W. Next to the bf16 tensor that made three
//! copies of every weight. Packing only moves values, so the packed forward form holds the
//! weight exactly: the tensor is dropped, and the input gradient's form is either kept too or
//! moved out of the forward's at each backward (one copy in all): kept for the projections
//! within `KTO_TRAIN_PACK_INPUT_GRAD_MB` (default 256; `gemm::input_grad_pack_budget`), moved
//! for the rest. At SmolLM2-360M's shapes and 2 x 512 tokens holding both forms took
//! benches/step's peak_rss_mb from 3258 to 2672, and to 1975 with one copy (README, "Speed").
//! Any other path (candle's GEMM, f32 products, another device) gets the tensor back, unpacked,
//! at each call: correct, not fast.
use super::gemm::{self, GemmMode, PackedB};
use super::products::{self, packed_product};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// See the module documentation.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

/// W held only as the tile kernel's operands.
pub struct PackedWeight {
    /// W^T [in, out], the forward's operand.
    forward: PackedB,
    /// W [out, in], the input gradient's; `None`: repacked from `forward` per call.
    input_grad: Option<PackedB>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeight([{}, {}], input gradient {})",
            self.forward.n(),
            self.forward.k(),
            if self.input_grad.is_some() {
                "packed"
            } else {
                "repacked per call"
            }
        )
    }
}

impl PackedWeight {
    fn input_grad_operand(&self) -> Result<std::borrow::Cow<'_, PackedB>> {
        if let Some(p) = &self.input_grad {
            return Ok(std::borrow::Cow::Borrowed(p));
        }
        let _p = crate::util::profile::phase("op: repack input-gradient operand");
        Ok(std::borrow::Cow::Owned(self.forward.transposed()))
    }
}

impl FrozenWeight {
    /// [out, in].
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            FrozenWeight::Packed(p) => (p.forward.n(), p.forward.k()),
        }
    }

    /// Whether the weight is held packed with its input gradient's form (not moved out of the
    /// forward's at each backward).
    pub fn holds_input_grad_form(&self) -> bool {
        matches!(self, FrozenWeight::Packed(p) if p.input_grad.is_some())
    }

    /// The weight as a tensor (bf16, unpacked, when held packed).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.clone()),
            FrozenWeight::Packed(p) => {
                let (out, inp) = self.dims2();
                let wt =
                    Tensor::from_vec(p.forward.unpack(), (inp, out), &candle_core::Device::Cpu)?;
                wt.t()?.contiguous()
            }
        }
    }

    /// The weight stored in `dtype` (a packed weight holds bf16 values: it stays as it is for
    /// bf16, and becomes a tensor otherwise).
    pub fn to_dtype(&self, dtype: DType) -> Result<FrozenWeight> {
        match self {
            FrozenWeight::Dense(t) => Ok(FrozenWeight::Dense(t.to_dtype(dtype)?)),
            FrozenWeight::Packed(_) if dtype == DType::BF16 => Ok(self.clone()),
            FrozenWeight::Packed(_) => Ok(FrozenWeight::Dense(self.tensor()?.to_dtype(dtype)?)),
        }
    }

    /// The weight held only packed, where bf16 products run on the tile kernel here (else
    /// unchanged), with the input gradient's orientation packed too or not. Its values are
    /// rounded to bf16 as every bf16 product rounds them.
    pub fn packed_with(self, input_grad: bool) -> Result<FrozenWeight> {
        let FrozenWeight::Dense(t) = &self else {
            return Ok(self);
        };
        if !t.device().is_cpu() {
            return Ok(self);
        }
        // None where no packed operands are read here (another engine, no tile kernel).
        let Some(forward) = gemm::pack_weight(t, true)? else {
            return Ok(self);
        };
        let input_grad = if input_grad {
            gemm::pack_weight(t, false)?
        } else {
            None
        };
        Ok(FrozenWeight::Packed(Arc::new(PackedWeight {
            forward,
            input_grad,
        })))
    }

    /// The weight as a tensor again (after [`FrozenWeight::packed`]).
    pub fn unpacked(self) -> Result<FrozenWeight> {
        match self {
            FrozenWeight::Dense(_) => Ok(self),
            FrozenWeight::Packed(_) => Ok(FrozenWeight::Dense(self.tensor()?)),
        }
    }

    /// Whether a product with activation `x` in `mode` reads the packed operands.
    fn packed_for(&self, x: &Tensor, mode: GemmMode) -> Option<&Arc<PackedWeight>> {
        match self {
            FrozenWeight::Packed(p)
                if x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && gemm::effective_mode(mode) == GemmMode::Bf16 =>
            {
                Some(p)
            }
            _ => None,
        }
    }

    /// `x @ W^T` over the last dim of `x`, no gradient for W ([`products::frozen_linear`]).
    pub fn forward(&self, x: &Tensor, mode: GemmMode) -> Result<Tensor> {
        let Some(p) = self.packed_for(x, mode) else {
            return match self {
                FrozenWeight::Dense(t) => products::frozen_linear(x, t, mode),
                FrozenWeight::Packed(_) => products::frozen_linear(x, &self.tensor()?, mode),
            };
        };
        let dims = x.dims();
        let k = *dims.last().expect("non-scalar input");
        let m: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((m, k))?.apply_op1(PackedMatmul {
            w: p.clone(),
            input_grad: false,
        })?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(p.forward.n());
        y.reshape(out_dims)
    }

    /// `grad [m, out] @ W`, the input gradient of [`FrozenWeight::forward`].
    pub fn input_grad(&self, grad: &Tensor, mode: GemmMode) -> Result<Tensor> {
        match (self.packed_for(grad, mode), self) {
            (Some(p), _) => grad.apply_op1_no_bwd(&PackedMatmul {
                w: p.clone(),
                input_grad: true,
            }),
            (None, FrozenWeight::Dense(t)) => products::frozen_linear_input_grad(grad, t, mode),
            (None, FrozenWeight::Packed(_)) => {
                products::frozen_linear_input_grad(grad, &self.tensor()?, mode)
            }
        }
    }
}

/// x W^T with W packed (the backward returns only dL/dx), or, as `input_grad`, that backward's
/// grad W (never differentiated again).
struct PackedMatmul {
    w: Arc<PackedWeight>,
    input_grad: bool,
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        if self.input_grad {
            "packed-frozen-matmul-bwd"
        } else {
            "packed-frozen-matmul"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = l.shape().dims2()?.0;
        let b = if self.input_grad {
            self.w.input_grad_operand()?
        } else {
            std::borrow::Cow::Borrowed(&self.w.forward)
        };
        let out = packed_product(s, l, &b)?;
        Ok((out, Shape::from((m, b.n()))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = PackedMatmul {
            w: self.w.clone(),
            input_grad: true,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
