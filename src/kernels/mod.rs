//! Compute kernels: the differentiable ops the network is built from where candle's own are
//! slow or keep too much memory, each with a hand-written backward, and the GEMM backends.
//!
//! - [`fused`]: RMSNorm, RoPE, causal softmax, SwiGLU, masks, log-softmax + gather (CPU, f32/f64;
//!   with the `cuda` feature also CUDA, f32/bf16, kernels in `cuda/fused.cu`);
//! - [`products`]: frozen-weight products (no weight gradient) and activation products, on the
//!   fast GEMM library when one is loaded ([`gemm`]);
//! - [`frozen`]: a projection's frozen weight, as a tensor or only as the tile kernel's packed
//!   operands, with its products;
//! - [`attention`] and [`lora_linear`]: causal attention and a LoRA projection as one backprop
//!   node each; [`self_attention`]: a block's attention from its projections' outputs (heads,
//!   RoPE, the sequences of a packed pass) as one node;
//! - [`logits`]: token log-probs through the output layer in row chunks, the logits recomputed
//!   in the backward instead of kept, where they are large;
//! - [`checkpoint`]: activation checkpointing (recompute in the backward) and the one backward
//!   call that collects the gradients of checkpointed pieces.
//!
//! The model chooses which of them run through [`KernelSettings`], which it carries.
pub mod attention;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod frozen;
pub mod fused;
pub mod gemm;
pub mod logits;
pub mod lora_linear;
pub(crate) mod precomputed;
pub mod products;
pub mod self_attention;

pub use gemm::GemmMode;

/// How a network computes; fixed when the model is built and carried by it, so that every op
/// of a pass (and its backward) runs in the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSettings {
    /// The fused ops ([`fused`], [`attention`], [`lora_linear`]) where they exist (CPU f32/f64,
    /// CUDA f32/bf16); off = candle's composite forms (the reference the fused ops are tested
    /// against).
    pub fused_ops: bool,
    /// Keep only each decoder block's input during a gradient pass and recompute the block in
    /// the backward ([`checkpoint`]): activation memory of one block instead of all of them.
    pub activation_checkpointing: bool,
    /// How the matrix products run ([`gemm`]).
    pub gemm: GemmMode,
}

impl KernelSettings {
    /// The dtype the frozen matrices are held in for a network computing in `dtype` on
    /// `device`: bf16 when the products take bf16 operands on a CPU (the f32 copy would never
    /// be read), else `dtype`.
    pub fn frozen_dtype(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::DType {
        use candle_core::DType;
        if self.gemm == gemm::GemmMode::Bf16 && device.is_cpu() && dtype == DType::F32 {
            DType::BF16
        } else {
            dtype
        }
    }
}

impl Default for KernelSettings {
    /// Fused ops, no checkpointing, candle's GEMM: what every device and build supports.
    fn default() -> Self {
        Self {
            fused_ops: true,
            activation_checkpointing: false,
            gemm: GemmMode::Candle,
        }
    }
}
