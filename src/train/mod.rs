//! The training run: recipe, micro-batches, one step, optimizer, schedule, metrics.
pub mod batch;
pub mod metrics;
pub mod step;
