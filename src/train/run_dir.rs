//! A run's output folder and its lifecycle: one writer at a time (a lock), a start decided only
//! after everything else was validated (fresh, resumed, replaced), the run's description, the
//! metrics log, checkpoints, adapters, and a finished mark written last.
//!
//! Layout: `adapter/` (final PEFT adapter and model card), `best/` (lowest validation loss),
//! `checkpoints/step-N/`, `config.toml`, `data_summary.txt|json`, `metrics.jsonl`, `plots/`,
//! `eval_results.json`, and `kto-train-run.json` (the manifest: what wrote the folder, whether
//! the run finished, which config changes a resume accepted).
//!
//! kto-train only ever deletes or rewrites a folder it recognizes as its own run (it holds the
//! manifest, or the layout an earlier version wrote), and only the entries listed in
//! [`RUN_ENTRIES`].
use super::checkpoint::{self, Checkpoint};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The manifest: written when a run starts, marked finished when everything else is written.
pub const MANIFEST: &str = "kto-train-run.json";
/// The lock file; its content is the holder's pid (for the message a second run gets).
pub const LOCK: &str = ".kto-train.lock";
/// What a run writes, and all that `--overwrite` removes.
pub const RUN_ENTRIES: [&str; 13] = [
    "adapter",
    "best",
    "checkpoints",
    "plots",
    "config.toml",
    "data_summary.txt",
    "data_summary.json",
    "metrics.jsonl",
    "metrics.csv",
    "samples.jsonl",
    "tensorboard",
    "eval_results.json",
    MANIFEST,
];

/// Config keys a resumed run may change without `--allow-config-change`: they decide when the
/// run logs, evaluates, checkpoints and reports, not what it trains (a key names itself and every
/// key below it).
pub const RESUME_MAY_CHANGE: [&str; 9] = [
    "train.log_every",
    "train.eval_every",
    "train.eval_on_start",
    "train.save_every",
    "train.keep_checkpoints",
    "train.reference_cache",
    "train.max_consecutive_nonfinite",
    "eval",
    "output",
];

/// Keys a resume may change when it extends a finished run or rewinds to an earlier checkpoint
/// (recorded in the manifest like any accepted change).
pub const EXTEND_MAY_CHANGE: [&str; 2] = ["train.max_steps", "train.epochs"];

/// How the user asked the run to start.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub resume: bool,
    pub overwrite: bool,
    /// `--resume-from`: continue from this checkpoint of the run instead of the newest (later
    /// checkpoints and metrics lines are dropped).
    pub resume_from: Option<PathBuf>,
    /// Config keys (or tables) a resume may change besides [`RESUME_MAY_CHANGE`].
    pub allow_config_change: Vec<String>,
}

/// How a run starts in its folder (rank 0 sends it to the other ranks of a run).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Start {
    Fresh,
    /// From this checkpoint.
    Resume(PathBuf),
    /// `--resume` of a run that already finished all the steps its config asks for.
    AlreadyFinished,
}

/// What the folder holds before the run touches it.
#[derive(Debug)]
enum Contents {
    /// Nothing (or only the lock).
    Empty,
    /// A kto-train run.
    Run {
        finished: bool,
        newest_checkpoint: Option<(usize, PathBuf)>,
    },
    /// Files kto-train did not write.
    Foreign(Vec<String>),
}

pub struct RunDir {
    root: PathBuf,
    /// Held for the whole run (released when the process ends, however it ends).
    _lock: std::fs::File,
    /// The folder did not exist before this run.
    created: bool,
    /// The lock file did not exist before this run.
    lock_created: bool,
}

impl RunDir {
    /// Takes the folder's lock, creating the folder when it does not exist. A second run on the
    /// same folder fails at once, naming the holder; the lock of a process that died is released
    /// with it, so a stale lock never blocks.
    pub fn lock(root: &Path) -> Result<Self> {
        if root.as_os_str().is_empty() {
            bail!("output.dir is empty: name the run's folder");
        }
        let created = !root.exists();
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create output folder {}", root.display()))?;
        let path = root.join(LOCK);
        let lock_created = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            let holder = holder.trim();
            match e {
                std::fs::TryLockError::WouldBlock => bail!(
                    "{} is in use by another kto-train run (pid {}); wait for it to end or choose \
                     another output.dir",
                    root.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                ),
                std::fs::TryLockError::Error(e) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Self {
            root: root.to_path_buf(),
            _lock: file,
            created,
            lock_created,
        })
    }

    /// Gives the folder back as it was after a run that failed before touching it: the lock
    /// file this run created is removed, and so is the folder when this run created it and
    /// nothing else is in it.
    pub fn abandon(self) {
        if self.lock_created {
            std::fs::remove_file(self.root.join(LOCK)).ok();
        }
        if self.created {
            // Only an empty folder: remove_dir refuses anything else.
            std::fs::remove_dir(&self.root).ok();
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn adapter_dir(&self) -> PathBuf {
        self.root.join("adapter")
    }

    pub fn best_dir(&self) -> PathBuf {
        self.root.join("best")
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn eval_results_path(&self) -> PathBuf {
        self.root.join("eval_results.json")
    }

    fn manifest(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.root.join(MANIFEST)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn contents(&self) -> Result<Contents> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .with_context(|| format!("cannot read {}", self.root.display()))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.retain(|n| n != LOCK && !is_temporary(n));
        names.sort();
        if names.is_empty() {
            return Ok(Contents::Empty);
        }
        let has = |n: &str| names.iter().any(|x| x == n);
        let finished = match self.manifest() {
            Some(m) => m["finished"].as_bool() == Some(true),
            // The layout versions before the manifest wrote; finished when the card was written.
            None if has("config.toml")
                && (has("metrics.jsonl") || has("checkpoints"))
                && names.iter().all(|n| RUN_ENTRIES.contains(&n.as_str())) =>
            {
                self.root.join("adapter/README.md").is_file()
            }
            None => return Ok(Contents::Foreign(names)),
        };
        let newest_checkpoint = checkpoint::list(&self.checkpoints_dir())?.pop();
        Ok(Contents::Run {
            finished,
            newest_checkpoint,
        })
    }

    /// Decides how the run starts, once its config, model, data and benchmarks were all
    /// validated. Only here does anything in the folder change: a replaced run's entries are
    /// removed, and a fresh run's manifest and description are written.
    /// `total_steps` is what the config asks for: a finished run resumed with more (a raised
    /// `train.max_steps` or `train.epochs`) is extended from its last checkpoint.
    pub fn begin(
        &self,
        request: &StartRequest,
        config_toml: &str,
        data: &crate::data::PreparedData,
        total_steps: usize,
    ) -> Result<Start> {
        let root = self.root.display();
        if let Some(from) = &request.resume_from {
            return self.begin_from(from, request, config_toml, total_steps);
        }
        let fresh = match self.contents()? {
            Contents::Foreign(names) => bail!(
                "{root} holds files that no kto-train run wrote ({}); kto-train writes only into an \
                 empty folder or its own run folder: choose another output.dir",
                names.join(", ")
            ),
            Contents::Empty => {
                if request.resume {
                    eprintln!("--resume: {root} holds no run yet; starting from the beginning");
                }
                true
            }
            Contents::Run { finished: true, .. } if request.overwrite => {
                self.remove_run()?;
                true
            }
            Contents::Run {
                finished: true,
                newest_checkpoint: Some((step, dir)),
            } if request.resume && total_steps > self.planned_steps().unwrap_or(step) => {
                self.accept_config(config_toml, request, step, &EXTEND_MAY_CHANGE)?;
                eprintln!("--resume: extending the finished run in {root} from step {step} to {total_steps}");
                self.mark_unfinished()?;
                self.set_planned_steps(total_steps)?;
                return Ok(Start::Resume(dir));
            }
            Contents::Run {
                finished: true,
                newest_checkpoint,
            } if request.resume => {
                let step = newest_checkpoint.map_or(0, |(s, _)| s);
                self.accept_config(config_toml, request, step, &[])?;
                return Ok(Start::AlreadyFinished);
            }
            Contents::Run { finished: true, .. } => bail!(
                "{root} already holds a finished run; pass --overwrite to replace it or choose another output.dir"
            ),
            Contents::Run {
                newest_checkpoint: Some((step, dir)),
                ..
            } if request.resume => {
                self.accept_config(config_toml, request, step, &[])?;
                return Ok(Start::Resume(dir));
            }
            Contents::Run {
                newest_checkpoint: Some((step, _)),
                ..
            } if !request.overwrite => bail!(
                "{root} holds an unfinished run (last checkpoint: step {step}); continue it with \
                 --resume, or replace it with --overwrite"
            ),
            Contents::Run { .. } => {
                // Replaced, or killed before its first checkpoint: nothing to continue from.
                if request.resume {
                    eprintln!("--resume: no checkpoint in {root} yet; starting from the beginning");
                }
                self.remove_run()?;
                true
            }
        };
        debug_assert!(fresh);
        write_json_atomic(
            &self.root.join(MANIFEST),
            &json!({
                "tool": "kto-train",
                "version": env!("CARGO_PKG_VERSION"),
                "finished": false,
                "planned_steps": total_steps,
                "config_changes": [],
            }),
        )?;
        crate::data::write_summary(&self.root, data)?;
        write_atomic(&self.root.join("config.toml"), config_toml.as_bytes())?;
        Ok(Start::Fresh)
    }

    /// `--resume-from DIR`: DIR must be one of this run's checkpoints; the checkpoints after it
    /// are removed (the metrics after its step are cut when the log opens), and a finished run
    /// counts as unfinished again.
    fn begin_from(
        &self,
        from: &Path,
        request: &StartRequest,
        config_toml: &str,
        total_steps: usize,
    ) -> Result<Start> {
        let list = checkpoint::list(&self.checkpoints_dir())?;
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        let Some((step, dir)) = list
            .iter()
            .find(|(_, d)| canon(d).is_some() && canon(d) == canon(from))
            .cloned()
        else {
            let have: Vec<String> = list.iter().map(|(_, d)| d.display().to_string()).collect();
            bail!(
                "--resume-from {}: not a checkpoint of the run in {} (its checkpoints: {})",
                from.display(),
                self.root.display(),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            );
        };
        self.accept_config(config_toml, request, step, &EXTEND_MAY_CHANGE)?;
        self.set_planned_steps(total_steps)?;
        for (later, d) in list.iter().filter(|(s, _)| *s > step) {
            eprintln!("--resume-from: removing the later checkpoint of step {later}");
            checkpoint::remove(d)?;
        }
        self.mark_unfinished()?;
        Ok(Start::Resume(dir))
    }

    /// The optimizer steps the run was started (or last extended) for; None in folders written
    /// before the manifest recorded it.
    fn planned_steps(&self) -> Option<usize> {
        self.manifest()?["planned_steps"]
            .as_u64()
            .map(|n| n as usize)
    }

    fn set_planned_steps(&self, steps: usize) -> Result<()> {
        self.update_manifest(|m| m["planned_steps"] = json!(steps))
    }

    fn mark_unfinished(&self) -> Result<()> {
        self.update_manifest(|m| m["finished"] = Value::Bool(false))
    }

    /// Reads the manifest (a bare one when it is missing), changes it, writes it atomically.
    fn update_manifest(&self, change: impl FnOnce(&mut Value)) -> Result<()> {
        let mut manifest = self
            .manifest()
            .unwrap_or_else(|| json!({"tool": "kto-train"}));
        change(&mut manifest);
        write_json_atomic(&self.root.join(MANIFEST), &manifest)
    }

    /// Removes every entry a run writes (and only those).
    fn remove_run(&self) -> Result<()> {
        // The manifest goes first: a removal cut short leaves a folder without it, which is
        // then no longer trusted as a finished run.
        for name in std::iter::once(MANIFEST).chain(RUN_ENTRIES) {
            let p = self.root.join(name);
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
            }
        }
        Ok(())
    }

    /// A resume continues the same run: its training settings must be those the run started
    /// with, except the keys [`RESUME_MAY_CHANGE`] and `--allow-config-change` name; the changes
    /// accepted that way are recorded in the manifest, and config.toml shows the new values.
    fn accept_config(
        &self,
        new_toml: &str,
        request: &StartRequest,
        step: usize,
        also: &[&str],
    ) -> Result<()> {
        let path = self.root.join("config.toml");
        let old_toml = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the run's config {}", path.display()))?;
        let old: toml::Table = toml::from_str(&old_toml)
            .with_context(|| format!("{} does not parse", path.display()))?;
        let new: toml::Table = toml::from_str(new_toml).expect("a serialized config parses");
        let changed = changed_keys(&old, &new);
        let covered = |key: &str, list: &[&str]| {
            list.iter()
                .any(|k| key == *k || key.starts_with(&format!("{k}.")))
        };
        let allowed: Vec<&str> = request
            .allow_config_change
            .iter()
            .map(String::as_str)
            .chain(also.iter().copied())
            .collect();
        let refused: Vec<&String> = changed
            .keys()
            .filter(|k| !covered(k, &RESUME_MAY_CHANGE) && !covered(k, &allowed))
            .collect();
        if !refused.is_empty() {
            let list: Vec<String> = refused
                .iter()
                .map(|k| {
                    let (a, b) = &changed[*k];
                    format!("{k}: {} -> {}", show(a), show(b))
                })
                .collect();
            bail!(
                "--resume: the config differs from the one the run in {} started with:\n  {}\n\
                 A resumed run is the same run: restore these values, or accept the change with \
                 --allow-config-change {} (recorded in {MANIFEST})",
                self.root.display(),
                list.join("\n  "),
                refused
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        let recorded: Vec<Value> = changed
            .iter()
            .filter(|(k, _)| !covered(k, &RESUME_MAY_CHANGE))
            .map(|(k, (a, b))| json!({"step": step, "key": k, "from": show(a), "to": show(b)}))
            .collect();
        if !changed.is_empty() {
            self.update_manifest(|m| match m["config_changes"].as_array_mut() {
                Some(list) => list.extend(recorded),
                None => m["config_changes"] = Value::Array(recorded),
            })?;
            write_atomic(&path, new_toml.as_bytes())?;
        }
        Ok(())
    }

    /// The metrics log, opened for appending: emptied for a fresh run, cut back to the lines up
    /// to `resumed_at` for a resumed one (the lines it will not write again).
    pub fn open_metrics(&self, resumed_at: Option<usize>) -> Result<MetricsWriter> {
        let path = self.metrics_path();
        match resumed_at {
            Some(step) => truncate_jsonl(&path, step)?,
            None => write_atomic(&path, b"")?,
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsWriter { file })
    }

    pub fn samples_path(&self) -> PathBuf {
        self.root.join("samples.jsonl")
    }

    /// samples.jsonl cut back to the lines up to `step` (a resumed run writes the rest again).
    pub fn cut_samples(&self, step: usize) -> Result<()> {
        truncate_jsonl(&self.samples_path(), step)
    }

    /// Appends lines to samples.jsonl.
    pub fn append_samples(&self, lines: &[serde_json::Value]) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.samples_path())
            .with_context(|| format!("cannot open {}", self.samples_path().display()))?;
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Writes a checkpoint, keeping the newest `keep`.
    pub fn save_checkpoint(&self, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
        checkpoint::save(&self.checkpoints_dir(), ck, keep)
    }

    /// The last write of a run: from here on the folder counts as finished.
    pub fn mark_finished(&self) -> Result<()> {
        self.update_manifest(|m| m["finished"] = Value::Bool(true))
    }
}

/// Names of the temporary files atomic writes and checkpoint writes use.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp.") || name.starts_with(".tmp-"))
}

/// Every key whose value differs between two configs (`table.key` paths; arrays compared
/// whole), with its old and new value (None where absent).
fn changed_keys(
    old: &toml::Table,
    new: &toml::Table,
) -> BTreeMap<String, (Option<toml::Value>, Option<toml::Value>)> {
    fn walk(
        prefix: &str,
        a: Option<&toml::Value>,
        b: Option<&toml::Value>,
        out: &mut BTreeMap<String, (Option<toml::Value>, Option<toml::Value>)>,
    ) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    walk(&format!("{prefix}{k}."), x.get(k), y.get(k), out);
                }
            }
            (a, b) if a != b => {
                out.insert(
                    prefix.trim_end_matches('.').to_string(),
                    (a.cloned(), b.cloned()),
                );
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        Some(&toml::Value::Table(old.clone())),
        Some(&toml::Value::Table(new.clone())),
        &mut out,
    );
    out
}

fn show(v: &Option<toml::Value>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "(unset)".into(),
    }
}

/// metrics.jsonl, one JSON object per line.
pub struct MetricsWriter {
    file: std::fs::File,
}

impl MetricsWriter {
    /// One write per line, so a reader never sees a line cut in the middle (only, at worst, a
    /// last line still being written).
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        self.file.write_all(format!("{v}\n").as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// A JSON-lines log (metrics.jsonl, samples.jsonl) cut back to the lines up to `step`.
fn truncate_jsonl(path: &Path, step: usize) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_lists_every_difference_by_path() {
        let a: toml::Table =
            toml::from_str("[train]\nlr = 1.0\nlog_every = 1\n[data]\nx = [1]").unwrap();
        let b: toml::Table =
            toml::from_str("[train]\nlr = 2.0\nlog_every = 1\nseed = 3\n[data]\nx = [1, 2]")
                .unwrap();
        let keys: Vec<String> = changed_keys(&a, &b).into_keys().collect();
        assert_eq!(keys, ["data.x", "train.lr", "train.seed"]);
        assert!(changed_keys(&a, &a).is_empty());
    }
}
