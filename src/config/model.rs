use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The seven projections of a Llama decoder block that LoRA can target, in PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Projection {
    /// Every projection, in a decoder block's order (attention q, k, v, o; MLP gate, up, down).
    pub const ALL: [Projection; 7] = [
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
    ];

    /// PEFT's (and transformers') module name.
    pub fn name(self) -> &'static str {
        match self {
            Projection::QProj => "q_proj",
            Projection::KProj => "k_proj",
            Projection::VProj => "v_proj",
            Projection::OProj => "o_proj",
            Projection::GateProj => "gate_proj",
            Projection::UpProj => "up_proj",
            Projection::DownProj => "down_proj",
        }
    }

    /// The submodule of a decoder layer that holds it (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Projection::QProj | Projection::KProj | Projection::VProj | Projection::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }

    /// Every module name, for messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|p| p.name()).collect()
    }
}

impl std::fmt::Display for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Projection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown module `{s}`; allowed are {:?}",
                    Projection::names()
                )
            })
    }
}

impl Serialize for Projection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Projection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

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

    pub fn validate(&self) -> anyhow::Result<()> {
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
    #[serde(default = "default_targets", deserialize_with = "projections")]
    pub target_modules: Vec<Projection>,
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
fn projections<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Projection>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, String>>()
        .map_err(|e| serde::de::Error::custom(format!("target_modules: {e}")))
}

fn default_targets() -> Vec<Projection> {
    Projection::ALL.to_vec()
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
    pub fn validate(&self) -> anyhow::Result<()> {
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
            bail!(
                "target_modules is empty: allowed are {:?}",
                Projection::names()
            );
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
