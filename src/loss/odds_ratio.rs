//! Log odds of a completion and the odds-ratio terms: Enhanced KTO's in-batch L_OR
//! (docs/enhanced-kto.md 2.3) and TRL's ORPO loss (for the reference vectors).
use super::numerics::{log1mexp, log1mexp_grad, log_sigmoid, sigmoid, softplus};

/// lo = m - log(1 - e^m) for a mean token log-prob m < 0, and d lo/d m = 1 / (1 - e^m).
pub fn log_odds(m: f64) -> (f64, f64) {
    (m - log1mexp(m), 1.0 - log1mexp_grad(m))
}

/// Enhanced KTO's odds-ratio term over all (desirable i, undesirable j) pairs of a micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct OddsRatioTerm {
    /// Clamped mean token log-probs m_i.
    pub m: Vec<f64>,
    /// Log odds lo_i.
    pub lo: Vec<f64>,
    /// Number of (desirable, undesirable) pairs; 0 when a label is missing.
    pub n_pairs: usize,
    /// L_OR = mean over pairs of softplus(-(lo_i - lo_j)); 0 without pairs.
    pub loss: f64,
    /// Sum over pairs of log sigmoid(lo_i - lo_j) (metric `log_odds_ratio` = sum / n_pairs).
    pub sum_log_sigmoid: f64,
    /// Sum over pairs of lo_i - lo_j (metric `log_odds_chosen`).
    pub sum_diff: f64,
    /// dL_OR/dP_i (unweighted).
    pub grad: Vec<f64>,
}

/// `policy` are the sequence log-prob sums P_i, `tokens` the completion token counts n_i;
/// m_i = P_i / n_i clamped to <= `max_mean_logp` (no gradient through a clamped m_i).
pub fn odds_ratio_term(
    labels: &[bool],
    policy: &[f64],
    tokens: &[f64],
    max_mean_logp: f64,
) -> OddsRatioTerm {
    let n = labels.len();
    let mut m = vec![0.0; n];
    let mut lo = vec![0.0; n];
    let mut dlo_dp = vec![0.0; n];
    for i in 0..n {
        let raw = policy[i] / tokens[i];
        let (mi, dm) = if raw > max_mean_logp {
            (max_mean_logp, 0.0)
        } else {
            (raw, 1.0 / tokens[i])
        };
        let (l, dl) = log_odds(mi);
        m[i] = mi;
        lo[i] = l;
        dlo_dp[i] = dl * dm;
    }
    let chosen: Vec<usize> = (0..n).filter(|&i| labels[i]).collect();
    let rejected: Vec<usize> = (0..n).filter(|&i| !labels[i]).collect();
    let n_pairs = chosen.len() * rejected.len();
    let mut grad = vec![0.0; n];
    let (mut loss, mut sum_ls, mut sum_diff) = (0.0, 0.0, 0.0);
    if n_pairs > 0 {
        let inv = 1.0 / n_pairs as f64;
        for &i in &chosen {
            for &j in &rejected {
                let d = lo[i] - lo[j];
                loss += softplus(-d);
                sum_ls += log_sigmoid(d);
                sum_diff += d;
                // d softplus(-d)/d d = -sigmoid(-d)
                let g = -sigmoid(-d) * inv;
                grad[i] += g * dlo_dp[i];
                grad[j] -= g * dlo_dp[j];
            }
        }
        loss *= inv;
    }
    OddsRatioTerm {
        m,
        lo,
        n_pairs,
        loss,
        sum_log_sigmoid: sum_ls,
        sum_diff,
        grad,
    }
}

/// TRL's ORPO loss for chosen k vs rejected k (mean token log-probs, no clamp), with its NLL term.
#[derive(Debug, Clone, PartialEq)]
pub struct OrpoOutput {
    /// lo_chosen,k - lo_rejected,k.
    pub log_odds: Vec<f64>,
    pub log_sigmoid_log_odds: Vec<f64>,
    /// -log sigmoid(log_odds_k).
    pub or_loss_per_pair: Vec<f64>,
    /// nll_loss - beta mean_k log sigmoid(log_odds_k).
    pub loss: f64,
    pub log_odds_ratio: f64,
    pub log_odds_chosen: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
}

pub fn orpo_loss(
    chosen_mean: &[f64],
    rejected_mean: &[f64],
    beta: f64,
    nll_loss: f64,
) -> OrpoOutput {
    let k = chosen_mean.len() as f64;
    let log_odds: Vec<f64> = chosen_mean
        .iter()
        .zip(rejected_mean)
        .map(|(&c, &r)| log_odds(c).0 - log_odds(r).0)
        .collect();
    let ls: Vec<f64> = log_odds.iter().map(|&d| log_sigmoid(d)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rc: Vec<f64> = chosen_mean.iter().map(|m| beta * m).collect();
    let rr: Vec<f64> = rejected_mean.iter().map(|m| beta * m).collect();
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / k;
    OrpoOutput {
        or_loss_per_pair: ls.iter().map(|x| -x).collect(),
        loss: nll_loss - beta * mean(&ls),
        log_odds_ratio: mean(&ls),
        log_odds_chosen: mean(&log_odds),
        rewards_chosen: mean(&rc),
        rewards_rejected: mean(&rr),
        rewards_accuracies: acc,
        rewards_margins: mean(&rc) - mean(&rr),
        log_odds,
        log_sigmoid_log_odds: ls,
    }
}
