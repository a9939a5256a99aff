//! The loss head: works on per-sequence log-prob sums only (f64), returns the loss, its
//! gradient with respect to each policy log-prob sum, and metrics. The model's gradient is then
//! one backward pass of `sum_i (dL/dP_i) * P_i` (enhanced-kto.md, section 4).
//!
//! TRL's `kto`, `apo_zero_unpaired` and `enhanced_kto` share one code path ([`kto::loss_terms`]):
//! the TRL losses are Enhanced KTO with every component off (and z = 0 for apo).
pub mod bco;
pub mod kto;
pub mod numerics;
pub mod odds_ratio;
pub mod value;
pub mod weighting;

pub use bco::{bco_stage_factor, trl_bco_loss, BcoBaseline, LossState, TrlRunningMoments};
pub use kto::{kl_reference_point, loss_terms, Components, LossTerms};
pub use numerics::{log1mexp, log_sigmoid, sigmoid, softplus};
pub use odds_ratio::{log_odds, odds_ratio_term, orpo_loss, OddsRatioTerm, OrpoOutput};
pub use value::{value, ValueParams};
pub use weighting::{weight_of_logit, weight_of_prob, WeightFn, Weighted};

use crate::config::{LossConfig, Objective};
use crate::util::metric_sums::MetricSums;
use anyhow::Result;

/// Per-sequence inputs of one micro-batch.
#[derive(Debug, Clone, Default)]
pub struct SequenceLogps {
    pub labels: Vec<bool>,
    pub policy: Vec<f64>,
    pub reference: Vec<f64>,
    /// Mismatched-pair (KL) log-probs; required when the loss needs z.
    pub policy_kl: Option<Vec<f64>>,
    pub reference_kl: Option<Vec<f64>>,
    /// Completion token counts n_i (needed by the odds-ratio term).
    pub completion_tokens: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Loss of the micro-batch (before any division by the accumulation steps).
    pub loss: f64,
    /// dL/dP_i for every example's policy log-prob sum: `grad_pt_clipped + grad_or_clipped`.
    /// This is what goes into the backward pass.
    pub grad: Vec<f64>,
    pub metrics: MetricSums,
    /// The prospect-theory component's dL/dP after component clipping (`terms.grad_pt` before).
    pub grad_pt_clipped: Vec<f64>,
    /// The weighted odds-ratio component's dL/dP after component clipping (zeros when off;
    /// `terms.grad_or` before).
    pub grad_or_clipped: Vec<f64>,
    /// L2 norms of the two component vectors before clipping.
    pub grad_norm_pt_unclipped: f64,
    pub grad_norm_or_unclipped: f64,
    /// The KL reference point z used (0 for apo_zero_unpaired).
    pub z: f64,
    /// The BCO shift used (after staging; 0 when BCO is off).
    pub delta: f64,
    /// All intermediates (s, o, V, pi, l, L_OR, ...), for tests and diagnostics.
    pub terms: LossTerms,
}

pub struct LossHead {
    beta: f64,
    objective: Objective,
    components: Components,
    /// Present when the BCO shift is on.
    bco: Option<BcoBaseline>,
}

impl LossHead {
    pub fn new(cfg: &LossConfig) -> Self {
        let objective = cfg.objective();
        let bco = match &objective {
            Objective::EnhancedKto(e) => e.bco_shift.map(|b| BcoBaseline::new(b.momentum)),
            _ => None,
        };
        Self {
            beta: cfg.beta,
            components: Components::from_config(cfg),
            objective,
            bco,
        }
    }

    pub fn needs_kl(&self) -> bool {
        !matches!(self.objective, Objective::ApoZeroUnpaired)
    }

    /// The temperature of the implicit reward beta * (log pi - log pi_ref).
    pub fn beta(&self) -> f64 {
        self.beta
    }

    fn is_enhanced(&self) -> bool {
        matches!(self.objective, Objective::EnhancedKto(_))
    }

    /// The running state to save in a checkpoint (mu = 0, n = 0 when BCO is off).
    pub fn state(&self) -> LossState {
        self.bco.as_ref().map(|b| b.state).unwrap_or_default()
    }

    /// Restores the state saved by [`LossHead::state`] (ignored when BCO is off).
    pub fn restore(&mut self, state: LossState) {
        if let Some(b) = &mut self.bco {
            b.state = state;
        }
    }

    /// Loss of one training micro-batch at optimizer step `step` (starting at 0). With the BCO
    /// shift on, the baseline first takes in this micro-batch's detached beta (r_i - z).
    pub fn train_batch(&mut self, s: &SequenceLogps, step: u64) -> Result<LossOutput> {
        let z = self.check_and_z(s)?;
        if let Some(b) = &mut self.bco {
            let beta = self.beta;
            let vals: Vec<f64> = s
                .policy
                .iter()
                .zip(&s.reference)
                .map(|(p, r)| beta * ((p - r) - z))
                .collect();
            b.update(&vals);
        }
        Ok(self.compute(s, z, self.delta_at(step)))
    }

    /// Loss of one evaluation micro-batch with the current baseline (never updates any state).
    pub fn eval_batch(&self, s: &SequenceLogps, step: u64) -> Result<LossOutput> {
        let z = self.check_and_z(s)?;
        Ok(self.compute(s, z, self.delta_at(step)))
    }

    /// delta used at optimizer step `step`: mu times the staged-start factor.
    pub fn delta_at(&self, step: u64) -> f64 {
        let (Some(b), Objective::EnhancedKto(e)) = (&self.bco, &self.objective) else {
            return 0.0;
        };
        let Some(shift) = e.bco_shift else {
            return 0.0;
        };
        let f = bco_stage_factor(step, shift.start_step, shift.ramp_steps);
        // While the factor is 0 delta is exactly 0, whatever mu is.
        if f == 0.0 {
            0.0
        } else {
            b.state.mu * f
        }
    }

    /// The batch's shapes checked once for this objective, and z (0 without the KL pass).
    fn check_and_z(&self, s: &SequenceLogps) -> Result<f64> {
        kto::check_batch(s, self.needs_kl(), self.components.odds_ratio_on())?;
        if self.needs_kl() {
            kl_reference_point(s)
        } else {
            Ok(0.0)
        }
    }

    fn compute(&self, s: &SequenceLogps, z: f64, delta: f64) -> LossOutput {
        let terms = kto::checked_loss_terms(&self.components, s, z, delta);
        let mut grad_pt = terms.grad_pt.clone();
        let mut grad_or = terms.grad_or.clone();
        let clip = match &self.objective {
            Objective::EnhancedKto(e) => e.component_clip,
            _ => None,
        };
        let (norm_pt, norm_or) = match clip {
            Some(c) => (
                numerics::clip_l2(&mut grad_pt, c),
                numerics::clip_l2(&mut grad_or, c),
            ),
            None => (numerics::l2_norm(&grad_pt), numerics::l2_norm(&grad_or)),
        };
        let grad: Vec<f64> = grad_pt.iter().zip(&grad_or).map(|(a, b)| a + b).collect();
        let metrics = self.metrics(s, &terms, norm_pt, norm_or);
        LossOutput {
            loss: terms.loss,
            grad,
            metrics,
            grad_pt_clipped: grad_pt,
            grad_or_clipped: grad_or,
            grad_norm_pt_unclipped: norm_pt,
            grad_norm_or_unclipped: norm_or,
            z,
            delta,
            terms,
        }
    }

    fn metrics(&self, s: &SequenceLogps, t: &LossTerms, norm_pt: f64, norm_or: f64) -> MetricSums {
        let beta = self.beta;
        let mut m = MetricSums::new();
        for i in 0..s.labels.len() {
            let side = if s.labels[i] { "chosen" } else { "rejected" };
            m.add(
                &format!("rewards/{side}"),
                beta * (s.policy[i] - s.reference[i]),
                1.0,
            );
            m.add(&format!("logps/{side}"), s.policy[i], 1.0);
        }
        m.add_value("loss", t.loss);
        // TRL logs kl for every loss type (0 without the KL pass).
        m.add_value("kl", t.z);
        if !self.is_enhanced() {
            return m;
        }
        let n = s.labels.len() as f64;
        m.add("loss/pt", t.l.iter().sum(), n);
        for (label, side) in [(true, "chosen"), (false, "rejected")] {
            let idx: Vec<usize> = (0..s.labels.len())
                .filter(|&i| s.labels[i] == label)
                .collect();
            if !idx.is_empty() {
                let sum: f64 = idx.iter().map(|&i| t.pi[i]).sum();
                m.add(&format!("pt/confidence/{side}"), sum, idx.len() as f64);
            }
        }
        let losses = t.o.iter().filter(|&&o| o < 0.0).count() as f64;
        m.add("pt/frac_loss_domain", losses, n);
        m.add_value("grad_norm/pt", norm_pt);
        if let Some(or) = &t.odds {
            // Pair metrics pool over pairs; a micro-batch with one label has none and adds
            // nothing (rather than a 0/0).
            if or.n_pairs > 0 {
                let np = or.n_pairs as f64;
                m.add("loss/or", or.loss * np, np);
                m.add("log_odds_ratio", or.sum_log_sigmoid, np);
                m.add("log_odds_chosen", or.sum_diff, np);
                m.add_value("grad_norm/or", norm_or);
            }
        }
        if let Some(b) = &self.bco {
            m.add_value("delta", t.delta);
            m.add_value("bco/mu", b.state.mu);
        }
        m
    }
}

/// Means of pooled metrics, plus `rewards/margins` when both labels were seen.
pub fn finalize_metrics(m: &MetricSums) -> std::collections::BTreeMap<String, f64> {
    let mut out = m.means();
    if let (Some(c), Some(r)) = (m.mean("rewards/chosen"), m.mean("rewards/rejected")) {
        out.insert("rewards/margins".into(), c - r);
    }
    out
}

/// TRL's check of the class weights (KTOTrainer, from Eq. 8 of the KTO paper): with unequal class
/// counts, a warning unless desirable_weight lies in [r, 1.33 r] or undesirable_weight in
/// [n_D w_D / (1.33 n_U), n_D w_D / n_U], r = n_U w_U / n_D, each bound rounded to two decimals
/// as TRL rounds them (so nearly balanced data with weights 1 passes).
pub fn weight_ratio_warning(
    n_desirable: usize,
    n_undesirable: usize,
    cfg: &LossConfig,
) -> Option<String> {
    if n_desirable == 0 || n_undesirable == 0 {
        return Some(format!(
            "the training data has {n_desirable} desirable and {n_undesirable} undesirable \
             examples: KTO needs both labels"
        ));
    }
    if n_desirable == n_undesirable {
        return None;
    }
    // Python's round(x, 2): the exact binary value rounded to two decimals.
    let round2 = |x: f64| format!("{x:.2}").parse::<f64>().expect("formatted float");
    let (nd, nu) = (n_desirable as f64, n_undesirable as f64);
    let (wd, wu) = (cfg.desirable_weight, cfg.undesirable_weight);
    let (d_lo, d_hi) = (round2(nu * wu / nd), round2(nu * wu / nd * 1.33));
    let (u_lo, u_hi) = (round2(nd * wd / nu / 1.33), round2(nd * wd / nu));
    if (d_lo..=d_hi).contains(&wd) || (u_lo..=u_hi).contains(&wu) {
        return None;
    }
    Some(format!(
        "{n_desirable} desirable and {n_undesirable} undesirable training examples with \
         desirable_weight = {wd} and undesirable_weight = {wu}: (w_D n_D) / (w_U n_U) = {:.4} is \
         outside the KTO paper's [1, 4/3]; as TRL recommends, set EITHER desirable_weight in \
         [{d_lo}, {d_hi}] OR undesirable_weight in [{u_lo}, {u_hi}] (not both), or \
         desirable_weight = \"auto\"",
        wd * nd / (wu * nu)
    ))
}
