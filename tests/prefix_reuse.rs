//! The KL passes reuse the prompt states of the batch's own passes. Reuse must give the log-probs
//! of a full pass over the same sequences (f64: up to rounding), on the fused and the composite
//! attention paths, for the policy and the reference, and fall back to a full pass where nothing
//! can be shared.
mod common;
use candle_core::DType;
use common::*;
use kto_train::model::logprobs::{
    completion_logp_sums_after, completion_logps, completion_logps_capturing, Sequence,
};
use kto_train::model::{Llama, PassMode};

fn full(model: &Llama, seqs: &[Sequence], fwd: PassMode) -> Vec<f64> {
    completion_logps(model, seqs, fwd, false)
        .unwrap()
        .sums
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check(model: &Llama, main: &[Sequence], other: &[Sequence], fwd: PassMode) -> Vec<usize> {
    let (_, states) = completion_logps_capturing(model, main, fwd, false).unwrap();
    let rows: Vec<Option<usize>> = (0..other.len()).map(|i| Some(i % main.len())).collect();
    let reused: Vec<usize> = other
        .iter()
        .enumerate()
        .map(|(i, s)| states.reusable(i % main.len(), s))
        .collect();
    let got = completion_logp_sums_after(model, other, fwd, &states, &rows).unwrap();
    let want = full(model, other, fwd);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-9 * w.abs().max(1.0),
            "sequence {i} (reused {} positions): {g} vs full pass {w}",
            reused[i]
        );
    }
    reused
}

#[test]
fn kl_sequences_reusing_prompt_states_match_a_full_pass() {
    for fused in [true, false] {
        let model = with_kernels(&tiny_with_peft(DType::F64), |k| k.fused_ops = fused);
        let batch = kto_step_batch(None);
        let kl = batch.kl_seqs.as_ref().unwrap();
        for fwd in [PassMode::REFERENCE, PassMode::POLICY_EVAL] {
            let reused = check(&model, &batch.seqs, kl, fwd);
            // TRL's KL pairs keep each example's prompt: everything up to the last prompt token.
            for (i, r) in reused.iter().enumerate() {
                assert_eq!(*r, kl[i].prompt_len - 1, "KL sequence {i}");
            }
        }
    }
}

#[test]
fn partial_and_absent_shared_prefixes() {
    let model = tiny_with_peft(DType::F64);
    let batch = kto_step_batch(Some((12, 10)));
    let a = &batch.seqs[0];
    // Shares only its first 5 tokens with row 0, then a different prompt tail.
    let mut partial = a.clone();
    partial.tokens[5] = (partial.tokens[5] + 1) % 64;
    // Differs at the first token: nothing to share.
    let mut none = batch.seqs[1].clone();
    none.tokens[0] = (none.tokens[0] + 1) % 64;
    // An empty prompt: the first scored token needs the hidden state of position 0.
    let mut no_prompt = a.clone();
    no_prompt.prompt_len = 0;
    // The example itself, identical: everything before its first scored token.
    let same = a.clone();
    let main = vec![a.clone(), batch.seqs[1].clone()];
    // Sequence i is paired with row i % 2.
    let others = vec![partial, none, same, no_prompt];
    let reused = check(&model, &main, &others, PassMode::POLICY_EVAL);
    assert_eq!(reused, vec![5, 0, a.prompt_len - 1, 0]);
}
