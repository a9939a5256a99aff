//! The reference log-prob cache: reused across runs, invalidated by every input, never stale.
mod common;
use common::*;
use kto_train::train::refcache::{network_key, sequence_key, RefCache};
use std::path::Path;
use std::process::{Command, Output};

#[test]
fn cache_round_trips_and_ignores_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = RefCache::open(tmp.path(), 7).unwrap();
    let k = sequence_key(&[1, 2, 3], 1);
    assert_ne!(
        k,
        sequence_key(&[1, 2, 3], 2),
        "prompt length is part of the key"
    );
    assert_ne!(k, sequence_key(&[1, 2, 4], 1));
    c.insert(k, -12.5);
    c.save().unwrap();
    let mut again = RefCache::open(tmp.path(), 7).unwrap();
    assert_eq!(again.get(k), Some(-12.5));
    assert!(
        RefCache::open(tmp.path(), 8).unwrap().is_empty(),
        "another network, another file"
    );
    // A damaged file is not read.
    let p = again.path().to_path_buf();
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    assert!(RefCache::open(tmp.path(), 7).unwrap().is_empty());
}

#[test]
fn network_key_covers_weights_config_and_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::write(&a, b"weights").unwrap();
    std::fs::write(&b, b"config").unwrap();
    let k = network_key(&[&a, &b], "f32").unwrap();
    assert_eq!(k, network_key(&[&a, &b], "f32").unwrap());
    assert_ne!(k, network_key(&[&a, &b], "bf16").unwrap());
    std::fs::write(&a, b"weightz").unwrap();
    assert_ne!(k, network_key(&[&a, &b], "f32").unwrap());
}

fn smoke(out: &Path, model: &Path, cache: &str, extra: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_kto-train"))
        .arg("--config")
        .arg(repo().join("configs/smoke.toml"))
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--set", &format!("model.name_or_path={}", model.display())])
        .args(["--set", &format!("train.reference_cache={cache}")])
        .args([
            "--set",
            "train.max_steps=3",
            "--set",
            "eval.benchmarks=[]",
            "--verbose",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn cache_line(o: &Output) -> (usize, usize) {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("reference cache"))
        .expect("cache report");
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    let n = nums.len();
    (nums[n - 2], nums[n - 1])
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn runs_reuse_the_cache_and_any_changed_input_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let cache = tmp.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let off = tmp.path().join("off");
    smoke(&off, &model, "off", &[]);

    let first = smoke(&tmp.path().join("r1"), &model, cache_s, &[]);
    let (hits, computed) = cache_line(&first);
    assert!(computed > 0);
    let second = smoke(
        &tmp.path().join("r2"),
        &model,
        cache_s,
        &["--set", "loss.beta=0.2"],
    );
    let (hits2, computed2) = cache_line(&second);
    assert_eq!(
        computed2, 0,
        "a second run with the same model and data computes no reference"
    );
    assert_eq!(hits2, hits + computed);
    // Cached and recomputed references give the same training.
    let third = tmp.path().join("r3");
    smoke(&third, &model, cache_s, &[]);
    assert_eq!(adapter(&off), adapter(&third));

    // Length settings change the sequences: misses.
    let o = smoke(
        &tmp.path().join("r4"),
        &model,
        cache_s,
        &["--set", "train.max_length=96"],
    );
    assert!(cache_line(&o).1 > 0);
    // Changed weights: another network, nothing of the old cache is used.
    let w = model.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&w, bytes).unwrap();
    let o = smoke(&tmp.path().join("r5"), &model, cache_s, &[]);
    assert_eq!(
        cache_line(&o),
        (hits, computed),
        "a changed model must start from an empty cache, as the first run did"
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}
