//! Causal attention softmax(scale q k^T + mask) v as one backprop node (CPU, fused path).
//!
//! As separate ops (two products and the softmax) the graph keeps the scores and the
//! probabilities of every layer, and candle's backward zero-fills and adds a gradient buffer of
//! that size for each: [B, heads, T, T], the largest tensors of a step. The node keeps only the
//! probabilities and computes its three input gradients by hand.
use super::fused;
use super::gemm::GemmMode;
use super::precomputed::PrecomputedValue;
use super::products::matmul;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// q [.., R, d] (R = query rows: query heads of one key/value head stacked, position
/// offset + r % t_q), k and v [.., T_k, d] -> [.., R, d].
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
    gemm: GemmMode,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let p = fused::causal_softmax(&matmul(&qd, &kd.t()?, gemm)?, scale, t_q, offset)?;
    let out = matmul(&p, &vd, gemm)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        AttentionNode {
            p,
            scale,
            gemm,
            value: PrecomputedValue::new(out),
        },
    )
}

struct AttentionNode {
    /// Probabilities [.., R, T_k] (zero where masked).
    p: Tensor,
    scale: f64,
    gemm: GemmMode,
    value: PrecomputedValue,
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _lq: &Layout,
        _k: &CpuStorage,
        _lk: &Layout,
        _v: &CpuStorage,
        _lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu("causal-attention")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), g.contiguous()?);
        let gemm = self.gemm;
        let dp = matmul(&g, &v.t()?, gemm)?;
        // dS = scale * P (dP - rowsum(dP * P)), zero where masked.
        let ds = fused::causal_softmax_grad(&self.p, &dp, self.scale)?;
        let dq = matmul(&ds, &k, gemm)?;
        let dk = matmul(&ds.t()?, &q, gemm)?;
        let dv = matmul(&self.p.t()?, &g, gemm)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
