//! The Llama network with LoRA layers, its loading (local folder, HF cache, hub), PEFT adapter
//! files, and sequence log-probs shared by training and scoring.
pub mod adapter;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod fused;
pub mod gemm;
pub mod llama;
pub mod loading;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod tiny;

pub use config::LlamaConfig;
pub use llama::Llama;
pub use loading::{load_llama, resolve_model, LoraSpec, ModelFiles};
pub use lora::{DropoutKey, Forward};
