//! Scoring items: the harness's tokenization of (context, continuation) pairs, batched
//! log-likelihoods through the training code's [`completion_logps`], metrics, the model-card
//! table, and `kto-train eval`.
use super::metrics::{self, mean_stderr};
use super::{BenchmarkTask, McItem, Target, TaskItems, TARGET_DELIMITER};
use crate::model::logprobs::{completion_logps, Sequence};
use crate::model::{Llama, PassMode};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// One log-likelihood request in tokens: log p(continuation | context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

fn encode(tok: &Tokenizer, s: &str) -> Result<Vec<u32>> {
    // The harness encodes without special tokens for causal models.
    Ok(tok
        .encode(s, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize {s:?}: {e}"))?
        .get_ids()
        .to_vec())
}

/// The harness's `_encode_pair`: trailing whitespace of the context moves to the front of the
/// continuation; the whole string is encoded once and split at the length of the context's own
/// encoding, so the continuation's tokens are those the model sees after that context. An empty
/// context is replaced by `prefix_token` (BOS, else EOS), as the harness does.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    prefix_token: Option<u32>,
) -> Result<LlRequest> {
    let prefix =
        || prefix_token.context("an empty context needs a BOS or EOS token id in config.json");
    if context.is_empty() {
        return Ok(LlRequest {
            context: vec![prefix()?],
            continuation: encode(tok, continuation)?,
        });
    }
    let ctx = context.trim_end_matches(super::py_is_space);
    let cont = format!("{}{continuation}", &context[ctx.len()..]);
    let whole = encode(tok, &format!("{ctx}{cont}"))?;
    let mut context_enc = encode(tok, ctx)?;
    let n = context_enc.len().min(whole.len());
    let continuation_enc = whole[n..].to_vec();
    if context_enc.is_empty() {
        context_enc.push(prefix()?);
    }
    Ok(LlRequest {
        context: context_enc,
        continuation: continuation_enc,
    })
}

/// The sequence the model scores: like the harness, at most `max_len + 1` tokens, cut from the
/// left (the last token is only a target, never an input).
pub fn fit_window(req: &LlRequest, max_len: usize) -> Result<Sequence> {
    let total = req.context.len() + req.continuation.len();
    if req.continuation.len() > max_len {
        bail!(
            "a continuation of {} tokens does not fit the model's {max_len} positions",
            req.continuation.len()
        );
    }
    let drop = total.saturating_sub(max_len + 1);
    let tokens: Vec<u32> = req
        .context
        .iter()
        .chain(&req.continuation)
        .skip(drop)
        .copied()
        .collect();
    Ok(Sequence {
        prompt_len: req.context.len() - drop,
        tokens,
    })
}

/// log p(continuation | context) of every request, `batch_size` sequences per forward pass
/// (longest first, so that padding is small), in request order. `progress` is told how many are
/// done.
pub fn loglikelihoods(
    model: &Llama,
    requests: &[LlRequest],
    pass: PassMode,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let max_len = model.cfg().max_position_embeddings;
    let seqs: Vec<Sequence> = requests
        .iter()
        .map(|r| fit_window(r, max_len))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].tokens.len()));
    let mut out = vec![0.0; seqs.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Sequence> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let lp = completion_logps(model, &batch, pass, false)?;
        let tokens: Vec<f64> = lp.token_logps.to_dtype(DType::F64)?.to_vec1()?;
        let mut k = 0;
        for (&i, &c) in chunk.iter().zip(&lp.counts) {
            out[i] = tokens[k..k + c].iter().sum();
            k += c;
        }
        done += chunk.len();
        progress(done);
    }
    Ok(out)
}

/// The requests of a list of items, one per choice, item after item.
pub(crate) fn item_requests(
    tok: &Tokenizer,
    items: &[McItem],
    prefix_token: Option<u32>,
) -> Result<Vec<LlRequest>> {
    let mut reqs = Vec::new();
    for it in items {
        for c in &it.choices {
            reqs.push(
                encode_pair(
                    tok,
                    &it.context,
                    &format!("{TARGET_DELIMITER}{c}"),
                    prefix_token,
                )
                .with_context(|| it.source.clone())?,
            );
        }
    }
    Ok(reqs)
}

/// A metric's mean over questions and its standard error.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    pub name: &'static str,
    pub value: f64,
    pub stderr: f64,
}

/// One question's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemResult {
    pub source: String,
    pub group: Option<String>,
    /// log p(delimiter + choice | context) per choice.
    pub lls: Vec<f64>,
    pub target: Target,
    /// Most likely choice, and the most likely after length normalisation.
    pub pred: usize,
    pub pred_norm: usize,
    /// The task's metrics on this question, in `BenchmarkTask::metrics` order.
    pub scores: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupSummary {
    pub name: String,
    pub n: usize,
    pub metrics: Vec<MetricSummary>,
}

/// A task's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub task: BenchmarkTask,
    pub shots: usize,
    /// Over all questions (for MMLU: every subject's questions, i.e. the harness's size-weighted
    /// group mean).
    pub metrics: Vec<MetricSummary>,
    /// Per sub-task (MMLU subject); empty for single-file tasks.
    pub groups: Vec<GroupSummary>,
    pub items: Vec<ItemResult>,
}

impl EvalReport {
    pub fn n(&self) -> usize {
        self.items.len()
    }

    /// Log-likelihoods that are NaN or infinite. Any makes the scores meaningless: a report with
    /// some is invalid, and its metrics are never shown as numbers.
    pub fn nonfinite_loglikelihoods(&self) -> usize {
        self.items
            .iter()
            .flat_map(|r| &r.lls)
            .filter(|x| !x.is_finite())
            .count()
    }

    pub fn is_valid(&self) -> bool {
        self.nonfinite_loglikelihoods() == 0
    }

    /// Why the scores are not shown, for tables and errors.
    pub fn invalid_reason(&self) -> Option<String> {
        let n = self.nonfinite_loglikelihoods();
        let total: usize = self.items.iter().map(|r| r.lls.len()).sum();
        (n > 0).then(|| {
            format!(
                "{}: {n} of {total} continuations ({} questions) have non-finite log-likelihoods; \
                 no score is computed from them",
                self.task.name(),
                self.n()
            )
        })
    }
}

fn summarize(kind: BenchmarkTask, items: &[&ItemResult]) -> Vec<MetricSummary> {
    kind.metrics()
        .iter()
        .enumerate()
        .map(|(m, &name)| {
            let xs: Vec<f64> = items.iter().map(|r| r.scores[m]).collect();
            let (value, stderr) = mean_stderr(&xs);
            MetricSummary {
                name,
                value,
                stderr,
            }
        })
        .collect()
}

/// Metrics from per-choice log-likelihoods (`lls[i]` belongs to `items[i]`).
pub fn score_items(task: &TaskItems, lls: Vec<Vec<f64>>) -> EvalReport {
    let kind = task.kind;
    let results: Vec<ItemResult> = task
        .items
        .iter()
        .zip(lls)
        .map(|(it, lls)| {
            let pred = metrics::argmax(&lls);
            let pred_norm = metrics::pred_norm(&lls, &it.choices);
            let scores = kind
                .metrics()
                .iter()
                .map(|&m| match (m, &it.target) {
                    ("acc", Target::Index(g)) => metrics::acc(&lls, *g),
                    ("acc_norm", Target::Index(g)) => metrics::acc_norm(&lls, &it.choices, *g),
                    ("mc2", Target::Labels(l)) => metrics::mc2(&lls, l),
                    (m, t) => unreachable!("metric {m} with target {t:?}"),
                })
                .collect();
            ItemResult {
                source: it.source.clone(),
                group: it.group.clone(),
                lls,
                target: it.target.clone(),
                pred,
                pred_norm,
                scores,
            }
        })
        .collect();
    let mut names: Vec<&String> = results.iter().filter_map(|r| r.group.as_ref()).collect();
    names.sort();
    names.dedup();
    let groups = names
        .into_iter()
        .map(|g| {
            let members: Vec<&ItemResult> = results
                .iter()
                .filter(|r| r.group.as_ref() == Some(g))
                .collect();
            GroupSummary {
                name: g.clone(),
                n: members.len(),
                metrics: summarize(kind, &members),
            }
        })
        .collect();
    EvalReport {
        task: kind,
        shots: task.shots,
        metrics: summarize(kind, &results.iter().collect::<Vec<_>>()),
        groups,
        items: results,
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub batch_size: usize,
    /// Which network scores: `PassMode::POLICY_EVAL` (adapter on, no dropout) for an adapter.
    pub pass: PassMode,
    /// An indicatif bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// Scores every item of a task with `model`.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    task: &TaskItems,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    evaluate_in(&crate::dist::Solo, model, tok, task, opts)
}

/// [`evaluate`] over the ranks of `world`: each scores its share of the continuations, and
/// every rank gets all the log-likelihoods (in order) and the same report.
pub fn evaluate_in(
    world: &dyn crate::dist::Comm,
    model: &Llama,
    tok: &Tokenizer,
    task: &TaskItems,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let prefix = model.cfg().bos_token_id.or(model.cfg().eos_token_id);
    let all_reqs = item_requests(tok, &task.items, prefix)?;
    let mine = crate::dist::shard_rows(all_reqs.len(), world.rank(), world.size());
    let reqs = &all_reqs[mine];
    let bar = {
        use std::io::IsTerminal;
        (opts.progress && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(reqs.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {pos}/{len} continuations [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
            b.set_message(task.kind.name());
            b
        })
    };
    let flat = loglikelihoods(model, reqs, opts.pass, opts.batch_size, &mut |done| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let flat: Vec<f64> = if world.size() == 1 {
        flat
    } else {
        let parts = world.all_gather(&crate::dist::encode_f64s(&flat))?;
        let mut all = Vec::with_capacity(all_reqs.len());
        for p in parts {
            all.extend(crate::dist::decode_f64s(&p)?);
        }
        all
    };
    let mut it = flat.into_iter();
    let lls: Vec<Vec<f64>> = task
        .items
        .iter()
        .map(|item| it.by_ref().take(item.choices.len()).collect())
        .collect();
    Ok(score_items(task, lls))
}

/// The model-card table (Task | Shots | Metric | Value), one row per task and metric.
pub fn format_table(reports: &[EvalReport]) -> String {
    let mut s = String::from("| Task | Shots | Metric | Value |\n|---|---|---|---|\n");
    for r in reports {
        if !r.is_valid() {
            s.push_str(&format!(
                "| {} | {} | — | invalid: {} non-finite log-likelihoods |\n",
                r.task.display_name(),
                r.shots,
                r.nonfinite_loglikelihoods()
            ));
            continue;
        }
        for m in &r.metrics {
            s.push_str(&format!(
                "| {} | {} | {} | {:.4} |\n",
                r.task.display_name(),
                r.shots,
                m.name,
                m.value
            ));
        }
    }
    s
}

/// Per-subject rows (MMLU), in the same layout; empty when the task has no sub-tasks.
pub fn format_group_table(report: &EvalReport) -> String {
    if report.groups.is_empty() {
        return String::new();
    }
    let mut s = String::from("| Subject | N | Metric | Value |\n|---|---|---|---|\n");
    for g in &report.groups {
        for m in &g.metrics {
            s.push_str(&format!(
                "| {} | {} | {} | {:.4} |\n",
                g.name, g.n, m.name, m.value
            ));
        }
    }
    s
}

fn num(x: f64) -> Value {
    // JSON has no NaN (a one-question stderr).
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

fn metrics_json(ms: &[MetricSummary]) -> Value {
    Value::Object(
        ms.iter()
            .map(|m| {
                (
                    m.name.to_string(),
                    json!({"value": num(m.value), "stderr": num(m.stderr)}),
                )
            })
            .collect(),
    )
}

/// The report as JSON; `run` describes how it was produced (model, adapter, data, ...).
pub fn report_json(report: &EvalReport, run: Value) -> Value {
    let names = report.task.metrics();
    let items: Vec<Value> = report
        .items
        .iter()
        .map(|r| {
            let mut v = json!({
                "source": r.source,
                "loglikelihoods": r.lls,
                "pred": r.pred,
            });
            match &r.target {
                Target::Index(g) => {
                    v["gold"] = json!(g);
                    v["pred_norm"] = json!(r.pred_norm);
                }
                Target::Labels(l) => v["labels"] = json!(l),
            }
            if let Some(g) = &r.group {
                v["group"] = json!(g);
            }
            for (name, x) in names.iter().zip(&r.scores) {
                v[*name] = num(*x);
            }
            v
        })
        .collect();
    let groups: serde_json::Map<String, Value> = report
        .groups
        .iter()
        .map(|g| {
            (
                g.name.clone(),
                json!({"n": g.n, "metrics": metrics_json(&g.metrics)}),
            )
        })
        .collect();
    json!({
        "task": report.task.name(),
        "shots": report.shots,
        "n": report.n(),
        "metrics": if report.is_valid() { metrics_json(&report.metrics) } else { Value::Null },
        "invalid": report.invalid_reason(),
        "groups": groups,
        "run": run,
        "items": items,
    })
}
