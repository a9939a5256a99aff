//! The network against transformers (tiny-llama fixture) and PEFT (peft-adapter fixture).
mod common;
use candle_core::{DType, IndexOp, Tensor, D};
use common::*;
use kto_train::model::{Llama, PassMode};
use std::collections::HashMap;

/// Full logits [T, vocab] for one token sequence.
fn all_logits(m: &Llama, ids: &Tensor, fwd: PassMode) -> Tensor {
    let ids: Vec<u32> = ids.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), m.device()).unwrap();
    let h = m.hidden_states(&ids, fwd).unwrap().squeeze(0).unwrap();
    m.logits(&h).unwrap()
}

fn check_against(m: &Llama, expected: &HashMap<String, Tensor>, fwd: PassMode) {
    let mut n = 0;
    for i in 0.. {
        let Some(ids) = expected.get(&format!("input_ids.{i}")) else {
            break;
        };
        n += 1;
        let logits = all_logits(m, ids, fwd);
        let t = logits.dim(0).unwrap();
        let head = logits.narrow(1, 0, 32).unwrap();
        let d = max_abs_diff(&head, &expected[&format!("logits_head32.{i}")]);
        assert!(d < 1e-4, "text {i}: logits_head32 differ by {d}");
        let last = logits.i(t - 1).unwrap();
        let d = max_abs_diff(&last, &expected[&format!("last_logits.{i}")]);
        assert!(d < 1e-4, "text {i}: last_logits differ by {d}");
        let lsm =
            candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1).unwrap(), D::Minus1).unwrap();
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
        assert!(d < 1e-4, "text {i}: token log-probs differ by {d}");
    }
    assert!(n >= 3, "fixture has {n} texts");
}

#[test]
fn logits_match_transformers() {
    let m = tiny(DType::F32, None);
    check_against(
        &m,
        &load_st("tiny-llama/expected.safetensors"),
        PassMode::REFERENCE,
    );
}

#[test]
fn logits_with_peft_adapter_match_peft() {
    let m = tiny_with_peft(DType::F32);
    check_against(
        &m,
        &load_st("peft-adapter/expected.safetensors"),
        PassMode::POLICY_EVAL,
    );
    // LoRA switched off is the base model again.
    check_against(
        &m,
        &load_st("tiny-llama/expected.safetensors"),
        PassMode::REFERENCE,
    );
}
