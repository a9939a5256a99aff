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
