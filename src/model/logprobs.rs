//! Sequence log-probs over completion tokens: the one computation that training, evaluation and
//! `kto-train score` share.
use super::lora::Forward;
use super::Llama;
use candle_core::{DType, Result, Tensor, D};

/// One prompt + completion token sequence (already cut to max_length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

impl Sequence {
    /// Positions t whose token is scored: completion tokens that have a context (t >= 1).
    pub fn scored_positions(&self) -> std::ops::Range<usize> {
        self.prompt_len.max(1).min(self.tokens.len())..self.tokens.len()
    }

    pub fn n_scored(&self) -> usize {
        self.scored_positions().len()
    }
}

pub struct CompletionLogps {
    /// [B] sums of completion-token log-probs (attached to the graph when LoRA weights need it).
    pub sums: Tensor,
    /// [N] every scored token's log-prob, sequences one after another.
    pub token_logps: Tensor,
    /// Scored tokens per sequence.
    pub counts: Vec<usize>,
    /// Per sequence: the sum of raw logits over its scored positions and the whole vocabulary
    /// (TRL's `logits/chosen` metric pools these), when asked for.
    pub logit_sums: Option<Vec<f64>>,
}

/// Log-probs of every sequence's completion tokens under `fwd` (policy or reference).
/// Logits are computed only at the scored positions.
pub fn completion_logps(
    model: &Llama,
    seqs: &[Sequence],
    fwd: Forward,
    want_logit_sums: bool,
) -> Result<CompletionLogps> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        candle_core::bail!("completion_logps: empty batch");
    }
    let mut ids = vec![0u32; b * t];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut counts = Vec::with_capacity(b);
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.tokens.len()].copy_from_slice(&s.tokens);
        let pos = s.scored_positions();
        counts.push(pos.len());
        for p in pos {
            rows.push((i * t + p - 1) as u32);
            targets.push(s.tokens[p]);
        }
    }
    let dev = &model.device;
    let n = rows.len();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let hidden = model.hidden_states(&ids, fwd)?;
    if n == 0 {
        let zeros = Tensor::zeros(b, model.dtype, dev)?;
        return Ok(CompletionLogps {
            sums: zeros,
            token_logps: Tensor::zeros(0, model.dtype, dev)?,
            counts,
            logit_sums: want_logit_sums.then(|| vec![0.0; b]),
        });
    }
    let h = hidden.dim(D::Minus1)?;
    let rows_t = Tensor::from_vec(rows, n, dev)?;
    let sel = hidden.reshape((b * t, h))?.index_select(&rows_t, 0)?;
    let logits = model.logits(&sel)?;
    let logit_sums = if want_logit_sums {
        let per_row: Vec<f64> = logits
            .detach()
            .to_dtype(DType::F64)?
            .sum(D::Minus1)?
            .to_vec1()?;
        let mut out = Vec::with_capacity(b);
        let mut k = 0;
        for c in &counts {
            out.push(per_row[k..k + c].iter().sum());
            k += c;
        }
        Some(out)
    } else {
        None
    };
    let token_logps = if model.use_fused_ops && super::fused::available(&logits) {
        super::fused::log_softmax_gather(&logits, &Tensor::from_vec(targets, n, dev)?)?
    } else {
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::from_vec(targets, (n, 1), dev)?;
        lsm.gather(&targets, 1)?.squeeze(1)?
    };
    // Per-sequence sums as one small matmul with a 0/1 segment matrix (differentiable).
    let mut seg = vec![0f32; b * n];
    let mut k = 0;
    for (i, c) in counts.iter().enumerate() {
        for j in k..k + c {
            seg[i * n + j] = 1.0;
        }
        k += c;
    }
    let seg = Tensor::from_vec(seg, (b, n), dev)?.to_dtype(model.dtype)?;
    let sums = seg.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?;
    Ok(CompletionLogps {
        sums,
        token_logps,
        counts,
        logit_sums,
    })
}
