//! `generate`: greedy tokens equal transformers' `generate(do_sample=False)` on the tiny fixture
//! (tests/fixtures/generate, made by make_expected.py there); the KV cache gives what full
//! passes give; the command writes one JSONL line per prompt.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use kto_train::eval::generate::{generate, GenerateOptions};
use kto_train::model::{load_llama, Llama, PassMode};

fn expected() -> serde_json::Value {
    let p = repo().join("tests/fixtures/generate/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tiny() -> Llama {
    let files = kto_train::hub::local_model_files(&fixture("tiny-llama"), "tiny").unwrap();
    load_llama(&files, DType::F32, &Device::Cpu, None).unwrap()
}

#[test]
fn greedy_tokens_equal_transformers_on_the_tiny_model() {
    let model = tiny();
    let tok =
        tokenizers::Tokenizer::from_file(fixture("tiny-llama").join("tokenizer.json")).unwrap();
    let rows = expected()["tiny-llama"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 4);
    for r in rows {
        let prompt = r["prompt"].as_str().unwrap();
        let p = tok.encode(prompt, true).unwrap().get_ids().to_vec();
        assert_eq!(p, ids(&r["prompt_ids"]), "{prompt}: prompt tokens");
        let opts = GenerateOptions {
            max_new_tokens: 12,
            stop_ids: vec![0],
            ..Default::default()
        };
        assert_eq!(
            generate(&model, &p, &opts).unwrap(),
            ids(&r["new_ids"]),
            "{prompt}"
        );
    }
}

#[test]
fn the_kv_cache_gives_what_full_passes_give() {
    // Each greedy token is the argmax of a full pass over everything before it.
    let model = tiny();
    let prompt = [504u32, 3575, 282, 4649, 314];
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    let new = generate(&model, &prompt, &opts).unwrap();
    assert_eq!(new.len(), 16);
    let mut seq = prompt.to_vec();
    for &t in &new {
        let x = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let h = model.hidden_states(&x, PassMode::POLICY_EVAL).unwrap();
        let last = h.narrow(1, seq.len() - 1, 1).unwrap().squeeze(0).unwrap();
        let logits: Vec<f32> = model
            .logits(&last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let full = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b }) as u32;
        assert_eq!(t, full, "after {} tokens", seq.len());
        seq.push(t);
    }
    // Sampling with a seed is reproducible, and differs from greedy somewhere.
    let sampled = GenerateOptions {
        max_new_tokens: 16,
        temperature: 1.5,
        top_p: 0.95,
        seed: 7,
        ..Default::default()
    };
    let a = generate(&model, &prompt, &sampled).unwrap();
    assert_eq!(a, generate(&model, &prompt, &sampled).unwrap());
    assert_ne!(a, new);
}

#[test]
fn generate_command_writes_one_line_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Hello there\"}\n\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kto-train"))
        .args(["generate", "--model"])
        .arg(fixture("tiny-llama"))
        .args(["--input"])
        .arg(&input)
        .args(["--output"])
        .arg(&out)
        .args(["--max-new-tokens", "12"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let tok =
        tokenizers::Tokenizer::from_file(fixture("tiny-llama").join("tokenizer.json")).unwrap();
    let want = tok
        .decode(&ids(&expected()["tiny-llama"][0]["new_ids"]), false)
        .unwrap();
    assert_eq!(lines[0]["completion"], want.as_str());
    assert_eq!(lines[0]["completion_tokens"], 12);
    assert_eq!(lines[0]["stop"], "length");
    // A bad record names its line.
    std::fs::write(&input, "{\"prompt\": \"x\"}\n{\"text\": \"y\"}\n").unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kto-train"))
        .args(["generate", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("in.jsonl:2") && e.contains("`prompt` missing"),
        "{e}"
    );
}

#[test]
fn sample_prompts_are_completed_at_each_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let kto = || std::process::Command::new(env!("CARGO_BIN_EXE_kto-train"));
    let o = smoke_command(env!("CARGO_BIN_EXE_kto-train"), &out)
        // f32 products, as `generate` computes.
        .args(["--set", "train.gemm=f32"])
        .args(["--set", "train.sample_prompts=[\"Hello there\", \"a\"]"])
        .args(["--set", "train.sample_max_new_tokens=6"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 2, 4, 4]);
    // The last samples are what `generate` says with the final adapter.
    let g = kto()
        .args(["generate", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--adapter")
        .arg(out.join("adapter"))
        .args(["--prompt", "Hello there", "--max-new-tokens", "6"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let text = String::from_utf8_lossy(&g.stdout);
    assert_eq!(
        lines[2]["completion"].as_str().unwrap(),
        text.trim_end_matches('\n')
    );
    let card = std::fs::read_to_string(out.join("adapter/README.md")).unwrap();
    assert!(
        card.contains("## Samples") && card.contains("Greedy completions at step 4"),
        "{card}"
    );
}
