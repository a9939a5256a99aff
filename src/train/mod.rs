//! The training run: recipe, optimizer, schedule, metrics.
pub mod metrics;
