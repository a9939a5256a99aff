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
}
