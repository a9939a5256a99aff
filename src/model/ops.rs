//! Differentiable ops that candle lacks or computes wastefully.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x @ w^T` for a frozen weight `w` [n, k] and `x` [m, k].
///
/// candle's matmul backward always computes the gradient of both operands; for a frozen base
/// weight that is a wasted [n, k] product per layer per step. This op returns only dL/dx.
struct FrozenMatmul;

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
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x @ w^T` over the last dim of `x` (any leading dims), no gradient for `w`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().expect("non-scalar input");
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, k))?;
    let y = x2.apply_op2(w, FrozenMatmul)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}
