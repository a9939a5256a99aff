//! Adapters kto-train writes have PEFT's exact layout: read back with the safetensors crate
//! directly (not kto-train's loader) and compared with the PEFT-written fixture.
mod common;
use candle_core::DType;
use common::*;
use kto_train::model::adapter::save_adapter;
use kto_train::model::LoraSpec;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;

/// The keys of building-blocks.md's list, which PEFT 0.13 through 0.21 all accept.
const REQUIRED_KEYS: [&str; 19] = [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
];

type Layout = BTreeMap<String, (String, Vec<usize>)>;
type Meta = Option<std::collections::HashMap<String, String>>;

fn layout(bytes: &[u8]) -> (Layout, Meta) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let map = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect();
    (map, meta.metadata().clone())
}

#[test]
fn written_adapter_has_peft_layout() {
    let peft_dir = fixture("peft-adapter");
    let peft_cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let targets: Vec<kto_train::config::Projection> = peft_cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    let spec = LoraSpec {
        r: peft_cfg["r"].as_u64().unwrap() as usize,
        alpha: peft_cfg["lora_alpha"].as_f64().unwrap(),
        dropout: peft_cfg["lora_dropout"].as_f64().unwrap(),
        target_modules: targets,
        use_rslora: false,
        seed: 1,
    };
    let model = tiny(DType::F32, Some(&spec));
    let out = tempfile::tempdir().unwrap();
    save_adapter(&model, &spec, "../tiny-llama", out.path()).unwrap();

    let ours = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap();
    let (our_layout, our_meta) = layout(&ours);
    let (their_layout, their_meta) = layout(&theirs);
    assert_eq!(our_layout, their_layout, "tensor keys, dtypes and shapes");
    assert_eq!(our_meta, their_meta, "safetensors metadata");
    assert_eq!(our_layout.len(), 28);

    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let obj = cfg.as_object().unwrap();
    for k in REQUIRED_KEYS {
        assert!(obj.contains_key(k), "adapter_config.json lacks `{k}`");
        if k == "target_modules" {
            let set = |v: &Value| {
                let mut s: Vec<String> = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect();
                s.sort();
                s
            };
            assert_eq!(set(&cfg[k]), set(&peft_cfg[k]), "target_modules");
        } else {
            assert_eq!(cfg[k], peft_cfg[k], "adapter_config.json `{k}`");
        }
    }
    // Nothing that PEFT 0.13 would refuse as an unknown LoraConfig field.
    for k in obj.keys() {
        assert!(REQUIRED_KEYS.contains(&k.as_str()), "unexpected key `{k}`");
    }
}

#[test]
fn fresh_lora_init_is_peft_init() {
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec![
            kto_train::config::Projection::QProj,
            kto_train::config::Projection::DownProj,
        ],
        use_rslora: false,
        seed: 3,
    };
    let model = tiny(DType::F32, Some(&spec));
    let layers = model.lora_layers();
    assert_eq!(layers.len(), 4);
    for (path, lin) in layers {
        let l = lin.lora.as_ref().unwrap();
        let bound = 1.0 / (lin.in_features() as f64).sqrt();
        let a: Vec<f32> = l.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let max = a.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        assert!(
            max <= bound && max > 0.9 * bound,
            "{path}: A outside kaiming-uniform bound"
        );
        let b: Vec<f32> = l.b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(b.iter().all(|v| *v == 0.0), "{path}: B must start at zero");
    }
    // Seeded: the same seed gives the same A, another seed another.
    let again = tiny(DType::F32, Some(&spec));
    let other = tiny(
        DType::F32,
        Some(&LoraSpec {
            seed: 4,
            ..spec.clone()
        }),
    );
    let a = |m: &kto_train::model::Llama| -> Vec<f32> {
        m.lora_layers()[0]
            .1
            .lora
            .as_ref()
            .unwrap()
            .a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(a(&model), a(&again));
    assert_ne!(a(&model), a(&other));
}

#[test]
fn adapter_round_trips_through_our_loader() {
    let m = tiny_with_peft(DType::F32);
    let (spec, _) = kto_train::model::adapter::read_adapter_spec(&fixture("peft-adapter")).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_adapter(&m, &spec, "../tiny-llama", out.path()).unwrap();
    let theirs = std::fs::read(fixture("peft-adapter/adapter_model.safetensors")).unwrap();
    let ours = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&theirs).unwrap(),
        SafeTensors::deserialize(&ours).unwrap(),
    );
    for (k, v) in a.tensors() {
        assert_eq!(
            v.data(),
            b.tensor(&k).unwrap().data(),
            "{k}: values changed on the round trip"
        );
    }
}
