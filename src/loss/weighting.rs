//! Probability weighting of the model's confidence p = sigmoid(v) (docs/enhanced-kto.md 2.2),
//! computed from log p and log(1 - p) so that it is finite for every finite logit v.
use super::numerics::{logaddexp, sigmoid, softplus};

/// One weighting function with its parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightFn {
    /// W(p) = p (TRL's KTO).
    Identity,
    /// TK92 with gamma.
    Tk92(f64),
    /// Prelec with alpha.
    Prelec(f64),
}

/// W(sigmoid(v)) with what the loss and its gradient need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weighted {
    pub log_w: f64,
    /// pi = W(sigmoid(v)).
    pub w: f64,
    /// 1 - pi, computed without cancellation where possible.
    pub one_minus_w: f64,
    /// d pi / d v.
    pub dw_dv: f64,
}

/// log W_TK92 from log p and log(1 - p):
/// `g log p - (1/g) logaddexp(g log p, g log(1-p))`.
pub fn tk92_log_w(log_p: f64, log_q: f64, g: f64) -> f64 {
    g * log_p - logaddexp(g * log_p, g * log_q) / g
}

/// log W_Prelec = -(-log p)^a.
pub fn prelec_log_w(log_p: f64, a: f64) -> f64 {
    -(-log_p).max(0.0).powf(a)
}

/// sigmoid(t) / softplus(t), which tends to 1 as t -> -inf where both underflow.
fn sigmoid_over_softplus(t: f64) -> f64 {
    if t < -30.0 {
        // softplus(t) = e^t (1 - e^t/2 + ...), sigmoid(t) = e^t (1 - e^t + ...).
        1.0 - 0.5 * t.exp()
    } else {
        sigmoid(t) / softplus(t)
    }
}

pub fn weight_of_logit(v: f64, f: WeightFn) -> Weighted {
    // log p = -softplus(-v), log(1-p) = -softplus(v); d log p/dv = 1-p, d log(1-p)/dv = -p.
    let log_p = -softplus(-v);
    let log_q = -softplus(v);
    let p = sigmoid(v);
    let q = sigmoid(-v);
    match f {
        WeightFn::Identity => Weighted {
            log_w: log_p,
            w: p,
            one_minus_w: q,
            dw_dv: p * q,
        },
        WeightFn::Tk92(g) => {
            let log_w = tk92_log_w(log_p, log_q, g);
            // d/dv logaddexp(g log p, g log q) = g (s q - (1 - s) p) with the softmax share
            // s = sigmoid(g (log p - log q)) = sigmoid(g v).
            let s = sigmoid(g * v);
            let sc = sigmoid(-g * v);
            let dlog = g * q - (s * q - sc * p);
            let w = log_w.exp();
            Weighted {
                log_w,
                w,
                one_minus_w: -log_w.exp_m1(),
                dw_dv: w * dlog,
            }
        }
        WeightFn::Prelec(a) => {
            // log W = -sp^a with sp = softplus(-v) = -log p; d sp/dv = -(1-p) = -sigmoid(-v).
            // d log W/dv = a sp^(a-1) sigmoid(-v) = a sp^a (sigmoid(-v)/sp), the last factor
            // kept finite where sp underflows to 0.
            let sp = softplus(-v);
            let spa = sp.powf(a);
            let log_w = -spa;
            let dlog = a * spa * sigmoid_over_softplus(-v);
            let w = log_w.exp();
            Weighted {
                log_w,
                w,
                one_minus_w: -log_w.exp_m1(),
                dw_dv: w * dlog,
            }
        }
    }
}

/// W(p) straight from a probability (for checks against probability-space formulas).
pub fn weight_of_prob(p: f64, f: WeightFn) -> f64 {
    let log_p = p.ln();
    let log_q = (-p).ln_1p();
    match f {
        WeightFn::Identity => p,
        WeightFn::Tk92(g) => tk92_log_w(log_p, log_q, g).exp(),
        WeightFn::Prelec(a) => prelec_log_w(log_p, a).exp(),
    }
}
