//! Small shared helpers: atomic file writes and safetensors serialization.
pub mod atomic;
pub mod st;
