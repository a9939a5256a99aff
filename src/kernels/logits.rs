//! Token log-probs through the output layer without holding the whole [n, vocab] logits.
//!
//! log softmax(h W^T)[target] per row needs the logits of every vocabulary entry, n x 49,152
//! values for SmolLM2: 100 MB in f32 for 512 scored tokens, 805 MB for 2 x 2,048. The plain
//! graph keeps them for the backward, next to their gradient of the same size. Here the rows
//! run in chunks: the forward keeps only each row's log-prob (and, when asked, its logit sum),
//! and the backward recomputes a chunk's logits from the saved hidden rows, turns them into
//! dlogits and the input gradient dh = dlogits W, and drops them before the next chunk. The
//! cost is one more output-layer product per gradient pass; [`chunked_rows`] takes this path
//! only where the logits are large ([`LOGITS_KEEP_ENV`]).
//!
//! Every chunk runs the same ops as the plain path ([`products::frozen_linear`],
//! [`fused::log_softmax_gather`] and its gradient, [`products::frozen_linear_input_grad`]), so
//! a row's values are the plain path's wherever a product's rows do not depend on how many rows
//! it has (the built-in bf16 kernels, whose blocking over k is fixed), and otherwise differ only
//! in the rounding of the sums.
use super::{fused, products, GemmMode};
use crate::util::env::MibSetting;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Logits above this many MiB (`KTO_TRAIN_LOGITS_KEEP_MB`, default 64) are computed in row
/// chunks and recomputed in the backward instead of being kept.
pub const LOGITS_KEEP_ENV: &str = "KTO_TRAIN_LOGITS_KEEP_MB";
/// The most bytes of one chunk's logits.
const CHUNK_BYTES: usize = 32 << 20;

static KEEP: MibSetting = MibSetting::new(LOGITS_KEEP_ENV, 64);

/// Sets the threshold for this process (0: every pass in chunks), as [`LOGITS_KEEP_ENV`] does
/// at start.
pub fn set_keep_mb(mb: usize) {
    KEEP.set_mb(mb);
}

static PASSES: AtomicUsize = AtomicUsize::new(0);

/// Passes for which [`chunked_rows`] chose chunks so far in this process.
pub fn chunked_passes() -> usize {
    PASSES.load(Ordering::Relaxed)
}

/// Rows per chunk when `n` rows of `vocab` f32 logits are too many to keep (`None`: keep them,
/// or the chunked op does not apply to `hidden`: not a CPU f32 tensor).
pub fn chunked_rows(hidden: &Tensor, n: usize, vocab: usize) -> Option<usize> {
    let applies = hidden.device().is_cpu() && hidden.dtype() == DType::F32;
    let bytes = n * vocab * 4;
    let keep = KEEP.bytes();
    // Chunks of at most half the threshold (one row each at threshold 0).
    if !applies || bytes <= keep {
        return None;
    }
    PASSES.fetch_add(1, Ordering::Relaxed);
    Some((CHUNK_BYTES.min(keep / 2) / (vocab * 4)).max(1))
}

/// Log-probs [n] of `targets` (u32 [n]) under logits `hidden` [n, h] x `w`^T (`w` [vocab, h],
/// frozen), `chunk` rows at a time, attached to `hidden`'s graph; with `logit_sums`, also each
/// row's sum of logits over the vocabulary (f64, detached).
pub fn token_logps(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    gemm: GemmMode,
    chunk: usize,
    logit_sums: bool,
) -> Result<(Tensor, Option<Vec<f64>>)> {
    let chunk = chunk.max(1);
    let hidden = hidden.contiguous()?;
    let n = hidden.dim(0)?;
    let detached = hidden.detach();
    let mut lps = Vec::new();
    let mut sums = logit_sums.then(|| Vec::with_capacity(n));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = products::frozen_linear(&detached.narrow(0, start, len)?, w, gemm)?;
        lps.push(fused::log_softmax_gather(
            &logits,
            &targets.narrow(0, start, len)?,
        )?);
        if let Some(s) = sums.as_mut() {
            s.extend(row_sums(&logits)?);
        }
    }
    let lp = Tensor::cat(&lps, 0)?;
    let op = ChunkedLogps {
        w: w.clone(),
        targets: targets.contiguous()?,
        gemm,
        chunk,
    };
    Ok((hidden.apply_op2(&lp, op)?, sums))
}

/// Each row's sum of `logits` [n, vocab] in f64 (detached): the metrics' logit sums, the same
/// whether the logits are whole or a chunk of rows.
pub fn row_sums(logits: &Tensor) -> Result<Vec<f64>> {
    logits
        .detach()
        .to_dtype(DType::F64)?
        .sum(D::Minus1)?
        .to_vec1()
}

/// Attaches log-probs computed outside the graph to the hidden rows they came from; the
/// backward recomputes them chunk by chunk.
struct ChunkedLogps {
    w: Tensor,
    targets: Tensor,
    gemm: GemmMode,
    chunk: usize,
}

impl CustomOp2 for ChunkedLogps {
    fn name(&self) -> &'static str {
        "chunked-output-logps"
    }

    /// The log-probs themselves (`s2`, computed by [`token_logps`]).
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let lp = match s2 {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("chunked output log-probs: f32 only"),
        };
        let (a, b) = l2
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("chunked output log-probs: layout".into()))?;
        Ok((CpuStorage::F32(lp[a..b].to_vec()), l2.shape().clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        _lp: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::util::profile::phase("output layer recomputed in the backward");
        let hidden = hidden.detach();
        let n = hidden.dim(0)?;
        let mut dh = Vec::new();
        for start in (0..n).step_by(self.chunk) {
            let len = self.chunk.min(n - start);
            let logits =
                products::frozen_linear(&hidden.narrow(0, start, len)?, &self.w, self.gemm)?;
            let dlogits = fused::log_softmax_gather_grad(
                &logits,
                &self.targets.narrow(0, start, len)?,
                &grad.narrow(0, start, len)?,
            )?;
            // Freed before the input-gradient product: one chunk's logits live at a time.
            drop(logits);
            dh.push(products::frozen_linear_input_grad(
                &dlogits, &self.w, self.gemm,
            )?);
        }
        Ok((Some(Tensor::cat(&dh, 0)?), None))
    }
}
