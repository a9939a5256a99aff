//! The fidelity suite as one test executable, built only with the `cuda` feature, for GPU
//! machines: they have no Rust toolchain, so the executable travels prebuilt
//! (scripts/gpu-pack.sh), and one executable instead of nine keeps the bundle small.
//! scripts/gpu-check.sh runs it with `KTO_TRAIN_TEST_DEVICE=cuda`. Each module is the test file of
//! the same name, unchanged: the CPU runs them as separate test targets.
// Each test file declares its own `mod common;`, so the helpers are compiled once per module.
#![allow(clippy::duplicate_mod)]
#[path = "../attention.rs"]
mod attention;
#[path = "../bf16_step.rs"]
mod bf16_step;
#[path = "../checkpointing.rs"]
mod checkpointing;
#[path = "../device_ops.rs"]
mod device_ops;
#[path = "../fused_ops.rs"]
mod fused_ops;
#[path = "../gradcheck.rs"]
mod gradcheck;
#[path = "../kto_step.rs"]
mod kto_step;
#[path = "../model.rs"]
mod model;
#[path = "../prefix_reuse.rs"]
mod prefix_reuse;
