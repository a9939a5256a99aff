//! `kto-train merge`: a plain Hugging Face model folder with a LoRA adapter folded into the
//! weights, W' = W + scale * B A (scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA),
//! for runtimes that know nothing of PEFT.
//!
//! The output mirrors a Hugging Face base folder: the same safetensors file names (one file, or
//! the same shards and index), tensor names and shapes; only adapted projections change, and any
//! tensor the loader does not know (a saved `lm_head.weight` of a tied model, say) is carried over.
//! A GGUF base becomes a Hugging Face folder of the same architecture (model.safetensors,
//! config.json, tokenizer.json). The sum is taken in f32 and rounded once to the output dtype.
//!
//! Rounding to bf16 can lose most of a small LoRA delta: a trained adapter's B A is often far
//! below bf16's resolution of W (2^-8 relative). The share of the delta lost,
//! |round(W + dW) - (W + dW)| / |dW| over every merged tensor, is measured on the merged weights
//! and reported; `--dtype auto` keeps the base's dtype only while it loses at most
//! [`MAX_LOST_FRACTION`], and writes f32 otherwise.
use super::read_adapter_spec;
use crate::hub::gguf::Gguf;
use crate::hub::{ModelFiles, WeightFormat};
use crate::model::{loading::model_config, LoraSpec};
use crate::util::atomic::{write_atomic, write_json_atomic};
use crate::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Files copied next to the weights when the base folder has them.
pub const COPIED_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The share of the adapter's delta a merge may lose to rounding before it says so (and before
/// `--dtype auto` chooses f32 instead of the base's dtype).
pub const MAX_LOST_FRACTION: f64 = 0.1;

/// The dtype of the merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeDtype {
    /// The base's dtype (bf16 for a GGUF base) unless that loses more than
    /// [`MAX_LOST_FRACTION`] of the delta; f32 then.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl std::str::FromStr for MergeDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(MergeDtype::Auto),
            "f32" => Ok(MergeDtype::F32),
            "bf16" => Ok(MergeDtype::Bf16),
            other => Err(format!(
                "unknown dtype `{other}`: allowed are auto, f32, bf16"
            )),
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Projections that received B A.
    pub merged: usize,
    /// Every file written, in `out`.
    pub files: Vec<PathBuf>,
    /// The dtype of the written weights.
    pub dtype: DType,
    /// |round(W + dW) - (W + dW)| / |dW| over all merged tensors, in that dtype.
    pub lost_fraction: f64,
}

/// LoRA pairs keyed by the base weight they apply to (`model.layers.0.self_attn.q_proj.weight`).
fn adapter_pairs(
    adapter_dir: &Path,
    spec: &LoraSpec,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    Ok(super::read_adapter_weights(adapter_dir, spec)?
        .into_iter()
        .map(|(module, p)| (format!("{module}.weight"), (p.a, p.b)))
        .collect())
}

/// A [r, in] and B [out, r] against W [out, in].
fn check_shapes(name: &str, shape: &[usize], a: &Tensor, b: &Tensor) -> Result<()> {
    let ok = match (a.dims(), b.dims()) {
        ([r, a_in], [b_out, b_r]) => {
            shape.len() == 2 && b_r == r && *b_out == shape[0] && *a_in == shape[1]
        }
        _ => false,
    };
    if !ok {
        bail!(
            "adapter shapes A {:?}, B {:?} do not fit `{name}` of shape {:?}",
            a.dims(),
            b.dims(),
            shape
        );
    }
    Ok(())
}

/// The base's weights, by name: each file's tensors (safetensors shards) or the GGUF's
/// dequantized Hugging Face tensors as one file.
struct BaseWeights {
    /// (output file name, tensors in file order) per file.
    files: Vec<(String, Vec<(String, Tensor)>)>,
    /// The dtype the tensors are held in here (f32 for a GGUF's dequantized ones).
    stored: DType,
    /// The dtype the base's matrices have as a model: `--dtype auto`'s first choice (bf16 for
    /// GGUF, whose quantized weights have no float dtype).
    natural: DType,
}

fn candle_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

fn read_base(files: &ModelFiles) -> Result<BaseWeights> {
    if files.format == WeightFormat::Gguf {
        let cfg = model_config(files)?;
        let gguf = Gguf::open(&files.config)?;
        let mut tensors: Vec<(String, Tensor)> = gguf
            .hf_tensors(cfg.num_attention_heads, cfg.num_key_value_heads)?
            .into_iter()
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(BaseWeights {
            files: vec![("model.safetensors".into(), tensors)],
            stored: DType::F32,
            natural: DType::BF16,
        });
    }
    let mut out = Vec::new();
    let mut dtype = DType::F32;
    for shard in &files.weights {
        let name = shard
            .file_name()
            .with_context(|| format!("weights path {} has no file name", shard.display()))?
            .to_string_lossy()
            .into_owned();
        let bytes =
            std::fs::read(shard).with_context(|| format!("cannot read {}", shard.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", shard.display()))?;
        let mut tensors = Vec::new();
        for (n, view) in st.tensors() {
            let Some(dt) = candle_dtype(view.dtype()) else {
                bail!(
                    "{}: tensor `{n}` of dtype {:?} cannot be merged",
                    shard.display(),
                    view.dtype()
                );
            };
            if view.shape().len() == 2 {
                dtype = dt;
            }
            let t = tensor_from_view(&view, &Device::Cpu)
                .with_context(|| format!("{}: tensor `{n}`", shard.display()))?;
            tensors.push((n, t));
        }
        out.push((name, tensors));
    }
    Ok(BaseWeights {
        files: out,
        stored: dtype,
        natural: dtype,
    })
}

/// W + scale * B A of every adapted tensor, in f32, keyed by name.
fn merged_f32(
    base: &BaseWeights,
    pairs: &BTreeMap<String, (Tensor, Tensor)>,
    scale: f64,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let mut out = BTreeMap::new();
    for (_, tensors) in &base.files {
        for (name, w) in tensors {
            if let Some((a, b)) = pairs.get(name) {
                check_shapes(name, w.dims(), a, b)?;
                let delta = (b.matmul(a)? * scale)?;
                let merged = (w.to_dtype(DType::F32)? + &delta)?;
                out.insert(name.clone(), (merged, delta));
            }
        }
    }
    Ok(out)
}

/// |round_dtype(W + dW) - (W + dW)| / |dW| over every merged tensor (L2 norms).
fn lost_fraction(merged: &BTreeMap<String, (Tensor, Tensor)>, dtype: DType) -> Result<f64> {
    let (mut err, mut size) = (0f64, 0f64);
    for (m, delta) in merged.values() {
        let rounded = m.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let sq = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        err += sq(&(rounded - m)?)?;
        size += sq(delta)?;
    }
    Ok(if size > 0.0 { (err / size).sqrt() } else { 0.0 })
}

/// Refuses an output folder that would overwrite the base model or an earlier result.
fn check_out_dir(out: &Path, files: &ModelFiles, adapter_dir: &Path) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    if out.exists() {
        let c = canon(out);
        if c.is_some() && (c == canon(&files.dir) || c == canon(adapter_dir)) {
            bail!(
                "--out {} is the model or adapter folder; give a new folder",
                out.display()
            );
        }
        let non_empty = std::fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .next()
            .is_some();
        if non_empty {
            bail!(
                "--out {} exists and is not empty; give a new folder",
                out.display()
            );
        }
    }
    Ok(())
}

/// Merges the adapter in `adapter_dir` into the model `files` and writes the folder `out`, with
/// `--dtype auto`.
pub fn merge_adapter(files: &ModelFiles, adapter_dir: &Path, out: &Path) -> Result<MergeSummary> {
    merge_adapter_with(files, adapter_dir, out, MergeDtype::Auto)
}

/// [`merge_adapter`] with the output dtype chosen. Everything that can be checked is checked
/// before the first file is written.
pub fn merge_adapter_with(
    files: &ModelFiles,
    adapter_dir: &Path,
    out: &Path,
    dtype: MergeDtype,
) -> Result<MergeSummary> {
    let (spec, _) = read_adapter_spec(adapter_dir)?;
    let pairs = adapter_pairs(adapter_dir, &spec)?;
    check_out_dir(out, files, adapter_dir)?;
    let base = read_base(files)?;
    let present: HashSet<&str> = base
        .files
        .iter()
        .flat_map(|(_, t)| t.iter().map(|(n, _)| n.as_str()))
        .collect();
    let missing: Vec<&String> = pairs
        .keys()
        .filter(|k| !present.contains(k.as_str()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "adapter {} has LoRA weights for tensors the model {} does not have: {:?}",
            adapter_dir.display(),
            files.dir.display(),
            missing
        );
    }
    let merged = merged_f32(&base, &pairs, spec.scale())?;
    let out_dtype = match dtype {
        MergeDtype::F32 => DType::F32,
        MergeDtype::Bf16 => DType::BF16,
        MergeDtype::Auto if lost_fraction(&merged, base.natural)? > MAX_LOST_FRACTION => DType::F32,
        MergeDtype::Auto => base.natural,
    };
    let lost = lost_fraction(&merged, out_dtype)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let written = write_weights(&base, &merged, out_dtype, out)?;
    let mut files_written: Vec<PathBuf> = written.iter().map(|(p, _)| p.clone()).collect();
    let total: usize = written.iter().map(|(_, n)| n).sum();
    files_written.extend(write_companions(
        files,
        out,
        out_dtype,
        base.natural,
        total,
    )?);
    Ok(MergeSummary {
        merged: merged.len(),
        files: files_written,
        dtype: out_dtype,
        lost_fraction: lost,
    })
}

/// Every base file with the merged tensors in, matrices in `dtype` (other tensors keep their
/// dtype unless the matrices change theirs); returns each file with its tensor bytes.
fn write_weights(
    base: &BaseWeights,
    merged: &BTreeMap<String, (Tensor, Tensor)>,
    dtype: DType,
    out: &Path,
) -> Result<Vec<(PathBuf, usize)>> {
    let mut written = Vec::new();
    for (file, tensors) in &base.files {
        let mut raw: Vec<(String, RawTensor)> = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            // The model's float tensors take the output dtype; others (an f32 norm in a bf16
            // file, integer buffers) keep theirs.
            let target = if t.dtype() == base.stored {
                dtype
            } else {
                t.dtype()
            };
            let value = merged.get(name).map_or(t, |(m, _)| m);
            raw.push((name.clone(), RawTensor::from_tensor(value, target)?));
        }
        let bytes: usize = raw.iter().map(|(_, r)| r.data.len()).sum();
        let path = out.join(file);
        write_atomic(&path, &serialize_pt(&raw)?)?;
        written.push((path, bytes));
    }
    Ok(written)
}

/// config.json (with the output dtype), the shard index, the tokenizer and its side files: copied
/// from a Hugging Face base, or written from a GGUF base's metadata.
fn write_companions(
    files: &ModelFiles,
    out: &Path,
    dtype: DType,
    base_dtype: DType,
    total_bytes: usize,
) -> Result<Vec<PathBuf>> {
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    };
    let mut written = Vec::new();
    if files.format == WeightFormat::Gguf {
        let mut cfg = model_config(files)?;
        cfg.saved_dtype = Some(dtype_name.into());
        let p = out.join("config.json");
        write_json_atomic(&p, &cfg.to_json()?)?;
        written.push(p);
        let gguf = Gguf::open(&files.config)?;
        if let Some(tok) = gguf.tokenizer()? {
            let p = out.join("tokenizer.json");
            let text = tok.to_string(true).map_err(|e| anyhow::anyhow!("{e}"))?;
            write_atomic(&p, text.as_bytes())?;
            written.push(p);
        }
        if let Some(t) = gguf.chat_template() {
            let p = out.join("tokenizer_config.json");
            write_json_atomic(&p, &serde_json::json!({ "chat_template": t }))?;
            written.push(p);
        }
        return Ok(written);
    }
    let mut copies: Vec<(PathBuf, &str)> = Vec::new();
    if files.weights.len() > 1 || files.dir.join(INDEX_FILE).is_file() {
        copies.push((files.dir.join(INDEX_FILE), INDEX_FILE));
    }
    copies.push((files.config.clone(), "config.json"));
    for name in COPIED_FILES.iter().skip(1) {
        copies.push((files.dir.join(name), name));
    }
    if let Some(t) = &files.tokenizer {
        copies.push((t.clone(), "tokenizer.json"));
    }
    let mut seen = HashSet::new();
    for (src, name) in copies {
        if !src.is_file() || !seen.insert(name) {
            continue;
        }
        let mut bytes =
            std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        if dtype != base_dtype {
            bytes = with_new_dtype(name, &bytes, dtype_name, total_bytes)?;
        }
        let target = out.join(name);
        write_atomic(&target, &bytes)?;
        written.push(target);
    }
    Ok(written)
}

/// config.json names the new dtype; the shard index the new total size (names and files stay).
fn with_new_dtype(name: &str, bytes: &[u8], dtype: &str, total: usize) -> Result<Vec<u8>> {
    let edit = |f: &dyn Fn(&mut serde_json::Value)| -> Result<Vec<u8>> {
        let mut v: serde_json::Value =
            serde_json::from_slice(bytes).with_context(|| format!("{name} is not valid JSON"))?;
        f(&mut v);
        Ok(serde_json::to_vec_pretty(&v)?)
    };
    match name {
        "config.json" => edit(&|v| {
            for k in ["torch_dtype", "dtype"] {
                if v.get(k).is_some() {
                    v[k] = dtype.into();
                }
            }
            if v.get("torch_dtype").is_none() && v.get("dtype").is_none() {
                v["torch_dtype"] = dtype.into();
            }
        }),
        INDEX_FILE => edit(&|v| v["metadata"]["total_size"] = total.into()),
        _ => Ok(bytes.to_vec()),
    }
}
