//! Fused ops with hand-written backward passes: CPU (f32 and f64; the causal softmax and its
//! gradient also f32 in, bf16 out, for bf16-mode attention) here, CUDA (f32 and bf16 storage) in
//! [`super::cuda`] with the same contracts.
//!
//! Why: candle's composite forms keep every intermediate alive for backprop, and its backward
//! allocates a full-size gradient for every constant operand of a binary op (rope tables, masks,
//! norm weights, dropout masks) that is never freed before the step ends. At SmolLM2-360M's
//! shapes that is most of the memory. Each op here keeps only its inputs and returns gradients
//! only for the inputs that need them. Every backward is tested against finite differences and
//! against the composite forms (tests/fused_ops.rs).
use super::gemm::round_bf16;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use half::bf16;
use num_traits::Float;
use std::mem::MaybeUninit;

trait Fl: Float + WithDType + Send + Sync + std::ops::AddAssign + std::ops::MulAssign {
    /// e^x for the ops' inner loops: f64 uses libm; f32 [`exp_f32`], which the compiler can
    /// vectorize (a libm call per element was 40% of the non-GEMM time of a real-data step).
    fn fast_exp(self) -> Self;
    /// Whether the reductions run in [`LANES`] partial sums (f32) or as one running sum (f64:
    /// the reference precision that tests compare against, and whose runs on N processes must
    /// reproduce one process's bit for bit; its order is the one the project always had).
    const LANED: bool;
}
impl Fl for f32 {
    const LANED: bool = true;
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}
impl Fl for f64 {
    const LANED: bool = false;
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

/// e^x in f32 without a libm call: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite, two
/// constants), e^r by Cephes' degree-7 polynomial (relative error about 1e-7, one or two units in
/// the last place), 2^k built in the exponent bits. Below -87.3 (where e^x is subnormal) it
/// returns 0, above 88.7 infinity; NaN stays NaN. Branch-free apart from selects, so loops over
/// it vectorize. tests/fused_ops.rs checks it against f64 exp over the whole range.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.5, 88.72);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * C1 - k * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^k as two factors, so that k = 128 (x near 88.7) does not overflow the exponent field.
    // Not `as`: its saturating conversion keeps LLVM from vectorizing the loops (2.0 against
    // 0.75 ns per element). SAFETY: k is an integer in [-127, 128] (x was clamped).
    let k: i32 = unsafe { k.to_int_unchecked() };
    let h = k >> 1;
    let two_h = f32::from_bits(((h + 127) as u32) << 23);
    let two_rest = f32::from_bits((((k - h) + 127) as u32) << 23);
    let y = er * two_h * two_rest;
    if x < -87.3 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else {
        // NaN fails both tests above and clamp keeps it NaN, so it propagates through y.
        y
    }
}

/// Runs `f` compiled for AVX-512 where the CPU has it. The crate is built for baseline x86-64,
/// where the ops' element loops get 4-wide SSE; inlined into this function they get 16-wide
/// vectors (a microbenchmark, old and new build back to back: SwiGLU 1.5x, log-softmax-gather
/// 1.4x, the causal softmax about the same). The same operations run in the same order (Rust
/// never fuses or reorders float arithmetic), so the results are bit for bit those of the
/// baseline build. Call it inside a parallel loop's body: rayon's own frames are
/// not inlined here.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
        #[inline]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has every feature the function is compiled for.
            return unsafe { avx512(f) };
        }
    }
    f()
}

/// Lanes of the reductions below: a single running sum is one dependent add per element (it
/// was the ops' bottleneck); 16 interleaved partial sums vectorize. The order of the additions
/// is fixed (lane l takes elements l, l + 16, ...; then the lanes pairwise), so results do not
/// depend on the machine.
const LANES: usize = 16;

#[inline(always)]
fn combine<T: Copy + std::ops::Add<Output = T>>(mut acc: [T; LANES]) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] = acc[l] + acc[l + w];
        }
    }
    acc[0]
}

/// sum_i f(a_i, b_i) in [`LANES`] partial sums (in order where `T::LANED` is false).
#[inline(always)]
fn lane_sum<T: Fl, S: Copy + std::ops::Add<Output = S>>(
    a: &[T],
    b: &[T],
    zero: S,
    f: impl Fn(T, T) -> S,
) -> S {
    if !T::LANED {
        return a.iter().zip(b).fold(zero, |acc, (&x, &y)| acc + f(x, y));
    }
    let mut acc = [zero; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = acc[l] + f(xa[l], xb[l]);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] = acc[l] + f(x, y);
    }
    combine(acc)
}

/// sum_i f(a_i, b_i, c_i) in f64, in [`LANES`] partial sums (in order where `T::LANED` is
/// false).
#[inline(always)]
fn lane_sum3<T: Fl>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64) -> f64 {
    let n = a.len().min(b.len()).min(c.len());
    if !T::LANED {
        return (0..n).fold(0.0, |acc, i| acc + f(a[i], b[i], c[i]));
    }
    let mut acc = [0.0; LANES];
    let full = n / LANES * LANES;
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    for ((xa, xb), xc) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
        .zip(c[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l], xc[l]);
        }
    }
    for i in full..n {
        acc[i - full] += f(a[i], b[i], c[i]);
    }
    combine(acc)
}

/// The largest element; NaNs are skipped (all NaN: -inf, and the NaNs then propagate through
/// the exponentials of the callers). A plain comparison, not `Float::max`: its NaN handling
/// added a compare and a blend to every step of the dependent chain.
#[inline(always)]
fn lane_max<T: Fl>(v: &[T]) -> T {
    #[inline(always)]
    fn max<T: Fl>(m: T, x: T) -> T {
        if x > m {
            x
        } else {
            m
        }
    }
    let mut acc = [T::neg_infinity(); LANES];
    let c = v.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] = max(acc[l], x[l]);
        }
    }
    for (l, &x) in r.iter().enumerate() {
        acc[l] = max(acc[l], x);
    }
    acc.iter().fold(T::neg_infinity(), |m, &v| max(m, v))
}

fn to_t<T: Fl>(x: f64) -> T {
    <T as WithDType>::from_f64(x)
}

fn to64<T: Fl>(x: T) -> f64 {
    <T as WithDType>::to_f64(x)
}

fn contig<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

macro_rules! by_dtype {
    ($s:expr, $f:ident $(, $arg:expr)*) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("fused op: only f32 and f64 are supported"),
        }
    };
}

fn out<T: Fl>(v: Vec<T>, l: &Layout) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(v), l.shape().clone())
}

/// An output of `len` elements made in parallel chunks of `chunk` by `fill(chunk index, chunk)`,
/// without zero-filling it first: with glibc's mmap off (src/util/alloc.rs) `vec![0; len]` is a
/// memset, a whole extra pass over the step's largest tensors (the attention probabilities).
///
/// # Safety
/// `fill` writes every element of each chunk it is given.
unsafe fn par_out<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut v: Vec<MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(len) };
    crate::util::parallel::for_each_chunk_mut(&mut v, chunk, fill);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: every element is written (the caller's contract) and MaybeUninit<T> has T's
    // layout; the allocation moves into the new Vec.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// `s` as initialized values, once every element has been written.
///
/// # Safety
/// Every element of `s` is initialized.
unsafe fn written<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: the caller's contract; same layout.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Whether the fused ops apply: CPU in f32/f64; with the `cuda` feature, CUDA in f32/bf16
/// (src/kernels/cuda).
pub fn available(t: &Tensor) -> bool {
    match t.device() {
        candle_core::Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => super::cuda::supports(t.dtype()),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f64,
}
struct RmsNormBwd {
    eps: f64,
}

fn rms_fwd<T: Fl>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (contig::<T>(xs, xl)?, contig::<T>(ws, wl)?);
    let h = last_dim(xl);
    rms_weight_fits(w, h)?;
    let fill = |row: usize, y: &mut [MaybeUninit<T>]| {
        let x = &x[row * h..(row + 1) * h];
        wide(
            #[inline(always)]
            || {
                let ss = lane_sum(x, x, 0.0, |v, _| to64(v) * to64(v));
                let r = to_t::<T>(1.0 / (ss / h as f64 + eps).sqrt());
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write(x * r * w);
                }
            },
        )
    };
    // SAFETY: rows of h, each written whole (w has h elements, checked above).
    let y = unsafe { par_out(x.len(), h, fill) };
    Ok(out(y, xl))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, rms_fwd, self.eps, s1, l1, s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::rms_fwd(s1, l1, s2, l2, self.eps)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rms_norm_grad(x, w, g, self.eps)?), None))
    }
}

/// Every output element is written from the weight's element of its column (the output buffers
/// are not zero-filled first: [`par_out`]), so the weight must cover the whole row.
fn rms_weight_fits<T>(w: &[T], h: usize) -> Result<()> {
    if w.len() != h {
        candle_core::bail!("fused rms-norm: weight of {} for rows of {h}", w.len());
    }
    Ok(())
}

// dx_j = g_j w_j r - x_j (r^3 / H) sum_i g_i w_i x_i, with r = (mean x^2 + eps)^-1/2.
fn rms_bwd<T: Fl>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, g) = (
        contig::<T>(xs, xl)?,
        contig::<T>(ws, wl)?,
        contig::<T>(gs, gl)?,
    );
    let h = last_dim(xl);
    rms_weight_fits(w, h)?;
    let fill = |row: usize, dx: &mut [MaybeUninit<T>]| {
        let (x, g) = (&x[row * h..(row + 1) * h], &g[row * h..(row + 1) * h]);
        wide(
            #[inline(always)]
            || {
                let ss = lane_sum(x, x, 0.0, |v, _| to64(v) * to64(v));
                let r = 1.0 / (ss / h as f64 + eps).sqrt();
                let dot = lane_sum3(g, w, x, |g, w, x| to64(g * w * x));
                let c = to_t::<T>(dot * r * r * r / h as f64);
                let r = to_t::<T>(r);
                for (dx, ((&g, &w), &x)) in dx.iter_mut().zip(g.iter().zip(w).zip(x)) {
                    dx.write(g * w * r - x * c);
                }
            },
        )
    };
    // SAFETY: rows of h, each written whole (w has h elements, checked above).
    let dx = unsafe { par_out(x.len(), h, fill) };
    Ok(out(dx, xl))
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, rms_bwd, self.eps, s1, l1, s2, l2, s3, l3)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::rms_bwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// dL/dx of [`rms_norm`] for the output's gradient `g` (the weight is frozen).
pub fn rms_norm_grad(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &g.contiguous()?, &RmsNormBwd { eps })
}

// ---------------------------------------------------------------- Rotary embeddings

/// y = x cos + rotate_half(x) sin over the last dim, tables [T, D] for x [.., T, D].
struct Rope;

fn rope_fwd<T: Fl>(
    xs: &CpuStorage,
    xl: &Layout,
    cs: &CpuStorage,
    cl: &Layout,
    ss: &CpuStorage,
    sl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, cos, sin) = (
        contig::<T>(xs, xl)?,
        contig::<T>(cs, cl)?,
        contig::<T>(ss, sl)?,
    );
    let dims = xl.dims();
    let d = dims[dims.len() - 1];
    let t = dims[dims.len() - 2];
    if !d.is_multiple_of(2) {
        candle_core::bail!("fused rope: the head dimension {d} is odd");
    }
    let fill = |block: usize, y: &mut [MaybeUninit<T>]| {
        let x = &x[block * t * d..(block + 1) * t * d];
        wide(
            #[inline(always)]
            || {
                for p in 0..t {
                    let tables = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                    rotate_row(
                        &x[p * d..(p + 1) * d],
                        &mut y[p * d..(p + 1) * d],
                        Some(tables),
                    );
                }
            },
        )
    };
    // SAFETY: blocks of t rows of d = 2 * half, every element of each row written (the
    // rotation needs an even head dimension, as every Llama has).
    let y = unsafe { par_out(x.len(), t * d, fill) };
    Ok(out(y, xl))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, rope_fwd, s1, l1, s2, l2, s3, l3)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::rope(s1, l1, s2, l2, s3, l3)
    }
    // The rotation's transpose is the rotation by -angle (cos halves are equal).
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?;
        Ok((Some(dx), None, None))
    }
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(cos, sin, Rope)
}

// ---------------------------------------------------------------- Heads layout

/// Between a projection's layout [B, T, n * d] and the attention's heads [B, n, T, d], with
/// RoPE (tables [T, d]) applied on the way when given: one pass instead of a transposed copy
/// and a rotation pass, the same arithmetic as [`rope`] on the copy.
struct Heads {
    n: usize,
    /// To heads ([B, T, n d] -> [B, n, T, d]), else back.
    split: bool,
}

/// One row of d values, rotated by the tables' row when given (RoPE; d even).
#[inline(always)]
fn rotate_row<T: Fl>(x: &[T], y: &mut [MaybeUninit<T>], tables: Option<(&[T], &[T])>) {
    let Some((c, s)) = tables else {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x);
        }
        return;
    };
    let half = x.len() / 2;
    for i in 0..half {
        y[i].write(x[i] * c[i] - x[i + half] * s[i]);
        y[i + half].write(x[i + half] * c[i + half] + x[i] * s[i + half]);
    }
}

fn heads_fwd<T: Fl>(
    op: &Heads,
    xs: &CpuStorage,
    xl: &Layout,
    tables: Option<(&CpuStorage, &Layout, &CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let x = contig::<T>(xs, xl)?;
    let dims = xl.dims();
    let n = op.n;
    let (b, t, d) = if op.split {
        let (b, t, nd) = (dims[0], dims[1], dims[2]);
        if n == 0 || !nd.is_multiple_of(n) {
            candle_core::bail!("fused heads: rows of {nd} values for {n} heads");
        }
        (b, t, nd / n)
    } else {
        (dims[0], dims[2], dims[3])
    };
    let tables = match tables {
        Some((cs, cl, ss, sl)) => {
            let (c, s) = (contig::<T>(cs, cl)?, contig::<T>(ss, sl)?);
            if c.len() != t * d || s.len() != t * d || !d.is_multiple_of(2) {
                candle_core::bail!("fused heads: tables of {} for [{t}, {d}]", c.len());
            }
            Some((c, s))
        }
        None => None,
    };
    let row_tables =
        |p: usize| tables.map(|(c, s)| (&c[p * d..(p + 1) * d], &s[p * d..(p + 1) * d]));
    // Output blocks: to heads, one head of one batch row ([T, d], a row per position); back,
    // one position of one batch row ([n d], a row per head).
    let (per_row, rows) = if op.split { (n, t) } else { (t, n) };
    let fill = |blk: usize, y: &mut [MaybeUninit<T>]| {
        let (bi, j) = (blk / per_row, blk % per_row);
        wide(
            #[inline(always)]
            || {
                for r in 0..rows {
                    let (p, from) = if op.split {
                        (r, ((bi * t + r) * n + j) * d)
                    } else {
                        (j, ((bi * n + r) * t + j) * d)
                    };
                    rotate_row(&x[from..][..d], &mut y[r * d..(r + 1) * d], row_tables(p));
                }
            },
        )
    };
    // SAFETY: each block of rows * d values is written row by row.
    let y = unsafe { par_out(b * n * t * d, rows * d, fill) };
    let shape = if op.split {
        Shape::from((b, n, t, d))
    } else {
        Shape::from((b, t, n * d))
    };
    Ok((T::to_cpu_storage_owned(y), shape))
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "fused-heads"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, heads_fwd, self, s1, l1, None)
    }
}

struct HeadsRope(Heads);

impl CustomOp3 for HeadsRope {
    fn name(&self) -> &'static str {
        "fused-heads-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, heads_fwd, &self.0, s1, l1, Some((s2, l2, s3, l3)))
    }
}

/// x [B, T, n * d] as [B, n, T, d] (CPU, f32/f64, outside the graph), rotated by RoPE with
/// tables `rope` = (cos, sin) [T, d] when given: `rope(split)` of the transposed copy, bit for bit.
pub fn split_heads(x: &Tensor, n: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    heads(x, Heads { n, split: true }, rope)
}

/// The inverse layout: x [B, n, T, d] as [B, T, n * d], rotated first when `rope` is given.
pub fn merge_heads(x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let n = x.dim(1)?;
    heads(x, Heads { n, split: false }, rope)
}

fn heads(x: &Tensor, op: Heads, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match rope {
        Some((c, s)) => x.apply_op3_no_bwd(&c.contiguous()?, &s.contiguous()?, &HeadsRope(op)),
        None => x.apply_op1_no_bwd(&op),
    }
}

// ---------------------------------------------------------------- Causal softmax

/// softmax(scale * s + causal mask) over the last dim of scores [.., R, T], where row r is the
/// query at position offset + r % t_q (grouped-query attention stacks the query heads of one
/// key/value head as rows, so keys and values are never repeated; `offset` > 0 when the keys
/// start with `offset` cached prompt positions).
struct CausalSoftmax {
    scale: f64,
    t_q: usize,
    offset: usize,
    /// Computed in f32 from f32 scores, written rounded to bf16 ([`causal_softmax_bf16`]).
    bf16_out: bool,
}
struct CausalSoftmaxBwd {
    scale: f64,
    /// The forward's row layout: only a row's first keys can have a probability.
    t_q: usize,
    offset: usize,
}

/// How many keys row `row` of a causal softmax sees (see [`CausalSoftmax`] for the layout).
#[inline(always)]
fn causal_len(row: usize, t_q: usize, offset: usize, t: usize) -> usize {
    (offset + row % t_q.max(1) + 1).min(t)
}

/// The causal softmax of one row: its first `n` scores `s` (times `scale`) normalized into
/// `p[..n]`, returned as written (the caller writes `p[n..]`).
#[inline(always)]
fn softmax_row<'a, T: Fl>(s: &[T], p: &'a mut [MaybeUninit<T>], n: usize, scale: T) -> &'a mut [T] {
    // max(s) * scale = max(s * scale) for a positive scale (rounding is monotone).
    let m = if scale > T::zero() {
        lane_max(&s[..n]) * scale
    } else {
        s[..n]
            .iter()
            .fold(T::neg_infinity(), |m, &v| Float::max(m, v * scale))
    };
    // Exponentials in one loop (it vectorizes), then the sum.
    for (p, &s) in p[..n].iter_mut().zip(&s[..n]) {
        p.write((s * scale - m).fast_exp());
    }
    // SAFETY: the row's n exponentials were just written.
    let p = unsafe { written(&mut p[..n]) };
    let inv = T::one() / lane_sum(p, p, T::zero(), |e, _| e);
    for v in p.iter_mut() {
        *v *= inv;
    }
    p
}

fn csm_fwd<T: Fl>(
    scale: f64,
    t_q: usize,
    offset: usize,
    ss: &CpuStorage,
    sl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let s = contig::<T>(ss, sl)?;
    let t = last_dim(sl);
    let scale = to_t::<T>(scale);
    let fill = |row: usize, p: &mut [MaybeUninit<T>]| {
        let s = &s[row * t..(row + 1) * t];
        wide(
            #[inline(always)]
            || {
                let n = causal_len(row, t_q, offset, t);
                softmax_row(s, p, n, scale);
                for p in &mut p[n..] {
                    p.write(T::zero());
                }
            },
        )
    };
    // SAFETY: rows of t, each written whole.
    let p = unsafe { par_out(s.len(), t, fill) };
    Ok(out(p, sl))
}

/// [`csm_fwd`] for f32 scores with the probabilities rounded to bf16: each row is computed in
/// an f32 row buffer, and rounded as it is written.
fn csm_fwd_bf16(
    scale: f64,
    t_q: usize,
    offset: usize,
    ss: &CpuStorage,
    sl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let s = contig::<f32>(ss, sl)?;
    let t = last_dim(sl);
    let scale = scale as f32;
    let fill = |row: usize, p: &mut [MaybeUninit<bf16>]| {
        let s = &s[row * t..(row + 1) * t];
        F32_ROW.with(|e| {
            let mut e = e.borrow_mut();
            e.resize(t, MaybeUninit::uninit());
            wide(
                #[inline(always)]
                || {
                    let n = causal_len(row, t_q, offset, t);
                    let probs = softmax_row(s, &mut e[..], n, scale);
                    for (p, &v) in p[..n].iter_mut().zip(probs.iter()) {
                        p.write(round_bf16(v));
                    }
                    for p in &mut p[n..] {
                        p.write(bf16::ZERO);
                    }
                },
            )
        })
    };
    // SAFETY: rows of t, each written whole.
    let p = unsafe { par_out(s.len(), t, fill) };
    Ok((CpuStorage::BF16(p), sl.shape().clone()))
}

thread_local! {
    /// One row of f32 values for the bf16-output softmax and its gradient.
    static F32_ROW: std::cell::RefCell<Vec<MaybeUninit<f32>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        if self.bf16_out {
            return csm_fwd_bf16(self.scale, self.t_q, self.offset, s, l);
        }
        by_dtype!(s, csm_fwd, self.scale, self.t_q, self.offset, s, l)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::causal_softmax(s, l, self.scale, self.t_q, self.offset)
    }
    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(
            &g.contiguous()?,
            &CausalSoftmaxBwd {
                scale: self.scale,
                t_q: self.t_q,
                offset: self.offset,
            },
        )?))
    }
}

/// [`csm_bwd`] for probabilities rounded to bf16 (and f32 `dp`): computed in f32 from the
/// rounded probabilities, the gradient rounded to bf16 as it is written (the operand of the
/// next two products).
fn csm_bwd_bf16(
    op: &CausalSoftmaxBwd,
    ps: &CpuStorage,
    pl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (p, g) = (contig::<bf16>(ps, pl)?, contig::<f32>(gs, gl)?);
    let t = last_dim(pl);
    let scale = op.scale as f32;
    let fill = |row: usize, ds: &mut [MaybeUninit<bf16>]| {
        let (p, g) = (&p[row * t..(row + 1) * t], &g[row * t..(row + 1) * t]);
        F32_ROW.with(|w| {
            let mut w = w.borrow_mut();
            w.resize(t, MaybeUninit::uninit());
            wide(
                #[inline(always)]
                || {
                    let n = causal_len(row, op.t_q, op.offset, t);
                    for (w, &p) in w[..n].iter_mut().zip(&p[..n]) {
                        w.write(p.to_f32());
                    }
                    // SAFETY: the row's n values were just written.
                    let w = unsafe { written(&mut w[..n]) };
                    let dot = lane_sum(w, &g[..n], 0.0f32, |p, g| p * g);
                    for (ds, (&p, &g)) in ds[..n].iter_mut().zip(w.iter().zip(g)) {
                        ds.write(round_bf16(scale * p * (g - dot)));
                    }
                    for ds in &mut ds[n..] {
                        ds.write(bf16::ZERO);
                    }
                },
            )
        })
    };
    // SAFETY: rows of t, each written whole.
    let ds = unsafe { par_out(p.len(), t, fill) };
    Ok((CpuStorage::BF16(ds), pl.shape().clone()))
}

// ds = scale * p (g - sum_j g_j p_j); masked entries have p = 0, so ds = 0 there and the sum
// runs over the keys the row sees.
fn csm_bwd<T: Fl>(
    op: &CausalSoftmaxBwd,
    ps: &CpuStorage,
    pl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (p, g) = (contig::<T>(ps, pl)?, contig::<T>(gs, gl)?);
    let t = last_dim(pl);
    let scale = to_t::<T>(op.scale);
    let fill = |row: usize, ds: &mut [MaybeUninit<T>]| {
        let (p, g) = (&p[row * t..(row + 1) * t], &g[row * t..(row + 1) * t]);
        wide(
            #[inline(always)]
            || {
                let n = causal_len(row, op.t_q, op.offset, t);
                let dot = lane_sum(&p[..n], &g[..n], T::zero(), |p, g| p * g);
                for (ds, (&p, &g)) in ds[..n].iter_mut().zip(p.iter().zip(g)) {
                    ds.write(scale * p * (g - dot));
                }
                for ds in &mut ds[n..] {
                    ds.write(T::zero());
                }
            },
        )
    };
    // SAFETY: rows of t, each written whole.
    let ds = unsafe { par_out(p.len(), t, fill) };
    Ok(out(ds, pl))
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        if let CpuStorage::BF16(_) = s1 {
            return csm_bwd_bf16(self, s1, l1, s2, l2);
        }
        by_dtype!(s1, csm_bwd, self, s1, l1, s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::causal_softmax_bwd(s1, l1, s2, l2, self.scale)
    }
}

/// softmax(scale * scores + causal mask) over the last dim, for queries at positions offset..
/// over keys at positions 0.. (`offset` > 0: the first keys are a cached prompt; see
/// [`CausalSoftmax`] for the row layout).
pub fn causal_softmax(scores: &Tensor, scale: f64, t_q: usize, offset: usize) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale,
        t_q,
        offset,
        bf16_out: false,
    })
}

/// [`causal_softmax`] of f32 scores on the CPU, computed in f32 and returned rounded to bf16 (no
/// graph: bf16-mode attention keeps these as its products' operand and computes its own
/// backward with [`causal_softmax_grad`], which then returns bf16 too).
pub fn causal_softmax_bf16(
    scores: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
) -> Result<Tensor> {
    if !scores.device().is_cpu() || scores.dtype() != DType::F32 {
        candle_core::bail!(
            "causal_softmax_bf16: f32 scores on the CPU expected, got {:?} on {:?}",
            scores.dtype(),
            scores.device()
        );
    }
    scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax {
        scale,
        t_q,
        offset,
        bf16_out: true,
    })
}

/// The gradient of the pre-scale scores from the probabilities `p` of
/// [`causal_softmax`]`(.., scale, t_q, offset)` and the probabilities' gradient `dp`:
/// scale * p (dp - sum_j dp_j p_j), zero where masked.
pub fn causal_softmax_grad(
    p: &Tensor,
    dp: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
) -> Result<Tensor> {
    p.contiguous()?
        .apply_op2_no_bwd(&dp.contiguous()?, &CausalSoftmaxBwd { scale, t_q, offset })
}

// ---------------------------------------------------------------- SwiGLU

/// Elements per parallel task of the element-wise ops.
const CHUNK: usize = 4096;

/// silu(g) * u.
struct SiluMul;
/// d/dg of silu(g) * u times the incoming gradient.
struct SiluMulBwdG;

#[inline(always)]
fn sigmoid<T: Fl>(x: T) -> T {
    T::one() / (T::one() + (-x).fast_exp())
}

/// f(a, b) element by element, in parallel chunks, for two operands of one length.
fn zip_map<T: Fl>(
    op: &str,
    (as_, al): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
    f: impl Fn(T, T) -> T + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (contig::<T>(as_, al)?, contig::<T>(bs, bl)?);
    if a.len() != b.len() {
        candle_core::bail!("{op}: {} and {} elements", a.len(), b.len());
    }
    let fill = |i: usize, y: &mut [MaybeUninit<T>]| {
        let r = i * CHUNK..i * CHUNK + y.len();
        let (a, b) = (&a[r.clone()], &b[r]);
        wide(
            #[inline(always)]
            || {
                for (y, (&a, &b)) in y.iter_mut().zip(a.iter().zip(b)) {
                    y.write(f(a, b));
                }
            },
        )
    };
    // SAFETY: each chunk's elements are written, from inputs of the output's length.
    let y = unsafe { par_out(a.len(), CHUNK, fill) };
    Ok(out(y, al))
}

fn silu_mul_fwd<T: Fl>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
) -> Result<(CpuStorage, Shape)> {
    zip_map(
        "fused silu-mul (gate, up)",
        (gs, gl),
        (us, ul),
        |g: T, u| g * sigmoid(g) * u,
    )
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, silu_mul_fwd, s1, l1, s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::binary("kt_silu_mul", s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = silu_mul_grads(g, u, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

fn silu_mul_bwd_g<T: Fl>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
    os: &CpuStorage,
    ol: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (g, u, o) = (
        contig::<T>(gs, gl)?,
        contig::<T>(us, ul)?,
        contig::<T>(os, ol)?,
    );
    if u.len() != g.len() || o.len() != g.len() {
        candle_core::bail!(
            "fused silu-mul backward: {} gate, {} up, {} gradient elements",
            g.len(),
            u.len(),
            o.len()
        );
    }
    let fill = |i: usize, dg: &mut [MaybeUninit<T>]| {
        let r = i * CHUNK..i * CHUNK + dg.len();
        let (g, u, o) = (&g[r.clone()], &u[r.clone()], &o[r]);
        wide(
            #[inline(always)]
            || {
                for (dg, ((&g, &u), &o)) in dg.iter_mut().zip(g.iter().zip(u).zip(o)) {
                    let s = sigmoid(g);
                    dg.write(o * u * s * (T::one() + g * (T::one() - s)));
                }
            },
        )
    };
    // SAFETY: each chunk's elements are written, from inputs of the output's length.
    let dg = unsafe { par_out(g.len(), CHUNK, fill) };
    Ok(out(dg, gl))
}

impl CustomOp3 for SiluMulBwdG {
    fn name(&self) -> &'static str {
        "fused-silu-mul-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, silu_mul_bwd_g, s1, l1, s2, l2, s3, l3)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::silu_mul_bwd_g(s1, l1, s2, l2, s3, l3)
    }
}

pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

/// dL/dg and dL/du of [`silu_mul`] for the output's gradient `grad`.
pub fn silu_mul_grads(g: &Tensor, u: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (g, u, grad) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
    let du = g.apply_op2_no_bwd(&grad, &SiluMul)?;
    let dg = g.apply_op3_no_bwd(&u, &grad, &SiluMulBwdG)?;
    Ok((dg, du))
}

// ---------------------------------------------------------------- Sum

/// a + b of one shape.
struct Add;

fn add_fwd<T: Fl>(
    as_: &CpuStorage,
    al: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    zip_map("fused add", (as_, al), (bs, bl), |a: T, b| a + b)
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "fused-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, add_fwd, s1, l1, s2, l2)
    }
}

/// a + b for tensors of one shape. Outside the graph (neither tracked) on the CPU this is one
/// parallel pass: the residual stream of passes without a gradient and the sums of a backward
/// by hand. candle's add took 0.054 s of a 1.45 s step on the real unit (KTO_TRAIN_PROFILE with
/// a phase around the residual adds), and this one ran the unit 1.07x faster (one epoch each,
/// alternated, two rounds). Otherwise candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op()
        || b.track_op()
        || !a.device().is_cpu()
        || !available(a)
        || a.dims() != b.dims()
        || a.dtype() != b.dtype()
    {
        return a + b;
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

// ---------------------------------------------------------------- Multiply by a constant

/// x * m for a constant m (dropout masks): no gradient tensor is made for m.
struct MulConst;

fn mul_fwd<T: Fl>(
    xs: &CpuStorage,
    xl: &Layout,
    ms: &CpuStorage,
    ml: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, m) = (contig::<T>(xs, xl)?, contig::<T>(ms, ml)?);
    Ok(out(x.iter().zip(m).map(|(a, b)| *a * *b).collect(), xl))
}

impl CustomOp2 for MulConst {
    fn name(&self) -> &'static str {
        "mul-const"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, mul_fwd, s1, l1, s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::binary("kt_mul", s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.contiguous()?.apply_op2_no_bwd(m, &MulConst)?), None))
    }
}

pub fn mul_const(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&m.contiguous()?, MulConst)
}

// ---------------------------------------------------------------- log_softmax + gather

/// log softmax(logits)[target] per row of logits [N, V], targets u32 [N]. The backward
/// recomputes the softmax from the logits instead of keeping [N, V] intermediates.
struct LogSoftmaxGather;
struct LogSoftmaxGatherBwd;

#[inline(always)]
fn lse<T: Fl>(row: &[T]) -> T {
    let m = lane_max(row);
    m + lane_sum(row, row, T::zero(), |v, _| (v - m).fast_exp()).ln()
}

fn lsg_fwd<T: Fl>(
    ls: &CpuStorage,
    ll: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, t) = (contig::<T>(ls, ll)?, contig::<u32>(ts, tl)?);
    let v = last_dim(ll);
    let n = t.len();
    // One row per chunk: a row is the whole vocabulary (196 KB at SmolLM2's).
    let fill = |i: usize, out: &mut [MaybeUninit<T>]| {
        let (row, k) = (&x[i * v..(i + 1) * v], t[i] as usize);
        out[0].write(wide(
            #[inline(always)]
            || row[k] - lse(row),
        ));
    };
    // SAFETY: each one-row chunk is written.
    let y = unsafe { par_out(n, 1, fill) };
    Ok((T::to_cpu_storage_owned(y), Shape::from(n)))
}

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, lsg_fwd, s1, l1, s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::log_softmax_gather(s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(x.apply_op3_no_bwd(t, &g.contiguous()?, &LogSoftmaxGatherBwd)?),
            None,
        ))
    }
}

// dx = g (onehot(target) - softmax(x))
fn lsg_bwd<T: Fl>(
    ls: &CpuStorage,
    ll: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, t, g) = (
        contig::<T>(ls, ll)?,
        contig::<u32>(ts, tl)?,
        contig::<T>(gs, gl)?,
    );
    let v = last_dim(ll);
    let fill = |i: usize, d: &mut [MaybeUninit<T>]| {
        let row = &x[i * v..(i + 1) * v];
        wide(
            #[inline(always)]
            || {
                let l = lse(row);
                for (d, &x) in d.iter_mut().zip(row) {
                    d.write(-g[i] * (x - l).fast_exp());
                }
                // SAFETY: the whole row was just written.
                let d = unsafe { written(d) };
                d[t[i] as usize] += g[i];
            },
        )
    };
    // SAFETY: rows of v, each written whole.
    let dx = unsafe { par_out(x.len(), v, fill) };
    Ok(out(dx, ll))
}

impl CustomOp3 for LogSoftmaxGatherBwd {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        by_dtype!(s1, lsg_bwd, s1, l1, s2, l2, s3, l3)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _p = crate::util::profile::phase(self.name());
        super::cuda::log_softmax_gather_bwd(s1, l1, s2, l2, s3, l3)
    }
}

pub fn log_softmax_gather(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, LogSoftmaxGather)
}

/// The gradient [`log_softmax_gather`]'s backward gives its logits for output gradient `g` [N]:
/// g (onehot(target) - softmax(logits)), for callers that recompute the logits themselves.
pub fn log_softmax_gather_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op3_no_bwd(
        &targets.contiguous()?,
        &g.contiguous()?,
        &LogSoftmaxGatherBwd,
    )
}

// ---------------------------------------------------------------- Dropout masks

/// Below `threshold` (p 2^32) a stream word drops its value; kept values are `keep` (1/(1-p)).
fn mask_params(p: f64) -> (u64, f32) {
    (
        (p * (u32::MAX as f64 + 1.0)) as u64,
        (1.0 / (1.0 - p)) as f32,
    )
}

/// `n` inverted-dropout values from the ChaCha8 stream of `seed`, one 32-bit word per value
/// (dropped when the word is below p * 2^32). Filled in parallel chunks, each seeking the stream
/// to its first word, so the values are those of one sequential pass (tested below). The CUDA
/// kernel (cuda/fused.cu) computes the same stream, so a mask is the same on every device.
pub fn dropout_mask_values(seed: u64, p: f64, n: usize) -> Vec<f32> {
    use rand::{RngCore, SeedableRng};
    const CHUNK: usize = 1 << 14;
    let (threshold, keep) = mask_params(p);
    let mut mask = vec![0f32; n];
    crate::util::parallel::for_each_chunk_mut(&mut mask, CHUNK, |c, out| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos((c * CHUNK) as u128);
        for v in out {
            *v = if (rng.next_u32() as u64) < threshold {
                0.0
            } else {
                keep
            };
        }
    });
    mask
}

/// The ChaCha8 key rand_chacha derives from `seed` (its 32-byte seed as little-endian words):
/// what the CUDA kernel needs to produce [`dropout_mask_values`]' stream.
pub fn dropout_mask_key(seed: u64) -> [u32; 8] {
    use rand::SeedableRng;
    let bytes = rand_chacha::ChaCha8Rng::seed_from_u64(seed).get_seed();
    std::array::from_fn(|i| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()))
}

/// The inverted-dropout mask of `shape` from `seed` with drop probability `p`, in `like`'s
/// dtype and on its device: drawn there by the CUDA kernel (no host-to-device copy), else on the
/// CPU. The values are the same either way.
pub fn dropout_mask(shape: (usize, usize), like: &Tensor, seed: u64, p: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if matches!(like.device(), candle_core::Device::Cuda(_)) && super::cuda::supports(like.dtype())
    {
        return like.apply_op1_no_bwd(&DropoutMask { seed, p, shape });
    }
    let mask = dropout_mask_values(seed, p, shape.0 * shape.1);
    Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())
}

/// Draws a mask on the device of the tensor it is applied to (whose values it ignores).
#[cfg(feature = "cuda")]
struct DropoutMask {
    seed: u64,
    p: f64,
    shape: (usize, usize),
}

#[cfg(feature = "cuda")]
impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("dropout-mask: the CPU draws masks with dropout_mask_values")
    }
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let _p = crate::util::profile::phase(self.name());
        let (threshold, keep) = mask_params(self.p);
        super::cuda::dropout_mask(
            s.device(),
            s.dtype(),
            dropout_mask_key(self.seed),
            threshold,
            keep,
            Shape::from(self.shape),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The parallel fill equals one sequential pass over the stream (two values per u64 draw,
    /// low half first), for sizes that split unevenly into chunks.
    #[test]
    fn parallel_masks_equal_one_sequential_pass() {
        for (seed, p, n) in [(7u64, 0.05, 1usize), (8, 0.05, 16_385), (9, 0.5, 100_003)] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let keep = (1.0 / (1.0 - p)) as f32;
            let threshold = (p * (u32::MAX as f64 + 1.0)) as u64;
            let mut want = Vec::with_capacity(n);
            while want.len() < n {
                let r: u64 = rng.random();
                for half in [r as u32, (r >> 32) as u32] {
                    if want.len() < n {
                        want.push(if (half as u64) < threshold { 0.0 } else { keep });
                    }
                }
            }
            assert_eq!(dropout_mask_values(seed, p, n), want, "seed {seed} n {n}");
        }
    }
}
