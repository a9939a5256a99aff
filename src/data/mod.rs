//! Dataset sources, mixing, splitting and tokenization into KTO examples.
//!
//! Flow: every file is checked before any is read; each source's records become interactions
//! (one prompt with its labelled completions); each source is put in a seeded order and
//! tokenized (in parallel) until its cap of usable interactions is reached; the sources are
//! interleaved round-robin; a seeded, per-source split puts whole interactions into validation;
//! each interaction's completions become KTO examples.
pub mod export;
pub mod fasttok;
pub mod format;
pub mod mix;
pub mod order;
pub mod reader;
pub mod report;
pub mod sources;
pub mod summary;
pub mod tokenize;
pub mod tokenizer;

pub use export::{run_data_command, write_examples_jsonl, write_prepared_jsonl, write_summary};
pub use format::{ChatTemplate, Msg, Turns};
pub use reader::Loc;
pub use report::Issue;
pub use summary::{SourceSummary, Summary};
pub use tokenizer::{load_tokenizer, resolve_tokenizer, TokenizerInfo};

use crate::config::{Config, DataConfig, PromptFormat, SourceConfig, SourceKind};
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
    /// The preference comparison (numbered within the interaction) this example is a side of;
    /// None for an unpaired record. A completion ranked between two others is a side of several.
    #[serde(default)]
    pub pair: Option<u32>,
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
    /// The model's chat template (for `auto` and `template` when data.chat_template is unset).
    pub chat_template: Option<ModelChatTemplate>,
}

/// A chat template found with the model, and where it came from (for the data summary).
#[derive(Clone)]
pub struct ModelChatTemplate {
    pub template: std::sync::Arc<ChatTemplate>,
    pub origin: String,
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
    let (renderer, format_name) = renderer(cfg, opts)?;
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
    let mut selected = Vec::with_capacity(cfg.sources.len());
    let mut summaries = Vec::with_capacity(cfg.sources.len());
    for (src, files) in cfg.sources.iter().zip(&files) {
        let (kept, summary) = select_source(cfg, src, files, &renderer, &encoder, &limits, opts)?;
        selected.push(kept);
        summaries.push(summary);
    }
    let (train, validation) = mix_and_split(cfg, &selected, &mut summaries, opts.seed);
    let summary = Summary {
        seed: opts.seed,
        prompt_format: format_name,
        max_length: opts.max_length,
        max_prompt_length: cfg.max_prompt_length,
        max_completion_length: cfg.max_completion_length,
        max_interactions_per_source: cfg.max_interactions_per_source,
        validation_fraction: cfg.validation_fraction,
        eos_token_id: opts.eos_token_id,
        train: summaries.iter().fold(Default::default(), |mut t, s| {
            summary::SplitCounts::add(&mut t, &s.train);
            t
        }),
        validation: summaries.iter().fold(Default::default(), |mut t, s| {
            summary::SplitCounts::add(&mut t, &s.validation);
            t
        }),
        sources: summaries,
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

/// How prompts become text: the configured format with its chat template (data.chat_template,
/// else the model's), and how the summary names it.
fn renderer(cfg: &DataConfig, opts: &PrepareOptions) -> Result<(format::Renderer, String)> {
    let needs_template = matches!(
        cfg.prompt_format,
        PromptFormat::Template | PromptFormat::Auto
    );
    let template = match (&cfg.chat_template, &opts.chat_template) {
        _ if !needs_template => None,
        (Some(path), _) => {
            let eos = opts
                .tokenizer
                .id_to_token(opts.eos_token_id)
                .unwrap_or_default();
            Some(ModelChatTemplate {
                template: std::sync::Arc::new(ChatTemplate::from_file(path, &eos)?),
                origin: path.display().to_string(),
            })
        }
        (None, found) => found.clone(),
    };
    let name = match (cfg.prompt_format, &template) {
        (PromptFormat::Template, None) => bail!(
            "[data] prompt_format = \"template\" needs a chat template: set data.chat_template (a \
             tokenizer_config.json or .jinja file), or use a model whose folder has one"
        ),
        (PromptFormat::Auto, None) => {
            "auto (no chat template: message lists as HH-style raw text)".to_string()
        }
        (PromptFormat::Auto, Some(t)) => format!("auto (chat template of {})", t.origin),
        (f, _) => f.as_str().to_string(),
    };
    let renderer = format::Renderer {
        format: cfg.prompt_format,
        template: template.map(|t| t.template),
    };
    Ok((renderer, name))
}

/// One source's usable interactions, tokenized, in the source's seeded order, up to its cap,
/// and its summary (records read, skipped, filtered, dropped).
fn select_source(
    cfg: &DataConfig,
    src: &SourceConfig,
    files: &[reader::DataFile],
    renderer: &format::Renderer,
    encoder: &fasttok::FastEncoder,
    limits: &tokenize::Limits,
    opts: &PrepareOptions,
) -> Result<(Vec<tokenize::TokInteraction>, SourceSummary)> {
    let name = src.display_name();
    let mut tally = report::Tally::new(opts.strict);
    // All files of a source are read together: posts, message trees and repeated prompts can
    // span files.
    let mut records = Vec::new();
    for f in files {
        records.extend(reader::read_records(f)?);
    }
    let interactions = match src.kind {
        SourceKind::HhRlhf => sources::hh_rlhf::load(records, &mut tally),
        SourceKind::Shp => sources::shp::load(records, src, &mut tally),
        SourceKind::Oasst => sources::oasst::load(records, src, &mut tally),
        SourceKind::Preference => sources::generic::load_preference(records, src, &mut tally),
        SourceKind::Unpaired => sources::generic::load_unpaired(records, src, &mut tally),
    }
    .with_context(|| format!("[data] source {name}"))?;
    let cap = cfg.cap_for(src).unwrap_or(usize::MAX);
    let order = mix::source_order(interactions.len(), opts.seed, name);
    let mut slots: Vec<Option<sources::Interaction>> = interactions.into_iter().map(Some).collect();
    let ordered: Vec<sources::Interaction> = order
        .iter()
        .map(|&i| slots[i].take().expect("permutation"))
        .collect();
    let mut kept: Vec<tokenize::TokInteraction> = Vec::new();
    let mut pos = 0;
    // Tokenize in chunks a little larger than what is still needed, so a capped source of 160k
    // records costs about cap tokenizations; interactions that lose every example (prompt too
    // long, template errors) are replaced by the next ones in order.
    while kept.len() < cap && pos < ordered.len() {
        let need = cap - kept.len();
        let chunk = if cap == usize::MAX {
            ordered.len() - pos
        } else {
            (need + need / 8 + 32).min(ordered.len() - pos)
        };
        let outcomes =
            tokenize::tokenize_all(&ordered[pos..pos + chunk], renderer, encoder, limits)?;
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
            kept.extend(o.kept);
        }
    }
    let file_names = files.iter().map(|f| f.path.display().to_string()).collect();
    let mut sum = SourceSummary::from_tally(name, src.kind.as_str(), file_names, &tally);
    sum.interactions_available = ordered.len();
    Ok((kept, sum))
}

/// The sources interleaved round-robin, each interaction put whole into train or validation (a
/// seeded, per-source split), its completions made KTO examples; the summaries get the counts.
fn mix_and_split(
    cfg: &DataConfig,
    selected: &[Vec<tokenize::TokInteraction>],
    summaries: &mut [SourceSummary],
    seed: u64,
) -> (Vec<KtoExample>, Vec<KtoExample>) {
    let counts: Vec<usize> = selected.iter().map(|s| s.len()).collect();
    let val_sets: Vec<Vec<bool>> = cfg
        .sources
        .iter()
        .zip(&counts)
        .map(|(src, &n)| mix::validation_set(n, cfg.validation_fraction, seed, src.display_name()))
        .collect();
    let mut train = Vec::new();
    let mut validation = Vec::new();
    let mut lens: Vec<(Vec<usize>, Vec<usize>)> = vec![Default::default(); selected.len()];
    for (id, &(s, r)) in mix::round_robin(&counts).iter().enumerate() {
        let it = &selected[s][r];
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
                source: cfg.sources[s].display_name().to_string(),
                interaction: id as u64,
                pair: item.pair,
            };
            if is_val {
                validation.push(ex);
            } else {
                train.push(ex);
            }
        }
    }
    for (sum, (p, c)) in summaries.iter_mut().zip(&lens) {
        sum.examples = sum.train.examples + sum.validation.examples;
        sum.desirable = sum.train.desirable + sum.validation.desirable;
        sum.undesirable = sum.train.undesirable + sum.validation.undesirable;
        sum.prompt_tokens = summary::TokenStats::of(p.iter().copied());
        sum.completion_tokens = summary::TokenStats::of(c.iter().copied());
    }
    (train, validation)
}

/// The data exactly as a training run with `cfg` sees it (train.max_length, train.seed, the
/// model's tokenizer, EOS and chat template), with the tokenizer it used.
pub fn prepare_for_run(cfg: &Config, strict: bool) -> Result<(PreparedData, TokenizerInfo)> {
    let info = resolve_tokenizer(cfg)?;
    let needs_template = matches!(
        cfg.data.prompt_format,
        PromptFormat::Template | PromptFormat::Auto
    );
    let chat_template = if needs_template && cfg.data.chat_template.is_none() {
        tokenizer::model_chat_template(cfg, &info)?
    } else {
        None
    };
    let opts = PrepareOptions {
        tokenizer: &info.tokenizer,
        eos_token_id: info.eos_token_id,
        max_length: cfg.train.max_length,
        seed: cfg.train.seed,
        strict,
        chat_template,
    };
    let prepared = prepare(&cfg.data, &opts)?;
    Ok((prepared, info))
}

/// The order in which one epoch feeds examples into micro-batches (src/data/order.rs).
pub use order::epoch_order;
