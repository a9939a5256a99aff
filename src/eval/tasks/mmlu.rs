//! MMLU (hendrycks/test): one headerless CSV per subject and split, records
//! `question,A,B,C,D,answer`. The harness's `mmlu` tasks: the subject's description, the first
//! `k` dev records as examples, `question.strip()` with lettered choices and "Answer:", scored
//! continuations " A" .. " D".
use super::{fewshot_context, read_text, select_fewshot, LoadOptions, McItem, Sampler, Target};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One MMLU question.
#[derive(Debug, Clone, PartialEq)]
pub struct MmluDoc {
    /// `file:line`.
    pub source: String,
    pub question: String,
    pub choices: [String; 4],
    pub answer: usize,
}

impl MmluDoc {
    fn same_question(&self, other: &Self) -> bool {
        self.question == other.question
            && self.choices == other.choices
            && self.answer == other.answer
    }

    /// The harness's `doc_to_text`.
    pub fn text(&self) -> String {
        let [a, b, c, d] = &self.choices;
        format!(
            "{}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:",
            super::py_strip(&self.question)
        )
    }
}

/// The harness's per-subject description.
pub(crate) fn description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

/// One CSV record and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRecord {
    pub line: usize,
    pub fields: Vec<String>,
}

/// RFC 4180 CSV (quoted fields may hold commas, `""` and line breaks; LF or CRLF), read with the
/// `csv` crate as Python's csv reader reads it: blank lines are skipped, records may have any
/// number of fields. Errors give the line. The crate accepts a quoted field that is never closed
/// (it runs to the end of the file); that is refused here, since the question it swallowed would
/// be lost silently.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    // The crate's own line count advances once per record, not per line break inside quotes:
    // lines come from the byte offsets instead.
    let line_at = |byte: usize| {
        1 + text.as_bytes()[..byte]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    };
    let mut records = Vec::new();
    let mut last_start = 0;
    for result in reader.records() {
        let r = result.map_err(|e| {
            let line = e.position().map_or(0, |p| line_at(p.byte() as usize));
            (line, e.to_string())
        })?;
        let pos = r
            .position()
            .expect("records read from text have a position");
        // The position is where reading began: before the line breaks (and skipped blank
        // lines) that precede the record.
        let from = pos.byte() as usize;
        last_start = from
            + text.as_bytes()[from..]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
        records.push(CsvRecord {
            line: line_at(last_start),
            fields: r.iter().map(str::to_string).collect(),
        });
    }
    if let Some(last) = records.last() {
        if unterminated_quote(&text[last_start..]) {
            return Err((
                last.line,
                "unterminated quoted field (a `\"` is never closed)".to_string(),
            ));
        }
    }
    Ok(records)
}

/// Whether the text of a file's last record opens a quoted field that it never closes: a field
/// starts with `"` and the record holds an odd number of quotes (each closed field has an even
/// number: its two delimiters and doubled inner quotes).
fn unterminated_quote(record: &str) -> bool {
    let opens_quoted = record.starts_with('"') || record.contains(",\"");
    opens_quoted && record.matches('"').count() % 2 == 1
}

/// Every question of one subject's CSV; a malformed record is an error naming file and line.
pub fn load_csv(path: &Path) -> Result<Vec<MmluDoc>> {
    let text = read_text(path)?;
    let records =
        parse_csv(&text).map_err(|(l, msg)| anyhow::anyhow!("{}:{l}: {msg}", path.display()))?;
    let mut docs = Vec::with_capacity(records.len());
    for (n, r) in records.into_iter().enumerate() {
        let where_ = format!("{}:{} (record {})", path.display(), r.line, n + 1);
        if r.fields.len() != 6 {
            bail!(
                "{where_}: expected 6 fields (question,A,B,C,D,answer), got {}",
                r.fields.len()
            );
        }
        let letter = r.fields[5].trim();
        let Some(answer) = LETTERS.iter().position(|l| *l == letter) else {
            bail!("{where_}: answer must be one of A, B, C, D, got {letter:?}");
        };
        let mut f = r.fields.into_iter();
        let question = f.next().expect("6 fields");
        let choices = [
            f.next().expect("6 fields"),
            f.next().expect("6 fields"),
            f.next().expect("6 fields"),
            f.next().expect("6 fields"),
        ];
        docs.push(MmluDoc {
            source: where_,
            question,
            choices,
            answer,
        });
    }
    Ok(docs)
}

/// `astronomy_test.csv` -> `astronomy` (the split suffix of hendrycks/test's file names).
pub fn subject_of(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in ["_test", "_val", "_dev"] {
        if let Some(s) = stem.strip_suffix(suffix) {
            return s.to_string();
        }
    }
    stem
}

fn csv_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read folder {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    Ok(files)
}

/// The subject files to score: one CSV, a folder of them, or hendrycks/test's `data/` folder
/// (which holds `test/` and `dev/`).
pub(crate) fn test_files(data: &Path) -> Result<Vec<PathBuf>> {
    if data.is_file() {
        return Ok(vec![data.to_path_buf()]);
    }
    if !data.is_dir() {
        bail!("MMLU data {} does not exist", data.display());
    }
    let dir = if data.join("test").is_dir() {
        data.join("test")
    } else {
        data.to_path_buf()
    };
    let files = csv_files(&dir)?;
    if files.is_empty() {
        bail!(
            "{}: no MMLU CSV files (expected SUBJECT_test.csv)",
            dir.display()
        );
    }
    Ok(files)
}

/// The dev file of `subject`: in `fewshot` (a file or a folder) when given, else in the `dev/`
/// folder next to the test files, as hendrycks/test lays them out.
pub(crate) fn dev_file(test_file: &Path, subject: &str, fewshot: Option<&Path>) -> Result<PathBuf> {
    let name = format!("{subject}_dev.csv");
    let candidates: Vec<PathBuf> = match fewshot {
        Some(p) if p.is_file() => vec![p.to_path_buf()],
        Some(p) => vec![p.join(&name), p.join("dev").join(&name)],
        None => {
            let dir = test_file.parent().unwrap_or(Path::new("."));
            vec![
                dir.join(&name),
                dir.join("..").join("dev").join(&name),
                dir.join("dev").join(&name),
            ]
        }
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no few-shot (dev) file for MMLU subject `{subject}`: looked for {}; pass \
             --fewshot-data DIR (hendrycks/test's data/dev) or --shots 0",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Scored items of one subject: description, the first `shots` dev records, the question.
pub(crate) fn build_items(
    subject: &str,
    docs: &[MmluDoc],
    dev: &[MmluDoc],
    shots: usize,
) -> Vec<McItem> {
    let desc = description(subject);
    docs.iter()
        .map(|doc| {
            let examples: Vec<(String, String)> =
                select_fewshot(dev, doc, shots, Sampler::FirstN, MmluDoc::same_question)
                    .into_iter()
                    .map(|d| (d.text(), LETTERS[d.answer].to_string()))
                    .collect();
            McItem {
                source: doc.source.clone(),
                group: Some(subject.to_string()),
                context: fewshot_context(&desc, &examples, &doc.text()),
                choices: LETTERS.iter().map(|l| l.to_string()).collect(),
                target: Target::Index(doc.answer),
            }
        })
        .collect()
}

pub(super) fn load_items(data: &Path, shots: usize, opts: &LoadOptions) -> Result<Vec<McItem>> {
    let mut items = Vec::new();
    for file in test_files(data)? {
        let subject = subject_of(&file);
        let mut docs = load_csv(&file)?;
        if let Some(n) = opts.limit {
            docs.truncate(n);
        }
        let dev = if shots > 0 {
            let p = dev_file(&file, &subject, opts.fewshot_data.as_deref())?;
            let dev = load_csv(&p)?;
            if dev.len() < shots {
                bail!(
                    "{}: {} records, too few for {shots}-shot examples",
                    p.display(),
                    dev.len()
                );
            }
            dev
        } else {
            Vec::new()
        };
        items.extend(build_items(&subject, &docs, &dev, shots));
    }
    Ok(items)
}
