//! Multiple-choice benchmarks scored by log-likelihood, with the conventions of EleutherAI's
//! lm-evaluation-harness (the tool published numbers such as the Open LLM Leaderboard's come
//! from), so that a score printed here can sit next to theirs:
//! - [`hellaswag`]: `acc` and `acc_norm`, the harness's preprocessing of WikiHow markup;
//! - [`truthfulqa`]: MC2 with the harness's fixed six-question primer;
//! - [`mmlu`]: per-subject CSVs, the "The following are multiple choice questions" prompt, dev rows
//!   as few-shot examples;
//! - [`metrics`]: the formulas; [`runner`]: tokenization, batched scoring, table and JSON.
//!
//! Every task is reduced to [`McItem`]s (one context, several continuations), so one scoring path
//! serves them all.
pub mod hellaswag;
pub mod metrics;
pub mod mmlu;
pub mod runner;
pub mod truthfulqa;

use crate::util::hash::splitmix64;
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// Between a context and its continuation (the harness's `target_delimiter`).
pub const TARGET_DELIMITER: &str = " ";
/// After each few-shot example (the harness's `fewshot_delimiter`).
pub const FEWSHOT_DELIMITER: &str = "\n\n";
/// The harness's default `--seed` for few-shot sampling.
pub const DEFAULT_FEWSHOT_SEED: u64 = 1234;

pub use crate::config::BenchmarkTask;

/// What the evaluation harness and model cards know of each task.
impl BenchmarkTask {
    /// How model cards write it.
    pub fn display_name(self) -> &'static str {
        match self {
            BenchmarkTask::Hellaswag => "HellaSwag",
            BenchmarkTask::TruthfulqaMc2 => "TruthfulQA MC2",
            BenchmarkTask::Mmlu => "MMLU",
        }
    }

    /// The Open LLM Leaderboard's settings, which the usual model-card numbers use.
    pub fn default_shots(self) -> usize {
        match self {
            BenchmarkTask::Hellaswag => 10,
            BenchmarkTask::TruthfulqaMc2 => 0,
            BenchmarkTask::Mmlu => 5,
        }
    }

    /// Metrics reported, in table order.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            BenchmarkTask::Hellaswag => &["acc", "acc_norm"],
            BenchmarkTask::TruthfulqaMc2 => &["mc2"],
            BenchmarkTask::Mmlu => &["acc"],
        }
    }
}

/// What counts as right for one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly one correct choice.
    Index(usize),
    /// Several choices may be true (TruthfulQA MC2).
    Labels(Vec<bool>),
}

/// One question as the model sees it: a context and the choices that may continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    /// Where the record came from (`file:line`), for messages and the JSON output.
    pub source: String,
    /// Sub-task the item is aggregated under (the MMLU subject).
    pub group: Option<String>,
    /// Description, few-shot examples and the question, exactly as scored.
    pub context: String,
    /// Answer texts; the scored continuation is `TARGET_DELIMITER + choice`, and `acc_norm`
    /// divides by the character length of `choice` alone (as the harness does).
    pub choices: Vec<String>,
    pub target: Target,
}

/// How to build the items of a task.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Few-shot examples per question; `None` = the task's default.
    pub shots: Option<usize>,
    /// Where few-shot examples come from (HellaSwag: a train-split file; MMLU: dev CSVs).
    pub fewshot_data: Option<PathBuf>,
    /// Only the first N questions (per subject for MMLU, as the harness's `--limit` per task).
    pub limit: Option<usize>,
    /// Seed of the few-shot draw.
    pub seed: u64,
}

/// The items of one task run, with the settings that produced them.
#[derive(Debug, Clone)]
pub struct TaskItems {
    pub kind: BenchmarkTask,
    pub shots: usize,
    pub items: Vec<McItem>,
}

/// Reads a task's published files and builds its scored items.
pub fn load_task(kind: BenchmarkTask, data: &Path, opts: &LoadOptions) -> Result<TaskItems> {
    let shots = opts.shots.unwrap_or(kind.default_shots());
    let items = match kind {
        BenchmarkTask::Hellaswag => hellaswag::load_items(data, shots, opts)?,
        BenchmarkTask::TruthfulqaMc2 => {
            if shots != 0 {
                bail!(
                    "truthfulqa_mc2 has no few-shot split: the harness scores it 0-shot behind its \
                     fixed six-question primer (got --shots {shots})"
                );
            }
            truthfulqa::load_items(data, opts.limit)?
        }
        BenchmarkTask::Mmlu => mmlu::load_items(data, shots, opts)?,
    };
    if items.is_empty() {
        bail!("{}: no questions to score", data.display());
    }
    Ok(TaskItems { kind, shots, items })
}

/// The harness's context: description, then each example as `text + delimiter + answer` followed
/// by a blank line, then the question.
pub(crate) fn fewshot_context(
    description: &str,
    examples: &[(String, String)],
    query: &str,
) -> String {
    let mut s = String::from(description);
    for (text, answer) in examples {
        s.push_str(text);
        s.push_str(TARGET_DELIMITER);
        s.push_str(answer);
        s.push_str(FEWSHOT_DELIMITER);
    }
    s.push_str(query);
    s
}

/// How few-shot examples are drawn.
#[derive(Debug, Clone, Copy)]
pub enum Sampler {
    /// A random draw per question (the harness's default sampler), from `seed` and the item's
    /// position, so that a question's examples do not depend on `--limit` or batch order.
    Random { seed: u64, item: u64 },
    /// The first examples in file order (the harness's `first_n`, MMLU's setting).
    FirstN,
}

/// Few-shot examples for `doc`, never `doc` itself. Like the harness, the random sampler draws one
/// extra candidate so that dropping `doc` still leaves `k` examples, and `first_n` takes the first
/// `k` and drops `doc` if it is among them.
pub fn select_fewshot<'a, T>(
    pool: &'a [T],
    doc: &T,
    k: usize,
    sampler: Sampler,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<&'a T> {
    if k == 0 {
        return Vec::new();
    }
    let picked: Vec<&T> = match sampler {
        Sampler::Random { seed, item } => {
            let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(splitmix64(seed) ^ item));
            let n = (k + 1).min(pool.len());
            rand::seq::index::sample(&mut rng, pool.len(), n)
                .into_iter()
                .map(|i| &pool[i])
                .collect()
        }
        Sampler::FirstN => pool.iter().take(k).collect(),
    };
    picked
        .into_iter()
        .filter(|x| !same(x, doc))
        .take(k)
        .collect()
}

/// Python's `str.isspace()` for one character: Rust's White_Space plus the ASCII information
/// separators, which Python also strips.
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Text of a file without a UTF-8 byte-order mark (some published copies carry one).
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read task file {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_string(),
        None => text,
    })
}
