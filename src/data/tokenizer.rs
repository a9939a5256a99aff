//! The tokenizer a run uses and its EOS id: `model.tokenizer`, else the model folder's
//! tokenizer.json (or a GGUF file's own tokenizer); EOS from config.json (or the GGUF
//! metadata), else the `<|endoftext|>` token.
use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    pub eos_token_id: u32,
    pub tokenizer_path: PathBuf,
    /// The local model folder, when model.name_or_path is one.
    pub model_dir: Option<PathBuf>,
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !crate::util::fs::exists(path, "tokenizer file")? || !path.is_file() {
        bail!("tokenizer file {} does not exist", path.display());
    }
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// The tokenizer of a model's files: its tokenizer.json, or a GGUF file's `tokenizer.ggml.*`
/// metadata; None when it has neither.
pub fn model_tokenizer(files: &crate::hub::ModelFiles) -> Result<Option<Tokenizer>> {
    match files.format {
        crate::hub::WeightFormat::Gguf => crate::hub::gguf::Gguf::open(&files.config)?.tokenizer(),
        crate::hub::WeightFormat::Safetensors => {
            files.tokenizer.as_deref().map(load_tokenizer).transpose()
        }
    }
}

/// A GGUF model's tokenizer (`model.tokenizer` when set, else the file's own) and EOS id.
fn gguf_tokenizer(cfg: &Config, path: &Path) -> Result<TokenizerInfo> {
    let gguf = crate::hub::gguf::Gguf::open(path)?;
    let (tokenizer, tokenizer_path) = match &cfg.model.tokenizer {
        Some(t) => (load_tokenizer(Path::new(t))?, PathBuf::from(t)),
        None => (
            gguf.tokenizer()?.ok_or_else(|| {
                anyhow!(
                    "{} has no tokenizer (no tokenizer.ggml.* metadata): set model.tokenizer to a \
                     tokenizer.json",
                    path.display()
                )
            })?,
            path.to_path_buf(),
        ),
    };
    let config = gguf.config_json()?;
    let eos = crate::hub::token_id(&config, path, "eos_token_id")?
        .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
        .ok_or_else(|| anyhow!("{}: no tokenizer.ggml.eos_token_id", path.display()))?;
    Ok(TokenizerInfo {
        tokenizer,
        eos_token_id: eos,
        tokenizer_path,
        model_dir: None,
    })
}

/// The tokenizer: `model.tokenizer` if set, else `<model folder>/tokenizer.json` (a GGUF file's
/// own); the EOS id from the model folder's (else the tokenizer folder's) config.json (a GGUF
/// file's metadata), else the `<|endoftext|>` token.
pub fn resolve_tokenizer(cfg: &Config) -> Result<TokenizerInfo> {
    let model_path = Path::new(&cfg.model.name_or_path);
    if crate::hub::is_gguf(model_path) {
        return gguf_tokenizer(cfg, model_path);
    }
    let model_dir = match &cfg.model.tokenizer {
        // An explicit tokenizer needs no model folder; use one when there is a local one.
        Some(_) => Some(PathBuf::from(&cfg.model.name_or_path)).filter(|p| p.is_dir()),
        None => Some(crate::hub::resolve_model_dir(
            &cfg.model.name_or_path,
            &cfg.model.revision,
        )?),
    };
    let tokenizer_path = match (&cfg.model.tokenizer, &model_dir) {
        (Some(t), _) => PathBuf::from(t),
        (None, Some(d)) => d.join("tokenizer.json"),
        (None, None) => unreachable!("a model folder is resolved when no tokenizer is given"),
    };
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let mut eos = None;
    if let Some(d) = &model_dir {
        eos = crate::hub::read_eos_token_id(&d.join("config.json"))?;
    }
    if eos.is_none() {
        if let Some(d) = tokenizer_path.parent() {
            eos = crate::hub::read_eos_token_id(&d.join("config.json"))?;
        }
    }
    let eos_token_id = match eos.or_else(|| tokenizer.token_to_id("<|endoftext|>")) {
        Some(id) => id,
        None => bail!(
            "no EOS token id: neither config.json (eos_token_id) next to the model or the tokenizer \
             nor a `<|endoftext|>` token in {}",
            tokenizer_path.display()
        ),
    };
    Ok(TokenizerInfo {
        tokenizer,
        eos_token_id,
        tokenizer_path,
        model_dir,
    })
}

/// The model's chat template: chat_template.jinja or a tokenizer_config.json with a
/// `chat_template` next to the model or the tokenizer, else a GGUF file's
/// `tokenizer.chat_template`; None when it has none.
pub(super) fn model_chat_template(
    cfg: &Config,
    info: &TokenizerInfo,
) -> Result<Option<super::ModelChatTemplate>> {
    let mut dirs: Vec<&Path> = Vec::new();
    if let Some(d) = &info.model_dir {
        dirs.push(d);
    }
    if let Some(d) = info.tokenizer_path.parent() {
        dirs.push(d);
    }
    let model = Path::new(&cfg.model.name_or_path);
    let gguf = crate::hub::is_gguf(model).then_some(model);
    find_chat_template(&dirs, gguf, &info.tokenizer, info.eos_token_id)
}

/// The chat template of a model's files (for `generate`), as [`model_chat_template`] finds it.
pub fn chat_template_of(
    files: &crate::hub::ModelFiles,
    tokenizer: &Tokenizer,
    eos_token_id: u32,
) -> Result<Option<super::ModelChatTemplate>> {
    let mut dirs: Vec<&Path> = vec![&files.dir];
    if let Some(d) = files.tokenizer.as_deref().and_then(Path::parent) {
        dirs.push(d);
    }
    let gguf = (files.format == crate::hub::WeightFormat::Gguf).then_some(files.config.as_path());
    find_chat_template(&dirs, gguf, tokenizer, eos_token_id)
}

fn find_chat_template(
    dirs: &[&Path],
    gguf: Option<&Path>,
    tokenizer: &Tokenizer,
    eos_token_id: u32,
) -> Result<Option<super::ModelChatTemplate>> {
    let eos = tokenizer.id_to_token(eos_token_id).unwrap_or_default();
    let wrap = |t: super::ChatTemplate, origin: &Path| super::ModelChatTemplate {
        template: std::sync::Arc::new(t),
        origin: origin.display().to_string(),
    };
    for d in dirs {
        let jinja = d.join("chat_template.jinja");
        if jinja.is_file() {
            return Ok(Some(wrap(
                super::ChatTemplate::from_file(&jinja, &eos)?,
                &jinja,
            )));
        }
        let config = d.join("tokenizer_config.json");
        if config.is_file() && has_chat_template(&config)? {
            return Ok(Some(wrap(
                super::ChatTemplate::from_file(&config, &eos)?,
                &config,
            )));
        }
    }
    if let Some(model) = gguf {
        let gguf = crate::hub::gguf::Gguf::open(model)?;
        if let Some(text) = gguf.chat_template() {
            let bos = gguf
                .special_token("tokenizer.ggml.bos_token_id")
                .unwrap_or_default();
            let t = super::ChatTemplate::new(text, &bos, &eos)
                .with_context(|| format!("chat template in {}", model.display()))?;
            return Ok(Some(wrap(t, model)));
        }
    }
    Ok(None)
}

fn has_chat_template(path: &Path) -> Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(v.get("chat_template").is_some_and(|t| !t.is_null()))
}
