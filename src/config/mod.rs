//! The run description: one TOML file, every knob in it, refused before any work starts when a key
//! is unknown or a value is out of range.
mod compute;
mod data;
mod eval;
mod locate;
mod loss;
mod model;
mod train;

pub use compute::*;
pub use data::*;
pub use eval::*;
pub use loss::*;
pub use model::*;
pub use train::*;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Folder of the run: adapter, checkpoints, metrics, summaries.
    #[serde(default = "default_output_dir")]
    pub dir: PathBuf,
    /// Also write the metrics as TensorBoard event files into output.dir/tensorboard/
    /// (`tensorboard --logdir runs/`).
    #[serde(default)]
    pub tensorboard: bool,
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs/latest")
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: default_output_dir(),
            tensorboard: false,
        }
    }
}

impl Config {
    /// Reads `path`, applies `key=value` overrides, resolves relative paths against the config
    /// file's folder (those given with `--set`: against the current folder) and validates every
    /// section. Errors name the file, the key and its line, or
    /// the `--set` that gave the value.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let file = path.display();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {file}"))?;
        let mut value: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{file}: invalid TOML: {e}"))?;
        let mut set_keys = Vec::new();
        for o in overrides {
            set_keys.push(apply_override(&mut value, o).with_context(|| format!("--set {o}"))?);
        }
        let mut cfg = match Config::deserialize(toml::Value::Table(value)) {
            Ok(cfg) => cfg,
            Err(e) => return Err(locate::type_error(path, &text, overrides, &set_keys, &e)),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.check_output_dir(path)?;
        cfg.validate()
            .map_err(|e| locate::validation_error(path, &text, overrides, &set_keys, e))?;
        Ok(cfg)
    }

    /// The run folder is never the config file's own folder (the run would write its
    /// config.toml over a config there) and never empty (an empty path is that folder too).
    fn check_output_dir(&self, config: &Path) -> Result<()> {
        let dir = &self.output.dir;
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        let config_dir = config.parent().filter(|p| !p.as_os_str().is_empty());
        let same = match config_dir {
            Some(c) => canon(c).is_some() && canon(c) == canon(dir),
            None => canon(Path::new(".")) == canon(dir),
        };
        if same {
            bail!(
                "[output] dir = {}: that is the folder of the config file {}; a run writes its own \
                 files (config.toml, metrics.jsonl, ...) into output.dir: choose a folder of its own, \
                 e.g. runs/NAME",
                dir.display(),
                config.display()
            );
        }
        Ok(())
    }

    /// Parses a config from a string (no path resolution); used by tests and `--set`-only runs.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize_path(&base.join(&*p));
            }
        };
        fix(&mut self.output.dir);
        self.model.resolve_paths(base);
        self.data.resolve_paths(base);
        self.eval.resolve_paths(base);
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate().context("[model]")?;
        self.lora.validate().context("[lora]")?;
        self.loss.validate().context("[loss]")?;
        self.data.validate().context("[data]")?;
        self.train.validate().context("[train]")?;
        self.eval.validate().context("[eval]")?;
        if self.loss.needs_kl() && self.train.eval_batch_size == Some(1) {
            bail!(
                "[train] eval_batch_size = 1: the KL reference point needs at least 2 examples per \
                 evaluation micro-batch; with 1 no validation loss would ever be computed"
            );
        }
        if self.loss.needs_kl() && self.train.batch_size < 2 {
            bail!(
                "[train] batch_size = {}: the KL reference point needs batch_size >= 2 \
                 (each example is paired with another example's completion)",
                self.train.batch_size
            );
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// `base/../x` -> `x` without touching the file system (paths shown to users and written into
/// adapter_config.json stay readable).
pub fn normalize_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let last = out.components().next_back();
                if matches!(last, Some(Component::Normal(_))) {
                    out.pop();
                } else if !matches!(last, Some(Component::RootDir)) {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// `a.b.c=value`: value parsed as a TOML value (number, bool, string, array), else taken as a
/// string. A value that starts with a quote or bracket but does not parse is refused (a shell's
/// lost quote must not become a path); so is an empty one. Returns the key.
pub(crate) fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<String> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("expected key=value, got `{assignment}`"))?;
    let key = key.trim();
    let raw = raw.trim();
    if raw.is_empty() {
        bail!("no value after `=`: give one, e.g. --set {key}=VALUE (quote strings that contain spaces)");
    }
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(e) if raw.starts_with(['"', '\'', '[', '{']) => {
            bail!("`{raw}` is not a valid TOML value ({})", e.message())
        }
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("invalid key `{key}`");
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| anyhow::anyhow!("`{p}` in `{key}` is not a table"))?;
    }
    let mut value = value;
    if let Ok(cwd) = std::env::current_dir() {
        paths_from_cwd(parts[parts.len() - 1], &mut value, &cwd);
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(key.to_string())
}

/// Keys whose string values are file or folder paths.
const PATH_KEYS: [&str; 7] = [
    "dir",
    "tokenizer",
    "chat_template",
    "files",
    "data",
    "fewshot_data",
    "init_from",
];

/// A path given on the command line means what the shell means by it: relative to the current
/// folder, not to the config file's (paths written in the file stay relative to the file). A
/// `name_or_path` is a path only when it looks like one or exists here (else it is a hub id).
fn paths_from_cwd(key: &str, value: &mut toml::Value, cwd: &Path) {
    match value {
        toml::Value::String(s) => {
            let p = Path::new(s.as_str());
            let is_path = PATH_KEYS.contains(&key)
                || (key == "name_or_path"
                    && (s.starts_with('.') || s.starts_with('/') || cwd.join(p).exists()));
            if is_path && p.is_relative() && !s.is_empty() {
                *s = normalize_path(&cwd.join(p)).display().to_string();
            }
        }
        toml::Value::Array(items) => {
            for v in items {
                paths_from_cwd(key, v, cwd);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                paths_from_cwd(k, v, cwd);
            }
        }
        _ => {}
    }
}
