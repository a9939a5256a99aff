//! The Llama network (SmolLM2's architecture): RMSNorm, rotary embeddings, grouped-query
//! attention, SwiGLU MLP, optional tied embeddings. Built only from differentiable ops (candle's
//! fused rope/softmax/rms_norm kernels have no backward).
use super::config::LlamaConfig;
use super::fused;
use super::lora::{Forward, Linear};
use super::ops::frozen_linear;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::sync::Arc;

/// The seven projections LoRA can target, in PEFT's module names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Where a projection lives in the module tree (`self_attn` or `mlp`).
pub fn projection_parent(name: &str) -> &'static str {
    match name {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    }
}

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

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// q, k, v, o, gate, up, down (PROJECTIONS order).
    pub proj: [Linear; 7],
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// [vocab, hidden]; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
    pub dtype: DType,
    pub device: Device,
    /// Use the fused CPU ops (src/model/fused.rs); the composite candle forms otherwise (other
    /// devices and dtypes, and as the reference the fused ops are tested against).
    pub use_fused_ops: bool,
    /// Keep only each decoder block's input during a gradient pass and recompute the block in
    /// the backward (src/model/checkpoint.rs): activation memory of one block instead of all.
    pub activation_checkpointing: bool,
}

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
}

impl Block {
    /// One decoder block: x + attention(norm(x)), then + mlp(norm(.)).
    pub fn forward(&self, x: &Tensor, fwd: Forward, ctx: &BlockContext) -> Result<Tensor> {
        self.forward_ext(x, fwd, ctx, None, None)
    }

    /// [`Block::forward`] with two extras for passes that share a prompt: `prefix` holds the
    /// keys and values [B, kv_heads, ctx.offset, head_dim] of positions before this pass's
    /// tokens; `capture` receives this block's keys and values (after RoPE, detached).
    pub fn forward_ext(
        &self,
        x: &Tensor,
        fwd: Forward,
        ctx: &BlockContext,
        prefix: Option<&(Tensor, Tensor)>,
        capture: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, hd) = (ctx.b, ctx.t, ctx.head_dim);
        let (nh, nkv) = (ctx.heads, ctx.kv_heads);
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        let use_fused = ctx.use_fused;
        let scale = 1.0 / (hd as f64).sqrt();
        let h = self.input_layernorm.forward(x, use_fused)?;
        let [q, k, v, o, gate, up, down] = &self.proj;
        let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
            lin.forward(&h, fwd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rope = |x: Tensor| -> Result<Tensor> {
            if use_fused {
                fused::rope(&x, cos, sin)
            } else {
                x.broadcast_mul(cos)? + rotate_half(&x)?.broadcast_mul(sin)?
            }
        };
        let qh = rope(heads(q, nh)?)?;
        let kh = rope(heads(k, nkv)?)?;
        let vh = heads(v, nkv)?;
        if let Some(c) = capture {
            c.push((kh.detach(), vh.detach()));
        }
        let (kh, vh) = match prefix {
            Some((pk, pv)) => (Tensor::cat(&[pk, &kh], 2)?, Tensor::cat(&[pv, &vh], 2)?),
            None => (kh, vh),
        };
        let tk = ctx.offset + t;
        let rep = nh / nkv;
        let y = if use_fused {
            // Query heads of one key/value head are stacked as rows: no repeated k/v.
            let qh = qh.reshape((b, nkv, rep * t, hd))?;
            super::attention::causal_attention(&qh, &kh, &vh, scale, t, ctx.offset)?
                .reshape((b, nh, t, hd))?
        } else {
            let (kh, vh) = if rep > 1 {
                let expand = |x: Tensor| -> Result<Tensor> {
                    x.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, tk, hd))?
                        .contiguous()?
                        .reshape((b, nh, tk, hd))
                };
                (expand(kh)?, expand(vh)?)
            } else {
                (kh, vh)
            };
            let att = (qh.matmul(&kh.t()?.contiguous()?)? * scale)?
                .broadcast_add(ctx.mask.as_ref().expect("composite path has a mask"))?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            att.matmul(&vh)?
        };
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))?;
        let x = (x + o.forward(&y, fwd)?)?;
        let h = self.post_attention_layernorm.forward(&x, use_fused)?;
        let g = gate.forward(&h, fwd)?;
        let u = up.forward(&h, fwd)?;
        let gu = if use_fused {
            fused::silu_mul(&g, &u)?
        } else {
            (g.silu()? * u)?
        };
        x + down.forward(&gu, fwd)?
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

impl Llama {
    /// cos/sin tables [T, head_dim] for positions start..start + T, as transformers builds
    /// them (non-interleaved halves).
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.cfg.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for pos in start..start + t {
            for _ in 0..2 {
                for f in &inv {
                    // transformers computes the angles in f32
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
    pub fn hidden_states(&self, ids: &Tensor, fwd: Forward) -> Result<Tensor> {
        self.run_layers(ids, fwd, None, None)
    }

    /// [`Llama::hidden_states`], also returning every layer's keys and values
    /// [B, kv_heads, T, head_dim] (detached), for [`Llama::hidden_states_after`].
    pub fn hidden_states_capturing(
        &self,
        ids: &Tensor,
        fwd: Forward,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let mut kv = Vec::with_capacity(self.layers.len());
        let h = self.run_layers(ids, fwd, None, Some(&mut kv))?;
        Ok((h, kv))
    }

    /// Hidden states of tokens `ids` [B, S] that continue a sequence whose first P positions
    /// are given as each layer's keys and values `prefix` [B, kv_heads, P, head_dim] (from
    /// [`Llama::hidden_states_capturing`]): the same values as a full pass over P + S tokens
    /// gives at its last S positions, without recomputing the prefix. No checkpointing.
    pub fn hidden_states_after(
        &self,
        ids: &Tensor,
        fwd: Forward,
        prefix: &[(Tensor, Tensor)],
    ) -> Result<Tensor> {
        if prefix.len() != self.layers.len() {
            candle_core::bail!(
                "hidden_states_after: {} prefix layers for {} layers",
                prefix.len(),
                self.layers.len()
            );
        }
        self.run_layers(ids, fwd, Some(prefix), None)
    }

    fn run_layers(
        &self,
        ids: &Tensor,
        fwd: Forward,
        prefix: Option<&[(Tensor, Tensor)]>,
        mut capture: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = match prefix {
            Some(p) if !p.is_empty() => p[0].0.dim(2)?,
            _ => 0,
        };
        let x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.cfg.hidden_size)
            .forward(ids)?;
        let mut x = x.to_dtype(self.dtype)?;
        let (cos, sin) = self.rope_tables(offset, t)?;
        let use_fused = self.use_fused_ops && fused::available(&x);
        let mask = if use_fused {
            None
        } else {
            Some(self.causal_mask(offset, t)?)
        };
        let c = &self.cfg;
        let ctx = Arc::new(BlockContext {
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
        });
        let checkpoint = self.activation_checkpointing && fwd.grad && prefix.is_none();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = prefix.map(|p| &p[i]);
            let cap = capture.as_deref_mut();
            x = if checkpoint {
                super::checkpoint::checkpointed_block(layer, &x, fwd, &ctx, cap)?
            } else {
                layer.forward_ext(&x, fwd, &ctx, kv, cap)?
            };
        }
        self.norm.forward(&x, use_fused)
    }

    /// Stores the frozen matrices (projections, embeddings, an untied lm_head) in `dtype`,
    /// leaving LoRA weights, norms and the compute dtype as they are. For the bf16 GEMM mode,
    /// which rounds these weights to bf16 anyway: it then needs no f32 copy of them (SmolLM2's
    /// published weights are bf16, so nothing is lost).
    pub fn keep_frozen_weights_in(&mut self, dtype: DType) -> Result<()> {
        let tied = self.cfg.tie_word_embeddings;
        self.embed_tokens = self.embed_tokens.to_dtype(dtype)?;
        self.lm_head = if tied {
            self.embed_tokens.clone()
        } else {
            self.lm_head.to_dtype(dtype)?
        };
        for layer in &mut self.layers {
            for lin in &mut layer.proj {
                lin.weight = lin.weight.to_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// Logits [N, vocab] for hidden rows [N, hidden].
    pub fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        frozen_linear(rows, &self.lm_head)
    }

    /// Every LoRA layer, with its PEFT module path (`model.layers.{i}.self_attn.q_proj`).
    pub fn lora_layers(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, lin) in PROJECTIONS.iter().zip(layer.proj.iter()) {
                if lin.lora.is_some() {
                    out.push((
                        format!("model.layers.{i}.{}.{name}", projection_parent(name)),
                        lin,
                    ));
                }
            }
        }
        out
    }
}
