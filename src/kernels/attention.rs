//! Causal attention softmax(scale q k^T + mask) v as one backprop node (CPU, fused path).
//!
//! As separate ops (two products and the softmax) the graph keeps the scores and the
//! probabilities of every layer, and candle's backward zero-fills and adds a gradient buffer of
//! that size for each: [B, heads, T, T], the largest tensors of a step. The node keeps only the
//! probabilities and computes its three input gradients by hand.
//!
//! Those probabilities grow with the square of the length ([B, heads, T, T] f32: 0.5 GB at
//! 2 x 2,048 tokens for SmolLM2-360M, per layer being recomputed). Above a budget
//! (`KTO_TRAIN_ATTENTION_MB`, default 256) the node keeps none: the forward runs in chunks of
//! query rows, and the backward recomputes each chunk's probabilities from q and k before using
//! them (FlashAttention's trade: memory linear in T for one more q k^T product in the backward).
//! Each row's softmax sees all its keys either way, so the two paths agree to f32 rounding.
use super::fused;
use super::gemm::GemmMode;
use super::precomputed::PrecomputedValue;
use super::products::matmul;
use crate::util::env::MibSetting;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Probability bytes above which attention runs in query-row chunks.
static BUDGET: MibSetting = MibSetting::new("KTO_TRAIN_ATTENTION_MB", 256);

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
    causal_attention_within(q, k, v, scale, t_q, offset, gemm, BUDGET.bytes())
}

/// [`causal_attention`] with an explicit probability budget in bytes (0: always chunked).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
    gemm: GemmMode,
    budget: usize,
) -> Result<Tensor> {
    let (rows, t_k) = (q.dim(D::Minus2)?, k.dim(D::Minus2)?);
    let lead = q.elem_count() / (rows * q.dim(D::Minus1)?).max(1);
    let prob_bytes = lead * rows * t_k * q.dtype().size_in_bytes();
    if prob_bytes > budget && t_q > 0 {
        let plan = Chunks::plan(lead, rows, t_q, t_k, offset, budget);
        let out = plan.forward(&q.detach(), &k.detach(), &v.detach(), scale, gemm)?;
        if !(q.track_op() || k.track_op() || v.track_op()) {
            return Ok(out);
        }
        return q.apply_op3(
            k,
            v,
            ChunkedNode {
                plan,
                scale,
                gemm,
                value: PrecomputedValue::new(out),
            },
        );
    }
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
            t_q,
            offset,
            gemm,
            value: PrecomputedValue::new(out),
        },
    )
}

struct AttentionNode {
    /// Probabilities [.., R, T_k] (zero where masked).
    p: Tensor,
    scale: f64,
    /// The softmax's row layout (see [`fused::causal_softmax`]).
    t_q: usize,
    offset: usize,
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _y: &candle_core::CudaStorage,
        _ly: &Layout,
        _z: &candle_core::CudaStorage,
        _lz: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda("causal-attention")
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
        let ds = fused::causal_softmax_grad(&self.p, &dp, self.scale, self.t_q, self.offset)?;
        let dq = matmul(&ds, &k, gemm)?;
        let dk = matmul(&ds.t()?, &q, gemm)?;
        let dv = matmul(&self.p.t()?, &g, gemm)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Query-row chunks that never cross a head's block of `t_q` rows, so that each chunk's causal
/// mask is again "row i sees keys up to offset + first position + i".
struct Chunks {
    /// (first row, rows, position of the first row within its head's block)
    spans: Vec<(usize, usize, usize)>,
    offset: usize,
}

impl Chunks {
    fn plan(
        lead: usize,
        rows: usize,
        t_q: usize,
        t_k: usize,
        offset: usize,
        budget: usize,
    ) -> Self {
        // A quarter of the budget per chunk tensor: the backward holds p, dp and ds at once.
        let per_row = (lead * t_k * 4).max(1);
        let c = (budget / 4 / per_row).clamp(16, t_q.max(16));
        let mut spans = Vec::new();
        for block in 0..rows.div_ceil(t_q) {
            let mut j0 = 0;
            while j0 < t_q && block * t_q + j0 < rows {
                let n = c.min(t_q - j0).min(rows - block * t_q - j0);
                spans.push((block * t_q + j0, n, j0));
                j0 += n;
            }
        }
        Chunks { spans, offset }
    }

    /// The chunk's queries and its probabilities [.., n, T_k].
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        (r0, n, j0): (usize, usize, usize),
        scale: f64,
        gemm: GemmMode,
    ) -> Result<(Tensor, Tensor)> {
        let qc = q.narrow(D::Minus2, r0, n)?.contiguous()?;
        let scores = matmul(&qc, &k.t()?, gemm)?;
        let (t_q, offset) = self.softmax_rows((r0, n, j0));
        let p = fused::causal_softmax(&scores, scale, t_q, offset)?;
        Ok((qc, p))
    }

    /// The chunk's row layout for [`fused::causal_softmax`] and its gradient: n rows, the
    /// first at key position offset + j0.
    fn softmax_rows(&self, (_, n, j0): (usize, usize, usize)) -> (usize, usize) {
        (n, self.offset + j0)
    }

    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        g: GemmMode,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.spans.len());
        for &span in &self.spans {
            let (_, p) = self.probs(q, k, span, scale, g)?;
            outs.push(matmul(&p, v, g)?);
        }
        Tensor::cat(&outs, q.rank() - 2)
    }
}

struct ChunkedNode {
    plan: Chunks,
    scale: f64,
    gemm: GemmMode,
    value: PrecomputedValue,
}

impl CustomOp3 for ChunkedNode {
    fn name(&self) -> &'static str {
        "causal-attention-chunked"
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
        self.value.take_cpu("causal-attention-chunked")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _y: &candle_core::CudaStorage,
        _ly: &Layout,
        _z: &candle_core::CudaStorage,
        _lz: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda("causal-attention-chunked")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (gemm, vt) = (self.gemm, v.t()?);
        let mut dq = Vec::with_capacity(self.plan.spans.len());
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |acc: Option<Tensor>, x: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + x)?,
                None => x,
            }))
        };
        for &span in &self.plan.spans {
            let (qc, p) = self.plan.probs(&q, &k, span, self.scale, gemm)?;
            let gc = g.narrow(D::Minus2, span.0, span.1)?.contiguous()?;
            let dp = matmul(&gc, &vt, gemm)?;
            let (t_q, offset) = self.plan.softmax_rows(span);
            let ds = fused::causal_softmax_grad(&p, &dp, self.scale, t_q, offset)?;
            dq.push(matmul(&ds, &k, gemm)?);
            dk = add(dk, matmul(&ds.t()?, &qc, gemm)?)?;
            dv = add(dv, matmul(&p.t()?, &gc, gemm)?)?;
        }
        let dq = Tensor::cat(&dq, q.rank() - 2)?;
        Ok((Some(dq), dk, dv))
    }
}
