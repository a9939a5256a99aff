//! One micro-batch: policy, reference and KL passes, the loss head, and one backward pass of
//! `sum_i (dL/dP_i) * P_i` (the loss head gives dL/dP in f64).
use super::batch::MicroBatch;
use super::refcache::{sequence_key, RefCache};
use crate::loss::{LossHead, LossOutput, SequenceLogps};
use crate::model::checkpoint;
use crate::model::logprobs::{completion_logps, Sequence};
use crate::model::{Forward, Llama};
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

pub struct StepResult {
    pub loss: LossOutput,
    /// Gradients of the LoRA weights (None in evaluation).
    pub grads: Option<GradStore>,
    /// Per-example policy log-prob sums, for inspection and tests.
    pub logps: SequenceLogps,
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1()?)
}

/// Reference log-probs (LoRA off, no gradient) for the batch's main and KL sequences, from the
/// cache where it has them; the others are computed in one pass (and added to the cache).
pub fn reference_logps(
    model: &Llama,
    batch: &MicroBatch,
    mut cache: Option<&mut RefCache>,
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let all: Vec<&Sequence> = batch
        .seqs
        .iter()
        .chain(batch.kl_seqs.iter().flatten())
        .collect();
    let keys: Vec<u128> = all
        .iter()
        .map(|s| sequence_key(&s.tokens, s.prompt_len))
        .collect();
    let mut values: Vec<Option<f64>> = match cache.as_deref_mut() {
        Some(c) => keys.iter().map(|k| c.get(*k)).collect(),
        None => vec![None; all.len()],
    };
    let missing: Vec<usize> = (0..all.len()).filter(|&i| values[i].is_none()).collect();
    if !missing.is_empty() {
        let seqs: Vec<Sequence> = missing.iter().map(|&i| all[i].clone()).collect();
        let got = to_f64(&completion_logps(model, &seqs, Forward::REFERENCE, false)?.sums)?;
        for (&i, v) in missing.iter().zip(got) {
            values[i] = Some(v);
            if let Some(c) = cache.as_deref_mut() {
                c.insert(keys[i], v);
            }
        }
    }
    let mut values: Vec<f64> = values.into_iter().map(|v| v.expect("filled")).collect();
    let kl = batch
        .kl_seqs
        .as_ref()
        .map(|_| values.split_off(batch.seqs.len()));
    Ok((values, kl))
}

/// Runs one micro-batch. `train`: policy in training mode (dropout per `fwd`), loss head state
/// updated, gradient computed; otherwise evaluation.
#[allow(clippy::too_many_arguments)] // each argument is one independent knob of a step
pub fn run_micro_batch(
    model: &Llama,
    head: &mut LossHead,
    batch: &MicroBatch,
    fwd: Forward,
    kl_fwd: Forward,
    step: u64,
    train: bool,
    cache: Option<&mut RefCache>,
) -> Result<StepResult> {
    // The no-gradient passes run first so that their memory is free before the policy pass
    // builds its graph.
    let (reference, reference_kl) = reference_logps(model, batch, cache)?;
    let policy_kl = match (&batch.kl_seqs, head.needs_kl()) {
        (Some(kl), true) => Some(to_f64(
            &completion_logps(model, kl, kl_fwd.with_grad(false), false)?.sums,
        )?),
        _ => None,
    };
    let policy = completion_logps(model, &batch.seqs, fwd.with_grad(train), true)?;
    let logps = SequenceLogps {
        labels: batch.labels.clone(),
        policy: to_f64(&policy.sums)?,
        reference,
        policy_kl,
        reference_kl,
        completion_tokens: policy.counts.iter().map(|&c| c as f64).collect(),
    };
    let mut loss = if train {
        head.train_batch(&logps, step)?
    } else {
        head.eval_batch(&logps, step)?
    };
    if let Some(sums) = &policy.logit_sums {
        let vocab = model.cfg.vocab_size as f64;
        for (i, s) in sums.iter().enumerate() {
            let side = if batch.labels[i] {
                "chosen"
            } else {
                "rejected"
            };
            loss.metrics.add(
                &format!("logits/{side}"),
                *s,
                policy.counts[i] as f64 * vocab,
            );
        }
    }
    let grads = if train {
        let g = Tensor::from_vec(loss.grad.clone(), loss.grad.len(), &model.device)?
            .to_dtype(model.dtype)?;
        let surrogate = (&policy.sums * &g)?.sum_all()?;
        checkpoint::clear_block_grads();
        let mut grads = surrogate.backward()?;
        checkpoint::take_block_grads(&mut grads)?;
        Some(grads)
    } else {
        None
    };
    Ok(StepResult { loss, grads, logps })
}
