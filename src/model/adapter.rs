//! PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, in the exact layout
//! `PeftModel.from_pretrained` reads (keys without adapter name, F32, `{"format": "pt"}`).
use super::loading::LoraSpec;
use super::Llama;
use crate::util::atomic::{write_atomic, write_json_atomic};
use crate::util::st::{serialize_pt, RawTensor};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// adapter_config.json with the keys PEFT 0.13 through 0.21 all accept.
pub fn adapter_config_json(spec: &LoraSpec, base_model: &str) -> Value {
    // PEFT writes lora_alpha as given; an integral alpha is an int there.
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
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
        "target_modules": spec.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// The LoRA tensors of `model` under PEFT's key names, as F32.
pub fn adapter_tensors(model: &Llama) -> Result<Vec<(String, RawTensor)>> {
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
    let bytes = serialize_pt(&adapter_tensors(model)?)?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    write_json_atomic(
        &dir.join(CONFIG_FILE),
        &adapter_config_json(spec, base_model),
    )
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
        .with_context(|| format!("{}: `r` must be a positive integer", path.display()))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .with_context(|| format!("{}: `lora_alpha` must be a number", path.display()))?;
    let target_modules: Vec<String> = match field("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).with_context(|| {
                    format!("{}: `target_modules` must hold strings", path.display())
                })
            })
            .collect::<Result<_>>()?,
        Some(Value::String(s)) if crate::config::ALL_TARGET_MODULES.contains(&s.as_str()) => {
            vec![s.clone()]
        }
        other => bail!(
            "{}: `target_modules` must be a list of module names, got {:?}",
            path.display(),
            other
        ),
    };
    for m in &target_modules {
        if !crate::config::ALL_TARGET_MODULES.contains(&m.as_str()) {
            bail!(
                "{}: target module `{m}` is not one of the Llama projections",
                path.display()
            );
        }
    }
    for (k, ok) in [
        (
            "use_dora",
            field("use_dora").and_then(Value::as_bool) != Some(true),
        ),
        (
            "fan_in_fan_out",
            field("fan_in_fan_out").and_then(Value::as_bool) != Some(true),
        ),
        (
            "rank_pattern",
            field("rank_pattern")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty()),
        ),
        (
            "alpha_pattern",
            field("alpha_pattern")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty()),
        ),
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

/// Loads adapter_model.safetensors into the model's LoRA layers (which must match its config).
pub fn load_adapter_weights(model: &Llama, dir: &Path) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read adapter weights {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, view) in st.tensors() {
        // Some writers keep PEFT's adapter name in the key.
        let key = name
            .replace(".lora_A.default.weight", ".lora_A.weight")
            .replace(".lora_B.default.weight", ".lora_B.weight");
        let t = crate::util::st::tensor_from_view(&view, &model.device)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        tensors.insert(key, t);
    }
    let mut used = 0;
    for (mpath, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().expect("LoRA layer");
        for (which, var) in [("A", &lora.a), ("B", &lora.b)] {
            let key = peft_key(&mpath, which);
            let t = tensors
                .get(&key)
                .with_context(|| format!("{}: missing tensor `{key}`", path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: `{key}` has shape {:?}, the model expects {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(model.dtype)?)?;
            used += 1;
        }
    }
    if used != tensors.len() {
        let known: std::collections::HashSet<String> = model
            .lora_layers()
            .iter()
            .flat_map(|(p, _)| [peft_key(p, "A"), peft_key(p, "B")])
            .collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
        bail!(
            "{}: tensors that match no LoRA layer of this model: {:?}",
            path.display(),
            extra
        );
    }
    Ok(())
}
