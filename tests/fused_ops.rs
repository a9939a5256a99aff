//! The fused CPU ops (src/model/fused.rs) against candle's composite forms, through the whole
//! network in f64: same log-probs and same gradients for every LoRA tensor.
mod common;
use candle_core::DType;
use common::*;
use kto_train::config::LossConfig;
use kto_train::loss::LossHead;
use kto_train::model::{DropoutKey, Forward, Llama};
use kto_train::train::step::{run_micro_batch, StepResult};

fn run(model: &Llama, fwd: Forward) -> StepResult {
    let mut head = LossHead::new(&LossConfig::default());
    run_micro_batch(
        model,
        &mut head,
        &kto_step_batch(None),
        fwd,
        fwd,
        0,
        true,
        None,
    )
    .unwrap()
}

fn compare(fwd: Forward) {
    let mut model = tiny_with_peft(DType::F64);
    for lin in model.layers.iter_mut().flat_map(|l| l.proj.iter_mut()) {
        if let Some(l) = lin.lora.as_mut() {
            l.dropout = 0.1;
        }
    }
    model.use_fused_ops = true;
    let fused = run(&model, fwd);
    model.use_fused_ops = false;
    let composite = run(&model, fwd);
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
    compare(Forward::POLICY_EVAL);
}

#[test]
fn fused_ops_match_composite_forms_with_dropout() {
    compare(Forward::train(DropoutKey { seed: 7, pass: 3 }));
}
