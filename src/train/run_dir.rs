//! A run's output folder and its lifecycle: refuse to clobber a finished run, find the checkpoint
//! to resume from, clear what a fresh start must not inherit, write the run's description, the
//! metrics log, checkpoints and adapters.
//!
//! Layout: `adapter/` (final PEFT adapter and model card), `best/` (lowest validation loss),
//! `checkpoints/step-N/`, `config.toml`, `data_summary.txt|json`, `metrics.jsonl`, `plots/`,
//! `eval_results.json`.
use super::checkpoint::{self, Checkpoint};
use crate::util::atomic::write_atomic;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files of the final adapter that mark a run as finished.
const FINISHED_MARK: &str = "adapter/adapter_config.json";

pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn adapter_dir(&self) -> PathBuf {
        self.root.join("adapter")
    }

    pub(crate) fn best_dir(&self) -> PathBuf {
        self.root.join("best")
    }

    pub(crate) fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub(crate) fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub(crate) fn eval_results_path(&self) -> PathBuf {
        self.root.join("eval_results.json")
    }

    /// Whether a run finished here (its final adapter was written).
    pub(crate) fn is_finished(&self) -> bool {
        self.root.join(FINISHED_MARK).exists()
    }

    /// Decides how a run starts in this folder: refuses a finished run unless `overwrite`;
    /// returns the newest checkpoint with `resume` (None when there is none yet: a run killed
    /// before its first checkpoint loses nothing by starting over); clears the old adapter
    /// (`overwrite`) and, for a fresh start, old checkpoints.
    pub(crate) fn prepare(
        &self,
        resume: bool,
        overwrite: bool,
        quiet: bool,
    ) -> Result<Option<PathBuf>> {
        let finished = self.is_finished();
        if finished && !overwrite {
            bail!(
                "{} already holds a finished run; pass --overwrite to replace it or choose another output.dir",
                self.root.display()
            );
        }
        let checkpoints = self.checkpoints_dir();
        let resume_from = if resume {
            let newest = checkpoint::list(&checkpoints)?.pop().map(|(_, p)| p);
            if newest.is_none() && !quiet {
                eprintln!(
                    "--resume: no checkpoint in {} yet; starting from the beginning",
                    checkpoints.display()
                );
            }
            newest
        } else {
            None
        };
        if finished && overwrite {
            std::fs::remove_dir_all(self.adapter_dir()).ok();
        }
        if resume_from.is_none() && checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints).with_context(|| {
                format!("cannot clear old checkpoints in {}", checkpoints.display())
            })?;
        }
        Ok(resume_from)
    }

    /// Creates the folder and writes the run's description: the data summary and the resolved
    /// config.
    pub(crate) fn describe(
        &self,
        data: &crate::data::PreparedData,
        config_toml: &str,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create output folder {}", self.root.display()))?;
        crate::data::write_summary(&self.root, data)?;
        write_atomic(&self.root.join("config.toml"), config_toml.as_bytes())
    }

    /// The metrics log, opened for appending: emptied for a fresh run, cut back to the lines up
    /// to `resumed_at` for a resumed one (the lines it will not write again).
    pub(crate) fn open_metrics(&self, resumed_at: Option<usize>) -> Result<MetricsWriter> {
        let path = self.metrics_path();
        match resumed_at {
            Some(step) => truncate_metrics(&path, step)?,
            None => write_atomic(&path, b"")?,
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsWriter { file })
    }

    /// Writes a checkpoint, keeping the newest `keep`.
    pub(crate) fn save_checkpoint(&self, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
        checkpoint::save(&self.checkpoints_dir(), ck, keep)
    }
}

/// metrics.jsonl, one JSON object per line.
pub struct MetricsWriter {
    file: std::fs::File,
}

impl MetricsWriter {
    /// One write per line, so a reader never sees a line cut in the middle (only, at worst, a
    /// last line still being written).
    pub(crate) fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        self.file.write_all(format!("{v}\n").as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// metrics.jsonl cut back to the lines up to `step`.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}
