//! The training run: recipe (top to bottom in recipe.rs), micro-batches, one step, optimizer,
//! schedule, metrics, checkpoints, signals.
pub mod batch;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod recipe;
pub mod refcache;
pub mod schedule;
pub mod signals;
pub mod step;

pub use recipe::{train, RunOptions, RunSummary, Stopped};
