//! Using a model or adapter: scoring records.
pub mod merge;
pub mod score;
pub mod tasks;
