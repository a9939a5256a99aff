//! Where a bad config value came from: its line in the config file, or the `--set` that gave it.
//! serde's errors on the merged config (file + overrides) name the key path but not the line;
//! parsing the file alone gives the line; this module joins the two.
use super::Config;
use std::path::Path;

/// The dotted key path of a serde error on a `toml::Value` ("... in `train.lr`"), or the field
/// an "unknown field `x`" error names.
fn key_of(message: &str) -> Option<String> {
    let quoted = |after: &str| {
        let rest = message.split(after).nth(1)?;
        Some(rest.split('`').next()?.to_string())
    };
    let field = quoted("unknown field `");
    match (quoted("\nin `"), field) {
        (Some(table), Some(f)) => Some(format!("{table}.{f}")),
        (table, f) => table.or(f),
    }
}

/// An unknown-key message shortened to the key, the hint and the keys that exist.
fn unknown_key_message(message: &str, key: Option<&str>) -> Option<String> {
    let field = message.split("unknown field `").nth(1)?.split('`').next()?;
    let known = message.split("expected ").nth(1).unwrap_or("");
    let known = known.strip_prefix("one of ").unwrap_or(known);
    let hint = suggestion(message)
        .map(|h| format!("; {h}"))
        .unwrap_or_default();
    let key = key.unwrap_or(field);
    Some(format!(
        "unknown key `{key}`{hint} (known keys there: {known})"
    ))
}

/// The 1-based line of `key` (`a.b.c`; indices of arrays of tables are not known and ignored)
/// in a TOML text: a `key = ...` line under the right table header, or the key's own header.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let want: Vec<&str> = key.split('.').collect();
    let mut table: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some(h) = l.strip_prefix('[') {
            let h = h.trim_start_matches('[');
            let name = h.split(']').next().unwrap_or("");
            table = name
                .split('.')
                .map(|s| s.trim().trim_matches('"').to_string())
                .collect();
            if table == want {
                return Some(i + 1);
            }
            continue;
        }
        let Some((k, _)) = l.split_once('=') else {
            continue;
        };
        let mut path = table.clone();
        path.extend(k.split('.').map(|s| s.trim().trim_matches('"').to_string()));
        // Unknown fields are named without their table: match the last segment then.
        if path == want || (want.len() == 1 && path.last().map(String::as_str) == Some(want[0])) {
            return Some(i + 1);
        }
    }
    None
}

/// The `--set` whose key is `key`, a table above it, or a key below it.
fn override_for<'a>(key: &str, overrides: &'a [String], set_keys: &[String]) -> Option<&'a str> {
    set_keys
        .iter()
        .zip(overrides)
        .rev()
        .find(|(k, _)| {
            key == k.as_str()
                || key.starts_with(&format!("{k}."))
                || k.starts_with(&format!("{key}."))
        })
        .map(|(_, o)| o.as_str())
}

/// TRL/transformers argument names that live elsewhere here (the ones that are plain aliases,
/// such as `learning_rate`, are accepted where they are).
const TRL_NAMES: [(&str, &str); 14] = [
    ("beta", "loss.beta"),
    ("desirable_weight", "loss.desirable_weight"),
    ("undesirable_weight", "loss.undesirable_weight"),
    ("loss_type", "loss.loss_type"),
    ("max_prompt_length", "data.max_prompt_length"),
    ("max_completion_length", "data.max_completion_length"),
    ("output_dir", "output.dir"),
    ("model_name_or_path", "model.name_or_path"),
    ("lora_r", "lora.r"),
    ("lora_alpha", "lora.alpha"),
    ("lora_dropout", "lora.dropout"),
    ("lora_target_modules", "lora.target_modules"),
    ("bf16", "train.gemm = \"bf16\""),
    ("num_epochs", "train.epochs"),
];

/// A hint for an "unknown field `x`, expected one of `a`, `b`" error: where TRL's name lives
/// here, or the closest expected key.
pub(super) fn suggestion(message: &str) -> Option<String> {
    let unknown = message.split("unknown field `").nth(1)?.split('`').next()?;
    if let Some((_, ours)) = TRL_NAMES.iter().find(|(trl, _)| *trl == unknown) {
        return Some(format!("TRL's `{unknown}` is `{ours}` here"));
    }
    let expected: Vec<&str> = message
        .split("expected ")
        .nth(1)?
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    let (best, score) = expected
        .iter()
        .map(|k| (*k, strsim::jaro_winkler(unknown, k)))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    (score >= 0.8).then(|| format!("did you mean `{best}`?"))
}

/// A type or unknown-key error of the merged config, located.
pub(super) fn type_error(
    path: &Path,
    text: &str,
    overrides: &[String],
    set_keys: &[String],
    e: &toml::de::Error,
) -> anyhow::Error {
    let file = path.display();
    let raw = e.message().trim().to_string();
    let key = key_of(&e.to_string());
    let message = unknown_key_message(&raw, key.as_deref()).unwrap_or_else(|| raw.clone());
    if let Some(o) = key
        .as_deref()
        .and_then(|k| override_for(k, overrides, set_keys))
    {
        return anyhow::anyhow!("--set {o}: {message}");
    }
    // The file alone, parsed with spans, gives the exact position of the same error.
    if let Err(alone) = toml::from_str::<Config>(text) {
        if alone.message().trim() == raw {
            if let Some(span) = alone.span() {
                let line = 1 + text[..span.start].matches('\n').count();
                if message != raw {
                    return anyhow::anyhow!("{file}:{line}: {message}");
                }
                let at = key.map(|k| format!(" (key `{k}`)")).unwrap_or_default();
                return anyhow::anyhow!("{file}:{line}: {message}{at}\n{alone}");
            }
        }
    }
    match key {
        Some(k) => match line_of(text, &k) {
            Some(line) => anyhow::anyhow!("{file}:{line}: `{k}`: {message}"),
            None => anyhow::anyhow!("{file}: `{k}`: {message}"),
        },
        None => anyhow::anyhow!("{file}: {message}"),
    }
}

/// A validation error ("[section] context: key = value: why"), with the line of the key or the
/// `--set` that gave it.
pub(super) fn validation_error(
    path: &Path,
    text: &str,
    overrides: &[String],
    set_keys: &[String],
    e: anyhow::Error,
) -> anyhow::Error {
    let file = path.display();
    let full = format!("{e:#}");
    let section = full
        .strip_prefix('[')
        .and_then(|r| r.split(']').next())
        .map(str::to_string);
    let inner = full.split("]: ").nth(1).unwrap_or(&full);
    let name: String = inner
        .trim_start_matches('`')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let key = match (&section, name.is_empty()) {
        (Some(s), false) => Some(format!("{s}.{name}")),
        _ => None,
    };
    if let Some(o) = key
        .as_deref()
        .and_then(|k| override_for(k, overrides, set_keys))
    {
        return anyhow::anyhow!("{file}: {full} (from --set {o})");
    }
    match key.as_deref().and_then(|k| line_of(text, k)) {
        Some(line) => anyhow::anyhow!("{file}:{line}: {full}"),
        None => anyhow::anyhow!("{file}: {full}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_keys_under_their_tables() {
        let text = "# c\n[model]\nname_or_path = \"m\"\n\n[train]\nlr = 1\n[[data.sources]]\nkind = \"x\"\n";
        assert_eq!(line_of(text, "train.lr"), Some(6));
        assert_eq!(line_of(text, "model.name_or_path"), Some(3));
        assert_eq!(line_of(text, "data.sources.kind"), Some(8));
        assert_eq!(line_of(text, "data.sources"), Some(7));
        assert_eq!(line_of(text, "kind"), Some(8));
        assert_eq!(line_of(text, "train.seed"), None);
    }

    #[test]
    fn keys_from_serde_messages() {
        assert_eq!(
            key_of("invalid type: string \"a\", expected f64\nin `train.lr`\n").as_deref(),
            Some("train.lr")
        );
        assert_eq!(
            key_of("unknown field `betta`, expected `beta`").as_deref(),
            Some("betta")
        );
        assert_eq!(key_of("missing field `model`"), None);
    }
}
