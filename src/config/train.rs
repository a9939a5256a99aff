use super::compute::{DType, DeviceSpec, GemmSetting};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Constant after the warmup (transformers' `constant_with_warmup`; its `constant` has no
    /// warmup: set none for that).
    #[serde(alias = "constant_with_warmup")]
    Constant,
    Linear,
    Cosine,
}

/// `train.data_order`: the order in which an epoch feeds examples into micro-batches.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataOrder {
    /// A seeded shuffle, each micro-batch then filled so that its KL completions come from other
    /// prompts and, where the data allows, both labels are present (data/order.rs).
    #[default]
    Balanced,
    /// A seeded shuffle and nothing else (TRL 1.16's sampler with transformers >= 5.2: a
    /// RandomSampler; the permutation is kto-train's own, not torch's).
    Shuffled,
    /// The training split in its prepared order every epoch (TRL 1.16's KTO sampler with a KL
    /// term under transformers < 5.2: a SequentialSampler).
    Sequential,
}

/// `train.reference_cache`: where reference log-probs are cached on disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReferenceCache {
    /// `$KTO_TRAIN_CACHE_DIR`, else a `.kto-train-cache` folder beside output.dir.
    #[default]
    Auto,
    Off,
    Dir(std::path::PathBuf),
}

impl std::fmt::Display for ReferenceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReferenceCache::Auto => f.write_str("auto"),
            ReferenceCache::Off => f.write_str("off"),
            ReferenceCache::Dir(p) => write!(f, "{}", p.display()),
        }
    }
}

impl std::str::FromStr for ReferenceCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ReferenceCache::Auto,
            "off" => ReferenceCache::Off,
            "" => return Err("reference_cache is empty: give auto, off or a folder".into()),
            dir => ReferenceCache::Dir(dir.into()),
        })
    }
}

super::compute::serde_as_string!(ReferenceCache);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training split (ignored when max_steps is set).
    #[serde(default = "d_epochs", alias = "num_train_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch (>= 2 for KL-based losses).
    #[serde(default = "d_batch", alias = "per_device_train_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_accum", alias = "gradient_accumulation_steps")]
    pub grad_accum: usize,
    #[serde(default = "d_lr", alias = "learning_rate")]
    pub lr: f64,
    #[serde(default = "d_sched", alias = "lr_scheduler_type")]
    pub lr_schedule: LrSchedule,
    /// Linear warmup length in optimizer steps; `warmup_ratio` is used when this is 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total optimizer steps (HF Trainer's warmup_ratio).
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default = "d_b1")]
    pub adam_beta1: f64,
    #[serde(default = "d_b2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps", alias = "adam_epsilon")]
    pub adam_eps: f64,
    /// Decoupled weight decay (HF Trainer's default 0.0).
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this (0 disables).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Prompt + completion tokens per sequence; longer sequences are cut from the end (TRL).
    #[serde(default = "d_maxlen")]
    pub max_length: usize,
    /// Seed for LoRA init, dropout, shuffling and the data split.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (the latter needs the `cuda` cargo feature).
    #[serde(default)]
    pub device: DeviceSpec,
    /// Compute dtype of the network: f32 (default), f64 (for checks), bf16.
    #[serde(default = "d_dtype")]
    pub dtype: DType,
    /// Log metrics every N optimizer steps.
    #[serde(default = "d_log", alias = "logging_steps")]
    pub log_every: usize,
    /// Evaluate on the validation split every N optimizer steps (0 = only at the end).
    #[serde(default, alias = "eval_steps")]
    pub eval_every: usize,
    /// Also evaluate before the first step (TRL's eval_on_start): the untrained baseline of the
    /// validation loss and the pair metrics.
    #[serde(default)]
    pub eval_on_start: bool,
    /// Examples per evaluation micro-batch (default: batch_size).
    #[serde(default, alias = "per_device_eval_batch_size")]
    pub eval_batch_size: Option<usize>,
    /// Prompts the model completes (greedy) at every evaluation, into the run folder's
    /// samples.jsonl and the model card: what the model says as it trains. Through the model's
    /// chat template (as a user message) when it has one.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Most new tokens of each sample.
    #[serde(default = "d_sample_tokens")]
    pub sample_max_new_tokens: usize,
    /// How each epoch orders the examples: `balanced` (default), `shuffled` or `sequential`
    /// (TRL 1.16's KTO sampler; see [`DataOrder`]).
    #[serde(default)]
    pub data_order: DataOrder,
    /// Stop (with a checkpoint and the adapter, as at the end) after this many evaluations in a
    /// row without a lower validation loss than the best so far (transformers'
    /// EarlyStoppingCallback on eval_loss). Unset: never.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Write a checkpoint every N optimizer steps (0 = only at the end and on SIGINT/SIGTERM).
    #[serde(default = "d_save", alias = "save_steps")]
    pub save_every: usize,
    /// Checkpoints kept (the newest ones).
    #[serde(default = "d_keep", alias = "save_total_limit")]
    pub keep_checkpoints: usize,
    /// Stop (with a checkpoint) after this many consecutive steps with a non-finite loss or
    /// gradient; each such step is skipped without an update.
    #[serde(default = "d_nonfinite")]
    pub max_consecutive_nonfinite: usize,
    /// Where reference log-probs are cached: `auto` (`$KTO_TRAIN_CACHE_DIR`, else a
    /// `.kto-train-cache` folder beside output.dir, shared by sibling runs), `off`, or a folder.
    #[serde(default)]
    pub reference_cache: ReferenceCache,
    /// Keep only each decoder block's input in the policy pass and recompute the block during
    /// the backward: activation memory of one block instead of all of them, for one more
    /// forward of the policy (TRL's gradient_checkpointing, on by default there too).
    #[serde(default = "d_true", alias = "gradient_checkpointing")]
    pub activation_checkpointing: bool,
    /// TRL's `disable_dropout` (default true, as there): every dropout of the policy is off while
    /// training, the LoRA dropout included (TRL sets PEFT's dropout modules to p = 0). The adapter
    /// still records `lora.dropout` as PEFT would. false: `lora.dropout` applies.
    #[serde(default = "d_true")]
    pub disable_dropout: bool,
    /// Matrix products: `auto` (`$KTO_TRAIN_GEMM`, else `bf16` on a CPU with native bf16
    /// products, as TRL's default bf16 = true, and `f32` elsewhere), `candle`, `f32` or `bf16` (bf16
    /// operands, f32 accumulation; the frozen weights are then kept in bf16). Every build runs
    /// all of them (src/kernels/gemm).
    #[serde(default)]
    pub gemm: GemmSetting,
}

fn d_epochs() -> usize {
    1
}
fn d_batch() -> usize {
    2
}
fn d_accum() -> usize {
    8
}
fn d_lr() -> f64 {
    2e-4
}
fn d_sched() -> LrSchedule {
    LrSchedule::Linear
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_maxlen() -> usize {
    512
}
fn d_seed() -> u64 {
    42
}
fn d_dtype() -> DType {
    DType::F32
}
fn d_log() -> usize {
    1
}
fn d_save() -> usize {
    100
}
fn d_keep() -> usize {
    3
}
fn d_nonfinite() -> usize {
    5
}
fn d_sample_tokens() -> usize {
    64
}
fn d_true() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("epochs = 0 and no max_steps: nothing to train");
        }
        if self.max_steps == Some(0) {
            bail!("max_steps = 0: must be at least 1 (or leave it out)");
        }
        if self.batch_size == 0 {
            bail!("batch_size = 0: must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("grad_accum = 0: must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr = {}: must be a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("warmup_ratio = {}: must be in [0, 1)", self.warmup_ratio);
        }
        for (k, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{k} = {v}: must be in [0, 1)");
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!("adam_eps = {}: must be positive", self.adam_eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight_decay = {}: must be >= 0", self.weight_decay);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "max_grad_norm = {}: must be >= 0 (0 disables clipping)",
                self.max_grad_norm
            );
        }
        if self.max_length < 2 {
            bail!("max_length = {}: must be at least 2", self.max_length);
        }
        if self.eval_batch_size == Some(0) {
            bail!("eval_batch_size = 0: must be at least 1");
        }
        if self.keep_checkpoints == 0 {
            bail!("keep_checkpoints = 0: must be at least 1 (resume needs one)");
        }
        if self.max_consecutive_nonfinite == 0 {
            bail!("max_consecutive_nonfinite = 0: must be at least 1");
        }
        if self.early_stopping_patience == Some(0) {
            bail!("early_stopping_patience = 0: must be at least 1 (or leave it out)");
        }
        if self.log_every == 0 {
            bail!("log_every = 0: must be at least 1");
        }
        self.device.check_build()?;
        Ok(())
    }
}
