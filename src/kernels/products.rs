//! Matrix products as differentiable ops: frozen-weight products (no weight gradient), products
//! of two activations, and a product accumulated into an existing buffer, each on the fast GEMM
//! library when one is loaded (see [`gemm`]).
use super::gemm::{self, Bf16Matrix, GemmMode, MatRef, PackedB};
use crate::util::profile;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use std::sync::Arc;

/// `x @ w^T` for a frozen weight `w` [n, k] and `x` [m, k].
///
/// candle's matmul backward always computes the gradient of both operands; for a frozen base
/// weight that is a wasted [n, k] product per layer per step. This op returns only dL/dx.
///
/// Forward and backward run in the op's `mode` (see [`gemm`]): candle's GEMM, or the fast
/// library in f32 or bf16. The mode is fixed when the op is recorded, so a backward always uses
/// the forward's precision even if the process-wide mode changes in between.
struct FrozenMatmul {
    mode: GemmMode,
    /// The bf16 copy of `w` (cached across steps), in `Bf16` mode.
    w16: Option<Arc<Bf16Matrix>>,
    /// `w^T` packed for the tile kernel (cached across steps), where the engine uses one.
    packed: Option<Arc<PackedB>>,
}

/// `grad[m, n] @ w[n, k]`: FrozenMatmul's input gradient, with the fast library. Never
/// differentiated again (applied without backward).
struct FrozenMatmulBwd {
    mode: GemmMode,
    w16: Option<Arc<Bf16Matrix>>,
    /// `w` packed for the tile kernel.
    packed: Option<Arc<PackedB>>,
}

fn transposed_rhs(l2: &Layout) -> Result<Layout> {
    l2.transpose(0, 1)
}

fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: inner dims differ ({m}x{k} @ ({n}x{k2})^T)");
    }
    Ok((m, n, k))
}

/// How BLAS can read a 2-D layout in place: (offset, stored transposed, leading dimension).
/// `None` for layouts it cannot (broadcast or gathered strides).
fn blas_view(l: &Layout) -> Option<(usize, bool, usize)> {
    let (r, c) = l.shape().dims2().ok()?;
    let s = l.stride();
    let off = l.start_offset();
    // A size-1 dimension's stride is arbitrary; read such a matrix densely.
    if c <= 1 || s[1] == 1 {
        let ld = if r <= 1 { c.max(1) } else { s[0] };
        if ld >= c.max(1) {
            return Some((off, false, ld));
        }
    }
    if r <= 1 || s[0] == 1 {
        let ld = if c <= 1 { r.max(1) } else { s[1] };
        if ld >= r.max(1) {
            return Some((off, true, ld));
        }
    }
    None
}

/// `op(a)` [m, k] as a BLAS operand; `flip` transposes the view (for reading `w` [n, k] as
/// `w^T`).
fn f32_operand<'a>(data: &'a [f32], l: &Layout, flip: bool) -> Option<MatRef<'a, f32>> {
    let (off, trans, ld) = blas_view(l)?;
    Some(MatRef {
        data: data.get(off..)?,
        trans: trans ^ flip,
        ld,
    })
}

thread_local! {
    /// The rounded activation of the last bf16 product on this thread, kept for the next one:
    /// a fresh buffer per product would be zeroed (or page-faulted in) every time.
    static SCRATCH: std::cell::Cell<Vec<bf16>> = const { std::cell::Cell::new(Vec::new()) };
    /// The second operand's, for products of two activations in bf16.
    static SCRATCH_B: std::cell::Cell<Vec<bf16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer of at least `len` elements (contents arbitrary); give it back with [`put_scratch`].
fn take_scratch(len: usize) -> Vec<bf16> {
    let mut v = SCRATCH.with(|s| s.take());
    if v.len() < len {
        v.resize(len, bf16::ZERO);
    }
    v
}

fn put_scratch(v: Vec<bf16>) {
    SCRATCH.with(|s| s.set(v));
}

/// Rounds a stored rows x cols block (leading dim `ld`) into `out[..rows * cols]`, densely.
fn round_dense(src: &[f32], rows: usize, cols: usize, ld: usize, out: &mut [bf16]) -> Option<()> {
    let out = &mut out[..rows * cols];
    if ld == cols {
        gemm::f32_to_bf16(src.get(..rows * cols)?, out);
    } else {
        for i in 0..rows {
            let row = src.get(i * ld..i * ld + cols)?;
            gemm::f32_to_bf16(row, &mut out[i * cols..(i + 1) * cols]);
        }
    }
    Some(())
}

/// The activation side of a bf16 product, rounded now into `buf` densely (same orientation):
/// (stored transposed, leading dimension, elements used).
fn bf16_operand(data: &[f32], l: &Layout, buf: &mut Vec<bf16>) -> Option<(bool, usize, usize)> {
    let (off, trans, ld) = blas_view(l)?;
    let (r, c) = l.shape().dims2().ok()?;
    let (sr, sc) = if trans { (c, r) } else { (r, c) };
    if buf.len() < sr * sc {
        buf.resize(sr * sc, bf16::ZERO);
    }
    round_dense(data.get(off..)?, sr, sc, ld, buf)?;
    Some((trans, sc.max(1), sr * sc))
}

/// `op(a)[m, k] @ op(b)[k, n]` with the fast library, where `b` is the frozen weight `w` (stored
/// [n, k] when `b_is_wt`, i.e. the product is `a @ w^T`; else the product is `a @ w`). `w` is
/// f32 (read as is in `F32` mode; its cached bf16 copy `w16` in `Bf16` mode) or already bf16.
/// `Ok(None)` means the fast path does not apply (layouts, dtypes): the caller uses candle.
#[allow(clippy::too_many_arguments)]
fn fast_product(
    mode: GemmMode,
    w16: Option<&Bf16Matrix>,
    packed: Option<&PackedB>,
    a: &[f32],
    la: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b_is_wt: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<Option<Vec<f32>>> {
    let out = match (mode, w) {
        (GemmMode::F32, CpuStorage::F32(w)) => {
            let (Some(pa), Some(pb)) = (f32_operand(a, la, false), f32_operand(w, lw, b_is_wt))
            else {
                return Ok(None);
            };
            gemm::sgemm_new(m, n, k, pa, pb)?
        }
        (GemmMode::Bf16, CpuStorage::F32(_) | CpuStorage::BF16(_)) => {
            let mut a16 = take_scratch(0);
            let Some((a_trans, a_ld, used)) = bf16_operand(a, la, &mut a16) else {
                put_scratch(a16);
                return Ok(None);
            };
            let pa = MatRef {
                data: &a16[..used],
                trans: a_trans,
                ld: a_ld,
            };
            let out = match packed.filter(|p| p.k() == k && p.n() == n) {
                Some(p) => gemm::gemm_bf16_packed_new(m, pa, p),
                None => match (bf16_weight_operand(w, w16, lw, b_is_wt), w) {
                    (Some(pb), _) => gemm::gemm_bf16_new(m, n, k, pa, pb),
                    // An f32 weight with neither copy (the packed cache was full): rounded here,
                    // at every call, so that the mode's precision holds.
                    (None, CpuStorage::F32(wd)) => {
                        let mut w16 = Vec::new();
                        match bf16_operand(wd, lw, &mut w16) {
                            Some((t, ld, used)) => {
                                let pb = MatRef {
                                    data: &w16[..used],
                                    trans: t ^ b_is_wt,
                                    ld,
                                };
                                gemm::gemm_bf16_new(m, n, k, pa, pb)
                            }
                            None => {
                                put_scratch(a16);
                                return Ok(None);
                            }
                        }
                    }
                    (None, _) => {
                        put_scratch(a16);
                        return Ok(None);
                    }
                },
            };
            put_scratch(a16);
            out?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// `x [m, k] @ B` for a packed B [k, n] (a weight held only packed, `super::frozen`): `x` rounded
/// to bf16 here, f32 accumulation, as every bf16 product.
pub(super) fn packed_product(x: &CpuStorage, l: &Layout, b: &PackedB) -> Result<CpuStorage> {
    let (m, k) = l.shape().dims2()?;
    if k != b.k() {
        candle_core::bail!("packed product: [{m}, {k}] @ [{}, {}]", b.k(), b.n());
    }
    let Some(x) = f32_slice(x) else {
        candle_core::bail!(
            "packed product: f32 activations expected, got {:?}",
            x.dtype()
        );
    };
    let mut a16 = take_scratch(0);
    let Some((trans, ld, used)) = bf16_operand(x, l, &mut a16) else {
        put_scratch(a16);
        candle_core::bail!("packed product: unsupported activation layout {l:?}");
    };
    let pa = MatRef {
        data: &a16[..used],
        trans,
        ld,
    };
    let out = gemm::gemm_bf16_packed_new(m, pa, b);
    put_scratch(a16);
    Ok(CpuStorage::F32(out?))
}

/// The frozen weight as a bf16 operand: its cached copy `w16` (dense row-major [n_w, k_w]
/// whatever `w`'s layout was) for an f32 weight, or the bf16 storage as it is.
fn bf16_weight_operand<'a>(
    w: &'a CpuStorage,
    w16: Option<&'a Bf16Matrix>,
    lw: &Layout,
    b_is_wt: bool,
) -> Option<MatRef<'a, bf16>> {
    match (w, w16) {
        (CpuStorage::F32(_), Some(w16)) => Some(MatRef {
            data: &w16.data[..],
            trans: b_is_wt,
            ld: w16.cols,
        }),
        (CpuStorage::BF16(w), _) => {
            let (off, trans, ld) = blas_view(lw)?;
            Some(MatRef {
                data: w.get(off..)?,
                trans: trans ^ b_is_wt,
                ld,
            })
        }
        _ => None,
    }
}

/// The weight in the activation's dtype for candle's matmul (a bf16 weight whose layout the
/// fast path could not read is widened here, dense).
fn widened(s1: &CpuStorage, s2: &CpuStorage, l2: &Layout) -> Result<Option<(CpuStorage, Layout)>> {
    if s1.dtype() == s2.dtype() {
        return Ok(None);
    }
    Ok(Some((
        s2.to_dtype(l2, s1.dtype())?,
        Layout::contiguous(l2.shape()),
    )))
}

fn f32_slice(s: &CpuStorage) -> Option<&[f32]> {
    match s {
        CpuStorage::F32(v) => Some(v),
        _ => None,
    }
}

/// `a @ w^T` (`b_is_wt`) or `a @ w` for the frozen weight `w`, [m, n] from inner size k: the fast
/// library where [`fast_product`] applies, candle's GEMM otherwise.
#[allow(clippy::too_many_arguments)]
fn weight_product(
    mode: GemmMode,
    (w16, packed): (Option<&Bf16Matrix>, Option<&PackedB>),
    a: &CpuStorage,
    la: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b_is_wt: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<CpuStorage> {
    if let Some(x) = f32_slice(a) {
        if let Some(out) = fast_product(mode, w16, packed, x, la, w, lw, b_is_wt, (m, n, k))? {
            return Ok(CpuStorage::F32(out));
        }
    }
    let widened = widened(a, w, lw)?;
    let (w, lw) = widened.as_ref().map_or((w, lw), |(s, l)| (s, l));
    let rhs = if b_is_wt {
        transposed_rhs(lw)?
    } else {
        lw.clone()
    };
    profile::gemm(m, n, k, || a.matmul(w, (1, m, n, k), la, &rhs))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = dims(l1, l2)?;
        let out = weight_product(
            self.mode,
            (self.w16.as_deref(), self.packed.as_deref()),
            s1,
            l1,
            s2,
            l2,
            true,
            (m, n, k),
        )?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &transposed_rhs(l2)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = input_grad(grad, w, self.mode, self.w16.clone())?;
        Ok((Some(dx), None))
    }
}

impl CustomOp2 for FrozenMatmulBwd {
    fn name(&self) -> &'static str {
        "frozen-matmul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n) = l1.shape().dims2()?;
        let (n2, k) = l2.shape().dims2()?;
        if n != n2 {
            candle_core::bail!("frozen matmul backward: {m}x{n} @ {n2}x{k}");
        }
        let out = weight_product(
            self.mode,
            (self.w16.as_deref(), self.packed.as_deref()),
            s1,
            l1,
            s2,
            l2,
            false,
            (m, k, n),
        )?;
        Ok((out, Shape::from((m, k))))
    }
}

fn input_grad(
    grad: &Tensor,
    w: &Tensor,
    mode: GemmMode,
    w16: Option<Arc<Bf16Matrix>>,
) -> Result<Tensor> {
    if mode == GemmMode::Candle || !grad.device().is_cpu() {
        let (n, k) = w.dims2()?;
        let m = grad.elem_count() / n.max(1);
        profile::gemm(m, k, n, || {
            if w.dtype() != grad.dtype() {
                return grad.matmul(&w.to_dtype(grad.dtype())?);
            }
            grad.matmul(w)
        })
    } else {
        let packed = if mode == GemmMode::Bf16 {
            gemm::packed_weight(w, false)?
        } else {
            None
        };
        grad.apply_op2_no_bwd(w, &FrozenMatmulBwd { mode, w16, packed })
    }
}

/// `grad[m, n] @ w[n, k]`, the input gradient [`frozen_linear`]'s backward computes in
/// `mode` (exposed for benchmarks and tests).
pub fn frozen_linear_input_grad(grad: &Tensor, w: &Tensor, mode: GemmMode) -> Result<Tensor> {
    let (mode, w16, w) = resolve(grad, w, mode)?;
    input_grad(grad, &w, mode, w16)
}

/// The mode that runs for activation `x` and frozen weight `w`, the bf16 copy it needs, and the
/// weight to use: `w` itself, or widened to `x`'s dtype when only candle can take it.
fn resolve(
    x: &Tensor,
    w: &Tensor,
    mode: GemmMode,
) -> Result<(GemmMode, Option<Arc<Bf16Matrix>>, Tensor)> {
    let w_ok = matches!(w.dtype(), DType::F32 | DType::BF16);
    let usable = x.device().is_cpu() && x.dtype() == DType::F32 && w_ok;
    let mode = if usable {
        gemm::effective_mode(mode)
    } else {
        GemmMode::Candle
    };
    match (mode, w.dtype()) {
        // With packed weights the packed copies are the bf16 weights (no third copy).
        (GemmMode::Bf16, DType::F32) if gemm::packs_weights() => Ok((mode, None, w.clone())),
        (GemmMode::Bf16, DType::F32) => Ok((mode, Some(gemm::bf16_weight(w)?), w.clone())),
        (GemmMode::Bf16, DType::BF16) => Ok((mode, None, w.clone())),
        (_, dt) if dt == x.dtype() => Ok((mode, None, w.clone())),
        // A bf16 weight outside bf16 mode: widened at each call (correct, not fast).
        _ => Ok((mode, None, w.to_dtype(x.dtype())?)),
    }
}

/// `x @ w^T` over the last dim of `x` (any leading dims) for a frozen weight `w`: no gradient for
/// `w`, products in `mode`. Falls back to candle's GEMM when the mode is not available (no
/// library loaded, non-CPU device, non-f32 activations).
///
/// `w` may also be a bf16 tensor with f32 `x`: in `Bf16` mode it is used as is (no f32 copy of
/// the frozen weights needs to exist, halving their memory); in the other modes it is widened
/// to f32 at each call.
pub fn frozen_linear(x: &Tensor, w: &Tensor, mode: GemmMode) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().expect("non-scalar input");
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, k))?;
    let (mode, w16, w) = resolve(x, w, mode)?;
    let packed = if mode == GemmMode::Bf16 {
        gemm::packed_weight(&w, true)?
    } else {
        None
    };
    let y = x2.apply_op2(&w, FrozenMatmul { mode, w16, packed })?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}

/// `a @ b` over the last two dims (equal leading batch dims, as candle's `matmul`), with both
/// operands' gradients: for products of two activations (attention's q @ k^T and P @ v) and for
/// LoRA's small products, where candle's GEMM is the slow part too. In `Bf16` mode both operands
/// are rounded at each call (nothing is cached: they change every step).
struct FastMatmul {
    mode: GemmMode,
    /// Attention's causal mask, which lets the kernel skip what it zeroes (no backward then).
    causal: Option<gemm::Causal>,
}

/// Offsets of each batch matrix in storage, for any strides of the leading dims.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let nb = dims.len() - 2;
    let mut offs = vec![l.start_offset()];
    // Outermost dim first, so that the innermost varies fastest (row-major batch order).
    for d in 0..nb {
        let mut next = Vec::with_capacity(offs.len() * dims[d]);
        for &o in &offs {
            for i in 0..dims[d] {
                next.push(o + i * strides[d]);
            }
        }
        offs = next;
    }
    offs
}

/// The last two dims of `l` as a 2-D layout at offset 0 (for [`blas_view`]).
fn matrix_layout(l: &Layout) -> Layout {
    let dims = l.dims();
    let s = l.stride();
    let r = dims.len();
    Layout::new(
        Shape::from((dims[r - 2], dims[r - 1])),
        vec![s[r - 2], s[r - 1]],
        0,
    )
}

/// One operand of a product of two activations: f32, or already bf16 (a bf16-mode attention's
/// probabilities and their gradients, rounded where they were computed).
#[derive(Clone, Copy)]
enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Operand<'a> {
    fn of(s: &'a CpuStorage) -> Option<Self> {
        match s {
            CpuStorage::F32(v) => Some(Self::F32(v)),
            CpuStorage::BF16(v) => Some(Self::Bf16(v)),
            _ => None,
        }
    }

    fn get(self, r: std::ops::Range<usize>) -> Option<Self> {
        Some(match self {
            Self::F32(v) => Self::F32(v.get(r)?),
            Self::Bf16(v) => Self::Bf16(v.get(r)?),
        })
    }

    /// The stored rows x cols block (leading dim `ld`) as a bf16 operand: in place, or rounded
    /// densely into `buf`.
    fn as_bf16<'b>(
        self,
        buf: &'b mut Vec<bf16>,
        (rows, cols, ld): (usize, usize, usize),
        trans: bool,
    ) -> Option<MatRef<'b, bf16>>
    where
        'a: 'b,
    {
        match self {
            Self::Bf16(data) => Some(MatRef { data, trans, ld }),
            Self::F32(data) => {
                buf.resize(buf.len().max(rows * cols), bf16::ZERO);
                round_dense(data, rows, cols, ld, buf)?;
                Some(MatRef {
                    data: &buf[..rows * cols],
                    trans,
                    ld: cols.max(1),
                })
            }
        }
    }
}

impl FastMatmul {
    fn fast(
        &self,
        a: Operand<'_>,
        la: &Layout,
        b: Operand<'_>,
        lb: &Layout,
        (bn, m, n, k): (usize, usize, usize, usize),
    ) -> Result<Option<Vec<f32>>> {
        let (ma, mb) = (matrix_layout(la), matrix_layout(lb));
        let (Some((_, ta, lda)), Some((_, tb, ldb))) = (blas_view(&ma), blas_view(&mb)) else {
            return Ok(None);
        };
        let (oa, ob) = (batch_offsets(la), batch_offsets(lb));
        if bn * m * n == 0 {
            return Ok(Some(Vec::new()));
        }
        // Written by the products without a zero-fill first; its length is set once all are.
        let mut out: Vec<f32> = Vec::with_capacity(bn * m * n);
        // Rounding buffers kept per thread (a fresh one was zero-filled at every product).
        let mut a16 = take_scratch(0);
        let mut b16 = SCRATCH_B.with(|s| s.take());
        let chunks = out.spare_capacity_mut()[..bn * m * n].chunks_mut(m * n);
        for ((&oa, &ob), c) in oa.iter().zip(&ob).zip(chunks) {
            let (ra, ca) = if ta { (k, m) } else { (m, k) };
            let (rb, cb) = if tb { (n, k) } else { (k, n) };
            let span = |rows: usize, cols: usize, ld: usize| {
                if rows == 0 {
                    0
                } else {
                    (rows - 1) * ld + cols
                }
            };
            let sa = a.get(oa..oa + span(ra, ca, lda));
            let sb = b.get(ob..ob + span(rb, cb, ldb));
            let (Some(sa), Some(sb)) = (sa, sb) else {
                return Ok(None);
            };
            match (self.mode, sa, sb) {
                (GemmMode::Candle, _, _) => return Ok(None),
                (GemmMode::F32, Operand::F32(sa), Operand::F32(sb)) => {
                    let pa = MatRef {
                        data: sa,
                        trans: ta,
                        ld: lda,
                    };
                    let pb = MatRef {
                        data: sb,
                        trans: tb,
                        ld: ldb,
                    };
                    gemm::sgemm_uninit(m, n, k, pa, pb, c, self.causal)?;
                }
                (GemmMode::F32, _, _) => return Ok(None),
                (GemmMode::Bf16, sa, sb) => {
                    // An f32 operand is rounded densely (leading dim = stored cols), orientation
                    // kept; a bf16 one is read in place.
                    let (Some(pa), Some(pb)) = (
                        sa.as_bf16(&mut a16, (ra, ca, lda), ta),
                        sb.as_bf16(&mut b16, (rb, cb, ldb), tb),
                    ) else {
                        return Ok(None);
                    };
                    gemm::gemm_bf16_uninit(m, n, k, pa, pb, c)?;
                }
            }
        }
        put_scratch(a16);
        SCRATCH_B.with(|s| s.set(b16));
        // SAFETY: each of the bn chunks of m * n values was written by its product.
        unsafe { out.set_len(bn * m * n) };
        Ok(Some(out))
    }
}

fn matmul_dims(l1: &Layout, l2: &Layout) -> Result<(Shape, (usize, usize, usize, usize))> {
    let (a, b) = (l1.dims(), l2.dims());
    let r = a.len();
    if r < 2 || b.len() != r || a[..r - 2] != b[..r - 2] || a[r - 1] != b[r - 2] {
        candle_core::bail!("matmul: shapes {a:?} and {b:?} do not match");
    }
    let (m, k, n) = (a[r - 2], a[r - 1], b[r - 1]);
    let bn: usize = a[..r - 2].iter().product();
    let mut out = a[..r - 2].to_vec();
    out.extend([m, n]);
    Ok((Shape::from(out), (bn, m, n, k)))
}

impl CustomOp2 for FastMatmul {
    fn name(&self) -> &'static str {
        "fast-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, bmnk) = matmul_dims(l1, l2)?;
        if let (Some(a), Some(b)) = (Operand::of(s1), Operand::of(s2)) {
            if let Some(out) = self.fast(a, l1, b, l2, bmnk)? {
                return Ok((CpuStorage::F32(out), shape));
            }
        }
        if s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "matmul: {:?} @ {:?} has no {} path",
                s1.dtype(),
                s2.dtype(),
                self.mode.as_str()
            );
        }
        let (bn, m, n, k) = bmnk;
        let out = profile::gemm(bn * m, n, k, || s1.matmul(s2, bmnk, l1, l2))?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, bmnk) = matmul_dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The transposes are views: the op reads them as column-major operands, no copy.
        let op = FastMatmul {
            mode: self.mode,
            causal: None,
        };
        let da = grad.apply_op2_no_bwd(&b.t()?, &op)?;
        let db = a.t()?.apply_op2_no_bwd(grad, &op)?;
        Ok((Some(da), Some(db)))
    }
}

/// `a @ b` like candle's `matmul` (same leading batch dims, both gradients), with the fast
/// library's f32 GEMM whenever `gemm_mode` is not `Candle`. bf16 is not used here even in `Bf16` mode:
/// both operands would have to be rounded at every call, and at LoRA's and short sequences'
/// attention shapes that costs about what it saves (`cargo bench --bench gemm -- --m 1536` on
/// AMX: P @ v 304 against 291 GFLOP/s with P rounded at the product, LoRA's x A^T 47 against
/// 74); long sequences' attention takes [`matmul_causal`] in bf16, its probabilities already
/// rounded where they are computed (`super::attention`). Falls back to candle's matmul when the
/// library is unavailable, the device is not a CPU or the dtype not f32.
pub fn matmul(a: &Tensor, b: &Tensor, gemm_mode: GemmMode) -> Result<Tensor> {
    matmul_with(a, b, f32_products(gemm_mode))
}

/// The mode of [`matmul`]'s products in `gemm_mode`: f32 on the fast engine unless `Candle`.
pub fn f32_products(gemm_mode: GemmMode) -> GemmMode {
    match gemm_mode {
        GemmMode::Candle => GemmMode::Candle,
        GemmMode::F32 | GemmMode::Bf16 => GemmMode::F32,
    }
}

/// [`matmul`] with the products in exactly `mode` (bf16 operands too, for benchmarks and
/// tests); candle's matmul when the mode is unavailable.
pub fn matmul_with(a: &Tensor, b: &Tensor, mode: GemmMode) -> Result<Tensor> {
    fast_matmul(a, b, mode, None)
}

/// [`matmul_with`] of a product that attention's causal mask shapes (`causal`, see
/// [`gemm::Causal`]), outside any graph: the small-product kernel skips the masked tiles and
/// terms; the other engines compute everything, which gives the same values.
pub fn matmul_causal(
    a: &Tensor,
    b: &Tensor,
    mode: GemmMode,
    causal: gemm::Causal,
) -> Result<Tensor> {
    fast_matmul(a, b, mode, Some(causal))
}

fn fast_matmul(
    a: &Tensor,
    b: &Tensor,
    mode: GemmMode,
    causal: Option<gemm::Causal>,
) -> Result<Tensor> {
    // bf16 operands (taken as they are) only in bf16 mode.
    let dtype_ok = |t: &Tensor| {
        t.dtype() == DType::F32 || (t.dtype() == DType::BF16 && mode == GemmMode::Bf16)
    };
    let usable = a.device().is_cpu() && dtype_ok(a) && dtype_ok(b);
    let mode = if usable {
        gemm::effective_mode(mode)
    } else {
        GemmMode::Candle
    };
    // With the profile on, candle's products go through the op too (its fallback is the same
    // candle GEMM, forward and backward) so that they are timed.
    if mode == GemmMode::Candle && !(usable && profile::enabled()) {
        return a.matmul(b);
    }
    let op = FastMatmul { mode, causal };
    match causal {
        // The skipped terms have no backward: outside the graph only.
        Some(_) => a.apply_op2_no_bwd(b, &op),
        None => a.apply_op2(b, op),
    }
}

/// `acc + h @ b^T` for `acc` [M, N], `h` [M, r], `b` [N, r] (a LoRA branch added to its base
/// product). When `acc` is a fresh f32 CPU tensor outside any graph and the fast library is
/// loaded, the product is accumulated into `acc`'s own buffer by the GEMM (beta = 1): no [M, N]
/// temporary and no separate add pass. Otherwise the plain sum.
pub fn add_product(acc: Tensor, h: &Tensor, b: &Tensor, gemm_mode: GemmMode) -> Result<Tensor> {
    let in_place = acc.device().is_cpu()
        && acc.dtype() == DType::F32
        && h.dtype() == DType::F32
        && b.dtype() == DType::F32
        && !acc.track_op()
        && !h.track_op()
        && !b.track_op()
        && acc.is_contiguous()
        && gemm::effective_mode(gemm_mode) != GemmMode::Candle;
    if in_place {
        acc.inplace_op3(h, b, &AddProduct)?;
        return Ok(acc);
    }
    acc + matmul(h, &b.t()?, gemm_mode)?
}

struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        la: &Layout,
        h: &CpuStorage,
        lh: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<()> {
        let (m, r) = lh.shape().dims2()?;
        let (n, r2) = lb.shape().dims2()?;
        if r != r2 || la.shape().dims2()? != (m, n) {
            candle_core::bail!(
                "add-product: shapes {:?} + {:?} @ {:?}^T",
                la.shape(),
                lh.shape(),
                lb.shape()
            );
        }
        let (Some(h), Some(b)) = (f32_slice(h), f32_slice(b)) else {
            candle_core::bail!("add-product: f32 only");
        };
        let (Some(ph), Some(pb)) = (f32_operand(h, lh, false), f32_operand(b, lb, true)) else {
            candle_core::bail!("add-product: operand layouts");
        };
        let (CpuStorage::F32(acc), Some((start, end))) = (acc, la.contiguous_offsets()) else {
            candle_core::bail!("add-product: accumulator must be contiguous f32");
        };
        gemm::sgemm_accumulate(m, n, r, ph, pb, &mut acc[start..end])
    }
}
