//! Finding a model's files: a local Hugging Face folder, a llama.cpp GGUF file ([`gguf`]), or a
//! hub id resolved through the Hugging Face cache exactly as Python does it (a branch, tag or
//! commit hash revision; downloaded there with hf-hub as a last resort, unless HF_HUB_OFFLINE is
//! set, from `HF_ENDPOINT` with `HF_TOKEN` or the login token), and the few config.json fields
//! that more than one reader needs.
pub mod gguf;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How a model's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A Hugging Face folder: config.json and safetensors (one file or shards).
    Safetensors,
    /// One GGUF file holding the config (metadata), the weights and usually the tokenizer.
    Gguf,
}

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub format: WeightFormat,
    /// config.json (the GGUF file itself for GGUF).
    pub config: PathBuf,
    /// One file, or the shards listed by model.safetensors.index.json (the GGUF file).
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// The name the user gave (hub id or path), for adapter_config.json.
    pub name: String,
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (as Python does).
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The access token, as Python's huggingface_hub finds it: `HF_TOKEN`, else the token file
/// (`HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`) that
/// `huggingface-cli login` writes. `env` reads an environment variable.
pub fn hub_token(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(t) = var("HF_TOKEN") {
        return Some(t.trim().to_string());
    }
    let file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| {
        var("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(var("HOME").unwrap_or_default())
                    .join(".cache")
                    .join("huggingface")
            })
            .join("token")
    });
    let t = std::fs::read_to_string(file).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The hub client: `HF_ENDPOINT` (a mirror) when set, the token of [`hub_token`].
fn hub_api(cache_dir: &Path) -> Result<hf_hub::api::sync::Api> {
    let env = |k: &str| std::env::var(k).ok();
    let mut b =
        hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.to_path_buf()))
            .with_token(hub_token(env))
            .with_progress(true);
    if let Some(e) = env("HF_ENDPOINT").filter(|e| !e.trim().is_empty()) {
        b = b.with_endpoint(e.trim_end_matches('/').to_string());
    }
    Ok(b.build()?)
}

/// A full commit hash (40 hex digits), which names a snapshot folder directly.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A model's snapshot folder in the cache, as Python's huggingface_hub finds it: a commit hash
/// revision is the folder's name; a branch or tag names the commit in refs/<revision>.
fn cached_snapshot(cache_dir: &Path, name: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(format!("models--{}", name.replace('/', "--")));
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = repo_dir.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// A file of a cached snapshot, when it is there.
fn cached_file(snapshot: &Option<PathBuf>, file: &str) -> Option<PathBuf> {
    let p = snapshot.as_ref()?.join(file);
    p.exists().then_some(p)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Model files from a local folder.
pub fn local_model_files(dir: &Path, name: &str) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!(
            "model folder {} has no config.json (expected a Hugging Face model folder)",
            dir.display()
        );
    }
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        shards_from_index(&index, |f| Ok(dir.join(f)))?
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        bail!(
            "model folder {} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    };
    for w in &weights {
        if !w.is_file() {
            bail!("weights file {} is missing", w.display());
        }
    }
    let tok = dir.join("tokenizer.json");
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        format: WeightFormat::Safetensors,
        config,
        weights,
        tokenizer: tok.is_file().then_some(tok),
        name: name.to_string(),
    })
}

/// Whether `p` names a GGUF file (by its extension; it is then read as one).
pub fn is_gguf(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A GGUF file as a model: config, weights and tokenizer are all inside it.
pub fn gguf_model_files(path: &Path, name: &str) -> Result<ModelFiles> {
    if !crate::util::fs::exists(path, "GGUF file")? {
        bail!("GGUF file {} does not exist", path.display());
    }
    if !path.is_file() {
        bail!("{} is not a file", path.display());
    }
    Ok(ModelFiles {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        format: WeightFormat::Gguf,
        config: path.to_path_buf(),
        weights: vec![path.to_path_buf()],
        tokenizer: None,
        name: name.to_string(),
    })
}

fn shards_from_index(
    index: &Path,
    mut fetch: impl FnMut(&str) -> Result<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object `weight_map`", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .map(|f| {
            f.as_str().map(str::to_string).with_context(|| {
                format!("{}: weight_map values must be file names", index.display())
            })
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    files.iter().map(|f| fetch(f)).collect()
}

/// Resolves a local folder or a hub id (through the HF cache; downloaded with hf-hub when it is
/// not cached and HF_HUB_OFFLINE is not set).
pub fn resolve_model(name_or_path: &str, revision: &str) -> Result<ModelFiles> {
    resolve_model_in(name_or_path, revision, &hf_cache_dir(), offline())
}

/// [`resolve_model`] with the cache folder and offline mode given explicitly.
pub fn resolve_model_in(
    name_or_path: &str,
    revision: &str,
    cache_dir: &Path,
    offline: bool,
) -> Result<ModelFiles> {
    let p = Path::new(name_or_path);
    if crate::util::fs::exists(p, "model folder")? && p.is_dir() {
        return local_model_files(p, name_or_path);
    }
    if is_gguf(p) {
        return gguf_model_files(p, name_or_path);
    }
    if !looks_like_hub_id(name_or_path) {
        bail!(
            "model folder {name_or_path} does not exist (give a Hugging Face model folder with \
             config.json and model.safetensors, or a hub id such as HuggingFaceTB/SmolLM2-360M)"
        );
    }
    let cache_dir = cache_dir.to_path_buf();
    let repo = hf_hub::Repo::with_revision(
        name_or_path.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let snapshot = cached_snapshot(&cache_dir, name_or_path, revision);
    let cached = |f: &str| cached_file(&snapshot, f);
    if let Some(config) = cached("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let weights = if let Some(index) = cached("model.safetensors.index.json") {
            shards_from_index(&index, |f| {
                cached(f).with_context(|| {
                    format!(
                        "shard {f} of {name_or_path} is not in the cache at {}",
                        dir.display()
                    )
                })
            })?
        } else if let Some(w) = cached("model.safetensors") {
            vec![w]
        } else {
            bail!(
                "{name_or_path} is in the cache at {} but without model.safetensors; \
                 download it again (huggingface-cli download {name_or_path})",
                dir.display()
            );
        };
        return Ok(ModelFiles {
            dir,
            format: WeightFormat::Safetensors,
            config,
            weights,
            tokenizer: cached("tokenizer.json"),
            name: name_or_path.to_string(),
        });
    }
    let where_ = cache_dir.join(format!("models--{}", name_or_path.replace('/', "--")));
    if offline {
        bail!(
            "model {name_or_path} (revision {revision}) is not in the Hugging Face cache: looked in {} \
             (HF_HUB_OFFLINE is set, so nothing is downloaded). Obtain it with \
             `huggingface-cli download {name_or_path}` on a machine with network access and copy the \
             cache, set HF_HOME/HF_HUB_CACHE to where it is, or point model.name_or_path at a local folder",
            where_.display()
        );
    }
    download(name_or_path, &repo, &cache_dir).with_context(|| {
        format!(
            "model {name_or_path} is not in the Hugging Face cache ({}) and could not be downloaded; \
             download it with `huggingface-cli download {name_or_path}` or give a local folder",
            where_.display()
        )
    })
}

/// The folder holding a model's config.json and tokenizer files, without needing its weights:
/// a local folder, or the hub snapshot in the cache (config and tokenizer files downloaded
/// there when missing and HF_HUB_OFFLINE is not set). Used by `kto-train data`.
pub(crate) fn resolve_model_dir(name_or_path: &str, revision: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if crate::util::fs::exists(p, "model folder")? && p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !looks_like_hub_id(name_or_path) {
        bail!("model folder {name_or_path} does not exist");
    }
    let cache_dir = hf_cache_dir();
    let repo = hf_hub::Repo::with_revision(
        name_or_path.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let snapshot = cached_snapshot(&cache_dir, name_or_path, revision);
    let wanted = ["config.json", "tokenizer.json"];
    if let Some(c) = cached_file(&snapshot, "config.json")
        .filter(|_| cached_file(&snapshot, "tokenizer.json").is_some())
    {
        return Ok(c.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let where_ = cache_dir.join(format!("models--{}", name_or_path.replace('/', "--")));
    if offline() {
        bail!(
            "{name_or_path}: config.json and tokenizer.json are not in the Hugging Face cache \
             (looked in {}; HF_HUB_OFFLINE is set); download them or set model.tokenizer",
            where_.display()
        );
    }
    let api = hub_api(&cache_dir)?.repo(repo);
    let mut dir = PathBuf::new();
    for f in wanted {
        let path = api
            .get(f)
            .with_context(|| format!("cannot download {f} of {name_or_path}"))?;
        dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    api.get("tokenizer_config.json").ok();
    Ok(dir)
}

fn download(name: &str, repo: &hf_hub::Repo, cache_dir: &Path) -> Result<ModelFiles> {
    let api = hub_api(cache_dir)?.repo(repo.clone());
    let config = api.get("config.json")?;
    let weights = match api.get("model.safetensors.index.json") {
        Ok(index) => shards_from_index(&index, |f| Ok(api.get(f)?))?,
        Err(_) => vec![api.get("model.safetensors")?],
    };
    let tokenizer = api.get("tokenizer.json").ok();
    Ok(ModelFiles {
        dir: config.parent().map(Path::to_path_buf).unwrap_or_default(),
        format: WeightFormat::Safetensors,
        config,
        weights,
        tokenizer,
        name: name.to_string(),
    })
}

/// A token id field of a config.json (`eos_token_id`, `bos_token_id`): an integer, or a list
/// whose first entry is taken (Llama 3 lists several EOS ids). `file` names the source in errors.
pub(crate) fn token_id(v: &Value, file: &Path, key: &str) -> Result<Option<u32>> {
    let id = |x: &Value| -> Result<u32> {
        x.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
            .with_context(|| {
                format!(
                    "{}: `{key}` must be a token id (an integer) or a list of them, got {x}",
                    file.display()
                )
            })
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a.first().map(id).transpose(),
        Some(x) => id(x).map(Some),
    }
}

/// `eos_token_id` of the config.json at `path`; None when the file does not exist or has none.
pub(crate) fn read_eos_token_id(path: &Path) -> Result<Option<u32>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    token_id(&v, path, "eos_token_id")
}
