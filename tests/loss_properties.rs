//! Properties of the loss head that have no reference vectors: first step, extreme margins,
//! homogeneous micro-batches, the BCO baseline (cumulative, EMA, staged start, state) and
//! component clipping, each checked from its definition in docs/enhanced-kto.md.
use kto_train::config::{LossConfig, LossType, Weighting};
use kto_train::loss::{
    finalize_metrics, loss_terms, Components, LossHead, LossOutput, LossState, SequenceLogps,
};
use kto_train::util::metric_sums::MetricSums;

/// Small deterministic generator so the tests need no seed plumbing.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.next()
    }
}

/// Every loss type and a grid of Enhanced KTO switches.
fn config_grid() -> Vec<LossConfig> {
    let mut v = vec![
        LossConfig::default(),
        LossConfig {
            loss_type: LossType::ApoZeroUnpaired,
            ..Default::default()
        },
        LossConfig {
            undesirable_weight: 1.33,
            ..Default::default()
        },
    ];
    for value_function in [true, false] {
        for weighting in [Weighting::Tk92, Weighting::Prelec, Weighting::None] {
            for odds_ratio_weight in [0.0, 0.1] {
                for (bco_shift, bco_momentum) in [(false, None), (true, None), (true, Some(0.9))] {
                    for component_clip in [None, Some(1e-3)] {
                        for (bco_start_step, bco_ramp_steps) in [(0, 0), (2, 3)] {
                            v.push(LossConfig {
                                value_function,
                                weighting,
                                odds_ratio_weight,
                                bco_shift,
                                bco_momentum,
                                component_clip,
                                bco_start_step,
                                bco_ramp_steps,
                                ..LossConfig::enhanced_default()
                            });
                        }
                    }
                }
            }
        }
    }
    for c in &v {
        c.validate().unwrap();
    }
    v
}

fn label_sets() -> Vec<Vec<bool>> {
    vec![
        vec![true, false, true, false],
        vec![true, true, false],
        vec![true; 4],
        vec![false; 3],
        vec![false, true],
    ]
}

fn assert_finite(out: &LossOutput, what: &str) {
    assert!(out.loss.is_finite(), "{what}: loss {}", out.loss);
    assert!(
        out.grad.iter().all(|g| g.is_finite()),
        "{what}: grad {:?}",
        out.grad
    );
    assert!(out.delta.is_finite() && out.z.is_finite(), "{what}");
    let m = finalize_metrics(&out.metrics);
    assert!(m.values().all(|v| v.is_finite()), "{what}: metrics {m:?}");
}

/// policy == reference and the KL pair equal too: every outcome is exactly 0.
#[test]
fn first_step_has_finite_nonzero_gradient_everywhere() {
    let mut n_checked = 0;
    for cfg in config_grid() {
        for labels in label_sets() {
            let n = labels.len();
            let logps: Vec<f64> = (0..n).map(|i| -80.0 - 17.0 * i as f64).collect();
            let s = SequenceLogps {
                labels,
                policy: logps.clone(),
                reference: logps.clone(),
                policy_kl: Some(logps.iter().map(|x| x - 50.0).collect()),
                reference_kl: Some(logps.iter().map(|x| x - 50.0).collect()),
                completion_tokens: (0..n).map(|i| 40.0 + i as f64).collect(),
            };
            let mut head = LossHead::new(&cfg);
            for step in [0u64, 5] {
                let what = format!("{cfg:?} step {step} labels {:?}", s.labels);
                let out = head.train_batch(&s, step).unwrap();
                assert!(
                    out.terms.o.iter().all(|&o| o == 0.0),
                    "{what}: o {:?}",
                    out.terms.o
                );
                assert_finite(&out, &what);
                assert!(
                    out.grad.iter().all(|&g| g != 0.0),
                    "{what}: zero gradient entry {:?}",
                    out.grad
                );
                assert!(out.grad_pt_clipped.iter().all(|&g| g != 0.0), "{what}");
                n_checked += 1;
            }
        }
    }
    assert!(n_checked > 1000);
}

/// The slope of the prospect-theory term at the first step, from the definitions: with
/// V'(0) = a eps^(a-1) (gains branch) and W'(1/2) of TK92, each |dl/dP| = w beta W' V' / n.
#[test]
fn first_step_gradient_value() {
    let cfg = LossConfig {
        odds_ratio_weight: 0.0,
        ..LossConfig::enhanced_default()
    };
    let s = SequenceLogps {
        labels: vec![true, false],
        policy: vec![-10.0, -20.0],
        reference: vec![-10.0, -20.0],
        policy_kl: Some(vec![-30.0, -40.0]),
        reference_kl: Some(vec![-30.0, -40.0]),
        completion_tokens: vec![5.0, 5.0],
    };
    let out = LossHead::new(&cfg).eval_batch(&s, 0).unwrap();
    // TK92 at p = 1/2: W = 2^-1 / (2 * 2^-g)^(1/g) ... d log W/dv = g/2 at v = 0.
    for (i, g) in [(0, 0.61f64), (1, 0.69)] {
        let w_half = 0.5f64.powf(g) / (2.0 * 0.5f64.powf(g)).powf(1.0 / g);
        let dw = w_half * g / 2.0;
        let want = 0.1 * dw * 0.88 / 2.0;
        let sign = if i == 0 { -1.0 } else { 1.0 };
        assert!(
            (out.grad[i] - sign * want).abs() < 1e-15,
            "{i}: {} vs {}",
            out.grad[i],
            want
        );
    }
}

fn extreme_batch(margin: f64, beta: f64) -> SequenceLogps {
    // beta (r - z) = +-margin with z = 0 (KL pair equal); large sums as for long completions.
    let r = margin / beta;
    let reference = vec![-3000.0, -2500.0, -4000.0, -3500.0, -2000.0, -1000.0];
    let shifts = [r, -r, -r, r, r * 0.5, -r * 0.999];
    let policy: Vec<f64> = reference
        .iter()
        .zip(shifts)
        .map(|(x, d)| (x + d).min(-1e-6))
        .collect();
    SequenceLogps {
        labels: vec![true, false, true, false, true, false],
        policy,
        reference,
        policy_kl: Some(vec![-100.0; 6]),
        reference_kl: Some(vec![-100.0; 6]),
        completion_tokens: vec![512.0, 300.0, 1.0, 2048.0, 7.0, 100.0],
    }
}

#[test]
fn extreme_margins_stay_finite() {
    for cfg in config_grid() {
        for margin in [89.0, 90.0, 91.0, 300.0, 1e3, 1e4, 1e5] {
            let s = extreme_batch(margin, cfg.beta);
            let mut head = LossHead::new(&cfg);
            for step in 0..6u64 {
                let what = format!("{cfg:?} margin {margin} step {step}");
                let out = head.train_batch(&s, step).unwrap();
                assert_finite(&out, &what);
                assert!(head.state().mu.is_finite(), "{what}");
                let ev = head.eval_batch(&s, step).unwrap();
                assert_finite(&ev, &what);
            }
        }
    }
}

/// Near |margin| = 90, where 1 - sigmoid is about e^-90, the gradient is still the analytic one.
#[test]
fn extreme_margins_gradient_matches_finite_differences() {
    let cfg = LossConfig::enhanced_default();
    let s = extreme_batch(90.0, cfg.beta);
    let head = LossHead::new(&cfg);
    let out = head.eval_batch(&s, 0).unwrap();
    let fd = fd_grad(&s, |x| head.eval_batch(x, 0).unwrap().loss, 1e-3);
    assert_l2_close(&out.grad, &fd, 1e-6, "margin 90");
}

#[test]
fn homogeneous_batch_has_no_odds_ratio_and_no_pair_metrics() {
    for labels in [vec![true; 5], vec![false; 5]] {
        let s = SequenceLogps {
            labels: labels.clone(),
            policy: vec![-50.0, -60.0, -70.0, -80.0, -90.0],
            reference: vec![-52.0, -58.0, -71.0, -80.0, -95.0],
            policy_kl: Some(vec![-100.0; 5]),
            reference_kl: Some(vec![-101.0; 5]),
            completion_tokens: vec![20.0; 5],
        };
        for cfg in config_grid() {
            let out = LossHead::new(&cfg).train_batch(&s, 0).unwrap();
            assert_eq!(out.terms.l_or(), 0.0);
            assert!(out.grad_or_clipped.iter().all(|&g| g == 0.0));
            assert_eq!(out.grad_norm_or_unclipped, 0.0);
            assert_finite(&out, "homogeneous");
            let m = finalize_metrics(&out.metrics);
            for k in [
                "loss/or",
                "log_odds_ratio",
                "log_odds_chosen",
                "grad_norm/or",
                "rewards/margins",
            ] {
                assert!(!m.contains_key(k), "{k} present in {m:?}");
            }
            let missing = if labels[0] { "rejected" } else { "chosen" };
            assert!(!m.contains_key(&format!("rewards/{missing}")));
            if cfg.loss_type == LossType::EnhancedKto {
                assert!(!m.contains_key(&format!("pt/confidence/{missing}")));
                assert!(m.contains_key("loss/pt"));
            }
        }
    }
}

/// Pair metrics pool over pairs across micro-batches: a one-label micro-batch adds nothing.
#[test]
fn pair_metrics_pool_over_pairs() {
    let cfg = LossConfig::enhanced_default();
    let mut head = LossHead::new(&cfg);
    let mixed = SequenceLogps {
        labels: vec![true, false, false],
        policy: vec![-30.0, -60.0, -45.0],
        reference: vec![-31.0, -58.0, -45.5],
        policy_kl: Some(vec![-100.0; 3]),
        reference_kl: Some(vec![-100.5; 3]),
        completion_tokens: vec![20.0, 30.0, 25.0],
    };
    let mixed2 = SequenceLogps {
        labels: vec![true, true, false, false],
        policy: vec![-20.0, -40.0, -45.0, -70.0],
        reference: vec![-21.0, -41.0, -44.0, -69.0],
        policy_kl: Some(vec![-100.0; 4]),
        reference_kl: Some(vec![-100.5; 4]),
        completion_tokens: vec![20.0, 30.0, 25.0, 40.0],
    };
    let homo = SequenceLogps {
        labels: vec![true, true],
        policy: vec![-30.0, -20.0],
        reference: vec![-31.0, -21.0],
        policy_kl: Some(vec![-100.0; 2]),
        reference_kl: Some(vec![-100.5; 2]),
        completion_tokens: vec![20.0, 30.0],
    };
    let a = head.train_batch(&mixed, 0).unwrap();
    let b = head.train_batch(&homo, 0).unwrap();
    let c = head.train_batch(&mixed2, 0).unwrap();
    let mut pooled = MetricSums::new();
    for o in [&a, &b, &c] {
        pooled.merge(&o.metrics);
    }
    let m = finalize_metrics(&pooled);
    let (ta, tc) = (a.terms.odds.unwrap(), c.terms.odds.unwrap());
    assert_eq!((ta.n_pairs, tc.n_pairs), (2, 4));
    let want = (ta.loss * 2.0 + tc.loss * 4.0) / 6.0;
    assert!((m["loss/or"] - want).abs() < 1e-15);
    assert!((m["log_odds_ratio"] + want).abs() < 1e-15);
    let want_chosen = (ta.sum_diff + tc.sum_diff) / 6.0;
    assert!((m["log_odds_chosen"] - want_chosen).abs() < 1e-15);
    // Example-level metrics pool over the 9 examples.
    let all_l: f64 = [&a.terms.l, &b.terms.l, &c.terms.l]
        .iter()
        .flat_map(|v| v.iter())
        .sum();
    assert!((m["loss/pt"] - all_l / 9.0).abs() < 1e-15);
    assert!(m.values().all(|v| v.is_finite()));
}

fn random_batch(rng: &mut Lcg, n: usize, labels: Option<Vec<bool>>) -> SequenceLogps {
    let labels = labels.unwrap_or_else(|| (0..n).map(|i| i % 2 == 0).collect());
    let tokens: Vec<f64> = (0..n).map(|_| rng.range(5.0, 300.0).round()).collect();
    // Mean token log-probs in [-3, -0.05]: away from the odds-ratio clamp.
    let policy: Vec<f64> = tokens.iter().map(|t| t * rng.range(-3.0, -0.05)).collect();
    let reference: Vec<f64> = policy.iter().map(|p| p + rng.range(-30.0, 30.0)).collect();
    let policy_kl: Vec<f64> = (0..n).map(|_| rng.range(-400.0, -50.0)).collect();
    let reference_kl: Vec<f64> = policy_kl.iter().map(|p| p + rng.range(-5.0, 3.0)).collect();
    SequenceLogps {
        labels,
        policy,
        reference,
        policy_kl: Some(policy_kl),
        reference_kl: Some(reference_kl),
        completion_tokens: tokens,
    }
}

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

fn assert_l2_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(d <= rel * n, "{what}: rel {:e}\n{got:?}\n{want:?}", d / n);
}

/// The analytic dL/dP of the head against central differences of its own loss, for every
/// configuration without clipping (clipping is not a gradient) on random batches. The BCO
/// baseline is a detached constant, so eval (which holds it) is the function differentiated.
#[test]
fn analytic_gradient_matches_finite_differences() {
    let mut rng = Lcg(7);
    for cfg in config_grid()
        .into_iter()
        .filter(|c| c.component_clip.is_none())
    {
        for trial in 0..3 {
            let s = random_batch(&mut rng, 6, None);
            let mut head = LossHead::new(&cfg);
            head.restore(LossState {
                mu: rng.range(-0.5, 0.5),
                n: 10,
            });
            let out = head.eval_batch(&s, 4).unwrap();
            // Outcomes far enough from V's kink at 0 for h = 1e-4 (o moves by beta h).
            if out.terms.o.iter().any(|o| o.abs() < 1e-3) {
                continue;
            }
            let fd = fd_grad(&s, |x| head.eval_batch(x, 4).unwrap().loss, 1e-4);
            assert_l2_close(&out.grad, &fd, 1e-6, &format!("{cfg:?} trial {trial}"));
        }
    }
}

fn head_values(cfg: &LossConfig, s: &SequenceLogps) -> Vec<f64> {
    let z = kto_train::loss::kl_reference_point(s).unwrap();
    s.policy
        .iter()
        .zip(&s.reference)
        .map(|(p, r)| cfg.beta * ((p - r) - z))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn bco_cumulative_is_the_mean_of_all_examples_seen() {
    let cfg = LossConfig {
        bco_shift: true,
        ..LossConfig::enhanced_default()
    };
    let mut head = LossHead::new(&cfg);
    let mut rng = Lcg(11);
    let mut seen = Vec::new();
    for (k, size) in [2usize, 5, 3, 4, 2].into_iter().enumerate() {
        let s = random_batch(&mut rng, size, None);
        seen.extend(head_values(&cfg, &s));
        let out = head.train_batch(&s, k as u64).unwrap();
        let st = head.state();
        assert_eq!(st.n, seen.len() as u64);
        assert!(
            (st.mu - mean(&seen)).abs() < 1e-14,
            "{} vs {}",
            st.mu,
            mean(&seen)
        );
        // Updated before the loss: this micro-batch already uses the new mean.
        assert_eq!(out.delta, st.mu);
        let want = loss_terms(&Components::from_config(&cfg), &s, out.z, st.mu).unwrap();
        assert_eq!(out.loss, want.loss);
        let m = finalize_metrics(&out.metrics);
        assert_eq!(m["delta"], st.mu);
    }
}

#[test]
fn bco_ema_follows_its_definition() {
    let c = 0.8;
    let cfg = LossConfig {
        bco_shift: true,
        bco_momentum: Some(c),
        ..LossConfig::enhanced_default()
    };
    let mut head = LossHead::new(&cfg);
    let mut rng = Lcg(5);
    let mut mu: Option<f64> = None;
    for k in 0..6u64 {
        let s = random_batch(&mut rng, 3 + (k as usize % 3), None);
        let mb = mean(&head_values(&cfg, &s));
        // The first micro-batch sets mu = m_b, then mu = c mu + (1 - c) m_b.
        let want = match mu {
            None => mb,
            Some(m) => c * m + (1.0 - c) * mb,
        };
        mu = Some(want);
        let out = head.train_batch(&s, k).unwrap();
        assert!((head.state().mu - want).abs() < 1e-15);
        assert_eq!(out.delta, head.state().mu);
    }
}

#[test]
fn bco_staged_start_and_ramp() {
    for (start, ramp) in [(3u64, 4u64), (2, 0), (0, 5), (0, 0)] {
        let cfg = LossConfig {
            bco_shift: true,
            bco_start_step: start,
            bco_ramp_steps: ramp,
            ..LossConfig::enhanced_default()
        };
        let mut head = LossHead::new(&cfg);
        let mut rng = Lcg(start * 31 + ramp);
        for t in 0..12u64 {
            // Two micro-batches per optimizer step.
            for _ in 0..2 {
                let s = random_batch(&mut rng, 4, None);
                let out = head.train_batch(&s, t).unwrap();
                let mu = head.state().mu;
                assert!(mu != 0.0, "mu keeps being updated before the start");
                let factor = if ramp == 0 {
                    if t >= start {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    ((t as f64 - start as f64) / ramp as f64).clamp(0.0, 1.0)
                };
                assert!(
                    (out.delta - mu * factor).abs() <= 1e-15 * mu.abs(),
                    "start {start} ramp {ramp} t {t}: {} vs {}",
                    out.delta,
                    mu * factor
                );
                if t < start || (ramp > 0 && t == start) {
                    assert_eq!(out.delta, 0.0);
                }
                if t >= start + ramp {
                    assert_eq!(out.delta, mu);
                }
            }
        }
    }
}

#[test]
fn eval_never_updates_the_baseline() {
    let cfg = LossConfig {
        bco_shift: true,
        ..LossConfig::enhanced_default()
    };
    let mut head = LossHead::new(&cfg);
    let mut rng = Lcg(3);
    let s = random_batch(&mut rng, 4, None);
    let ev0 = head.eval_batch(&s, 0).unwrap();
    assert_eq!(ev0.delta, 0.0);
    assert_eq!(head.state(), LossState::default());
    head.train_batch(&s, 0).unwrap();
    let before = head.state();
    for _ in 0..3 {
        let e = random_batch(&mut rng, 5, None);
        let out = head.eval_batch(&e, 1).unwrap();
        assert_eq!(out.delta, before.mu);
    }
    assert_eq!(head.state(), before);
}

#[test]
fn bco_state_round_trip() {
    let cfg = LossConfig {
        bco_shift: true,
        bco_momentum: Some(0.95),
        bco_start_step: 1,
        bco_ramp_steps: 2,
        ..LossConfig::enhanced_default()
    };
    let mut rng = Lcg(99);
    let batches: Vec<_> = (0..8).map(|_| random_batch(&mut rng, 4, None)).collect();
    let mut a = LossHead::new(&cfg);
    for (t, s) in batches[..4].iter().enumerate() {
        a.train_batch(s, t as u64).unwrap();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    let back: LossState = serde_json::from_str(&saved).unwrap();
    assert_eq!(back, a.state(), "bit-exact through JSON");
    let back_toml: LossState = toml::from_str(&toml::to_string(&a.state()).unwrap()).unwrap();
    assert_eq!(back_toml, a.state(), "bit-exact through TOML");
    // A state written by hand (no bits) or edited by hand (stale bits) takes the written mu.
    let hand: LossState = serde_json::from_str(r#"{"mu": 0.25, "n": 3}"#).unwrap();
    assert_eq!(hand, LossState { mu: 0.25, n: 3 });
    let edited: LossState =
        serde_json::from_str(&saved.replace(&format!("\"mu\":{}", a.state().mu), "\"mu\":0.5"))
            .unwrap();
    assert_eq!(edited.mu, 0.5);
    let mut b = LossHead::new(&cfg);
    b.restore(back);
    assert_eq!(b.state(), back);
    for (t, s) in batches[4..].iter().enumerate() {
        let oa = a.train_batch(s, 4 + t as u64).unwrap();
        let ob = b.train_batch(s, 4 + t as u64).unwrap();
        assert_eq!(oa.loss, ob.loss);
        assert_eq!(oa.grad, ob.grad);
        assert_eq!(a.state(), b.state());
    }
}

#[test]
fn bco_off_has_no_state_and_no_delta() {
    let cfg = LossConfig::enhanced_default();
    let mut head = LossHead::new(&cfg);
    let mut rng = Lcg(1);
    let s = random_batch(&mut rng, 4, None);
    head.restore(LossState { mu: 3.0, n: 7 });
    let out = head.train_batch(&s, 0).unwrap();
    assert_eq!(out.delta, 0.0);
    assert_eq!(head.state(), LossState::default());
    assert!(!finalize_metrics(&out.metrics).contains_key("delta"));
}

#[test]
fn bco_skips_a_non_finite_micro_batch() {
    let cfg = LossConfig {
        bco_shift: true,
        ..LossConfig::enhanced_default()
    };
    let mut head = LossHead::new(&cfg);
    let mut rng = Lcg(2);
    head.train_batch(&random_batch(&mut rng, 4, None), 0)
        .unwrap();
    let before = head.state();
    let mut bad = random_batch(&mut rng, 4, None);
    bad.policy[1] = f64::NAN;
    let out = head.train_batch(&bad, 1).unwrap();
    assert!(out.loss.is_nan());
    assert_eq!(head.state(), before);
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn component_clipping_from_its_definition() {
    let mut rng = Lcg(17);
    for clip in [1e-5, 3e-4, 1e-3, 1e3] {
        for labels in [None, Some(vec![true; 6])] {
            let s = random_batch(&mut rng, 6, labels.clone());
            let base = LossConfig {
                odds_ratio_weight: 0.5,
                ..LossConfig::enhanced_default()
            };
            let clipped = LossConfig {
                component_clip: Some(clip),
                ..base.clone()
            };
            let a = LossHead::new(&base).eval_batch(&s, 0).unwrap();
            let b = LossHead::new(&clipped).eval_batch(&s, 0).unwrap();
            assert_eq!(a.loss, b.loss, "clipping changes the gradient only");
            // Norms are reported before clipping.
            assert_eq!(a.grad_norm_pt_unclipped, b.grad_norm_pt_unclipped);
            assert_eq!(a.grad_norm_or_unclipped, b.grad_norm_or_unclipped);
            for (ua, ub) in [
                (&a.grad_pt_clipped, &b.grad_pt_clipped),
                (&a.grad_or_clipped, &b.grad_or_clipped),
            ] {
                let na = norm(ua);
                let nb = norm(ub);
                assert!(nb <= clip * (1.0 + 1e-12), "clip {clip}: norm {nb}");
                let want_scale = if na > clip { clip / na } else { 1.0 };
                for (x, y) in ua.iter().zip(ub.iter()) {
                    assert!((y - x * want_scale).abs() <= 1e-15 * x.abs().max(1e-300));
                }
                if na > 0.0 {
                    // Direction preserved: cosine 1.
                    let dot: f64 = ua.iter().zip(ub.iter()).map(|(x, y)| x * y).sum();
                    assert!((dot / (na * nb) - 1.0).abs() < 1e-12);
                } else {
                    assert!(ub.iter().all(|&y| y == 0.0), "a zero component stays zero");
                }
            }
            for i in 0..6 {
                assert_eq!(b.grad[i], b.grad_pt_clipped[i] + b.grad_or_clipped[i]);
            }
            if labels.is_none() && clip < 1e-3 {
                assert!(
                    norm(&a.grad_pt_clipped) > clip && norm(&a.grad_or_clipped) > clip,
                    "both clipped"
                );
            }
        }
    }
}
