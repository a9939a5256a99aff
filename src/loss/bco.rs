//! The BCO baseline (docs/enhanced-kto.md 2.4) and TRL's own BCO loss (for the reference vectors).
use super::numerics::softplus;
use serde::{Deserialize, Serialize};

/// The running state of the loss head that a checkpoint must carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "LossStateRepr", from = "LossStateRepr")]
pub struct LossState {
    /// Running mean mu of the detached beta (r_i - z).
    pub mu: f64,
    /// Examples folded into mu so far.
    pub n: u64,
}

/// Serialized form: `mu` for people, `mu_bits` (hex of the f64 bits) so that a resume continues
/// bit for bit even through a float parser that is off by one ulp (serde_json's default one is).
#[derive(Serialize, Deserialize)]
struct LossStateRepr {
    mu: f64,
    n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mu_bits: Option<String>,
}

impl From<LossState> for LossStateRepr {
    fn from(s: LossState) -> Self {
        Self {
            mu: s.mu,
            n: s.n,
            mu_bits: Some(format!("{:016x}", s.mu.to_bits())),
        }
    }
}

impl From<LossStateRepr> for LossState {
    fn from(r: LossStateRepr) -> Self {
        let exact = r
            .mu_bits
            .as_deref()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .map(f64::from_bits)
            // A hand-edited mu wins over stale bits.
            .filter(|b| {
                (b - r.mu).abs() <= 1e-12 * r.mu.abs().max(1e-300) || b.to_bits() == r.mu.to_bits()
            });
        LossState {
            mu: exact.unwrap_or(r.mu),
            n: r.n,
        }
    }
}

/// Running-mean baseline of the detached values beta (r_i - z).
#[derive(Debug, Clone, PartialEq)]
pub struct BcoBaseline {
    /// EMA momentum c in (0, 1); None = cumulative (count-weighted) mean.
    pub momentum: Option<f64>,
    pub state: LossState,
}

impl BcoBaseline {
    pub fn new(momentum: Option<f64>) -> Self {
        Self {
            momentum,
            state: LossState::default(),
        }
    }

    /// Folds one micro-batch's values in: cumulative `mu += (m_b - mu) k / (n + k)`, or EMA
    /// `mu = c mu + (1 - c) m_b` where the first micro-batch sets mu = m_b.
    /// A micro-batch with a non-finite mean is skipped: one bad batch must not poison the
    /// baseline of every later step (the loss of that batch is non-finite anyway).
    pub fn update(&mut self, values: &[f64]) {
        if values.is_empty() {
            return;
        }
        let k = values.len() as u64;
        let mb = values.iter().sum::<f64>() / values.len() as f64;
        if !mb.is_finite() {
            return;
        }
        let s = &mut self.state;
        match self.momentum {
            None => {
                s.mu += (mb - s.mu) * k as f64 / (s.n + k) as f64;
            }
            Some(c) => {
                s.mu = if s.n == 0 {
                    mb
                } else {
                    c * s.mu + (1.0 - c) * mb
                };
            }
        }
        s.n += k;
    }
}

/// Share of delta used at optimizer step t: clamp((t - start) / ramp, 0, 1), or the step
/// function t >= start when ramp = 0.
pub fn bco_stage_factor(step: u64, start: u64, ramp: u64) -> f64 {
    if step < start {
        return 0.0;
    }
    if ramp == 0 {
        return 1.0;
    }
    ((step - start) as f64 / ramp as f64).min(1.0)
}

/// TRL's `RunningMoments` (count-weighted mean and variance of all rewards seen).
#[derive(Debug, Clone, PartialEq)]
pub struct TrlRunningMoments {
    pub mean: f64,
    /// Population variance.
    pub var: f64,
    /// Sample standard deviation sqrt(var n / (n - 1)).
    pub std: f64,
    pub count: f64,
}

impl Default for TrlRunningMoments {
    fn default() -> Self {
        // TRL starts the count at 1e-24 so that the first update divides by a non-zero count.
        Self {
            mean: 0.0,
            var: 1.0,
            std: 1.0,
            count: 1e-24,
        }
    }
}

impl TrlRunningMoments {
    pub fn update(&mut self, xs: &[f64]) {
        let k = xs.len() as f64;
        let bm = xs.iter().sum::<f64>() / k;
        let bv = xs.iter().map(|x| (x - bm) * (x - bm)).sum::<f64>() / k;
        let d = bm - self.mean;
        let tot = self.count + k;
        let m2 = self.var * self.count + bv * k + d * d * self.count * k / tot;
        let var = m2 / tot;
        self.mean += d * k / tot;
        self.var = var;
        self.std = (var * tot / (tot - 1.0)).sqrt();
        self.count = tot;
    }
}

/// TRL's BCO loss: rewards rhat = beta (P - R); -log sigmoid(rhat - delta) for desirable,
/// -log sigmoid(-(rhat - delta)) times the UDM weight for undesirable examples, averaged over
/// all examples. `udm_weights` are given for the undesirable examples in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct TrlBcoOutput {
    pub rewards: Vec<f64>,
    pub per_example: Vec<f64>,
    pub loss: f64,
}

pub fn trl_bco_loss(
    labels: &[bool],
    policy: &[f64],
    reference: &[f64],
    beta: f64,
    delta: f64,
    udm_weights: Option<&[f64]>,
) -> TrlBcoOutput {
    let mut rewards = Vec::with_capacity(labels.len());
    let mut per = Vec::with_capacity(labels.len());
    let mut j = 0;
    for i in 0..labels.len() {
        let rhat = beta * (policy[i] - reference[i]);
        rewards.push(rhat);
        let l = if labels[i] {
            softplus(-(rhat - delta))
        } else {
            let w = udm_weights.map_or(1.0, |u| u[j]);
            j += 1;
            w * softplus(rhat - delta)
        };
        per.push(l);
    }
    let loss = per.iter().sum::<f64>() / per.len() as f64;
    TrlBcoOutput {
        rewards,
        per_example: per,
        loss,
    }
}
