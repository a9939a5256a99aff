//! Scoring and benchmark evaluation.
