//! Seeds and orders: per-source shuffles, the split, and each epoch's example order.
use super::KtoExample;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::util::hash::{fnv1a, splitmix64};

/// An RNG for one purpose (`what`, e.g. "order/hh-rlhf"), derived from the run seed, so that one
/// source's order does not change when another source is added.
pub fn rng_for(seed: u64, what: &str, n: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix64(splitmix64(seed ^ fnv1a(what.as_bytes())) ^ n))
}

/// An epoch's order under `train.data_order` ([`epoch_order`] for `balanced`).
pub fn epoch_order_for(
    order: crate::config::DataOrder,
    examples: &[KtoExample],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    use crate::config::DataOrder;
    match order {
        DataOrder::Balanced => epoch_order(examples, batch_size, seed, epoch),
        DataOrder::Shuffled => {
            let mut perm: Vec<usize> = (0..examples.len()).collect();
            perm.shuffle(&mut rng_for(seed, "epoch_order", epoch));
            perm
        }
        DataOrder::Sequential => (0..examples.len()).collect(),
    }
}

/// The order in which one epoch feeds examples into micro-batches of `batch_size`.
///
/// Start from a seeded permutation, then fill each micro-batch greedily from the front of the
/// remaining examples with the first one whose interaction is not yet in the batch (so that the
/// KL completions, rotated within the batch, never come from the same prompt) and, for the last
/// slot of a batch holding one label only, the first one of the other label. Where no such
/// example is in reach (few interactions, one label left) the constraint is relaxed rather than
/// reordering the whole tail. The lookahead is bounded, so the cost stays linear.
pub fn epoch_order(
    examples: &[KtoExample],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let n = examples.len();
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng_for(seed, "epoch_order", epoch));
    if batch_size < 2 || n < 2 {
        return perm;
    }
    let window = (64 * batch_size).max(256);
    let mut taken = vec![false; n];
    let mut remaining = [0usize; 2];
    for e in examples {
        remaining[e.label as usize] += 1;
    }
    let mut head = 0;
    let mut out = Vec::with_capacity(n);
    let mut batch_inter: Vec<u64> = Vec::with_capacity(batch_size);
    while out.len() < n {
        let size = batch_size.min(n - out.len());
        batch_inter.clear();
        let mut has = [false; 2];
        for slot in 0..size {
            while taken[perm[head]] {
                head += 1;
            }
            let need_label = if slot + 1 == size && has[0] != has[1] {
                let missing = if has[0] { 1 } else { 0 };
                (remaining[missing] > 0).then_some(missing == 1)
            } else {
                None
            };
            let mut pick = None;
            let mut fallback = None;
            let mut seen = 0;
            let mut k = head;
            while k < n && seen < window {
                let i = perm[k];
                k += 1;
                if taken[i] {
                    continue;
                }
                seen += 1;
                if batch_inter.contains(&examples[i].interaction) {
                    continue;
                }
                if need_label.is_none_or(|l| examples[i].label == l) {
                    pick = Some(i);
                    break;
                }
                fallback.get_or_insert(i);
            }
            let i = pick.or(fallback).unwrap_or(perm[head]);
            taken[i] = true;
            remaining[examples[i].label as usize] -= 1;
            has[examples[i].label as usize] = true;
            batch_inter.push(examples[i].interaction);
            out.push(i);
        }
    }
    out
}
