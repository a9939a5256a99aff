//! kto-train: LoRA fine-tuning of Llama-family models with the (Enhanced) KTO loss.
//!
//! One folder per concern, imports pointing one way (each layer uses only those before it;
//! tests/architecture.rs checks this):
//!
//! 1. [`util`]: atomic writes, safetensors serialization, pooled metric sums, stable hashes;
//!    [`dist`]: the processes of a run (MPI, or a world of one) and their collectives;
//! 2. [`config`]: the TOML run description, validated before any work starts;
//! 3. [`hub`]: finding a model's files (local folder, Hugging Face cache, download);
//! 4. [`kernels`]: differentiable ops with hand-written backward passes, GEMM backends,
//!    activation checkpointing;
//! 5. [`model`] (the Llama network, LoRA, PEFT adapter files, sequence log-probs), [`data`]
//!    (dataset sources, mixing, splitting, tokenization) and [`loss`] (KTO and Enhanced KTO on
//!    per-sequence log-probs), which do not use each other;
//! 6. [`train`]: micro-batches, one step, optimizer, schedule, checkpoints, the run folder;
//! 7. [`eval`] (scoring and benchmarks) and [`report`] (plots, model card);
//! 8. [`recipe`]: the whole training run, top to bottom;
//! 9. [`cli`]: the command line.
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod hub;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod recipe;
pub mod report;
pub mod train;
pub mod util;
