//! The Llama network with LoRA layers, built from a model's safetensors; PEFT adapter files
//! (reading, writing, merging); sequence log-probs shared by training, scoring and evaluation.
pub mod adapter;
mod block_grad;
pub mod config;
pub mod llama;
pub mod loading;
pub mod logprobs;
pub mod lora;
pub mod pass;
pub mod tiny;

pub use config::LlamaConfig;
pub use llama::Llama;
pub use loading::{load_adapted, load_llama, load_llama_frozen_in, load_with_adapter, LoraSpec};
pub use pass::{DropoutKey, PassMode};
