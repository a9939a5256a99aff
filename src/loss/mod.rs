//! The loss head: works on per-sequence log-prob sums only (f64), returns the loss, its
//! gradient with respect to each policy log-prob sum, and metrics. The model's gradient is then
//! one backward pass of `sum_i (dL/dP_i) * P_i` (enhanced-kto.md, section 4).
use crate::config::{LossConfig, LossType};
use crate::train::metrics::MetricSums;
use anyhow::{bail, Result};

/// Per-sequence inputs of one micro-batch.
#[derive(Debug, Clone, Default)]
pub struct SequenceLogps {
    pub labels: Vec<bool>,
    pub policy: Vec<f64>,
    pub reference: Vec<f64>,
    /// Mismatched-pair (KL) log-probs; required when the loss needs z.
    pub policy_kl: Option<Vec<f64>>,
    pub reference_kl: Option<Vec<f64>>,
    /// Completion token counts n_i.
    pub completion_tokens: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct LossOutput {
    pub loss: f64,
    /// dL/dP_i for every example's policy log-prob sum.
    pub grad: Vec<f64>,
    pub metrics: MetricSums,
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub struct LossHead {
    cfg: LossConfig,
}

impl LossHead {
    pub fn new(cfg: &LossConfig) -> Self {
        Self { cfg: cfg.clone() }
    }

    pub fn needs_kl(&self) -> bool {
        self.cfg.needs_kl()
    }

    /// Loss of one training micro-batch at optimizer step `step`.
    pub fn train_batch(&mut self, s: &SequenceLogps, _step: u64) -> Result<LossOutput> {
        self.compute(s)
    }

    /// Loss of one evaluation micro-batch (never updates any running state).
    pub fn eval_batch(&self, s: &SequenceLogps, _step: u64) -> Result<LossOutput> {
        self.compute(s)
    }

    #[allow(clippy::needless_range_loop)]
    fn compute(&self, s: &SequenceLogps) -> Result<LossOutput> {
        let n = s.labels.len();
        if n == 0 || s.policy.len() != n || s.reference.len() != n {
            bail!("loss head: inconsistent batch sizes");
        }
        let beta = self.cfg.beta;
        let z = if self.needs_kl() {
            let (Some(pk), Some(rk)) = (&s.policy_kl, &s.reference_kl) else {
                bail!("loss head: the KL log-probs are required for loss_type kto");
            };
            let mean = pk.iter().zip(rk).map(|(p, r)| p - r).sum::<f64>() / pk.len() as f64;
            mean.max(0.0)
        } else {
            0.0
        };
        let mut loss = 0.0;
        let mut grad = vec![0.0; n];
        let mut m = MetricSums::new();
        for i in 0..n {
            let r = s.policy[i] - s.reference[i];
            let (l, d) = match (self.cfg.loss_type, s.labels[i]) {
                // d/dP (1 - sigmoid(beta (r - z))) = -beta sigmoid(s) sigmoid(-s)
                (LossType::Kto, true) => {
                    let t = beta * (r - z);
                    let w = self.cfg.desirable_weight;
                    (w * sigmoid(-t), -w * beta * sigmoid(t) * sigmoid(-t))
                }
                (LossType::Kto, false) => {
                    let t = beta * (z - r);
                    let w = self.cfg.undesirable_weight;
                    (w * sigmoid(-t), w * beta * sigmoid(t) * sigmoid(-t))
                }
                (LossType::ApoZeroUnpaired, true) => {
                    let t = beta * r;
                    let w = self.cfg.desirable_weight;
                    (w * sigmoid(-t), -w * beta * sigmoid(t) * sigmoid(-t))
                }
                (LossType::ApoZeroUnpaired, false) => {
                    let t = beta * r;
                    let w = self.cfg.undesirable_weight;
                    (w * sigmoid(t), w * beta * sigmoid(t) * sigmoid(-t))
                }
            };
            loss += l / n as f64;
            grad[i] = d / n as f64;
            let side = if s.labels[i] { "chosen" } else { "rejected" };
            m.add(&format!("rewards/{side}"), beta * r, 1.0);
            m.add(&format!("logps/{side}"), s.policy[i], 1.0);
        }
        m.add_value("loss", loss);
        if self.needs_kl() {
            m.add_value("kl", z);
        }
        Ok(LossOutput {
            loss,
            grad,
            metrics: m,
        })
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
