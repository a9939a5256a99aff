//! `kto-train merge`: a plain Hugging Face model folder with a LoRA adapter folded into the
//! weights, W' = W + scale * B A (scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA),
//! for runtimes that know nothing of PEFT.
//!
//! The output mirrors the base folder: the same safetensors file names (one file, or the same
//! shards and index), tensor names, shapes and dtypes; only adapted projections change. The sum is
//! taken in f32 and rounded once to the base dtype. Tensors are read straight from the files, so
//! no network is built and any tensor the loader does not know (a saved `lm_head.weight` of a
//! tied model, say) is carried over unchanged.
use super::read_adapter_spec;
use crate::hub::ModelFiles;
use crate::model::LoraSpec;
use crate::util::atomic::write_atomic;
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

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Projections that received B A.
    pub merged: usize,
    /// Every file written, in `out`.
    pub files: Vec<PathBuf>,
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

/// W + scale * B A, in f32, back in W's dtype.
fn merged_tensor(
    w: &safetensors::tensor::TensorView<'_>,
    name: &str,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<RawTensor> {
    let dtype = match w.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F64 => DType::F64,
        other => bail!("cannot merge into `{name}`: weights of dtype {other:?} are not supported"),
    };
    check_shapes(name, w.shape(), a, b)?;
    let base = tensor_from_view(w, &Device::Cpu)?.to_dtype(DType::F32)?;
    let delta = (b.matmul(a)? * scale)?;
    let merged = (base + delta)?;
    RawTensor::from_tensor(&merged, dtype)
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

/// Tensor names and shapes of a safetensors file, from its header alone (the weights may be
/// gigabytes).
fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        bail!(
            "{}: not a safetensors file (header of {n} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: safetensors header is not JSON", path.display()))?;
    let m = v
        .as_object()
        .with_context(|| format!("{}: safetensors header is not an object", path.display()))?;
    m.iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .with_context(|| format!("{}: tensor `{k}` has no shape", path.display()))?;
            Ok((k.clone(), shape))
        })
        .collect()
}

/// Merges the adapter in `adapter_dir` into the model `files` and writes the folder `out`.
/// Everything that can be checked is checked before the first file is written.
pub fn merge_adapter(files: &ModelFiles, adapter_dir: &Path, out: &Path) -> Result<MergeSummary> {
    let (spec, _) = read_adapter_spec(adapter_dir)?;
    let scale = spec.scale();
    let pairs = adapter_pairs(adapter_dir, &spec)?;
    check_out_dir(out, files, adapter_dir)?;
    let mut present = std::collections::HashMap::new();
    for shard in &files.weights {
        present.extend(tensor_shapes(shard)?);
    }
    let missing: Vec<&String> = pairs.keys().filter(|k| !present.contains_key(*k)).collect();
    if !missing.is_empty() {
        bail!(
            "adapter {} has LoRA weights for tensors the model {} does not have: {:?}",
            adapter_dir.display(),
            files.dir.display(),
            missing
        );
    }
    for (name, (a, b)) in &pairs {
        check_shapes(name, &present[name], a, b)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut used: HashSet<&str> = HashSet::new();
    let mut written = Vec::new();
    for shard in &files.weights {
        let file_name = shard
            .file_name()
            .with_context(|| format!("weights path {} has no file name", shard.display()))?;
        let bytes =
            std::fs::read(shard).with_context(|| format!("cannot read {}", shard.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", shard.display()))?;
        let mut tensors: Vec<(String, RawTensor)> = Vec::new();
        for (name, view) in st.tensors() {
            let raw = match pairs.get_key_value(name.as_str()) {
                Some((key, (a, b))) => {
                    used.insert(key.as_str());
                    merged_tensor(&view, &name, a, b, scale)
                        .with_context(|| format!("{}", shard.display()))?
                }
                None => RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            };
            tensors.push((name, raw));
        }
        drop(st);
        let target = out.join(file_name);
        write_atomic(&target, &serialize_pt(&tensors)?)?;
        written.push(target);
    }
    // The shard index stays valid: same names, files, shapes and dtypes, hence sizes.
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
        let bytes =
            std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        let target = out.join(name);
        write_atomic(&target, &bytes)?;
        written.push(target);
    }
    Ok(MergeSummary {
        merged: used.len(),
        files: written,
    })
}
