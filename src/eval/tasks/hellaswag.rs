//! HellaSwag (rowanz/hellaswag JSONL, or the Hugging Face copy whose `label` is a string):
//! the harness's `process_docs`: query = preprocess(activity_label + ": " + ctx_a + " " +
//! ctx_b.capitalize()), choices = preprocessed endings, gold = label.
use super::{fewshot_context, read_text, select_fewshot, LoadOptions, McItem, Sampler, Target};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One processed HellaSwag record.
#[derive(Debug, Clone, PartialEq)]
pub struct HellaswagDoc {
    /// `file:line`.
    pub source: String,
    pub query: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

impl HellaswagDoc {
    /// Same question (the harness compares documents, not where they came from).
    pub fn same_question(&self, other: &Self) -> bool {
        self.key() == other.key()
    }

    fn key(&self) -> (&str, &[String], usize) {
        (&self.query, &self.choices, self.gold)
    }
}

/// The harness's `preprocess`: strip, " [title]" -> ". ", drop `[...]` markup (WikiHow rows),
/// then one pass of "  " -> " ".
pub fn preprocess(text: &str) -> String {
    let text = super::py_strip(text).replace(" [title]", ". ");
    remove_bracketed(&text).replace("  ", " ")
}

/// `re.sub(r"\[.*?\]", "", text)`: each shortest `[...]` on one line (`.` stops at '\n').
fn remove_bracketed(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        let after = &rest[i + 1..];
        match after.find([']', '\n']) {
            Some(j) if after.as_bytes()[j] == b']' => {
                out.push_str(&rest[..i]);
                rest = &after[j + 1..];
            }
            // No match starting at this '[': keep it and try from the next character.
            _ => {
                out.push_str(&rest[..=i]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Python's `str.capitalize()`: first character upper case, every other one lower case.
pub fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(c) => c
            .to_uppercase()
            .chain(chars.as_str().to_lowercase().chars())
            .collect(),
    }
}

/// The harness's `_process_doc` on one raw record.
pub fn process_doc(
    source: String,
    activity_label: &str,
    ctx_a: &str,
    ctx_b: &str,
    endings: &[String],
    gold: usize,
) -> HellaswagDoc {
    let ctx = format!("{ctx_a} {}", capitalize(ctx_b));
    HellaswagDoc {
        source,
        query: preprocess(&format!("{activity_label}: {ctx}")),
        choices: endings.iter().map(|e| preprocess(e)).collect(),
        gold,
    }
}

fn parse_record(v: &Value, where_: &str) -> Result<HellaswagDoc> {
    if !v.is_object() {
        bail!("{where_}: expected a JSON object (a HellaSwag record)");
    }
    let text = |k: &str| -> Result<&str> {
        match v.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => bail!("{where_}: field `{k}` must be a string"),
            None => bail!("{where_}: missing field `{k}`"),
        }
    };
    let endings: Vec<String> = match v.get("endings") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                e.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{where_}: `endings` must hold strings"))
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("{where_}: field `endings` must be a list of strings"),
        None => bail!("{where_}: missing field `endings`"),
    };
    if endings.len() < 2 {
        bail!(
            "{where_}: `endings` has {} entries, need at least 2",
            endings.len()
        );
    }
    // rowanz's files give an int, the Hugging Face copy a string; its test split has "".
    let gold = match v.get("label") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if s.trim().is_empty() => bail!(
            "{where_}: `label` is empty (HellaSwag's test split is unlabelled; score the \
             validation split)"
        ),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
        None => bail!("{where_}: missing field `label`"),
    }
    .with_context(|| format!("{where_}: `label` must be an integer, got {}", v["label"]))?
        as usize;
    if gold >= endings.len() {
        bail!(
            "{where_}: `label` {gold} is out of range for {} endings",
            endings.len()
        );
    }
    Ok(process_doc(
        where_.to_string(),
        text("activity_label")?,
        text("ctx_a")?,
        text("ctx_b")?,
        &endings,
        gold,
    ))
}

/// Every record of a HellaSwag JSONL file; a malformed one is an error naming file and line.
pub fn load_docs(path: &Path) -> Result<Vec<HellaswagDoc>> {
    let text = read_text(path)?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{where_}: not valid JSON: {e}"))?;
        docs.push(parse_record(&v, &where_)?);
    }
    Ok(docs)
}

/// Scored items: each question preceded by `shots` examples drawn from `fewshot` (seeded).
pub(crate) fn build_items(
    docs: &[HellaswagDoc],
    fewshot: &[HellaswagDoc],
    shots: usize,
    seed: u64,
) -> Vec<McItem> {
    docs.iter()
        .enumerate()
        .map(|(i, doc)| {
            let examples: Vec<(String, String)> = select_fewshot(
                fewshot,
                doc,
                shots,
                Sampler::Random {
                    seed,
                    item: i as u64,
                },
                HellaswagDoc::same_question,
            )
            .into_iter()
            .map(|d| (d.query.clone(), d.choices[d.gold].clone()))
            .collect();
            McItem {
                source: doc.source.clone(),
                group: None,
                context: fewshot_context("", &examples, &doc.query),
                choices: doc.choices.clone(),
                target: Target::Index(doc.gold),
            }
        })
        .collect()
}

pub(super) fn load_items(data: &Path, shots: usize, opts: &LoadOptions) -> Result<Vec<McItem>> {
    let mut docs = load_docs(data)?;
    if let Some(n) = opts.limit {
        docs.truncate(n);
    }
    let fewshot = match (&opts.fewshot_data, shots) {
        (_, 0) => Vec::new(),
        (Some(p), _) => load_docs(p)?,
        (None, k) => bail!(
            "hellaswag with {k} shots needs --fewshot-data: a HellaSwag JSONL file to draw the \
             examples from (the harness uses the train split); or pass --shots 0"
        ),
    };
    if shots > 0 {
        let src = opts.fewshot_data.as_deref().unwrap_or(data);
        // Each question must find `shots` examples other than itself (counted through a map:
        // the train split has tens of thousands of records).
        let mut copies: std::collections::HashMap<(&str, &[String], usize), usize> =
            std::collections::HashMap::new();
        for d in &fewshot {
            *copies.entry(d.key()).or_default() += 1;
        }
        for doc in &docs {
            let others = fewshot.len() - copies.get(&doc.key()).copied().unwrap_or(0);
            if others < shots {
                bail!(
                    "{}: {} records, too few for {shots}-shot examples of {} (the question itself \
                     is never its own example)",
                    src.display(),
                    fewshot.len(),
                    doc.source
                );
            }
        }
    }
    Ok(build_items(&docs, &fewshot, shots, opts.seed))
}
