//! One micro-batch: policy, reference and KL passes, the loss head, and one backward pass of
//! `sum_i (dL/dP_i) * P_i` (the loss head gives dL/dP in f64).
use super::batch::MicroBatch;
use crate::loss::{LossHead, LossOutput, SequenceLogps};
use crate::model::logprobs::completion_logps;
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

/// Reference log-probs (LoRA off, no gradient) for the batch's main and KL sequences.
pub fn reference_logps(model: &Llama, batch: &MicroBatch) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let main = to_f64(&completion_logps(model, &batch.seqs, Forward::REFERENCE, false)?.sums)?;
    let kl = match &batch.kl_seqs {
        Some(kl) => Some(to_f64(
            &completion_logps(model, kl, Forward::REFERENCE, false)?.sums,
        )?),
        None => None,
    };
    Ok((main, kl))
}

/// Runs one micro-batch. `train`: policy in training mode (dropout per `fwd`), loss head state
/// updated, gradient computed; otherwise evaluation.
pub fn run_micro_batch(
    model: &Llama,
    head: &mut LossHead,
    batch: &MicroBatch,
    fwd: Forward,
    kl_fwd: Forward,
    step: u64,
    train: bool,
) -> Result<StepResult> {
    // The no-gradient passes run first so that their memory is free before the policy pass
    // builds its graph.
    let (reference, reference_kl) = reference_logps(model, batch)?;
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
        Some(surrogate.backward()?)
    } else {
        None
    };
    Ok(StepResult { loss, grads, logps })
}
