//! Building the network from a model's safetensors (found by [`crate::hub`]), with fresh LoRA
//! layers or a PEFT adapter's.
use super::adapter::{load_adapter_weights, read_adapter_spec};
use super::config::{LlamaConfig, RopeScaling};
use super::llama::{Attention, Block, Llama, Mlp, RmsNorm};
use super::lora::{init_lora, Linear, Lora};
use crate::config::Projection;
use crate::hub::gguf::Gguf;
use crate::hub::{ModelFiles, WeightFormat};
use crate::kernels::frozen::FrozenWeight;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// How the LoRA layers are set up.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<Projection>,
    pub use_rslora: bool,
    /// Seed of PEFT's init (A kaiming-uniform, B zero).
    pub seed: u64,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn from_config(cfg: &crate::config::LoraConfig, seed: u64) -> Self {
        Self {
            r: cfg.r,
            alpha: cfg.alpha,
            dropout: cfg.dropout,
            target_modules: cfg.target_modules.clone(),
            use_rslora: cfg.use_rslora,
            seed,
        }
    }
}

/// Where the tensors come from: memory-mapped safetensors, or a GGUF file's tensors dequantized
/// under their Hugging Face names.
enum Source {
    Safetensors(MmapedSafetensors),
    Gguf(HashMap<String, Tensor>),
}

struct Weights<'a> {
    source: Source,
    files: &'a ModelFiles,
    dtype: DType,
    device: Device,
}

impl Weights<'_> {
    fn open<'a>(
        files: &'a ModelFiles,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights<'a>> {
        let source = match files.format {
            WeightFormat::Gguf => {
                let gguf = Gguf::open(&files.config)?;
                Source::Gguf(gguf.hf_tensors(cfg.num_attention_heads, cfg.num_key_value_heads)?)
            }
            WeightFormat::Safetensors => {
                // SAFETY: the weight files are memory-mapped read-only; changing them while a run
                // is going on is not supported (as with every mmap-based loader).
                let st =
                    unsafe { MmapedSafetensors::multi(&files.weights) }.with_context(|| {
                        format!("cannot read safetensors weights {:?}", files.weights)
                    })?;
                Source::Safetensors(st)
            }
        };
        Ok(Weights {
            source,
            files,
            dtype,
            device: device.clone(),
        })
    }

    fn names(&self) -> Vec<String> {
        match &self.source {
            Source::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Source::Gguf(map) => map.keys().cloned().collect(),
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let missing = || {
            format!(
                "model weights ({}) have no tensor `{name}`",
                self.files.weights[0].display()
            )
        };
        let t = match &self.source {
            Source::Safetensors(st) => st.load(name, &self.device).with_context(missing)?,
            Source::Gguf(map) => map
                .get(name)
                .with_context(missing)?
                .to_device(&self.device)?,
        };
        if t.dims() != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, but the model's config implies {:?}",
                self.files.config.display(),
                t.dims(),
                shape
            );
        }
        Ok(t.to_dtype(dtype)?)
    }
}

/// The model's config: config.json, or a GGUF file's metadata (with Llama 3's per-frequency rope
/// factors when the file has them).
pub fn model_config(files: &ModelFiles) -> Result<LlamaConfig> {
    match files.format {
        WeightFormat::Safetensors => LlamaConfig::from_file(&files.config),
        WeightFormat::Gguf => {
            let gguf = Gguf::open(&files.config)?;
            let mut cfg = LlamaConfig::from_json(&gguf.config_json()?, &files.config)?;
            if let Some(div) = gguf.rope_divisors()? {
                cfg.rope_scaling = RopeScaling::Divisors(div);
            }
            Ok(cfg)
        }
    }
}

/// Builds the network from its files, with LoRA layers per `lora` (frozen base weights) and
/// [`crate::kernels::KernelSettings::default`].
pub fn load_llama(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    lora: Option<&LoraSpec>,
) -> Result<Llama> {
    load_llama_frozen_in(files, dtype, dtype, device, lora)
}

/// [`load_llama`] with the frozen matrices (embeddings, projections, an untied lm_head) read
/// straight into `frozen` (bf16 for bf16 products): the compute-dtype copy of the whole network
/// never exists, which is most of a bf16 run's peak memory at load.
pub fn load_llama_frozen_in(
    files: &ModelFiles,
    dtype: DType,
    frozen: DType,
    device: &Device,
    lora: Option<&LoraSpec>,
) -> Result<Llama> {
    let cfg = model_config(files)?;
    let w = Weights::open(files, &cfg, dtype, device)?;
    check_layer_count(&w.names(), &cfg, files)?;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed_tokens = w.get_as("model.embed_tokens.weight", &[v, h], frozen)?;
    let mut rng = lora.map(|l| ChaCha8Rng::seed_from_u64(l.seed));
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for li in 0..cfg.num_hidden_layers {
        let mut linear = |pi: usize| -> Result<Linear> {
            let p = Projection::ALL[pi];
            let shape = cfg.projection_shape(p);
            let path = format!("model.layers.{li}.{}.{p}", p.parent());
            let weight = w.get_as(&format!("{path}.weight"), &shape, frozen)?;
            let bias = if cfg.biased.contains(&p) {
                Some(w.get(&format!("{path}.bias"), &[shape[0]])?)
            } else {
                None
            };
            let lora = match (lora, rng.as_mut()) {
                (Some(spec), Some(rng)) if spec.target_modules.contains(&p) => {
                    let (a, b) = init_lora(rng, shape[1], shape[0], spec.r, dtype, device)?;
                    Some(Lora {
                        a,
                        b,
                        scale: spec.scale(),
                        dropout: spec.dropout,
                    })
                }
                _ => None,
            };
            Ok(Linear {
                weight: FrozenWeight::Dense(weight),
                bias,
                lora,
                module_index: (li * 7 + pi) as u64,
            })
        };
        // In Projection::ALL order: the fresh LoRA init draws from one generator in this order.
        let self_attn = Attention {
            q_proj: linear(0)?,
            k_proj: linear(1)?,
            v_proj: linear(2)?,
            o_proj: linear(3)?,
        };
        let mlp = Mlp {
            gate_proj: linear(4)?,
            up_proj: linear(5)?,
            down_proj: linear(6)?,
        };
        let norm = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(&format!("model.layers.{li}.{n}.weight"), &[h])?,
                eps: cfg.rms_norm_eps,
            })
        };
        layers.push(Block {
            input_layernorm: norm("input_layernorm")?,
            self_attn,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp,
        });
    }
    let norm = RmsNorm {
        weight: w.get("model.norm.weight", &[h])?,
        eps: cfg.rms_norm_eps,
    };
    // transformers ignores a saved lm_head.weight when the embeddings are tied.
    let lm_head = if cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        w.get_as("lm_head.weight", &[v, h], frozen)?
    };
    Ok(Llama::from_parts(
        cfg,
        embed_tokens,
        layers,
        norm,
        lm_head,
        device,
        dtype,
    ))
}

/// Refuses weights with more decoder layers than config.json declares: they would be dropped
/// silently and the network would not be the one the files hold.
fn check_layer_count(names: &[String], cfg: &LlamaConfig, files: &ModelFiles) -> Result<()> {
    let deepest = names
        .iter()
        .filter_map(|name| {
            name.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max();
    if let Some(d) = deepest.filter(|&d| d >= cfg.num_hidden_layers) {
        bail!(
            "{}: the weights have {} decoder layers but config.json ({}) says num_hidden_layers = {}",
            files.dir.display(),
            d + 1,
            files.config.display(),
            cfg.num_hidden_layers
        );
    }
    Ok(())
}

/// The network with the PEFT adapter in `dir` applied, its LoRA layers set up per `spec` (the
/// adapter's own, from [`read_adapter_spec`], possibly with a training dropout and seed).
pub fn load_adapted(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    dir: &Path,
    spec: &LoraSpec,
) -> Result<Llama> {
    let model = load_llama(files, dtype, device, Some(spec))?;
    load_adapter_weights(&model, dir, spec)?;
    Ok(model)
}

/// The base network, or base + the PEFT adapter in `adapter` as it was saved: what `score`,
/// `eval` and `generate` run.
pub fn load_with_adapter(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    adapter: Option<&Path>,
) -> Result<Llama> {
    match adapter {
        None => load_llama(files, dtype, device, None),
        Some(dir) => {
            let (spec, _) = read_adapter_spec(dir)?;
            load_adapted(files, dtype, device, dir, &spec)
        }
    }
}
