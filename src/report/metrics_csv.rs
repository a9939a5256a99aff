//! `metrics.csv`: the run's `metrics.jsonl` as one table for spreadsheets and pandas, rewritten
//! (atomically) whenever the plots are: one row per line, a column per metric any line has.
use super::metrics_log::{read_metrics, MetricsLog};
use crate::util::atomic::write_atomic;
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const METRICS_CSV: &str = "metrics.csv";

/// Writes `run_dir/metrics.csv` from `run_dir/metrics.jsonl`; returns its path.
pub fn write_metrics_csv(run_dir: &Path) -> Result<PathBuf> {
    let log = read_metrics(&run_dir.join(super::METRICS_FILE))?;
    let path = run_dir.join(METRICS_CSV);
    write_atomic(&path, &to_csv(&log)?)?;
    Ok(path)
}

/// The table: step, epoch, eval, tokens_per_second, elapsed_seconds, skipped_nonfinite, then
/// every metric name in sorted order; a line without a value leaves its cell empty.
pub fn to_csv(log: &MetricsLog) -> Result<Vec<u8>> {
    let names: BTreeSet<&str> = log
        .lines
        .iter()
        .flat_map(|l| l.metrics.keys().map(String::as_str))
        .collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let fixed = [
        "step",
        "epoch",
        "eval",
        "tokens_per_second",
        "elapsed_seconds",
        "skipped_nonfinite",
    ];
    w.write_record(fixed.iter().copied().chain(names.iter().copied()))?;
    let cell = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for l in &log.lines {
        let mut row = vec![
            l.step.to_string(),
            cell(l.epoch),
            l.eval.to_string(),
            cell(l.tokens_per_second),
            cell(l.elapsed_seconds),
            cell(l.skipped_nonfinite),
        ];
        row.extend(names.iter().map(|n| cell(l.metrics.get(*n).copied())));
        w.write_record(&row)?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::metrics_log::parse_metrics;

    #[test]
    fn every_metric_gets_a_column_and_missing_cells_stay_empty() {
        let text = concat!(
            r#"{"step":1,"epoch":0.5,"lr":0.0002,"tokens_per_second":10.5,"metrics":{"loss":0.69}}"#,
            "\n",
            r#"{"step":2,"epoch":1.0,"eval":true,"metrics":{"eval_loss":0.6,"eval_pair_accuracy":0.75}}"#,
            "\n"
        );
        let log = parse_metrics(text, Path::new("metrics.jsonl")).unwrap();
        let csv = String::from_utf8(to_csv(&log).unwrap()).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "step,epoch,eval,tokens_per_second,elapsed_seconds,skipped_nonfinite,eval_loss,eval_pair_accuracy,learning_rate,loss"
        );
        assert_eq!(lines[1], "1,0.5,false,10.5,,,,,0.0002,0.69");
        assert_eq!(lines[2], "2,1,true,,,,0.6,0.75,,");
        assert_eq!(lines.len(), 3);
    }
}
