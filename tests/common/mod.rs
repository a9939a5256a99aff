#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use kto_train::hub::local_model_files;
use kto_train::model::{load_llama, Llama, LoraSpec};
use std::collections::HashMap;
use std::path::PathBuf;

/// The repository root: where the tests were built, or `KTO_TRAIN_REPO` for a test executable
/// that runs elsewhere (scripts/gpu-check.sh on a GPU machine).
pub fn repo() -> PathBuf {
    std::env::var_os("KTO_TRAIN_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(p: &str) -> PathBuf {
    repo().join("tests/fixtures").join(p)
}

pub fn load_st(p: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(p), &Device::Cpu).unwrap()
}

/// The device the fidelity suite runs on: `KTO_TRAIN_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`;
/// default cpu), so that a GPU machine runs the same tests at the same tolerances.
pub fn test_device() -> Device {
    let spec: kto_train::config::DeviceSpec = std::env::var("KTO_TRAIN_TEST_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .unwrap_or_else(|e| panic!("KTO_TRAIN_TEST_DEVICE: {e}"));
    spec.open().unwrap()
}

pub fn tiny(dtype: DType, lora: Option<&LoraSpec>) -> Llama {
    let files = local_model_files(&fixture("tiny-llama"), "tiny-llama").unwrap();
    load_llama(&files, dtype, &test_device(), lora).unwrap()
}

/// The fixture adapter's spec, and the model with its weights in the LoRA layers.
pub fn tiny_with_peft(dtype: DType) -> Llama {
    tiny_with_peft_dropout(dtype, None)
}

/// [`tiny_with_peft`] with the LoRA dropout set to `dropout` instead of the adapter's 0.
pub fn tiny_with_peft_dropout(dtype: DType, dropout: Option<f64>) -> Llama {
    let dir = fixture("peft-adapter");
    let (mut spec, _) = kto_train::model::adapter::read_adapter_spec(&dir).unwrap();
    if let Some(p) = dropout {
        spec.dropout = p;
    }
    let files = local_model_files(&fixture("tiny-llama"), "tiny-llama").unwrap();
    kto_train::model::load_adapted(&files, dtype, &test_device(), &dir, &spec).unwrap()
}

/// `model` computing with `f` applied to its kernel settings (the LoRA weights stay shared).
pub fn with_kernels(
    model: &Llama,
    f: impl FnOnce(&mut kto_train::kernels::KernelSettings),
) -> Llama {
    let mut k = model.kernels();
    f(&mut k);
    model.clone().with_kernels(k).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Relative L2 error |a - b| / |b|.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let d = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (d / n).sqrt()
}

/// fixtures/kto-step/batch.json as parsed JSON.
/// A JSON array of numbers.
pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn kto_step_json() -> serde_json::Value {
    kto_step_json_in("kto-step")
}

/// `<dir>/batch.json` of a TRL step fixture (kto-step, qwen2-kto-step).
pub fn kto_step_json_in(dir: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{dir}/batch.json"))).unwrap())
        .unwrap()
}

/// The TRL step's micro-batch (exact token ids). With `trim = Some((p, c))` each prompt keeps its
/// last `p` tokens and each completion its first `c` (shorter sequences for f64 checks).
pub fn kto_step_batch(trim: Option<(usize, usize)>) -> kto_train::train::batch::MicroBatch {
    kto_step_batch_in("kto-step", trim)
}

/// [`kto_step_batch`] of the TRL step fixture in `dir`.
pub fn kto_step_batch_in(
    dir: &str,
    trim: Option<(usize, usize)>,
) -> kto_train::train::batch::MicroBatch {
    use kto_train::model::logprobs::Sequence;
    let b = kto_step_json_in(dir);
    let seqs = |k: &str| -> Vec<Sequence> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let ids = |k: &str| -> Vec<u32> {
                    e[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect()
                };
                let (mut p, mut c) = (ids("prompt_ids"), ids("completion_ids"));
                if let Some((tp, tc)) = trim {
                    p = p[p.len().saturating_sub(tp)..].to_vec();
                    c.truncate(tc);
                }
                Sequence {
                    prompt_len: p.len(),
                    tokens: p.into_iter().chain(c).collect(),
                }
            })
            .collect()
    };
    kto_train::train::batch::MicroBatch {
        seqs: seqs("examples"),
        kl_seqs: Some(seqs("kl_examples")),
        labels: b["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect(),
    }
}

/// One training micro-batch of the TRL step fixture on `model`, with TRL's loss settings (the
/// adapter has dropout 0: training and evaluation mode are the same network).
pub fn run_trl_step(model: &Llama) -> kto_train::train::step::StepResult {
    run_trl_step_in(model, "kto-step")
}

/// [`run_trl_step`] with the TRL step fixture in `dir`.
pub fn run_trl_step_in(model: &Llama, dir: &str) -> kto_train::train::step::StepResult {
    use kto_train::model::PassMode;
    let b = kto_step_json_in(dir);
    let cfg = &b["trl_config"];
    let loss_cfg: kto_train::config::LossConfig = toml::from_str(&format!(
        "loss_type = \"{}\"\nbeta = {}\ndesirable_weight = {}\nundesirable_weight = {}",
        cfg["loss_type"].as_str().unwrap(),
        cfg["beta"],
        cfg["desirable_weight"],
        cfg["undesirable_weight"]
    ))
    .unwrap();
    let mut head = kto_train::loss::LossHead::new(&loss_cfg);
    let mode = kto_train::train::step::MicroBatchMode {
        policy: PassMode::POLICY_EVAL,
        kl: PassMode::POLICY_EVAL,
        step: 0,
        train: true,
    };
    let batch = kto_step_batch_in(dir, None);
    kto_train::train::step::run_micro_batch(model, &mut head, &batch, mode, None).unwrap()
}

/// The binary on configs/smoke.toml into `out`: 4 steps, an evaluation every 2, no benchmarks,
/// quiet; callers add their own `--set`s.
pub fn smoke_command(bin: &str, out: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.arg("--config")
        .arg(repo().join("configs/smoke.toml"))
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--set", "train.max_steps=4", "--set", "train.eval_every=2"])
        .args(["--set", "eval.benchmarks=[]", "--quiet"]);
    c
}

/// One KTO micro-batch of the TRL step fixture through `model` with the loss `loss_toml`, dropout
/// keyed (seed 7, pass 3) in the policy and KL passes: the loss and every LoRA gradient.
pub fn dropout_step(
    model: &Llama,
    loss_toml: &str,
) -> (f64, kto_train::model::llama::LoraGradients) {
    use kto_train::model::{DropoutKey, PassMode};
    use kto_train::train::step::{run_micro_batch, MicroBatchMode};
    let cfg: kto_train::config::LossConfig = toml::from_str(loss_toml).unwrap();
    let mut head = kto_train::loss::LossHead::new(&cfg);
    let batch = kto_step_batch(None);
    let fwd = PassMode::train(DropoutKey { seed: 7, pass: 3 });
    let mode = MicroBatchMode {
        policy: fwd,
        kl: fwd,
        step: 0,
        train: true,
    };
    let out = run_micro_batch(model, &mut head, &batch, mode, None).unwrap();
    (out.loss.loss, out.grads.unwrap())
}

/// A tensor of uniform values in [-scale, scale) from `rng`.
pub fn rand_tensor(rng: &mut rand_chacha::ChaCha8Rng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand::Rng::random_range(rng, -1.0f32..1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Asserts that every LoRA weight of `model` has a non-zero gradient in `want` and a gradient in
/// `got` within relative L2 difference `tol` of it.
pub fn assert_lora_grads_close(
    model: &Llama,
    want: &kto_train::model::llama::LoraGradients,
    got: &kto_train::model::llama::LoraGradients,
    tol: f64,
) {
    let mut n = 0;
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().unwrap();
        for (which, var) in [("A", &lora.a), ("B", &lora.b)] {
            let a = want.get(var.as_tensor()).expect("reference gradient");
            let b = got
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{path}.lora_{which}: no gradient"));
            let e = rel_l2(b, a);
            assert!(e < tol, "{path}.lora_{which}: relative L2 difference {e:e}");
            assert!(
                max_abs_diff(a, &a.zeros_like().unwrap()) > 0.0,
                "{path}: zero gradient"
            );
            n += 1;
        }
    }
    assert_eq!(n, 2 * model.lora_layers().len());
}
