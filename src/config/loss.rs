use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// TRL's `kto`: sigmoid loss around the KL reference point z.
    Kto,
    /// TRL's `apo_zero_unpaired`: no KL pass.
    ApoZeroUnpaired,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default = "d_type")]
    pub loss_type: LossType,
    /// Temperature of the implicit reward beta * (logp_policy - logp_ref).
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// w_D, weight of desirable examples.
    #[serde(default = "one")]
    pub desirable_weight: f64,
    /// w_U, weight of undesirable examples.
    #[serde(default = "one")]
    pub undesirable_weight: f64,
}

fn d_type() -> LossType {
    LossType::Kto
}
fn d_beta() -> f64 {
    0.1
}
fn one() -> f64 {
    1.0
}

impl Default for LossConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl LossConfig {
    /// Whether the loss needs the mismatched KL pass (z).
    pub fn needs_kl(&self) -> bool {
        matches!(self.loss_type, LossType::Kto)
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("beta = {}: must be a positive number", self.beta);
        }
        for (k, v) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{k} = {v}: must be a positive number");
            }
        }
        Ok(())
    }
}
