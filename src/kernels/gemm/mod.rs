//! Matrix products at the hardware's speed: a runtime-loaded oneDNN or MKL behind the `fast-gemm`
//! cargo feature, with candle's own GEMM as the fallback.
//!
//! The frozen-weight products are most of a training step's FLOPs. On the 2-core AVX-512 (Zen 5)
//! machines here, at the model's shapes, oneDNN's f32 GEMM runs about 1.9x and its bf16 GEMM
//! (f32 accumulation) about 3-4x candle's (benches/gemm.rs). Linking either library would make
//! the build need something outside crates.io, so it is opened at run time (`dlopen`), found
//! through `KTO_TRAIN_BLAS` or the usual pip install locations (search order in `loader.rs`), and
//! everything falls back to candle, with a one-time notice, when none is found.
//!
//! Precision is chosen by [`GemmMode`], which the model carries (from `train.gemm`, or
//! `KTO_TRAIN_GEMM=f32|bf16|candle` when that is `auto`: [`resolve`]); every op takes it
//! explicitly, so a forward and its backward always agree. Without the feature every mode runs
//! candle's GEMM. `KTO_TRAIN_GEMM_VERBOSE=1` prints which library was loaded.
use crate::config::GemmSetting;
use candle_core::{bail, CpuStorage, Result, Tensor, TensorId};
use half::bf16;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(feature = "fast-gemm")]
mod loader;

/// How the frozen-weight products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmMode {
    /// candle's own GEMM (f32), as without the feature.
    Candle,
    /// The fast library's f32 GEMM: same precision as candle (only the summation order differs).
    F32,
    /// bf16 operands, f32 accumulation and f32 output. The frozen weight is rounded to bf16 once
    /// and cached; the activation (or the incoming gradient, in the backward) is rounded at each
    /// call. LoRA weights, optimizer state and the loss head stay f32.
    Bf16,
}

impl GemmMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GemmMode::Candle => "candle",
            GemmMode::F32 => "f32",
            GemmMode::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for GemmMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "candle" => Ok(GemmMode::Candle),
            "f32" | "fp32" => Ok(GemmMode::F32),
            "bf16" => Ok(GemmMode::Bf16),
            other => Err(format!(
                "unknown GEMM mode {other:?}: expected candle, f32 or bf16"
            )),
        }
    }
}

impl std::fmt::Display for GemmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Environment variable that selects the mode (`candle`, `f32`, `bf16`).
pub const MODE_ENV: &str = "KTO_TRAIN_GEMM";
/// Environment variable naming the library to load (a path to `libdnnl.so.*` or `libmkl_rt.so.*`).
pub const LIBRARY_ENV: &str = "KTO_TRAIN_BLAS";

/// The mode a `train.gemm` setting asks for: `auto` = `$KTO_TRAIN_GEMM`, else `f32` with the
/// feature (a pure speed-up with candle's precision) and `candle` without it.
pub(crate) fn requested_mode(setting: GemmSetting) -> GemmMode {
    let default = if cfg!(feature = "fast-gemm") {
        GemmMode::F32
    } else {
        GemmMode::Candle
    };
    match setting {
        GemmSetting::Candle => GemmMode::Candle,
        GemmSetting::F32 => GemmMode::F32,
        GemmSetting::Bf16 => GemmMode::Bf16,
        GemmSetting::Auto => match std::env::var(MODE_ENV) {
            Ok(v) => v.parse().unwrap_or_else(|e| {
                eprintln!("kto-train: {MODE_ENV}: {e}; using {default}");
                default
            }),
            Err(_) => default,
        },
    }
}

/// The mode that runs for `setting` on this machine: [`requested_mode`], or `candle` when no
/// fast library can be loaded.
pub fn resolve(setting: GemmSetting) -> GemmMode {
    effective_mode(requested_mode(setting))
}

/// The mode that will actually run for `requested`: `Candle` when no fast library is loaded.
pub fn effective_mode(requested: GemmMode) -> GemmMode {
    if requested == GemmMode::Candle {
        return GemmMode::Candle;
    }
    if available() {
        requested
    } else {
        notice_fallback(requested);
        GemmMode::Candle
    }
}

fn notice_fallback(requested: GemmMode) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if cfg!(feature = "fast-gemm") {
            eprintln!(
                "kto-train: GEMM mode {requested} asked for, but no oneDNN or MKL library was \
                 found ({}); using candle's GEMM. Install one with `python3 -m pip install \
                 onednn==2026.1.0` (or `mkl==2026.2.0`), or point {LIBRARY_ENV} at \
                 libdnnl.so.3 / libmkl_rt.so.3.",
                load_error().unwrap_or("not searched")
            );
        } else if std::env::var_os(MODE_ENV).is_some() {
            eprintln!(
                "kto-train: {MODE_ENV}={requested} has no effect: this build lacks the \
                 `fast-gemm` feature; using candle's GEMM."
            );
        }
    });
}

/// Whether a fast library is loaded (loads it on first call).
pub fn available() -> bool {
    backend().is_some()
}

/// What was loaded, e.g. `oneDNN (/usr/lib/.../libdnnl.so.3)`; `None` without one.
pub fn backend_name() -> Option<String> {
    backend().map(|b| b.describe())
}

/// Why no library was loaded, when none was.
pub fn load_error() -> Option<&'static str> {
    #[cfg(feature = "fast-gemm")]
    {
        loader::get().as_ref().err().map(|s| s.as_str())
    }
    #[cfg(not(feature = "fast-gemm"))]
    {
        Some("built without the fast-gemm feature")
    }
}

#[cfg(feature = "fast-gemm")]
fn backend() -> Option<&'static loader::Backend> {
    loader::get().as_ref().ok()
}

#[cfg(not(feature = "fast-gemm"))]
fn backend() -> Option<&'static NoBackend> {
    None
}

#[cfg(not(feature = "fast-gemm"))]
enum NoBackend {}

#[cfg(not(feature = "fast-gemm"))]
impl NoBackend {
    fn describe(&self) -> String {
        match *self {}
    }
}

/// A row-major matrix operand as BLAS sees it: `data[offset..]`, leading dimension `ld`, and
/// whether the product uses its transpose.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub trans: bool,
    pub ld: usize,
}

fn check_operand<T>(what: &str, m: &MatRef<'_, T>, rows: usize, cols: usize) -> Result<()> {
    // op(M) is rows x cols; stored (row-major) as rows x cols, or cols x rows when transposed.
    let (sr, sc) = if m.trans { (cols, rows) } else { (rows, cols) };
    if sr == 0 || sc == 0 {
        return Ok(());
    }
    if m.ld < sc.max(1) || m.data.len() < (sr - 1) * m.ld + sc {
        bail!(
            "gemm: operand {what} too small: {sr}x{sc} with ld {} in {} elements",
            m.ld,
            m.data.len()
        );
    }
    Ok(())
}

fn check_dims(m: usize, n: usize, k: usize) -> Result<()> {
    // Both libraries take 32-bit (MKL lp64) or 64-bit sizes; keep to what both accept.
    let max = i32::MAX as usize;
    if m > max || n > max || k > max {
        bail!("gemm: dimensions {m}x{n}x{k} exceed the BLAS integer range");
    }
    Ok(())
}

/// The operand type of a product: f32 (sgemm) or bf16 (bf16 x bf16 -> f32).
trait Operand: Copy {
    /// # Safety
    /// The operands were checked by [`check`]; `c` has room for m * n values.
    unsafe fn run(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        c: *mut f32,
    ) -> Result<()>;
}

impl Operand for f32 {
    unsafe fn run(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        c: *mut f32,
    ) -> Result<()> {
        let Some(be) = backend() else {
            bail!("gemm: no fast GEMM library loaded");
        };
        #[cfg(feature = "fast-gemm")]
        {
            be.sgemm(m, n, k, a, b, 0.0, c)
        }
        #[cfg(not(feature = "fast-gemm"))]
        {
            let _ = (m, n, k, a, b, c);
            match *be {}
        }
    }
}

impl Operand for bf16 {
    unsafe fn run(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        c: *mut f32,
    ) -> Result<()> {
        let Some(be) = backend() else {
            bail!("gemm: no fast GEMM library loaded");
        };
        #[cfg(feature = "fast-gemm")]
        {
            be.gemm_bf16(m, n, k, a, b, c)
        }
        #[cfg(not(feature = "fast-gemm"))]
        {
            let _ = (m, n, k, a, b, c);
            match *be {}
        }
    }
}

fn check<T>(m: usize, n: usize, k: usize, a: &MatRef<'_, T>, b: &MatRef<'_, T>) -> Result<()> {
    check_dims(m, n, k)?;
    check_operand("a", a, m, k)?;
    check_operand("b", b, k, n)
}

/// The operands and the output buffer fit (m, n, k); false when the output is empty.
fn check_into<T>(
    m: usize,
    n: usize,
    k: usize,
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
    c: &[f32],
) -> Result<bool> {
    check(m, n, k, a, b)?;
    if c.len() < m * n {
        bail!("gemm: output too small");
    }
    Ok(m > 0 && n > 0)
}

fn product_into<T: Operand>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut [f32],
) -> Result<()> {
    if !check_into(m, n, k, &a, &b, c)? {
        return Ok(());
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return Ok(());
    }
    // SAFETY: checked above.
    unsafe { T::run(m, n, k, a, b, c.as_mut_ptr()) }
}

fn product_new<T: Operand>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
) -> Result<Vec<f32>> {
    check(m, n, k, &a, &b)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    // With beta = 0 BLAS never reads C, so the output need not be zeroed first (a memset of
    // every output, or a page fault storm for fresh pages, saved).
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: checked above; the capacity is m * n; on success every element was written.
    unsafe {
        T::run(m, n, k, a, b, c.spare_capacity_mut().as_mut_ptr().cast())?;
        c.set_len(m * n);
    }
    Ok(c)
}

/// `c[m, n] = op(a)[m, k] @ op(b)[k, n]` in f32 with the loaded library (`c` row-major, dense,
/// overwritten). Errors when no library is loaded.
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    c: &mut [f32],
) -> Result<()> {
    product_into(m, n, k, a, b, c)
}

/// `c[m, n] += op(a)[m, k] @ op(b)[k, n]` in f32 with the loaded library (BLAS beta = 1).
pub(crate) fn sgemm_accumulate(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    c: &mut [f32],
) -> Result<()> {
    if !check_into(m, n, k, &a, &b, c)? || k == 0 {
        return Ok(());
    }
    let Some(be) = backend() else {
        bail!("gemm: no fast GEMM library loaded");
    };
    #[cfg(feature = "fast-gemm")]
    {
        // SAFETY: the operands and `c` (initialized: beta = 1 reads it) were checked against
        // (m, n, k) above.
        unsafe { be.sgemm(m, n, k, a, b, 1.0, c.as_mut_ptr()) }
    }
    #[cfg(not(feature = "fast-gemm"))]
    {
        let _ = (a, b);
        match *be {}
    }
}

/// [`sgemm`] into a new dense row-major [m, n] vector.
pub(crate) fn sgemm_new(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
) -> Result<Vec<f32>> {
    product_new(m, n, k, a, b)
}

/// `c[m, n] = op(a) @ op(b)` with bf16 operands, f32 accumulation and f32 output.
pub fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    c: &mut [f32],
) -> Result<()> {
    product_into(m, n, k, a, b, c)
}

/// [`gemm_bf16`] into a new dense row-major [m, n] vector.
pub(crate) fn gemm_bf16_new(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
) -> Result<Vec<f32>> {
    product_new(m, n, k, a, b)
}

/// Round-to-nearest-even f32 -> bf16 of one value (NaN stays NaN), the rounding torch and the
/// hardware's `vcvtneps2bf16` use.
#[inline(always)]
pub fn round_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    let r = if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
    };
    bf16::from_bits(r as u16)
}

#[inline(always)]
fn convert_chunk(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = round_bf16(*s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn convert_chunk_avx512(src: &[f32], dst: &mut [bf16]) {
    // Same code: the target feature lets the compiler vectorize it 16 lanes wide.
    convert_chunk(src, dst)
}

fn convert_serial(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the required CPU features were just detected.
            unsafe { convert_chunk_avx512(src, dst) };
            return;
        }
    }
    convert_chunk(src, dst)
}

/// Rounds `src` into `dst` (same length), on all cores for large inputs.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    use rayon::prelude::*;
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: length mismatch");
    // Large enough that splitting pays for waking the pool.
    const CHUNK: usize = 1 << 16;
    if src.len() <= CHUNK {
        convert_serial(src, dst);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| convert_serial(s, d));
    }
}

/// A frozen weight [rows, cols] rounded to bf16, dense row-major.
#[derive(Debug)]
pub struct Bf16Matrix {
    pub data: Vec<bf16>,
    pub rows: usize,
    pub cols: usize,
}

impl Bf16Matrix {
    pub fn from_tensor(w: &Tensor) -> Result<Bf16Matrix> {
        let (rows, cols) = w.dims2()?;
        let mut data = vec![bf16::ZERO; rows * cols];
        {
            // Read a contiguous f32 CPU weight in place: a copy of every weight would cost as
            // much as the rounding (1.4 GB for SmolLM2-360M).
            let (storage, layout) = w.storage_and_layout();
            if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
                (&*storage, layout.contiguous_offsets())
            {
                f32_to_bf16(&v[a..b], &mut data);
                return Ok(Bf16Matrix { data, rows, cols });
            }
        }
        let w = w.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let src = w.flatten_all()?.to_vec1::<f32>()?;
        f32_to_bf16(&src, &mut data);
        Ok(Bf16Matrix { data, rows, cols })
    }

    fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// bf16 copies of frozen weights, keyed by the weight tensor's id. Tensor ids are never reused
/// and frozen weights are never written in place, so an entry cannot go stale; what can happen
/// is that a dropped model leaves its copies behind, so the cache is bounded (oldest out first)
/// and [`clear_bf16_cache`] empties it.
struct WeightCache {
    map: HashMap<TensorId, Arc<Bf16Matrix>>,
    order: VecDeque<TensorId>,
    bytes: usize,
}

static CACHE: Mutex<Option<WeightCache>> = Mutex::new(None);

/// Byte bound of the bf16 weight cache: `KTO_TRAIN_BF16_CACHE_MB`, else 8 GiB (a 4B-parameter
/// model's weights in bf16; SmolLM2-360M needs 0.7 GiB).
fn cache_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var("KTO_TRAIN_BF16_CACHE_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|mb| mb << 20)
            .unwrap_or(8 << 30)
    })
}

/// The bf16 copy of `w` [n, k], made on first use and cached by tensor id: `frozen_linear` is
/// called with the same weight tensor at every step, so each weight is converted once.
pub fn bf16_weight(w: &Tensor) -> Result<Arc<Bf16Matrix>> {
    let id = w.id();
    if let Some(hit) = CACHE
        .lock()
        .expect("bf16 cache poisoned")
        .as_ref()
        .and_then(|c| c.map.get(&id).cloned())
    {
        return Ok(hit);
    }
    // Convert outside the lock: other threads may use other weights meanwhile.
    let m = Arc::new(Bf16Matrix::from_tensor(w)?);
    let mut guard = CACHE.lock().expect("bf16 cache poisoned");
    let cache = guard.get_or_insert_with(|| WeightCache {
        map: HashMap::new(),
        order: VecDeque::new(),
        bytes: 0,
    });
    if let Some(hit) = cache.map.get(&id) {
        return Ok(hit.clone());
    }
    let budget = cache_budget();
    while cache.bytes + m.bytes() > budget {
        let Some(old) = cache.order.pop_front() else {
            break;
        };
        if let Some(e) = cache.map.remove(&old) {
            cache.bytes -= e.bytes();
        }
    }
    cache.bytes += m.bytes();
    cache.order.push_back(id);
    cache.map.insert(id, m.clone());
    Ok(m)
}

/// Drops every cached bf16 weight (e.g. after dropping a model in a long-lived process).
pub fn clear_bf16_cache() {
    *CACHE.lock().expect("bf16 cache poisoned") = None;
}

/// Bytes held by the bf16 weight cache.
pub fn bf16_cache_bytes() -> usize {
    CACHE
        .lock()
        .expect("bf16 cache poisoned")
        .as_ref()
        .map_or(0, |c| c.bytes)
}
