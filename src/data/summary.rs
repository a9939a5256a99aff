//! The mix summary: a text table for people and the same numbers as JSON for the run folder.
use super::report::{Issue, Tally};
use serde::Serialize;
use std::collections::BTreeMap;

/// How many issues per source the text table lists (the JSON lists more).
const TEXT_ISSUES: usize = 10;

#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenStats {
    pub min: usize,
    pub mean: f64,
    pub max: usize,
}

impl TokenStats {
    pub fn of(lengths: impl Iterator<Item = usize>) -> TokenStats {
        let (mut min, mut max, mut sum, mut n) = (usize::MAX, 0, 0usize, 0usize);
        for l in lengths {
            min = min.min(l);
            max = max.max(l);
            sum += l;
            n += 1;
        }
        if n == 0 {
            return TokenStats::default();
        }
        TokenStats {
            min,
            mean: sum as f64 / n as f64,
            max,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitCounts {
    pub interactions: usize,
    pub examples: usize,
    pub desirable: usize,
    pub undesirable: usize,
}

impl SplitCounts {
    pub(crate) fn add(&mut self, other: &SplitCounts) {
        self.interactions += other.interactions;
        self.examples += other.examples;
        self.desirable += other.desirable;
        self.undesirable += other.undesirable;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceSummary {
    pub name: String,
    pub kind: String,
    pub files: Vec<String>,
    pub records_read: usize,
    /// Bad input by reason (whole records, or single examples for empty completions).
    pub skipped: BTreeMap<&'static str, usize>,
    /// Records, messages or pairs left out by a rule or filter, by reason.
    pub filtered: BTreeMap<&'static str, usize>,
    /// Interactions the source holds after parsing (before the cap).
    pub interactions_available: usize,
    /// Interactions taken into the mix.
    pub interactions: usize,
    pub pairs: usize,
    pub examples: usize,
    pub desirable: usize,
    pub undesirable: usize,
    /// Examples of taken interactions dropped at tokenization, by reason.
    pub dropped_examples: BTreeMap<&'static str, usize>,
    pub prompt_tokens: TokenStats,
    /// Completion tokens, EOS included.
    pub completion_tokens: TokenStats,
    pub train: SplitCounts,
    pub validation: SplitCounts,
    pub issues: Vec<Issue>,
    pub issues_not_listed: usize,
}

impl SourceSummary {
    pub(crate) fn from_tally(name: &str, kind: &str, files: Vec<String>, tally: &Tally) -> Self {
        SourceSummary {
            name: name.to_string(),
            kind: kind.to_string(),
            files,
            records_read: tally.records_read,
            skipped: tally.skipped.clone(),
            filtered: tally.filtered.clone(),
            interactions_available: 0,
            interactions: 0,
            pairs: 0,
            examples: 0,
            desirable: 0,
            undesirable: 0,
            dropped_examples: tally.dropped.clone(),
            prompt_tokens: TokenStats::default(),
            completion_tokens: TokenStats::default(),
            train: SplitCounts::default(),
            validation: SplitCounts::default(),
            issues: tally.issues.clone(),
            issues_not_listed: tally.issues_total - tally.issues.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub prompt_format: String,
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub max_interactions_per_source: Option<usize>,
    pub validation_fraction: f64,
    pub eos_token_id: u32,
    pub sources: Vec<SourceSummary>,
    pub train: SplitCounts,
    pub validation: SplitCounts,
}

fn sum(m: &BTreeMap<&'static str, usize>) -> usize {
    m.values().sum()
}

fn stats(t: &TokenStats) -> String {
    format!("{}/{:.1}/{}", t.min, t.mean, t.max)
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

fn reasons(m: &BTreeMap<&'static str, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Summary {
    pub fn text(&self) -> String {
        let mut s = format!(
            "Data mix: seed {}, prompt format {}, max_length {}, max_prompt_length {}, \
             max_completion_length {}, validation fraction {}, EOS id {}\n\n",
            self.seed,
            self.prompt_format,
            self.max_length,
            self.max_prompt_length.map_or("-".into(), |v| v.to_string()),
            self.max_completion_length
                .map_or("-".into(), |v| v.to_string()),
            self.validation_fraction,
            self.eos_token_id,
        );
        let mut rows = vec![vec![
            "source".to_string(),
            "records".into(),
            "skipped".into(),
            "filtered".into(),
            "interactions (used/avail)".into(),
            "pairs".into(),
            "examples (D/U)".into(),
            "dropped".into(),
            "prompt tok min/mean/max".into(),
            "completion tok min/mean/max".into(),
            "train ex".into(),
            "val ex".into(),
        ]];
        for src in &self.sources {
            rows.push(vec![
                src.name.clone(),
                src.records_read.to_string(),
                sum(&src.skipped).to_string(),
                sum(&src.filtered).to_string(),
                format!("{}/{}", src.interactions, src.interactions_available),
                src.pairs.to_string(),
                format!("{} ({}/{})", src.examples, src.desirable, src.undesirable),
                sum(&src.dropped_examples).to_string(),
                stats(&src.prompt_tokens),
                stats(&src.completion_tokens),
                src.train.examples.to_string(),
                src.validation.examples.to_string(),
            ]);
        }
        let total = |f: &dyn Fn(&SourceSummary) -> usize| self.sources.iter().map(f).sum::<usize>();
        rows.push(vec![
            "total".into(),
            total(&|s| s.records_read).to_string(),
            total(&|s| sum(&s.skipped)).to_string(),
            total(&|s| sum(&s.filtered)).to_string(),
            format!(
                "{}/{}",
                total(&|s| s.interactions),
                total(&|s| s.interactions_available)
            ),
            total(&|s| s.pairs).to_string(),
            format!(
                "{} ({}/{})",
                total(&|s| s.examples),
                total(&|s| s.desirable),
                total(&|s| s.undesirable)
            ),
            total(&|s| sum(&s.dropped_examples)).to_string(),
            String::new(),
            String::new(),
            self.train.examples.to_string(),
            self.validation.examples.to_string(),
        ]);
        s.push_str(&table(&rows));
        for (title, split) in [("train", &self.train), ("validation", &self.validation)] {
            s.push_str(&format!(
                "{title}: {} examples ({} desirable, {} undesirable) from {} interactions\n",
                split.examples, split.desirable, split.undesirable, split.interactions
            ));
        }
        for src in &self.sources {
            let parts: Vec<(&str, &BTreeMap<&'static str, usize>)> = vec![
                ("skipped (bad input)", &src.skipped),
                ("filtered", &src.filtered),
                ("dropped at tokenization", &src.dropped_examples),
            ];
            for (what, m) in parts {
                if !m.is_empty() {
                    s.push_str(&format!("{}: {what}: {}\n", src.name, reasons(m)));
                }
            }
        }
        s.push_str(
            "(skipped: bad input, over all records read: whole records, or single examples for empty \
             completions; filtered: records, messages or pairs left out by a rule or filter; dropped: \
             examples of tokenized interactions, e.g. a prompt that fills max_length; with a cap, an \
             interaction left without examples is replaced by the next one in the source's order)\n",
        );
        for src in &self.sources {
            let total = src.issues.len() + src.issues_not_listed;
            for issue in src.issues.iter().take(TEXT_ISSUES) {
                s.push_str(&format!("  {issue}\n"));
            }
            if total > TEXT_ISSUES {
                s.push_str(&format!(
                    "  ... {} more issues in {} (the JSON summary lists the first {})\n",
                    total - TEXT_ISSUES,
                    src.name,
                    src.issues.len()
                ));
            }
        }
        s
    }
}
