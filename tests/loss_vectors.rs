//! Every block of tests/fixtures/loss-vectors.json, recomputed from the inputs stored with it.
use kto_train::config::{LossConfig, LossType, Weighting};
use kto_train::loss::{
    finalize_metrics, kl_reference_point, log1mexp, loss_terms, orpo_loss, trl_bco_loss, value,
    weight_of_logit, weight_of_prob, Components, LossHead, LossState, SequenceLogps,
    TrlRunningMoments, ValueParams, WeightFn,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/loss-vectors.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn fv(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(f).collect()
}

fn bv(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|b| b.as_bool().expect("bool"))
        .collect()
}

/// The fixture's tolerance: 1e-9 relative or 1e-11 absolute, whichever is looser.
#[track_caller]
fn close(got: f64, want: f64, what: &str) {
    let tol = (1e-9 * want.abs()).max(1e-11);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, want {want:e} (diff {:e})",
        (got - want).abs()
    );
}

#[track_caller]
fn close_all(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(*g, *w, &format!("{what}[{i}]"));
    }
}

/// ||got - want|| / ||want|| <= rel.
#[track_caller]
fn close_l2(got: &[f64], want: &[f64], rel: f64, what: &str) {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let n: f64 = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        d <= rel * n,
        "{what}: L2 rel diff {:e} (got {got:?}, want {want:?})",
        d / n
    );
}

fn seq(inputs: &Value) -> SequenceLogps {
    SequenceLogps {
        labels: bv(&inputs["labels"]),
        policy: fv(&inputs["policy_logps"]),
        reference: fv(&inputs["reference_logps"]),
        policy_kl: inputs.get("policy_KL_logps").map(fv),
        reference_kl: inputs.get("reference_KL_logps").map(fv),
        completion_tokens: inputs
            .get("completion_token_counts")
            .map(fv)
            .unwrap_or_default(),
    }
}

/// Central differences of `loss` in each P_i.
fn fd_grad(s: &SequenceLogps, loss: impl Fn(&SequenceLogps) -> f64, h: f64) -> Vec<f64> {
    (0..s.policy.len())
        .map(|i| {
            let mut a = s.clone();
            let mut b = s.clone();
            a.policy[i] += h;
            b.policy[i] -= h;
            (loss(&a) - loss(&b)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn trl_kto_cases() {
    let fx = fixture();
    let cases = fx["trl_kto"].as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (name, c) in cases {
        let inp = &c["inputs"];
        let loss_type = match inp["loss_type"].as_str().unwrap() {
            "kto" => LossType::Kto,
            "apo_zero_unpaired" => LossType::ApoZeroUnpaired,
            t => panic!("{t}"),
        };
        let cfg = LossConfig {
            loss_type,
            beta: f(&inp["beta"]),
            desirable_weight: f(&inp["desirable_weight"]),
            undesirable_weight: f(&inp["undesirable_weight"]),
            ..Default::default()
        };
        cfg.validate().unwrap();
        let s = seq(inp);
        let head = LossHead::new(&cfg);
        let out = head.eval_batch(&s, 0).unwrap();
        close(out.loss, f(&c["loss"]), &format!("{name} loss"));
        close(out.z, f(&c["kl"]), &format!("{name} kl"));
        close_all(
            &out.terms.l,
            &fv(&c["per_example_losses_in_input_order"]),
            &format!("{name} per-example"),
        );
        // TRL's order: desirable first, then undesirable.
        let mut ordered: Vec<f64> = (0..s.labels.len())
            .filter(|&i| s.labels[i])
            .map(|i| out.terms.l[i])
            .collect();
        ordered.extend(
            (0..s.labels.len())
                .filter(|&i| !s.labels[i])
                .map(|i| out.terms.l[i]),
        );
        close_all(
            &ordered,
            &fv(&c["losses_chosen_then_rejected"]),
            &format!("{name} chosen-then-rejected"),
        );
        let metrics = finalize_metrics(&out.metrics);
        for (k, v) in c["metrics"].as_object().unwrap() {
            let got = *metrics
                .get(k)
                .unwrap_or_else(|| panic!("{name}: metric {k} missing"));
            close(got, f(v), &format!("{name} metric {k}"));
        }
        let fd = fd_grad(&s, |x| head.eval_batch(x, 0).unwrap().loss, 1e-4);
        close_l2(&out.grad, &fd, 1e-6, &format!("{name} grad vs own FD"));
    }
}

#[test]
fn trl_bco_cases() {
    let fx = fixture();
    for name in [
        "given_delta_0.05",
        "loss_with_delta_after_batch1",
        "udm_weights_example",
    ] {
        let c = &fx["bco"][name];
        let inp = &c["inputs"];
        let udm = inp["udm_weights_for_undesirable_in_order"]
            .as_array()
            .map(|_| fv(&inp["udm_weights_for_undesirable_in_order"]));
        let out = trl_bco_loss(
            &bv(&inp["labels"]),
            &fv(&inp["policy_logps"]),
            &fv(&inp["reference_logps"]),
            f(&inp["beta"]),
            f(&inp["delta"]),
            udm.as_deref(),
        );
        close(f(&c["delta"]), f(&inp["delta"]), name);
        close_all(&out.rewards, &fv(&c["rewards"]), &format!("{name} rewards"));
        close_all(
            &out.per_example,
            &fv(&c["per_example_losses_in_input_order"]),
            &format!("{name} per-example"),
        );
        let labels = bv(&inp["labels"]);
        let mut ordered: Vec<f64> = (0..6)
            .filter(|&i| labels[i])
            .map(|i| out.per_example[i])
            .collect();
        ordered.extend((0..6).filter(|&i| !labels[i]).map(|i| out.per_example[i]));
        close_all(&ordered, &fv(&c["losses_chosen_then_rejected"]), name);
        close(out.loss, f(&c["loss"]), &format!("{name} loss"));
    }
}

#[test]
fn trl_bco_running_moments() {
    let fx = fixture();
    let rm = &fx["bco"]["running_moments"];
    let mut m = TrlRunningMoments::default();
    m.update(&fv(&rm["batch1_rewards"]));
    close(m.mean, f(&rm["delta_after_batch1"]), "delta after batch 1");
    m.update(&fv(&rm["batch2_rewards"]));
    close(m.mean, f(&rm["delta_after_batch2"]), "delta after batch 2");
    close(m.count, f(&rm["count_after_batch2"]), "count");
    close(m.var, f(&rm["var_after_batch2"]), "var");
    close(m.std, f(&rm["std_after_batch2"]), "std");
    // The loss with the delta after batch 1 is the given-delta BCO loss of that block.
    let c = &fx["bco"]["loss_with_delta_after_batch1"];
    close(
        f(&c["delta"]),
        m_after_one(&fv(&rm["batch1_rewards"])),
        "delta used",
    );

    // Enhanced KTO's cumulative baseline is the same count-weighted mean.
    let mut b = kto_train::loss::BcoBaseline::new(None);
    b.update(&fv(&rm["batch1_rewards"]));
    close(
        b.state.mu,
        f(&rm["delta_after_batch1"]),
        "cumulative mu after batch 1",
    );
    b.update(&fv(&rm["batch2_rewards"]));
    close(
        b.state.mu,
        f(&rm["delta_after_batch2"]),
        "cumulative mu after batch 2",
    );
    assert_eq!(b.state.n, 12);
}

fn m_after_one(x: &[f64]) -> f64 {
    let mut m = TrlRunningMoments::default();
    m.update(x);
    m.mean
}

/// TRL's BCO is what the enhanced head's shift gives with the KL term, the value function,
/// the weighting and the odds ratio off: l = -log sigmoid(+-(rhat - delta)) is a softplus,
/// not KTO's 1 - sigmoid, so this checks only the baseline: mu after the first batch is the
/// batch mean of beta (r - z), here with z = 0.
#[test]
fn bco_baseline_through_the_head_matches_trl_delta() {
    let fx = fixture();
    let c = &fx["bco"]["given_delta_0.05"];
    let mut s = seq(&c["inputs"]);
    let n = s.labels.len();
    // A KL pass with P' = R' gives z = 0, as TRL's BCO (no KL term) has.
    s.policy_kl = Some(vec![-10.0; n]);
    s.reference_kl = Some(vec![-10.0; n]);
    s.completion_tokens = vec![100.0; n];
    let cfg = LossConfig {
        bco_shift: true,
        ..LossConfig::enhanced_all_off()
    };
    let mut head = LossHead::new(&cfg);
    let out = head.train_batch(&s, 0).unwrap();
    let rm = &fx["bco"]["running_moments"];
    close(
        out.delta,
        f(&rm["delta_after_batch1"]),
        "delta after one batch",
    );
}

#[test]
fn orpo_block() {
    let fx = fixture();
    let o = &fx["orpo"];
    let inp = &o["inputs"];
    let out = orpo_loss(
        &fv(&inp["chosen_mean_logps"]),
        &fv(&inp["rejected_mean_logps"]),
        f(&inp["beta"]),
        f(&inp["nll_loss"]),
    );
    let e = &o["out"];
    close_all(&out.log_odds, &fv(&e["log_odds"]), "log_odds");
    close_all(
        &out.log_sigmoid_log_odds,
        &fv(&e["logsigmoid_log_odds"]),
        "logsigmoid",
    );
    close_all(
        &out.or_loss_per_pair,
        &fv(&e["L_OR_per_pair"]),
        "L_OR per pair",
    );
    close(out.loss, f(&e["loss"]), "loss");
    let m = &e["metrics"];
    close(f(&inp["nll_loss"]), f(&m["nll_loss"]), "nll");
    close(
        out.log_odds_ratio,
        f(&m["log_odds_ratio"]),
        "log_odds_ratio",
    );
    close(
        out.log_odds_chosen,
        f(&m["log_odds_chosen"]),
        "log_odds_chosen",
    );
    close(
        out.rewards_chosen,
        f(&m["rewards/chosen"]),
        "rewards/chosen",
    );
    close(
        out.rewards_rejected,
        f(&m["rewards/rejected"]),
        "rewards/rejected",
    );
    close(
        out.rewards_accuracies,
        f(&m["rewards/accuracies"]),
        "accuracies",
    );
    close(out.rewards_margins, f(&m["rewards/margins"]), "margins");
    let checks = o["log1mexp_checks"].as_object().unwrap();
    assert_eq!(checks.len(), 6);
    for (x, want) in checks {
        let x: f64 = x.parse().unwrap();
        close(log1mexp(x), f(want), &format!("log1mexp({x})"));
    }
}

#[test]
fn value_function_grid() {
    let fx = fixture();
    let vf = &fx["value_function"];
    let x = fv(&vf["x"]);
    let exact = ValueParams {
        eps: 0.0,
        ..Default::default()
    };
    let eps1 = ValueParams::default();
    let eps001 = ValueParams {
        eps: 0.01,
        ..Default::default()
    };
    let want_d = vf["tk92_exact_derivative"].as_array().unwrap();
    for (i, &xi) in x.iter().enumerate() {
        close(
            value(xi, &exact).0,
            f(&vf["tk92_exact_alpha0.88_lambda2.25"][i]),
            "tk92 exact",
        );
        // The exact derivative is infinite (null) at 0.
        if want_d[i].is_null() {
            assert_eq!(xi, 0.0);
            assert!(value(xi, &exact).1.is_infinite());
        } else {
            close(value(xi, &exact).1, f(&want_d[i]), "tk92 exact derivative");
        }
        close(value(xi, &eps1).0, f(&vf["smooth_eps1"][i]), "eps 1");
        close(
            value(xi, &eps1).1,
            f(&vf["smooth_eps1_derivative_gains_branch_at_0"][i]),
            "eps 1 derivative",
        );
        close(
            value(xi, &eps001).0,
            f(&vf["smooth_eps0.01"][i]),
            "eps 0.01",
        );
        close(
            value(xi, &eps001).1,
            f(&vf["smooth_eps0.01_derivative"][i]),
            "eps 0.01 derivative",
        );
    }
}

#[test]
fn probability_weighting_grid() {
    let fx = fixture();
    let pw = &fx["probability_weighting"];
    let p = fv(&pw["p"]);
    for (key, wf) in [
        ("tk92_gamma0.61", WeightFn::Tk92(0.61)),
        ("tk92_gamma0.69", WeightFn::Tk92(0.69)),
        ("prelec_a0.65", WeightFn::Prelec(0.65)),
    ] {
        let got: Vec<f64> = p.iter().map(|&pi| weight_of_prob(pi, wf)).collect();
        close_all(&got, &fv(&pw[key]), key);
    }
    let v = fv(&pw["logit_v"]);
    for (key, dkey, wf) in [
        (
            "tk92_gamma0.61_of_sigmoid_v",
            Some("tk92_gamma0.61_dw_dv"),
            WeightFn::Tk92(0.61),
        ),
        ("tk92_gamma0.69_of_sigmoid_v", None, WeightFn::Tk92(0.69)),
        (
            "prelec_a0.65_of_sigmoid_v",
            Some("prelec_a0.65_dw_dv"),
            WeightFn::Prelec(0.65),
        ),
    ] {
        let w: Vec<_> = v.iter().map(|&vi| weight_of_logit(vi, wf)).collect();
        close_all(
            &w.iter().map(|x| x.w).collect::<Vec<_>>(),
            &fv(&pw[key]),
            key,
        );
        if let Some(dk) = dkey {
            close_all(
                &w.iter().map(|x| x.dw_dv).collect::<Vec<_>>(),
                &fv(&pw[dk]),
                dk,
            );
        }
        for (vi, wi) in v.iter().zip(&w) {
            assert!(
                wi.log_w.is_finite() && wi.dw_dv.is_finite(),
                "{key} at v = {vi}"
            );
            // Own central difference of W in v.
            let h = 1e-5;
            let fd = (weight_of_logit(vi + h, wf).w - weight_of_logit(vi - h, wf).w) / (2.0 * h);
            assert!(
                (fd - wi.dw_dv).abs() <= 1e-8 * wi.dw_dv.abs().max(1e-3),
                "{key} dW/dv at {vi}"
            );
        }
    }
    // The logit-space form against the plain probability-space formula.
    let naive = |p: f64, g: f64| p.powf(g) / (p.powf(g) + (1.0 - p).powf(g)).powf(1.0 / g);
    let mut max_diff: f64 = 0.0;
    for &pi in &p {
        let v = pi.ln() - (-pi).ln_1p();
        max_diff =
            max_diff.max((weight_of_logit(v, WeightFn::Tk92(0.61)).w - naive(pi, 0.61)).abs());
    }
    assert!(
        max_diff <= f(&pw["max_abs_diff_logit_vs_prob_space_tk0.61"]).max(1e-11),
        "logit vs probability space: {max_diff:e}"
    );
}

/// The case config under the doc's key names.
fn enhanced_config(c: &Value) -> LossConfig {
    let b = |k: &str| c[k].as_bool().unwrap();
    LossConfig {
        loss_type: LossType::EnhancedKto,
        beta: f(&c["beta"]),
        desirable_weight: f(&c["desirable_weight"]),
        undesirable_weight: f(&c["undesirable_weight"]),
        auto_weights: Default::default(),
        value_function: b("pt_value_enabled"),
        value_alpha_gain: f(&c["pt_value_alpha_gain"]),
        value_alpha_loss: f(&c["pt_value_alpha_loss"]),
        loss_aversion: f(&c["pt_loss_aversion"]),
        value_eps: f(&c["pt_value_eps"]),
        weighting: match c["pt_weighting"].as_str().unwrap() {
            "tk92" => Weighting::Tk92,
            "prelec" => Weighting::Prelec,
            "none" => Weighting::None,
            w => panic!("{w}"),
        },
        gamma_gain: f(&c["pt_gamma_gain"]),
        gamma_loss: f(&c["pt_gamma_loss"]),
        prelec_alpha: f(&c["pt_prelec_alpha"]),
        odds_ratio_weight: f(&c["or_weight"]),
        odds_ratio_max_mean_logp: f(&c["or_mean_logp_max"]),
        bco_shift: b("bco_shift_enabled"),
        bco_momentum: None,
        bco_start_step: 0,
        bco_ramp_steps: 0,
        component_clip: None,
    }
}

#[test]
fn enhanced_kto_cases() {
    let fx = fixture();
    let cases = fx["enhanced_kto"]["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg = enhanced_config(&c["config"]);
        cfg.validate().unwrap();
        let s = seq(&c["inputs"]);
        let comps = Components::from_config(&cfg);
        let z = kl_reference_point(&s).unwrap();
        close(z, f(&c["z_ref"]), &format!("{name} z"));
        let delta = f(&c["inputs"]["delta"]);
        let t = loss_terms(&comps, &s, z, delta).unwrap();
        let pe = &c["per_example"];
        close_all(&t.s, &fv(&pe["s"]), &format!("{name} s"));
        close_all(&t.o, &fv(&pe["o"]), &format!("{name} o"));
        close_all(&t.v, &fv(&pe["V"]), &format!("{name} V"));
        close_all(&t.pi, &fv(&pe["pi"]), &format!("{name} pi"));
        close_all(&t.l, &fv(&pe["l_pt"]), &format!("{name} l_pt"));
        close(t.l_or(), f(&c["L_OR"]), &format!("{name} L_OR"));
        close(t.loss, f(&c["loss"]), &format!("{name} loss"));
        if cfg.odds_ratio_weight > 0.0 {
            let or = t.odds.as_ref().unwrap();
            close_all(&or.m, &fv(&pe["m"]), &format!("{name} m"));
            close_all(&or.lo, &fv(&pe["lo"]), &format!("{name} lo"));
        }
        let grad: Vec<f64> = t
            .grad_pt
            .iter()
            .zip(&t.grad_or)
            .map(|(a, b)| a + b)
            .collect();
        close_l2(
            &grad,
            &fv(&c["grad_policy_logps_analytic"]),
            1e-6,
            &format!("{name} dL/dP vs analytic"),
        );
        if let Some(fd) = c.get("grad_policy_logps_fd") {
            close_l2(&grad, &fv(fd), 1e-6, &format!("{name} dL/dP vs their FD"));
            // Own central differences (not at the first step: they straddle V's kink).
            let own = fd_grad(&s, |x| loss_terms(&comps, x, z, delta).unwrap().loss, 1e-4);
            close_l2(&grad, &own, 1e-6, &format!("{name} dL/dP vs own FD"));
        }

        // The same through the head, with the BCO baseline restored to the case's delta so
        // that eval (which never moves it) uses exactly that shift.
        let mut head = LossHead::new(&cfg);
        if cfg.bco_shift {
            head.restore(LossState { mu: delta, n: 6 });
        }
        let out = head.eval_batch(&s, 0).unwrap();
        close(
            out.delta,
            f(&c["delta_used"]),
            &format!("{name} delta_used"),
        );
        close(out.loss, f(&c["loss"]), &format!("{name} head loss"));
        close_l2(&out.grad, &fv(&c["grad_policy_logps_analytic"]), 1e-6, name);
        let m = finalize_metrics(&out.metrics);
        assert!(m.values().all(|v| v.is_finite()), "{name}: {m:?}");
        let orm = c["or_metrics"].as_object().unwrap();
        for key in [
            "log_odds_ratio",
            "log_odds_chosen",
            "loss/or",
            "grad_norm/or",
        ] {
            assert_eq!(
                m.contains_key(key),
                !orm.is_empty(),
                "{name}: {key} in {m:?}"
            );
        }
        for (k, v) in orm {
            close(m[k], f(v), &format!("{name} metric {k}"));
        }
        if !orm.is_empty() {
            close(m["loss/or"], f(&c["L_OR"]), &format!("{name} loss/or"));
        }
        close(m["loss/pt"], t.loss_pt, &format!("{name} loss/pt"));
        assert_eq!(
            m.contains_key("delta"),
            cfg.bco_shift,
            "{name}: delta metric"
        );
    }
}

/// With every component off, Enhanced KTO is TRL's `kto`, bit for bit.
#[test]
fn ablation_equals_trl_kto() {
    let fx = fixture();
    assert_eq!(f(&fx["enhanced_kto"]["check_ablation_minus_trl_kto"]), 0.0);
    let s = seq(&fx["inputs"]);
    for (wd, wu) in [(1.0, 1.0), (1.0, 1.33), (0.7, 1.0)] {
        let base = LossConfig {
            desirable_weight: wd,
            undesirable_weight: wu,
            ..Default::default()
        };
        let off = LossConfig {
            desirable_weight: wd,
            undesirable_weight: wu,
            ..LossConfig::enhanced_all_off()
        };
        let a = LossHead::new(&base).eval_batch(&s, 0).unwrap();
        let b = LossHead::new(&off).eval_batch(&s, 0).unwrap();
        assert_eq!(a.loss, b.loss);
        assert_eq!(a.grad, b.grad);
        assert_eq!(a.terms.l, b.terms.l);
    }
}
