use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[eval]`: benchmarks scored with the trained adapter at the end of a run (their table goes
/// into eval_results.json and the model card).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    #[serde(default)]
    pub benchmarks: Vec<BenchmarkConfig>,
    /// Continuations per forward batch.
    #[serde(default = "d_bs")]
    pub batch_size: usize,
}

fn d_bs() -> usize {
    8
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            benchmarks: Vec::new(),
            batch_size: d_bs(),
        }
    }
}

/// One `[[eval.benchmarks]]` table, as `kto-train eval` takes it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    /// `hellaswag`, `truthfulqa_mc2` or `mmlu`.
    pub task: BenchmarkTask,
    /// The task's published file or folder (relative to the config file).
    pub data: PathBuf,
    /// Few-shot examples (default: the task's leaderboard setting: 10, 0, 5).
    #[serde(default)]
    pub shots: Option<usize>,
    /// Where few-shot examples come from (HellaSwag train split, MMLU dev folder).
    #[serde(default)]
    pub fewshot_data: Option<PathBuf>,
    /// Only the first N questions.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A benchmark kto-train scores (src/eval/tasks), by the evaluation harness's task name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchmarkTask {
    Hellaswag,
    TruthfulqaMc2,
    Mmlu,
}

impl BenchmarkTask {
    pub const ALL: [BenchmarkTask; 3] = [
        BenchmarkTask::Hellaswag,
        BenchmarkTask::TruthfulqaMc2,
        BenchmarkTask::Mmlu,
    ];

    /// The harness's task name.
    pub fn name(self) -> &'static str {
        match self {
            BenchmarkTask::Hellaswag => "hellaswag",
            BenchmarkTask::TruthfulqaMc2 => "truthfulqa_mc2",
            BenchmarkTask::Mmlu => "mmlu",
        }
    }
}

impl std::fmt::Display for BenchmarkTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BenchmarkTask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task `{s}`; allowed are {names:?}")
            })
    }
}

super::compute::serde_as_string!(BenchmarkTask);

impl EvalConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        for b in &mut self.benchmarks {
            if b.data.is_relative() {
                b.data = super::normalize_path(&base.join(&b.data));
            }
            if let Some(f) = &mut b.fewshot_data {
                if f.is_relative() {
                    *f = super::normalize_path(&base.join(&*f));
                }
            }
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 {
            bail!("batch_size = 0: must be at least 1");
        }
        for b in &self.benchmarks {
            if b.limit == Some(0) {
                bail!("benchmarks: limit = 0 for `{}`: must be at least 1", b.task);
            }
        }
        Ok(())
    }
}
