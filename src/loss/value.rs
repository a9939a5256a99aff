//! The shifted Tversky-Kahneman value function (docs/enhanced-kto.md 2.1).

/// Parameters of `V(o) = (o+ + eps)^a - eps^a - lambda ((o- + eps)^b - eps^b)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueParams {
    pub alpha_gain: f64,
    pub alpha_loss: f64,
    pub loss_aversion: f64,
    /// 0 gives TK92's unshifted v(x) (infinite slope at 0; only for reference checks).
    pub eps: f64,
}

impl Default for ValueParams {
    fn default() -> Self {
        Self {
            alpha_gain: 0.88,
            alpha_loss: 0.88,
            loss_aversion: 2.25,
            eps: 1.0,
        }
    }
}

/// `(x + eps)^a - eps^a` for x >= 0 and its derivative in x.
fn shifted_power(x: f64, a: f64, eps: f64) -> (f64, f64) {
    if eps > 0.0 {
        // eps^a ((1 + x/eps)^a - 1) via expm1/ln_1p: the plain difference cancels for small x.
        let ea = eps.powf(a);
        let u = x / eps;
        (ea * (a * u.ln_1p()).exp_m1(), a * (x + eps).powf(a - 1.0))
    } else {
        (x.powf(a), a * x.powf(a - 1.0))
    }
}

/// V(o) and dV/do. The kink at 0 is split by `where`-style branches on the sign of o, with
/// o = 0 on the gains side: there the slope is `alpha_gain * eps^(alpha_gain - 1)`, never 0
/// (abs/relu/max conventions could give 0 there and training would never start).
pub fn value(o: f64, p: &ValueParams) -> (f64, f64) {
    // o+ = where(o >= 0, o, 0), o- = where(o < 0, -o, 0); each with the derivative of its branch.
    let (op, dop) = if o >= 0.0 { (o, 1.0) } else { (0.0, 0.0) };
    let (om, dom) = if o < 0.0 { (-o, -1.0) } else { (0.0, 0.0) };
    let (g, dg) = shifted_power(op, p.alpha_gain, p.eps);
    let (l, dl) = shifted_power(om, p.alpha_loss, p.eps);
    let v = g - p.loss_aversion * l;
    // Only the active branch contributes, so an infinite slope of the inactive one (eps = 0)
    // is never multiplied by 0.
    let dv = if o >= 0.0 {
        dg * dop
    } else {
        -p.loss_aversion * dl * dom
    };
    (v, dv)
}
