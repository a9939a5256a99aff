//! Selection per source (seeded order, cap), round-robin mixing and the train/validation split.
use super::order::rng_for;
use rand::seq::SliceRandom;

/// Interleaves the sources one interaction at a time (source 0, 1, 2, 0, 1, 2, ...); a source
/// that has run out is passed over. Returns (source, index within source).
pub(crate) fn round_robin(counts: &[usize]) -> Vec<(usize, usize)> {
    let longest = counts.iter().copied().max().unwrap_or(0);
    let mut out = Vec::with_capacity(counts.iter().sum());
    for r in 0..longest {
        for (s, &n) in counts.iter().enumerate() {
            if r < n {
                out.push((s, r));
            }
        }
    }
    out
}

/// Which of a source's `n` interactions go to validation: round(fraction * n) of them, chosen by
/// a seeded shuffle; at least one stays in train.
pub(crate) fn validation_set(n: usize, fraction: f64, seed: u64, source: &str) -> Vec<bool> {
    let want = ((fraction * n as f64).round() as usize).min(n.saturating_sub(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng_for(seed, &format!("split/{source}"), 0));
    let mut val = vec![false; n];
    idx.iter().take(want).for_each(|&i| val[i] = true);
    val
}

/// A source's interactions in seeded order: positions into its parsed list.
pub(crate) fn source_order(n: usize, seed: u64, source: &str) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng_for(seed, &format!("order/{source}"), 0));
    idx
}
