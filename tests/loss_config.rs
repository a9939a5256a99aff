//! The `[loss]` section: defaults, validation messages, the enhanced-only keys, round trips,
//! and the class-weight ratio warning.
use kto_train::config::{Config, LossConfig, LossType, Weighting};
use kto_train::loss::weight_ratio_warning;

fn parse(text: &str) -> Result<LossConfig, String> {
    let c: LossConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

#[track_caller]
fn refused(text: &str, needles: &[&str]) {
    let e = parse(text).expect_err(text);
    for n in needles {
        assert!(e.contains(n), "`{text}`: message `{e}` lacks `{n}`");
    }
}

#[test]
fn defaults() {
    let d = LossConfig::default();
    assert_eq!(d, parse("").unwrap());
    assert_eq!(d.loss_type, LossType::Kto);
    assert_eq!(
        (d.beta, d.desirable_weight, d.undesirable_weight),
        (0.1, 1.0, 1.0)
    );
    let e = parse("loss_type = \"enhanced_kto\"").unwrap();
    assert_eq!(e, LossConfig::enhanced_default());
    assert!(e.value_function);
    assert_eq!(
        (
            e.value_alpha_gain,
            e.value_alpha_loss,
            e.loss_aversion,
            e.value_eps
        ),
        (0.88, 0.88, 2.25, 1.0)
    );
    assert_eq!(e.weighting, Weighting::Tk92);
    assert_eq!(
        (e.gamma_gain, e.gamma_loss, e.prelec_alpha),
        (0.61, 0.69, 0.65)
    );
    assert_eq!(
        (e.odds_ratio_weight, e.odds_ratio_max_mean_logp),
        (0.1, -1e-4)
    );
    assert!(!e.bco_shift);
    assert_eq!(e.bco_momentum, None);
    assert_eq!((e.bco_start_step, e.bco_ramp_steps), (0, 0));
    assert_eq!(e.component_clip, None);
    assert!(e.needs_kl() && d.needs_kl());
    assert!(!parse("loss_type = \"apo_zero_unpaired\"")
        .unwrap()
        .needs_kl());
}

#[test]
fn every_key_parses() {
    let c = parse(
        r#"
        loss_type = "enhanced_kto"
        beta = 0.2
        desirable_weight = 1.2
        undesirable_weight = 0.9
        value_function = false
        value_alpha_gain = 0.7
        value_alpha_loss = 0.8
        loss_aversion = 1.5
        value_eps = 0.5
        weighting = "prelec"
        gamma_gain = 0.5
        gamma_loss = 0.28
        prelec_alpha = 0.9
        odds_ratio_weight = 0
        odds_ratio_max_mean_logp = -0.001
        bco_shift = true
        bco_momentum = 0.99
        bco_start_step = 100
        bco_ramp_steps = 50
        component_clip = 1.0
        "#,
    )
    .unwrap();
    assert_eq!(c.weighting, Weighting::Prelec);
    assert_eq!(c.bco_momentum, Some(0.99));
    assert_eq!((c.bco_start_step, c.bco_ramp_steps), (100, 50));
    assert_eq!(c.component_clip, Some(1.0));
    assert_eq!(c.gamma_loss, 0.28);
    assert!(parse("loss_type = \"enhanced_kto\"\nweighting = \"none\"").is_ok());
    assert!(parse("loss_type = \"enhanced_kto\"\nweighting = \"tk92\"").is_ok());
}

#[test]
fn bad_values_are_refused_naming_the_key_and_range() {
    let e = "loss_type = \"enhanced_kto\"\n";
    refused("beta = 0", &["beta", "positive"]);
    refused(
        "undesirable_weight = -1",
        &["undesirable_weight", "positive"],
    );
    refused(
        &format!("{e}gamma_gain = 0.2"),
        &["gamma_gain", "[0.28, 1]", "increasing"],
    );
    refused(
        &format!("{e}gamma_loss = 1.5"),
        &["gamma_loss", "[0.28, 1]"],
    );
    refused(
        &format!("{e}bco_momentum = 1.0"),
        &["bco_momentum", "(0, 1)"],
    );
    refused(
        &format!("{e}bco_momentum = 0.0"),
        &["bco_momentum", "(0, 1)"],
    );
    refused(
        &format!("{e}bco_momentum = -0.5"),
        &["bco_momentum", "(0, 1)"],
    );
    refused(&format!("{e}value_eps = 0"), &["value_eps", "positive"]);
    refused(
        &format!("{e}value_alpha_gain = 1.2"),
        &["value_alpha_gain", "(0, 1]"],
    );
    refused(
        &format!("{e}value_alpha_loss = 0"),
        &["value_alpha_loss", "(0, 1]"],
    );
    refused(
        &format!("{e}loss_aversion = 0"),
        &["loss_aversion", "positive"],
    );
    refused(&format!("{e}prelec_alpha = 0"), &["prelec_alpha", "(0, 1]"]);
    refused(
        &format!("{e}prelec_alpha = 1.1"),
        &["prelec_alpha", "(0, 1]"],
    );
    refused(
        &format!("{e}odds_ratio_weight = -0.1"),
        &["odds_ratio_weight", ">= 0"],
    );
    refused(
        &format!("{e}odds_ratio_max_mean_logp = 0"),
        &["odds_ratio_max_mean_logp", "negative"],
    );
    refused(
        &format!("{e}component_clip = 0"),
        &["component_clip", "positive"],
    );
    refused(
        &format!("{e}component_clip = -1"),
        &["component_clip", "positive"],
    );
    refused(&format!("{e}weighting = \"linear\""), &["weighting"]);
    refused(&format!("{e}bco_start_step = -1"), &["bco_start_step"]);
    refused("loss_type = \"dpo\"", &["loss_type"]);
    refused("betta = 0.1", &["betta"]);
}

#[test]
fn enhanced_keys_are_refused_under_the_trl_losses() {
    refused(
        "value_function = true",
        &["value_function", "enhanced_kto", "\"kto\""],
    );
    refused("weighting = \"prelec\"", &["weighting", "enhanced_kto"]);
    refused("odds_ratio_weight = 0.1", &["odds_ratio_weight"]);
    refused(
        "value_function = false\nvalue_alpha_gain = 0.5",
        &["value_alpha_gain"],
    );
    refused(
        "loss_type = \"apo_zero_unpaired\"\nbco_shift = true\nloss_aversion = 3",
        &[
            "loss_aversion",
            "bco_shift",
            "enhanced_kto",
            "apo_zero_unpaired",
        ],
    );
    // Through the whole config file too.
    let e = Config::from_toml_str(
        "[model]\nname_or_path = \"m\"\n[loss]\nloss_type = \"kto\"\nodds_ratio_weight = 0.5\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("odds_ratio_weight") && e.contains("enhanced_kto"),
        "{e}"
    );
    // A component switched off says what plain KTO does: an Enhanced KTO config becomes its KTO
    // ablation with `--set loss.loss_type=kto` and the four switches set to off.
    let off = "value_function = false\nweighting = \"none\"\nodds_ratio_weight = 0.0\nbco_shift = false\n";
    for loss_type in ["kto", "apo_zero_unpaired"] {
        let c = Config::from_toml_str(&format!(
            "[model]\nname_or_path = \"m\"\n[loss]\nloss_type = \"{loss_type}\"\n{off}"
        ))
        .unwrap();
        assert_eq!(c.loss.loss_type.name(), loss_type);
    }
    assert!(Config::from_toml_str(
        "[model]\nname_or_path = \"m\"\n[loss]\nloss_type = \"enhanced_kto\"\nodds_ratio_weight = 0.0\n",
    )
    .is_ok());
    // The KL reference point needs two examples per micro-batch, for Enhanced KTO as for KTO.
    let e = Config::from_toml_str(
        "[model]\nname_or_path = \"m\"\n[loss]\nloss_type = \"enhanced_kto\"\n[train]\nbatch_size = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch_size"), "{e}");
}

#[test]
fn round_trips_through_toml() {
    let configs = [
        LossConfig::default(),
        LossConfig {
            loss_type: LossType::ApoZeroUnpaired,
            beta: 0.3,
            ..Default::default()
        },
        LossConfig::enhanced_default(),
        LossConfig::enhanced_all_off(),
        LossConfig {
            bco_shift: true,
            bco_momentum: Some(0.9),
            bco_start_step: 10,
            bco_ramp_steps: 20,
            component_clip: Some(0.5),
            weighting: Weighting::Prelec,
            ..LossConfig::enhanced_default()
        },
    ];
    for c in configs {
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        if c.loss_type != LossType::EnhancedKto {
            assert!(!text.contains("value_function"), "{text}");
        }
    }
}

#[test]
fn weight_ratio_warning_rule() {
    // TRL's KTOTrainer check, bounds rounded to two decimals as TRL rounds them.
    let c = LossConfig::default();
    assert_eq!(weight_ratio_warning(100, 100, &c), None);
    assert_eq!(weight_ratio_warning(728, 729, &c), None, "nearly balanced");
    assert_eq!(weight_ratio_warning(4, 3, &c), None, "exactly 4/3");
    assert_eq!(weight_ratio_warning(120, 100, &c), None);
    let w = weight_ratio_warning(100, 200, &c).unwrap();
    // TRL: desirable_weight in [2.0, 2.66] or undesirable_weight in [0.38, 0.5].
    assert!(
        w.contains("desirable_weight in [2, 2.66]")
            && w.contains("undesirable_weight in [0.38, 0.5]"),
        "{w}"
    );
    assert!(weight_ratio_warning(150, 100, &c).is_some());
    assert!(weight_ratio_warning(0, 100, &c).is_some());
    assert!(weight_ratio_warning(100, 0, &c).is_some());
    // 1:2 data fixed by the desirable weight, as the paper recommends.
    let fixed = LossConfig {
        desirable_weight: 2.2,
        ..Default::default()
    };
    assert_eq!(weight_ratio_warning(100, 200, &fixed), None);
    // Balanced counts: TRL does not check the weights.
    let too_much = LossConfig {
        undesirable_weight: 1.33,
        ..Default::default()
    };
    assert_eq!(weight_ratio_warning(100, 100, &too_much), None);
    assert!(weight_ratio_warning(100, 101, &too_much).is_some());
}

#[test]
fn auto_class_weights_land_in_the_band() {
    let ratio = |c: &LossConfig, nd: usize, nu: usize| {
        c.desirable_weight * nd as f64 / (c.undesirable_weight * nu as f64)
    };
    for (nd, nu) in [(100, 900), (900, 100), (1, 1000), (728, 729), (3, 5)] {
        for written in [
            "desirable_weight = \"auto\"",
            "desirable_weight = \"auto\"\nundesirable_weight = \"auto\"",
            "undesirable_weight = \"auto\"",
            "desirable_weight = \"auto\"\nundesirable_weight = 2.0",
            "desirable_weight = 0.5\nundesirable_weight = \"auto\"",
        ] {
            let mut c = parse(written).unwrap();
            let line = c.resolve_auto_weights(nd, nu).unwrap();
            let r = ratio(&c, nd, nu);
            assert!((r - 7.0 / 6.0).abs() < 1e-12, "{written} {nd}/{nu}: {r}");
            assert!((1.0..=4.0 / 3.0).contains(&r));
            assert_eq!(
                weight_ratio_warning(nd, nu, &c),
                None,
                "{written} {nd}/{nu}: {line}"
            );
            // A written weight is kept.
            if written.contains("2.0") {
                assert_eq!(c.undesirable_weight, 2.0);
            }
            if written.contains("0.5") {
                assert_eq!(c.desirable_weight, 0.5);
            }
        }
    }
    // "auto" is written back as "auto" (a resumed run compares configs).
    let c = parse("desirable_weight = \"auto\"").unwrap();
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("desirable_weight = \"auto\""), "{text}");
    assert_eq!(toml::from_str::<LossConfig>(&text).unwrap(), c);
    refused("desirable_weight = \"balanced\"", &["\"auto\""]);
    // Nothing auto: nothing changes.
    let mut d = LossConfig::default();
    assert_eq!(d.resolve_auto_weights(10, 90), None);
    assert_eq!((d.desirable_weight, d.undesirable_weight), (1.0, 1.0));
}
