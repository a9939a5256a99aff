//! The loss on the validation split, with TRL's metric names prefixed `eval_`, and whether the
//! implicit reward ranks the pairs of the split right: for every interaction with a desirable and
//! an undesirable completion of the same prompt, each (desirable, undesirable) pair counts as
//! right when the desirable one has the higher beta * (log pi - log pi_ref)
//! (`eval_pair_accuracy`, a tie counting one half) and by how much (`eval_pair_margin`, the mean
//! reward difference), each with its standard error over pairs.
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
    let mut rewards: BTreeMap<u64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for batch in examples.chunks(batch_size).filter(|c| c.len() >= min_batch) {
        let refs: Vec<&KtoExample> = batch.iter().collect();
        let mb = build_micro_batch(&refs, max_length, head.needs_kl());
        let mode = MicroBatchMode::evaluation(step as u64);
        let out = run_micro_batch(model, head, &mb, mode, cache.as_deref_mut())?;
        m.merge(&out.loss.metrics);
        let l = &out.logps;
        for (i, e) in batch.iter().enumerate() {
            let r = head.beta() * (l.policy[i] - l.reference[i]);
            let sides = rewards.entry(e.interaction).or_default();
            if e.label { &mut sides.0 } else { &mut sides.1 }.push(r);
        }
    }
    if m.is_empty() {
        return Ok(None);
    }
    let mut out: BTreeMap<String, f64> = finalize_metrics(&m)
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    out.extend(pair_metrics(rewards.values()));
    Ok(Some(out))
}

/// `eval_pair_accuracy`, `eval_pair_margin`, their `_stderr`s and `eval_pairs` over every
/// (desirable, undesirable) pair within each interaction; nothing when there is no pair.
pub fn pair_metrics<'a>(
    interactions: impl Iterator<Item = &'a (Vec<f64>, Vec<f64>)>,
) -> BTreeMap<String, f64> {
    let (mut right, mut margin) = (Vec::new(), Vec::new());
    for (desirable, undesirable) in interactions {
        for d in desirable {
            for u in undesirable {
                right.push(match d.partial_cmp(u) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                });
                margin.push(d - u);
            }
        }
    }
    let mut out = BTreeMap::new();
    if right.is_empty() {
        return out;
    }
    for (name, xs) in [("accuracy", &right), ("margin", &margin)] {
        let (mean, se) = mean_stderr(xs);
        out.insert(format!("eval_pair_{name}"), mean);
        out.insert(format!("eval_pair_{name}_stderr"), se);
    }
    out.insert("eval_pairs".into(), right.len() as f64);
    out
}

/// Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value).
fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_within_interactions() {
        // Interaction 1: desirable 0.3 vs undesirable 0.1 and 0.5; interaction 2: a tie.
        let groups = [
            (vec![0.3], vec![0.1, 0.5]),
            (vec![0.0], vec![0.0]),
            (vec![1.0], vec![]),
        ];
        let m = pair_metrics(groups.iter());
        assert_eq!(m["eval_pairs"], 3.0);
        assert!(
            (m["eval_pair_accuracy"] - 0.5).abs() < 1e-12,
            "(1 + 0 + 0.5) / 3"
        );
        assert!((m["eval_pair_margin"] - (0.2 - 0.2 + 0.0) / 3.0).abs() < 1e-12);
        // Sample sd of {1, 0, 0.5} is 0.5: se = 0.5 / sqrt(3).
        assert!((m["eval_pair_accuracy_stderr"] - 0.5 / 3f64.sqrt()).abs() < 1e-12);
        assert!(pair_metrics([(vec![1.0], vec![])].iter()).is_empty());
    }
}
