//! Finding models: local folders, the Hugging Face cache layout, offline mode, and clear errors.
mod common;
use common::*;
use kto_train::hub::resolve_model_in;
use std::path::Path;

/// A cache folder laid out as huggingface_hub writes it, holding the tiny fixture model.
fn fake_cache(root: &Path, repo: &str) {
    let base = root.join(format!("models--{}", repo.replace('/', "--")));
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snap = base.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), hash).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), snap.join(f)).unwrap();
    }
}

#[test]
fn hub_id_resolves_through_the_cache_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path(), "HuggingFaceTB/SmolLM2-360M");
    let files = resolve_model_in("HuggingFaceTB/SmolLM2-360M", "main", tmp.path(), true).unwrap();
    assert!(files.config.ends_with("config.json"));
    assert_eq!(files.weights.len(), 1);
    assert!(files.tokenizer.is_some());
    assert!(files.dir.to_string_lossy().contains("snapshots"));
}

#[test]
fn missing_model_offline_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model_in("HuggingFaceTB/SmolLM2-360M", "main", tmp.path(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("models--HuggingFaceTB--SmolLM2-360M"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("huggingface-cli download"), "{err}");
}

#[test]
fn missing_local_folder_is_a_clear_error() {
    let err = resolve_model_in("./no/such/model", "main", Path::new("/nonexistent"), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("./no/such/model") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    use candle_core::{DType, Device};
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    // Split the fixture's tensors into two shards with an index, as transformers does.
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, tmp.path().join(file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    // transformers-4 layout of config.json: top-level rope_theta and torch_dtype.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let theta = cfg["rope_parameters"]["rope_theta"].clone();
    let o = cfg.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("dtype");
    o.insert("rope_theta".into(), theta);
    o.insert("torch_dtype".into(), "bfloat16".into());
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let files = kto_train::hub::local_model_files(tmp.path(), "sharded").unwrap();
    assert_eq!(files.weights.len(), 2);
    let sharded = kto_train::model::load_llama(&files, DType::F32, &Device::Cpu, None).unwrap();
    let single = tiny(DType::F32, None);
    assert_eq!(sharded.cfg(), single.cfg());
    let ids = candle_core::Tensor::new(&[[5u32, 900, 17, 4000]], &Device::Cpu).unwrap();
    let f = kto_train::model::PassMode::REFERENCE;
    let d = max_abs_diff(
        &sharded.hidden_states(&ids, f).unwrap(),
        &single.hidden_states(&ids, f).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn config_json_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("num_attention_heads");
    let p = tmp.path().join("config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = kto_train::model::LlamaConfig::from_file(&p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("num_attention_heads") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn a_commit_hash_revision_resolves_offline_as_python_does() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path(), "HuggingFaceTB/SmolLM2-360M");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    // No refs/<hash> file exists: the hash names the snapshot folder itself.
    let files = resolve_model_in("HuggingFaceTB/SmolLM2-360M", hash, tmp.path(), true).unwrap();
    assert!(files.dir.ends_with(hash), "{}", files.dir.display());
    // An unknown commit or branch is not found (and, offline, not downloaded).
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    assert!(resolve_model_in("HuggingFaceTB/SmolLM2-360M", other, tmp.path(), true).is_err());
    assert!(resolve_model_in("HuggingFaceTB/SmolLM2-360M", "v2", tmp.path(), true).is_err());
    // A tag written in refs/ resolves like main.
    let refs = tmp.path().join("models--HuggingFaceTB--SmolLM2-360M/refs");
    std::fs::write(refs.join("v1.0"), format!("{hash}\n")).unwrap();
    assert!(resolve_model_in("HuggingFaceTB/SmolLM2-360M", "v1.0", tmp.path(), true).is_ok());
}

#[test]
fn the_token_is_found_as_huggingface_hub_finds_it() {
    use kto_train::hub::hub_token;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_from_file\n").unwrap();
    let env = |vars: Vec<(&'static str, String)>| {
        move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    let h = home.display().to_string();
    // HF_TOKEN first, then the login file under HF_HOME, then HF_TOKEN_PATH's file.
    assert_eq!(
        hub_token(env(vec![
            ("HF_TOKEN", "hf_env".into()),
            ("HF_HOME", h.clone())
        ])),
        Some("hf_env".into())
    );
    assert_eq!(
        hub_token(env(vec![("HF_HOME", h.clone())])),
        Some("hf_from_file".into())
    );
    let other = tmp.path().join("elsewhere");
    std::fs::write(&other, "hf_path").unwrap();
    assert_eq!(
        hub_token(env(vec![
            ("HF_HOME", h),
            ("HF_TOKEN_PATH", other.display().to_string())
        ])),
        Some("hf_path".into())
    );
    assert_eq!(hub_token(env(vec![("HOME", "/nonexistent".into())])), None);
}
