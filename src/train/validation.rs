//! The loss on the validation split, with TRL's metric names prefixed `eval_`, and whether the
//! implicit reward ranks the split's preferences right: every comparison the data states (a
//! chosen/rejected record, a better/worse pair of ranked replies) whose two completions are both
//! in the split counts once, as right when the preferred completion has the higher
//! beta * (log pi - log pi_ref) (`eval_pair_accuracy`, a tie counting one half), and by how much
//! (`eval_pair_margin`, the mean reward difference). Unpaired records of one prompt are compared
//! desirable against undesirable. The standard errors are clustered by prompt, because the
//! comparisons of one prompt share completions and are not independent.
use super::batch::build_micro_batch;
use super::refcache::RefCache;
use super::step::{run_micro_batch_shard, MicroBatchMode};
use crate::data::KtoExample;
use crate::dist::shard_rows;
use crate::loss::{finalize_metrics, LossHead};
use crate::model::Llama;
use crate::util::metric_sums::MetricSums;
use anyhow::Result;
use std::collections::BTreeMap;

/// Evaluation over the whole validation split at optimizer step `step`, shared by the ranks of
/// `comm` (`batch_size` is the global micro-batch, of which each rank runs its rows; every rank
/// gets the same metrics); None when the split makes no micro-batch.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    comm: &dyn crate::dist::Comm,
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
    let mut rewards: BTreeMap<u64, (&str, Vec<Scored>)> = BTreeMap::new();
    for batch in examples.chunks(batch_size).filter(|c| c.len() >= min_batch) {
        let refs: Vec<&KtoExample> = batch.iter().collect();
        let mb = build_micro_batch(&refs, max_length, head.needs_kl());
        let mode = MicroBatchMode::evaluation(step as u64);
        let mine = shard_rows(mb.len(), comm.rank(), comm.size());
        let out = run_micro_batch_shard(model, head, &mb, mine, mode, cache.as_deref_mut(), comm)?;
        m.merge(&out.loss.metrics);
        let l = &out.logps;
        for (i, e) in batch.iter().enumerate() {
            let (_, scored) = rewards
                .entry(e.interaction)
                .or_insert_with(|| (e.source.as_str(), Vec::new()));
            scored.push(Scored {
                pair: e.pair,
                desirable: e.label,
                reward: head.beta() * (l.policy[i] - l.reference[i]),
            });
        }
    }
    if m.is_empty() {
        return Ok(None);
    }
    let mut out: BTreeMap<String, f64> = finalize_metrics(&m)
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    out.extend(pair_metrics(rewards.values().map(|(_, s)| s.as_slice())));
    // Per source too when sources are mixed: their preferences can pull apart (e.g. a length
    // preference of opposite sign), which the pooled figure hides.
    let sources: std::collections::BTreeSet<&str> = rewards.values().map(|(s, _)| *s).collect();
    if sources.len() > 1 {
        for source in sources {
            let of_source = rewards.values().filter(|(s, _)| *s == source);
            for (k, v) in pair_metrics(of_source.map(|(_, s)| s.as_slice())) {
                out.insert(format!("{k}/{source}"), v);
            }
        }
    }
    Ok(Some(out))
}

/// One validation example's implicit reward and what it is compared with.
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    /// The stated comparison it is a side of (`KtoExample::pair`); None when unpaired.
    pub pair: Option<u32>,
    pub desirable: bool,
    pub reward: f64,
}

/// Reward differences (preferred minus other) of one prompt's comparisons: each stated pair with
/// both sides present, then every desirable against every undesirable unpaired example.
fn comparisons(scored: &[Scored]) -> Vec<f64> {
    let side = |k: u32, desirable: bool| {
        scored
            .iter()
            .find(|s| s.pair == Some(k) && s.desirable == desirable)
    };
    let mut stated: Vec<u32> = scored.iter().filter_map(|s| s.pair).collect();
    stated.sort_unstable();
    stated.dedup();
    let mut out: Vec<f64> = stated
        .into_iter()
        .filter_map(|k| Some(side(k, true)?.reward - side(k, false)?.reward))
        .collect();
    let unpaired = |desirable: bool| {
        scored
            .iter()
            .filter(move |s| s.pair.is_none() && s.desirable == desirable)
    };
    for d in unpaired(true) {
        out.extend(unpaired(false).map(|u| d.reward - u.reward));
    }
    out
}

/// `eval_pair_accuracy`, `eval_pair_margin`, their `_stderr`s and `eval_pairs` over the
/// comparisons of every prompt (one slice of scored examples per interaction); nothing when
/// there is none.
pub fn pair_metrics<'a>(interactions: impl Iterator<Item = &'a [Scored]>) -> BTreeMap<String, f64> {
    let groups: Vec<Vec<f64>> = interactions
        .map(comparisons)
        .filter(|g| !g.is_empty())
        .collect();
    let mut out = BTreeMap::new();
    if groups.is_empty() {
        return out;
    }
    let right = |m: &f64| match m.partial_cmp(&0.0) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Equal) => 0.5,
        _ => 0.0,
    };
    let accuracy: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| g.iter().map(right).collect())
        .collect();
    for (name, xs) in [("accuracy", &accuracy), ("margin", &groups)] {
        let (mean, se) = clustered_mean_stderr(xs);
        out.insert(format!("eval_pair_{name}"), mean);
        out.insert(format!("eval_pair_{name}_stderr"), se);
    }
    let n: usize = groups.iter().map(Vec::len).sum();
    out.insert("eval_pairs".into(), n as f64);
    out
}

/// Mean over all values and its cluster-robust standard error, the clusters being the groups:
/// se^2 = G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2 / n^2, which is the ordinary
/// s / sqrt(n) when every group holds one value; 0 for a single group.
fn clustered_mean_stderr(groups: &[Vec<f64>]) -> (f64, f64) {
    let n: usize = groups.iter().map(Vec::len).sum();
    let mean = groups.iter().flatten().sum::<f64>() / n as f64;
    let g = groups.len() as f64;
    if groups.len() < 2 {
        return (mean, 0.0);
    }
    let spread: f64 = groups
        .iter()
        .map(|xs| xs.iter().map(|x| x - mean).sum::<f64>().powi(2))
        .sum();
    let var = g / (g - 1.0) * spread / (n as f64).powi(2);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pair: Option<u32>, desirable: bool, reward: f64) -> Scored {
        Scored {
            pair,
            desirable,
            reward,
        }
    }

    #[test]
    fn stated_pairs_count_once_each() {
        // Replies ranked A > B > C give the comparisons (A,B), (A,C), (B,C): A desirable twice,
        // B on both sides, C undesirable twice. Three comparisons, not the 3 x 3 desirable x
        // undesirable products (which would include B against itself).
        let (a, b, c) = (0.3, 0.5, 0.1);
        let tree = [
            s(Some(0), true, a),
            s(Some(0), false, b),
            s(Some(1), true, a),
            s(Some(1), false, c),
            s(Some(2), true, b),
            s(Some(2), false, c),
        ];
        let m = pair_metrics([&tree[..]].into_iter());
        assert_eq!(m["eval_pairs"], 3.0);
        assert!((m["eval_pair_accuracy"] - 2.0 / 3.0).abs() < 1e-12);
        let margin = ((a - b) + (a - c) + (b - c)) / 3.0;
        assert!((m["eval_pair_margin"] - margin).abs() < 1e-12);
        // A comparison whose other side is missing (dropped for length) does not count.
        let half = [s(Some(0), true, 1.0), s(Some(1), false, 0.0)];
        assert!(pair_metrics([&half[..]].into_iter()).is_empty());
    }

    #[test]
    fn unpaired_records_compare_desirable_with_undesirable() {
        let one = [s(None, true, 0.3), s(None, false, 0.1), s(None, false, 0.5)];
        let tie = [s(None, true, 0.0), s(None, false, 0.0)];
        let alone = [s(None, true, 1.0)];
        let m = pair_metrics([&one[..], &tie[..], &alone[..]].into_iter());
        assert_eq!(m["eval_pairs"], 3.0);
        assert!(
            (m["eval_pair_accuracy"] - 0.5).abs() < 1e-12,
            "(1 + 0 + 0.5) / 3"
        );
        assert!((m["eval_pair_margin"] - (0.2 - 0.2 + 0.0) / 3.0).abs() < 1e-12);
        // Clusters {1, 0} and {0.5} around the mean 0.5: sums 0 and 0, so the clustered se is 0
        // (the ordinary se would be 0.5 / sqrt(3)).
        assert!(m["eval_pair_accuracy_stderr"].abs() < 1e-12);
        assert!(pair_metrics([&alone[..]].into_iter()).is_empty());
    }

    #[test]
    fn clustered_stderr_is_the_ordinary_one_for_singletons_and_widens_for_clusters() {
        let xs = [1.0, 0.0, 0.5, 0.25];
        let singles: Vec<Vec<f64>> = xs.iter().map(|&x| vec![x]).collect();
        let mean = xs.iter().sum::<f64>() / 4.0;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        let (m, se) = clustered_mean_stderr(&singles);
        assert!((m - mean).abs() < 1e-12 && (se - sd / 2.0).abs() < 1e-12);
        // Duplicating every value inside its cluster leaves the mean and doubles nothing but n:
        // the clustered se stays that of the four clusters, where the naive se would shrink.
        let doubled: Vec<Vec<f64>> = xs.iter().map(|&x| vec![x, x]).collect();
        let (m2, se2) = clustered_mean_stderr(&doubled);
        assert!((m2 - mean).abs() < 1e-12 && (se2 - se).abs() < 1e-12);
    }
}
