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

/// Rewrites the fixture adapter into `dir`: `key` maps each tensor name (None drops it), `value`
/// may change each tensor, `config` the adapter_config.json.
fn variant(
    dir: &std::path::Path,
    key: impl Fn(&str) -> Option<String>,
    value: impl Fn(&str, candle_core::Tensor) -> candle_core::Tensor,
    config: impl Fn(&mut Value),
) {
    use kto_train::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
    let src = fixture("peft-adapter");
    std::fs::create_dir_all(dir).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let Some(new_name) = key(&name) else { continue };
        let t = tensor_from_view(&view, &candle_core::Device::Cpu).unwrap();
        let t = value(&name, t);
        tensors.push((new_name, RawTensor::from_tensor(&t, DType::F32).unwrap()));
    }
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        serialize_pt(&tensors).unwrap(),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// Whether `score`/`eval` (base + adapter) and `merge` accept the adapter in `dir`, with the
/// error each gives.
fn accepted(dir: &std::path::Path) -> (Result<(), String>, Result<(), String>) {
    let files = kto_train::hub::local_model_files(&fixture("tiny-llama"), "tiny-llama").unwrap();
    let load = kto_train::model::load_with_adapter(
        &files,
        DType::F32,
        &candle_core::Device::Cpu,
        Some(dir),
    )
    .map(|_| ())
    .map_err(|e| format!("{e:#}"));
    let out = tempfile::tempdir().unwrap();
    let merge =
        kto_train::model::adapter::merge::merge_adapter(&files, dir, &out.path().join("merged"))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"));
    (load, merge)
}

#[test]
fn every_command_accepts_and_refuses_the_same_adapter_files() {
    let d = tempfile::tempdir().unwrap();
    let same = |name: &str| -> Option<String> { Some(name.to_string()) };
    let keep = |_: &str, t: candle_core::Tensor| t;
    let no_change = |_: &mut Value| {};
    // Accepted by both: PEFT's own file, and the same with the adapter name kept in the keys.
    let named = d.path().join("named");
    variant(
        &named,
        |n| Some(n.replace(".weight", ".default.weight")),
        keep,
        no_change,
    );
    for dir in [fixture("peft-adapter"), named] {
        let (load, merge) = accepted(&dir);
        assert!(
            load.is_ok() && merge.is_ok(),
            "{}: {load:?} {merge:?}",
            dir.display()
        );
    }
    // Refused by both, each naming the problem.
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        ("rank", d.path().join("rank"), "r = 16"),
        ("nan", d.path().join("nan"), "NaN"),
        ("target", d.path().join("target"), "target_modules"),
        ("half", d.path().join("half"), "only one of lora_A / lora_B"),
        ("foreign", d.path().join("foreign"), "not a LoRA A/B matrix"),
    ];
    variant(&cases[0].1, same, keep, |c| c["r"] = 16.into());
    variant(
        &cases[1].1,
        same,
        |n, t| {
            if n.contains("layers.1.mlp.up_proj.lora_B") {
                (t * f64::NAN).unwrap()
            } else {
                t
            }
        },
        no_change,
    );
    variant(&cases[2].1, same, keep, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    });
    variant(
        &cases[3].1,
        |n| (!n.contains("layers.0.self_attn.v_proj.lora_B")).then(|| n.to_string()),
        keep,
        no_change,
    );
    variant(
        &cases[4].1,
        |n| Some(n.replace("lora_A", "lora_embedding_A")),
        keep,
        no_change,
    );
    for (what, dir, needle) in &cases {
        let (load, merge) = accepted(dir);
        for (command, r) in [("score/eval", load), ("merge", merge)] {
            let e = r.expect_err(&format!("{what}: {command} accepted a bad adapter"));
            assert!(e.contains(needle), "{what}, {command}: {e}");
        }
    }
}
