//! One micro-batch: reference, policy and KL passes, the loss head, and one backward pass of
//! `sum_i (dL/dP_i) * P_i` (the loss head gives dL/dP in f64).
use super::batch::MicroBatch;
use super::refcache::{sequence_key, RefCache};
use crate::loss::{LossHead, LossOutput, SequenceLogps};
use crate::model::llama::LoraGradients;
use crate::model::logprobs::{
    completion_logp_sums_after, completion_logp_sums_with_continuations, completion_logps,
    completion_logps_capturing, Sequence,
};
use crate::model::{DropoutKey, Llama, PassMode};
use crate::util::profile;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// How one micro-batch runs: the policy's pass, the policy's KL pass, the optimizer step it
/// belongs to (the BCO staging depends on it), and whether it trains (loss-head state updated,
/// gradient computed) or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatchMode {
    pub policy: PassMode,
    pub kl: PassMode,
    pub step: u64,
    pub train: bool,
}

impl MicroBatchMode {
    /// Training at optimizer step `step`: dropout masks keyed by (seed, pass) and (seed, pass + 1)
    /// for the policy and its KL pass, so that a resumed run draws the same masks.
    pub fn training(seed: u64, pass: u64, step: u64) -> Self {
        let key = |pass| PassMode::train(DropoutKey { seed, pass });
        Self {
            policy: key(pass),
            kl: key(pass + 1),
            step,
            train: true,
        }
    }

    /// Evaluation: no dropout, no gradient, no state change.
    pub fn evaluation(step: u64) -> Self {
        Self {
            policy: PassMode::POLICY_EVAL,
            kl: PassMode::POLICY_EVAL,
            step,
            train: false,
        }
    }
}

pub struct StepResult {
    pub loss: LossOutput,
    /// Gradients of the LoRA weights (None in evaluation).
    pub grads: Option<LoraGradients>,
    /// Per-example policy log-prob sums, for inspection and tests.
    pub logps: SequenceLogps,
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1()?)
}

/// Reference log-probs (LoRA off, no gradient) for the batch's main and KL sequences, from the
/// cache where it has them. The others are computed: the main sequences and the KL sequences in
/// one pass where packing applies, each KL sequence reusing the states of the prompt it shares
/// with its example ([`completion_logp_sums_with_continuations`]).
pub fn reference_logps(
    model: &Llama,
    batch: &MicroBatch,
    mut cache: Option<&mut RefCache>,
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let key = |s: &Sequence| sequence_key(&s.tokens, s.prompt_len);
    let lookup = |seqs: &[Sequence], cache: &mut Option<&mut RefCache>| -> Vec<Option<f64>> {
        match cache.as_deref_mut() {
            Some(c) => seqs.iter().map(|s| c.get(key(s))).collect(),
            None => vec![None; seqs.len()],
        }
    };
    let todo =
        |v: &[Option<f64>]| -> Vec<usize> { (0..v.len()).filter(|&i| v[i].is_none()).collect() };
    let mut main = lookup(&batch.seqs, &mut cache);
    let mut kl = batch.kl_seqs.as_ref().map(|s| lookup(s, &mut cache));
    let missing = todo(&main);
    let kl_missing = kl.as_deref().map(todo).unwrap_or_default();
    if !missing.is_empty() || !kl_missing.is_empty() {
        let _p = profile::phase("reference passes");
        let seqs: Vec<Sequence> = missing.iter().map(|&i| batch.seqs[i].clone()).collect();
        let kl_seqs = batch.kl_seqs.as_deref().unwrap_or_default();
        let conts: Vec<Sequence> = kl_missing.iter().map(|&i| kl_seqs[i].clone()).collect();
        // KL sequence i shares its prompt with example i, if that one is computed here.
        let rows: Vec<Option<usize>> = kl_missing
            .iter()
            .map(|&i| missing.iter().position(|&j| j == i))
            .collect();
        let (got, got_kl) = completion_logp_sums_with_continuations(
            model,
            &seqs,
            &conts,
            &rows,
            PassMode::REFERENCE,
        )?;
        for (&i, v) in missing.iter().zip(got) {
            main[i] = Some(v);
            if let Some(c) = cache.as_deref_mut() {
                c.insert(key(&batch.seqs[i]), v);
            }
        }
        if let Some(kl) = kl.as_mut() {
            for (&i, v) in kl_missing.iter().zip(got_kl) {
                kl[i] = Some(v);
                if let Some(c) = cache.as_deref_mut() {
                    c.insert(key(&kl_seqs[i]), v);
                }
            }
        }
    }
    let filled =
        |v: Vec<Option<f64>>| -> Vec<f64> { v.into_iter().map(|v| v.expect("filled")).collect() };
    Ok((filled(main), kl.map(filled)))
}

/// Runs one micro-batch in `mode` (a world of one).
pub fn run_micro_batch(
    model: &Llama,
    head: &mut LossHead,
    batch: &MicroBatch,
    mode: MicroBatchMode,
    cache: Option<&mut RefCache>,
) -> Result<StepResult> {
    run_micro_batch_shard(
        model,
        head,
        batch,
        0..batch.len(),
        mode,
        cache,
        &crate::dist::Solo,
    )
}

/// What one rank sends the others about its rows of a micro-batch: the loss head's inputs, the
/// rows' logit sums (TRL's `logits/chosen` metric) and their token count.
#[derive(Default)]
struct ShardLogps {
    logps: SequenceLogps,
    logit_sums: Option<Vec<f64>>,
    counts: Vec<usize>,
}

impl ShardLogps {
    /// As f64 values (bit for bit: a non-finite log-prob must reach the other ranks as it is):
    /// the row count and which optional fields follow, then each field's n values.
    fn encode(&self) -> Vec<u8> {
        let l = &self.logps;
        let n = l.labels.len();
        let flag = |o: bool| if o { 1.0 } else { 0.0 };
        let mut v = vec![
            n as f64,
            flag(l.policy_kl.is_some()),
            flag(l.reference_kl.is_some()),
            flag(self.logit_sums.is_some()),
        ];
        v.extend(l.labels.iter().map(|&b| flag(b)));
        v.extend(&l.policy);
        v.extend(&l.reference);
        v.extend(l.policy_kl.iter().flatten());
        v.extend(l.reference_kl.iter().flatten());
        v.extend(&l.completion_tokens);
        v.extend(self.logit_sums.iter().flatten());
        v.extend(self.counts.iter().map(|&c| c as f64));
        crate::dist::encode_f64s(&v)
    }

    fn decode(b: &[u8]) -> Result<Self> {
        let v = crate::dist::decode_f64s(b)?;
        let bad = || anyhow::anyhow!("a rank's log-probs message is malformed");
        let head = v.get(..4).ok_or_else(bad)?;
        let n = head[0] as usize;
        let mut rest = &v[4..];
        let mut take = |present: bool| -> Result<Option<Vec<f64>>> {
            if !present {
                return Ok(None);
            }
            let (a, b) = (rest.get(..n).ok_or_else(bad)?, &rest[n..]);
            rest = b;
            Ok(Some(a.to_vec()))
        };
        let labels = take(true)?.expect("present");
        let policy = take(true)?.expect("present");
        let reference = take(true)?.expect("present");
        let policy_kl = take(head[1] == 1.0)?;
        let reference_kl = take(head[2] == 1.0)?;
        let completion_tokens = take(true)?.expect("present");
        let logit_sums = take(head[3] == 1.0)?;
        let counts = take(true)?.expect("present");
        Ok(Self {
            logps: SequenceLogps {
                labels: labels.iter().map(|&x| x == 1.0).collect(),
                policy,
                reference,
                policy_kl,
                reference_kl,
                completion_tokens,
            },
            logit_sums,
            counts: counts.iter().map(|&c| c as usize).collect(),
        })
    }
}

/// Runs rows `mine` of the global micro-batch `batch` on this rank; the other ranks of `comm`
/// run the other rows at the same time. Every rank then computes the loss head on the whole
/// micro-batch (TRL gathers the KL log-ratios of all processes before z, and the BCO baseline
/// takes in every rank's rewards), so the loss, its metrics and the loss-head state are the
/// same on every rank and equal to one process's over the same micro-batch; the gradient is of
/// this rank's rows only, and summing it over the ranks gives that process's gradient.
pub fn run_micro_batch_shard(
    model: &Llama,
    head: &mut LossHead,
    batch: &MicroBatch,
    mine: std::ops::Range<usize>,
    mode: MicroBatchMode,
    mut cache: Option<&mut RefCache>,
    comm: &dyn crate::dist::Comm,
) -> Result<StepResult> {
    // A world of one runs the micro-batch as it is (no copy of its sequences).
    let local = if mine == (0..batch.len()) {
        std::borrow::Cow::Borrowed(batch)
    } else {
        std::borrow::Cow::Owned(batch.rows(mine.clone()))
    };
    let (shard, policy) = if local.is_empty() {
        (ShardLogps::default(), None)
    } else {
        let (shard, policy) = local_logps(model, head, &local, mode, cache.as_deref_mut())?;
        (shard, Some(policy))
    };
    let all: Vec<ShardLogps> = if comm.size() == 1 {
        vec![shard]
    } else {
        comm.all_gather(&shard.encode())?
            .iter()
            .map(|b| ShardLogps::decode(b))
            .collect::<Result<_>>()?
    };
    let has_kl = batch.kl_seqs.is_some();
    let logps = concat_logps(
        all.iter().map(|s| &s.logps),
        has_kl && head.needs_kl(),
        has_kl,
    );
    // The other ranks' reference log-probs into this rank's cache (its own rows are there
    // already): filled in parallel, then shared.
    if let (Some(c), true) = (cache, comm.size() > 1) {
        let key = |s: &Sequence| sequence_key(&s.tokens, s.prompt_len);
        let others = |i: &usize| !mine.contains(i);
        for i in (0..batch.len()).filter(others) {
            c.insert(key(&batch.seqs[i]), logps.reference[i]);
        }
        if let (Some(kl), Some(v)) = (&batch.kl_seqs, &logps.reference_kl) {
            for i in (0..kl.len()).filter(others) {
                c.insert(key(&kl[i]), v[i]);
            }
        }
    }
    let p = profile::phase("loss head");
    let mut loss = if mode.train {
        head.train_batch(&logps, mode.step)?
    } else {
        head.eval_batch(&logps, mode.step)?
    };
    let vocab = model.cfg().vocab_size as f64;
    let mut row = 0;
    for s in &all {
        if let Some(sums) = &s.logit_sums {
            for (i, v) in sums.iter().enumerate() {
                let side = if logps.labels[row + i] {
                    "chosen"
                } else {
                    "rejected"
                };
                loss.metrics
                    .add(&format!("logits/{side}"), *v, s.counts[i] as f64 * vocab);
            }
        }
        row += s.logps.labels.len();
    }
    drop(p);
    let grads = if mode.train {
        let _p = profile::phase("backward");
        Some(match &policy {
            Some(sums) => {
                let g = &loss.grad[mine];
                let g = Tensor::from_vec(g.to_vec(), g.len(), model.device())?
                    .to_dtype(model.dtype())?;
                let surrogate = (sums * &g)?.sum_all()?;
                model.lora_gradients(&surrogate)?
            }
            // No rows here (a micro-batch smaller than the world): nothing to add.
            None => model.zero_lora_gradients()?,
        })
    } else {
        None
    };
    Ok(StepResult { loss, grads, logps })
}

/// The ranks' rows in rank order, concatenated; the KL fields are present as one process
/// would have them (the policy's when the loss needs z, the reference's when the batch has KL
/// pairs).
fn concat_logps<'a>(
    parts: impl Iterator<Item = &'a SequenceLogps>,
    policy_kl: bool,
    reference_kl: bool,
) -> SequenceLogps {
    let mut out = SequenceLogps {
        policy_kl: policy_kl.then(Vec::new),
        reference_kl: reference_kl.then(Vec::new),
        ..Default::default()
    };
    for p in parts {
        out.labels.extend(&p.labels);
        out.policy.extend(&p.policy);
        out.reference.extend(&p.reference);
        out.completion_tokens.extend(&p.completion_tokens);
        if let (Some(o), Some(v)) = (&mut out.policy_kl, &p.policy_kl) {
            o.extend(v);
        }
        if let (Some(o), Some(v)) = (&mut out.reference_kl, &p.reference_kl) {
            o.extend(v);
        }
    }
    out
}

/// The reference, policy and KL passes over `batch` (this rank's rows): the loss head's inputs
/// and the policy's log-prob sums attached to the graph.
fn local_logps(
    model: &Llama,
    head: &LossHead,
    batch: &MicroBatch,
    mode: MicroBatchMode,
    cache: Option<&mut RefCache>,
) -> Result<(ShardLogps, Tensor)> {
    let MicroBatchMode {
        policy: fwd,
        kl: kl_fwd,
        train,
        ..
    } = mode;
    // The reference passes run first so that their memory is free before the policy pass
    // builds its graph. The policy's KL pass runs after the policy pass: it reuses that pass's
    // states for the prompts (TRL runs it as a separate full forward; with dropout, the shared
    // prompt positions here see the policy pass's mask, which the detached KL estimate does not
    // depend on in expectation).
    let (reference, reference_kl) = reference_logps(model, batch, cache)?;
    let kl = batch.kl_seqs.as_ref().filter(|_| head.needs_kl());
    let policy_fwd = fwd.with_grad(train);
    let (policy, policy_kl) = match kl {
        Some(kl) => {
            let p = profile::phase("policy forward");
            let (policy, prompts) =
                completion_logps_capturing(model, &batch.seqs, policy_fwd, true)?;
            drop(p);
            let _p = profile::phase("policy KL pass");
            let rows: Vec<Option<usize>> = (0..kl.len())
                .map(|i| (i < batch.seqs.len()).then_some(i))
                .collect();
            let kl_sums =
                completion_logp_sums_after(model, kl, kl_fwd.with_grad(false), &prompts, &rows)?;
            (policy, Some(kl_sums))
        }
        None => {
            let _p = profile::phase("policy forward");
            (
                completion_logps(model, &batch.seqs, policy_fwd, true)?,
                None,
            )
        }
    };
    let logps = SequenceLogps {
        labels: batch.labels.clone(),
        policy: to_f64(&policy.sums)?,
        reference,
        policy_kl,
        reference_kl,
        completion_tokens: policy.counts.iter().map(|&c| c as f64).collect(),
    };
    let shard = ShardLogps {
        logps,
        logit_sums: policy.logit_sums.clone(),
        counts: policy.counts.clone(),
    };
    Ok((shard, policy.sums))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank's message comes back bit for bit, non-finite values and absent fields included.
    #[test]
    fn shard_messages_round_trip() {
        for with_kl in [false, true] {
            let s = ShardLogps {
                logps: SequenceLogps {
                    labels: vec![true, false, true],
                    policy: vec![-1.5, f64::NAN, f64::NEG_INFINITY],
                    reference: vec![-0.1, -2.0, 1e-300],
                    policy_kl: with_kl.then(|| vec![1.0, 2.0, f64::INFINITY]),
                    reference_kl: Some(vec![0.5, -0.25, 3.0]),
                    completion_tokens: vec![3.0, 7.0, 1.0],
                },
                logit_sums: with_kl.then(|| vec![10.0, -4.5, 0.0]),
                counts: vec![3, 7, 1],
            };
            let d = ShardLogps::decode(&s.encode()).unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(d.logps.labels, s.logps.labels);
            assert_eq!(bits(&d.logps.policy), bits(&s.logps.policy));
            assert_eq!(bits(&d.logps.reference), bits(&s.logps.reference));
            assert_eq!(d.logps.policy_kl.is_some(), with_kl);
            assert_eq!(d.logps.reference_kl, s.logps.reference_kl);
            assert_eq!(d.logps.completion_tokens, s.logps.completion_tokens);
            assert_eq!(d.logit_sums, s.logit_sums);
            assert_eq!(d.counts, s.counts);
        }
        assert!(ShardLogps::decode(&crate::dist::encode_f64s(&[5.0, 0.0, 0.0, 0.0, 1.0])).is_err());
    }
}
