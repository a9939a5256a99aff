//! Turns a run folder into something a person reads: PNG plots of `metrics.jsonl`, the same log as
//! `metrics.csv`, and a model card (`README.md`) beside the adapter.
//!
//! Everything here reads the run folder's files, never the training loop's state, so that
//! `kto-train plot RUN_DIR` can redraw a finished, crashed or still running run the same way the
//! loop does at each log.
pub mod card;
pub mod metrics_csv;
pub mod metrics_log;
pub mod plots;
pub mod tensorboard;

pub use card::write_model_card;
pub use metrics_csv::write_metrics_csv;
pub use metrics_log::{read_metrics, MetricsLine, MetricsLog};
pub use plots::draw_plots;

use anyhow::{bail, Result};
use std::path::Path;

/// Name of the metrics log inside a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Folder of the PNG plots inside a run folder.
pub const PLOTS_DIR: &str = "plots";

/// `kto-train plot RUN_DIR`: redraws the plots, and the model card when the run has written its
/// final adapter. `best/` gets no card here: the card's final metrics describe the last step, not
/// the step `best/` was taken at.
pub fn run_plot_command(run_dir: &Path) -> Result<()> {
    if !run_dir.is_dir() {
        bail!("run folder {} does not exist", run_dir.display());
    }
    let plots = draw_plots(run_dir)?;
    eprintln!("wrote {}", write_metrics_csv(run_dir)?.display());
    for p in &plots {
        eprintln!("wrote {}", p.display());
    }
    if plots.is_empty() {
        eprintln!(
            "{} has no complete metrics line yet: no plot drawn",
            run_dir.join(METRICS_FILE).display()
        );
    }
    let adapter = run_dir.join("adapter");
    if adapter.is_dir() {
        let card = write_model_card(run_dir, &adapter)?;
        eprintln!("wrote {}", card.display());
    }
    Ok(())
}

/// How the card and the plot ticks print a metric: four decimals in the everyday range, scientific
/// notation for learning rates and other tiny or huge values, so that no value prints as 0.0000.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if (1e-3..1e5).contains(&a) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}
