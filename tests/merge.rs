//! `kto-train merge`: the merged model computes what base + adapter computes, and its folder has
//! the base folder's layout (file names, tensor names, shapes, dtypes).
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use kto_train::hub::local_model_files;
use kto_train::model::adapter::merge::merge_adapter;
use kto_train::model::{load_llama, Llama, PassMode};
use kto_train::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every tensor of a safetensors file: name -> (dtype, shape).
fn layout(p: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect()
}

fn metadata(p: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

fn safetensors_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect()
}

/// The merged folder has the base's weight files, each with the same tensors, and every other
/// file it wrote is a copy of the base's.
fn assert_same_layout(base: &Path, merged: &Path, weight_files: &[&str]) {
    let got = safetensors_files(merged);
    let want: BTreeSet<String> = weight_files.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
    for f in weight_files.iter().filter(|f| f.ends_with(".safetensors")) {
        assert_eq!(layout(&base.join(f)), layout(&merged.join(f)), "{f}");
        let meta = metadata(&merged.join(f)).expect("metadata");
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    }
    for e in std::fs::read_dir(merged).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temporary file {name} left behind");
        if !name.ends_with(".safetensors") {
            assert_eq!(
                std::fs::read(base.join(&name)).unwrap(),
                std::fs::read(merged.join(&name)).unwrap(),
                "{name} is not a copy"
            );
        }
    }
}

/// tiny-llama with its weights in f32 (split over `shards` files with an index when > 1).
fn f32_base(dir: &Path, shards: usize) {
    let src = fixture("tiny-llama");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let tensors: Vec<(String, RawTensor)> = names
        .iter()
        .map(|n| {
            let t = tensor_from_view(&st.tensor(n).unwrap(), &Device::Cpu).unwrap();
            (n.clone(), RawTensor::from_tensor(&t, DType::F32).unwrap())
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    if shards == 1 {
        std::fs::write(
            dir.join("model.safetensors"),
            serialize_pt(&tensors).unwrap(),
        )
        .unwrap();
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut map = serde_json::Map::new();
        let mut total = 0;
        for (k, chunk) in tensors.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
            let part: Vec<(String, RawTensor)> = chunk
                .iter()
                .map(|(n, t)| {
                    map.insert(n.clone(), serde_json::json!(file));
                    total += t.data.len();
                    (
                        n.clone(),
                        RawTensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            data: t.data.clone(),
                        },
                    )
                })
                .collect();
            std::fs::write(dir.join(&file), serialize_pt(&part).unwrap()).unwrap();
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["dtype"] = serde_json::json!("float32");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

fn load(dir: &Path, lora_from: Option<&Path>) -> Llama {
    let files = local_model_files(dir, "m").unwrap();
    kto_train::model::load_with_adapter(&files, DType::F32, &Device::Cpu, lora_from).unwrap()
}

/// Logits [T, vocab] for one text.
fn logits(m: &Llama, ids: &Tensor, fwd: PassMode) -> Tensor {
    let ids: Vec<u32> = ids.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), m.device()).unwrap();
    let h = m.hidden_states(&ids, fwd).unwrap().squeeze(0).unwrap();
    m.logits(&h).unwrap()
}

/// The merged model (no LoRA) against base + adapter, on every fixture text; and against PEFT's
/// own logits.
fn assert_merged_matches_adapter(base: &Path, merged: &Path, adapter: &Path, vs_peft: bool) {
    let with_adapter = load(base, Some(adapter));
    let merged = load(merged, None);
    let expected = load_st("peft-adapter/expected.safetensors");
    for i in 0..3 {
        let ids = &expected[&format!("input_ids.{i}")];
        let a = logits(&with_adapter, ids, PassMode::POLICY_EVAL);
        let m = logits(&merged, ids, PassMode::REFERENCE);
        let d = max_abs_diff(&a, &m);
        assert!(d < 1e-4, "text {i}: merged vs adapter logits differ by {d}");
        if vs_peft {
            let head = m.narrow(1, 0, 32).unwrap();
            let d = max_abs_diff(&head, &expected[&format!("logits_head32.{i}")]);
            assert!(d < 1e-4, "text {i}: merged vs PEFT logits differ by {d}");
        }
    }
}

#[test]
fn merged_f32_model_equals_base_plus_adapter() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    f32_base(&base, 1);
    let out = d.path().join("merged");
    let adapter = fixture("peft-adapter");
    let s = merge_adapter(&local_model_files(&base, "b").unwrap(), &adapter, &out).unwrap();
    assert_eq!(s.merged, 2 * 7);
    assert_same_layout(&base, &out, &["model.safetensors"]);
    assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
    assert_merged_matches_adapter(&base, &out, &adapter, true);
}

#[test]
fn merged_sharded_model_keeps_its_shards_and_index() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    f32_base(&base, 2);
    let out = d.path().join("merged");
    let adapter = fixture("peft-adapter");
    merge_adapter(&local_model_files(&base, "b").unwrap(), &adapter, &out).unwrap();
    assert_same_layout(
        &base,
        &out,
        &[
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ],
    );
    assert_merged_matches_adapter(&base, &out, &adapter, false);
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_r() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    f32_base(&base, 1);
    let adapter = d.path().join("rs");
    std::fs::create_dir_all(&adapter).unwrap();
    let src = fixture("peft-adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg["use_rslora"] = serde_json::json!(true);
    std::fs::write(adapter.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = d.path().join("merged");
    merge_adapter(&local_model_files(&base, "b").unwrap(), &adapter, &out).unwrap();
    assert_merged_matches_adapter(&base, &out, &adapter, false);
}

/// bf16 stays bf16: each adapted weight is bf16(W + 16/8 * B A) (checked in f64 here), every other
/// tensor is byte for byte the base's.
#[test]
fn merged_bf16_model_keeps_dtype_and_values() {
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let out = d.path().join("merged");
    let adapter = fixture("peft-adapter");
    merge_adapter(&local_model_files(&base, "b").unwrap(), &adapter, &out).unwrap();
    assert_eq!(
        layout(&base.join("model.safetensors")),
        layout(&out.join("model.safetensors"))
    );
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(base.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap()
        );
    }
    let bb = std::fs::read(base.join("model.safetensors")).unwrap();
    let bst = safetensors::SafeTensors::deserialize(&bb).unwrap();
    let mb = std::fs::read(out.join("model.safetensors")).unwrap();
    let mst = safetensors::SafeTensors::deserialize(&mb).unwrap();
    let ab = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let ast = safetensors::SafeTensors::deserialize(&ab).unwrap();
    let f64s = |st: &safetensors::SafeTensors, n: &str| -> (Vec<f64>, Vec<usize>) {
        let v = st.tensor(n).unwrap();
        let t = tensor_from_view(&v, &Device::Cpu).unwrap();
        (
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            v.shape().to_vec(),
        )
    };
    let mut merged = 0;
    for name in bst.names() {
        let module = name.strip_suffix(".weight").unwrap();
        let a_key = format!("base_model.model.{module}.lora_A.weight");
        if ast.tensor(&a_key).is_err() {
            assert_eq!(
                bst.tensor(name).unwrap().data(),
                mst.tensor(name).unwrap().data(),
                "{name} changed"
            );
            continue;
        }
        merged += 1;
        let (w, ws) = f64s(&bst, name);
        let (a, as_) = f64s(&ast, &a_key);
        let (b, _) = f64s(&ast, &format!("base_model.model.{module}.lora_B.weight"));
        let (m, _) = f64s(&mst, name);
        let (out_f, in_f, r) = (ws[0], ws[1], as_[0]);
        for o in 0..out_f {
            for i in 0..in_f {
                let delta: f64 = (0..r).map(|k| b[o * r + k] * a[k * in_f + i]).sum();
                let want = w[o * in_f + i] + 2.0 * delta;
                let got = m[o * in_f + i];
                // One rounding to bf16 (8 significant bits): half an ulp, plus f32 summation.
                assert!(
                    (got - want).abs() <= want.abs() * 2f64.powi(-8) + 1e-6,
                    "{name}[{o},{i}]: {got} vs {want}"
                );
            }
        }
    }
    assert_eq!(merged, 14);
    // And it loads as a plain model.
    let m = load(&out, None);
    assert_eq!(m.dtype(), DType::F32);
}

#[test]
fn merge_refuses_unsafe_outputs_and_foreign_adapters() {
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let files = local_model_files(&base, "b").unwrap();
    let adapter = fixture("peft-adapter");
    // Into the base folder itself, or a non-empty folder.
    let e = merge_adapter(&files, &adapter, &base).unwrap_err();
    assert!(
        format!("{e:#}").contains("model or adapter folder"),
        "{e:#}"
    );
    let busy = d.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), "x").unwrap();
    let e = merge_adapter(&files, &adapter, &busy).unwrap_err();
    assert!(format!("{e:#}").contains("not empty"), "{e:#}");
    // An adapter for a layer the model lacks.
    let foreign = d.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        foreign.join("adapter_config.json"),
    )
    .unwrap();
    let a = RawTensor::from_tensor(
        &Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap(),
        DType::F32,
    )
    .unwrap();
    let b = RawTensor::from_tensor(
        &Tensor::zeros((64, 8), DType::F32, &Device::Cpu).unwrap(),
        DType::F32,
    )
    .unwrap();
    std::fs::write(
        foreign.join("adapter_model.safetensors"),
        serialize_pt(&[
            (
                "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
                a,
            ),
            (
                "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight".into(),
                b,
            ),
        ])
        .unwrap(),
    )
    .unwrap();
    let e = merge_adapter(&files, &foreign, &d.path().join("o")).unwrap_err();
    assert!(
        format!("{e:#}").contains("model.layers.9.self_attn.q_proj.weight"),
        "{e:#}"
    );
}

/// The fixture adapter with lora_B scaled by `factor` (a small delta when factor << 1).
fn scaled_adapter(dir: &Path, factor: f64) {
    let src = fixture("peft-adapter");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, RawTensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let t = tensor_from_view(&v, &Device::Cpu).unwrap();
            let t = if n.contains("lora_B") {
                (t * factor).unwrap()
            } else {
                t
            };
            (n, RawTensor::from_tensor(&t, DType::F32).unwrap())
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        serialize_pt(&tensors).unwrap(),
    )
    .unwrap();
}

/// A delta far below bf16's resolution: bf16 rounds most of it away, which is measured and
/// reported; `auto` then writes f32, which keeps it.
#[test]
fn merge_measures_what_rounding_loses_and_auto_keeps_the_delta() {
    use kto_train::model::adapter::merge::{merge_adapter_with, MergeDtype, MAX_LOST_FRACTION};
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let files = local_model_files(&base, "b").unwrap();
    let small = d.path().join("small");
    scaled_adapter(&small, 1e-3);
    let bf16 =
        merge_adapter_with(&files, &small, &d.path().join("bf16"), MergeDtype::Bf16).unwrap();
    assert_eq!(bf16.dtype, DType::BF16);
    assert!(
        bf16.lost_fraction > MAX_LOST_FRACTION,
        "lost {}",
        bf16.lost_fraction
    );
    let auto =
        merge_adapter_with(&files, &small, &d.path().join("auto"), MergeDtype::Auto).unwrap();
    assert_eq!(auto.dtype, DType::F32, "auto must not round the delta away");
    assert!(auto.lost_fraction < 1e-3, "lost {}", auto.lost_fraction);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("auto/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
    assert_merged_matches_adapter(&base, &d.path().join("auto"), &small, false);
    // An ordinary delta stays in the base's bf16.
    let s = merge_adapter_with(
        &files,
        &fixture("peft-adapter"),
        &d.path().join("big"),
        MergeDtype::Auto,
    )
    .unwrap();
    assert_eq!(s.dtype, DType::BF16);
    assert!(
        s.lost_fraction < MAX_LOST_FRACTION,
        "lost {}",
        s.lost_fraction
    );
}

/// A GGUF base becomes a Hugging Face folder that computes what the GGUF base + adapter computes.
#[test]
fn merged_gguf_base_is_a_hugging_face_folder() {
    use kto_train::config::Projection;
    use kto_train::model::adapter::merge::{merge_adapter_with, MergeDtype};
    let d = tempfile::tempdir().unwrap();
    let gguf_path = fixture("gguf/tiny-llama-Q8_0.gguf");
    let files = kto_train::hub::gguf_model_files(&gguf_path, gguf_path.to_str().unwrap()).unwrap();
    // An adapter for the GGUF model's shapes, with non-zero B.
    let spec = kto_train::model::LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec![Projection::QProj, Projection::KProj, Projection::DownProj],
        use_rslora: false,
        seed: 5,
    };
    let m = load_llama(&files, DType::F32, &Device::Cpu, Some(&spec)).unwrap();
    for (_, lin) in m.lora_layers() {
        let b = &lin.lora.as_ref().unwrap().b;
        b.set(&(Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).unwrap()))
            .unwrap();
    }
    let adapter = d.path().join("adapter");
    kto_train::model::adapter::save_adapter(&m, &spec, "tiny.gguf", &adapter).unwrap();
    let out = d.path().join("merged");
    let s = merge_adapter_with(&files, &adapter, &out, MergeDtype::F32).unwrap();
    assert_eq!(s.merged, 6);
    let merged = local_model_files(&out, "merged").unwrap();
    let plain = load_llama(&merged, DType::F32, &Device::Cpu, None).unwrap();
    let ids = Tensor::new(&[[5u32, 7, 300, 2, 11, 64, 9]], &Device::Cpu).unwrap();
    let h_adapted = m.hidden_states(&ids, PassMode::POLICY_EVAL).unwrap();
    let h_merged = plain.hidden_states(&ids, PassMode::REFERENCE).unwrap();
    let d_max = max_abs_diff(&h_adapted, &h_merged);
    assert!(
        d_max < 1e-4,
        "merged folder differs from GGUF + adapter by {d_max:e}"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["torch_dtype"], "float32");
}
