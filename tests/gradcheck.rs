//! Finite-difference check of the KTO gradient with respect to LoRA weights, in f64 (f32 sums of
//! hundreds of log-probs are too coarse for finite differences).
mod common;
use candle_core::{DType, IndexOp, Tensor};
use common::*;
use kto_train::config::LossConfig;
use kto_train::loss::{LossHead, SequenceLogps};
use kto_train::model::logprobs::completion_logps;
use kto_train::model::{Llama, PassMode};
use kto_train::train::batch::MicroBatch;
use kto_train::train::step::{reference_logps, run_micro_batch, MicroBatchMode};

/// Loss as a function of the current LoRA weights, z held at its value from `fixed` (TRL detaches z).
fn loss_at(
    model: &Llama,
    head: &LossHead,
    batch: &MicroBatch,
    fixed: &SequenceLogps,
    fwd: PassMode,
) -> f64 {
    // No gradient: the composite LoRA form, independent of the one-node form the gradient
    // pass uses (src/model/lora.rs).
    let p = completion_logps(model, &batch.seqs, fwd.with_grad(false), false).unwrap();
    let mut s = fixed.clone();
    s.policy = p.sums.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    head.eval_batch(&s, 0).unwrap().loss
}

pub fn check_gradients(loss_toml: &str) {
    check_gradients_with(loss_toml, PassMode::POLICY_EVAL, 0.0);
}

/// With `dropout` > 0 and a training `fwd`, the masks are a pure function of the dropout key,
/// so the loss is still a deterministic function of the LoRA weights.
fn check_gradients_with(loss_toml: &str, fwd: PassMode, dropout: f64) {
    let model = tiny_with_peft_dropout(DType::F64, Some(dropout));
    let cfg: LossConfig = toml::from_str(loss_toml).unwrap();
    let batch = kto_step_batch(Some((24, 16)));
    let mut head = LossHead::new(&cfg);
    let mode = MicroBatchMode {
        policy: fwd,
        kl: fwd,
        step: 0,
        train: true,
    };
    let out = run_micro_batch(&model, &mut head, &batch, mode, None).unwrap();
    let grads = out.grads.unwrap();
    let (reference, reference_kl) = reference_logps(&model, &batch, None).unwrap();
    assert_eq!(reference, out.logps.reference);
    assert_eq!(reference_kl, out.logps.reference_kl);
    // The finite differences see the loss with the BCO baseline the training call used.
    let mut head_fd = LossHead::new(&cfg);
    head_fd.restore(head.state());
    let head = head_fd;
    let h = 1e-5;
    let mut checked = 0;
    for (path, lin) in model.lora_layers().into_iter().step_by(5) {
        let lora = lin.lora.as_ref().unwrap();
        for (which, var) in [("A", &lora.a), ("B", &lora.b)] {
            let g = grads.get(var.as_tensor()).unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let (rows, cols) = orig.dims2().unwrap();
            for (r, c) in [(0, 0), (rows - 1, cols - 1), (rows / 2, cols / 3)] {
                let bump = |d: f64| {
                    let mut v: Vec<Vec<f64>> = orig.to_vec2().unwrap();
                    v[r][c] += d;
                    var.set(&Tensor::new(v, model.device()).unwrap()).unwrap();
                    let l = loss_at(&model, &head, &batch, &out.logps, fwd);
                    var.set(&orig).unwrap();
                    l
                };
                let fd = (bump(h) - bump(-h)) / (2.0 * h);
                let an = g.i((r, c)).unwrap().to_scalar::<f64>().unwrap();
                // Relative 1e-5, with an absolute floor at the finite differences' own noise
                // (about 1e-16 * |L| / h).
                assert!(
                    (fd - an).abs() <= 1e-5 * an.abs() + 1e-9,
                    "{path}.lora_{which}[{r},{c}]: analytic {an}, finite difference {fd}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12);
}

#[test]
fn kto_gradient_matches_finite_differences() {
    check_gradients("loss_type = \"kto\"\nbeta = 0.1");
}

#[test]
fn kto_gradient_with_lora_dropout_matches_finite_differences() {
    let fwd = PassMode::train(kto_train::model::DropoutKey { seed: 3, pass: 11 });
    check_gradients_with("loss_type = \"kto\"\nbeta = 0.1", fwd, 0.2);
}

#[test]
fn apo_zero_gradient_matches_finite_differences() {
    check_gradients("loss_type = \"apo_zero_unpaired\"\nbeta = 0.1");
}

#[test]
fn enhanced_kto_with_bco_gradient_matches_finite_differences() {
    check_gradients(
        "loss_type = \"enhanced_kto\"\nbeta = 0.1\nbco_shift = true\nodds_ratio_weight = 0.1\nweighting = \"tk92\"",
    );
}

#[test]
fn enhanced_kto_prelec_gradient_matches_finite_differences() {
    check_gradients("loss_type = \"enhanced_kto\"\nbeta = 0.5\nweighting = \"prelec\"\nbco_shift = true\nbco_momentum = 0.9");
}
