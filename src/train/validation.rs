//! The loss on the validation split, with TRL's metric names prefixed `eval_`.
use super::batch::build_micro_batch;
use super::refcache::RefCache;
use super::step::{run_micro_batch, MicroBatchMode};
use crate::data::KtoExample;
use crate::loss::{finalize_metrics, LossHead};
use crate::model::Llama;
use crate::util::metric_sums::MetricSums;
use anyhow::Result;
use std::collections::BTreeMap;

/// Evaluation over the whole validation split at optimizer step `step`; None when the split
/// makes no micro-batch.
pub fn evaluate(
    model: &Llama,
    head: &mut LossHead,
    examples: &[KtoExample],
    batch_size: usize,
    max_length: usize,
    step: usize,
    mut cache: Option<&mut RefCache>,
) -> Result<Option<BTreeMap<String, f64>>> {
    let min_batch = if head.needs_kl() { 2 } else { 1 };
    let mut m = MetricSums::new();
    for batch in examples.chunks(batch_size).filter(|c| c.len() >= min_batch) {
        let refs: Vec<&KtoExample> = batch.iter().collect();
        let mb = build_micro_batch(&refs, max_length, head.needs_kl());
        let mode = MicroBatchMode::evaluation(step as u64);
        let out = run_micro_batch(model, head, &mb, mode, cache.as_deref_mut())?;
        m.merge(&out.loss.metrics);
    }
    if m.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        finalize_metrics(&m)
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v))
            .collect(),
    ))
}
