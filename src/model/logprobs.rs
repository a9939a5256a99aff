//! Sequence log-probs over completion tokens: the one computation that training, evaluation and
//! `kto-train score` share.
use super::llama::{LayerKv, PrefixAt, Segment};
use super::pass::PassMode;
use super::Llama;
use crate::kernels::{self, fused};
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

/// Log-probs of every sequence's completion tokens under `pass` (policy or reference).
/// Logits are computed only at the scored positions.
pub fn completion_logps(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    want_logit_sums: bool,
) -> Result<CompletionLogps> {
    Ok(run(model, seqs, pass, want_logit_sums, false)?.0)
}

/// What a pass computed for its rows' positions (each layer's keys and values, with the rows'
/// tokens): a later pass over sequences that start with the same tokens reuses it instead of
/// recomputing those positions (the KL pass shares its prompts with the batch's examples).
pub struct PrefixStates {
    /// Per row, per layer: keys, values [1, kv_heads, T, head_dim].
    kv: Vec<LayerStates>,
    tokens: Vec<Vec<u32>>,
}

impl PrefixStates {
    /// Leading positions of `seq` whose states row `row` holds and that `seq` may take from it:
    /// the shared token prefix, short of the position before the first scored token (whose
    /// hidden state the logits need).
    pub fn reusable(&self, row: usize, seq: &Sequence) -> usize {
        reusable_prefix(&self.tokens[row], seq)
    }
}

/// Leading positions of `seq` that a pass over `tokens` computed as `seq` needs them: the shared
/// token prefix, short of the position before the first scored token.
fn reusable_prefix(tokens: &[u32], seq: &Sequence) -> usize {
    let shared = tokens
        .iter()
        .zip(&seq.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    shared.min(seq.scored_positions().start.saturating_sub(1))
}

/// [`completion_logps`], also returning the pass's [`PrefixStates`].
pub fn completion_logps_capturing(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    want_logit_sums: bool,
) -> Result<(CompletionLogps, PrefixStates)> {
    let (out, kv) = run(model, seqs, pass, want_logit_sums, true)?;
    let tokens = seqs.iter().map(|s| s.tokens.clone()).collect();
    Ok((
        out,
        PrefixStates {
            kv: kv.expect("captured"),
            tokens,
        },
    ))
}

/// Completion log-prob sums (detached) of `seqs` under `pass`, where sequence i takes the
/// positions it shares with row `rows[i]` of `prefix` from there and computes only the rest.
/// Sequences with no row, or nothing to share, get a full pass. The values equal
/// [`completion_logps`]' up to rounding (and, with dropout, up to which mask the shared
/// positions saw).
pub fn completion_logp_sums_after(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    prefix: &PrefixStates,
    rows: &[Option<usize>],
) -> Result<Vec<f64>> {
    let mut sums = vec![0.0; seqs.len()];
    let mut full = Vec::new();
    // (sequence, prefix row, positions taken from it)
    let mut after = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        // With dynamic rope the frequencies depend on the pass's length: a shorter pass's states
        // are not those of the longer one.
        let length_bound = model.cfg().rope_scaling.depends_on_length();
        let (row, reuse) = match rows[i] {
            Some(r) if !length_bound => (r, prefix.reusable(r, seq)),
            _ => (0, 0),
        };
        if reuse == 0 || seq.n_scored() == 0 {
            full.push(i);
        } else {
            after.push((i, row, reuse));
        }
    }
    if after.len() > 1 && model.can_pack(pass) {
        for (&(i, _, _), v) in after
            .iter()
            .zip(sums_packed_after(model, seqs, pass, prefix, &after)?)
        {
            sums[i] = v;
        }
    } else {
        for &(i, row, reuse) in &after {
            sums[i] = sum_after(model, &seqs[i], pass, prefix, row, reuse)?;
        }
    }
    if !full.is_empty() {
        let sub: Vec<Sequence> = full.iter().map(|&i| seqs[i].clone()).collect();
        let got: Vec<f64> = completion_logps(model, &sub, pass, false)?
            .sums
            .detach()
            .to_dtype(DType::F64)?
            .to_vec1()?;
        for (&i, v) in full.iter().zip(got) {
            sums[i] = v;
        }
    }
    Ok(sums)
}

/// The completion log-prob sum of `seq`, whose first `reuse` positions are row `row` of `prefix`.
fn sum_after(
    model: &Llama,
    seq: &Sequence,
    pass: PassMode,
    prefix: &PrefixStates,
    row: usize,
    reuse: usize,
) -> Result<f64> {
    let kv = prefix.kv[row]
        .iter()
        .map(|(k, v)| Ok((k.narrow(2, 0, reuse)?, v.narrow(2, 0, reuse)?)))
        .collect::<Result<Vec<_>>>()?;
    let rest = &seq.tokens[reuse..];
    let ids = Tensor::from_vec(rest.to_vec(), (1, rest.len()), model.device())?;
    let hidden = model.hidden_states_after(&ids, pass, &kv)?;
    let pos = seq.scored_positions();
    let rows: Vec<u32> = pos.clone().map(|p| (p - 1 - reuse) as u32).collect();
    let targets: Vec<u32> = pos.map(|p| seq.tokens[p]).collect();
    let h = hidden.dim(D::Minus1)?;
    let logps = token_logps(
        model,
        &hidden.reshape((rest.len(), h))?,
        rows,
        targets,
        false,
    )?
    .0;
    logps.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()
}

/// [`sum_after`] for several sequences in one pass
/// ([`Llama::hidden_states_packed_with_prefixes`]): the KL passes' continuations are short (a
/// completion each), and one product over all of them runs faster than one per sequence. `after`: (sequence, prefix row, positions reused).
fn sums_packed_after(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    prefix: &PrefixStates,
    after: &[(usize, usize, usize)],
) -> Result<Vec<f64>> {
    let layers = prefix.kv.first().map_or(0, |r| r.len());
    let mut kv = Vec::with_capacity(layers);
    for l in 0..layers {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for &(_, row, reuse) in after {
            let (k, v) = &prefix.kv[row][l];
            ks.push(k.narrow(2, 0, reuse)?);
            vs.push(v.narrow(2, 0, reuse)?);
        }
        kv.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
    }
    let mut pack = Packing::default();
    let mut given = 0;
    for &(i, _, reuse) in after {
        pack.push(&seqs[i], reuse, PrefixAt::Given(given));
        given += reuse;
    }
    pack.sums(model, pass, Some(&kv[..]))
}

/// Sequences packed into one pass, each possibly after a prefix ([`Segment`]), with the rows
/// that predict their scored tokens.
#[derive(Default)]
struct Packing {
    ids: Vec<u32>,
    segments: Vec<Segment>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    counts: Vec<usize>,
}

impl Packing {
    /// Adds `seq`, whose first `reuse` positions are states at `prefix`; returns where its
    /// tokens start in the pass.
    fn push(&mut self, seq: &Sequence, reuse: usize, prefix: PrefixAt) -> usize {
        let start = self.ids.len();
        let pos = seq.scored_positions();
        self.counts.push(pos.len());
        for p in pos {
            self.rows.push((start + p - 1 - reuse) as u32);
            self.targets.push(seq.tokens[p]);
        }
        self.ids.extend_from_slice(&seq.tokens[reuse..]);
        self.segments.push(Segment {
            len: seq.tokens.len() - reuse,
            offset: reuse,
            prefix,
        });
        start
    }

    /// Each sequence's completion log-prob sum (f64, detached), in the order pushed.
    fn sums(self, model: &Llama, pass: PassMode, prefix: Option<&[LayerKv]>) -> Result<Vec<f64>> {
        PACKED_CONTINUATIONS.with(|c| c.set(c.get() + 1));
        let total = self.ids.len();
        let ids = Tensor::from_vec(self.ids, (1, total), model.device())?;
        let hidden =
            model.hidden_states_packed_with_prefixes(&ids, pass, &self.segments, prefix)?;
        let h = hidden.dim(D::Minus1)?;
        let hidden = hidden.reshape((total, h))?;
        let logps = token_logps(model, &hidden, self.rows, self.targets, false)?.0;
        let logps: Vec<f64> = logps.to_dtype(DType::F64)?.to_vec1()?;
        let mut out = Vec::with_capacity(self.counts.len());
        let mut k = 0;
        for c in self.counts {
            out.push(logps[k..k + c].iter().sum());
            k += c;
        }
        Ok(out)
    }
}

/// Completion log-prob sums (detached) of `seqs` and of `conts` under `pass` (no gradient), where
/// continuation i shares its leading tokens (a prompt) with row `rows[i]` of `seqs`: where
/// packing applies, in one pass, each continuation reusing that row's states for the shared
/// positions computed in the same pass (the reference passes of a micro-batch: its examples and
/// their KL sequences); elsewhere as [`completion_logps_capturing`] then
/// [`completion_logp_sums_after`].
pub fn completion_logp_sums_with_continuations(
    model: &Llama,
    seqs: &[Sequence],
    conts: &[Sequence],
    rows: &[Option<usize>],
    pass: PassMode,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if seqs.is_empty() && conts.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let empty = seqs.iter().chain(conts).any(|s| s.tokens.is_empty());
    if empty || pass.grad || !model.can_pack(pass) || model.cfg().rope_scaling.depends_on_length() {
        let f64s = |t: &Tensor| -> Result<Vec<f64>> { t.detach().to_dtype(DType::F64)?.to_vec1() };
        if seqs.is_empty() {
            let kl = completion_logps(model, conts, pass, false)?;
            return Ok((Vec::new(), f64s(&kl.sums)?));
        }
        let (out, states) = completion_logps_capturing(model, seqs, pass, false)?;
        let kl = if conts.is_empty() {
            Vec::new()
        } else {
            completion_logp_sums_after(model, conts, pass, &states, rows)?
        };
        return Ok((f64s(&out.sums)?, kl));
    }
    let mut pack = Packing::default();
    let starts: Vec<usize> = seqs
        .iter()
        .map(|s| pack.push(s, 0, PrefixAt::Given(0)))
        .collect();
    for (c, row) in conts.iter().zip(rows) {
        let reuse = row.map_or(0, |r| reusable_prefix(&seqs[r].tokens, c));
        let at = row.map_or(0, |r| starts[r]);
        pack.push(c, reuse, PrefixAt::InPass(at));
    }
    let mut sums = pack.sums(model, pass, None)?;
    let kl = sums.split_off(seqs.len());
    Ok((sums, kl))
}

thread_local! {
    static PACKED_CONTINUATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Passes so far on this thread that ran sequences' continuations packed into one
/// ([`completion_logp_sums_after`], [`completion_logp_sums_with_continuations`]), for tests that
/// must know the packed path ran (per thread: tests run side by side).
pub fn packed_continuations() -> usize {
    PACKED_CONTINUATIONS.with(|c| c.get())
}

/// Log-probs [n] of `targets` at hidden rows `rows` of `hidden` [N, h], and with
/// `want_logit_sums` each row's sum of logits over the vocabulary. Where the [n, vocab] logits
/// are large, they run in row chunks and are recomputed in the backward instead of kept
/// ([`kernels::logits`]).
fn token_logps(
    model: &Llama,
    hidden: &Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
    want_logit_sums: bool,
) -> Result<(Tensor, Option<Vec<f64>>)> {
    let dev = model.device();
    let n = rows.len();
    let sel = hidden.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let targets = Tensor::from_vec(targets, n, dev)?;
    let vocab = model.lm_head().dim(0)?;
    if model.kernels().fused_ops {
        if let Some(chunk) = kernels::logits::chunked_rows(&sel, n, vocab) {
            let gemm = model.kernels().gemm;
            return kernels::logits::token_logps(
                &sel,
                model.lm_head(),
                &targets,
                gemm,
                chunk,
                want_logit_sums,
            );
        }
    }
    let logits = model.logits(&sel)?;
    let lp = if model.kernels().fused_ops && fused::available(&logits) {
        fused::log_softmax_gather(&logits, &targets)?
    } else {
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?
    };
    let sums = if want_logit_sums {
        Some(kernels::logits::row_sums(&logits)?)
    } else {
        None
    };
    Ok((lp, sums))
}

/// Per layer: keys and values [rows, kv_heads, T, head_dim].
type LayerStates = Vec<(Tensor, Tensor)>;
/// Per row: its [`LayerStates`] with rows = 1.
type Captured = Option<Vec<LayerStates>>;

/// One padded batch when the sequences are equally long (or not on a CPU, where batching pays
/// more than padding costs). Otherwise no position is padding (a CPU pass costs what its tokens
/// cost; padding the shorter sequence to the longer one would add those positions' whole work,
/// more with attention, quadratic in length): the sequences packed into one row, each attending
/// within itself ([`Llama::hidden_states_packed`]: one product per projection over all the
/// tokens instead of one per sequence; 1.05-1.10x the examples/s of one pass per sequence on
/// real data with the AMX bf16 kernel, 1.13-1.20x in f32 on an AVX2 CPU, `KTO_TRAIN_PACK=0`
/// back to back), or where packing does not apply
/// ([`Llama::can_pack`]), one pass per sequence.
fn run(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    want_logit_sums: bool,
    capture: bool,
) -> Result<(CompletionLogps, Captured)> {
    let same_len = seqs
        .windows(2)
        .all(|w| w[0].tokens.len() == w[1].tokens.len());
    if same_len || !model.device().is_cpu() {
        let (out, kv) = run_padded(model, seqs, pass, want_logit_sums, capture)?;
        let kv = match kv {
            None => None,
            Some(layers) => Some(
                (0..seqs.len())
                    .map(|i| {
                        layers
                            .iter()
                            .map(|(k, v)| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        return Ok((out, kv));
    }
    if model.can_pack(pass) {
        return run_packed(model, seqs, pass, want_logit_sums, capture);
    }
    let mut sums = Vec::with_capacity(seqs.len());
    let mut token_logps = Vec::with_capacity(seqs.len());
    let mut counts = Vec::with_capacity(seqs.len());
    let mut logit_sums = want_logit_sums.then(Vec::new);
    let mut kv = capture.then(Vec::new);
    for seq in seqs {
        let (out, k) = run_padded(
            model,
            std::slice::from_ref(seq),
            pass,
            want_logit_sums,
            capture,
        )?;
        sums.push(out.sums);
        token_logps.push(out.token_logps);
        counts.extend(out.counts);
        if let (Some(all), Some(one)) = (logit_sums.as_mut(), out.logit_sums) {
            all.extend(one);
        }
        if let (Some(all), Some(one)) = (kv.as_mut(), k) {
            all.push(one);
        }
    }
    let out = CompletionLogps {
        sums: Tensor::cat(&sums, 0)?,
        token_logps: Tensor::cat(&token_logps, 0)?,
        counts,
        logit_sums,
    };
    Ok((out, kv))
}

fn run_padded(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    want_logit_sums: bool,
    capture: bool,
) -> Result<(CompletionLogps, Option<LayerStates>)> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        candle_core::bail!("completion_logps: empty batch");
    }
    let mut ids = vec![0u32; b * t];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.tokens.len()].copy_from_slice(&s.tokens);
    }
    let (rows, targets, counts) = scored_rows(seqs, |i| i * t);
    let dev = model.device();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let (hidden, kv) = if capture {
        let (h, kv) = model.hidden_states_capturing(&ids, pass)?;
        (h, Some(kv))
    } else {
        (model.hidden_states(&ids, pass)?, None)
    };
    let out = finish(model, &hidden, rows, targets, counts, want_logit_sums)?;
    Ok((out, kv))
}

/// The rows of a pass's hidden states that predict each sequence's scored tokens (sequence i's
/// position 0 at row `start(i)`), those tokens, and how many each sequence has.
fn scored_rows(
    seqs: &[Sequence],
    start: impl Fn(usize) -> usize,
) -> (Vec<u32>, Vec<u32>, Vec<usize>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut counts = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        let pos = s.scored_positions();
        counts.push(pos.len());
        for p in pos {
            rows.push((start(i) + p - 1) as u32);
            targets.push(s.tokens[p]);
        }
    }
    (rows, targets, counts)
}

/// Each sequence's completion log-probs (their sum attached to the graph) from the pass's hidden
/// states `hidden` [.., h] (its rows in order), where the sequences' scored tokens are
/// `targets`, predicted at rows `rows`, `counts` of them per sequence in order.
fn finish(
    model: &Llama,
    hidden: &Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
    counts: Vec<usize>,
    want_logit_sums: bool,
) -> Result<CompletionLogps> {
    let dev = model.device();
    let (b, n) = (counts.len(), rows.len());
    if n == 0 {
        let zeros = Tensor::zeros(b, model.dtype(), dev)?;
        let out = CompletionLogps {
            sums: zeros,
            token_logps: Tensor::zeros(0, model.dtype(), dev)?,
            counts,
            logit_sums: want_logit_sums.then(|| vec![0.0; b]),
        };
        return Ok(out);
    }
    let hidden = hidden.reshape(((), hidden.dim(D::Minus1)?))?;
    let (token_logps, per_row) = token_logps(model, &hidden, rows, targets, want_logit_sums)?;
    let logit_sums = per_row.map(|per_row| {
        let mut out = Vec::with_capacity(b);
        let mut k = 0;
        for c in &counts {
            out.push(per_row[k..k + c].iter().sum());
            k += c;
        }
        out
    });
    // Per-sequence sums as one small matmul with a 0/1 segment matrix (differentiable).
    let mut seg = vec![0f32; b * n];
    let mut k = 0;
    for (i, c) in counts.iter().enumerate() {
        for j in k..k + c {
            seg[i * n + j] = 1.0;
        }
        k += c;
    }
    let seg = Tensor::from_vec(seg, (b, n), dev)?.to_dtype(model.dtype())?;
    let sums = seg.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?;
    let out = CompletionLogps {
        sums,
        token_logps,
        counts,
        logit_sums,
    };
    Ok(out)
}

/// [`run`] for sequences of unequal lengths: packed into one row ([`Llama::hidden_states_packed`]),
/// the captured keys and values cut back into one [1, kv_heads, T_i, head_dim] per sequence.
fn run_packed(
    model: &Llama,
    seqs: &[Sequence],
    pass: PassMode,
    want_logit_sums: bool,
    capture: bool,
) -> Result<(CompletionLogps, Captured)> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
    if seqs.is_empty() || lengths.contains(&0) {
        candle_core::bail!("completion_logps: empty sequence");
    }
    let starts: Vec<usize> = lengths
        .iter()
        .scan(0, |at, &len| {
            *at += len;
            Some(*at - len)
        })
        .collect();
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    let (rows, targets, counts) = scored_rows(seqs, |i| starts[i]);
    let total = ids.len();
    let ids = Tensor::from_vec(ids, (1, total), model.device())?;
    let (hidden, kv) = model.hidden_states_packed(&ids, pass, &lengths, capture)?;
    let kv = match kv {
        None => None,
        Some(layers) => Some(
            starts
                .iter()
                .zip(&lengths)
                .map(|(&start, &len)| {
                    layers
                        .iter()
                        .map(|(k, v)| Ok((k.narrow(2, start, len)?, v.narrow(2, start, len)?)))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let out = finish(model, &hidden, rows, targets, counts, want_logit_sums)?;
    Ok((out, kv))
}
