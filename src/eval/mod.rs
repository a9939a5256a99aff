//! Using a trained model: completion log-probs of records (`score`) and multiple-choice benchmarks
//! scored as the evaluation harness scores them (`tasks`).
pub mod score;
pub mod tasks;

use crate::config::EvalConfig;
use crate::model::{Llama, PassMode};
use anyhow::Result;
use tasks::{load_task, runner, LoadOptions, DEFAULT_FEWSHOT_SEED};

/// The `[eval]` benchmarks of a run, scored with the trained model (adapter on, no dropout): the
/// table is printed (unless `quiet`), and the rows are returned as eval_results.json holds them.
pub fn run_benchmarks(
    cfg: &EvalConfig,
    model: &Llama,
    tok: &tokenizers::Tokenizer,
    quiet: bool,
) -> Result<serde_json::Value> {
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    for b in &cfg.benchmarks {
        let options = LoadOptions {
            shots: b.shots,
            fewshot_data: b.fewshot_data.clone(),
            limit: b.limit,
            seed: DEFAULT_FEWSHOT_SEED,
        };
        let task = load_task(b.task, &b.data, &options)?;
        let eval_options = runner::EvalOptions {
            batch_size: cfg.batch_size,
            pass: PassMode::POLICY_EVAL,
            progress: !quiet,
        };
        let report = runner::evaluate(model, tok, &task, &eval_options)?;
        for m in &report.metrics {
            rows.push(serde_json::json!({
                "task": b.task.display_name(), "shots": report.shots, "metric": m.name,
                "value": m.value, "stderr": m.stderr, "n": report.n(),
            }));
        }
        reports.push(report);
    }
    if !quiet {
        eprintln!("{}", runner::format_table(&reports));
    }
    Ok(serde_json::json!({ "results": rows }))
}
