//! Every shipped config parses and validates, and says what the seed run used.
use kto_train::config::{Config, LossType};
use std::path::PathBuf;

fn load(name: &str) -> Config {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name);
    Config::load(&p, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn seed_run_configs() {
    for name in ["kto.toml", "enhanced.toml", "enhanced-bco.toml"] {
        let c = load(name);
        assert_eq!(c.model.name_or_path, "HuggingFaceTB/SmolLM2-360M", "{name}");
        assert_eq!((c.lora.r, c.lora.alpha), (16, 32.0), "{name}");
        assert_eq!(c.lora.target_modules.len(), 7, "{name}");
        assert_eq!(c.lora.dropout, 0.05, "{name}");
        assert_eq!(c.loss.beta, 0.1, "{name}");
        let t = &c.train;
        assert_eq!(
            (
                t.lr,
                t.batch_size,
                t.grad_accum,
                t.max_length,
                t.epochs,
                t.seed
            ),
            (2e-4, 2, 8, 512, 1, 42),
            "{name}"
        );
        assert_eq!(c.data.sources.len(), 3, "{name}");
        assert_eq!(c.data.max_interactions_per_source, Some(1130), "{name}");
        assert_eq!(c.data.validation_fraction, 0.05, "{name}");
    }
    assert_eq!(load("kto.toml").loss.loss_type, LossType::Kto);
    let e = load("enhanced.toml").loss;
    assert_eq!(e.loss_type, LossType::EnhancedKto);
    assert!(e.value_function && !e.bco_shift && e.odds_ratio_weight > 0.0);
    assert!(load("enhanced-bco.toml").loss.bco_shift);
    load("smoke.toml");
    // The real-model configs: the seed's loss and LoRA settings on the shipped samples.
    for name in ["real-smollm2.toml", "real-smollm2-oasst.toml"] {
        let c = load(name);
        assert_eq!(c.loss.loss_type, LossType::EnhancedKto, "{name}");
        assert_eq!(
            (c.lora.r, c.lora.alpha, c.loss.beta),
            (16, 32.0, 0.1),
            "{name}"
        );
    }
    assert_eq!(load("real-smollm2-oasst.toml").data.sources.len(), 1);
}

#[test]
fn trl_key_names_are_aliases_and_unknown_keys_get_a_suggestion() {
    let ours = Config::from_toml_str(
        r#"
[model]
name_or_path = "x"
[train]
lr = 5e-5
batch_size = 4
grad_accum = 2
epochs = 3
lr_schedule = "cosine"
log_every = 5
eval_every = 50
save_every = 100
keep_checkpoints = 2
warmup_ratio = 0.1
adam_eps = 1e-6
eval_batch_size = 8
activation_checkpointing = false
"#,
    )
    .unwrap();
    let trl = Config::from_toml_str(
        r#"
[model]
name_or_path = "x"
[train]
learning_rate = 5e-5
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
num_train_epochs = 3
lr_scheduler_type = "cosine"
logging_steps = 5
eval_steps = 50
save_steps = 100
save_total_limit = 2
warmup_ratio = 0.1
adam_epsilon = 1e-6
per_device_eval_batch_size = 8
gradient_checkpointing = false
"#,
    )
    .unwrap();
    assert_eq!(ours, trl);
    // TRL's defaults where a TRL user expects them.
    assert!(ours.train.disable_dropout);
    // Both names of one key: refused, not silently one of them.
    let both = "[model]\nname_or_path = \"x\"\n[train]\nlr = 1e-4\nlearning_rate = 2e-4\n";
    let err = format!("{:#}", Config::from_toml_str(both).unwrap_err());
    assert!(err.contains("duplicate"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let load_err = |body: &str| {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("[model]\nname_or_path = \"x\"\n{body}")).unwrap();
        format!("{:#}", Config::load(&p, &[]).unwrap_err())
    };
    let e = load_err("[train]\nlearning_rat = 1e-4\n");
    assert!(
        e.contains("c.toml:4: unknown key `train.learning_rat`; did you mean `learning_rate`?"),
        "{e}"
    );
    let e = load_err("[train]\nbeta = 0.2\n");
    assert!(e.contains("TRL's `beta` is `loss.beta` here"), "{e}");
    let e = load_err("[lora]\ntarget_module = [\"q_proj\"]\n");
    assert!(e.contains("did you mean `target_modules`?"), "{e}");
    // Nothing close: no guess.
    let e = load_err("[train]\nzzz = 1\n");
    assert!(
        e.contains("unknown key `train.zzz`") && !e.contains("did you mean"),
        "{e}"
    );
}

#[test]
fn command_line_paths_are_relative_to_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("configs");
    std::fs::create_dir(&sub).unwrap();
    let p = sub.join("c.toml");
    std::fs::write(
        &p,
        "[model]\nname_or_path = \"HuggingFaceTB/SmolLM2-360M\"\n[output]\ndir = \"../runs/in-file\"\n",
    )
    .unwrap();
    let cwd = std::env::current_dir().unwrap();
    // In the file: relative to the file's folder.
    let c = Config::load(&p, &[]).unwrap();
    assert_eq!(c.output.dir, dir.path().join("runs/in-file"));
    assert_eq!(
        c.model.name_or_path, "HuggingFaceTB/SmolLM2-360M",
        "a hub id stays one"
    );
    // With --set: relative to the current folder, as a shell user means it.
    let c = Config::load(
        &p,
        &[
            "output.dir=runs/from-cli".into(),
            "data.chat_template=./t.jinja".into(),
            "data.prompt_format=template".into(),
            "model.name_or_path=HuggingFaceTB/SmolLM2-135M".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.output.dir, cwd.join("runs/from-cli"));
    assert_eq!(c.data.chat_template.unwrap(), cwd.join("t.jinja"));
    assert_eq!(c.model.name_or_path, "HuggingFaceTB/SmolLM2-135M");
    let c = Config::load(
        &p,
        &["data.sources=[{kind = \"hh-rlhf\", files = [\"data/a.jsonl\"]}]".into()],
    )
    .unwrap();
    assert_eq!(c.data.sources[0].files, vec![cwd.join("data/a.jsonl")]);
}

#[test]
fn trl_formats_config_reads_every_layout() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/trl-formats.toml");
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    // The tiny model (no chat template: message lists fall back to raw text) instead of the
    // real one, which CI may not have.
    let cfg = Config::load(&p, &[format!("model.name_or_path={}", tiny.display())]).unwrap();
    assert_eq!(cfg.train.lr, 2e-4, "TRL's learning_rate");
    assert_eq!(cfg.train.grad_accum, 4, "TRL's gradient_accumulation_steps");
    let (data, _) = kto_train::data::prepare_for_run(&cfg, true).unwrap();
    let sources = data.summary_json["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 6);
    for s in sources {
        assert!(s["records_read"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["examples"].as_u64(), Some(16), "{}", s["name"]);
    }
}
