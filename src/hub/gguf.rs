//! llama.cpp's GGUF files as a model source: the config from the `{arch}.*` metadata, the weights
//! dequantized (candle's reader) under their Hugging Face names with llama.cpp's q/k row
//! permutation undone, and the tokenizer from the `tokenizer.ggml.*` metadata. What comes out is
//! the Hugging Face model of the same architecture, so adapters trained on it have PEFT's layout
//! for that model.
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The architectures whose GGUF layout kto-train reads.
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];
/// The tensor types candle dequantizes (and so kto-train reads).
pub const TENSOR_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";
/// The BPE pre-tokenizers (`tokenizer.ggml.pre`) rebuilt from their llama.cpp names.
pub const PRE_TOKENIZERS: [&str; 5] = ["smollm", "llama-bpe", "qwen2", "gpt-2", "default"];

/// An open GGUF file: its metadata and tensor directory (the tensor data is read on demand).
pub struct Gguf {
    path: PathBuf,
    content: Content,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = Content::read(&mut f).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read it as GGUF ({e}); kto-train reads GGUF v2/v3 files with the tensor \
                 types {TENSOR_TYPES}",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        self.meta(key)
            .map(|v| {
                v.to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x as u64))
                    .with_context(|| format!("{}: `{key}` is not an integer", self.path.display()))
            })
            .transpose()
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| {
                v.to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .with_context(|| format!("{}: `{key}` is not a number", self.path.display()))
            })
            .transpose()
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// `general.architecture`, refused unless kto-train implements it.
    pub fn architecture(&self) -> Result<&str> {
        let arch = self
            .meta_str("general.architecture")
            .with_context(|| format!("{}: no `general.architecture`", self.path.display()))?;
        if !ARCHITECTURES.contains(&arch) {
            bail!(
                "{}: GGUF architecture `{arch}` is not supported; supported are {ARCHITECTURES:?}",
                self.path.display()
            );
        }
        Ok(arch)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The model's config in the layout of a Hugging Face config.json (transformers' own GGUF
    /// reading maps the same keys), so that one parser serves both sources.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let file = self.path.display();
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<u64> {
            self.meta_u64(&key(k))?
                .with_context(|| format!("{file}: required metadata `{}` is missing", key(k)))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let vocab = match self.meta_u64(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) => t.len() as u64,
                _ => self.tensor_rows("token_embd.weight")?,
            },
        };
        let head_dim = match self.meta_u64(&key("attention.key_length"))? {
            Some(d) => d,
            None => self
                .meta_u64(&key("rope.dimension_count"))?
                .unwrap_or(hidden / heads.max(1)),
        };
        let mut rope = json!({
            "rope_type": "default",
            "rope_theta": self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        });
        match self.meta_str(&key("rope.scaling.type")) {
            None | Some("none") => {}
            Some("linear") => {
                rope["rope_type"] = json!("linear");
                rope["factor"] = json!(self.meta_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0));
            }
            Some(other) => bail!(
                "{file}: rope scaling `{other}` in GGUF metadata is not supported (only linear, and \
                 Llama 3's frequency factors in `rope_freqs.weight`)"
            ),
        }
        let bias = |t: &str| self.has_tensor(&format!("blk.0.{t}.bias"));
        Ok(json!({
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta_u64(&key("attention.head_count_kv"))?.unwrap_or(heads),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "rms_norm_eps": self.meta_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_parameters": rope,
            "max_position_embeddings": self.meta_u64(&key("context_length"))?.unwrap_or(2048),
            "tie_word_embeddings": !self.has_tensor("output.weight"),
            "bos_token_id": self.meta_u64("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.meta_u64("tokenizer.ggml.eos_token_id")?,
            "attention_bias": bias("attn_q"),
            "attention_output_bias": bias("attn_output"),
            "mlp_bias": bias("ffn_up"),
            "hidden_act": "silu",
        }))
    }

    fn tensor_rows(&self, name: &str) -> Result<u64> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.path.display()))?;
        Ok(info.shape.dims()[0] as u64)
    }

    /// Llama 3's frequency divisors (`rope_freqs.weight`, one per rotary frequency), when present.
    pub fn rope_divisors(&self) -> Result<Option<Vec<f64>>> {
        if !self.has_tensor("rope_freqs.weight") {
            return Ok(None);
        }
        let t = self.dequantized("rope_freqs.weight")?;
        Ok(Some(
            t.flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?,
        ))
    }

    fn dequantized(&self, name: &str) -> Result<Tensor> {
        let mut f = std::fs::File::open(&self.path)?;
        let q = self
            .content
            .tensor(&mut f, name, &Device::Cpu)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        let dtype = q.dtype();
        q.dequantize(&Device::Cpu).with_context(|| {
            format!(
                "{}: cannot dequantize `{name}` of type {dtype:?} (readable types: {TENSOR_TYPES})",
                self.path.display()
            )
        })
    }

    /// Every weight of the model under its Hugging Face name, dequantized to f32, with llama.cpp's
    /// q/k row permutation undone (Llama files only: the converter permutes nothing else).
    pub fn hf_tensors(&self, heads: usize, kv_heads: usize) -> Result<HashMap<String, Tensor>> {
        let permuted = self.architecture()? == "llama";
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            if name == "rope_freqs.weight" {
                continue;
            }
            let Some(hf) = hf_name(name) else {
                bail!(
                    "{}: tensor `{name}` has no place in a Llama/Qwen2 model",
                    self.path.display()
                );
            };
            let mut t = self.dequantized(name)?;
            if permuted && (hf.contains(".q_proj.") || hf.contains(".k_proj.")) {
                let n = if hf.contains(".q_proj.") {
                    heads
                } else {
                    kv_heads
                };
                t = unpermute_rows(&t, n)?;
            }
            out.insert(hf, t);
        }
        Ok(out)
    }

    /// The tokenizer in `tokenizer.ggml.*`, None when the file has none.
    pub fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        let Some(model) = self.meta_str("tokenizer.ggml.model") else {
            return Ok(None);
        };
        let file = self.path.display();
        if model != "gpt2" {
            bail!(
                "{file}: the GGUF tokenizer model `{model}` is not supported (only byte-level BPE, \
                 `gpt2`); give a tokenizer.json with model.tokenizer"
            );
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            match self.meta(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.to_string()
                            .map(String::as_str)
                            .map_err(anyhow::Error::from)
                    })
                    .collect(),
                _ => bail!("{file}: `{key}` is missing or not a list of strings"),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let pre = self.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let json = tokenizer_json(&tokens, &merges, &types, pre)
            .with_context(|| format!("{file}: tokenizer.ggml.pre"))?;
        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?)
            .map_err(|e| anyhow::anyhow!("{file}: cannot build the tokenizer: {e}"))?;
        Ok(Some(tok))
    }

    /// `tokenizer.chat_template`, when present.
    /// The text of special token `key` (e.g. `tokenizer.ggml.bos_token_id`) in the file's own
    /// vocabulary, when both are present.
    pub fn special_token(&self, key: &str) -> Option<String> {
        let id = self.meta_u64(key).ok().flatten()? as usize;
        match self.meta("tokenizer.ggml.tokens")? {
            Value::Array(tokens) => tokens.get(id)?.to_string().ok().cloned(),
            _ => None,
        }
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.meta_str("tokenizer.chat_template")
    }
}

/// The Hugging Face name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation of `t` (rows = n heads of D rows, or a bias of n * D):
/// GGUF interleaves each head's two rotary halves in adjacent rows, Hugging Face keeps them as
/// blocks: hf_row[h*D + j] = gguf_row[h*D + 2 (j mod D/2) + (j div D/2)].
pub fn unpermute_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if n == 0 || !rows.is_multiple_of(n) || !(rows / n).is_multiple_of(2) {
        bail!("cannot undo the q/k permutation: {rows} rows for {n} heads");
    }
    let d = rows / n;
    let idx: Vec<u32> = (0..rows)
        .map(|r| {
            let (h, j) = (r / d, r % d);
            (h * d + 2 * (j % (d / 2)) + j / (d / 2)) as u32
        })
        .collect();
    Ok(t.index_select(&Tensor::from_vec(idx, rows, t.device())?, 0)?)
}

/// A tokenizer.json for a byte-level BPE vocabulary: the pre-tokenizer llama.cpp's name stands
/// for, every control token (type 3) and user-defined token (type 4) an added token.
fn tokenizer_json(
    tokens: &[&str],
    merges: &[&str],
    types: &[i64],
    pre: &str,
) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer) = match pre {
        "smollm" => (
            serde_json::Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "llama-bpe" => (
            serde_json::Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
        ),
        "gpt-2" | "default" => (serde_json::Value::Null, byte_level(true)),
        other => bail!(
            "the pre-tokenizer `{other}` is not one kto-train rebuilds (supported: \
             {PRE_TOKENIZERS:?}); give a tokenizer.json with model.tokenizer"
        ),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight").unwrap(),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.0.attn_qkv.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: gguf_row[h*D + 2i + s] = hf_row[h*D + s*D/2 + i], D = 4, 2 heads.
        let (n, d) = (2usize, 4usize);
        let hf: Vec<f32> = (0..(n * d) as u32).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; n * d];
        for h in 0..n {
            for i in 0..d / 2 {
                for s in 0..2 {
                    gguf[h * d + 2 * i + s] = hf[h * d + s * d / 2 + i];
                }
            }
        }
        let t = Tensor::from_vec(gguf, n * d, &Device::Cpu).unwrap();
        let back: Vec<f32> = unpermute_rows(&t, n).unwrap().to_vec1().unwrap();
        assert_eq!(back, hf);
    }
}
