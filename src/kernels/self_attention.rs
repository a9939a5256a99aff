//! A decoder block's attention, from the q/k/v projections' outputs to o_proj's input, as one
//! backprop node (CPU): head split, RoPE, each sequence's causal attention ([`attention`]), head
//! merge.
//!
//! As separate ops this is about thirty graph nodes per block for a pass of two packed
//! sequences (a reshape, a transpose and a copy per projection, RoPE twice, per sequence the
//! narrows and copies of its rows, the attention, then the concatenation and the transpose
//! back), and candle's backward allocates, zero-fills and adds a gradient buffer of the pass's
//! size for each of them; a narrow's gradient is first padded with zeros to the whole tensor.
//! The node runs the same arithmetic on the same values outside the graph (the head split and
//! RoPE in one pass: `fused::split_heads`, `fused::merge_heads`) and hands back dq, dk, dv in
//! the projections' layout, so its values and gradients are bit for bit those of the separate
//! ops (tests/self_attention.rs), with a fraction of the memory traffic.
use super::attention::{attend, Attended};
use super::fused;
use super::gemm::GemmMode;
use super::precomputed::PrecomputedValue;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The attention heads of a block.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// How a pass's attention runs: its heads, the RoPE tables `cos`, `sin` [T, d] of its
/// positions, its packed sequences, the products' precision, and the probability bytes above
/// which the attention is recomputed in the backward in query-row chunks
/// ([`attention::causal_attention_within`]).
#[derive(Debug, Clone, Copy)]
pub struct PassAttention<'a> {
    pub heads: Heads,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// The lengths of the sequences packed one after another into a single row (B = 1), each
    /// at positions 0.. and attending only to itself (its table rows are at its place in the
    /// pass); empty: each of the B rows is one sequence.
    pub packed: &'a [usize],
    pub gemm: GemmMode,
    pub budget: usize,
}

/// The self-attention of projection outputs q [B, T, heads * d], k and v [B, T, kv_heads * d],
/// causal within each sequence of the pass. Returns the output [B, T, heads * d] (a node of the
/// graph when q, k or v is) and the keys after RoPE and the values [B, kv_heads, T, d],
/// detached.
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pass: &PassAttention<'_>,
) -> Result<(Tensor, (Tensor, Tensor))> {
    let (out, kv, saved) = attention_outside_graph(q, k, v, pass)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok((out, kv));
    }
    let node = SelfAttentionNode {
        saved,
        value: PrecomputedValue::new(out),
    };
    Ok((q.apply_op3(k, v, node)?, kv))
}

/// [`self_attention`] without a graph node: the output, the keys and values, and what the
/// backward needs ([`SelfAttention::grads`]), for a backward written by hand.
pub fn attention_outside_graph(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pass: &PassAttention<'_>,
) -> Result<(Tensor, (Tensor, Tensor), SelfAttention)> {
    let PassAttention {
        heads: shape,
        cos,
        sin,
        packed,
        gemm,
        budget,
    } = *pass;
    let (b, t, _) = q.dims3()?;
    let Heads {
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    } = shape;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        candle_core::bail!("self attention: {nh} query heads over {nkv} key/value heads");
    }
    if !packed.is_empty() && (b != 1 || packed.iter().sum::<usize>() != t) {
        candle_core::bail!("self attention: packed lengths {packed:?} do not fill [{b}, {t}]");
    }
    let group = nh / nkv;
    let qh = fused::split_heads(&q.detach(), nh, Some((cos, sin)))?;
    let kh = fused::split_heads(&k.detach(), nkv, Some((cos, sin)))?;
    let vh = fused::split_heads(&v.detach(), nkv, None)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut parts = Vec::with_capacity(packed.len().max(1));
    let out = if packed.is_empty() {
        // Query heads of one key/value head are stacked as rows: no repeated k/v.
        let qs = qh.reshape((b, nkv, group * t, hd))?;
        let (out, attended) = attend(&qs, &kh, &vh, scale, t, 0, gemm, budget)?;
        parts.push(Part {
            q: qs,
            k: kh.clone(),
            v: vh.clone(),
            attended,
        });
        out.reshape((b, nh, t, hd))?
    } else {
        let q5 = qh.reshape((1, nkv, group, t, hd))?;
        let mut outs = Vec::with_capacity(packed.len());
        let mut start = 0;
        for &len in packed {
            let qs = q5
                .narrow(3, start, len)?
                .contiguous()?
                .reshape((1, nkv, group * len, hd))?;
            let ks = kh.narrow(2, start, len)?.contiguous()?;
            let vs = vh.narrow(2, start, len)?.contiguous()?;
            let (out, attended) = attend(&qs, &ks, &vs, scale, len, 0, gemm, budget)?;
            outs.push(out.reshape((1, nkv, group, len, hd))?);
            parts.push(Part {
                q: qs,
                k: ks,
                v: vs,
                attended,
            });
            start += len;
        }
        Tensor::cat(&outs, 3)?.reshape((1, nh, t, hd))?
    };
    let out = fused::merge_heads(&out, None)?;
    let saved = SelfAttention {
        parts,
        packed: packed.to_vec(),
        dims: (b, t, nkv, group, hd),
        cos: cos.clone(),
        sin: sin.clone(),
    };
    Ok((out, (kh, vh), saved))
}

/// One attention of the pass: its inputs as the attention saw them, and its saved state.
struct Part {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attended: Attended,
}

/// What the attention's backward reads.
pub struct SelfAttention {
    /// One per packed sequence, or one for the whole batch.
    parts: Vec<Part>,
    packed: Vec<usize>,
    /// (B, T, kv heads, query heads per kv head, head dim)
    dims: (usize, usize, usize, usize, usize),
    cos: Tensor,
    sin: Tensor,
}

struct SelfAttentionNode {
    saved: SelfAttention,
    value: PrecomputedValue,
}

impl SelfAttention {
    /// dq, dk, dv (in the projections' layout) for the output's gradient `g`.
    pub fn grads(&self, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, nkv, group, hd) = self.dims;
        let nh = nkv * group;
        let gh = fused::split_heads(g, nh, None)?;
        let (dq, dk, dv) = if self.packed.is_empty() {
            let p = &self.parts[0];
            let gs = gh.reshape((b, nkv, group * t, hd))?;
            let (dq, dk, dv) = p.attended.grads(&p.q, &p.k, &p.v, &gs)?;
            (dq.reshape((b, nh, t, hd))?, dk, dv)
        } else {
            let g5 = gh.reshape((1, nkv, group, t, hd))?;
            let n = self.packed.len();
            let (mut dqs, mut dks, mut dvs) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let mut start = 0;
            for (&len, p) in self.packed.iter().zip(&self.parts) {
                let gs =
                    g5.narrow(3, start, len)?
                        .contiguous()?
                        .reshape((1, nkv, group * len, hd))?;
                let (dq, dk, dv) = p.attended.grads(&p.q, &p.k, &p.v, &gs)?;
                dqs.push(dq.reshape((1, nkv, group, len, hd))?);
                dks.push(dk);
                dvs.push(dv);
                start += len;
            }
            (
                Tensor::cat(&dqs, 3)?.reshape((1, nh, t, hd))?,
                Tensor::cat(&dks, 2)?,
                Tensor::cat(&dvs, 2)?,
            )
        };
        // RoPE's transpose is the rotation by -angle (see fused::rope).
        let neg_sin = self.sin.neg()?;
        let dq = fused::merge_heads(&dq, Some((&self.cos, &neg_sin)))?;
        let dk = fused::merge_heads(&dk, Some((&self.cos, &neg_sin)))?;
        let dv = fused::merge_heads(&dv, None)?;
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for SelfAttentionNode {
    fn name(&self) -> &'static str {
        "self-attention"
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
        self.value.take_cpu("self-attention")
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.saved.grads(&g.detach())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
