//! config.json of a Hugging Face Llama or Qwen2 model, in both the transformers-4 layout
//! (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers-5 layout
//! (`rope_parameters`, `dtype`). A GGUF file's metadata is read into the same layout first
//! (crate::hub::gguf), so one parser serves both.
use crate::config::Projection;
use crate::hub::token_id;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The architectures implemented: the same network, Qwen2 with biases on q, k and v.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub const NAMES: [&'static str; 2] = ["llama", "qwen2"];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are scaled (`rope_type` of `rope_parameters` / `rope_scaling`), as
/// transformers' `ROPE_INIT_FUNCTIONS` compute them.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: past `max_position_embeddings`, theta grows with the sequence length.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1's frequency remapping.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Each frequency divided by its own factor (GGUF's `rope_freqs.weight`, Llama 3's rule
    /// written out by llama.cpp's converter).
    Divisors(Vec<f64>),
}

impl RopeScaling {
    pub const NAMES: [&'static str; 4] = ["default", "linear", "dynamic", "llama3"];

    /// Whether the frequencies depend on the length of the sequence (so that states computed for
    /// a prefix cannot be reused by a longer pass).
    pub fn depends_on_length(&self) -> bool {
        matches!(self, RopeScaling::Dynamic { .. })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Projections with a bias (Qwen2: q, k, v; Llama: with `attention_bias` / `mlp_bias`).
    pub biased: Vec<Projection>,
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

/// rope_theta and the scaling, from `rope_parameters` (transformers 5) or the top-level
/// `rope_theta` with `rope_scaling` (transformers 4; its type under `rope_type` or `type`).
fn rope(v: &Value, file: &Path) -> Result<(f64, RopeScaling)> {
    let params = v
        .get("rope_parameters")
        .filter(|x| !x.is_null())
        .or(v.get("rope_scaling").filter(|x| !x.is_null()));
    let theta = params
        .map(|p| f64_key(p, file, "rope_theta"))
        .transpose()?
        .flatten()
        .or(f64_key(v, file, "rope_theta")?)
        .unwrap_or(10000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p.get("rope_type").or(p.get("type")).and_then(Value::as_str);
    let num = |k: &str| -> Result<f64> {
        f64_key(p, file, k)?.with_context(|| {
            format!(
                "{}: rope scaling `{}` needs `{k}`",
                file.display(),
                kind.unwrap_or("?")
            )
        })
    };
    let scaling = match kind {
        None | Some("default") => RopeScaling::Default,
        Some("linear") => RopeScaling::Linear {
            factor: num("factor")?,
        },
        Some("dynamic") => RopeScaling::Dynamic {
            factor: num("factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        Some(other) => bail!(
            "{}: rope type `{other}` is not supported; supported are {:?}",
            file.display(),
            RopeScaling::NAMES
        ),
    };
    Ok((theta, scaling))
}

/// The biased projections: Qwen2's q, k, v (its attention always has them); Llama's attention
/// (q, k, v, o) with `attention_bias` and MLP with `mlp_bias`. `attention_output_bias` is how a
/// GGUF file says its o projection has one.
fn biases(v: &Value, arch: Architecture) -> Vec<Projection> {
    let flag = |k: &str| v.get(k).and_then(Value::as_bool) == Some(true);
    let mut out = Vec::new();
    if arch == Architecture::Qwen2 || flag("attention_bias") {
        out.extend([Projection::QProj, Projection::KProj, Projection::VProj]);
    }
    let o = match arch {
        Architecture::Llama => flag("attention_bias"),
        Architecture::Qwen2 => flag("attention_output_bias"),
    };
    if o || flag("attention_output_bias") {
        out.push(Projection::OProj);
    }
    if flag("mlp_bias") {
        out.extend([
            Projection::GateProj,
            Projection::UpProj,
            Projection::DownProj,
        ]);
    }
    out.dedup();
    out
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
        let architecture = match v.get("model_type").and_then(Value::as_str) {
            None | Some("llama") => Architecture::Llama,
            Some("qwen2") => Architecture::Qwen2,
            Some(mt) => bail!(
                "{}: model_type `{mt}` is not supported; supported are {:?}",
                file.display(),
                Architecture::NAMES
            ),
        };
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            bail!(
                "{}: use_sliding_window = true is not supported (sliding-window attention)",
                file.display()
            );
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
        let (rope_theta, rope_scaling) = rope(v, file)?;
        let biased = biases(v, architecture);
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
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f64_key(v, file, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            biased,
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
            architecture: Architecture::Llama,
            hidden_size: 960,
            intermediate_size: 2560,
            num_hidden_layers: 32,
            num_attention_heads: 15,
            num_key_value_heads: 5,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: RopeScaling::Default,
            biased: Vec::new(),
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            eos_token_id: Some(0),
            bos_token_id: Some(0),
            saved_dtype: Some("bfloat16".into()),
        }
    }

    /// A config.json (transformers-4 layout) describing this config.
    pub fn to_json(&self) -> Result<Value> {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Dynamic { factor } => {
                serde_json::json!({"rope_type": "dynamic", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Divisors(_) => bail!(
                "per-frequency rope factors (a GGUF's rope_freqs.weight) have no config.json form; \
                 take the model's own config.json"
            ),
        };
        let mut v = serde_json::json!({
            "architectures": [match self.architecture {
                Architecture::Llama => "LlamaForCausalLM",
                Architecture::Qwen2 => "Qwen2ForCausalLM",
            }],
            "model_type": self.architecture.name(),
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
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.saved_dtype.clone().unwrap_or_else(|| "float32".into()),
        });
        let has = |p: Projection| self.biased.contains(&p);
        match self.architecture {
            Architecture::Llama => {
                v["attention_bias"] = has(Projection::QProj).into();
                v["mlp_bias"] = has(Projection::UpProj).into();
            }
            Architecture::Qwen2 => {
                if has(Projection::OProj) || has(Projection::UpProj) {
                    bail!("a Qwen2 model with o or MLP biases has no config.json form");
                }
                v["use_sliding_window"] = false.into();
            }
        }
        Ok(v)
    }

    /// Rotary inverse frequencies (head_dim / 2 of them) for a pass whose last position is
    /// `seq_len - 1`, as transformers computes them for the config's rope type.
    pub fn rope_inv_freq(&self, seq_len: usize) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base = |theta: f64| -> Vec<f64> {
            (0..self.head_dim / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / d))
                .collect()
        };
        match &self.rope_scaling {
            RopeScaling::Default => base(self.rope_theta),
            RopeScaling::Linear { factor } => {
                base(self.rope_theta).iter().map(|f| f / factor).collect()
            }
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let len = seq_len as f64;
                if len > max {
                    let theta = self.rope_theta
                        * ((factor * len / max) - (factor - 1.0)).powf(d / (d - 2.0));
                    base(theta)
                } else {
                    base(self.rope_theta)
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            } => base(self.rope_theta)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < orig / high {
                        f
                    } else if wavelen > orig / low {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
            RopeScaling::Divisors(div) => base(self.rope_theta)
                .iter()
                .zip(div.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
        }
    }
}
