//! PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, in the exact layout
//! `PeftModel.from_pretrained` reads (keys without adapter name, F32, `{"format": "pt"}`).
//!
//! One reader serves every command that takes an adapter (training's `lora.init_from`, `score`,
//! `eval`, `merge`): the same keys are accepted and the same inconsistencies refused everywhere.
pub mod merge;

use super::loading::LoraSpec;
use super::Llama;
use crate::config::Projection;
use crate::util::atomic::write_atomic;
use crate::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// adapter_config.json with the keys PEFT 0.13 through 0.21 all accept.
pub(crate) fn adapter_config_json(spec: &LoraSpec, base_model: &str) -> Value {
    // PEFT writes lora_alpha as given; an integral alpha is an int there.
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
    let targets: Vec<&str> = spec.target_modules.iter().map(|p| p.name()).collect();
    json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// The LoRA tensors of `model` under PEFT's key names, as F32.
pub(crate) fn adapter_tensors(model: &Llama) -> Result<Vec<(String, RawTensor)>> {
    let mut out = Vec::new();
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().expect("lora_layers yields LoRA layers");
        out.push((
            peft_key(&path, "A"),
            RawTensor::from_tensor(lora.a.as_tensor(), DType::F32)?,
        ));
        out.push((
            peft_key(&path, "B"),
            RawTensor::from_tensor(lora.b.as_tensor(), DType::F32)?,
        ));
    }
    Ok(out)
}

/// Writes the adapter folder; each file atomically, weights before config.
pub fn save_adapter(model: &Llama, spec: &LoraSpec, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in adapter_files(model, spec, base_model)? {
        write_atomic(&dir.join(name), &bytes)?;
    }
    Ok(())
}

/// The adapter folder's files as (name, bytes), weights before config (the order to write them).
pub fn adapter_files(
    model: &Llama,
    spec: &LoraSpec,
    base_model: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut config = serde_json::to_vec_pretty(&adapter_config_json(spec, base_model))?;
    config.push(b'\n');
    Ok(vec![
        (
            WEIGHTS_FILE.to_string(),
            serialize_pt(&adapter_tensors(model)?)?,
        ),
        (CONFIG_FILE.to_string(), config),
    ])
}

/// The tokenizer files saved beside an adapter, as Transformers' `save_pretrained` of the
/// tokenizer leaves them (what TRL's `save_model` writes): the tokenizer's own tokenizer.json,
/// tokenizer_config.json, special_tokens_map.json and chat_template.jinja from its folder; for
/// a GGUF model, the tokenizer rebuilt from its metadata and its chat template.
pub fn tokenizer_files(
    files: &crate::hub::ModelFiles,
    tokenizer_json: Option<&Path>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let json = tokenizer_json
        .map(Path::to_path_buf)
        .or_else(|| files.tokenizer.clone());
    match (json, files.format) {
        (Some(t), _) if !crate::hub::is_gguf(&t) => {
            out.push(("tokenizer.json".to_string(), read(&t)?));
            let dir = t.parent().unwrap_or(Path::new("."));
            for name in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
            ] {
                let p = dir.join(name);
                if p.is_file() {
                    out.push((name.to_string(), read(&p)?));
                }
            }
        }
        (_, crate::hub::WeightFormat::Gguf) => {
            let gguf = crate::hub::gguf::Gguf::open(&files.config)?;
            if let Some(tok) = gguf.tokenizer()? {
                let text = tok.to_string(true).map_err(|e| anyhow::anyhow!("{e}"))?;
                out.push(("tokenizer.json".to_string(), text.into_bytes()));
            }
            if let Some(t) = gguf.chat_template() {
                let cfg = serde_json::json!({ "chat_template": t });
                let mut bytes = serde_json::to_vec_pretty(&cfg)?;
                bytes.push(b'\n');
                out.push(("tokenizer_config.json".to_string(), bytes));
            }
        }
        _ => {}
    }
    Ok(out)
}

/// `target_modules` of an adapter_config.json: a list of module names (or one name).
fn target_modules(v: Option<&Value>, path: &Path) -> Result<Vec<Projection>> {
    let names: Vec<&str> = match v {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().with_context(|| {
                    format!("{}: `target_modules` must hold strings", path.display())
                })
            })
            .collect::<Result<_>>()?,
        Some(Value::String(s)) => vec![s.as_str()],
        other => bail!(
            "{}: `target_modules` must be a list of module names, got {:?}",
            path.display(),
            other
        ),
    };
    names
        .into_iter()
        .map(|m| {
            m.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: target module `{m}` is not one of the Llama projections {:?}",
                    path.display(),
                    Projection::names()
                )
            })
        })
        .collect()
}

/// PEFT features kto-train does not implement, refused by name rather than silently ignored.
fn refuse_unsupported(v: &Value, path: &Path) -> Result<()> {
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let empty_map = |k: &str| {
        field(k)
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty())
    };
    for (k, ok) in [
        (
            "use_dora",
            field("use_dora").and_then(Value::as_bool) != Some(true),
        ),
        (
            "fan_in_fan_out",
            field("fan_in_fan_out").and_then(Value::as_bool) != Some(true),
        ),
        ("rank_pattern", empty_map("rank_pattern")),
        ("alpha_pattern", empty_map("alpha_pattern")),
        (
            "layers_to_transform",
            field("layers_to_transform").is_none(),
        ),
        (
            "bias",
            field("bias")
                .and_then(Value::as_str)
                .is_none_or(|b| b == "none"),
        ),
    ] {
        if !ok {
            bail!("{}: `{k}` = {} is not supported", path.display(), v[k]);
        }
    }
    Ok(())
}

/// Reads adapter_config.json into a LoraSpec; refuses PEFT features kto-train does not implement.
pub fn read_adapter_spec(dir: &Path) -> Result<(LoraSpec, Value)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read adapter config {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            bail!(
                "{}: peft_type `{t}` is not supported (only LORA)",
                path.display()
            );
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .with_context(|| format!("{}: `r` must be a positive integer", path.display()))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite() && *a > 0.0)
        .with_context(|| format!("{}: `lora_alpha` must be a positive number", path.display()))?;
    let target_modules = target_modules(field("target_modules"), &path)?;
    refuse_unsupported(&v, &path)?;
    let spec = LoraSpec {
        r,
        alpha,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        seed: 0,
    };
    Ok((spec, v))
}

/// One adapted projection's LoRA pair, f32 on the CPU: A [r, in], B [out, r].
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// `(module path, is A)` of a PEFT tensor name: `base_model.model.<module>.lora_A.weight`, or
/// with PEFT's adapter name before `.weight` (`...lora_A.default.weight`), which some writers keep.
fn parse_key(name: &str) -> Option<(&str, bool)> {
    let rest = name
        .strip_prefix("base_model.model.")?
        .strip_suffix(".weight")?;
    for (tag, is_a) in [(".lora_A", true), (".lora_B", false)] {
        if let Some(m) = rest.strip_suffix(tag) {
            return Some((m, is_a));
        }
        if let Some(m) = rest
            .rsplit_once('.')
            .and_then(|(head, _adapter_name)| head.strip_suffix(tag))
        {
            return Some((m, is_a));
        }
    }
    None
}

/// The projection of a module path `model.layers.{i}.{self_attn|mlp}.{name}`.
fn projection_of(module: &str) -> Option<Projection> {
    let name = module.rsplit('.').next()?;
    let p: Projection = name.parse().ok()?;
    let prefix = module.strip_suffix(name)?.strip_suffix('.')?;
    let layer = prefix
        .strip_prefix("model.layers.")?
        .strip_suffix(p.parent())?;
    layer.strip_suffix('.')?.parse::<usize>().ok()?;
    Some(p)
}

/// Every LoRA pair of the adapter in `dir`, keyed by module path
/// (`model.layers.0.self_attn.q_proj`), checked against its config `spec`: each tensor is a
/// LoRA A or B of a projection in `target_modules`, each pair is complete, its rank is `r`, and
/// every value is finite.
pub fn read_adapter_weights(dir: &Path, spec: &LoraSpec) -> Result<BTreeMap<String, LoraPair>> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read adapter weights {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some((module, is_a)) = parse_key(&name) else {
            bail!(
                "{}: tensor `{name}` is not a LoRA A/B matrix (base_model.model.<module>.lora_A.weight)",
                path.display()
            );
        };
        match projection_of(module) {
            Some(p) if spec.target_modules.contains(&p) => {}
            Some(p) => bail!(
                "{}: tensor `{name}` adapts `{p}`, which adapter_config.json's target_modules {:?} \
                 does not list",
                path.display(),
                spec.target_modules.iter().map(|p| p.name()).collect::<Vec<_>>()
            ),
            None => bail!(
                "{}: tensor `{name}` is not on a Llama projection (model.layers.N.self_attn|mlp.<proj>)",
                path.display()
            ),
        }
        let t = tensor_from_view(&view, &Device::Cpu)
            .and_then(|t| Ok(t.to_dtype(DType::F32)?))
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        let e = halves.entry(module.to_string()).or_default();
        *(if is_a { &mut e.0 } else { &mut e.1 }) = Some(t);
    }
    halves
        .into_iter()
        .map(|(module, half)| {
            let (Some(a), Some(b)) = half else {
                bail!(
                    "{}: `{module}` has only one of lora_A / lora_B",
                    path.display()
                );
            };
            check_pair(&path, &module, &a, &b, spec.r)?;
            Ok((module, LoraPair { a, b }))
        })
        .collect()
}

fn check_pair(path: &Path, module: &str, a: &Tensor, b: &Tensor, r: usize) -> Result<()> {
    let ok = matches!((a.dims(), b.dims()), ([ra, _], [_, rb]) if *ra == r && *rb == r);
    if !ok {
        bail!(
            "{}: `{module}` has lora_A {:?} and lora_B {:?}, but adapter_config.json says r = {r} \
             (A must be [r, in], B [out, r])",
            path.display(),
            a.dims(),
            b.dims()
        );
    }
    for (which, t) in [("lora_A", a), ("lora_B", b)] {
        let bad = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|x| !x.is_finite());
        if bad {
            bail!(
                "{}: `{module}.{which}` holds NaN or infinite values",
                path.display()
            );
        }
    }
    Ok(())
}

/// Loads adapter_model.safetensors into the model's LoRA layers (built from the same config).
pub fn load_adapter_weights(model: &Llama, dir: &Path, spec: &LoraSpec) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let mut pairs = read_adapter_weights(dir, spec)?;
    for (module, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().expect("LoRA layer");
        let pair = pairs.remove(&module).with_context(|| {
            format!(
                "{}: missing tensors `{}` / `{}`",
                path.display(),
                peft_key(&module, "A"),
                peft_key(&module, "B")
            )
        })?;
        for (which, var, t) in [("A", &lora.a, &pair.a), ("B", &lora.b, &pair.b)] {
            if t.dims() != var.dims() {
                bail!(
                    "{}: `{}` has shape {:?}, the model expects {:?}",
                    path.display(),
                    peft_key(&module, which),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(model.device())?.to_dtype(model.dtype())?)?;
        }
    }
    if !pairs.is_empty() {
        let extra: Vec<&String> = pairs.keys().collect();
        bail!(
            "{}: tensors for modules this model does not have: {:?}",
            path.display(),
            extra
        );
    }
    Ok(())
}
