//! kto-train: LoRA fine-tuning of Llama-family models with the (Enhanced) KTO loss.
//!
//! One folder per concern:
//! - [`config`]: the TOML run description, validated before any work starts;
//! - [`model`]: the Llama network, LoRA layers, weight loading and PEFT adapter files;
//! - [`data`]: dataset sources, mixing, splitting and tokenization;
//! - [`loss`]: the loss head (KTO and Enhanced KTO) on per-sequence log-probs;
//! - [`train`]: the training recipe, optimizer, schedule and metrics;
//! - [`eval`]: scoring and benchmarks with a trained adapter;
//! - [`cli`]: the command-line interface.
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod loss;
pub mod model;
pub mod report;
pub mod train;
pub mod util;
