//! `[loss]`: the loss type and every knob of the Enhanced KTO head (docs/enhanced-kto.md).
//!
//! The Enhanced KTO keys (value function, weighting, odds ratio, BCO shift, component clipping)
//! only apply to `loss_type = "enhanced_kto"`. Writing one of them under `kto` or
//! `apo_zero_unpaired` is refused: a user who writes `loss_aversion = 3` under plain KTO believes it
//! acts, and silently ignoring it would make an ablation lie. A component switch set to off is
//! the exception: it says what plain KTO does. Their defaults still fill the struct
//! so that code can read them, but only the enhanced head uses them.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// TRL's `kto`: sigmoid loss around the KL reference point z.
    Kto,
    /// TRL's `apo_zero_unpaired`: no KL pass.
    ApoZeroUnpaired,
    /// KTO with the prospect-theory components of docs/enhanced-kto.md section 2.
    EnhancedKto,
}

impl LossType {
    /// The name used in the TOML file.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Kto => "kto",
            LossType::ApoZeroUnpaired => "apo_zero_unpaired",
            LossType::EnhancedKto => "enhanced_kto",
        }
    }
}

/// Probability weighting of the model's confidence (docs/enhanced-kto.md 2.2).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// Tversky-Kahneman 1992, gamma_gain for desirable and gamma_loss for undesirable examples.
    Tk92,
    /// Prelec 1998, exp(-(-ln p)^prelec_alpha).
    Prelec,
    None,
}

/// Smallest TK92 gamma for which W stays increasing on (0, 1) (docs/enhanced-kto.md 2.2).
pub const TK92_GAMMA_MIN: f64 = 0.28;

/// `desirable_weight` / `undesirable_weight` as written: a number, or `"auto"` (set from the
/// training split's class counts, [`LossConfig::resolve_auto_weights`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClassWeight {
    Value(f64),
    Auto,
}

impl Serialize for ClassWeight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClassWeight::Value(v) => s.serialize_f64(*v),
            ClassWeight::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ClassWeight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(f64),
            Text(String),
        }
        match Written::deserialize(d) {
            Ok(Written::Number(v)) => Ok(ClassWeight::Value(v)),
            Ok(Written::Text(t)) if t == "auto" => Ok(ClassWeight::Auto),
            _ => Err(serde::de::Error::custom(
                "expected a positive number or \"auto\"",
            )),
        }
    }
}

/// Which class weights are `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutoWeights {
    pub desirable: bool,
    pub undesirable: bool,
}

/// Where `"auto"` puts (w_D n_D) / (w_U n_U): the middle of the paper's band [1, 4/3].
pub const AUTO_WEIGHT_RATIO: f64 = 7.0 / 6.0;

#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// Temperature of the implicit reward beta * (logp_policy - logp_ref).
    pub beta: f64,
    /// w_D, weight of desirable examples (1 until an `"auto"` weight is resolved).
    pub desirable_weight: f64,
    /// w_U, weight of undesirable examples (1 until an `"auto"` weight is resolved).
    pub undesirable_weight: f64,
    /// The weights written as `"auto"`.
    pub auto_weights: AutoWeights,

    // ---- enhanced_kto only ----
    /// Apply the shifted TK92 value function V to the outcome (2.1).
    pub value_function: bool,
    pub value_alpha_gain: f64,
    pub value_alpha_loss: f64,
    /// lambda: slope multiplier of the losses side.
    pub loss_aversion: f64,
    /// Shift that keeps V's slope finite at 0.
    pub value_eps: f64,
    pub weighting: Weighting,
    pub gamma_gain: f64,
    pub gamma_loss: f64,
    pub prelec_alpha: f64,
    /// Weight of the in-batch odds-ratio term L_OR (0 disables it).
    pub odds_ratio_weight: f64,
    /// Upper clamp of the mean token log-prob m_i, keeping log(1 - e^m) finite.
    pub odds_ratio_max_mean_logp: f64,
    /// Shift the KTO logit by a running-mean baseline delta (BCO, 2.4).
    pub bco_shift: bool,
    /// EMA momentum c in (0, 1) of the baseline; None = cumulative mean (TRL's).
    pub bco_momentum: Option<f64>,
    /// Optimizer step from which delta starts acting.
    pub bco_start_step: u64,
    /// Steps of the linear ramp of delta after bco_start_step (0 = a step function).
    pub bco_ramp_steps: u64,
    /// L2 bound on each component's dL/dP vector (prospect-theory term, odds-ratio term).
    pub component_clip: Option<f64>,
}

/// What the TOML holds. Options record whether a key was written at all, which is what the
/// "only under enhanced_kto" rule needs; `LossConfig` is the resolved view.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLossConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_type: Option<LossType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    desirable_weight: Option<ClassWeight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    undesirable_weight: Option<ClassWeight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_function: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_alpha_gain: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_alpha_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_aversion: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weighting: Option<Weighting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gamma_gain: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gamma_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prelec_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    odds_ratio_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    odds_ratio_max_mean_logp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bco_shift: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bco_momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bco_start_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bco_ramp_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    component_clip: Option<f64>,
}

impl RawLossConfig {
    /// Names of the Enhanced KTO keys that were written, leaving out the four component switches
    /// when they say "off" (value_function = false, weighting = "none", odds_ratio_weight = 0,
    /// bco_shift = false): those state what plain KTO is, so an ablation can switch loss_type with
    /// `--set` alone.
    fn enhanced_keys_set(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let on = [
            ("value_function", self.value_function.is_some_and(|b| b)),
            (
                "weighting",
                self.weighting.is_some_and(|w| w != Weighting::None),
            ),
            (
                "odds_ratio_weight",
                self.odds_ratio_weight.is_some_and(|w| w != 0.0),
            ),
            ("bco_shift", self.bco_shift.is_some_and(|b| b)),
        ];
        v.extend(on.iter().filter(|(_, on)| *on).map(|(k, _)| *k));
        macro_rules! chk {
            ($($f:ident),*) => { $( if self.$f.is_some() { v.push(stringify!($f)); } )* };
        }
        chk!(
            value_alpha_gain,
            value_alpha_loss,
            loss_aversion,
            value_eps,
            gamma_gain,
            gamma_loss,
            prelec_alpha,
            odds_ratio_max_mean_logp,
            bco_momentum,
            bco_start_step,
            bco_ramp_steps,
            component_clip
        );
        v
    }
}

/// A written weight's value before resolution (`"auto"` and unset: 1).
fn weight(w: Option<ClassWeight>) -> f64 {
    match w {
        Some(ClassWeight::Value(v)) => v,
        _ => 1.0,
    }
}

impl TryFrom<RawLossConfig> for LossConfig {
    type Error = String;

    fn try_from(r: RawLossConfig) -> std::result::Result<Self, String> {
        let loss_type = r.loss_type.unwrap_or(LossType::Kto);
        if loss_type != LossType::EnhancedKto {
            let set = r.enhanced_keys_set();
            if !set.is_empty() {
                let name = loss_type.name();
                return Err(format!(
                    "{} only appl{} to loss_type = \"enhanced_kto\" (loss_type is \"{name}\"): \
                     remove {} or set loss_type = \"enhanced_kto\"",
                    set.join(", "),
                    if set.len() == 1 { "ies" } else { "y" },
                    if set.len() == 1 { "it" } else { "them" },
                ));
            }
        }
        Ok(LossConfig {
            loss_type,
            beta: r.beta.unwrap_or(0.1),
            desirable_weight: weight(r.desirable_weight),
            undesirable_weight: weight(r.undesirable_weight),
            auto_weights: AutoWeights {
                desirable: r.desirable_weight == Some(ClassWeight::Auto),
                undesirable: r.undesirable_weight == Some(ClassWeight::Auto),
            },
            value_function: r.value_function.unwrap_or(true),
            value_alpha_gain: r.value_alpha_gain.unwrap_or(0.88),
            value_alpha_loss: r.value_alpha_loss.unwrap_or(0.88),
            loss_aversion: r.loss_aversion.unwrap_or(2.25),
            value_eps: r.value_eps.unwrap_or(1.0),
            weighting: r.weighting.unwrap_or(Weighting::Tk92),
            gamma_gain: r.gamma_gain.unwrap_or(0.61),
            gamma_loss: r.gamma_loss.unwrap_or(0.69),
            prelec_alpha: r.prelec_alpha.unwrap_or(0.65),
            odds_ratio_weight: r.odds_ratio_weight.unwrap_or(0.1),
            odds_ratio_max_mean_logp: r.odds_ratio_max_mean_logp.unwrap_or(-1e-4),
            bco_shift: r.bco_shift.unwrap_or(false),
            bco_momentum: r.bco_momentum,
            bco_start_step: r.bco_start_step.unwrap_or(0),
            bco_ramp_steps: r.bco_ramp_steps.unwrap_or(0),
            component_clip: r.component_clip,
        })
    }
}

impl From<LossConfig> for RawLossConfig {
    /// Writes every resolved value, except the Enhanced KTO keys under the other loss types,
    /// so that a saved config parses back to the same `LossConfig`.
    fn from(c: LossConfig) -> Self {
        let mut r = RawLossConfig {
            loss_type: Some(c.loss_type),
            beta: Some(c.beta),
            desirable_weight: Some(if c.auto_weights.desirable {
                ClassWeight::Auto
            } else {
                ClassWeight::Value(c.desirable_weight)
            }),
            undesirable_weight: Some(if c.auto_weights.undesirable {
                ClassWeight::Auto
            } else {
                ClassWeight::Value(c.undesirable_weight)
            }),
            ..Default::default()
        };
        if c.loss_type == LossType::EnhancedKto {
            r.value_function = Some(c.value_function);
            r.value_alpha_gain = Some(c.value_alpha_gain);
            r.value_alpha_loss = Some(c.value_alpha_loss);
            r.loss_aversion = Some(c.loss_aversion);
            r.value_eps = Some(c.value_eps);
            r.weighting = Some(c.weighting);
            r.gamma_gain = Some(c.gamma_gain);
            r.gamma_loss = Some(c.gamma_loss);
            r.prelec_alpha = Some(c.prelec_alpha);
            r.odds_ratio_weight = Some(c.odds_ratio_weight);
            r.odds_ratio_max_mean_logp = Some(c.odds_ratio_max_mean_logp);
            r.bco_shift = Some(c.bco_shift);
            r.bco_momentum = c.bco_momentum;
            r.bco_start_step = Some(c.bco_start_step);
            r.bco_ramp_steps = Some(c.bco_ramp_steps);
            r.component_clip = c.component_clip;
        }
        r
    }
}

impl Serialize for LossConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        RawLossConfig::from(self.clone()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for LossConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = RawLossConfig::deserialize(d)?;
        LossConfig::try_from(raw).map_err(serde::de::Error::custom)
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::try_from(RawLossConfig::default()).expect("defaults")
    }
}

/// The loss as the head computes it: the objective, with exactly the knobs that act in it. Built
/// from a validated [`LossConfig`] by [`LossConfig::objective`]; a knob of a component that is
/// off, or of a loss type that has no such component, has no place to be written here.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// TRL's `kto`: sigmoid loss around the KL reference point z.
    Kto,
    /// TRL's `apo_zero_unpaired`: z = 0, no KL pass.
    ApoZeroUnpaired,
    /// KTO with the prospect-theory components of docs/enhanced-kto.md section 2.
    EnhancedKto(EnhancedKto),
}

/// The components of Enhanced KTO that act (docs/enhanced-kto.md 2.1-2.5).
#[derive(Debug, Clone, PartialEq)]
pub struct EnhancedKto {
    pub value_function: Option<ValueFunction>,
    pub weighting: ConfidenceWeighting,
    pub odds_ratio: Option<OddsRatio>,
    pub bco_shift: Option<BcoShift>,
    /// L2 bound on each component's dL/dP vector.
    pub component_clip: Option<f64>,
}

/// The shifted TK92 value function V (2.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueFunction {
    pub alpha_gain: f64,
    pub alpha_loss: f64,
    pub loss_aversion: f64,
    pub eps: f64,
}

/// Probability weighting of the model's confidence (2.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConfidenceWeighting {
    /// gamma_gain for desirable, gamma_loss for undesirable examples.
    Tk92 {
        gamma_gain: f64,
        gamma_loss: f64,
    },
    Prelec {
        alpha: f64,
    },
    None,
}

/// The in-batch odds-ratio term L_OR (2.3), with a weight > 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OddsRatio {
    pub weight: f64,
    pub max_mean_logp: f64,
}

/// The BCO running-mean shift delta (2.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BcoShift {
    /// EMA momentum; None = cumulative mean.
    pub momentum: Option<f64>,
    pub start_step: u64,
    pub ramp_steps: u64,
}

impl LossConfig {
    /// The typed objective this config describes.
    pub fn objective(&self) -> Objective {
        match self.loss_type {
            LossType::Kto => Objective::Kto,
            LossType::ApoZeroUnpaired => Objective::ApoZeroUnpaired,
            LossType::EnhancedKto => Objective::EnhancedKto(EnhancedKto {
                value_function: self.value_function.then_some(ValueFunction {
                    alpha_gain: self.value_alpha_gain,
                    alpha_loss: self.value_alpha_loss,
                    loss_aversion: self.loss_aversion,
                    eps: self.value_eps,
                }),
                weighting: match self.weighting {
                    Weighting::Tk92 => ConfidenceWeighting::Tk92 {
                        gamma_gain: self.gamma_gain,
                        gamma_loss: self.gamma_loss,
                    },
                    Weighting::Prelec => ConfidenceWeighting::Prelec {
                        alpha: self.prelec_alpha,
                    },
                    Weighting::None => ConfidenceWeighting::None,
                },
                odds_ratio: (self.odds_ratio_weight > 0.0).then_some(OddsRatio {
                    weight: self.odds_ratio_weight,
                    max_mean_logp: self.odds_ratio_max_mean_logp,
                }),
                bco_shift: self.bco_shift.then_some(BcoShift {
                    momentum: self.bco_momentum,
                    start_step: self.bco_start_step,
                    ramp_steps: self.bco_ramp_steps,
                }),
                component_clip: self.component_clip,
            }),
        }
    }

    /// Default Enhanced KTO config: value function, TK92 weighting and odds ratio on, BCO off.
    /// Sets the `"auto"` weights from the training split's class counts so that
    /// (w_D n_D) / (w_U n_U) = [`AUTO_WEIGHT_RATIO`], inside the paper's [1, 4/3] band and TRL's
    /// recommended ranges: w_D from w_U (w_U = 1 when both are auto), or w_U from a written w_D.
    /// Returns what it set, for the log; None when nothing is auto or a class is missing.
    pub fn resolve_auto_weights(
        &mut self,
        n_desirable: usize,
        n_undesirable: usize,
    ) -> Option<String> {
        let a = self.auto_weights;
        if !(a.desirable || a.undesirable) || n_desirable == 0 || n_undesirable == 0 {
            return None;
        }
        let (nd, nu) = (n_desirable as f64, n_undesirable as f64);
        if a.desirable {
            if a.undesirable {
                self.undesirable_weight = 1.0;
            }
            self.desirable_weight = AUTO_WEIGHT_RATIO * self.undesirable_weight * nu / nd;
        } else {
            self.undesirable_weight = self.desirable_weight * nd / (AUTO_WEIGHT_RATIO * nu);
        }
        Some(format!(
            "class weights from {n_desirable} desirable / {n_undesirable} undesirable training \
             examples: desirable_weight = {:.4}, undesirable_weight = {:.4} \
             ((w_D n_D) / (w_U n_U) = 7/6, inside [1, 4/3])",
            self.desirable_weight, self.undesirable_weight
        ))
    }

    pub fn enhanced_default() -> Self {
        LossConfig {
            loss_type: LossType::EnhancedKto,
            ..Default::default()
        }
    }

    /// Enhanced KTO with every component off: equal to TRL's `kto`.
    pub fn enhanced_all_off() -> Self {
        LossConfig {
            loss_type: LossType::EnhancedKto,
            value_function: false,
            weighting: Weighting::None,
            odds_ratio_weight: 0.0,
            bco_shift: false,
            ..Default::default()
        }
    }

    /// Whether the loss needs the mismatched KL pass (z).
    pub fn needs_kl(&self) -> bool {
        matches!(self.loss_type, LossType::Kto | LossType::EnhancedKto)
    }

    pub fn is_enhanced(&self) -> bool {
        self.loss_type == LossType::EnhancedKto
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
        if !self.is_enhanced() {
            return Ok(());
        }
        for (k, v) in [
            ("value_alpha_gain", self.value_alpha_gain),
            ("value_alpha_loss", self.value_alpha_loss),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                bail!(
                    "{k} = {v}: must be in (0, 1] (above 1 the value function is no longer \
                     concave in gains / convex in losses)"
                );
            }
        }
        if !(self.loss_aversion.is_finite() && self.loss_aversion > 0.0) {
            bail!(
                "loss_aversion = {}: must be a positive number (TK92 estimate 2.25)",
                self.loss_aversion
            );
        }
        if !(self.value_eps.is_finite() && self.value_eps > 0.0) {
            bail!(
                "value_eps = {}: must be a positive number (at 0 the slope of V at the \
                 first step is infinite)",
                self.value_eps
            );
        }
        for (k, v) in [
            ("gamma_gain", self.gamma_gain),
            ("gamma_loss", self.gamma_loss),
        ] {
            if !(TK92_GAMMA_MIN..=1.0).contains(&v) {
                bail!(
                    "{k} = {v}: must be in [{TK92_GAMMA_MIN}, 1] (below {TK92_GAMMA_MIN} the TK92 \
                     weighting is not increasing; 1 is the identity)"
                );
            }
        }
        if !(self.prelec_alpha > 0.0 && self.prelec_alpha <= 1.0) {
            bail!(
                "prelec_alpha = {}: must be in (0, 1] (1 is the identity)",
                self.prelec_alpha
            );
        }
        if !(self.odds_ratio_weight.is_finite() && self.odds_ratio_weight >= 0.0) {
            bail!(
                "odds_ratio_weight = {}: must be a number >= 0 (0 disables the odds-ratio term)",
                self.odds_ratio_weight
            );
        }
        if !(self.odds_ratio_max_mean_logp.is_finite() && self.odds_ratio_max_mean_logp < 0.0) {
            bail!(
                "odds_ratio_max_mean_logp = {}: must be a negative number (log(1 - e^m) is \
                 infinite at m = 0)",
                self.odds_ratio_max_mean_logp
            );
        }
        if let Some(c) = self.bco_momentum {
            if !(c > 0.0 && c < 1.0) {
                bail!(
                    "bco_momentum = {c}: must be in (0, 1) (leave it out for the cumulative mean)"
                );
            }
        }
        if let Some(c) = self.component_clip {
            if !(c.is_finite() && c > 0.0) {
                bail!("component_clip = {c}: must be a positive number (leave it out to disable)");
            }
        }
        Ok(())
    }
}
