//! The safe scalar forms of docs/enhanced-kto.md section 3.
use kto_train::loss::numerics::{clip_l2, l2_norm, log1mexp, log1mexp_grad, logaddexp};
use kto_train::loss::{log_odds, log_sigmoid, sigmoid, softplus, value, weight_of_logit};
use kto_train::loss::{ValueParams, WeightFn};

#[test]
fn softplus_is_finite_and_exact_at_zero() {
    assert_eq!(softplus(0.0), std::f64::consts::LN_2);
    // softplus'(0) = sigmoid(0) must be exactly 1/2.
    assert_eq!(sigmoid(0.0), 0.5);
    for t in [
        -1e308, -1e5, -745.0, -40.0, -1.0, 1.0, 40.0, 745.0, 1e5, 1e308,
    ] {
        let s = softplus(t);
        assert!(s.is_finite() && s >= 0.0, "softplus({t}) = {s}");
        assert!(log_sigmoid(t).is_finite() && log_sigmoid(t) <= 0.0);
        assert!((0.0..=1.0).contains(&sigmoid(t)));
    }
    assert_eq!(softplus(1e5), 1e5);
    assert!((softplus(-40.0) - (-40f64).exp()).abs() < 1e-30);
    // Both branches agree at the switch.
    assert!((softplus(1e-12) - softplus(-1e-12) - 1e-12).abs() < 4e-16);
}

#[test]
fn log1mexp_both_branches() {
    let ln2 = std::f64::consts::LN_2;
    for x in [
        -1e-300, -1e-12, -1e-4, -0.5, -ln2, -0.7, -1.0, -30.0, -800.0,
    ] {
        let y = log1mexp(x);
        assert!(
            y.is_finite() && y < 0.0 || x < -700.0,
            "log1mexp({x}) = {y}"
        );
        let g = log1mexp_grad(x);
        assert!(g.is_finite() && g <= 0.0, "grad at {x}: {g}");
    }
    // Continuous across -ln 2, where the branch switches.
    let (a, b) = (log1mexp(-ln2 - 1e-12), log1mexp(-ln2 + 1e-12));
    assert!((a - b).abs() < 1e-11);
    assert!((log1mexp(-ln2) + ln2).abs() < 1e-15, "log(1 - 1/2) = -ln 2");
    // d lo/d m = 1 / (1 - e^m), checked by central differences.
    for m in [-5.0f64, -1.0, -0.3, -1e-3] {
        let h = 1e-7 * m.abs();
        let fd = (log_odds(m + h).0 - log_odds(m - h).0) / (2.0 * h);
        assert!((fd - log_odds(m).1).abs() < 1e-6 * fd.abs(), "m = {m}");
    }
}

#[test]
fn logaddexp_and_norms() {
    assert_eq!(logaddexp(1000.0, 1000.0), 1000.0 + std::f64::consts::LN_2);
    assert_eq!(logaddexp(-1e6, 0.0), 0.0);
    let v = [3e200, 4e200];
    assert!((l2_norm(&v) - 5e200).abs() < 1e186, "no overflow");
    assert_eq!(l2_norm(&[0.0, 0.0]), 0.0);
    assert!(l2_norm(&[1.0, f64::NAN]).is_nan());
    let mut z = [0.0; 3];
    assert_eq!(clip_l2(&mut z, 1.0), 0.0);
    assert_eq!(z, [0.0; 3]);
    let mut w = [3.0, 4.0];
    assert_eq!(clip_l2(&mut w, 1.0), 5.0);
    assert!((w[0] - 0.6).abs() < 1e-15 && (w[1] - 0.8).abs() < 1e-15);
}

/// V is built from where-branches: at exactly 0 the slope is the gains side's, never 0, and
/// -0.0 counts as 0.
#[test]
fn value_kink_slopes() {
    let p = ValueParams::default();
    assert_eq!(value(0.0, &p), (0.0, 0.88));
    assert_eq!(value(-0.0, &p).1, 0.88);
    let (_, left) = value(-1e-300, &p);
    assert!((left - 2.25 * 0.88).abs() < 1e-12);
    for o in [-1e6, -90.0, 90.0, 1e6] {
        let (v, d) = value(o, &p);
        assert!(v.is_finite() && d.is_finite() && d > 0.0, "V({o})");
    }
}

#[test]
fn weighting_is_finite_for_every_finite_logit() {
    for f in [
        WeightFn::Identity,
        WeightFn::Tk92(0.28),
        WeightFn::Tk92(0.61),
        WeightFn::Prelec(0.3),
    ] {
        for v in [
            -1e300, -1e5, -800.0, -40.0, -1e-9, 0.0, 1e-9, 40.0, 800.0, 1e5, 1e300,
        ] {
            let w = weight_of_logit(v, f);
            assert!(w.log_w.is_finite() || w.w == 0.0, "{f:?} at {v}: {w:?}");
            assert!(w.w.is_finite() && w.one_minus_w.is_finite() && w.dw_dv.is_finite());
            assert!(w.dw_dv >= 0.0, "{f:?} at {v}: increasing");
            assert!((0.0..=1.0).contains(&w.w));
        }
    }
}
