//! What the CLI and the training run call around [`super::prepare`]: finding the tokenizer and
//! EOS id, the `kto-train data` command, and writing examples and summaries to files.
use super::{prepare, KtoExample, PrepareOptions, PreparedData};
use crate::config::{Config, PromptFormat};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    pub eos_token_id: u32,
    pub tokenizer_path: PathBuf,
    /// The local model folder, when model.name_or_path is one.
    pub model_dir: Option<PathBuf>,
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!("tokenizer file {} does not exist", path.display());
    }
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// `eos_token_id` of a config.json: an integer, or a list whose first entry is taken.
fn eos_from_config(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let id = match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::Array(list)) => list.first().and_then(|x| x.as_u64()),
        _ => None,
    };
    Ok(id.map(|x| x as u32))
}

/// The tokenizer: `model.tokenizer` if set, else `<model folder>/tokenizer.json`; the EOS id from
/// the model folder's (else the tokenizer folder's) config.json, else the `<|endoftext|>` token.
pub fn resolve_tokenizer(cfg: &Config) -> Result<TokenizerInfo> {
    let model_dir = match &cfg.model.tokenizer {
        // An explicit tokenizer needs no model folder; use one when there is a local one.
        Some(_) => Some(PathBuf::from(&cfg.model.name_or_path)).filter(|p| p.is_dir()),
        None => Some(crate::model::loading::resolve_model_dir(
            &cfg.model.name_or_path,
            &cfg.model.revision,
        )?),
    };
    let tokenizer_path = match (&cfg.model.tokenizer, &model_dir) {
        (Some(t), _) => PathBuf::from(t),
        (None, Some(d)) => d.join("tokenizer.json"),
        (None, None) => unreachable!("a model folder is resolved when no tokenizer is given"),
    };
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let mut eos = None;
    if let Some(d) = &model_dir {
        eos = eos_from_config(d)?;
    }
    if eos.is_none() {
        if let Some(d) = tokenizer_path.parent() {
            eos = eos_from_config(d)?;
        }
    }
    let eos_token_id = match eos.or_else(|| tokenizer.token_to_id("<|endoftext|>")) {
        Some(id) => id,
        None => bail!(
            "no EOS token id: neither config.json (eos_token_id) next to the model or the tokenizer \
             nor a `<|endoftext|>` token in {}",
            tokenizer_path.display()
        ),
    };
    Ok(TokenizerInfo {
        tokenizer,
        eos_token_id,
        tokenizer_path,
        model_dir,
    })
}

/// A model folder's chat template: chat_template.jinja, else tokenizer_config.json.
fn find_chat_template(dirs: &[&Path]) -> Option<PathBuf> {
    for d in dirs {
        for name in ["chat_template.jinja", "tokenizer_config.json"] {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

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

/// The data exactly as a training run with `cfg` sees it (train.max_length, train.seed, the
/// model's tokenizer, EOS and chat template), with the tokenizer it used.
pub fn prepare_for_run(cfg: &Config, strict: bool) -> Result<(PreparedData, TokenizerInfo)> {
    let info = resolve_tokenizer(cfg)?;
    let mut data = cfg.data.clone();
    if data.prompt_format == PromptFormat::Template && data.chat_template.is_none() {
        let mut dirs: Vec<&Path> = Vec::new();
        if let Some(d) = &info.model_dir {
            dirs.push(d);
        }
        if let Some(d) = info.tokenizer_path.parent() {
            dirs.push(d);
        }
        data.chat_template = Some(find_chat_template(&dirs).ok_or_else(|| {
            anyhow!(
                "[data] prompt_format = \"template\": no chat_template.jinja or tokenizer_config.json \
                 next to the model or tokenizer; set data.chat_template"
            )
        })?);
    }
    let opts = PrepareOptions {
        tokenizer: &info.tokenizer,
        eos_token_id: info.eos_token_id,
        max_length: cfg.train.max_length,
        seed: cfg.train.seed,
        strict,
    };
    let prepared = prepare(&data, &opts)?;
    Ok((prepared, info))
}

fn example_json(e: &KtoExample, tok: &Tokenizer, split: Option<&str>) -> Result<String> {
    let decode = |ids: &[u32]| {
        tok.decode(ids, false)
            .map_err(|err| anyhow!("cannot decode: {err}"))
    };
    let mut v = serde_json::json!({
        "source": e.source,
        "interaction": e.interaction,
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

/// Writes examples as JSONL for inspection: source, interaction, label, the decoded prompt and
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
