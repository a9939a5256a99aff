//! End-to-end runs of the binary: the smoke config, determinism, and bad input.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kto-train"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn smoke(out: &Path, extra: &[&str]) -> Output {
    let cfg = repo().join("configs/smoke.toml");
    let set = format!("output.dir={}", out.display());
    let mut args = vec!["--config", cfg.to_str().unwrap(), "--set", &set, "--quiet"];
    args.extend_from_slice(extra);
    kto(&args)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_none())
        .map(|v| v["metrics"]["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn smoke_run_trains_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = smoke(&a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l = losses(&a);
    assert!(l.len() >= 3 && l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(
        l.iter().any(|x| (x - l[0]).abs() > 1e-6),
        "loss never changed: {l:?}"
    );
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "data_summary.json",
        "config.toml",
        "metrics.csv",
    ] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    // metrics.csv: a header and one row per metrics.jsonl line, the loss column as logged.
    let mut csv = csv::Reader::from_path(a.join("metrics.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let loss_col = header.iter().position(|h| h == "loss").unwrap();
    let eval_col = header.iter().position(|h| h == "eval").unwrap();
    let rows: Vec<csv::StringRecord> = csv.records().map(|r| r.unwrap()).collect();
    let jsonl_lines = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows.len(), jsonl_lines);
    let csv_losses: Vec<f64> = rows
        .iter()
        .filter(|r| &r[eval_col] == "false")
        .map(|r| r[loss_col].parse().unwrap())
        .collect();
    assert_eq!(csv_losses, l);
    // An evaluation line says the same epoch as the training line of its step.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|v| v.get("eval").is_some()).collect();
    assert!(!evals.is_empty(), "the smoke run evaluates");
    for e in evals {
        if let Some(t) = lines
            .iter()
            .find(|v| v.get("eval").is_none() && v["step"] == e["step"])
        {
            assert_eq!(e["epoch"], t["epoch"], "step {}", e["step"]);
        }
    }
    let o = smoke(&b, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &PathBuf| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        read(&a),
        read(&b),
        "same seed must give identical adapter bytes"
    );
    // Another seed gives another adapter; the adapter is refused to be overwritten.
    let c = tmp.path().join("c");
    assert!(smoke(&c, &["--set", "train.seed=7"]).status.success());
    assert_ne!(read(&a), read(&c));
    let o = smoke(&a, &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
}

fn assert_fails_with(o: &Output, needles: &[&str]) {
    assert!(!o.status.success(), "expected failure");
    let e = stderr(o);
    for n in needles {
        assert!(e.contains(n), "error message lacks `{n}`:\n{e}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn base_config(model: &str, data_file: &str, out: &Path) -> String {
    format!(
        "[model]\nname_or_path = \"{model}\"\n[data]\n[[data.sources]]\nkind = \"unpaired\"\nfiles = [\"{data_file}\"]\n\
         [train]\nmax_steps = 1\nbatch_size = 2\ngrad_accum = 1\nmax_length = 64\n[output]\ndir = \"{}\"\n",
        out.display()
    )
}

#[test]
fn bad_input_gives_clear_errors_and_no_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let out = d.join("run");
    let good = (0..6)
        .map(|i| format!("{{\"prompt\": \"Question {i}?\", \"completion\": \" Answer {i}.\", \"label\": {}}}\n", i % 2 == 0))
        .collect::<String>();
    write(d, "good.jsonl", &good);

    // Malformed TOML: names the file.
    let p = write(d, "bad.toml", "[model\nname_or_path = 1\n");
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap()]),
        &["bad.toml", "TOML"],
    );
    // Unknown key: names it and what is allowed.
    let p = write(
        d,
        "unknown.toml",
        &(base_config(model, "good.jsonl", &out) + "[lora]\nrank = 8\n"),
    );
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap()]),
        &[
            "unknown.toml",
            "unknown key `lora.rank`",
            "known keys there",
        ],
    );
    // Invalid value.
    let p = write(d, "invalid.toml", &base_config(model, "good.jsonl", &out));
    assert_fails_with(
        &kto(&[
            "--config",
            p.to_str().unwrap(),
            "--set",
            "lora.target_modules=[\"qkv\"]",
        ]),
        &["target_modules", "qkv", "q_proj"],
    );
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap(), "--set", "train.lr=-1"]),
        &["lr"],
    );
    // Missing model folder.
    let p = write(
        d,
        "nomodel.toml",
        &base_config(&d.join("nope").display().to_string(), "good.jsonl", &out),
    );
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap()]),
        &["nope", "does not exist"],
    );
    // config.json lacking a required field.
    let broken = d.join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), broken.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(broken.join("config.json"), v.to_string()).unwrap();
    let p = write(
        d,
        "broken.toml",
        &base_config(broken.to_str().unwrap(), "good.jsonl", &out),
    );
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap()]),
        &["config.json", "hidden_size"],
    );
    // A JSONL line that is not JSON: skipped and reported, or an error under --strict.
    write(d, "badline.jsonl", &format!("{good}{{\"prompt\": oops\n"));
    let p = write(
        d,
        "badline.toml",
        &base_config(model, "badline.jsonl", &out),
    );
    assert_fails_with(
        &kto(&["--config", p.to_str().unwrap(), "--strict"]),
        &["badline.jsonl:7"],
    );
    assert!(
        !out.join("adapter").exists(),
        "a failed run must not leave an adapter"
    );
    let o = kto(&["--config", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("badline.jsonl:7"), "{}", stderr(&o));
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn help_documents_every_subcommand() {
    let o = kto(&["--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    for sub in ["train", "init-tiny", "data", "score", "config"] {
        assert!(h.contains(sub), "--help lacks {sub}");
    }
    // --version names the build's features and what runs the products here.
    let o = kto(&["--version"]);
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(
        v.contains("features: cuda off") && v.contains("matrix products on this machine: f32 on"),
        "{v}"
    );
}

#[test]
fn config_command_prints_the_resolved_config() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("trl.toml");
    std::fs::write(
        &p,
        "[model]\nname_or_path = \"m\"\n[train]\nlearning_rate = 3e-5\nper_device_train_batch_size = 4\n",
    )
    .unwrap();
    let o = kto(&[
        "config",
        "--config",
        p.to_str().unwrap(),
        "--set",
        "train.seed=7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let back: kto_train::config::Config = toml::from_str(&text).unwrap();
    assert_eq!(
        (back.train.lr, back.train.batch_size, back.train.seed),
        (3e-5, 4, 7)
    );
    // Every default is written out, under kto-train's own names.
    assert!(text.contains("disable_dropout = true") && text.contains("prompt_format = \"auto\""));
    assert!(!text.contains("learning_rate"), "{text}");
    // A bad config is refused as a run would refuse it.
    let o = kto(&[
        "config",
        "--config",
        p.to_str().unwrap(),
        "--set",
        "train.lr=-1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lr"), "{}", stderr(&o));
}

#[test]
fn init_tiny_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let o = kto(&["init-tiny", "--out", dir.to_str().unwrap(), "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = kto_train::hub::local_model_files(&dir, "tiny").unwrap();
    let m = kto_train::model::load_llama(
        &files,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    assert_eq!(m.cfg().vocab_size, 49152);
    assert_eq!(m.cfg().eos_token_id, Some(0));
}
