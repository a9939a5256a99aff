//! `kto-train score` against transformers' token log-probs (tiny-llama fixture).
mod common;
use candle_core::DType;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

fn fixture_texts() -> Vec<(Vec<u32>, Vec<f64>)> {
    let e = load_st("tiny-llama/expected.safetensors");
    (0..)
        .map_while(|i| {
            let ids = e.get(&format!("input_ids.{i}"))?;
            let ids: Vec<u32> = ids.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
            let lp: Vec<f64> = e[&format!("token_logprobs.{i}")]
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            Some((ids, lp))
        })
        .collect()
}

fn run_score(input: &str, extra: &[&str]) -> (bool, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("in.jsonl");
    std::fs::write(&p, input).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kto-train"))
        .args([
            "score",
            "--model",
            fixture("tiny-llama").to_str().unwrap(),
            "--input",
        ])
        .arg(&p)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn score_matches_transformers_token_logprobs() {
    let texts = fixture_texts();
    assert!(texts.len() >= 3);
    let mut input = String::new();
    let mut expected = Vec::new();
    for (ids, lp) in &texts {
        // Empty prompt: the first token has no context and is not scored.
        input += &format!("{}\n", json!({"prompt_ids": [], "completion_ids": ids}));
        expected.push(lp.clone());
        // A prompt/completion split scores the slice after the prompt.
        let k = ids.len() / 2;
        input += &format!(
            "{}\n",
            json!({"prompt_ids": ids[..k], "completion_ids": ids[k..]})
        );
        expected.push(lp[k - 1..].to_vec());
    }
    let (ok, stdout, stderr) = run_score(&input, &["--batch-size", "3"]);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), expected.len());
    for (line, want) in lines.iter().zip(&expected) {
        let got: Vec<f64> = line["token_logps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(line["n_tokens"].as_u64().unwrap() as usize, want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 1e-4,
                "token log-prob {g} vs transformers {w}"
            );
        }
        let sum: f64 = want.iter().sum();
        assert!((line["logp"].as_f64().unwrap() - sum).abs() < 1e-3);
    }
}

#[test]
fn score_text_records_tokenize_prompt_and_completion_separately() {
    let tok = tokenizers::Tokenizer::from_file(fixture("tiny-llama/tokenizer.json")).unwrap();
    let (p, c) = ("Human: what is two plus two?\n\nAssistant:", " Four.");
    let pi = tok.encode(p, false).unwrap().get_ids().to_vec();
    let ci = tok.encode(c, false).unwrap().get_ids().to_vec();
    let input = format!(
        "{}\n{}\n",
        json!({"prompt": p, "completion": c}),
        json!({"prompt_ids": pi, "completion_ids": ci})
    );
    let (ok, stdout, stderr) = run_score(&input, &[]);
    assert!(ok, "{stderr}");
    let l: Vec<&str> = stdout.lines().collect();
    assert_eq!(l.len(), 2);
    assert_eq!(l[0], l[1], "text and ids must score identically");
}

#[test]
fn score_bad_line_names_file_and_line() {
    let (ok, _, stderr) = run_score(
        "{\"prompt_ids\": [1], \"completion_ids\": [2]}\n{not json\n",
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("in.jsonl:2") && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    let (ok, _, stderr) = run_score("{\"prompt\": \"a\"}\n", &[]);
    assert!(!ok);
    assert!(
        stderr.contains("in.jsonl:1") && stderr.contains("completion"),
        "{stderr}"
    );
}

#[test]
fn score_with_adapter_matches_peft() {
    // Token log-probs through `--adapter` equal the ones PEFT computed (peft-adapter fixture).
    let e = load_st("peft-adapter/expected.safetensors");
    let ids: Vec<u32> = e["input_ids.0"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f64> = e["token_logprobs.0"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let input = format!("{}\n", json!({"prompt_ids": [], "completion_ids": ids}));
    let (ok, out, stderr) = run_score(
        &input,
        &["--adapter", fixture("peft-adapter").to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    let line: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let got: Vec<f64> = line["token_logps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "token log-prob {g} vs PEFT {w}");
    }
}
