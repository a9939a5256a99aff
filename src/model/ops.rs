//! Differentiable ops that candle lacks or computes wastefully.
use super::gemm::{self, Bf16Matrix, GemmMode, MatRef};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use std::sync::Arc;

/// `x @ w^T` for a frozen weight `w` [n, k] and `x` [m, k].
///
/// candle's matmul backward always computes the gradient of both operands; for a frozen base
/// weight that is a wasted [n, k] product per layer per step. This op returns only dL/dx.
///
/// Forward and backward run in the op's `mode` (see [`gemm`]): candle's GEMM, or the fast
/// library in f32 or bf16. The mode is fixed when the op is recorded, so a backward always uses
/// the forward's precision even if the process-wide mode changes in between.
struct FrozenMatmul {
    mode: GemmMode,
    /// The bf16 copy of `w` (cached across steps), in `Bf16` mode.
    w16: Option<Arc<Bf16Matrix>>,
}

/// `grad[m, n] @ w[n, k]`: FrozenMatmul's input gradient, with the fast library. Never
/// differentiated again (applied without backward).
struct FrozenMatmulBwd {
    mode: GemmMode,
    w16: Option<Arc<Bf16Matrix>>,
}

fn transposed_rhs(l2: &Layout) -> Result<Layout> {
    l2.transpose(0, 1)
}

fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: inner dims differ ({m}x{k} @ ({n}x{k2})^T)");
    }
    Ok((m, n, k))
}

/// How BLAS can read a 2-D layout in place: (offset, stored transposed, leading dimension).
/// `None` for layouts it cannot (broadcast or gathered strides).
fn blas_view(l: &Layout) -> Option<(usize, bool, usize)> {
    let (r, c) = l.shape().dims2().ok()?;
    let s = l.stride();
    let off = l.start_offset();
    // A size-1 dimension's stride is arbitrary; read such a matrix densely.
    if c <= 1 || s[1] == 1 {
        let ld = if r <= 1 { c.max(1) } else { s[0] };
        if ld >= c.max(1) {
            return Some((off, false, ld));
        }
    }
    if r <= 1 || s[0] == 1 {
        let ld = if c <= 1 { r.max(1) } else { s[1] };
        if ld >= r.max(1) {
            return Some((off, true, ld));
        }
    }
    None
}

/// `op(a)` [m, k] as a BLAS operand; `flip` transposes the view (for reading `w` [n, k] as
/// `w^T`).
fn f32_operand<'a>(data: &'a [f32], l: &Layout, flip: bool) -> Option<MatRef<'a, f32>> {
    let (off, trans, ld) = blas_view(l)?;
    Some(MatRef {
        data: data.get(off..)?,
        trans: trans ^ flip,
        ld,
    })
}

/// The activation side of a bf16 product, rounded now into a dense copy (same orientation).
fn bf16_operand(data: &[f32], l: &Layout) -> Option<(Vec<bf16>, bool, usize)> {
    let (off, trans, ld) = blas_view(l)?;
    let (r, c) = l.shape().dims2().ok()?;
    let (sr, sc) = if trans { (c, r) } else { (r, c) };
    let mut out = vec![bf16::ZERO; sr * sc];
    if ld == sc {
        gemm::f32_to_bf16(data.get(off..off + sr * sc)?, &mut out);
    } else {
        for i in 0..sr {
            let row = data.get(off + i * ld..off + i * ld + sc)?;
            gemm::f32_to_bf16(row, &mut out[i * sc..(i + 1) * sc]);
        }
    }
    Some((out, trans, sc))
}

/// `op(a)[m, k] @ op(b)[k, n]` with the fast library, where `b` is the frozen weight (stored
/// [n, k] when `b_is_wt`, i.e. the product is `a @ w^T`; else the product is `a @ w`).
/// `Ok(None)` means the layouts are not BLAS-readable: the caller uses candle.
#[allow(clippy::too_many_arguments)]
fn fast_product(
    mode: GemmMode,
    w16: Option<&Bf16Matrix>,
    a: &[f32],
    la: &Layout,
    w: &[f32],
    lw: &Layout,
    b_is_wt: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<Option<Vec<f32>>> {
    let mut out = vec![0f32; m * n];
    match mode {
        GemmMode::Candle => return Ok(None),
        GemmMode::F32 => {
            let (Some(pa), Some(pb)) = (f32_operand(a, la, false), f32_operand(w, lw, b_is_wt))
            else {
                return Ok(None);
            };
            gemm::sgemm(m, n, k, pa, pb, &mut out)?;
        }
        GemmMode::Bf16 => {
            let Some(w16) = w16 else {
                return Ok(None);
            };
            let Some((a16, a_trans, a_ld)) = bf16_operand(a, la) else {
                return Ok(None);
            };
            let pa = MatRef {
                data: &a16,
                trans: a_trans,
                ld: a_ld,
            };
            // The cached copy is dense row-major [n_w, k_w] whatever `w`'s layout was.
            let pb = MatRef {
                data: &w16.data,
                trans: b_is_wt,
                ld: w16.cols,
            };
            gemm::gemm_bf16(m, n, k, pa, pb, &mut out)?;
        }
    }
    Ok(Some(out))
}

fn f32_slice(s: &CpuStorage) -> Option<&[f32]> {
    match s {
        CpuStorage::F32(v) => Some(v),
        _ => None,
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = dims(l1, l2)?;
        if let (Some(x), Some(w)) = (f32_slice(s1), f32_slice(s2)) {
            if let Some(out) = fast_product(
                self.mode,
                self.w16.as_deref(),
                x,
                l1,
                w,
                l2,
                true,
                (m, n, k),
            )? {
                return Ok((CpuStorage::F32(out), Shape::from((m, n))));
            }
        }
        let out = s1.matmul(s2, (1, m, n, k), l1, &transposed_rhs(l2)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &transposed_rhs(l2)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = input_grad(grad, w, self.mode, self.w16.clone())?;
        Ok((Some(dx), None))
    }
}

impl CustomOp2 for FrozenMatmulBwd {
    fn name(&self) -> &'static str {
        "frozen-matmul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n) = l1.shape().dims2()?;
        let (n2, k) = l2.shape().dims2()?;
        if n != n2 {
            candle_core::bail!("frozen matmul backward: {m}x{n} @ {n2}x{k}");
        }
        if let (Some(g), Some(w)) = (f32_slice(s1), f32_slice(s2)) {
            if let Some(out) = fast_product(
                self.mode,
                self.w16.as_deref(),
                g,
                l1,
                w,
                l2,
                false,
                (m, k, n),
            )? {
                return Ok((CpuStorage::F32(out), Shape::from((m, k))));
            }
        }
        let out = s1.matmul(s2, (1, m, k, n), l1, l2)?;
        Ok((out, Shape::from((m, k))))
    }
}

fn input_grad(
    grad: &Tensor,
    w: &Tensor,
    mode: GemmMode,
    w16: Option<Arc<Bf16Matrix>>,
) -> Result<Tensor> {
    if mode == GemmMode::Candle || !grad.device().is_cpu() {
        grad.matmul(w)
    } else {
        grad.apply_op2_no_bwd(w, &FrozenMatmulBwd { mode, w16 })
    }
}

/// `grad[m, n] @ w[n, k]`, the input gradient [`frozen_linear_with`]'s backward computes in
/// `mode` (exposed for benchmarks and tests).
pub fn frozen_linear_input_grad(grad: &Tensor, w: &Tensor, mode: GemmMode) -> Result<Tensor> {
    let usable = grad.device().is_cpu() && grad.dtype() == DType::F32 && w.dtype() == DType::F32;
    let mode = if usable {
        gemm::effective_mode(mode)
    } else {
        GemmMode::Candle
    };
    let w16 = if mode == GemmMode::Bf16 {
        Some(gemm::bf16_weight(w)?)
    } else {
        None
    };
    input_grad(grad, w, mode, w16)
}

/// `x @ w^T` over the last dim of `x` (any leading dims), no gradient for `w`, in the
/// process-wide GEMM mode ([`gemm::gemm_mode`]).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_linear_with(x, w, gemm::gemm_mode())
}

/// [`frozen_linear`] in an explicit mode. Falls back to candle's GEMM when the mode is not
/// available (no library loaded, non-CPU device, non-f32 dtype).
pub fn frozen_linear_with(x: &Tensor, w: &Tensor, mode: GemmMode) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().expect("non-scalar input");
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, k))?;
    let usable = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let mode = if usable {
        gemm::effective_mode(mode)
    } else {
        GemmMode::Candle
    };
    let w16 = if mode == GemmMode::Bf16 {
        Some(gemm::bf16_weight(w)?)
    } else {
        None
    };
    let y = x2.apply_op2(w, FrozenMatmul { mode, w16 })?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}
