//! config.json of a Hugging Face Llama model, in both the transformers-4 layout (top-level
//! `rope_theta`, `torch_dtype`) and the transformers-5 layout (`rope_parameters`, `dtype`).
use crate::config::Projection;
use crate::hub::token_id;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// First of `eos_token_id` (int or list).
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// `dtype` / `torch_dtype` as saved.
    pub saved_dtype: Option<String>,
}

fn usize_key(v: &Value, file: &Path, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).with_context(|| {
            format!(
                "{}: `{key}` must be a non-negative integer, got {x}",
                file.display()
            )
        }),
    }
}

fn required(v: &Value, file: &Path, key: &str) -> Result<usize> {
    usize_key(v, file, key)?
        .with_context(|| format!("{}: required field `{key}` is missing", file.display()))
}

fn f64_key(v: &Value, file: &Path, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .with_context(|| format!("{}: `{key}` must be a number, got {x}", file.display())),
    }
}

impl LlamaConfig {
    /// [out_features, in_features] of a projection's weight.
    pub fn projection_shape(&self, p: Projection) -> [usize; 2] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        match p {
            Projection::QProj => [q, h],
            Projection::KProj | Projection::VProj => [kv, h],
            Projection::OProj => [h, q],
            Projection::GateProj | Projection::UpProj => [i, h],
            Projection::DownProj => [h, i],
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&v, path)
    }

    /// `file` only names the source in error messages.
    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        if !v.is_object() {
            bail!("{}: expected a JSON object", file.display());
        }
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                bail!(
                    "{}: model_type `{mt}` is not supported (kto-train implements the Llama architecture)",
                    file.display()
                );
            }
        }
        let hidden_size = required(v, file, "hidden_size")?;
        let intermediate_size = required(v, file, "intermediate_size")?;
        let num_hidden_layers = required(v, file, "num_hidden_layers")?;
        let num_attention_heads = required(v, file, "num_attention_heads")?;
        let vocab_size = required(v, file, "vocab_size")?;
        let num_key_value_heads =
            usize_key(v, file, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || (hidden_size % num_attention_heads != 0 && v.get("head_dim").is_none())
        {
            bail!(
                "{}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}",
                file.display()
            );
        }
        let head_dim = usize_key(v, file, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{}: num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}",
                file.display()
            );
        }
        if head_dim % 2 != 0 {
            bail!(
                "{}: head_dim {head_dim} must be even for rotary embeddings",
                file.display()
            );
        }
        // transformers 5 moved rope_theta into rope_parameters.
        let rope_params = v.get("rope_parameters").filter(|x| !x.is_null());
        let rope_theta = match rope_params {
            Some(rp) => {
                if let Some(t) = rp.get("rope_type").and_then(Value::as_str) {
                    if t != "default" {
                        bail!(
                            "{}: rope_parameters.rope_type `{t}` is not supported (only `default`)",
                            file.display()
                        );
                    }
                }
                f64_key(rp, file, "rope_theta")?
            }
            None => None,
        }
        .or(f64_key(v, file, "rope_theta")?)
        .unwrap_or(10000.0);
        if let Some(rs) = v.get("rope_scaling").filter(|x| !x.is_null()) {
            let t = rs
                .get("rope_type")
                .or(rs.get("type"))
                .and_then(Value::as_str);
            if t != Some("default") {
                bail!(
                    "{}: rope_scaling {rs} is not supported (only unscaled rotary embeddings)",
                    file.display()
                );
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if v.get(key).and_then(Value::as_bool) == Some(true) {
                bail!("{}: `{key}: true` is not supported", file.display());
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!(
                    "{}: hidden_act `{act}` is not supported (only silu)",
                    file.display()
                );
            }
        }
        let saved_dtype = v
            .get("dtype")
            .or(v.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f64_key(v, file, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: usize_key(v, file, "max_position_embeddings")?.unwrap_or(2048),
            eos_token_id: token_id(v, file, "eos_token_id")?,
            bos_token_id: token_id(v, file, "bos_token_id")?,
            saved_dtype,
        })
    }

    /// SmolLM2-360M's released config.json (HuggingFaceTB/SmolLM2-360M).
    pub fn smollm2_360m() -> Self {
        Self {
            hidden_size: 960,
            intermediate_size: 2560,
            num_hidden_layers: 32,
            num_attention_heads: 15,
            num_key_value_heads: 5,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            eos_token_id: Some(0),
            bos_token_id: Some(0),
            saved_dtype: Some("bfloat16".into()),
        }
    }

    /// A config.json (transformers-4 layout) describing this config.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "mlp_bias": false,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.saved_dtype.clone().unwrap_or_else(|| "float32".into()),
        })
    }
}
