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
pub fn description(subject: &str) -> String {
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

/// RFC 4180 CSV (quoted fields may hold commas, `""` and line breaks; LF or CRLF); blank lines
/// are skipped, as Python's csv reader yields nothing for them. Errors give the line.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    let mut at_field_start = true;
    let end_record =
        |fields: &mut Vec<String>, field: &mut String, records: &mut Vec<CsvRecord>, rl| {
            fields.push(std::mem::take(field));
            let f = std::mem::take(fields);
            if !(f.len() == 1 && f[0].is_empty()) {
                records.push(CsvRecord {
                    line: rl,
                    fields: f,
                });
            }
        };
    while let Some(c) = chars.next() {
        match c {
            '"' if at_field_start => {
                let start = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err((
                                start,
                                "unterminated quoted field (a `\"` is never closed)".to_string(),
                            ))
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            field.push(ch);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(other) => {
                        return Err((
                            line,
                            format!("unexpected {other:?} after a closing quote (expected `,`)"),
                        ))
                    }
                }
                at_field_start = false;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_record(&mut fields, &mut field, &mut records, record_line);
                line += 1;
                record_line = line;
                at_field_start = true;
            }
            ch => {
                field.push(ch);
                at_field_start = false;
            }
        }
    }
    if !fields.is_empty() || !field.is_empty() {
        end_record(&mut fields, &mut field, &mut records, record_line);
    }
    Ok(records)
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
pub fn test_files(data: &Path) -> Result<Vec<PathBuf>> {
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
pub fn dev_file(test_file: &Path, subject: &str, fewshot: Option<&Path>) -> Result<PathBuf> {
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
pub fn build_items(subject: &str, docs: &[MmluDoc], dev: &[MmluDoc], shots: usize) -> Vec<McItem> {
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
