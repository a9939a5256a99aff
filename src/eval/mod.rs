//! Using a trained model: completion log-probs of records (`score`) and multiple-choice benchmarks
//! scored as the evaluation harness scores them (`tasks`).
pub mod generate;
pub mod score;
pub mod tasks;

use crate::config::EvalConfig;
use crate::model::{Llama, PassMode};
use anyhow::{Context, Result};
use tasks::{load_task, runner, LoadOptions, DEFAULT_FEWSHOT_SEED};

/// The `[eval]` benchmarks of a run, read and built before the run starts: a missing or
/// malformed task file is found then, not after hours of training.
pub fn load_benchmarks(cfg: &EvalConfig) -> Result<Vec<tasks::TaskItems>> {
    cfg.benchmarks
        .iter()
        .map(|b| {
            let options = LoadOptions {
                shots: b.shots,
                fewshot_data: b.fewshot_data.clone(),
                limit: b.limit,
                seed: DEFAULT_FEWSHOT_SEED,
            };
            load_task(b.task, &b.data, &options)
                .with_context(|| format!("[eval] benchmark `{}`", b.task))
        })
        .collect()
}

/// The run's benchmarks scored with the trained model (adapter on, no dropout), as
/// eval_results.json holds them; the table is printed unless `quiet`. A task with a non-finite
/// log-likelihood has no score: its row says why, and it is in the returned list of problems.
/// The ranks of `world` share the scoring, and every rank gets the same results.
pub fn score_benchmarks(
    world: &dyn crate::dist::Comm,
    cfg: &EvalConfig,
    benchmarks: &[tasks::TaskItems],
    model: &Llama,
    tok: &tokenizers::Tokenizer,
    quiet: bool,
) -> Result<(serde_json::Value, Vec<String>)> {
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    for task in benchmarks {
        let eval_options = runner::EvalOptions {
            batch_size: cfg.batch_size,
            pass: PassMode::POLICY_EVAL,
            progress: !quiet,
        };
        let report = runner::evaluate_in(world, model, tok, task, &eval_options)?;
        if let Some(why) = report.invalid_reason() {
            rows.push(serde_json::json!({
                "task": task.kind.display_name(), "shots": report.shots, "metric": null,
                "value": null, "stderr": null, "n": report.n(), "invalid": why,
            }));
            problems.push(why);
        }
        for m in report.metrics.iter().filter(|_| report.is_valid()) {
            rows.push(serde_json::json!({
                "task": task.kind.display_name(), "shots": report.shots, "metric": m.name,
                "value": m.value, "stderr": m.stderr, "n": report.n(),
            }));
        }
        reports.push(report);
    }
    if !quiet {
        eprintln!("{}", runner::format_table(&reports));
    }
    Ok((serde_json::json!({ "results": rows }), problems))
}
