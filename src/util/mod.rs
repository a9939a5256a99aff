//! Small shared helpers that know nothing of models or training: atomic file writes,
//! safetensors serialization, pooled metric sums, allocator settings, stable hashing, JSON type
//! names, sizes set in MiB by environment variables, the per-phase step profile, parallel loops the caller joins, test hooks for fault injection.
pub mod alloc;
pub mod atomic;
pub mod env;
pub mod fault;
pub mod fs;
pub mod hash;
pub mod json;
pub mod metric_sums;
pub mod parallel;
pub mod profile;
pub mod safetensors_io;
