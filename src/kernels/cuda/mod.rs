//! The fused ops on CUDA: launches the kernels of `fused.cu` (compiled to PTX by build.rs with
//! the nvcc that candle's own kernels need) for the ops' `cuda_fwd`. The backward passes are the
//! same composition of ops as on the CPU, so each one's gradient kernel is another op here.
//!
//! Storage is f32 or bf16, arithmetic f32 (reductions in f32 over one block per row). The matrix
//! products around these ops stay on candle's cuBLAS. `fused.cu` is also run on the CPU by
//! tests/cuda_kernel_source.rs, with the launch geometry written here.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "kto_train_fused";
/// Threads per block: fused.cu's KT_BLOCK (its block reductions assume exactly this many).
const BLOCK: u32 = 256;

/// The storage types the kernels exist for, and their entry-point suffix.
trait Elem: CudaDType + DeviceRepr + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Whether the kernels cover `dtype`.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// The elements a contiguous layout addresses.
fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

fn rows_of(l: &Layout) -> usize {
    l.shape().elem_count() / last_dim(l).max(1)
}

fn row_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride kernels: enough blocks to fill the GPU, no more than the elements need.
fn element_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn output<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<T>(n) }
}

fn wrap<T: Elem>(slice: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> (CudaStorage, Shape) {
    (CudaStorage::wrap_cuda_slice(slice, dev.clone()), shape)
}

macro_rules! by_dtype {
    ($dtype:expr, $op:literal, $f:ident $(, $arg:expr)*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            d => candle_core::bail!("{}: no CUDA kernel for {d:?} (f32 and bf16 only)", $op),
        }
    };
}

/// Loads `$name` from the module (once per device) and launches it with `$args` in order.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let cfg: LaunchConfig = $cfg;
        // No rows, no work (and a grid of 0 blocks is a launch error).
        if cfg.grid_dim.0 > 0 {
            let f = $dev.get_or_load_custom_func(&$name, MODULE, PTX)?;
            let mut b = f.builder();
            $( b.arg($arg); )+
            // SAFETY: the arguments match the kernel's signature in fused.cu, and element
            // counts come from the layouts of the buffers passed.
            unsafe { b.launch(cfg) }.w()?;
        }
    }};
}

// ---------------------------------------------------------------- RMSNorm

pub fn rms_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        eps: f64,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (xv, wv) = (view::<T>(x, lx, "rms-norm")?, view::<T>(w, lw, "rms-norm")?);
        let y = output::<T>(dev, lx.shape().elem_count())?;
        let (h, eps) = (last_dim(lx) as u32, eps as f32);
        launch!(
            dev,
            format!("kt_rms_fwd_{}", T::SUFFIX),
            row_launch(rows_of(lx)),
            &xv,
            &wv,
            &y,
            &h,
            &eps
        );
        Ok(wrap(y, dev, lx.shape().clone()))
    }
    by_dtype!(x.dtype(), "rms-norm", go, x, lx, w, lw, eps)
}

#[allow(clippy::too_many_arguments)]
pub fn rms_bwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Elem>(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        eps: f64,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let op = "rms-norm-bwd";
        let (xv, wv, gv) = (
            view::<T>(x, lx, op)?,
            view::<T>(w, lw, op)?,
            view::<T>(g, lg, op)?,
        );
        let dx = output::<T>(dev, lx.shape().elem_count())?;
        let (h, eps) = (last_dim(lx) as u32, eps as f32);
        launch!(
            dev,
            format!("kt_rms_bwd_{}", T::SUFFIX),
            row_launch(rows_of(lx)),
            &xv,
            &wv,
            &gv,
            &dx,
            &h,
            &eps
        );
        Ok(wrap(dx, dev, lx.shape().clone()))
    }
    by_dtype!(x.dtype(), "rms-norm-bwd", go, x, lx, w, lw, g, lg, eps)
}

// ---------------------------------------------------------------- RoPE

pub fn rope(
    x: &CudaStorage,
    lx: &Layout,
    c: &CudaStorage,
    lc: &Layout,
    s: &CudaStorage,
    ls: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        x: &CudaStorage,
        lx: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let dims = lx.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let n = lx.shape().elem_count();
        if lc.shape().elem_count() < t * d || ls.shape().elem_count() < t * d {
            candle_core::bail!("rope: tables shorter than {t} positions x {d}");
        }
        let (xv, cv, sv) = (
            view::<T>(x, lx, "rope")?,
            view::<T>(c, lc, "rope")?,
            view::<T>(s, ls, "rope")?,
        );
        let y = output::<T>(dev, n)?;
        let (t32, d32, pairs) = (t as u32, d as u32, (n / 2) as u64);
        launch!(
            dev,
            format!("kt_rope_{}", T::SUFFIX),
            element_launch(n / 2),
            &xv,
            &cv,
            &sv,
            &y,
            &t32,
            &d32,
            &pairs
        );
        Ok(wrap(y, dev, lx.shape().clone()))
    }
    by_dtype!(x.dtype(), "rope", go, x, lx, c, lc, s, ls)
}

// ---------------------------------------------------------------- causal softmax

pub fn causal_softmax(
    s: &CudaStorage,
    l: &Layout,
    scale: f64,
    t_q: usize,
    offset: usize,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        s: &CudaStorage,
        l: &Layout,
        scale: f64,
        t_q: usize,
        offset: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let sv = view::<T>(s, l, "causal-softmax")?;
        let p = output::<T>(dev, l.shape().elem_count())?;
        let (t, t_q, offset, scale) = (
            last_dim(l) as u32,
            t_q.max(1) as u32,
            offset as u32,
            scale as f32,
        );
        launch!(
            dev,
            format!("kt_csm_fwd_{}", T::SUFFIX),
            row_launch(rows_of(l)),
            &sv,
            &p,
            &t,
            &t_q,
            &offset,
            &scale
        );
        Ok(wrap(p, dev, l.shape().clone()))
    }
    by_dtype!(s.dtype(), "causal-softmax", go, s, l, scale, t_q, offset)
}

pub fn causal_softmax_bwd(
    p: &CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        p: &CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        scale: f64,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = p.device();
        let op = "causal-softmax-bwd";
        let (pv, gv) = (view::<T>(p, lp, op)?, view::<T>(g, lg, op)?);
        let ds = output::<T>(dev, lp.shape().elem_count())?;
        let (t, scale) = (last_dim(lp) as u32, scale as f32);
        launch!(
            dev,
            format!("kt_csm_bwd_{}", T::SUFFIX),
            row_launch(rows_of(lp)),
            &pv,
            &gv,
            &ds,
            &t,
            &scale
        );
        Ok(wrap(ds, dev, lp.shape().clone()))
    }
    by_dtype!(p.dtype(), "causal-softmax-bwd", go, p, lp, g, lg, scale)
}

// ---------------------------------------------------------------- elementwise

/// `kt_silu_mul` / `kt_mul`: y = f(a, b) elementwise.
pub fn binary(
    kernel: &str,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        kernel: &str,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.device();
        let n = la.shape().elem_count();
        if lb.shape().elem_count() != n {
            candle_core::bail!(
                "{kernel}: operands of {n} and {} elements",
                lb.shape().elem_count()
            );
        }
        let (av, bv) = (view::<T>(a, la, kernel)?, view::<T>(b, lb, kernel)?);
        let y = output::<T>(dev, n)?;
        let n64 = n as u64;
        launch!(
            dev,
            format!("{kernel}_{}", T::SUFFIX),
            element_launch(n),
            &av,
            &bv,
            &y,
            &n64
        );
        Ok(wrap(y, dev, la.shape().clone()))
    }
    by_dtype!(a.dtype(), "elementwise", go, kernel, a, la, b, lb)
}

pub fn silu_mul_bwd_g(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
    o: &CudaStorage,
    lo: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        o: &CudaStorage,
        lo: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = g.device();
        let op = "silu-mul-bwd";
        let n = lg.shape().elem_count();
        if lu.shape().elem_count() != n || lo.shape().elem_count() != n {
            candle_core::bail!("{op}: operands of different sizes");
        }
        let (gv, uv, ov) = (
            view::<T>(g, lg, op)?,
            view::<T>(u, lu, op)?,
            view::<T>(o, lo, op)?,
        );
        let dg = output::<T>(dev, n)?;
        let n64 = n as u64;
        launch!(
            dev,
            format!("kt_silu_mul_bwd_{}", T::SUFFIX),
            element_launch(n),
            &gv,
            &uv,
            &ov,
            &dg,
            &n64
        );
        Ok(wrap(dg, dev, lg.shape().clone()))
    }
    by_dtype!(g.dtype(), "silu-mul-bwd", go, g, lg, u, lu, o, lo)
}

// ---------------------------------------------------------------- log-softmax + gather

pub fn log_softmax_gather(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let op = "log-softmax-gather";
        let rows = rows_of(lx);
        if lt.shape().elem_count() != rows {
            candle_core::bail!("{op}: {rows} rows and {} targets", lt.shape().elem_count());
        }
        let (xv, tv) = (view::<T>(x, lx, op)?, view::<u32>(t, lt, op)?);
        let y = output::<T>(dev, rows)?;
        let v = last_dim(lx) as u32;
        launch!(
            dev,
            format!("kt_lsg_fwd_{}", T::SUFFIX),
            row_launch(rows),
            &xv,
            &tv,
            &y,
            &v
        );
        Ok(wrap(y, dev, Shape::from(rows)))
    }
    by_dtype!(x.dtype(), "log-softmax-gather", go, x, lx, t, lt)
}

pub fn log_softmax_gather_bwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let op = "log-softmax-gather-bwd";
        let rows = rows_of(lx);
        if lt.shape().elem_count() != rows || lg.shape().elem_count() != rows {
            candle_core::bail!("{op}: {rows} rows, targets and gradients of other lengths");
        }
        let (xv, tv, gv) = (
            view::<T>(x, lx, op)?,
            view::<u32>(t, lt, op)?,
            view::<T>(g, lg, op)?,
        );
        let dx = output::<T>(dev, lx.shape().elem_count())?;
        let v = last_dim(lx) as u32;
        launch!(
            dev,
            format!("kt_lsg_bwd_{}", T::SUFFIX),
            row_launch(rows),
            &xv,
            &tv,
            &gv,
            &dx,
            &v
        );
        Ok(wrap(dx, dev, lx.shape().clone()))
    }
    by_dtype!(x.dtype(), "log-softmax-gather-bwd", go, x, lx, t, lt, g, lg)
}

// ---------------------------------------------------------------- dropout masks

/// A mask of `shape` (see `dropout_mask` in fused.cu): one thread per 16 values.
pub fn dropout_mask(
    dev: &CudaDevice,
    dtype: DType,
    key: [u32; 8],
    threshold: u64,
    keep: f32,
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Elem>(
        dev: &CudaDevice,
        key: [u32; 8],
        threshold: u64,
        keep: f32,
        shape: Shape,
    ) -> Result<(CudaStorage, Shape)> {
        let n = shape.elem_count();
        let key = dev.clone_htod(&key[..])?;
        let out = output::<T>(dev, n)?;
        let n64 = n as u64;
        launch!(
            dev,
            format!("kt_dropout_mask_{}", T::SUFFIX),
            element_launch(n.div_ceil(16)),
            &key,
            &threshold,
            &keep,
            &out,
            &n64
        );
        Ok(wrap(out, dev, shape))
    }
    by_dtype!(dtype, "dropout-mask", go, dev, key, threshold, keep, shape)
}
