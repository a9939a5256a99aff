//! Sequences of unequal lengths run packed into one row (src/model/logprobs.rs `run_packed`,
//! `Llama::hidden_states_packed`): every sequence must get what a pass over it alone gives
//! (f64: up to rounding): log-probs, the gradient of every LoRA tensor, the captured keys and
//! values (the KL passes reuse them), with and without checkpointing. With LoRA dropout in the
//! pass, passes stay one per sequence (the masks are drawn per pass).
//!
//! Packing is off by default in f64 (the tests' precision, whose runs stay bit-level; a shared
//! product can round differently; `Llama::can_pack`): `KTO_TRAIN_PACK=1` turns it on here.
mod common;
use candle_core::{DType, Tensor};
use common::*;
use kto_train::model::logprobs::{completion_logps, completion_logps_capturing, Sequence};
use kto_train::model::{DropoutKey, Llama, PassMode};

/// Sequences of unequal lengths from the TRL step fixture's examples, one with no completion
/// token scored (prompt only) and one of a single token.
fn sequences() -> Vec<Sequence> {
    let batch = kto_step_batch(None);
    let mut seqs: Vec<Sequence> = batch.seqs.clone();
    let first = seqs[0].clone();
    seqs.push(Sequence {
        tokens: first.tokens[..first.prompt_len.min(5)].to_vec(),
        prompt_len: first.prompt_len.min(5),
    });
    seqs.push(Sequence {
        tokens: first.tokens[..1].to_vec(),
        prompt_len: 0,
    });
    seqs.push(Sequence {
        tokens: first.tokens[..first.prompt_len + 2].to_vec(),
        prompt_len: first.prompt_len,
    });
    let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
    assert!(
        lens.windows(2).any(|w| w[0] != w[1]),
        "unequal lengths: {lens:?}"
    );
    seqs
}

/// Packing on for f64 (before the first `can_pack`, which reads the setting once).
fn pack_everywhere() {
    // Every test here sets the same value, before its first model call.
    std::env::set_var("KTO_TRAIN_PACK", "1");
}

fn sums(model: &Llama, seqs: &[Sequence], pass: PassMode) -> (Tensor, Vec<f64>) {
    let out = completion_logps(model, seqs, pass, true).unwrap();
    let v = out.sums.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let logit_sums = out.logit_sums.unwrap();
    assert_eq!(logit_sums.len(), seqs.len());
    (out.sums, v)
}

/// Gradient of sum_i w_i * logp_i (distinct weights, so that a row mix-up shows) for every LoRA
/// tensor, as training takes it (`Llama::lora_gradients`).
fn grads(model: &Llama, total: &Tensor) -> Vec<Tensor> {
    let g = model.lora_gradients(total).unwrap();
    let mut out = Vec::new();
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().unwrap();
        for (name, var) in [("A", &lora.a), ("B", &lora.b)] {
            let grad = g.get(var.as_tensor());
            out.push(
                grad.unwrap_or_else(|| panic!("{path}.lora_{name}: no gradient"))
                    .clone(),
            );
        }
    }
    out
}

fn weights(n: usize) -> Vec<f64> {
    (0..n).map(|i| 1.0 + 0.37 * i as f64).collect()
}

#[test]
fn packed_sequences_match_one_pass_each() {
    pack_everywhere();
    let seqs = sequences();
    let w = weights(seqs.len());
    for checkpointing in [false, true] {
        let model = with_kernels(&tiny_with_peft(DType::F64), |k| {
            k.fused_ops = true;
            k.activation_checkpointing = checkpointing;
        });
        // Nonzero B, so that the LoRA branch changes the states the attention mixes.
        for (_, lin) in model.lora_layers() {
            let b = &lin.lora.as_ref().unwrap().b;
            let v = Tensor::ones(b.dims(), DType::F64, b.device()).unwrap() * 0.05;
            b.set(&v.unwrap()).unwrap();
        }
        let pass = PassMode::train(DropoutKey { seed: 1, pass: 0 });
        assert!(model.can_pack(pass), "no dropout in this model: packs");
        let (packed_sums, packed) = sums(&model, &seqs, pass);
        let packed_total = packed_sums
            .mul(&Tensor::new(w.clone(), packed_sums.device()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let packed_grads = grads(&model, &packed_total);
        let mut alone_total: Option<Tensor> = None;
        for (i, s) in seqs.iter().enumerate() {
            let (t, v) = sums(&model, std::slice::from_ref(s), pass);
            assert!(
                (v[0] - packed[i]).abs() <= 1e-10 * v[0].abs().max(1.0),
                "sequence {i} (checkpointing {checkpointing}): packed {} vs alone {}",
                packed[i],
                v[0]
            );
            let t = (t.sum_all().unwrap() * w[i]).unwrap();
            alone_total = Some(match alone_total {
                None => t,
                Some(a) => (a + t).unwrap(),
            });
        }
        let alone_grads = grads(&model, &alone_total.unwrap());
        for (k, (p, a)) in packed_grads.iter().zip(&alone_grads).enumerate() {
            let e = rel_l2(p, a);
            assert!(e < 1e-10, "LoRA tensor {k}: packed vs alone gradient {e:e}");
        }
    }
}

#[test]
fn packed_pass_captures_each_sequences_own_states() {
    pack_everywhere();
    let seqs = sequences();
    let model = with_kernels(&tiny_with_peft(DType::F64), |k| k.fused_ops = true);
    let (_, packed) =
        completion_logps_capturing(&model, &seqs, PassMode::REFERENCE, false).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let (_, alone) =
            completion_logps_capturing(&model, std::slice::from_ref(s), PassMode::REFERENCE, false)
                .unwrap();
        // The states are opaque outside the crate; reuse shows them: a sequence that continues
        // sequence i reuses exactly its positions, and the KL tests (tests/prefix_reuse.rs)
        // check the values reached that way.
        let longer = Sequence {
            tokens: s.tokens.iter().copied().chain([1, 2, 3]).collect(),
            prompt_len: s.tokens.len(),
        };
        assert_eq!(packed.reusable(i, &longer), alone.reusable(0, &longer));
        let got = kto_train::model::logprobs::completion_logp_sums_after(
            &model,
            std::slice::from_ref(&longer),
            PassMode::REFERENCE,
            &packed,
            &[Some(i)],
        )
        .unwrap();
        let want = sums(&model, std::slice::from_ref(&longer), PassMode::REFERENCE).1;
        assert!(
            (got[0] - want[0]).abs() <= 1e-10 * want[0].abs().max(1.0),
            "sequence {i}: continued from the packed pass's states {} vs a full pass {}",
            got[0],
            want[0]
        );
    }
}

/// The TRL step fixture's examples, and sequences that continue them: their KL sequences (the
/// whole prompt shared), one sharing only its first 5 tokens with row 0 and one sharing nothing
/// with row 1 (continuation i goes with row i % 2).
fn examples_and_continuations() -> (Vec<Sequence>, Vec<Sequence>) {
    let batch = kto_step_batch(None);
    let main = batch.seqs.clone();
    let mut others = batch.kl_seqs.clone().unwrap();
    let mut partial = main[0].clone();
    partial.tokens[5] = (partial.tokens[5] + 1) % 64;
    let mut none = main[1].clone();
    none.tokens[0] = (none.tokens[0] + 1) % 64;
    others.extend([partial, none]);
    (main, others)
}

/// The KL passes' continuations (each sequence after its own prompt's states) run packed into
/// one pass: every sequence's sum is that of a full pass over it alone, whether it reuses a
/// whole prompt, part of one, or nothing, with the policy and the reference.
#[test]
fn packed_continuations_match_full_passes() {
    pack_everywhere();
    let model = with_kernels(&tiny_with_peft(DType::F64), |k| k.fused_ops = true);
    let (main, others) = examples_and_continuations();
    let rows: Vec<Option<usize>> = (0..others.len()).map(|i| Some(i % main.len())).collect();
    for pass in [PassMode::REFERENCE, PassMode::POLICY_EVAL] {
        let (_, states) = completion_logps_capturing(&model, &main, pass, false).unwrap();
        let reused: Vec<usize> = (0..others.len())
            .map(|i| states.reusable(i % main.len(), &others[i]))
            .collect();
        assert!(reused.iter().filter(|&&r| r > 0).count() >= 3, "{reused:?}");
        assert!(reused.contains(&0), "{reused:?}");
        let before = kto_train::model::logprobs::packed_continuations();
        let got = kto_train::model::logprobs::completion_logp_sums_after(
            &model, &others, pass, &states, &rows,
        )
        .unwrap();
        assert_eq!(
            kto_train::model::logprobs::packed_continuations(),
            before + 1,
            "the continuations did not run packed"
        );
        for (i, s) in others.iter().enumerate() {
            let want = sums(&model, std::slice::from_ref(s), pass).1[0];
            assert!(
                (got[i] - want).abs() <= 1e-10 * want.abs().max(1.0),
                "sequence {i} (reused {}): packed continuation {} vs a full pass {want}",
                reused[i],
                got[i]
            );
        }
    }
}

/// The reference passes of a micro-batch in one: its examples and their KL sequences packed
/// together, each KL sequence reusing, in the same pass, the states of the prompt it shares with
/// its example. Every sum is that of a full pass over the sequence alone.
#[test]
fn examples_and_their_continuations_in_one_pass_match_full_passes() {
    pack_everywhere();
    let model = with_kernels(&tiny_with_peft(DType::F64), |k| k.fused_ops = true);
    let (main, mut conts) = examples_and_continuations();
    conts.push(main[1].clone());
    // The last one has no row: a sequence of its own in the pass.
    let mut rows: Vec<Option<usize>> = (0..conts.len()).map(|i| Some(i % main.len())).collect();
    *rows.last_mut().unwrap() = None;
    for pass in [PassMode::REFERENCE, PassMode::POLICY_EVAL] {
        let before = kto_train::model::logprobs::packed_continuations();
        let (got_main, got_conts) =
            kto_train::model::logprobs::completion_logp_sums_with_continuations(
                &model, &main, &conts, &rows, pass,
            )
            .unwrap();
        assert_eq!(
            kto_train::model::logprobs::packed_continuations(),
            before + 1,
            "not one packed pass"
        );
        let all = main
            .iter()
            .zip(&got_main)
            .chain(conts.iter().zip(&got_conts));
        for (i, (s, got)) in all.enumerate() {
            let want = sums(&model, std::slice::from_ref(s), pass).1[0];
            assert!(
                (got - want).abs() <= 1e-10 * want.abs().max(1.0),
                "sequence {i}: in the shared pass {got} vs a full pass {want}"
            );
        }
    }
}

#[test]
fn a_pass_with_lora_dropout_does_not_pack() {
    pack_everywhere();
    let model = tiny_with_peft_dropout(DType::F64, Some(0.1));
    let model = with_kernels(&model, |k| k.fused_ops = true);
    assert!(!model.can_pack(PassMode::train(DropoutKey { seed: 1, pass: 0 })));
    assert!(model.can_pack(PassMode::POLICY_EVAL));
    assert!(model.can_pack(PassMode::REFERENCE));
}
