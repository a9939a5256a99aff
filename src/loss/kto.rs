//! The per-example KTO / Enhanced KTO terms and their gradients with respect to the policy
//! log-prob sums P_i (docs/enhanced-kto.md sections 1, 2 and 4). z and delta are constants here.
use super::odds_ratio::{odds_ratio_term, OddsRatioTerm};
use super::value::{value, ValueParams};
use super::weighting::{weight_of_logit, WeightFn};
use super::SequenceLogps;
use crate::config::{ConfidenceWeighting, LossConfig, Objective};
use anyhow::{bail, Result};

/// Which components act, resolved from the config. TRL's `kto` and `apo_zero_unpaired` are this
/// with everything off (apo additionally with z = 0), so all three share one code path.
#[derive(Debug, Clone, PartialEq)]
pub struct Components {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub value: Option<ValueParams>,
    /// Weighting of desirable examples' confidence.
    pub weight_desirable: WeightFn,
    /// Weighting of undesirable examples' confidence.
    pub weight_undesirable: WeightFn,
    /// 0 = no odds-ratio term.
    pub odds_ratio_weight: f64,
    pub odds_ratio_max_mean_logp: f64,
}

impl Components {
    pub fn from_config(cfg: &LossConfig) -> Self {
        let mut c = Components {
            beta: cfg.beta,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
            value: None,
            weight_desirable: WeightFn::Identity,
            weight_undesirable: WeightFn::Identity,
            odds_ratio_weight: 0.0,
            odds_ratio_max_mean_logp: cfg.odds_ratio_max_mean_logp,
        };
        if let Objective::EnhancedKto(e) = cfg.objective() {
            c.value = e.value_function.map(|v| ValueParams {
                alpha_gain: v.alpha_gain,
                alpha_loss: v.alpha_loss,
                loss_aversion: v.loss_aversion,
                eps: v.eps,
            });
            (c.weight_desirable, c.weight_undesirable) = match e.weighting {
                ConfidenceWeighting::Tk92 {
                    gamma_gain,
                    gamma_loss,
                } => (WeightFn::Tk92(gamma_gain), WeightFn::Tk92(gamma_loss)),
                ConfidenceWeighting::Prelec { alpha } => {
                    (WeightFn::Prelec(alpha), WeightFn::Prelec(alpha))
                }
                ConfidenceWeighting::None => (WeightFn::Identity, WeightFn::Identity),
            };
            if let Some(or) = e.odds_ratio {
                c.odds_ratio_weight = or.weight;
                c.odds_ratio_max_mean_logp = or.max_mean_logp;
            }
        }
        c
    }

    pub fn odds_ratio_on(&self) -> bool {
        self.odds_ratio_weight > 0.0
    }
}

/// Everything the loss of one micro-batch is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct LossTerms {
    pub z: f64,
    pub delta: f64,
    /// s_i = beta (r_i - z) - delta.
    pub s: Vec<f64>,
    /// o_i = +-s_i: > 0 on the labelled side of the reference point.
    pub o: Vec<f64>,
    /// V(o_i) (= o_i with the value function off).
    pub v: Vec<f64>,
    /// pi_i = W(sigmoid(V_i)).
    pub pi: Vec<f64>,
    /// l_i = w_label (1 - pi_i).
    pub l: Vec<f64>,
    /// mean_i l_i.
    pub loss_pt: f64,
    /// d loss_pt / dP_i.
    pub grad_pt: Vec<f64>,
    /// The odds-ratio term (None when odds_ratio_weight = 0), unweighted.
    pub odds: Option<OddsRatioTerm>,
    /// odds_ratio_weight * dL_OR/dP_i (zeros without the term).
    pub grad_or: Vec<f64>,
    /// loss_pt + odds_ratio_weight * L_OR.
    pub loss: f64,
}

impl LossTerms {
    /// L_OR without its weight; 0 when off or without pairs.
    pub fn l_or(&self) -> f64 {
        self.odds.as_ref().map_or(0.0, |t| t.loss)
    }
}

/// Checks the shapes of a micro-batch for `cfg`.
pub(crate) fn check_batch(s: &SequenceLogps, needs_kl: bool, needs_tokens: bool) -> Result<()> {
    let n = s.labels.len();
    if n == 0 {
        bail!("loss head: empty micro-batch");
    }
    if s.policy.len() != n || s.reference.len() != n {
        bail!(
            "loss head: {} labels but {} policy and {} reference log-probs",
            n,
            s.policy.len(),
            s.reference.len()
        );
    }
    if needs_kl {
        let (Some(pk), Some(rk)) = (&s.policy_kl, &s.reference_kl) else {
            bail!("loss head: the KL log-probs are required for this loss_type");
        };
        if pk.is_empty() || pk.len() != rk.len() {
            bail!(
                "loss head: {} policy and {} reference KL log-probs",
                pk.len(),
                rk.len()
            );
        }
    }
    if needs_tokens {
        if s.completion_tokens.len() != n {
            bail!(
                "loss head: the odds-ratio term needs a completion token count per example \
                 ({} labels, {} counts)",
                n,
                s.completion_tokens.len()
            );
        }
        if let Some(c) = s.completion_tokens.iter().find(|&&c| c.is_nan() || c < 1.0) {
            bail!("loss head: completion token count {c}: every completion needs >= 1 token");
        }
    }
    Ok(())
}

/// z = max(0, mean_i (P'_i - R'_i)) over the mismatched pairs, a constant of the loss.
pub fn kl_reference_point(s: &SequenceLogps) -> Result<f64> {
    let (Some(pk), Some(rk)) = (&s.policy_kl, &s.reference_kl) else {
        bail!("loss head: the KL log-probs are required for this loss_type");
    };
    if pk.is_empty() || pk.len() != rk.len() {
        bail!(
            "loss head: {} policy and {} reference KL log-probs",
            pk.len(),
            rk.len()
        );
    }
    let mean = pk.iter().zip(rk).map(|(p, r)| p - r).sum::<f64>() / pk.len() as f64;
    // TRL clamps with max(0, .); a NaN mean must stay NaN rather than become 0.
    Ok(if mean < 0.0 { 0.0 } else { mean })
}

/// The loss terms of one micro-batch for a given z and delta (no running state).
pub fn loss_terms(c: &Components, s: &SequenceLogps, z: f64, delta: f64) -> Result<LossTerms> {
    check_batch(s, false, c.odds_ratio_on())?;
    Ok(checked_loss_terms(c, s, z, delta))
}

/// [`loss_terms`] of a batch whose shapes [`check_batch`] already accepted.
pub(crate) fn checked_loss_terms(
    c: &Components,
    s: &SequenceLogps,
    z: f64,
    delta: f64,
) -> LossTerms {
    let n = s.labels.len();
    let nf = n as f64;
    let mut t = LossTerms {
        z,
        delta,
        s: vec![0.0; n],
        o: vec![0.0; n],
        v: vec![0.0; n],
        pi: vec![0.0; n],
        l: vec![0.0; n],
        loss_pt: 0.0,
        grad_pt: vec![0.0; n],
        odds: None,
        grad_or: vec![0.0; n],
        loss: 0.0,
    };
    for i in 0..n {
        let desirable = s.labels[i];
        let sign = if desirable { 1.0 } else { -1.0 };
        let r = s.policy[i] - s.reference[i];
        let si = c.beta * (r - z) - delta;
        let o = sign * si;
        let (v, dv_do) = match &c.value {
            Some(p) => value(o, p),
            None => (o, 1.0),
        };
        let (w_label, wf) = if desirable {
            (c.desirable_weight, c.weight_desirable)
        } else {
            (c.undesirable_weight, c.weight_undesirable)
        };
        let w = weight_of_logit(v, wf);
        t.s[i] = si;
        t.o[i] = o;
        t.v[i] = v;
        t.pi[i] = w.w;
        t.l[i] = w_label * w.one_minus_w;
        t.loss_pt += t.l[i];
        // l = w (1 - pi(V(o))), o = sign beta (P - R - z) - sign delta.
        t.grad_pt[i] = -w_label * w.dw_dv * dv_do * sign * c.beta / nf;
    }
    t.loss_pt /= nf;
    t.loss = t.loss_pt;
    if c.odds_ratio_on() {
        let term = odds_ratio_term(
            &s.labels,
            &s.policy,
            &s.completion_tokens,
            c.odds_ratio_max_mean_logp,
        );
        for i in 0..n {
            t.grad_or[i] = c.odds_ratio_weight * term.grad[i];
        }
        t.loss += c.odds_ratio_weight * term.loss;
        t.odds = Some(term);
    }
    t
}
