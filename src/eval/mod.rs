//! Using a model or adapter: scoring records.
pub mod score;
pub mod tasks;
