//! `[data]`: which preference datasets to read, how to mix, split, format and cut them.
use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// The `[data]` section. Example (the seed run's mix):
///
/// ```toml
/// [data]
/// max_interactions_per_source = 1130
/// validation_fraction = 0.05
///
/// [[data.sources]]
/// kind = "hh-rlhf"
/// files = ["hh-rlhf/harmless-base/train.jsonl.gz"]
///
/// [[data.sources]]
/// kind = "shp"
/// files = ["shp/*/train.json"]
///
/// [[data.sources]]
/// kind = "oasst"
/// files = ["oasst1/train.parquet"]
/// langs = ["en"]
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The datasets to mix, one `[[data.sources]]` table each. At least one is needed to prepare
    /// data (the default, none, is only valid for commands that do not read data).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Most interactions (one prompt with its pairs or examples) taken from each source, after a
    /// seeded shuffle of that source; a source with fewer contributes all it has. Unset = no cap.
    /// A source's own `max_interactions` overrides it.
    #[serde(default)]
    pub max_interactions_per_source: Option<usize>,
    /// Fraction of each source's interactions held out for validation, in [0, 1). An interaction
    /// is never split between train and validation.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// How prompts and completions become text: `auto` (default, as TRL does it: message lists
    /// through the model's chat template, plain text as it is; without a chat template, message
    /// lists as in `raw`), `raw` (as the source has it; conversations from message-based sources
    /// use HH-RLHF's `\n\nHuman: ` / `\n\nAssistant: ` markers), `chatml`
    /// (`<|im_start|>role\ncontent<|im_end|>\n`) or `template` (the chat template for everything).
    #[serde(default)]
    pub prompt_format: PromptFormat,
    /// With `prompt_format = "template"` or `"auto"`: a tokenizer_config.json (its
    /// `chat_template`) or a .jinja file. Unset = the model folder's chat_template.jinja or
    /// tokenizer_config.json, or a GGUF file's `tokenizer.chat_template`.
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Cut prompts to this many tokens, keeping their end (the part next to the completion).
    /// Unset = no prompt cut (train.max_length still applies to prompt + completion).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// Cut completions (EOS included) to this many tokens, keeping their start. Unset = no cut.
    #[serde(default)]
    pub max_completion_length: Option<usize>,
}

fn default_validation_fraction() -> f64 {
    0.05
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            sources: Vec::new(),
            max_interactions_per_source: None,
            validation_fraction: default_validation_fraction(),
            prompt_format: PromptFormat::default(),
            chat_template: None,
            max_prompt_length: None,
            max_completion_length: None,
        }
    }
}

/// See [`DataConfig::prompt_format`].
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    #[default]
    Auto,
    Raw,
    Chatml,
    Template,
}

impl PromptFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptFormat::Auto => "auto",
            PromptFormat::Raw => "raw",
            PromptFormat::Chatml => "chatml",
            PromptFormat::Template => "template",
        }
    }
}

/// Which published layout a source's records follow.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// Anthropic HH-RLHF: `{"chosen", "rejected"}`, each a whole `\n\nHuman:`/`\n\nAssistant:` dialogue.
    #[serde(rename = "hh-rlhf")]
    HhRlhf,
    /// Stanford Human Preferences (SHP / SHP-2) rows: post_id, history, human_ref_A/B, labels, ...
    #[serde(rename = "shp")]
    Shp,
    /// OpenAssistant oasst1/oasst2: flat message rows or the nested message-trees export.
    #[serde(rename = "oasst")]
    Oasst,
    /// TRL preference records: prompt (optional with message lists), chosen, rejected.
    #[serde(rename = "preference")]
    Preference,
    /// TRL unpaired KTO records: prompt, completion, label (bool).
    #[serde(rename = "unpaired")]
    Unpaired,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::HhRlhf => "hh-rlhf",
            SourceKind::Shp => "shp",
            SourceKind::Oasst => "oasst",
            SourceKind::Preference => "preference",
            SourceKind::Unpaired => "unpaired",
        }
    }
}

/// File layout; `auto` decides from the file name (.jsonl, .ndjson, .json, .jsonl.gz, .json.gz,
/// .parquet). A `.json` file may hold a JSON array or JSON lines (SHP publishes JSON lines as
/// `train.json`): the first character decides.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum FileFormat {
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "jsonl")]
    Jsonl,
    #[serde(rename = "json")]
    Json,
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
    #[serde(rename = "parquet")]
    Parquet,
}

/// Which pairs an oasst prompt yields from its ranked assistant replies (rank 0 is best).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OasstPairs {
    /// Every two replies with different ranks (better one chosen).
    #[default]
    All,
    /// The best-ranked reply against each worse one.
    BestVsRest,
    /// The best-ranked reply against the worst-ranked one.
    BestVsWorst,
}

/// Which oasst messages pass on their `review_result`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReviewFilter {
    /// Only `review_result = true`.
    #[default]
    Passed,
    /// `true` or null (not reviewed); refuses `false`.
    NotFailed,
    /// No filter.
    Any,
}

/// One `[[data.sources]]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The record layout: `hh-rlhf`, `shp`, `oasst`, `preference` or `unpaired`.
    pub kind: SourceKind,
    /// Name in summaries and in each example's `source`; unique. Default: the kind.
    #[serde(default)]
    pub name: Option<String>,
    /// Data files (a single string is accepted too). Relative paths are relative to the config
    /// file's folder; `*` and `?` in a path component match several files (sorted).
    #[serde(deserialize_with = "one_or_many")]
    pub files: Vec<PathBuf>,
    /// File layout: `auto` (default; from the file name), `jsonl`, `json`, `jsonl.gz`, `parquet`.
    #[serde(default)]
    pub format: FileFormat,
    /// Per-source cap on interactions; overrides `max_interactions_per_source`.
    #[serde(default)]
    pub max_interactions: Option<usize>,
    /// SHP only: skip comment pairs whose score_ratio (higher score / lower score) is below this.
    /// Default 2.0, the SHP authors' recommendation; 0 keeps all.
    #[serde(default)]
    pub min_score_ratio: Option<f64>,
    /// SHP only: at most this many pairs per post (the highest score ratios are kept), as the SHP
    /// authors recommend to avoid overfitting to posts with many comments. Default 5.
    #[serde(default)]
    pub max_pairs_per_post: Option<usize>,
    /// oasst only: `all` (default), `best_vs_rest` or `best_vs_worst`.
    #[serde(default)]
    pub pairs: Option<OasstPairs>,
    /// oasst only: keep messages in these languages (e.g. ["en"]). Default: every language.
    #[serde(default)]
    pub langs: Option<Vec<String>>,
    /// oasst only: also use messages marked deleted. Default false.
    #[serde(default)]
    pub include_deleted: Option<bool>,
    /// oasst only: `passed` (default: review_result true), `not_failed` (true or null), `any`.
    #[serde(default)]
    pub review_result: Option<ReviewFilter>,
    /// preference and unpaired only: the record's own column names for TRL's fields, e.g.
    /// `columns = { prompt = "question", completion = "answer", label = "good" }`. Fields:
    /// prompt, chosen, rejected, completion, label, messages.
    #[serde(default)]
    pub columns: Option<std::collections::BTreeMap<String, String>>,
}

/// The fields `columns` may rename.
pub const COLUMN_FIELDS: [&str; 6] = [
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "messages",
];

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(p)) => Ok(vec![p]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "files: expected a path or a list of paths",
        )),
    }
}

pub const DEFAULT_MIN_SCORE_RATIO: f64 = 2.0;
pub const DEFAULT_MAX_PAIRS_PER_POST: usize = 5;

impl SourceConfig {
    /// A source of `kind` reading `files`, everything else at its default.
    pub fn new(kind: SourceKind, files: Vec<PathBuf>) -> Self {
        Self {
            kind,
            name: None,
            files,
            format: FileFormat::Auto,
            max_interactions: None,
            min_score_ratio: None,
            max_pairs_per_post: None,
            pairs: None,
            langs: None,
            include_deleted: None,
            review_result: None,
            columns: None,
        }
    }

    /// The record's name for TRL's field `field` (`columns`, else the field itself).
    pub fn column<'a>(&'a self, field: &'a str) -> &'a str {
        self.columns
            .as_ref()
            .and_then(|c| c.get(field))
            .map_or(field, String::as_str)
    }

    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.as_str())
    }

    pub fn min_score_ratio(&self) -> f64 {
        self.min_score_ratio.unwrap_or(DEFAULT_MIN_SCORE_RATIO)
    }

    pub fn max_pairs_per_post(&self) -> usize {
        self.max_pairs_per_post
            .unwrap_or(DEFAULT_MAX_PAIRS_PER_POST)
    }

    pub(crate) fn oasst_pairs(&self) -> OasstPairs {
        self.pairs.unwrap_or_default()
    }

    pub(crate) fn include_deleted(&self) -> bool {
        self.include_deleted.unwrap_or(false)
    }

    pub(crate) fn review_filter(&self) -> ReviewFilter {
        self.review_result.unwrap_or_default()
    }

    fn validate(&self) -> Result<()> {
        let kind = self.kind.as_str();
        if let Some(n) = &self.name {
            if n.trim().is_empty() {
                bail!("name is empty: give a non-empty name or leave it out (default: the kind)");
            }
        }
        if self.files.is_empty() {
            bail!("files is empty: list at least one data file");
        }
        if self.max_interactions == Some(0) {
            bail!("max_interactions = 0: must be at least 1 (or leave it out for no cap)");
        }
        let only = |key: &str, set: bool, allowed: SourceKind| -> Result<()> {
            if set && self.kind != allowed {
                bail!(
                    "{key} applies only to kind = \"{}\", not to kind = \"{kind}\"",
                    allowed.as_str()
                );
            }
            Ok(())
        };
        only(
            "min_score_ratio",
            self.min_score_ratio.is_some(),
            SourceKind::Shp,
        )?;
        only(
            "max_pairs_per_post",
            self.max_pairs_per_post.is_some(),
            SourceKind::Shp,
        )?;
        only("pairs", self.pairs.is_some(), SourceKind::Oasst)?;
        only("langs", self.langs.is_some(), SourceKind::Oasst)?;
        only(
            "include_deleted",
            self.include_deleted.is_some(),
            SourceKind::Oasst,
        )?;
        only(
            "review_result",
            self.review_result.is_some(),
            SourceKind::Oasst,
        )?;
        if let Some(cols) = &self.columns {
            if !matches!(self.kind, SourceKind::Preference | SourceKind::Unpaired) {
                bail!(
                    "columns applies only to kind = \"preference\" or \"unpaired\", not to kind = \"{kind}\" (its layout is the published one)"
                );
            }
            for (field, col) in cols {
                if !COLUMN_FIELDS.contains(&field.as_str()) {
                    bail!(
                        "columns: unknown field `{field}`; the fields are {}",
                        COLUMN_FIELDS.join(", ")
                    );
                }
                if col.trim().is_empty() {
                    bail!("columns.{field} is empty: give the record's column name");
                }
            }
        }
        if let Some(r) = self.min_score_ratio {
            if !(r.is_finite() && r >= 0.0) {
                bail!("min_score_ratio = {r}: must be a finite number >= 0 (0 keeps every pair)");
            }
        }
        if self.max_pairs_per_post == Some(0) {
            bail!("max_pairs_per_post = 0: must be at least 1");
        }
        if let Some(langs) = &self.langs {
            if langs.is_empty() || langs.iter().any(|l| l.trim().is_empty()) {
                bail!("langs must list language codes such as [\"en\"] (leave it out for all)");
            }
        }
        Ok(())
    }
}

impl DataConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = super::normalize_path(&base.join(&*p));
            }
        };
        for s in &mut self.sources {
            s.files.iter_mut().for_each(fix);
        }
        if let Some(t) = &mut self.chat_template {
            fix(t);
        }
    }

    /// The cap on interactions taken from `source`.
    pub(crate) fn cap_for(&self, source: &SourceConfig) -> Option<usize> {
        source.max_interactions.or(self.max_interactions_per_source)
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.validation_fraction.is_finite() && (0.0..1.0).contains(&self.validation_fraction))
        {
            bail!(
                "validation_fraction = {}: must be in [0, 1) (0 = no validation split)",
                self.validation_fraction
            );
        }
        if self.max_interactions_per_source == Some(0) {
            bail!(
                "max_interactions_per_source = 0: must be at least 1 (or leave it out for no cap)"
            );
        }
        if self.max_prompt_length == Some(0) {
            bail!("max_prompt_length = 0: must be at least 1 (or leave it out for no prompt cut)");
        }
        if self.max_completion_length == Some(0) {
            bail!(
                "max_completion_length = 0: must be at least 1 (or leave it out for no completion cut)"
            );
        }
        if self.chat_template.is_some()
            && !matches!(
                self.prompt_format,
                PromptFormat::Template | PromptFormat::Auto
            )
        {
            bail!(
                "chat_template is set but prompt_format = \"{}\": it is used only with prompt_format = \"template\" or \"auto\"",
                self.prompt_format.as_str()
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            s.validate()
                .map_err(|e| anyhow::anyhow!("sources[{i}] ({}): {e}", s.display_name()))?;
            if !names.insert(s.display_name()) {
                bail!(
                    "sources[{i}]: name `{}` is used by an earlier source; give each source a unique `name`",
                    s.display_name()
                );
            }
        }
        Ok(())
    }
}
