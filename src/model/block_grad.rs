//! A checkpointed decoder block's backward written by hand (CPU, fused path).
//!
//! Run through candle's backward, the recomputed block is about fifteen graph nodes (norms,
//! seven projections, attention, SwiGLU, residual adds, and the product that seeds the output's
//! gradient), and for each argument of each node candle allocates a zero-filled gradient buffer
//! and adds into it: on the real-data unit (SmolLM2-135M, ~330 rows per pass) that machinery
//! alone was 0.11 s of a 1.45 s step, besides the kernels' own backward work. Here the block's
//! forward is recomputed outside the graph, keeping what each piece's backward reads, and the
//! gradients flow back through the same kernels' backward functions ([`Linear::grads`],
//! [`SelfAttention::grads`], `fused::rms_norm_grad`, `fused::silu_mul_grads`): each
//! gradient is made once, and the sums candle would form over its zero buffer are formed
//! directly. The values are the candle backward's up to the order of the three q/k/v terms of
//! the first norm's input gradient (tests/block_backward.rs; tests/checkpointing.rs against
//! the non-checkpointed backward). On the real unit this ran 1.05-1.06x faster than the
//! graph backward (`KTO_TRAIN_GRAPH_BACKWARD=1`; one epoch each, alternated, two rounds).
use super::llama::{attention_spans, pass_attention, Block, BlockContext};
use super::lora::Linear;
use super::pass::PassMode;
use crate::kernels::fused;
use crate::kernels::self_attention::{attention_outside_graph, SelfAttention};
use crate::util::profile;
use candle_core::{Result, Tensor, Var};

/// A projection's output and what its backward reads.
struct Projected {
    y: Tensor,
    saved: Option<crate::kernels::lora_linear::LoraForward>,
}

fn project(lin: &Linear, x: &Tensor, pass: PassMode, ctx: &BlockContext) -> Result<Projected> {
    let (y, saved) = lin.forward_saved(x, pass, ctx.gemm)?;
    Ok(Projected { y, saved })
}

/// What the backward reads, from the block's forward recomputed outside the graph.
struct Forward {
    h1: Tensor,
    q: Projected,
    k: Projected,
    v: Projected,
    attn: SelfAttention,
    a: Tensor,
    o: Projected,
    x_mid: Tensor,
    h2: Tensor,
    gate: Projected,
    up: Projected,
    s: Tensor,
    down: Projected,
}

impl Block {
    fn forward_outside_graph(
        &self,
        x: &Tensor,
        pass: PassMode,
        ctx: &BlockContext,
    ) -> Result<Forward> {
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        let h1 = self.input_layernorm.forward(x, true)?;
        let q = project(&attn.q_proj, &h1, pass, ctx)?;
        let k = project(&attn.k_proj, &h1, pass, ctx)?;
        let v = project(&attn.v_proj, &h1, pass, ctx)?;
        let packed = attention_spans(ctx);
        let (a, _, attn_saved) =
            attention_outside_graph(&q.y, &k.y, &v.y, &pass_attention(ctx, &packed))?;
        let o = project(&attn.o_proj, &a, pass, ctx)?;
        let x_mid = fused::add(x, &o.y)?;
        let h2 = self.post_attention_layernorm.forward(&x_mid, true)?;
        let gate = project(&mlp.gate_proj, &h2, pass, ctx)?;
        let up = project(&mlp.up_proj, &h2, pass, ctx)?;
        let s = fused::silu_mul(&gate.y, &up.y)?;
        let down = project(&mlp.down_proj, &s, pass, ctx)?;
        Ok(Forward {
            h1,
            q,
            k,
            v,
            attn: attn_saved,
            a,
            o,
            x_mid,
            h2,
            gate,
            up,
            s,
            down,
        })
    }

    /// dL/dx and the gradients of the block's LoRA weights, for its input `x` and its output's
    /// gradient `dy` (inside a replay of kept projection outputs, the recomputation takes
    /// them). Only where [`Block::hand_written`] holds.
    pub(crate) fn grads_by_hand(
        &self,
        x: &Tensor,
        dy: &Tensor,
        pass: PassMode,
        ctx: &BlockContext,
    ) -> Result<(Tensor, Vec<(Var, Tensor)>)> {
        let f = {
            let _p = profile::phase("recomputation (checkpointed blocks)");
            self.forward_outside_graph(x, pass, ctx)?
        };
        self.backward_from(x, dy, f, ctx)
    }

    /// The backward over a recomputed forward `f`, which it drops piece by piece once read
    /// (the peak of a block's backward is what is alive at its largest point).
    fn backward_from(
        &self,
        x: &Tensor,
        dy: &Tensor,
        f: Forward,
        ctx: &BlockContext,
    ) -> Result<(Tensor, Vec<(Var, Tensor)>)> {
        let (attn, mlp, gemm) = (&self.self_attn, &self.mlp, ctx.gemm);
        let Forward {
            h1,
            q,
            k,
            v,
            attn: attention,
            a,
            o,
            x_mid,
            h2,
            gate,
            up,
            s,
            down,
        } = f;
        let mut params = Vec::with_capacity(14);
        let mut through = |lin: &Linear, x: &Tensor, p: Projected, g: Tensor| -> Result<Tensor> {
            let (dx, grads) = lin.grads(x, p.saved.as_ref(), &g, gemm)?;
            params.extend(grads.into_iter().flatten());
            Ok(dx)
        };
        // y = x_mid + down(silu(gate(h2)) * up(h2)), h2 = norm2(x_mid)
        let ds = through(&mlp.down_proj, &s, down, dy.clone())?;
        drop(s);
        let (dg, du) = fused::silu_mul_grads(&gate.y, &up.y, &ds)?;
        drop(ds);
        let d_gate = through(&mlp.gate_proj, &h2, gate, dg)?;
        let d_up = through(&mlp.up_proj, &h2, up, du)?;
        drop(h2);
        let dh2 = fused::add(&d_gate, &d_up)?;
        drop((d_gate, d_up));
        let norm2 = &self.post_attention_layernorm;
        let dx_mid = fused::add(
            dy,
            &fused::rms_norm_grad(&x_mid, &norm2.weight, &dh2, norm2.eps)?,
        )?;
        drop((x_mid, dh2));
        // x_mid = x + o(attention(q(h1), k(h1), v(h1))), h1 = norm1(x)
        let da = through(&attn.o_proj, &a, o, dx_mid.clone())?;
        drop(a);
        let (dq, dk, dv) = attention.grads(&da)?;
        drop((attention, da));
        let dh1 = through(&attn.q_proj, &h1, q, dq)?;
        let dh1 = fused::add(&dh1, &through(&attn.k_proj, &h1, k, dk)?)?;
        let dh1 = fused::add(&dh1, &through(&attn.v_proj, &h1, v, dv)?)?;
        drop(h1);
        let norm1 = &self.input_layernorm;
        let dx = fused::add(
            &dx_mid,
            &fused::rms_norm_grad(x, &norm1.weight, &dh1, norm1.eps)?,
        )?;
        Ok((dx, params))
    }
}
