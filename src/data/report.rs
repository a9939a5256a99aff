//! Counting and reporting of bad or filtered input, per source.
use super::reader::Loc;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// How many individual issues a summary lists per source (all are counted).
pub const MAX_LISTED_ISSUES: usize = 50;

/// A bad input entry: reported with where it is, counted, skipped; `strict` makes it an error.
#[derive(Debug, Clone, Serialize)]
pub struct Issue {
    pub file: String,
    /// 1-based line (JSON lines) or record number (JSON array, Parquet row): see `unit`.
    pub line: usize,
    /// `line` or `record`.
    pub unit: &'static str,
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unit == "line" {
            write!(f, "{}:{}", self.file, self.line)?;
        } else {
            write!(f, "{} (record {})", self.file, self.line)?;
        }
        write!(
            f,
            ": field `{}`: {} [{}]",
            self.field, self.message, self.reason
        )
    }
}

/// Reasons for bad input (strict mode fails on these).
pub mod reason {
    /// A line that is not valid JSON, or a record that is not a JSON object.
    pub const MALFORMED: &str = "malformed_record";
    pub const MISSING_FIELD: &str = "missing_field";
    pub const WRONG_TYPE: &str = "wrong_type";
    /// A value of the right type that the source's format does not allow.
    pub const BAD_VALUE: &str = "bad_value";
    /// Empty or whitespace-only prompt: the whole record is skipped.
    pub const EMPTY_PROMPT: &str = "empty_prompt";
    /// Empty or whitespace-only completion: only that example is skipped.
    pub const EMPTY_COMPLETION: &str = "empty_completion";
    /// HH-RLHF: chosen and rejected dialogues differ before their last reply.
    pub const PROMPT_MISMATCH: &str = "prompt_mismatch";
    /// HH-RLHF: a dialogue without any `\n\nAssistant:` turn.
    pub const NO_ASSISTANT_TURN: &str = "no_assistant_turn";
    /// The chat template failed or did not render the prompt as a prefix of prompt + completion.
    pub const TEMPLATE: &str = "template_error";
}

/// Reasons for records left out by a rule or a filter (not errors; strict mode keeps going).
pub mod filter {
    pub const IDENTICAL_COMPLETIONS: &str = "identical_completions";
    pub const SCORE_RATIO: &str = "score_ratio_below_min";
    pub const PAIRS_PER_POST: &str = "over_max_pairs_per_post";
    pub const DELETED: &str = "deleted";
    pub const REVIEW: &str = "review_result";
    pub const LANG: &str = "lang";
    /// oasst: the parent message is not in the data.
    pub const MISSING_PARENT: &str = "missing_parent";
    /// oasst: an ancestor was skipped, so the conversation path is incomplete.
    pub const ANCESTOR_SKIPPED: &str = "ancestor_skipped";
}

/// Examples dropped at tokenization.
pub mod drop {
    /// The prompt alone fills max_length: no completion token would be left.
    pub const PROMPT_TOO_LONG: &str = "prompt_too_long";
}

/// Per-source counts of what was read, skipped and why.
#[derive(Debug, Default)]
pub struct Tally {
    pub strict: bool,
    pub records_read: usize,
    pub skipped: BTreeMap<&'static str, usize>,
    pub filtered: BTreeMap<&'static str, usize>,
    pub dropped: BTreeMap<&'static str, usize>,
    pub issues: Vec<Issue>,
    pub issues_total: usize,
}

impl Tally {
    pub fn new(strict: bool) -> Self {
        Self {
            strict,
            ..Default::default()
        }
    }

    /// Reports bad input at `loc` in `field`; with `strict` the first one is an error.
    pub fn bad(
        &mut self,
        loc: &Loc,
        field: &str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Result<()> {
        let issue = Issue {
            file: loc.file.display().to_string(),
            line: loc.index,
            unit: if loc.is_line { "line" } else { "record" },
            field: field.to_string(),
            reason,
            message: message.into(),
        };
        if self.strict {
            bail!(
                "{loc}: field `{field}`: {} ({reason}; strict mode stops at the first bad record)",
                issue.message
            );
        }
        *self.skipped.entry(reason).or_default() += 1;
        self.issues_total += 1;
        if self.issues.len() < MAX_LISTED_ISSUES {
            self.issues.push(issue);
        }
        Ok(())
    }

    pub fn filtered(&mut self, reason: &'static str, n: usize) {
        if n > 0 {
            *self.filtered.entry(reason).or_default() += n;
        }
    }

    pub(crate) fn dropped(&mut self, reason: &'static str, n: usize) {
        if n > 0 {
            *self.dropped.entry(reason).or_default() += n;
        }
    }
}
