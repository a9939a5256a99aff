//! Reading `metrics.jsonl`, the run's log of one JSON object per logging step (and per evaluation).
//!
//! The file is read while the run may still be appending to it, so an unparsable last line is a
//! write in progress and is left out; any other bad line is an error that names its line number,
//! because a plot silently missing a stretch of the run would mislead.
use crate::util::json::type_name;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Top-level keys of a line that describe the step rather than being metrics.
const LINE_FIELDS: [&str; 8] = [
    "step",
    "epoch",
    "lr",
    "eval",
    "tokens_per_second",
    "elapsed_seconds",
    "skipped_nonfinite",
    "metrics",
];

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLine {
    /// 1-based, as editors count, for messages.
    pub line_no: usize,
    /// Optimizer step; kept as f64 because it is only ever an x coordinate or printed.
    pub step: f64,
    pub epoch: Option<f64>,
    /// An evaluation line (metrics named `eval_...`), not a training log line.
    pub eval: bool,
    pub tokens_per_second: Option<f64>,
    pub elapsed_seconds: Option<f64>,
    pub skipped_nonfinite: Option<f64>,
    /// Every finite numeric metric of the line. The top-level `lr` of a training line appears here
    /// as `learning_rate` when the line has no such metric, so readers look in one place.
    pub metrics: BTreeMap<String, f64>,
}

/// The parsed log, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLog {
    pub lines: Vec<MetricsLine>,
    /// An unparsable last line (a write in progress) was left out.
    pub partial_last_line: bool,
}

impl MetricsLog {
    /// (step, value) of every line that has metric `name`, in file order.
    pub fn series(&self, name: &str) -> Vec<(f64, f64)> {
        self.lines
            .iter()
            .filter_map(|l| l.metrics.get(name).map(|v| (l.step, *v)))
            .collect()
    }

    /// Whether any line has metric `name`.
    pub fn has(&self, name: &str) -> bool {
        self.lines.iter().any(|l| l.metrics.contains_key(name))
    }

    /// The last training log line.
    pub fn last_train(&self) -> Option<&MetricsLine> {
        self.lines.iter().rev().find(|l| !l.eval)
    }

    /// The last evaluation line.
    pub fn last_eval(&self) -> Option<&MetricsLine> {
        self.lines.iter().rev().find(|l| l.eval)
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// Reads and parses `path` (see [`parse_metrics`]).
pub fn read_metrics(path: &Path) -> Result<MetricsLog> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the metrics log {} (does the run folder hold a run?)",
            path.display()
        )
    })?;
    // Lossy: a write cut in the middle of a multi-byte character must not make the whole file
    // unreadable; the cut line is then the unparsable last line.
    parse_metrics(&String::from_utf8_lossy(&bytes), path)
}

/// Parses the text of a metrics log; `path` only names the file in messages.
pub fn parse_metrics(text: &str, path: &Path) -> Result<MetricsLog> {
    let numbered: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut log = MetricsLog::default();
    for (k, &(line_no, line)) in numbered.iter().enumerate() {
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if k + 1 == numbered.len() => {
                log.partial_last_line = true;
                break;
            }
            Err(e) => bail!(
                "{} line {line_no}: not a JSON object ({e}): {}",
                path.display(),
                excerpt(line)
            ),
        };
        let parsed = parse_line(&value, line_no)
            .with_context(|| format!("{} line {line_no}", path.display()))?;
        log.lines.push(parsed);
    }
    Ok(log)
}

fn excerpt(line: &str) -> String {
    const MAX: usize = 80;
    match line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

fn finite(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn parse_line(value: &Value, line_no: usize) -> Result<MetricsLine> {
    let Some(obj) = value.as_object() else {
        bail!("expected a JSON object, found {}", type_name(value));
    };
    let step = match obj.get("step") {
        Some(v) => finite(v).with_context(|| format!("\"step\" is {v}, not a number"))?,
        None => bail!("no \"step\" field"),
    };
    let mut metrics = BTreeMap::new();
    match obj.get("metrics") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            // Non-finite values reach the file as null (serde_json's way of writing NaN): such a
            // metric is missing for this step, not an error.
            for (k, v) in m {
                if let Some(x) = finite(v) {
                    metrics.insert(k.clone(), x);
                }
            }
        }
        Some(v) => bail!("\"metrics\" is {}, not an object", type_name(v)),
    }
    // Numbers beside "metrics" are metrics too, so that a flat line layout reads the same.
    for (k, v) in obj {
        if LINE_FIELDS.contains(&k.as_str()) {
            continue;
        }
        if let Some(x) = finite(v) {
            metrics.entry(k.clone()).or_insert(x);
        }
    }
    let flagged = obj.get("eval").and_then(Value::as_bool);
    let eval = flagged
        .unwrap_or_else(|| !metrics.is_empty() && metrics.keys().all(|k| k.starts_with("eval_")));
    if !eval {
        if let Some(lr) = obj.get("lr").and_then(finite) {
            metrics.entry("learning_rate".to_string()).or_insert(lr);
        }
    }
    Ok(MetricsLine {
        line_no,
        step,
        epoch: obj.get("epoch").and_then(finite),
        eval,
        tokens_per_second: obj.get("tokens_per_second").and_then(finite),
        elapsed_seconds: obj.get("elapsed_seconds").and_then(finite),
        skipped_nonfinite: obj.get("skipped_nonfinite").and_then(finite),
        metrics,
    })
}
