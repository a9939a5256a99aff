//! Micro-batches as TRL builds them: KL completions are the batch's completions rotated by one
//! (example i gets example i-1's, example 0 the last one's), taken before truncation; then every
//! prompt + completion is cut to max_length from the end.
use crate::data::KtoExample;
use crate::model::logprobs::Sequence;

#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub seqs: Vec<Sequence>,
    /// Mismatched pairs (prompt i, completion i-1) for the KL reference point.
    pub kl_seqs: Option<Vec<Sequence>>,
    pub labels: Vec<bool>,
}

impl MicroBatch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows `r` (sequences, their KL pairs and labels): one rank's share of a global micro-batch
    /// whose KL pairs were formed over the whole of it.
    pub fn rows(&self, r: std::ops::Range<usize>) -> MicroBatch {
        MicroBatch {
            seqs: self.seqs[r.clone()].to_vec(),
            kl_seqs: self.kl_seqs.as_ref().map(|k| k[r.clone()].to_vec()),
            labels: self.labels[r].to_vec(),
        }
    }

    /// Prompt + completion tokens of the main sequences (what one policy pass processes).
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// prompt ++ completion, cut to `max_length` tokens from the end.
pub fn join_truncated(prompt: &[u32], completion: &[u32], max_length: usize) -> Sequence {
    let mut tokens: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    tokens.truncate(max_length);
    Sequence {
        prompt_len: prompt.len().min(tokens.len()),
        tokens,
    }
}

pub fn build_micro_batch(examples: &[&KtoExample], max_length: usize, with_kl: bool) -> MicroBatch {
    let n = examples.len();
    let seqs = examples
        .iter()
        .map(|e| join_truncated(&e.prompt_ids, &e.completion_ids, max_length))
        .collect();
    let kl_seqs = with_kl.then(|| {
        (0..n)
            .map(|i| {
                let donor = examples[(i + n - 1) % n];
                join_truncated(&examples[i].prompt_ids, &donor.completion_ids, max_length)
            })
            .collect()
    });
    MicroBatch {
        seqs,
        kl_seqs,
        labels: examples.iter().map(|e| e.label).collect(),
    }
}
