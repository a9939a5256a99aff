//! Models beyond the tiny Llama, against transformers: GGUF files of every tensor type (with
//! llama.cpp's q/k permutation), Llama 3 / linear / dynamic rope scaling, Qwen2 (biases), and
//! SmolLM2's tokenizer rebuilt from GGUF metadata.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use kto_train::hub::{gguf_model_files, local_model_files, ModelFiles};
use kto_train::model::{load_llama, load_with_adapter, Llama, PassMode};
use std::collections::HashMap;

/// Full logits [T, vocab] of one token sequence.
fn logits(m: &Llama, ids: &Tensor, pass: PassMode) -> Tensor {
    let ids: Vec<u32> = ids.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), m.device()).unwrap();
    let h = m.hidden_states(&ids, pass).unwrap().squeeze(0).unwrap();
    m.logits(&h).unwrap()
}

/// Every `input_ids.i` / `logits.i` pair of an expected file, within `tol`; returns the worst.
fn check_logits(m: &Llama, expected: &HashMap<String, Tensor>, what: &str, tol: f64) -> f64 {
    let mut worst: f64 = 0.0;
    let mut n = 0;
    while let Some(ids) = expected.get(&format!("input_ids.{n}")) {
        let d = max_abs_diff(
            &logits(m, ids, PassMode::REFERENCE),
            &expected[&format!("logits.{n}")],
        );
        assert!(d < tol, "{what}, sequence {n}: logits differ by {d:e}");
        worst = worst.max(d);
        n += 1;
    }
    assert!(n >= 3, "{what}: only {n} sequences");
    worst
}

fn gguf(name: &str) -> ModelFiles {
    let p = fixture(&format!("gguf/{name}.gguf"));
    gguf_model_files(&p, p.to_str().unwrap()).unwrap()
}

#[test]
fn gguf_files_of_every_tensor_type_match_transformers() {
    for name in [
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_0-untied",
    ] {
        let stem = format!("tiny-llama-{name}");
        let m = load_llama(&gguf(&stem), DType::F32, &Device::Cpu, None).unwrap();
        let c = m.cfg();
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 2, 64)
        );
        assert_eq!(c.tie_word_embeddings, !name.ends_with("untied"), "{name}");
        let want = load_st(&format!("gguf/expected-{stem}.safetensors"));
        let worst = check_logits(&m, &want, &stem, 1e-4);
        eprintln!("{stem}: max |logit - transformers| = {worst:.2e}");
    }
}

#[test]
fn gguf_weights_are_the_hugging_face_weights() {
    // Dequantized and un-permuted, tensor by tensor (Q4_K, as transformers loads it).
    let want = load_st("gguf/state_dict-Q4_K.safetensors");
    let g = kto_train::hub::gguf::Gguf::open(&fixture("gguf/tiny-llama-Q4_K.gguf")).unwrap();
    let got = g.hf_tensors(4, 2).unwrap();
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let d = max_abs_diff(&got[name], w);
        assert!(d < 1e-6, "{name}: differs by {d:e}");
    }
}

#[test]
fn unsupported_gguf_content_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // Another architecture: its name and the supported ones.
    let bytes = std::fs::read(fixture("gguf/tiny-llama-Q8_0.gguf")).unwrap();
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let mut other = bytes.clone();
    other[at..at + 5].copy_from_slice(b"gemma");
    let p = tmp.path().join("gemma.gguf");
    std::fs::write(&p, other).unwrap();
    let e = format!(
        "{:#}",
        load_llama(
            &gguf_model_files(&p, "g").unwrap(),
            DType::F32,
            &Device::Cpu,
            None
        )
        .unwrap_err()
    );
    assert!(e.contains("gemma") && e.contains("qwen2"), "{e}");
    // Not a GGUF file at all.
    let p = tmp.path().join("junk.gguf");
    std::fs::write(&p, b"not a gguf file").unwrap();
    let e = format!(
        "{:#}",
        load_llama(
            &gguf_model_files(&p, "j").unwrap(),
            DType::F32,
            &Device::Cpu,
            None
        )
        .unwrap_err()
    );
    assert!(e.contains("junk.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn tokenizer_from_gguf_metadata_equals_tokenizer_json() {
    let g = kto_train::hub::gguf::Gguf::open(&fixture("tokenizer-gguf/smollm2-tokenizer.gguf"))
        .unwrap();
    let ours = g.tokenizer().unwrap().expect("the file has a tokenizer");
    let json = tokenizers::Tokenizer::from_file(repo().join("data/samples/smollm2/tokenizer.json"))
        .unwrap();
    let enc = |t: &tokenizers::Tokenizer, s: &str| t.encode(s, false).unwrap().get_ids().to_vec();
    // The strings of the fixture (special tokens, digits, unicode, whitespace runs).
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer-gguf/expected.json")).unwrap(),
    )
    .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    for c in cases {
        let s = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids_tokenizer_json"].clone()).unwrap();
        assert_eq!(enc(&ours, s), want, "{s:?}");
    }
    // Every text field of every shipped data sample.
    let mut texts = Vec::new();
    for f in [
        "hh-rlhf/harmless-base-test-sample.jsonl",
        "oasst1/en-validation-messages-sample.jsonl",
    ] {
        for line in std::fs::read_to_string(repo().join("data/samples").join(f))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for k in ["chosen", "rejected", "text"] {
                if let Some(s) = v.get(k).and_then(|x| x.as_str()) {
                    texts.push(s.to_string());
                }
            }
        }
    }
    assert!(texts.len() > 1000);
    for s in &texts {
        assert_eq!(enc(&ours, s), enc(&json, s), "{s:?}");
    }
    let config = g.config_json().unwrap();
    assert_eq!(config["eos_token_id"], 2, "SmolLM2-Instruct's <|im_end|>");
    assert!(g.chat_template().is_some_and(|t| t.contains("im_start")));
}

#[test]
fn rope_scaling_matches_transformers() {
    for dir in ["llama3", "llama3-v4config", "linear", "dynamic"] {
        let files = local_model_files(&fixture(&format!("llama3-rope/{dir}")), dir).unwrap();
        let m = load_llama(&files, DType::F32, &Device::Cpu, None).unwrap();
        let want = load_st(&format!("llama3-rope/{dir}/expected.safetensors"));
        let worst = check_logits(&m, &want, dir, 1e-4);
        eprintln!("{dir}: max |logit - transformers| = {worst:.2e}");
    }
}

#[test]
fn unsupported_rope_types_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llama3-rope/linear");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        text.replace("\"linear\"", "\"yarn\""),
    )
    .unwrap();
    let files = local_model_files(tmp.path(), "yarn").unwrap();
    let e = format!(
        "{:#}",
        load_llama(&files, DType::F32, &Device::Cpu, None).unwrap_err()
    );
    assert!(
        e.contains("yarn") && e.contains("llama3") && e.contains("dynamic"),
        "{e}"
    );
}

/// tiny-llama-style expected outputs (logits_head32, last_logits, token log-probs).
fn check_tiny_style(m: &Llama, expected: &HashMap<String, Tensor>, pass: PassMode) {
    use candle_core::{IndexOp, D};
    for i in 0..3 {
        let ids = &expected[&format!("input_ids.{i}")];
        let l = logits(m, ids, pass);
        let t = l.dim(0).unwrap();
        let d = max_abs_diff(
            &l.narrow(1, 0, 32).unwrap(),
            &expected[&format!("logits_head32.{i}")],
        );
        assert!(d < 1e-4, "text {i}: logits_head32 differ by {d:e}");
        let d = max_abs_diff(&l.i(t - 1).unwrap(), &expected[&format!("last_logits.{i}")]);
        assert!(d < 1e-4, "text {i}: last_logits differ by {d:e}");
        let lsm = candle_nn::ops::log_softmax(&l.narrow(0, 0, t - 1).unwrap(), D::Minus1).unwrap();
        let next = ids
            .narrow(0, 1, t - 1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let lp = lsm
            .gather(&next.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let d = max_abs_diff(&lp, &expected[&format!("token_logprobs.{i}")]);
        assert!(d < 1e-4, "text {i}: token log-probs differ by {d:e}");
    }
}

#[test]
fn qwen2_matches_transformers_and_peft() {
    let files = local_model_files(&fixture("qwen2"), "qwen2").unwrap();
    let base = load_llama(&files, DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(base.cfg().biased.len(), 3, "q, k and v have biases");
    check_tiny_style(
        &base,
        &load_st("qwen2/expected.safetensors"),
        PassMode::REFERENCE,
    );
    let adapted = load_with_adapter(
        &files,
        DType::F32,
        &Device::Cpu,
        Some(&fixture("qwen2-kto-step")),
    )
    .unwrap();
    check_tiny_style(
        &adapted,
        &load_st("qwen2-kto-step/adapter-expected.safetensors"),
        PassMode::POLICY_EVAL,
    );
}
