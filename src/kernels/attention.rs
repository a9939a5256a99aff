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
use super::gemm::{Causal, GemmMode};
use super::precomputed::PrecomputedValue;
use super::products::{f32_products, matmul_causal};
use crate::util::env::MibSetting;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Probability bytes above which attention runs in query-row chunks.
static BUDGET: MibSetting = MibSetting::new("KTO_TRAIN_ATTENTION_MB", 256);

/// How the node's products and softmax run. In bf16 mode on the CPU, for long sequences, the
/// attention products take bf16 operands with f32 accumulation, as the projections do (and as
/// TRL's bf16 attention): q, k, v and the incoming gradient are rounded at each product, and the
/// probabilities and their gradient are computed in f32 from f32 scores and written rounded to
/// bf16, the form the next products read (rounding the [R, T_k] probabilities at the product
/// instead cost what the bf16 product saved) and the node keeps (half the memory). Otherwise
/// everything stays in the activations' dtype, with f32 products.
///
/// "Long": R x T_k x d of one head group's product at least [`BF16_FROM`]. Measured on an AMX
/// CPU (2 cores; the five products timed alone, batched over the key/value heads as in
/// training, three runs): at 1536 x 512 x 64 (SmolLM2-360M, 512 tokens) the tile kernel ran
/// q k^T 1.2-1.5x, dS k and P v 1.4-1.7x the f32 engine's speed, the transposed two (dK, dV)
/// 1.06-1.11x; at 510 x 170 x 64 (the real unit's typical sequence) 0.5-1.0x, packing and task
/// overhead outweighing the product; at 1000 x 330 x 64 1.3-1.6x, but dK and dV 0.5x. So the rounding applies where it
/// pays; below, attention is exactly the f32 computation of the other modes.
#[derive(Debug, Clone, Copy)]
struct Precision {
    gemm: GemmMode,
    bf16: bool,
}

/// Products of at least this many multiply-adds (rows x keys x head dim) run in bf16.
pub const BF16_FROM: usize = 1 << 25;

impl Precision {
    fn of(q: &Tensor, k: &Tensor, gemm: GemmMode) -> Result<Self> {
        let (rows, d, t_k) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?, k.dim(D::Minus2)?);
        let bf16 = gemm == GemmMode::Bf16
            && q.device().is_cpu()
            && q.dtype() == DType::F32
            && rows * t_k * d >= BF16_FROM;
        Ok(Self { gemm, bf16 })
    }

    /// A product of the attention, shaped by the causal mask as `causal` says (the f32 kernel
    /// for products with a small side skips the masked half; see [`Causal`]).
    fn product(self, a: &Tensor, b: &Tensor, causal: Causal) -> Result<Tensor> {
        let mode = if self.bf16 {
            GemmMode::Bf16
        } else {
            f32_products(self.gemm)
        };
        matmul_causal(a, b, mode, causal)
    }

    fn softmax(self, scores: &Tensor, scale: f64, t_q: usize, offset: usize) -> Result<Tensor> {
        if self.bf16 {
            fused::causal_softmax_bf16(scores, scale, t_q, offset)
        } else {
            fused::causal_softmax(scores, scale, t_q, offset)
        }
    }
}

/// The probability bytes above which attention runs in query-row chunks
/// (`KTO_TRAIN_ATTENTION_MB`).
pub fn budget() -> usize {
    BUDGET.bytes()
}

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
    causal_attention_within(q, k, v, scale, t_q, offset, gemm, budget())
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
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, attended) = attend(&qd, &kd, &vd, scale, t_q, offset, gemm, budget)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        AttentionNode {
            attended,
            value: PrecomputedValue::new(out),
        },
    )
}

/// The attention of detached q, k, v (as [`causal_attention`]) and what its backward needs
/// besides them: the probabilities, or within the budget's chunk plan nothing (the backward
/// recomputes them chunk by chunk).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
    gemm: GemmMode,
    budget: usize,
) -> Result<(Tensor, Attended)> {
    let (rows, t_k) = (q.dim(D::Minus2)?, k.dim(D::Minus2)?);
    let lead = q.elem_count() / (rows * q.dim(D::Minus1)?).max(1);
    let prob_bytes = lead * rows * t_k * q.dtype().size_in_bytes();
    let prec = Precision::of(q, k, gemm)?;
    if prob_bytes > budget && t_q > 0 {
        let plan = Chunks::plan(lead, rows, t_q, t_k, offset, budget);
        let out = plan.forward(q, k, v, scale, prec)?;
        let saved = Saved::Chunked(plan);
        return Ok((out, Attended { saved, scale, prec }));
    }
    let scores = prec.product(q, &k.t()?, Causal::Scores { t_q, offset })?;
    let p = prec.softmax(&scores, scale, t_q, offset)?;
    let out = prec.product(&p, v, Causal::RowsByKeys { t_q, offset })?;
    let saved = Saved::Probabilities { p, t_q, offset };
    Ok((out, Attended { saved, scale, prec }))
}

/// What an attention's backward needs besides its inputs.
pub(crate) struct Attended {
    saved: Saved,
    scale: f64,
    prec: Precision,
}

enum Saved {
    /// Probabilities [.., R, T_k] (zero where masked; bf16 in bf16 mode) and the softmax's row
    /// layout (see [`fused::causal_softmax`]).
    Probabilities {
        p: Tensor,
        t_q: usize,
        offset: usize,
    },
    /// None kept: the chunks' probabilities are recomputed.
    Chunked(Chunks),
}

impl Attended {
    /// dq, dk, dv of the attention of detached `q`, `k`, `v` for the output gradient `g`.
    pub(crate) fn grads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (prec, scale) = (self.prec, self.scale);
        let plan = match &self.saved {
            &Saved::Probabilities { ref p, t_q, offset } => {
                let g = g.contiguous()?;
                let dp = prec.product(&g, &v.t()?, Causal::Scores { t_q, offset })?;
                // dS = scale * P (dP - rowsum(dP * P)), zero where masked (in P's dtype).
                let ds = fused::causal_softmax_grad(p, &dp, scale, t_q, offset)?;
                let (rows, keys) = (
                    Causal::RowsByKeys { t_q, offset },
                    Causal::KeysByRows { t_q, offset },
                );
                let dq = prec.product(&ds, k, rows)?;
                let dk = prec.product(&ds.t()?, q, keys)?;
                let dv = prec.product(&p.t()?, &g, keys)?;
                return Ok((dq, dk, dv));
            }
            Saved::Chunked(plan) => plan,
        };
        let vt = v.t()?;
        let mut dq = Vec::with_capacity(plan.spans.len());
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |acc: Option<Tensor>, x: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + x)?,
                None => x,
            }))
        };
        for &span in &plan.spans {
            let (qc, p) = plan.probs(q, k, span, scale, prec)?;
            let gc = g.narrow(D::Minus2, span.0, span.1)?.contiguous()?;
            let (t_q, offset) = plan.softmax_rows(span);
            let dp = prec.product(&gc, &vt, Causal::Scores { t_q, offset })?;
            let ds = fused::causal_softmax_grad(&p, &dp, scale, t_q, offset)?;
            let (rows, keys) = (
                Causal::RowsByKeys { t_q, offset },
                Causal::KeysByRows { t_q, offset },
            );
            dq.push(prec.product(&ds, k, rows)?);
            dk = add(dk, prec.product(&ds.t()?, &qc, keys)?)?;
            dv = add(dv, prec.product(&p.t()?, &gc, keys)?)?;
        }
        let dq = Tensor::cat(&dq, q.rank() - 2)?;
        // No query rows, no gradient.
        let dk = dk.map_or_else(|| k.zeros_like(), Ok)?;
        let dv = dv.map_or_else(|| v.zeros_like(), Ok)?;
        Ok((dq, dk, dv))
    }
}

struct AttentionNode {
    attended: Attended,
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
        let (dq, dk, dv) = self
            .attended
            .grads(&q.detach(), &k.detach(), &v.detach(), g)?;
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
        prec: Precision,
    ) -> Result<(Tensor, Tensor)> {
        let qc = q.narrow(D::Minus2, r0, n)?.contiguous()?;
        let (t_q, offset) = self.softmax_rows((r0, n, j0));
        let scores = prec.product(&qc, &k.t()?, Causal::Scores { t_q, offset })?;
        let p = prec.softmax(&scores, scale, t_q, offset)?;
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
        prec: Precision,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.spans.len());
        for &span in &self.spans {
            let (_, p) = self.probs(q, k, span, scale, prec)?;
            let (t_q, offset) = self.softmax_rows(span);
            outs.push(prec.product(&p, v, Causal::RowsByKeys { t_q, offset })?);
        }
        Tensor::cat(&outs, q.rank() - 2)
    }
}
