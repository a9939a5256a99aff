//! A tiny random Llama model folder (config.json, model.safetensors, tokenizer.json) for smoke
//! runs and CI: SmolLM2's architecture and real tokenizer, random weights.
use super::config::LlamaConfig;
use crate::config::Projection;
use crate::util::atomic::{write_atomic, write_json_atomic};
use crate::util::safetensors_io::{serialize_pt, RawTensor};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// SmolLM2's tokenizer (byte-level BPE, vocab 49152), shipped in data/samples/smollm2.
pub const SMOLLM2_TOKENIZER: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/samples/smollm2/tokenizer.json"
));

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub seed: u64,
    /// Storage dtype of model.safetensors.
    pub dtype: DType,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            seed: 0,
            dtype: DType::BF16,
        }
    }
}

fn normal(rng: &mut ChaCha8Rng, std: f64) -> f32 {
    // Box-Muller; rand_distr is not worth a dependency for one distribution.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
}

/// Writes a random model with SmolLM2's architecture and `cfg`'s shapes (used for the tiny smoke
/// model and for benchmarks at SmolLM2-360M's exact shapes).
pub fn write_random_model(dir: &Path, cfg: &LlamaConfig, seed: u64, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    let mut rand_t = |name: String, shape: &[usize], rng: &mut ChaCha8Rng| -> Result<()> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| normal(rng, 0.02)).collect();
        let t = Tensor::from_vec(v, shape, &dev)?;
        tensors.push((name, RawTensor::from_tensor(&t, dtype)?));
        Ok(())
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    rand_t("model.embed_tokens.weight".into(), &[v, h], &mut rng)?;
    let ones = |name: String, n: usize| -> Result<(String, RawTensor)> {
        Ok((
            name,
            RawTensor::from_tensor(&Tensor::ones(n, DType::F32, &dev)?, dtype)?,
        ))
    };
    let mut norms = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for p in Projection::ALL {
            rand_t(
                format!("model.layers.{l}.{}.{p}.weight", p.parent()),
                &cfg.projection_shape(p),
                &mut rng,
            )?;
        }
        norms.push(ones(format!("model.layers.{l}.input_layernorm.weight"), h)?);
        norms.push(ones(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            h,
        )?);
    }
    if !cfg.tie_word_embeddings {
        rand_t("lm_head.weight".into(), &[v, h], &mut rng)?;
    }
    norms.push(ones("model.norm.weight".into(), h)?);
    tensors.extend(norms);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomic(&dir.join("model.safetensors"), &serialize_pt(&tensors)?)?;
    let mut cfg = cfg.clone();
    cfg.saved_dtype = Some(
        match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F64 => "float64",
            _ => "float32",
        }
        .into(),
    );
    write_json_atomic(&dir.join("config.json"), &cfg.to_json()?)?;
    write_atomic(&dir.join("tokenizer.json"), SMOLLM2_TOKENIZER)?;
    Ok(())
}

/// The tiny smoke-run model: SmolLM2's vocabulary, hidden 64, 2 layers, grouped-query attention.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    let mut cfg = LlamaConfig::smollm2_360m();
    cfg.hidden_size = spec.hidden_size;
    cfg.intermediate_size = spec.intermediate_size;
    cfg.num_hidden_layers = spec.num_hidden_layers;
    cfg.num_attention_heads = spec.num_attention_heads;
    cfg.num_key_value_heads = spec.num_key_value_heads;
    cfg.head_dim = spec.hidden_size / spec.num_attention_heads;
    cfg.max_position_embeddings = 2048;
    write_random_model(dir, &cfg, spec.seed, spec.dtype)
}
