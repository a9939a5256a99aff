//! The Llama network (SmolLM2's architecture): RMSNorm, rotary embeddings, grouped-query
//! attention, SwiGLU MLP, optional tied embeddings. Built only from differentiable ops (candle's
//! fused rope/softmax/rms_norm kernels have no backward); which kernels run is the model's
//! [`KernelSettings`].
use super::config::LlamaConfig;
use super::lora::Linear;
use super::pass::PassMode;
use crate::config::Projection;
use crate::kernels::gemm::GemmMode;
use crate::kernels::{
    attention, checkpoint, fused, lora_linear, products, self_attention, KernelSettings,
};
use crate::util::env::FlagSetting;
use candle_core::{DType, Device, Module, Result, Tensor, TensorId, Var, D};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, use_fused: bool) -> Result<Tensor> {
        if use_fused && fused::available(x) {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        let dim = x.dim(D::Minus1)?;
        let var = (x.sqr()?.sum_keepdim(D::Minus1)? / dim as f64)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)
    }
}

/// Grouped-query self-attention with rotary embeddings.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

/// The SwiGLU MLP: down(silu(gate(x)) * up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// `KTO_TRAIN_PACK`: `0` runs one pass per sequence where [`Llama::can_pack`] would pack them
/// (for comparisons), `1` packs also in f64 where the products' rounding depends on the rows'
/// grouping.
pub const PACK_ENV: &str = "KTO_TRAIN_PACK";

/// `KTO_TRAIN_GRAPH_BACKWARD=1`: checkpointed blocks back-propagate through candle's graph of
/// their recomputation instead of by hand (`block_grad`), for comparisons.
pub const GRAPH_BACKWARD_ENV: &str = "KTO_TRAIN_GRAPH_BACKWARD";

static GRAPH_BACKWARD: FlagSetting = FlagSetting::new(GRAPH_BACKWARD_ENV, false);

/// Whether checkpointed blocks back-propagate through candle's graph ([`GRAPH_BACKWARD_ENV`],
/// or [`set_graph_backward`]).
pub fn graph_backward() -> bool {
    GRAPH_BACKWARD.get()
}

/// Sets [`graph_backward`] for this process (tests compare the two backwards).
pub fn set_graph_backward(on: bool) {
    GRAPH_BACKWARD.set(on);
}

/// Keys and values [B, kv_heads, T, head_dim] of one layer.
pub type LayerKv = (Tensor, Tensor);

/// What every decoder block of one forward pass shares.
#[derive(Debug)]
pub struct BlockContext {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions already in the key/value prefix each block is given (0 without one); this
    /// pass's tokens sit at positions offset..offset + T.
    pub offset: usize,
    /// RoPE tables [T, head_dim] for positions offset..offset + T.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive causal mask [T, offset + T] for the composite path (the fused softmax masks
    /// itself).
    pub mask: Option<Tensor>,
    pub use_fused: bool,
    pub gemm: GemmMode,
    /// The sequences packed one after another into this pass's single row (B = 1, fused path):
    /// each attends only to itself and its own prefix. Empty: not a packed pass.
    pub segments: Vec<Segment>,
}

/// One sequence of a packed pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Its tokens in the pass.
    pub len: usize,
    /// Positions before its first token that it attends to; its own positions (RoPE) start
    /// here.
    pub offset: usize,
    /// Where the keys and values of those `offset` positions are.
    pub prefix: PrefixAt,
}

/// Where a packed sequence's prefix states are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixAt {
    /// In the prefix given to the pass, from this position on.
    Given(usize),
    /// In this pass, from this position on: another sequence of the pass whose first `offset`
    /// tokens are this sequence's prefix (its states, computed in the same pass, are reused).
    InPass(usize),
}

impl Segment {
    /// A sequence from position 0, with no prefix.
    pub fn alone(len: usize) -> Self {
        Self {
            len,
            offset: 0,
            prefix: PrefixAt::Given(0),
        }
    }
}

impl Attention {
    /// o_proj(attention(h)) for the normed input `h` [B, T, hidden]. `prefix` holds the keys and
    /// values of positions before this pass's tokens; `capture` receives this layer's keys and
    /// values (after RoPE, detached).
    fn forward(
        &self,
        h: &Tensor,
        pass: PassMode,
        ctx: &BlockContext,
        prefix: Option<&LayerKv>,
        capture: Option<&mut Vec<LayerKv>>,
    ) -> Result<Tensor> {
        let (b, t, hd) = (ctx.b, ctx.t, ctx.head_dim);
        let (nh, nkv) = (ctx.heads, ctx.kv_heads);
        if prefix.is_none() && Block::hand_written(ctx, h) {
            let project = |lin: &Linear| lin.forward(h, pass, ctx.gemm);
            let (q, k, v) = (
                project(&self.q_proj)?,
                project(&self.k_proj)?,
                project(&self.v_proj)?,
            );
            let packed = attention_spans(ctx);
            let spec = pass_attention(ctx, &packed);
            let (y, (kh, vh)) = self_attention::self_attention(&q, &k, &v, &spec)?;
            if let Some(c) = capture {
                c.push((kh, vh));
            }
            return self.o_proj.forward(&y, pass, ctx.gemm);
        }
        let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
            lin.forward(h, pass, ctx.gemm)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rope = |x: Tensor| -> Result<Tensor> {
            if ctx.use_fused {
                fused::rope(&x, &ctx.cos, &ctx.sin)
            } else {
                x.broadcast_mul(&ctx.cos)? + rotate_half(&x)?.broadcast_mul(&ctx.sin)?
            }
        };
        let qh = rope(heads(&self.q_proj, nh)?)?;
        let kh = rope(heads(&self.k_proj, nkv)?)?;
        let vh = heads(&self.v_proj, nkv)?;
        if let Some(c) = capture {
            c.push((kh.detach(), vh.detach()));
        }
        let y = if ctx.use_fused && !ctx.segments.is_empty() {
            packed_attention(&qh, &kh, &vh, prefix, ctx)?
        } else {
            let (kh, vh) = match prefix {
                Some((pk, pv)) => (Tensor::cat(&[pk, &kh], 2)?, Tensor::cat(&[pv, &vh], 2)?),
                None => (kh, vh),
            };
            if ctx.use_fused {
                // Query heads of one key/value head are stacked as rows: no repeated k/v.
                let qh = qh.reshape((b, nkv, (nh / nkv) * t, hd))?;
                let scale = 1.0 / (hd as f64).sqrt();
                attention::causal_attention(&qh, &kh, &vh, scale, t, ctx.offset, ctx.gemm)?
                    .reshape((b, nh, t, hd))?
            } else {
                composite_attention(&qh, &kh, &vh, ctx)?
            }
        };
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&y, pass, ctx.gemm)
    }
}

/// The lengths of the sequences packed into the pass, for [`self_attention`] (empty: each row
/// is one sequence).
pub(crate) fn attention_spans(ctx: &BlockContext) -> Vec<usize> {
    ctx.segments.iter().map(|s| s.len).collect()
}

/// How the pass's attention runs, for [`self_attention`] (`packed` from [`attention_spans`]).
pub(crate) fn pass_attention<'a>(
    ctx: &'a BlockContext,
    packed: &'a [usize],
) -> self_attention::PassAttention<'a> {
    self_attention::PassAttention {
        heads: self_attention::Heads {
            heads: ctx.heads,
            kv_heads: ctx.kv_heads,
            head_dim: ctx.head_dim,
        },
        cos: &ctx.cos,
        sin: &ctx.sin,
        packed,
        gemm: ctx.gemm,
        budget: attention::budget(),
    }
}

/// Attention of a packed pass (`ctx.segments`): each sequence's queries over its own keys only
/// (its prefix's, then its own), as if it ran alone. q [1, heads, T, d], k and v
/// [1, kv_heads, T, d], the given prefix [1, kv_heads, P, d] -> [1, heads, T, d].
fn packed_attention(
    qh: &Tensor,
    kh: &Tensor,
    vh: &Tensor,
    prefix: Option<&LayerKv>,
    ctx: &BlockContext,
) -> Result<Tensor> {
    let (t, hd) = (ctx.t, ctx.head_dim);
    let (nkv, group) = (ctx.kv_heads, ctx.heads / ctx.kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let q = qh.reshape((1, nkv, group, t, hd))?;
    let mut parts = Vec::with_capacity(ctx.segments.len());
    let mut start = 0;
    for (s, seg) in ctx.segments.iter().enumerate() {
        let (len, offset) = (seg.len, seg.offset);
        let qs = q
            .narrow(3, start, len)?
            .contiguous()?
            .reshape((1, nkv, group * len, hd))?;
        let (ks, vs) = (kh.narrow(2, start, len)?, vh.narrow(2, start, len)?);
        let (ks, vs) = match (offset, seg.prefix, prefix) {
            (0, _, _) => (ks.contiguous()?, vs.contiguous()?),
            (_, PrefixAt::Given(at), Some((pk, pv))) => (
                Tensor::cat(&[&pk.narrow(2, at, offset)?, &ks], 2)?,
                Tensor::cat(&[&pv.narrow(2, at, offset)?, &vs], 2)?,
            ),
            (_, PrefixAt::InPass(at), _) => (
                Tensor::cat(&[&kh.narrow(2, at, offset)?, &ks], 2)?,
                Tensor::cat(&[&vh.narrow(2, at, offset)?, &vs], 2)?,
            ),
            (_, PrefixAt::Given(_), None) => {
                candle_core::bail!("packed attention: segment {s} has no prefix")
            }
        };
        let y = attention::causal_attention(&qs, &ks, &vs, scale, len, offset, ctx.gemm)?;
        parts.push(y.reshape((1, nkv, group, len, hd))?);
        start += len;
    }
    Tensor::cat(&parts, 3)?.reshape((1, ctx.heads, t, hd))
}

/// softmax(q k^T / sqrt(d) + mask) v with candle's ops, k/v repeated per query head.
fn composite_attention(
    qh: &Tensor,
    kh: &Tensor,
    vh: &Tensor,
    ctx: &BlockContext,
) -> Result<Tensor> {
    let (b, hd) = (ctx.b, ctx.head_dim);
    let (nh, nkv) = (ctx.heads, ctx.kv_heads);
    let (rep, tk) = (nh / nkv, ctx.offset + ctx.t);
    let expand = |x: &Tensor| -> Result<Tensor> {
        if rep == 1 {
            return Ok(x.clone());
        }
        x.unsqueeze(2)?
            .broadcast_as((b, nkv, rep, tk, hd))?
            .contiguous()?
            .reshape((b, nh, tk, hd))
    };
    let (kh, vh) = (expand(kh)?, expand(vh)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let att = (qh.matmul(&kh.t()?.contiguous()?)? * scale)?
        .broadcast_add(ctx.mask.as_ref().expect("composite path has a mask"))?;
    candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&vh)
}

impl Mlp {
    fn forward(&self, h: &Tensor, pass: PassMode, ctx: &BlockContext) -> Result<Tensor> {
        let g = self.gate_proj.forward(h, pass, ctx.gemm)?;
        let u = self.up_proj.forward(h, pass, ctx.gemm)?;
        let gu = if ctx.use_fused {
            fused::silu_mul(&g, &u)?
        } else {
            (g.silu()? * u)?
        };
        self.down_proj.forward(&gu, pass, ctx.gemm)
    }
}

impl Block {
    /// Every projection with its name, in [`Projection::ALL`] order.
    pub fn projections(&self) -> [(Projection, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            (Projection::QProj, &a.q_proj),
            (Projection::KProj, &a.k_proj),
            (Projection::VProj, &a.v_proj),
            (Projection::OProj, &a.o_proj),
            (Projection::GateProj, &m.gate_proj),
            (Projection::UpProj, &m.up_proj),
            (Projection::DownProj, &m.down_proj),
        ]
    }

    fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    /// The LoRA weights inside this block (A, B of each adapted projection).
    pub fn lora_vars(&self) -> Vec<Var> {
        self.projections()
            .into_iter()
            .filter_map(|(_, l)| l.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// One decoder block: x + attention(norm(x)), then + mlp(norm(.)).
    pub fn forward(&self, x: &Tensor, pass: PassMode, ctx: &BlockContext) -> Result<Tensor> {
        self.forward_with_prefix(x, pass, ctx, None, None)
    }

    /// [`Block::forward`] for passes that share a prompt: `prefix` holds the keys and values
    /// [B, kv_heads, ctx.offset, head_dim] of positions before this pass's tokens; `capture`
    /// receives this block's keys and values (after RoPE, detached).
    pub(crate) fn forward_with_prefix(
        &self,
        x: &Tensor,
        pass: PassMode,
        ctx: &BlockContext,
        prefix: Option<&LayerKv>,
        capture: Option<&mut Vec<LayerKv>>,
    ) -> Result<Tensor> {
        let add = |a: &Tensor, b: &Tensor| {
            if ctx.use_fused {
                fused::add(a, b)
            } else {
                a + b
            }
        };
        let h = self.input_layernorm.forward(x, ctx.use_fused)?;
        let x = add(x, &self.self_attn.forward(&h, pass, ctx, prefix, capture)?)?;
        let h = self.post_attention_layernorm.forward(&x, ctx.use_fused)?;
        add(&x, &self.mlp.forward(&h, pass, ctx)?)
    }

    /// Whether the block's attention runs as one node from its projections' outputs, and a
    /// checkpointed block's backward by hand (`block_grad`): the fused ops on the CPU, every
    /// sequence from position 0 without a given prefix.
    pub(crate) fn hand_written(ctx: &BlockContext, x: &Tensor) -> bool {
        ctx.use_fused
            && x.device().is_cpu()
            && fused::available(x)
            && ctx.offset == 0
            && ctx.segments.iter().all(|s| s.offset == 0)
    }

    /// The block with its intermediates recomputed in the backward instead of kept (see
    /// [`checkpoint`]); an ordinary forward when the block has nothing trainable.
    fn forward_checkpointed(
        &self,
        x: &Tensor,
        pass: PassMode,
        ctx: &Arc<BlockContext>,
        capture: Option<&mut Vec<LayerKv>>,
    ) -> Result<Tensor> {
        let params = self.lora_vars();
        if params.is_empty() {
            return self.forward_with_prefix(x, pass, ctx, None, capture);
        }
        let (y, kept) = lora_linear::record(|| {
            self.forward_with_prefix(&x.detach(), pass.with_grad(false), ctx, None, capture)
        });
        let y = y?;
        let (block, ctx) = (self.clone(), ctx.clone());
        // The projections' outputs kept by the forward, taken by the (single) recomputation.
        let kept = std::sync::Mutex::new(Some(kept));
        if Block::hand_written(&ctx, x) && !graph_backward() {
            let backward: checkpoint::Backward = Arc::new(move |x, dy| {
                let run = || block.grads_by_hand(x, dy, pass, &ctx);
                match kept.lock().ok().and_then(|mut k| k.take()) {
                    Some(k) => lora_linear::replay(k, run),
                    None => run(),
                }
            });
            return checkpoint::checkpointed_by_hand(x, &y, params, backward)?.ok_or_else(|| {
                candle_core::Error::Msg("checkpoint: block without parameters".into())
            });
        }
        let recompute: checkpoint::Recompute =
            Arc::new(move |x| match kept.lock().ok().and_then(|mut k| k.take()) {
                Some(k) => lora_linear::replay(k, || block.forward(x, pass, &ctx)),
                None => block.forward(x, pass, &ctx),
            });
        checkpoint::checkpointed(x, &y, params, recompute)?
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: block without parameters".into()))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// The network. Built by [`crate::model::load_llama`]; how it computes is fixed by
/// [`Llama::with_kernels`] before use, never changed during a run.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// [vocab, hidden]; the embedding matrix itself when embeddings are tied.
    lm_head: Tensor,
    dtype: DType,
    device: Device,
    kernels: KernelSettings,
}

impl Llama {
    /// A network from its parts, with [`KernelSettings::default`].
    pub(crate) fn from_parts(
        cfg: LlamaConfig,
        embed_tokens: Tensor,
        layers: Vec<Block>,
        norm: RmsNorm,
        lm_head: Tensor,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            kernels: KernelSettings::default(),
        }
    }

    pub fn cfg(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn kernels(&self) -> KernelSettings {
        self.kernels
    }

    pub fn layers(&self) -> &[Block] {
        &self.layers
    }

    /// The network computing with `kernels`. In `Bf16` GEMM mode on a CPU in f32 the frozen
    /// matrices are then stored in bf16 only: the products round them to bf16 anyway, so no f32
    /// copy needs to exist (SmolLM2's published weights are bf16: nothing is lost, and their
    /// memory halves).
    ///
    /// Where those bf16 products run on the tile kernel, each projection's weight is then held
    /// only in the kernel's packed form ([`crate::kernels::frozen::FrozenWeight::packed`]),
    /// which holds the same values: the bf16 tensor is dropped. Other kernels get tensors back.
    pub fn with_kernels(mut self, kernels: KernelSettings) -> Result<Self> {
        self.kernels = kernels;
        let frozen = kernels.frozen_dtype(self.dtype, &self.device);
        if frozen != self.dtype {
            self.keep_frozen_weights_in(frozen)?;
        }
        if frozen != DType::BF16 || self.dtype != DType::F32 {
            return self.with_unpacked_projections();
        }
        self.with_packed_projections(crate::kernels::gemm::input_grad_pack_budget())
    }

    /// Every projection's weight held only packed where the tile kernel reads packed operands
    /// (else unchanged), the input gradient's form too for projections in order while their
    /// bf16 bytes fit `input_grad_bytes`.
    pub fn with_packed_projections(mut self, input_grad_bytes: usize) -> Result<Self> {
        let mut budget = input_grad_bytes;
        for layer in &mut self.layers {
            for lin in layer.projections_mut() {
                let (out, inp) = lin.weight.dims2();
                let bytes = out * inp * 2;
                let keep = bytes <= budget;
                if keep {
                    budget -= bytes;
                }
                lin.weight = lin.weight.clone().packed_with(keep)?;
            }
        }
        Ok(self)
    }

    /// The same network with every projection's weight held as a tensor again, as
    /// [`Llama::with_kernels`] leaves it outside bf16 products (for comparisons: products then
    /// read the bf16 tensor's cached packed copies, the path before weights were held packed).
    pub fn with_unpacked_projections(mut self) -> Result<Self> {
        for layer in &mut self.layers {
            for lin in layer.projections_mut() {
                lin.weight = lin.weight.clone().unpacked()?;
            }
        }
        Ok(self)
    }

    /// Stores the frozen matrices (projections, embeddings, an untied lm_head) in `dtype`,
    /// leaving LoRA weights, norms and the compute dtype as they are.
    fn keep_frozen_weights_in(&mut self, dtype: DType) -> Result<()> {
        let tied = self.cfg.tie_word_embeddings;
        self.embed_tokens = self.embed_tokens.to_dtype(dtype)?;
        self.lm_head = if tied {
            self.embed_tokens.clone()
        } else {
            self.lm_head.to_dtype(dtype)?
        };
        for layer in &mut self.layers {
            for lin in layer.projections_mut() {
                lin.weight = lin.weight.to_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// cos/sin tables [T, head_dim] for positions start..start + T, as transformers builds
    /// them (non-interleaved halves; the frequencies of the config's rope scaling).
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let inv = self.cfg.rope_inv_freq(start + t);
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for pos in start..start + t {
            for _ in 0..2 {
                for f in &inv {
                    // transformers computes the frequencies and the angles in f32
                    let ang = (pos as f32 * *f as f32) as f64;
                    cos.push(ang.cos());
                    sin.push(ang.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (t, d), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, d), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// [T, offset + T]: query i (at position offset + i) sees keys 0..=offset + i.
    fn causal_mask(&self, offset: usize, t: usize) -> Result<Tensor> {
        let tk = offset + t;
        let m: Vec<f32> = (0..t * tk)
            .map(|i| {
                if i % tk > offset + i / tk {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (t, tk), &self.device)?.to_dtype(self.dtype)
    }

    /// Final-norm hidden states [B, T, hidden] for right-padded token ids [B, T].
    pub fn hidden_states(&self, ids: &Tensor, pass: PassMode) -> Result<Tensor> {
        self.run_layers(ids, pass, None, None, &[])
    }

    /// [`Llama::hidden_states`], also returning every layer's keys and values
    /// [B, kv_heads, T, head_dim] (detached), for [`Llama::hidden_states_after`].
    pub fn hidden_states_capturing(
        &self,
        ids: &Tensor,
        pass: PassMode,
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let mut kv = Vec::with_capacity(self.layers.len());
        let h = self.run_layers(ids, pass, None, Some(&mut kv), &[])?;
        Ok((h, kv))
    }

    /// Whether [`Llama::hidden_states_packed`] applies to a pass in `pass`: the fused CPU path
    /// (it attends per sequence), RoPE frequencies that do not depend on the pass's length, no
    /// LoRA dropout in the pass (a mask is drawn per pass over all its rows: packed, the second
    /// sequence would get other masks than in a pass of its own), and activations in f32, the
    /// training precision. Sharing a product can change a sequence's sums in the last bits
    /// where the GEMM's blocking follows the product's shape (gemmkit, the libraries; not the
    /// built-in bf16 kernels, whose blocking over k is fixed): in f32 that is far below the
    /// rounding the products carry anyway, and packing ran the real unit 1.13-1.20x faster on
    /// an AVX2 CPU (f32 products, `KTO_TRAIN_PACK=0` vs `1` back to back). f64, the
    /// reference precision of the tests, keeps one pass per sequence, so that its runs stay
    /// bit-level (one process against N ranks).
    /// `KTO_TRAIN_PACK=0` never packs; `KTO_TRAIN_PACK=1` packs wherever the rest allows
    /// (tests/packing.rs in f64).
    pub fn can_pack(&self, pass: PassMode) -> bool {
        static SETTING: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let setting = *SETTING.get_or_init(|| match std::env::var(PACK_ENV).as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        });
        let precision_allows = match setting {
            Some(false) => return false,
            Some(true) => true,
            None => self.dtype == DType::F32,
        };
        let dropout = pass.lora
            && pass.dropout.is_some()
            && self.layers.iter().any(|layer| {
                layer
                    .projections()
                    .iter()
                    .any(|(_, l)| l.lora.as_ref().is_some_and(|lora| lora.dropout > 0.0))
            });
        precision_allows
            && self.device.is_cpu()
            && self.kernels.fused_ops
            && matches!(self.dtype, DType::F32 | DType::F64)
            && !self.cfg.rope_scaling.depends_on_length()
            && !dropout
    }

    /// Final-norm hidden states [1, T, hidden] of sequences of `lengths` packed one after
    /// another into `ids` [1, T] (T = the lengths' sum): each sequence's states equal those of
    /// a pass over it alone (same positions, attention within itself), with every product run
    /// once over all T rows instead of once per sequence. With `capture`, also every layer's
    /// keys and values [1, kv_heads, T, head_dim] (detached). Only where [`Llama::can_pack`].
    pub fn hidden_states_packed(
        &self,
        ids: &Tensor,
        pass: PassMode,
        lengths: &[usize],
        capture: bool,
    ) -> Result<(Tensor, Option<Vec<LayerKv>>)> {
        if !self.can_pack(pass)
            || ids.dim(0)? != 1
            || lengths.iter().sum::<usize>() != ids.dim(1)?
        {
            candle_core::bail!("hidden_states_packed: not packable here, or lengths != ids");
        }
        let mut kv = capture.then(|| Vec::with_capacity(self.layers.len()));
        let segments: Vec<Segment> = lengths.iter().map(|&n| Segment::alone(n)).collect();
        let h = self.run_layers(ids, pass, None, kv.as_mut(), &segments)?;
        Ok((h, kv))
    }

    /// [`Llama::hidden_states_packed`] for sequences that may each continue a prefix of their
    /// own ([`Segment`]): one whose states `prefix` holds (per layer [1, kv_heads, P,
    /// head_dim]), or an earlier sequence of the same pass. Each sequence's states equal those of
    /// [`Llama::hidden_states_after`] over it alone after its prefix. No gradient, no
    /// checkpointing.
    pub fn hidden_states_packed_with_prefixes(
        &self,
        ids: &Tensor,
        pass: PassMode,
        segments: &[Segment],
        prefix: Option<&[LayerKv]>,
    ) -> Result<Tensor> {
        // Positions the given prefix holds (every layer's the same).
        let given = match prefix {
            Some(p) if p.len() == self.layers.len() => {
                p.first().map_or(Ok(0), |(k, _)| k.dim(2))?
            }
            Some(_) => candle_core::bail!("hidden_states_packed_with_prefixes: prefix layers"),
            None => 0,
        };
        let mut start = 0;
        let mut fits = true;
        for seg in segments {
            fits &= seg.offset == 0
                || match seg.prefix {
                    PrefixAt::Given(at) => at + seg.offset <= given,
                    PrefixAt::InPass(at) => at + seg.offset <= start,
                };
            start += seg.len;
        }
        if !self.can_pack(pass) || pass.grad || ids.dim(0)? != 1 || start != ids.dim(1)? || !fits {
            candle_core::bail!(
                "hidden_states_packed_with_prefixes: not packable here, or the segments do not \
                 fit the tokens and prefixes"
            );
        }
        self.run_layers(ids, pass, prefix, None, segments)
    }

    /// Hidden states of tokens `ids` [B, S] that continue a sequence whose first P positions
    /// are given as each layer's keys and values `prefix` [B, kv_heads, P, head_dim] (from
    /// [`Llama::hidden_states_capturing`]): the same values as a full pass over P + S tokens
    /// gives at its last S positions, without recomputing the prefix. No checkpointing.
    pub fn hidden_states_after(
        &self,
        ids: &Tensor,
        pass: PassMode,
        prefix: &[LayerKv],
    ) -> Result<Tensor> {
        if prefix.len() != self.layers.len() {
            candle_core::bail!(
                "hidden_states_after: {} prefix layers for {} layers",
                prefix.len(),
                self.layers.len()
            );
        }
        self.run_layers(ids, pass, Some(prefix), None, &[])
    }

    /// [`Llama::hidden_states_after`] that also returns each layer's keys and values for all
    /// P + S positions (the prefix with this pass's appended): a KV cache for generation.
    pub fn hidden_states_extending(
        &self,
        ids: &Tensor,
        pass: PassMode,
        prefix: &[LayerKv],
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let mut new = Vec::with_capacity(self.layers.len());
        let h = if prefix.is_empty() {
            self.run_layers(ids, pass, None, Some(&mut new), &[])?
        } else {
            self.run_layers(ids, pass, Some(prefix), Some(&mut new), &[])?
        };
        if prefix.is_empty() {
            return Ok((h, new));
        }
        let kv = prefix
            .iter()
            .zip(new)
            .map(|((pk, pv), (k, v))| Ok((Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((h, kv))
    }

    fn block_context(
        &self,
        b: usize,
        t: usize,
        offset: usize,
        x: &Tensor,
        segments: &[Segment],
    ) -> Result<BlockContext> {
        let (cos, sin) = if segments.is_empty() {
            self.rope_tables(offset, t)?
        } else {
            // Each packed sequence from its own offset: rows of one table up to the furthest.
            let end = segments.iter().map(|s| s.offset + s.len).max();
            let (cos, sin) = self.rope_tables(0, end.unwrap_or(0))?;
            let pos: Vec<u32> = segments
                .iter()
                .flat_map(|s| (s.offset..s.offset + s.len).map(|p| p as u32))
                .collect();
            let pos = Tensor::from_vec(pos, t, &self.device)?;
            (cos.index_select(&pos, 0)?, sin.index_select(&pos, 0)?)
        };
        let use_fused = self.kernels.fused_ops && fused::available(x);
        let mask = if use_fused {
            None
        } else {
            Some(self.causal_mask(offset, t)?)
        };
        let c = &self.cfg;
        Ok(BlockContext {
            b,
            t,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            offset,
            cos,
            sin,
            mask,
            use_fused,
            gemm: self.kernels.gemm,
            segments: segments.to_vec(),
        })
    }

    fn run_layers(
        &self,
        ids: &Tensor,
        pass: PassMode,
        prefix: Option<&[LayerKv]>,
        mut capture: Option<&mut Vec<LayerKv>>,
        segments: &[Segment],
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = match prefix {
            Some(p) if !p.is_empty() => p[0].0.dim(2)?,
            _ => 0,
        };
        let x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.cfg.hidden_size)
            .forward(ids)?;
        let mut x = x.to_dtype(self.dtype)?;
        let ctx = Arc::new(self.block_context(b, t, offset, &x, segments)?);
        if !segments.is_empty() && !ctx.use_fused {
            candle_core::bail!("packed sequences need the fused attention path");
        }
        let checkpoint = self.kernels.activation_checkpointing && pass.grad && prefix.is_none();
        for (i, layer) in self.layers.iter().enumerate() {
            let cap = capture.as_deref_mut();
            x = if checkpoint {
                layer.forward_checkpointed(&x, pass, &ctx, cap)?
            } else {
                layer.forward_with_prefix(&x, pass, &ctx, prefix.map(|p| &p[i]), cap)?
            };
        }
        self.norm.forward(&x, ctx.use_fused)
    }

    /// Logits [N, vocab] for hidden rows [N, hidden].
    pub fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        products::frozen_linear(rows, &self.lm_head, self.kernels.gemm)
    }

    /// The output layer's weight [vocab, hidden] (frozen; the embeddings when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Every LoRA layer, with its PEFT module path (`model.layers.{i}.self_attn.q_proj`).
    pub fn lora_layers(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (p, lin) in layer.projections() {
                if lin.lora.is_some() {
                    out.push((format!("model.layers.{i}.{}.{}", p.parent(), p.name()), lin));
                }
            }
        }
        out
    }

    /// The same network with every LoRA dropout set to 0 (TRL's `disable_dropout`); the LoRA
    /// weights are shared, not copied.
    pub fn without_lora_dropout(mut self) -> Self {
        for layer in &mut self.layers {
            for lin in layer.projections_mut() {
                if let Some(l) = lin.lora.as_mut() {
                    l.dropout = 0.0;
                }
            }
        }
        self
    }

    /// The trainable weights: A and B of every LoRA layer, in [`Llama::lora_layers`] order.
    pub fn lora_vars(&self) -> Vec<Var> {
        self.layers.iter().flat_map(Block::lora_vars).collect()
    }

    /// Runs the backward of `loss` and returns d loss / d each of [`Llama::lora_vars`] (zeros for
    /// a weight the loss does not reach), including those of checkpointed blocks.
    pub fn lora_gradients(&self, loss: &Tensor) -> Result<LoraGradients> {
        let store = checkpoint::backward(loss)?;
        self.gradients_from(Some(&store))
    }

    /// Zero gradients for every LoRA weight (a rank with no rows in a micro-batch).
    pub fn zero_lora_gradients(&self) -> Result<LoraGradients> {
        self.gradients_from(None)
    }

    /// Each LoRA weight's gradient in `store`, zeros where it has none.
    fn gradients_from(
        &self,
        store: Option<&candle_core::backprop::GradStore>,
    ) -> Result<LoraGradients> {
        let vars = self.lora_vars();
        let grads = vars
            .iter()
            .map(|v| match store.and_then(|s| s.get(v.as_tensor())) {
                Some(g) => Ok(g.clone()),
                None => v.zeros_like(),
            })
            .collect::<Result<_>>()?;
        Ok(LoraGradients {
            ids: vars.iter().map(|v| v.as_tensor().id()).collect(),
            grads,
        })
    }
}

/// d loss / d each LoRA weight of a model, in [`Llama::lora_vars`] order.
#[derive(Debug, Clone)]
pub struct LoraGradients {
    ids: Vec<TensorId>,
    grads: Vec<Tensor>,
}

impl LoraGradients {
    /// The gradient of the LoRA weight `w` (a [`Llama::lora_vars`] tensor).
    pub fn get(&self, w: &Tensor) -> Option<&Tensor> {
        let i = self.ids.iter().position(|&id| id == w.id())?;
        self.grads.get(i)
    }

    pub fn into_vec(self) -> Vec<Tensor> {
        self.grads
    }
}
