//! One TRL KTOTrainer step (fixtures/kto-step) reproduced: log-probs, loss, metrics, gradients.
mod common;
use candle_core::DType;
use common::*;
use kto_train::loss::finalize_metrics;
use serde_json::Value;

fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < tol,
            "{name}[{i}]: got {g}, TRL {w} (tol {tol})"
        );
    }
}

#[test]
fn trl_kto_step_is_reproduced() {
    check_trl_step(false);
}

/// The same step with activation checkpointing (blocks recomputed in the backward).
#[test]
fn trl_kto_step_is_reproduced_with_activation_checkpointing() {
    check_trl_step(true);
}

fn check_trl_step(activation_checkpointing: bool) {
    let model = with_kernels(&tiny_with_peft(DType::F32), |k| {
        k.activation_checkpointing = activation_checkpointing
    });
    check_trl_step_on(&model, "kto-step");
}

/// The TRL KTO step procedure on a tiny Qwen2 (q/k/v biases, frozen under LoRA).
#[test]
fn trl_kto_step_is_reproduced_on_qwen2() {
    let files = kto_train::hub::local_model_files(&fixture("qwen2"), "qwen2").unwrap();
    let model = kto_train::model::load_with_adapter(
        &files,
        DType::F32,
        &candle_core::Device::Cpu,
        Some(&fixture("qwen2-kto-step")),
    )
    .unwrap();
    check_trl_step_on(&model, "qwen2-kto-step");
}

fn check_trl_step_on(model: &kto_train::model::Llama, dir: &str) {
    let b: Value = kto_step_json_in(dir);
    let out = run_trl_step_in(model, dir);
    let l = &out.logps;
    assert_close("policy_logps", &l.policy, &f64s(&b["policy_logps"]), 1e-3);
    assert_close(
        "reference_logps",
        &l.reference,
        &f64s(&b["reference_logps"]),
        1e-3,
    );
    assert_close(
        "policy_KL_logps",
        l.policy_kl.as_ref().unwrap(),
        &f64s(&b["policy_KL_logps"]),
        1e-3,
    );
    assert_close(
        "reference_KL_logps",
        l.reference_kl.as_ref().unwrap(),
        &f64s(&b["reference_KL_logps"]),
        1e-3,
    );
    let want_loss = b["loss"].as_f64().unwrap();
    assert!(
        (out.loss.loss - want_loss).abs() < 1e-4,
        "loss {} vs TRL {want_loss}",
        out.loss.loss
    );
    let m = finalize_metrics(&out.loss.metrics);
    for (k, tol) in [
        ("kl", 1e-3),
        ("logps/chosen", 1e-3),
        ("logps/rejected", 1e-3),
        ("rewards/chosen", 1e-4),
        ("rewards/rejected", 1e-4),
        ("rewards/margins", 1e-4),
        ("logits/chosen", 1e-5),
        ("logits/rejected", 1e-5),
    ] {
        let want = b["metrics"][k].as_f64().unwrap();
        let got = m[k];
        assert!((got - want).abs() < tol, "metric {k}: {got} vs TRL {want}");
    }
    // Gradients of all 28 LoRA tensors.
    let grads = out.grads.unwrap();
    let want = load_st(&format!("{dir}/grads.safetensors"));
    let mut n = 0;
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().unwrap();
        for (which, var) in [("A", &lora.a), ("B", &lora.b)] {
            let key = format!("base_model.model.{path}.lora_{which}.weight");
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {key}"));
            let e = rel_l2(g, &want[&key]);
            assert!(e < 1e-3, "{key}: relative L2 error {e}");
            n += 1;
        }
    }
    assert_eq!(n, 28);
    assert_eq!(want.len(), 28);
}

/// TRL's `disable_dropout` (train.disable_dropout, default true): the policy trains as if its LoRA
/// dropout were 0, while the configured dropout stays what the adapter records.
#[test]
fn disable_dropout_trains_the_network_without_dropout() {
    use kto_train::train::step::{run_micro_batch, MicroBatchMode};
    let step = |model: &kto_train::model::Llama| {
        let b = kto_step_json_in("kto-step");
        let cfg = &b["trl_config"];
        let loss_cfg: kto_train::config::LossConfig =
            toml::from_str(&format!("loss_type = \"kto\"\nbeta = {}", cfg["beta"])).unwrap();
        let mut head = kto_train::loss::LossHead::new(&loss_cfg);
        let batch = kto_step_batch_in("kto-step", None);
        let out = run_micro_batch(
            model,
            &mut head,
            &batch,
            MicroBatchMode::training(42, 0, 0),
            None,
        )
        .unwrap();
        let g: Vec<f64> = out
            .grads
            .unwrap()
            .into_vec()
            .iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect();
        (out.loss.loss, g)
    };
    let no_dropout = step(&tiny_with_peft(DType::F64));
    let with_dropout = step(&tiny_with_peft_dropout(DType::F64, Some(0.1)));
    let disabled = step(&tiny_with_peft_dropout(DType::F64, Some(0.1)).without_lora_dropout());
    assert_eq!(
        disabled, no_dropout,
        "disabled dropout is no dropout, exactly"
    );
    assert_ne!(
        with_dropout.1, no_dropout.1,
        "dropout 0.1 changes the gradients"
    );

    // The recipe applies it from the config, and keeps the configured dropout for the adapter.
    let files = kto_train::hub::local_model_files(&fixture("tiny-llama"), "tiny-llama").unwrap();
    for (disable, want) in [(true, 0.0), (false, 0.1)] {
        let cfg = kto_train::config::Config::from_toml_str(&format!(
            "[model]\nname_or_path = \"x\"\n[lora]\ndropout = 0.1\n[train]\ndtype = \"f64\"\ndisable_dropout = {disable}\n"
        ))
        .unwrap();
        let (model, spec) =
            kto_train::recipe::build_policy(&cfg, &files, &candle_core::Device::Cpu).unwrap();
        assert_eq!(spec.dropout, 0.1);
        for (name, lin) in model.lora_layers() {
            assert_eq!(lin.lora.as_ref().unwrap().dropout, want, "{name}");
        }
    }
}
