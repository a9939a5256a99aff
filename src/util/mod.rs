//! Small shared helpers: atomic file writes, safetensors serialization, allocator settings,
//! seed hashing, JSON type names.
pub mod alloc;
pub mod atomic;
pub mod hash;
pub mod json;
pub mod st;
