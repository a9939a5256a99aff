//! Dataset sources, mixing, splitting and tokenization into KTO examples.
//!
//! Flow: every file is checked before any is read; each source's records become interactions
//! (one prompt with its labelled completions); each source is put in a seeded order and
//! tokenized (in parallel) until its cap of usable interactions is reached; the sources are
//! interleaved round-robin; a seeded, per-source split puts whole interactions into validation;
//! each interaction's completions become KTO examples.
pub mod fasttok;
pub mod format;
pub mod mix;
pub mod order;
pub mod reader;
pub mod report;
pub mod sources;
pub mod summary;
pub mod tokenize;
mod tools;

pub use format::{ChatTemplate, Msg, Turns};
pub use reader::Loc;
pub use report::Issue;
pub use summary::{SourceSummary, Summary};
pub use tools::{
    load_tokenizer, prepare_for_run, resolve_tokenizer, run_data_command, write_examples_jsonl,
    write_prepared_jsonl, write_summary, TokenizerInfo,
};

use crate::config::{DataConfig, PromptFormat, SourceKind};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One tokenized KTO example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KtoExample {
    /// Prompt tokens (already cut to max_prompt_length, keeping the end).
    pub prompt_ids: Vec<u32>,
    /// Completion tokens with EOS appended, before the max_length cut (TRL rotates the KL
    /// completions before truncation, so the full completion is kept here).
    pub completion_ids: Vec<u32>,
    /// true = desirable.
    pub label: bool,
    /// Source name (e.g. "hh-rlhf").
    pub source: String,
    /// Interaction id, unique across the whole prepared dataset; examples of one interaction share a prompt.
    pub interaction: u64,
}

/// What the training run needs from the data pipeline.
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub train: Vec<KtoExample>,
    pub validation: Vec<KtoExample>,
    /// Human-readable mix summary (the `kto-train data` table).
    pub summary_text: String,
    /// The same as JSON, saved into every run's output folder.
    pub summary_json: serde_json::Value,
}

/// Options that come from outside the [data] section.
pub struct PrepareOptions<'a> {
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub eos_token_id: u32,
    pub max_length: usize,
    pub seed: u64,
    /// Turn the first bad record into an error.
    pub strict: bool,
}

/// Reads, mixes, splits and tokenizes the configured sources. Fails before reading any record
/// when there is no source, a file is missing or not the named format, or the chat template
/// cannot be loaded; bad records are counted and skipped (an error with `strict`).
pub fn prepare(cfg: &DataConfig, opts: &PrepareOptions) -> Result<PreparedData> {
    if cfg.sources.is_empty() {
        bail!("[data] has no sources: add at least one [[data.sources]] table (kind and files)");
    }
    cfg.validate().context("[data]")?;
    if opts.max_length < 2 {
        bail!(
            "max_length = {}: must be at least 2 (one prompt and one completion token)",
            opts.max_length
        );
    }
    let mut files = Vec::with_capacity(cfg.sources.len());
    for (i, s) in cfg.sources.iter().enumerate() {
        let f = reader::preflight(&s.files, s.format)
            .with_context(|| format!("[data] sources[{i}] ({})", s.display_name()))?;
        files.push(f);
    }
    let renderer = format::Renderer {
        format: cfg.prompt_format,
        template: match cfg.prompt_format {
            PromptFormat::Template => {
                let path = cfg.chat_template.as_ref().context(
                    "[data] prompt_format = \"template\" needs data.chat_template (a tokenizer_config.json or .jinja file)",
                )?;
                let eos = opts
                    .tokenizer
                    .id_to_token(opts.eos_token_id)
                    .unwrap_or_default();
                Some(ChatTemplate::from_file(path, &eos)?)
            }
            _ => None,
        },
    };
    let mut tok = opts.tokenizer.clone();
    // A tokenizer.json may carry truncation or padding; TRL's separate encodes use neither.
    tok.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_padding(None);
    let encoder = fasttok::FastEncoder::new(&tok);
    let limits = tokenize::Limits {
        eos: opts.eos_token_id,
        max_length: opts.max_length,
        max_prompt_length: cfg.max_prompt_length,
        max_completion_length: cfg.max_completion_length,
    };

    let mut selected: Vec<Vec<tokenize::TokInteraction>> = Vec::new();
    let mut summaries: Vec<SourceSummary> = Vec::new();
    for (s, src) in cfg.sources.iter().enumerate() {
        let name = src.display_name();
        let mut tally = report::Tally::new(opts.strict);
        // All files of a source are read together: posts, message trees and repeated prompts
        // can span files.
        let mut records = Vec::new();
        for f in &files[s] {
            records.extend(reader::read_records(f)?);
        }
        let interactions = match src.kind {
            SourceKind::HhRlhf => sources::hh_rlhf::load(records, &mut tally),
            SourceKind::Shp => sources::shp::load(records, src, &mut tally),
            SourceKind::Oasst => sources::oasst::load(records, src, &mut tally),
            SourceKind::Preference => sources::generic::load_preference(records, &mut tally),
            SourceKind::Unpaired => sources::generic::load_unpaired(records, &mut tally),
        }
        .with_context(|| format!("[data] source {name}"))?;

        let cap = cfg.cap_for(src).unwrap_or(usize::MAX);
        let order = mix::source_order(interactions.len(), opts.seed, name);
        let ordered: Vec<sources::Interaction> = {
            let mut slots: Vec<Option<sources::Interaction>> =
                interactions.into_iter().map(Some).collect();
            order
                .iter()
                .map(|&i| slots[i].take().expect("permutation"))
                .collect()
        };
        let available = ordered.len();
        let mut kept: Vec<tokenize::TokInteraction> = Vec::new();
        let mut pos = 0;
        // Tokenize in chunks a little larger than what is still needed, so a capped source of
        // 160k records costs about cap tokenizations; interactions that lose every example
        // (prompt too long, template errors) are replaced by the next ones in order.
        while kept.len() < cap && pos < ordered.len() {
            let need = cap - kept.len();
            let chunk = if cap == usize::MAX {
                ordered.len() - pos
            } else {
                (need + need / 8 + 32).min(ordered.len() - pos)
            };
            let outcomes =
                tokenize::tokenize_all(&ordered[pos..pos + chunk], &renderer, &encoder, &limits)?;
            pos += chunk;
            for o in outcomes {
                if kept.len() == cap {
                    break;
                }
                for issue in o.issues {
                    tally.bad(&issue.loc, &issue.field, issue.reason, issue.message)?;
                }
                for (r, n) in o.dropped {
                    tally.dropped(r, n);
                }
                if let Some(k) = o.kept {
                    kept.push(k);
                }
            }
        }
        let file_names = files[s]
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        let mut sum = SourceSummary::from_tally(name, src.kind.as_str(), file_names, &tally);
        sum.interactions_available = available;
        summaries.push(sum);
        selected.push(kept);
    }

    let counts: Vec<usize> = selected.iter().map(|s| s.len()).collect();
    let order = mix::round_robin(&counts);
    let val_sets: Vec<Vec<bool>> = cfg
        .sources
        .iter()
        .zip(&counts)
        .map(|(src, &n)| {
            mix::validation_set(n, cfg.validation_fraction, opts.seed, src.display_name())
        })
        .collect();
    let mut train = Vec::new();
    let mut validation = Vec::new();
    let mut lens: Vec<(Vec<usize>, Vec<usize>)> = vec![Default::default(); selected.len()];
    for (id, &(s, r)) in order.iter().enumerate() {
        let it = &selected[s][r];
        let name = cfg.sources[s].display_name();
        let is_val = val_sets[s][r];
        let sum = &mut summaries[s];
        let split = if is_val {
            &mut sum.validation
        } else {
            &mut sum.train
        };
        split.interactions += 1;
        sum.interactions += 1;
        sum.pairs += it.pairs;
        for item in &it.items {
            split.examples += 1;
            if item.label {
                split.desirable += 1;
            } else {
                split.undesirable += 1;
            }
            lens[s].0.push(it.prompt_ids.len());
            lens[s].1.push(item.completion_ids.len());
            let ex = KtoExample {
                prompt_ids: it.prompt_ids.clone(),
                completion_ids: item.completion_ids.clone(),
                label: item.label,
                source: name.to_string(),
                interaction: id as u64,
            };
            if is_val {
                validation.push(ex);
            } else {
                train.push(ex);
            }
        }
    }
    let mut total_train = summary::SplitCounts::default();
    let mut total_val = summary::SplitCounts::default();
    for (sum, (p, c)) in summaries.iter_mut().zip(&lens) {
        sum.examples = sum.train.examples + sum.validation.examples;
        sum.desirable = sum.train.desirable + sum.validation.desirable;
        sum.undesirable = sum.train.undesirable + sum.validation.undesirable;
        sum.prompt_tokens = summary::TokenStats::of(p.iter().copied());
        sum.completion_tokens = summary::TokenStats::of(c.iter().copied());
        total_train.add(&sum.train);
        total_val.add(&sum.validation);
    }
    let summary = Summary {
        seed: opts.seed,
        prompt_format: cfg.prompt_format.as_str().to_string(),
        max_length: opts.max_length,
        max_prompt_length: cfg.max_prompt_length,
        max_completion_length: cfg.max_completion_length,
        max_interactions_per_source: cfg.max_interactions_per_source,
        validation_fraction: cfg.validation_fraction,
        eos_token_id: opts.eos_token_id,
        sources: summaries,
        train: total_train,
        validation: total_val,
    };
    if train.is_empty() {
        bail!(
            "[data] no training example is left after reading, filtering and tokenizing:\n{}",
            summary.text()
        );
    }
    Ok(PreparedData {
        train,
        validation,
        summary_text: summary.text(),
        summary_json: serde_json::to_value(&summary).expect("summary serializes"),
    })
}

/// The order in which one epoch feeds examples into micro-batches (src/data/order.rs).
pub use order::epoch_order;
