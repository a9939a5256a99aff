//! Scalar functions in forms that stay finite for every finite input (docs/enhanced-kto.md §3).
//! Each branch only ever sees inputs for which it cannot overflow, so no inf/NaN is produced and
//! later multiplied by 0.

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^t): `t + log1p(e^-t)` for t > 0, `log1p(e^t)` otherwise, so exp never sees a
/// positive argument. Its derivative is `sigmoid(t)`, exactly 0.5 at 0.
pub fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

/// log sigmoid(t) = -softplus(-t).
pub fn log_sigmoid(t: f64) -> f64 {
    -softplus(-t)
}

/// log(1 - e^x) for x < 0. `log1p(-e^x)` loses nothing below -ln 2, `log(-expm1(x))` keeps the
/// digits of 1 - e^x near 0 (Mächler 2012).
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / (e^-x - 1).
pub fn log1mexp_grad(x: f64) -> f64 {
    // -1 / expm1(-x): expm1 keeps the digits when x is near 0, and for very negative x it is
    // huge and the quotient goes to 0 without overflow trouble.
    -1.0 / (-x).exp_m1()
}

/// log(e^a + e^b) for finite a, b.
pub fn logaddexp(a: f64, b: f64) -> f64 {
    if a >= b {
        a + (b - a).exp().ln_1p()
    } else {
        b + (a - b).exp().ln_1p()
    }
}

pub fn l2_norm(v: &[f64]) -> f64 {
    // Scaled so that a vector of huge entries does not overflow the sum of squares.
    if v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m == 0.0 || m.is_infinite() {
        return m;
    }
    m * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}

/// Scales `v` in place to at most `max_norm` in L2 norm; returns the norm before scaling.
pub fn clip_l2(v: &mut [f64], max_norm: f64) -> f64 {
    let n = l2_norm(v);
    if n.is_finite() && n > max_norm {
        let k = max_norm / n;
        for x in v.iter_mut() {
            *x *= k;
        }
    }
    n
}
