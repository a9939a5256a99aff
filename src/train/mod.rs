//! The training engine: micro-batches as TRL builds them, one micro-batch's passes and backward,
//! AdamW, learning-rate schedules, the validation loss, the reference log-prob cache, checkpoints,
//! the run folder, signals and progress. The run itself, top to bottom, is [`crate::recipe`].
pub mod batch;
pub mod checkpoint;
pub mod optim;
pub mod progress;
pub mod refcache;
pub mod run_dir;
pub mod schedule;
pub mod signals;
pub mod step;
pub mod validation;

/// Why a run stopped early; the CLI turns these into documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("interrupted by {signal} after step {step}; checkpoint written to {checkpoint}; continue with --resume")]
    Interrupted {
        signal: &'static str,
        code: i32,
        step: usize,
        checkpoint: String,
    },
    #[error("{count} consecutive steps had a non-finite loss or gradient (last: step {step}); stopped with a checkpoint in {checkpoint}")]
    NonFinite {
        count: usize,
        step: usize,
        checkpoint: String,
    },
    #[error("none of the {steps} steps made a finite update: the LoRA weights are untrained, so no adapter is written (last checkpoint: {checkpoint}); check the data and lower train.lr")]
    NoFiniteUpdate { steps: usize, checkpoint: String },
    #[error("the run diverged: a LoRA weight reached {largest:e} (limit 1e4), so no adapter is written (last checkpoint: {checkpoint}); lower train.lr or train.max_grad_norm and start again")]
    Diverged { largest: f64, checkpoint: String },
    #[error("the adapter, plots and model card are written, but {problems}")]
    InvalidScores { problems: String },
}
