//! The model card: `README.md` beside an adapter, with Hub front matter, the method and its
//! components, the training configuration, the data mix, the final metrics, the plots and a PEFT
//! usage snippet.
//!
//! Every number comes from the run folder's files (`config.toml`, `metrics.jsonl`,
//! `data_summary.json`, `eval_results.json`), read as generic TOML/JSON so that the card keeps
//! working when those structs gain or rename fields; a value the files lack is left out rather
//! than guessed.
use super::metrics_log::{read_metrics, MetricsLine, MetricsLog};
use super::plots::PLOTS;
use super::{format_value, METRICS_FILE, PLOTS_DIR};
use crate::util::atomic::write_atomic;
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use toml::Value as Toml;

/// File name of the card inside the adapter folder (what the Hub shows).
pub const CARD_FILE: &str = "README.md";

/// Writes `adapter_dir/README.md` from the run folder `run_dir` and returns its path.
pub fn write_model_card(run_dir: &Path, adapter_dir: &Path) -> Result<PathBuf> {
    if !adapter_dir.is_dir() {
        bail!("adapter folder {} does not exist", adapter_dir.display());
    }
    let config_path = run_dir.join("config.toml");
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read the run config {}", config_path.display()))?;
    let config: Toml = toml::from_str(&config_text)
        .with_context(|| format!("cannot parse {}", config_path.display()))?;
    let log = read_metrics(&run_dir.join(METRICS_FILE))?;
    let plots_dir = run_dir.join(PLOTS_DIR);
    let plots: Vec<(&'static str, String)> = PLOTS
        .iter()
        .filter(|p| plots_dir.join(p.file).is_file())
        .map(|p| (p.title, p.file.to_string()))
        .collect();
    // The card's images travel with the adapter folder (uploaded alone, links into the run
    // folder would break): copies under adapter/plots/.
    let card_plots = adapter_dir.join(PLOTS_DIR);
    if !plots.is_empty() {
        std::fs::create_dir_all(&card_plots)
            .with_context(|| format!("cannot create {}", card_plots.display()))?;
        for (_, file) in &plots {
            let bytes = std::fs::read(plots_dir.join(file))
                .with_context(|| format!("cannot read {}", plots_dir.join(file).display()))?;
            write_atomic(&card_plots.join(file), &bytes)?;
        }
    }
    let inputs = CardInputs {
        run_name: dir_name(run_dir),
        config: &config,
        log: &log,
        data_summary: read_json_opt(&run_dir.join("data_summary.json"))?,
        data_summary_text: std::fs::read_to_string(run_dir.join("data_summary.txt")).ok(),
        eval_results: read_json_opt(&run_dir.join("eval_results.json"))?,
        adapter_config: read_json_opt(&adapter_dir.join("adapter_config.json"))?,
        plots_link: link_path(&relative_path(adapter_dir, &card_plots)?),
        plots,
        samples: std::fs::read_to_string(run_dir.join("samples.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        adapter_path: adapter_dir.display().to_string(),
    };
    let path = adapter_dir.join(CARD_FILE);
    write_atomic(&path, render_card(&inputs).as_bytes())?;
    Ok(path)
}

struct CardInputs<'a> {
    run_name: String,
    config: &'a Toml,
    log: &'a MetricsLog,
    data_summary: Option<Json>,
    data_summary_text: Option<String>,
    eval_results: Option<Json>,
    adapter_config: Option<Json>,
    /// Link prefix of `plots/` as seen from the card's folder ("" when they are the same).
    plots_link: String,
    /// (title, file name) of each plot present.
    plots: Vec<(&'static str, String)>,
    /// samples.jsonl's lines.
    samples: Vec<Json>,
    adapter_path: String,
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("cannot parse {}", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn dir_name(dir: &Path) -> String {
    let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".to_string())
}

/// `to` as seen from the folder `from_dir`, through `..` where needed. Both are resolved first so
/// that `run/adapter` and `./run/../run/plots` meet at their common folder.
pub fn relative_path(from_dir: &Path, to: &Path) -> Result<PathBuf> {
    let resolve = |p: &Path| -> Result<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Ok(c);
        }
        // The plots folder may not exist yet: resolve its parent and keep its name.
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => Ok(parent
                .canonicalize()
                .unwrap_or(std::path::absolute(parent)?)
                .join(name)),
            _ => Ok(std::path::absolute(p)?),
        }
    };
    let from = resolve(from_dir)?;
    let to = resolve(to)?;
    let from_parts: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from_parts
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    if common == 0 {
        // Different roots (another drive): only an absolute link can work.
        return Ok(to);
    }
    let mut rel = PathBuf::new();
    for _ in common..from_parts.len() {
        rel.push("..");
    }
    for c in &to_parts[common..] {
        rel.push(c.as_os_str());
    }
    Ok(rel)
}

/// A path as a Markdown link prefix: forward slashes, spaces escaped, and a trailing slash when not
/// empty so that a file name can be appended.
fn link_path(p: &Path) -> String {
    let s = p.to_string_lossy().replace('\\', "/").replace(' ', "%20");
    if s.is_empty() {
        s
    } else {
        format!("{}/", s.trim_end_matches('/'))
    }
}

/// Looks up `a.b.c` in a TOML value.
fn get<'a>(v: &'a Toml, path: &str) -> Option<&'a Toml> {
    path.split('.').try_fold(v, |cur, k| cur.get(k))
}

fn toml_f64(v: &Toml) -> Option<f64> {
    match v {
        Toml::Float(f) => Some(*f),
        Toml::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

/// Config values as the card prints them: numbers as written (no trailing `.0`), lists
/// comma-separated.
fn show(v: &Toml) -> String {
    match v {
        Toml::String(s) => s.clone(),
        Toml::Integer(i) => i.to_string(),
        Toml::Float(f) => show_f64(*f),
        Toml::Boolean(b) => if *b { "yes" } else { "no" }.to_string(),
        Toml::Array(a) => a.iter().map(show).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn show_f64(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.0}")
    } else {
        f.to_string()
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn row(out: &mut String, cells: &[String]) {
    let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn header(out: &mut String, names: &[&str]) {
    let _ = writeln!(out, "| {} |", names.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(names.len()));
}

/// Whether `s` looks like a Hub repository id rather than a local folder: the Hub rejects cards
/// whose `base_model` is not a model id.
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (parts.len() == 1 || parts.len() == 2)
        && parts.iter().all(|p| ok_part(p))
        && !Path::new(s).exists()
}

/// A YAML scalar that is always read back as the same string.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

struct Method {
    loss_type: String,
    name: &'static str,
    beta: f64,
}

fn method(config: &Toml) -> Method {
    // Absent means the config's default, "kto" (src/config/loss.rs).
    let loss_type = get(config, "loss.loss_type")
        .and_then(Toml::as_str)
        .unwrap_or("kto")
        .to_string();
    let name = match loss_type.as_str() {
        "kto" => "KTO",
        "enhanced_kto" => "Enhanced KTO",
        "apo_zero_unpaired" => "APO-zero (unpaired)",
        _ => "KTO variant",
    };
    Method {
        name,
        // Absent means the config's default beta.
        beta: get(config, "loss.beta").and_then(toml_f64).unwrap_or(0.1),
        loss_type,
    }
}

fn render_card(c: &CardInputs) -> String {
    let cfg = c.config;
    let m = method(cfg);
    let base = get(cfg, "model.name_or_path")
        .and_then(Toml::as_str)
        .map(str::to_string)
        .or_else(|| {
            c.adapter_config
                .as_ref()
                .and_then(|a| a.get("base_model_name_or_path"))
                .and_then(Json::as_str)
                .map(str::to_string)
        });
    let mut out = String::new();
    front_matter(&mut out, cfg, &m, base.as_deref());
    summary(&mut out, c, &m, base.as_deref());
    method_section(&mut out, cfg, &m);

    out.push_str("\n## Training configuration\n\n");
    training_table(&mut out, cfg, c.log);

    out.push_str("\n## Dataset mix\n\n");
    match (&c.data_summary, &c.data_summary_text) {
        (Some(s), _) if data_table(&mut out, s) => {}
        (_, Some(t)) => {
            let _ = writeln!(out, "```text\n{}\n```", t.trim_end());
        }
        _ => out.push_str("The run folder holds no data summary.\n"),
    }

    out.push_str("\n## Final metrics\n\n");
    metrics_table(&mut out, c.log);
    pair_table(&mut out, c.log);

    if !c.plots.is_empty() {
        out.push_str("\n## Training curves\n\n");
        let images: Vec<String> = c
            .plots
            .iter()
            .map(|(title, file)| format!("![{title}]({}{file})", c.plots_link))
            .collect();
        let _ = writeln!(out, "{}", images.join("\n\n"));
    }

    if let Some(e) = &c.eval_results {
        let mut t = String::new();
        if eval_table(&mut t, e) {
            out.push_str("\n## Evaluation\n\n");
            out.push_str(&t);
        }
    }
    samples_section(&mut out, &c.samples);
    usage(&mut out, base.as_deref(), &c.adapter_path);
    out
}

/// The last evaluation's greedy completions of `train.sample_prompts` (samples.jsonl).
fn samples_section(out: &mut String, samples: &[Json]) {
    let Some(step) = samples.iter().filter_map(|l| l["step"].as_u64()).max() else {
        return;
    };
    let _ = writeln!(
        out,
        "\n## Samples\n\nGreedy completions at step {step} (`train.sample_prompts`; every \
         evaluation's are in the run folder's samples.jsonl).\n"
    );
    for l in samples.iter().filter(|l| l["step"].as_u64() == Some(step)) {
        let text = |k: &str| l[k].as_str().unwrap_or("").replace("```", "` ` `");
        let _ = writeln!(
            out,
            "**Prompt:** {}\n\n```text\n{}\n```\n",
            text("prompt").trim(),
            text("completion").trim_end()
        );
    }
}

/// The YAML header the Hub reads: base model, library, license, tags.
fn front_matter(out: &mut String, cfg: &Toml, m: &Method, base: Option<&str>) {
    let hub_base = base.filter(|b| is_hub_id(b));
    let license = ["model.license", "card.license", "output.license"]
        .iter()
        .find_map(|k| get(cfg, k).and_then(Toml::as_str));
    out.push_str("---\n");
    if let Some(b) = hub_base {
        let _ = writeln!(out, "base_model: {}", yaml_str(b));
    }
    out.push_str("library_name: peft\n");
    if let Some(l) = license {
        let _ = writeln!(out, "license: {}", yaml_str(l));
    }
    out.push_str("pipeline_tag: text-generation\ntags:\n");
    let mut tags = vec!["kto".to_string()];
    if m.loss_type == "enhanced_kto" {
        tags.push("enhanced-kto".to_string());
    }
    if m.loss_type == "apo_zero_unpaired" {
        tags.push("apo-zero".to_string());
    }
    tags.extend(["lora", "peft", "kto-train"].map(String::from));
    if let Some(b) = hub_base {
        tags.push(format!("base_model:adapter:{b}"));
    }
    for t in &tags {
        let _ = writeln!(out, "- {}", yaml_str(t));
    }
    out.push_str("---\n\n");
}

/// Title and the summary list: base model, method, adapter format, training length.
fn summary(out: &mut String, c: &CardInputs, m: &Method, base: Option<&str>) {
    let cfg = c.config;
    let base_text = base.unwrap_or("(not recorded)");
    let _ = writeln!(
        out,
        "# {}: {} LoRA adapter for {}\n",
        c.run_name, m.name, base_text
    );
    let revision = get(cfg, "model.revision")
        .and_then(Toml::as_str)
        .filter(|r| *r != "main");
    let _ = write!(out, "- **Base model:** `{base_text}`");
    if let Some(r) = revision {
        let _ = write!(out, " (revision `{r}`)");
    }
    if base.is_some_and(|b| !is_hub_id(b)) {
        out.push_str(" (a local folder)");
    }
    out.push('\n');
    let _ = write!(out, "- **Method:** {}, beta = {}", m.name, show_f64(m.beta));
    let weights: Vec<String> = [
        ("desirable weight", "loss.desirable_weight"),
        ("undesirable weight", "loss.undesirable_weight"),
    ]
    .iter()
    .filter_map(|(n, k)| get(cfg, k).map(|v| format!("{n} {}", show(v))))
    .collect();
    if !weights.is_empty() {
        let _ = write!(out, " ({})", weights.join(", "));
    }
    out.push('\n');
    out.push_str(
        "- **Adapter:** LoRA, PEFT format (`adapter_config.json`, `adapter_model.safetensors`)\n",
    );
    if let Some(last) = c.log.last_train() {
        let _ = writeln!(
            out,
            "- **Trained for:** {} optimizer steps{}",
            show_f64(last.step),
            last.epoch
                .map(|e| format!(" (epoch {})", show_f64(e)))
                .unwrap_or_default()
        );
    }
    out.push('\n');
}

/// What the loss is, and the table of Enhanced KTO components.
fn method_section(out: &mut String, cfg: &Toml, m: &Method) {
    out.push_str("## Method\n\n");
    match m.loss_type.as_str() {
        "enhanced_kto" => out.push_str(
            "Enhanced KTO: the KTO loss (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) \
             extended with components from prospect theory and related preference-optimization \
             work. With every component disabled it equals TRL's `kto` loss.\n\n",
        ),
        "apo_zero_unpaired" => out.push_str(
            "APO-zero on unpaired data (TRL's `apo_zero_unpaired` loss type): desirable \
             completions are pushed up, undesirable ones down, without a KL reference point. \
             The Enhanced KTO components below are not part of this loss.\n\n",
        ),
        _ => out.push_str(
            "KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024), as TRL's `kto` loss: \
             desirable and undesirable completions are scored against a KL reference point. The \
             Enhanced KTO components below are not part of this loss.\n\n",
        ),
    }
    component_table(out, cfg, m.loss_type == "enhanced_kto");
}

/// How to load the adapter with PEFT.
fn usage(out: &mut String, base: Option<&str>, adapter_path: &str) {
    let py_base = base.unwrap_or("BASE_MODEL");
    out.push_str("\n## Usage\n\n```python\n");
    out.push_str("from peft import PeftModel\n");
    out.push_str("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n");
    let _ = writeln!(
        out,
        "base = AutoModelForCausalLM.from_pretrained({})",
        py_str(py_base)
    );
    let _ = writeln!(
        out,
        "tokenizer = AutoTokenizer.from_pretrained({})",
        py_str(py_base)
    );
    let _ = writeln!(
        out,
        "model = PeftModel.from_pretrained(base, {})  # or the adapter's Hub id",
        py_str(adapter_path)
    );
    out.push_str("```\n");
    let _ = writeln!(
        out,
        "\nTrained with kto-train {}; the run's resolved configuration is its `config.toml`.",
        env!("CARGO_PKG_VERSION")
    );
}

fn py_str(s: &str) -> String {
    // JSON string syntax is valid Python string syntax.
    serde_json::to_string(s).expect("a string serializes")
}

fn component_table(out: &mut String, cfg: &Toml, enhanced: bool) {
    header(out, &["Component", "Status", "Parameters"]);
    let num = |k: &str, default: f64| {
        get(cfg, &format!("loss.{k}"))
            .and_then(toml_f64)
            .unwrap_or(default)
    };
    let flag = |k: &str, default: bool| {
        get(cfg, &format!("loss.{k}"))
            .and_then(Toml::as_bool)
            .unwrap_or(default)
    };
    let status = |on: bool| if on { "Active" } else { "Disabled" }.to_string();
    let dash = || "—".to_string();
    if !enhanced {
        for name in [
            "Value function (loss aversion)",
            "Probability weighting",
            "Odds ratio",
            "BCO shift",
        ] {
            row(out, &[name.to_string(), status(false), dash()]);
        }
        return;
    }
    // Defaults of absent keys are the documented ones (docs/enhanced-kto.md, src/config/loss.rs);
    // a resolved config.toml writes every key, so they only matter for hand-written folders.
    let f = show_f64;
    let value_on = flag("value_function", true);
    row(
        out,
        &[
            "Value function (loss aversion)".into(),
            status(value_on),
            if value_on {
                format!(
                    "alpha_gain = {}, alpha_loss = {}, lambda = {}, eps = {}",
                    f(num("value_alpha_gain", 0.88)),
                    f(num("value_alpha_loss", 0.88)),
                    f(num("loss_aversion", 2.25)),
                    f(num("value_eps", 1.0))
                )
            } else {
                dash()
            },
        ],
    );
    let weighting = get(cfg, "loss.weighting")
        .and_then(Toml::as_str)
        .unwrap_or("tk92")
        .to_ascii_lowercase();
    let params = match weighting.as_str() {
        "tk92" => format!(
            "TK92, gamma_gain = {}, gamma_loss = {}",
            f(num("gamma_gain", 0.61)),
            f(num("gamma_loss", 0.69))
        ),
        "prelec" => format!("Prelec, alpha = {}", f(num("prelec_alpha", 0.65))),
        "none" => dash(),
        other => other.to_string(),
    };
    row(
        out,
        &[
            "Probability weighting".into(),
            status(weighting != "none"),
            params,
        ],
    );
    let or_weight = num("odds_ratio_weight", 0.1);
    row(
        out,
        &[
            "Odds ratio".into(),
            status(or_weight > 0.0),
            if or_weight > 0.0 {
                format!(
                    "weight = {}, mean log-prob clamp = {}",
                    f(or_weight),
                    f(num("odds_ratio_max_mean_logp", -1e-4))
                )
            } else {
                dash()
            },
        ],
    );
    let bco = flag("bco_shift", false);
    row(
        out,
        &[
            "BCO shift".into(),
            status(bco),
            if bco {
                let baseline = match get(cfg, "loss.bco_momentum").and_then(toml_f64) {
                    Some(c) => format!("EMA baseline, momentum = {}", f(c)),
                    None => "cumulative-mean baseline".to_string(),
                };
                format!(
                    "{baseline}, start step = {}, ramp = {} steps",
                    f(num("bco_start_step", 0.0)),
                    f(num("bco_ramp_steps", 0.0))
                )
            } else {
                dash()
            },
        ],
    );
    let clip = get(cfg, "loss.component_clip").and_then(toml_f64);
    row(
        out,
        &[
            "Component gradient clipping".into(),
            status(clip.is_some()),
            clip.map(|c| format!("L2 bound = {}", f(c)))
                .unwrap_or_else(dash),
        ],
    );
}

fn training_table(out: &mut String, cfg: &Toml, log: &MetricsLog) {
    header(out, &["Setting", "Value"]);
    let rows: [(&str, &str); 18] = [
        ("LoRA rank (r)", "lora.r"),
        ("LoRA alpha", "lora.alpha"),
        ("LoRA dropout", "lora.dropout"),
        ("LoRA target modules", "lora.target_modules"),
        ("rsLoRA", "lora.use_rslora"),
        ("Learning rate", "train.lr"),
        ("LR schedule", "train.lr_schedule"),
        ("Warmup steps", "train.warmup_steps"),
        ("Warmup ratio", "train.warmup_ratio"),
        ("Batch size", "train.batch_size"),
        ("Gradient accumulation", "train.grad_accum"),
        ("Epochs", "train.epochs"),
        ("Max steps", "train.max_steps"),
        ("Max length (tokens)", "train.max_length"),
        ("Weight decay", "train.weight_decay"),
        ("Max gradient norm", "train.max_grad_norm"),
        ("Precision", "train.dtype"),
        ("Seed", "train.seed"),
    ];
    for (label, key) in rows {
        if let Some(v) = get(cfg, key) {
            let text = if key == "lora.target_modules" {
                match v.as_array() {
                    Some(a) => a
                        .iter()
                        .map(|m| format!("`{}`", show(m)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => show(v),
                }
            } else if key == "lora.dropout"
                && get(cfg, "train.disable_dropout").and_then(Toml::as_bool) == Some(true)
            {
                format!(
                    "{} (off while training: train.disable_dropout, TRL's default)",
                    show(v)
                )
            } else {
                show(v)
            };
            row(out, &[label.to_string(), text]);
        }
        if key == "train.grad_accum" {
            let bs = get(cfg, "train.batch_size").and_then(Toml::as_integer);
            let ga = get(cfg, "train.grad_accum").and_then(Toml::as_integer);
            if let (Some(bs), Some(ga)) = (bs, ga) {
                row(out, &["Effective batch size".into(), (bs * ga).to_string()]);
            }
        }
    }
    if let Some(last) = log.last_train() {
        row(out, &["Optimizer steps run".into(), show_f64(last.step)]);
    }
}

/// Renders the per-source table of `data_summary.json`; false when no source rows were found.
fn data_table(out: &mut String, summary: &Json) -> bool {
    let rows: Vec<SourceRow> = match source_rows(summary) {
        Some(r) if !r.is_empty() => r,
        _ => return false,
    };
    // Known columns first, in the order a reader follows the mix; nested split counts flattened.
    const KNOWN: [(&str, &str); 11] = [
        ("kind", "Kind"),
        ("records_read", "Records read"),
        ("records", "Records"),
        ("interactions", "Interactions"),
        ("pairs", "Pairs"),
        ("examples", "Examples"),
        ("desirable", "Desirable"),
        ("undesirable", "Undesirable"),
        ("train.examples", "Train examples"),
        ("validation.examples", "Validation examples"),
        ("weight", "Weight"),
    ];
    let lookup = |r: &serde_json::Map<String, Json>, key: &str| -> Option<Json> {
        let mut parts = key.split('.');
        let mut cur = r.get(parts.next()?)?;
        for p in parts {
            cur = cur.get(p)?;
        }
        is_scalar(cur).then(|| cur.clone())
    };
    let mut columns: Vec<(String, String)> = KNOWN
        .iter()
        .filter(|(k, _)| rows.iter().any(|(_, r)| lookup(r, k).is_some()))
        .map(|(k, l)| (k.to_string(), l.to_string()))
        .collect();
    if columns.is_empty() {
        // An unknown layout: show every scalar field, in first-seen order.
        let mut seen = BTreeSet::new();
        for (_, r) in &rows {
            for (k, v) in r.iter() {
                if k != "name" && is_scalar(v) && seen.insert(k.clone()) {
                    columns.push((k.clone(), k.clone()));
                }
            }
        }
    }
    let mut names = vec!["Source"];
    names.extend(columns.iter().map(|(_, l)| l.as_str()));
    header(out, &names);
    let mut totals: Vec<Option<i64>> = vec![Some(0); columns.len()];
    for (name, r) in &rows {
        let mut cells = vec![name.clone()];
        for (i, (k, _)) in columns.iter().enumerate() {
            let v = lookup(r, k);
            totals[i] = match (&totals[i], v.as_ref().and_then(Json::as_i64)) {
                (Some(t), Some(x)) if k != "weight" => Some(t + x),
                _ => None,
            };
            cells.push(v.map(|v| json_scalar(&v)).unwrap_or_default());
        }
        row(out, &cells);
    }
    if rows.len() > 1 && totals.iter().any(Option::is_some) {
        let mut cells = vec!["**Total**".to_string()];
        cells.extend(
            totals
                .iter()
                .map(|t| t.map(|x| format!("**{x}**")).unwrap_or_default()),
        );
        row(out, &cells);
    }
    // The split totals, when the summary has them at top level.
    let split = |name: &str| -> Option<String> {
        let s = summary.get(name)?;
        let ex = s.get("examples")?.as_i64()?;
        let mut t = format!("{name}: {ex} examples");
        if let (Some(d), Some(u)) = (
            s.get("desirable").and_then(Json::as_i64),
            s.get("undesirable").and_then(Json::as_i64),
        ) {
            let _ = write!(t, " ({d} desirable, {u} undesirable)");
        }
        Some(t)
    };
    let splits: Vec<String> = ["train", "validation"]
        .iter()
        .filter_map(|n| split(n))
        .collect();
    if !splits.is_empty() {
        let _ = writeln!(out, "\nSplits: {}.", splits.join("; "));
    }
    true
}

/// The per-source rows of a data summary of any of the shapes it may take: a list of sources, an
/// object with a `sources` list or map, or a map of source name to row.
fn source_rows(summary: &Json) -> Option<Vec<SourceRow<'_>>> {
    match summary {
        Json::Array(a) => Some(rows_of_list(a)),
        Json::Object(o) => match o.get("sources") {
            Some(Json::Array(a)) => Some(rows_of_list(a)),
            Some(Json::Object(m)) => Some(rows_of_map(m)),
            _ => {
                // Without a `sources` key only a map whose every value is a row is taken as one,
                // so that split totals and settings are not mistaken for sources.
                let all_rows = !o.is_empty() && o.values().all(Json::is_object);
                all_rows.then(|| rows_of_map(o))
            }
        },
        _ => None,
    }
}

type SourceRow<'a> = (String, &'a serde_json::Map<String, Json>);

fn rows_of_list(list: &[Json]) -> Vec<SourceRow<'_>> {
    list.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let o = r.as_object()?;
            let name = ["name", "source", "path"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Json::as_str))
                .map(str::to_string)
                .unwrap_or_else(|| format!("source {}", i + 1));
            Some((name, o))
        })
        .collect()
}

fn rows_of_map(m: &serde_json::Map<String, Json>) -> Vec<SourceRow<'_>> {
    m.iter()
        .filter_map(|(k, v)| v.as_object().map(|o| (k.clone(), o)))
        .collect()
}

fn is_scalar(v: &Json) -> bool {
    matches!(v, Json::Number(_) | Json::String(_) | Json::Bool(_))
}

fn json_scalar(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Json::Number(n) => n.as_f64().map(format_value).unwrap_or_default(),
        Json::Bool(b) => b.to_string(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

/// Order of the metric rows: the TRL metrics a reader looks for first, then the rest by name.
const METRIC_ORDER: [&str; 11] = [
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
];

fn metrics_table(out: &mut String, log: &MetricsLog) {
    let train = log.last_train();
    let eval = log.last_eval();
    if train.is_none() && eval.is_none() {
        out.push_str("`metrics.jsonl` holds no complete line yet.\n");
        return;
    }
    let eval_name = |k: &str| k.strip_prefix("eval_").unwrap_or(k).to_string();
    let mut names: BTreeSet<String> = BTreeSet::new();
    if let Some(t) = train {
        // Validation numbers logged inside a training line belong to the validation column.
        names.extend(
            t.metrics
                .keys()
                .filter(|k| !k.starts_with("eval_"))
                .cloned(),
        );
    }
    if let Some(e) = eval {
        names.extend(e.metrics.keys().map(|k| eval_name(k)));
    }
    let mut ordered: Vec<String> = METRIC_ORDER
        .iter()
        .filter(|n| names.contains(**n))
        .map(|n| n.to_string())
        .collect();
    ordered.extend(
        names
            .iter()
            .filter(|n| !METRIC_ORDER.contains(&n.as_str()))
            .cloned(),
    );
    let col = |l: &MetricsLine, what: &str| format!("{what} (step {})", show_f64(l.step));
    let mut heads = vec!["Metric".to_string()];
    if let Some(t) = train {
        heads.push(col(t, "Training"));
    }
    if let Some(e) = eval {
        heads.push(col(e, "Validation"));
    }
    header(out, &heads.iter().map(String::as_str).collect::<Vec<_>>());
    for name in &ordered {
        let mut cells = vec![format!("`{name}`")];
        if let Some(t) = train {
            cells.push(
                t.metrics
                    .get(name)
                    .map(|v| format_value(*v))
                    .unwrap_or_default(),
            );
        }
        if let Some(e) = eval {
            cells.push(
                e.metrics
                    .get(&format!("eval_{name}"))
                    .or_else(|| e.metrics.get(name))
                    .map(|v| format_value(*v))
                    .unwrap_or_default(),
            );
        }
        row(out, &cells);
    }
    if let Some(t) = train {
        let mut facts = Vec::new();
        if let Some(e) = t.epoch {
            facts.push(format!("epoch {}", show_f64(e)));
        }
        if let Some(s) = t.elapsed_seconds {
            facts.push(format!("training time {}", duration(s)));
        }
        if let Some(tps) = t.tokens_per_second {
            facts.push(format!("{tps:.0} tokens/s over the last logging interval"));
        }
        if let Some(k) = t.skipped_nonfinite {
            facts.push(format!("{} non-finite steps skipped", show_f64(k)));
        }
        if !facts.is_empty() {
            let _ = writeln!(out, "\nAt the last training log: {}.", facts.join(", "));
        }
    }
}

/// The implicit reward on the validation split's preference pairs at every evaluation: whether
/// training ranks desirable above undesirable completions it has not seen.
fn pair_table(out: &mut String, log: &MetricsLog) {
    let rows: Vec<&MetricsLine> = log
        .lines
        .iter()
        .filter(|l| l.eval && l.metrics.contains_key("eval_pair_accuracy"))
        .collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "\n### Preference pairs (validation split)\n\nFor every preference the data states \
         (preferred vs. other completion of one prompt, both in the split; unpaired records: \
         desirable vs. undesirable of one prompt): the share ranked right by the implicit reward \
         beta * (log pi - log pi_ref) (a tie counts one half), and the mean reward margin, with \
         standard errors clustered by prompt.\n\n",
    );
    header(out, &["Step", "Pairs", "Pair accuracy", "Reward margin"]);
    let pm = |l: &MetricsLine, k: &str| {
        let v = l
            .metrics
            .get(&format!("eval_pair_{k}"))
            .copied()
            .unwrap_or(f64::NAN);
        let se = l
            .metrics
            .get(&format!("eval_pair_{k}_stderr"))
            .copied()
            .unwrap_or(f64::NAN);
        format!("{} ± {}", format_value(v), format_value(se))
    };
    for l in rows {
        let n = l.metrics.get("eval_pairs").copied().unwrap_or(f64::NAN);
        row(
            out,
            &[
                show_f64(l.step),
                show_f64(n),
                pm(l, "accuracy"),
                pm(l, "margin"),
            ],
        );
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Renders `eval_results.json`: a list of result rows (`{"results": [...]}` or a bare list), or
/// lm-evaluation-harness's map of task to metrics. False when nothing tabular was found.
fn eval_table(out: &mut String, v: &Json) -> bool {
    let results = v.get("results").unwrap_or(v);
    match results {
        Json::Array(rows) => {
            let objs: Vec<&serde_json::Map<String, Json>> =
                rows.iter().filter_map(Json::as_object).collect();
            if objs.is_empty() {
                return false;
            }
            const FIRST: [&str; 6] = ["task", "shots", "metric", "value", "stderr", "n"];
            let mut cols: Vec<String> = FIRST
                .iter()
                .filter(|k| objs.iter().any(|o| o.get(**k).is_some_and(is_scalar)))
                .map(|k| k.to_string())
                .collect();
            for o in &objs {
                for (k, val) in o.iter() {
                    if is_scalar(val) && !cols.contains(k) {
                        cols.push(k.clone());
                    }
                }
            }
            header(out, &cols.iter().map(String::as_str).collect::<Vec<_>>());
            for o in &objs {
                let cells: Vec<String> = cols
                    .iter()
                    .map(|k| o.get(k).map(json_scalar).unwrap_or_default())
                    .collect();
                row(out, &cells);
            }
            true
        }
        Json::Object(tasks) => {
            let mut lines = Vec::new();
            for (task, metrics) in tasks {
                match metrics {
                    Json::Object(m) => {
                        for (metric, val) in m {
                            if val.is_number() {
                                lines.push(vec![task.clone(), metric.clone(), json_scalar(val)]);
                            }
                        }
                    }
                    val if val.is_number() => {
                        lines.push(vec![task.clone(), String::new(), json_scalar(val)])
                    }
                    _ => {}
                }
            }
            if lines.is_empty() {
                return false;
            }
            header(out, &["task", "metric", "value"]);
            for l in &lines {
                row(out, l);
            }
            true
        }
        _ => false,
    }
}
