//! Small shared helpers: atomic file writes, safetensors serialization, allocator settings.
pub mod alloc;
pub mod atomic;
pub mod st;
