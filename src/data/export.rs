//! `kto-train data`, and the prepared examples and summaries written to files for inspection.
use super::{prepare_for_run, KtoExample, PreparedData};
use crate::config::Config;
use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;
use tokenizers::Tokenizer;

/// `kto-train data --config FILE [--out FILE] [--strict]`: prepares the data as a training run
/// would (train.max_length, train.seed), prints the summary table and optionally writes every
/// prepared example as JSONL (with its split and decoded text).
pub fn run_data_command(cfg: &Config, out: Option<&Path>, strict: bool) -> Result<()> {
    let (prepared, info) = prepare_for_run(cfg, strict)?;
    print!("{}", prepared.summary_text);
    if let Some(path) = out {
        write_prepared_jsonl(path, &prepared, &info.tokenizer)?;
        println!(
            "wrote {} examples ({} train, {} validation) to {}",
            prepared.train.len() + prepared.validation.len(),
            prepared.train.len(),
            prepared.validation.len(),
            path.display()
        );
    }
    Ok(())
}

fn example_json(e: &KtoExample, tok: &Tokenizer, split: Option<&str>) -> Result<String> {
    let decode = |ids: &[u32]| {
        tok.decode(ids, false)
            .map_err(|err| anyhow!("cannot decode: {err}"))
    };
    let mut v = serde_json::json!({
        "source": e.source,
        "interaction": e.interaction,
        "pair": e.pair,
        "label": e.label,
        "prompt": decode(&e.prompt_ids)?,
        "completion": decode(&e.completion_ids)?,
        "prompt_ids": e.prompt_ids,
        "completion_ids": e.completion_ids,
    });
    if let Some(s) = split {
        v["split"] = serde_json::Value::from(s);
    }
    Ok(v.to_string())
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for l in lines {
        writeln!(w, "{l}")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes examples as JSONL for inspection: source, interaction, pair (the stated comparison within
/// the interaction, null when unpaired), label, the decoded prompt and
/// completion (special tokens shown), and the ids.
pub fn write_examples_jsonl(
    path: &Path,
    examples: &[KtoExample],
    tokenizer: &Tokenizer,
) -> Result<()> {
    let lines: Vec<String> = examples
        .par_iter()
        .map(|e| example_json(e, tokenizer, None))
        .collect::<Result<_>>()?;
    write_lines(path, &lines)
}

/// Like [`write_examples_jsonl`] for both splits, each line with `"split": "train"|"validation"`.
pub fn write_prepared_jsonl(path: &Path, data: &PreparedData, tokenizer: &Tokenizer) -> Result<()> {
    let tagged: Vec<(&KtoExample, &str)> = data
        .train
        .iter()
        .map(|e| (e, "train"))
        .chain(data.validation.iter().map(|e| (e, "validation")))
        .collect();
    let lines: Vec<String> = tagged
        .par_iter()
        .map(|(e, s)| example_json(e, tokenizer, Some(s)))
        .collect::<Result<_>>()?;
    write_lines(path, &lines)
}

/// Saves the summary into a run folder as data_summary.txt and data_summary.json.
pub fn write_summary(dir: &Path, data: &PreparedData) -> Result<()> {
    use crate::util::atomic::{write_atomic, write_json_atomic};
    write_atomic(&dir.join("data_summary.txt"), data.summary_text.as_bytes())?;
    write_json_atomic(&dir.join("data_summary.json"), &data.summary_json)
}
