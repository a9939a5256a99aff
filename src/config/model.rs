use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const ALL_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A local Hugging Face model folder, or a hub id such as `HuggingFaceTB/SmolLM2-360M`
    /// resolved through the Hugging Face cache.
    pub name_or_path: String,
    /// Hub revision (branch, tag or commit) for hub ids.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Optional tokenizer.json overriding the model folder's own.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

fn default_revision() -> String {
    "main".into()
}

impl ModelConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        let local = |s: &str| s.starts_with('.') || s.starts_with('/') || base.join(s).exists();
        if local(&self.name_or_path) && Path::new(&self.name_or_path).is_relative() {
            self.name_or_path = super::normalize_path(&base.join(&self.name_or_path))
                .display()
                .to_string();
        }
        if let Some(t) = &self.tokenizer {
            if Path::new(t).is_relative() {
                self.tokenizer = Some(super::normalize_path(&base.join(t)).display().to_string());
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.name_or_path.trim().is_empty() {
            bail!("name_or_path is empty: give a local model folder or a hub id (ORG/NAME)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update B A.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the LoRA branch input during training.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Which projections get an adapter (any of q,k,v,o,gate,up,down _proj).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[serde(default)]
    pub use_rslora: bool,
    /// Start from an existing PEFT adapter folder instead of PEFT's fresh init.
    #[serde(default)]
    pub init_from: Option<String>,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<String> {
    ALL_TARGET_MODULES.iter().map(|s| s.to_string()).collect()
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_targets(),
            use_rslora: false,
            init_from: None,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("r = 0: the LoRA rank must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("alpha = {}: must be a positive number", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout = {}: must be in [0, 1)", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!("target_modules is empty: allowed are {ALL_TARGET_MODULES:?}");
        }
        for m in &self.target_modules {
            if !ALL_TARGET_MODULES.contains(&m.as_str()) {
                bail!("target_modules: unknown module `{m}`; allowed are {ALL_TARGET_MODULES:?}");
            }
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.target_modules {
            if !seen.insert(m) {
                bail!("target_modules: `{m}` is listed twice");
            }
        }
        Ok(())
    }
}
