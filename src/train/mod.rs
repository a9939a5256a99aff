//! The training run: recipe (top to bottom in recipe.rs), micro-batches, one step, optimizer,
//! schedule, metrics.
pub mod batch;
pub mod metrics;
pub mod optim;
pub mod recipe;
pub mod schedule;
pub mod step;

pub use recipe::{train, RunOptions, RunSummary};
