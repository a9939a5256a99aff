//! A LoRA projection y = x W^T + s (m * x) A^T B^T (frozen W, trainable A and B, dropout mask m),
//! as PEFT computes it, and as one node of the backprop graph on CPUs.
//!
//! As composite ops a projection is about ten graph nodes (reshapes, transposes, two products,
//! scale, add), and candle's backward zero-fills and adds a gradient buffer for every node. The
//! node computes its value with the same ops as the composite form, keeps only what its backward
//! needs, and computes dx, dA and dB by hand.
use super::frozen::FrozenWeight;
use super::fused;
use super::gemm::GemmMode;
use super::precomputed::PrecomputedValue;
use super::products::{add_product, matmul};
use crate::util::env::MibSetting;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The trainable branch of one projection.
#[derive(Debug, Clone, Copy)]
pub struct LoraBranch<'a> {
    /// [r, in_features]
    pub a: &'a Tensor,
    /// [out_features, r]
    pub b: &'a Tensor,
    pub scale: f64,
}

/// `x @ w^T (+ bias) + scale * (mask * x) @ a^T @ b^T` over the last dim of `x` (any leading
/// dims); the bias is frozen, like `w`.
/// `mask` is the inverted-dropout mask for `x` viewed as [M, K] (None: no dropout). With `grad`,
/// the result is attached to the graph through `a` and `b` (and `x`); without, no graph is
/// recorded, so a pass whose result is detached anyway frees its intermediates at once.
pub fn lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    lora: LoraBranch<'_>,
    mask: Option<Tensor>,
    gemm: GemmMode,
    grad: bool,
) -> Result<Tensor> {
    let (x2, out_dims) = matrix_view(x, w)?;
    if grad && fused::available(x) {
        return lora_node(x, &x2, w, bias, lora, mask, gemm, &out_dims);
    }
    let (a, b) = if grad {
        (lora.a.clone(), lora.b.clone())
    } else {
        (lora.a.detach(), lora.b.detach())
    };
    let xd = match &mask {
        Some(mask) => apply_mask(&x2, mask)?,
        None => x2.clone(),
    };
    let base = with_bias(w.forward(&x2, gemm)?, bias)?;
    let (y, h) = add_branch(base, &xd, &a, &b, lora.scale, gemm)?;
    if !grad && mask.is_none() {
        // A checkpointed block's forward ([`record`]); a no-op otherwise.
        keep(&y, &h);
    }
    y.reshape(out_dims)
}

/// x (any leading dims) as [M, K], and the dims of its product with `w` (x's leading dims, N).
fn matrix_view(x: &Tensor, w: &FrozenWeight) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dims2().0);
    Ok((x.reshape((x.elem_count() / k, k))?, out_dims))
}

/// Selective recomputation: a checkpointed block's forward ([`record`]) keeps each
/// projection's output and its x A^T, and the block's recomputation in the backward
/// ([`replay`]) takes them instead of running the products again, so that the recomputation
/// runs only what is cheap (norms, RoPE, attention, SwiGLU). The values are the ones the
/// recomputation would compute (same inputs, same ops), so gradients do not change. What is kept
/// is bounded by `KTO_TRAIN_CHECKPOINT_KEEP_MB` (default 256) over all blocks alive at once; past
/// it a block keeps nothing and recomputes as before. Projections with a dropout mask are always
/// recomputed.
#[derive(Default)]
pub struct Kept {
    outputs: std::collections::VecDeque<(Tensor, Tensor)>,
    bytes: usize,
    /// The budget ran out during this block: it keeps nothing.
    refused: bool,
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Bytes held by every live [`Kept`].
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The budget of kept projection outputs.
static BUDGET: MibSetting = MibSetting::new("KTO_TRAIN_CHECKPOINT_KEEP_MB", 256);

/// Sets the budget of kept projection outputs for this process (0: recompute everything), as
/// `KTO_TRAIN_CHECKPOINT_KEEP_MB` does at start.
pub fn set_keep_budget_mb(mb: usize) {
    BUDGET.set_mb(mb);
}

/// Projections whose output a recomputation took from [`record`] instead of computing, so far.
pub fn replays() -> usize {
    REPLAYS.load(Ordering::Relaxed)
}

static REPLAYS: AtomicUsize = AtomicUsize::new(0);

enum Memo {
    Off,
    Recording(Kept),
    Replaying(Kept),
}

thread_local! {
    static MEMO: RefCell<Memo> = const { RefCell::new(Memo::Off) };
}

/// Runs `f` (a checkpointed block's forward without a graph) keeping its projections' outputs
/// for [`replay`], within the budget.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Kept) {
    MEMO.with(|m| *m.borrow_mut() = Memo::Recording(Kept::default()));
    let r = f();
    let kept = match MEMO.with(|m| std::mem::replace(&mut *m.borrow_mut(), Memo::Off)) {
        Memo::Recording(k) => k,
        _ => Kept::default(),
    };
    (r, kept)
}

/// Runs `f` (the same block's recomputation) with the outputs [`record`] kept.
pub fn replay<R>(kept: Kept, f: impl FnOnce() -> R) -> R {
    MEMO.with(|m| *m.borrow_mut() = Memo::Replaying(kept));
    let r = f();
    MEMO.with(|m| *m.borrow_mut() = Memo::Off);
    r
}

fn keep(y: &Tensor, h: &Tensor) {
    let bytes = (y.elem_count() + h.elem_count()) * y.dtype().size_in_bytes();
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        let Memo::Recording(kept) = &mut *m else {
            return;
        };
        if kept.refused {
            return;
        }
        if KEPT_BYTES.load(Ordering::Relaxed) + bytes > BUDGET.bytes() {
            // Replay goes by order: with one projection missing the block keeps none.
            kept.refused = true;
            kept.outputs.clear();
            KEPT_BYTES.fetch_sub(kept.bytes, Ordering::Relaxed);
            kept.bytes = 0;
            return;
        }
        KEPT_BYTES.fetch_add(bytes, Ordering::Relaxed);
        kept.bytes += bytes;
        kept.outputs.push_back((y.clone(), h.clone()));
    });
}

/// The next kept (output [m, n], x A^T [m, r]) during a replay, if its shapes are these; a
/// mismatch (never expected) drops what is left, and the projections are computed.
fn replayed(m: usize, n: usize, r: usize) -> Option<(Tensor, Tensor)> {
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        let Memo::Replaying(kept) = &mut *memo else {
            return None;
        };
        let (y, h) = kept.outputs.pop_front()?;
        if y.dims() == [m, n] && h.dims() == [m, r] {
            REPLAYS.fetch_add(1, Ordering::Relaxed);
            Some((y, h))
        } else {
            kept.outputs.clear();
            None
        }
    })
}

fn with_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The node form. `x` is the input as given (any leading dims), `x2` its [M, K] view: the node
/// takes `x` itself, since every reshape node would cost its own zero-fill and add in the
/// backward.
#[allow(clippy::too_many_arguments)] // the projection's parts, as lora_linear takes them
fn lora_node(
    x: &Tensor,
    x2: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    lora: LoraBranch<'_>,
    mask: Option<Tensor>,
    gemm: GemmMode,
    out_dims: &[usize],
) -> Result<Tensor> {
    let LoraForward { y, h, mask } = forward_parts(x2, w, bias, lora, mask, gemm)?;
    let node = LoraNode {
        w: w.clone(),
        gemm,
        scale: lora.scale,
        mask,
        h,
        value: PrecomputedValue::new(y.reshape(out_dims)?),
    };
    x.apply_op3(lora.a, lora.b, node)
}

/// A LoRA projection's value computed outside the graph, with what its backward reads.
pub struct LoraForward {
    /// The output, in the input's leading dims.
    pub y: Tensor,
    /// (m * x) A^T [M, r], unscaled: B's gradient needs it, and keeping it costs r values per
    /// row where recomputing it was one more product per projection in every backward.
    h: Tensor,
    mask: Option<Tensor>,
}

/// The projection's value without a graph node, for a backward written by hand
/// ([`lora_grads`]); in a replay ([`replay`]) it takes the kept outputs as the node form does.
pub fn lora_forward(
    x: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    lora: LoraBranch<'_>,
    mask: Option<Tensor>,
    gemm: GemmMode,
) -> Result<LoraForward> {
    let (x2, out_dims) = matrix_view(x, w)?;
    let f = forward_parts(&x2, w, bias, lora, mask, gemm)?;
    Ok(LoraForward {
        y: f.y.reshape(out_dims)?,
        ..f
    })
}

/// [`lora_forward`] on the [M, K] view (output [M, N]).
fn forward_parts(
    x2: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    lora: LoraBranch<'_>,
    mask: Option<Tensor>,
    gemm: GemmMode,
) -> Result<LoraForward> {
    let xv = x2.detach();
    let (a, b) = (lora.a.detach(), lora.b.detach());
    let kept = match &mask {
        None => replayed(xv.dim(0)?, w.dims2().0, a.dim(0)?),
        Some(_) => None,
    };
    let (y, h) = match kept {
        Some(yh) => yh,
        None => {
            let xd = match &mask {
                Some(mask) => apply_mask(&xv, mask)?,
                None => xv.clone(),
            };
            // The bias is a constant of the value; the backward does not depend on it.
            let base = with_bias(w.forward(&xv, gemm)?, bias)?;
            add_branch(base, &xd, &a, &b, lora.scale, gemm)?
        }
    };
    Ok(LoraForward { y, h, mask })
}

/// dx (in x's shape), dA and dB of the projection whose forward gave `f`, for the output's
/// gradient `g`; x, A and B as the forward had them.
pub fn lora_grads(
    x: &Tensor,
    w: &FrozenWeight,
    lora: LoraBranch<'_>,
    f: &LoraForward,
    g: &Tensor,
    gemm: GemmMode,
) -> Result<(Tensor, Tensor, Tensor)> {
    grads(x, w, lora, f.mask.as_ref(), &f.h, g, gemm)
}

/// The node's backward: computed on [M, K] / [M, N] views, dx returned in x's own shape.
fn grads(
    x: &Tensor,
    w: &FrozenWeight,
    lora: LoraBranch<'_>,
    mask: Option<&Tensor>,
    h: &Tensor,
    g: &Tensor,
    gemm: GemmMode,
) -> Result<(Tensor, Tensor, Tensor)> {
    let k = x.dim(D::Minus1)?;
    let n = g.dim(D::Minus1)?;
    let m = x.elem_count() / k;
    let x_dims = x.dims().to_vec();
    let (x, a, b) = (
        x.detach().reshape((m, k))?,
        lora.a.detach(),
        lora.b.detach(),
    );
    let g = g.contiguous()?.reshape((m, n))?;
    let gbs = matmul(&g, &b, gemm)?.affine(lora.scale, 0.0)?; // s g B [M, r]
    let base = w.input_grad(&g, gemm)?;
    let (dx, xd) = match mask {
        Some(mask) => {
            let dxd = apply_mask(&matmul(&gbs, &a, gemm)?, mask)?;
            ((base + dxd)?, apply_mask(&x, mask)?)
        }
        // s g B A accumulated into the frozen product's buffer (no [M, K] temporary).
        None => (add_product(base, &gbs, &a.t()?, gemm)?, x),
    };
    let dx = dx.reshape(x_dims)?;
    let da = matmul(&gbs.t()?, &xd, gemm)?;
    let db = matmul(&g.t()?, h, gemm)?.affine(lora.scale, 0.0)?;
    Ok((dx, da, db))
}

/// base + scale * (xd A^T) B^T, and xd A^T (unscaled, which B's gradient needs): the scale goes
/// on the rank-wide factor, and the last product accumulates into `base` where it can
/// ([`add_product`]).
fn add_branch(
    base: Tensor,
    xd: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    gemm: GemmMode,
) -> Result<(Tensor, Tensor)> {
    let h = matmul(xd, &a.t()?, gemm)?;
    let y = add_product(base, &h.affine(scale, 0.0)?, b, gemm)?;
    Ok((y, h))
}

fn apply_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fused::available(x) {
        fused::mul_const(x, mask)
    } else {
        x.mul(mask)
    }
}

/// y = x W^T + s (m * x) A^T B^T for x [M, K], A [r, K], B [N, r], frozen W and dropout mask m.
struct LoraNode {
    w: FrozenWeight,
    gemm: GemmMode,
    scale: f64,
    mask: Option<Tensor>,
    /// (m * x) A^T [M, r], unscaled: B's gradient needs it, and keeping it costs r values per
    /// row where recomputing it was one more product per projection in every backward.
    h: Tensor,
    value: PrecomputedValue,
}

impl CustomOp3 for LoraNode {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _a: &CpuStorage,
        _la: &Layout,
        _b: &CpuStorage,
        _lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu("lora-linear")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _y: &candle_core::CudaStorage,
        _ly: &Layout,
        _z: &candle_core::CudaStorage,
        _lz: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda("lora-linear")
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lora = LoraBranch {
            a,
            b,
            scale: self.scale,
        };
        let (dx, da, db) = grads(x, &self.w, lora, self.mask.as_ref(), &self.h, g, self.gemm)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}
