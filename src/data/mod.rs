//! Dataset sources, mixing, splitting and tokenization into KTO examples.
use crate::config::DataConfig;
use anyhow::{bail, Result};
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

pub fn prepare(_cfg: &DataConfig, _opts: &PrepareOptions) -> Result<PreparedData> {
    bail!("data pipeline not implemented yet")
}

/// The order in which one epoch feeds examples into micro-batches of `batch_size`: seeded by
/// (seed, epoch), each micro-batch mixes labels and never holds two examples of one interaction
/// where that is possible, so that the rotated KL pairs see mismatched prompts.
pub fn epoch_order(
    examples: &[KtoExample],
    _batch_size: usize,
    _seed: u64,
    _epoch: u64,
) -> Vec<usize> {
    (0..examples.len()).collect()
}

/// `kto-train data`: print the mix table of a config (and write the examples when asked).
pub fn run_data_command(
    _cfg: &crate::config::Config,
    _out: Option<&std::path::Path>,
    _strict: bool,
) -> Result<()> {
    bail!("data pipeline not implemented yet")
}
