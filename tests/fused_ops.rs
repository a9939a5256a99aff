//! The fused CPU ops (src/kernels/fused.rs) against candle's composite forms, through the whole
//! network in f64: same log-probs and same gradients for every LoRA tensor.
mod common;
use candle_core::DType;
use common::*;
use kto_train::config::LossConfig;
use kto_train::loss::LossHead;
use kto_train::model::{DropoutKey, Llama, PassMode};
use kto_train::train::step::{run_micro_batch, MicroBatchMode, StepResult};

fn run(model: &Llama, fwd: PassMode) -> StepResult {
    let mut head = LossHead::new(&LossConfig::default());
    let mode = MicroBatchMode {
        policy: fwd,
        kl: fwd,
        step: 0,
        train: true,
    };
    run_micro_batch(model, &mut head, &kto_step_batch(None), mode, None).unwrap()
}

fn compare(fwd: PassMode) {
    let model = tiny_with_peft_dropout(DType::F64, Some(0.1));
    let fused = run(&with_kernels(&model, |k| k.fused_ops = true), fwd);
    let composite = run(&with_kernels(&model, |k| k.fused_ops = false), fwd);
    for (a, b) in fused.logps.policy.iter().zip(&composite.logps.policy) {
        assert!(
            (a - b).abs() < 1e-9,
            "policy log-prob: fused {a}, composite {b}"
        );
    }
    assert!((fused.loss.loss - composite.loss.loss).abs() < 1e-12);
    let (gf, gc) = (fused.grads.unwrap(), composite.grads.unwrap());
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().unwrap();
        for (w, var) in [("A", &lora.a), ("B", &lora.b)] {
            let e = rel_l2(
                gf.get(var.as_tensor()).unwrap(),
                gc.get(var.as_tensor()).unwrap(),
            );
            assert!(
                e < 1e-9,
                "{path}.lora_{w}: fused vs composite gradient, relative error {e}"
            );
        }
    }
}

#[test]
fn fused_ops_match_composite_forms() {
    compare(PassMode::POLICY_EVAL);
}

#[test]
fn fused_ops_match_composite_forms_with_dropout() {
    compare(PassMode::train(DropoutKey { seed: 7, pass: 3 }));
}
