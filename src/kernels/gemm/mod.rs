//! Matrix products at the hardware's speed: gemmkit (pure Rust, from crates.io) in every build,
//! a runtime-loaded oneDNN or MKL behind the `fast-gemm` cargo feature, and candle's own GEMM on
//! request.
//!
//! The frozen-weight products are most of a training step's FLOPs. On the 2-core AVX-512 (Zen 5)
//! machines here, at the model's shapes, gemmkit's f32 GEMM runs about 2x candle's and its bf16
//! GEMM (f32 accumulation) about 4x (benches/gemm.rs), so the default build needs nothing
//! installed to be fast ([`native`]). oneDNN and MKL stay available: linking either would make
//! the build need something outside crates.io, so they are opened at run time (`dlopen`) in a
//! `fast-gemm` build, found through `KTO_TRAIN_BLAS` or the usual pip install locations (search
//! order in `loader.rs`); `KTO_TRAIN_GEMM_ENGINE=gemmkit` keeps gemmkit in such a build.
//!
//! Precision is chosen by [`GemmMode`], which the model carries (from `train.gemm`, or
//! `KTO_TRAIN_GEMM=f32|bf16|candle` when that is `auto`: [`resolve`]); every op takes it
//! explicitly, so a forward and its backward always agree. `KTO_TRAIN_GEMM_VERBOSE=1` prints which
//! engine runs.
use crate::config::GemmSetting;
use crate::util::env::MibSetting;
use crate::util::profile;
use candle_core::{bail, CpuStorage, Result, Tensor, TensorId};
use half::bf16;
use std::collections::{HashMap, VecDeque};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(feature = "fast-gemm")]
mod loader;
mod native;
mod small;

/// How the frozen-weight products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmMode {
    /// candle's own GEMM (f32).
    Candle,
    /// The fast engine's f32 GEMM: same precision as candle (only the summation order differs).
    F32,
    /// bf16 operands, f32 accumulation, f32 values between products. The frozen weight is
    /// rounded to bf16 once and cached; the activation (or the incoming gradient, in the
    /// backward) is rounded at each call. LoRA weights, optimizer state and the loss head stay
    /// f32.
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
/// Environment variable that picks the engine: `gemmkit` or `library` (see [`engine`]).
pub const ENGINE_ENV: &str = "KTO_TRAIN_GEMM_ENGINE";

/// The mode a `train.gemm` setting asks for: `auto` = `$KTO_TRAIN_GEMM`, else bf16 operands
/// with f32 accumulation where the CPU multiplies bf16 natively (AMX, AVX-512 BF16; TRL's
/// default precision is bf16 too), f32 elsewhere.
pub(crate) fn requested_mode(setting: GemmSetting) -> GemmMode {
    let default = if native::bf16_native() {
        GemmMode::Bf16
    } else {
        GemmMode::F32
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

/// The mode that runs for `setting` on this machine ([`requested_mode`]).
pub fn resolve(setting: GemmSetting) -> GemmMode {
    effective_mode(requested_mode(setting))
}

/// The mode that will actually run for `requested`: every mode has an engine in every build
/// (gemmkit when no library is loaded), so this is `requested`; it prints, once, which engine
/// that is when `KTO_TRAIN_GEMM_VERBOSE` is set or a requested library failed to load.
pub fn effective_mode(requested: GemmMode) -> GemmMode {
    if requested != GemmMode::Candle {
        notice_engine();
    }
    requested
}

fn notice_engine() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let verbose = std::env::var_os("KTO_TRAIN_GEMM_VERBOSE").is_some();
        if let (Some(err), true) = (
            load_error(),
            cfg!(feature = "fast-gemm") && !gemmkit_forced(),
        ) {
            eprintln!(
                "kto-train: no oneDNN or MKL library was found ({err}); the products run on \
                 gemmkit (pure Rust), which is as fast in f32. Install one with `python3 -m pip \
                 install onednn==2026.1.0`, or point {LIBRARY_ENV} at libdnnl.so.3 / \
                 libmkl_rt.so.3."
            );
        } else if verbose {
            eprintln!("kto-train: matrix products: {}", engine_name());
        }
    });
}

/// One line for the start of a run: which engine and precision run the products, and what the
/// other precision would give (measured back to back on the real-data unit of
/// scripts/bench-vs-trl.sh, Intel Xeon with AMX, 2 cores: candle 0.184, f32 0.279, bf16 0.413
/// examples/s; on a CPU without native bf16 products, below).
pub fn startup_line(mode: GemmMode) -> String {
    let bf16_kernel = native::bf16_kernel_name();
    match mode {
        GemmMode::Candle => {
            // Real-data unit, one epoch each, 2-core Intel Xeon with AMX: candle 0.503, f32
            // 0.721, bf16 1.877 examples/s.
            "matrix products: candle's GEMM (train.gemm = \"candle\"); the default \
             f32 products ran 1.4x faster per step on real data, bf16 3.7x (AMX CPU)"
                .to_string()
        }
        GemmMode::F32 if native::bf16_native() => format!(
            "matrix products: f32 on {}; train.gemm = \"bf16\" (bf16 operands, f32 accumulation, \
             {bf16_kernel} here) ran 2.6x faster per step on real data (scripts/bench-vs-trl.sh, AMX)",
            engine_name()
        ),
        // Measured back to back on a 2-core AMD Zen 3 (AVX2): bf16 0.14, f32 0.247 examples/s.
        GemmMode::F32 => format!(
            "matrix products: f32 on {}; train.gemm = \"bf16\" would widen bf16 operands to \
             f32 here (no AMX or AVX-512 BF16): 0.57x the speed per step on real data on an AVX2 \
             CPU (scripts/bench-vs-trl.sh)",
            engine_name()
        ),
        GemmMode::Bf16 => {
            let engine = if library().is_some() {
                engine_name()
            } else {
                "the built-in kernel".to_string()
            };
            let other = if library().is_some() || native::bf16_native() {
                "2.6x slower per step on real data on an AMX CPU"
            } else {
                "1.76x faster per step on real data on an AVX2 CPU, where bf16 is widened"
            };
            // Measured back to back on the real-data unit, 2-core Intel Xeon with AMX, one epoch
            // each: the built-in kernels 1.877, a `fast-gemm` build on oneDNN 3.13 1.683
            // examples/s (f32 0.721, candle 0.503). oneDNN led until the built-in small-product
            // kernel and the parallel loops that the main thread joins (util::parallel).
            let library_note = if library().is_some() && native::packs_rhs() {
                "; the built-in kernels (KTO_TRAIN_GEMM_ENGINE=gemmkit) ran 1.1x faster on real \
                 data on an AMX CPU"
            } else {
                ""
            };
            format!(
                "matrix products: bf16 operands, f32 accumulation, on {engine} ({bf16_kernel}); \
                 train.gemm = \"f32\" keeps f32 operands ({other}, scripts/bench-vs-trl.sh)\
                 {library_note}"
            )
        }
    }
}

/// What runs the products on this machine, for `--version`: the f32 engine and the bf16 kernel.
pub fn machine_summary() -> String {
    let bf16 = if library().is_some() {
        engine_name()
    } else {
        format!("the built-in kernel ({})", native::bf16_kernel_name())
    };
    format!("f32 on {}, bf16 on {bf16}", engine_name())
}

/// Which code runs the f32 and bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// gemmkit and our AVX-512 BF16 kernel ([`native`]): in every build.
    Native,
    /// oneDNN or MKL, in a `fast-gemm` build when one loads (else [`Engine::Native`] runs).
    Library,
}

/// 0: not chosen yet, 1: native, 2: library.
static ENGINE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The engine asked for: [`set_engine`], else `$KTO_TRAIN_GEMM_ENGINE` (`gemmkit` or `library`),
/// else the library in a `fast-gemm` build (the reason to build it) and native otherwise.
pub fn engine() -> Engine {
    use std::sync::atomic::Ordering;
    match ENGINE.load(Ordering::Relaxed) {
        1 => Engine::Native,
        2 => Engine::Library,
        _ => {
            let e = match std::env::var(ENGINE_ENV) {
                Ok(v) if v.trim().eq_ignore_ascii_case("gemmkit") => Engine::Native,
                Ok(v) if v.trim().eq_ignore_ascii_case("library") => Engine::Library,
                Ok(v) => {
                    eprintln!("kto-train: {ENGINE_ENV}={v:?}: expected gemmkit or library");
                    default_engine()
                }
                Err(_) => default_engine(),
            };
            set_engine(e);
            e
        }
    }
}

fn default_engine() -> Engine {
    if cfg!(feature = "fast-gemm") {
        Engine::Library
    } else {
        Engine::Native
    }
}

/// Chooses the engine for the whole process (benches compare them in one run).
pub fn set_engine(e: Engine) {
    let v = match e {
        Engine::Native => 1,
        Engine::Library => 2,
    };
    ENGINE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Turns the f32 kernel for products with a small side (LoRA, attention; `small.rs`) on or off
/// for the whole process, where the CPU has it (benches compare it with gemmkit alone).
pub fn set_small_kernel(on: bool) {
    small::set_enabled(on);
}

fn gemmkit_forced() -> bool {
    engine() == Engine::Native
}

/// What runs the f32 and bf16 products, e.g. `gemmkit 0.1.2 (pure Rust)` or
/// `oneDNN 3.x (/usr/lib/.../libdnnl.so.3)`.
pub fn engine_name() -> String {
    match library() {
        Some(b) => b.describe(),
        None if small::active() => {
            "gemmkit 0.1.2 (pure Rust; products with a side of 64 or less on the built-in \
             AVX-512 kernel)"
                .to_string()
        }
        None => "gemmkit 0.1.2 (pure Rust)".to_string(),
    }
}

/// Why no optional library was loaded, when none was.
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

/// The optional library that runs the products, when this build has one, it loaded and gemmkit
/// is not forced.
#[cfg(feature = "fast-gemm")]
fn library() -> Option<&'static loader::Backend> {
    if gemmkit_forced() {
        return None;
    }
    loader::get().as_ref().ok()
}

#[cfg(not(feature = "fast-gemm"))]
fn library() -> Option<&'static NoBackend> {
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

/// Where attention's causal mask makes a product's entries or terms zero, so that a kernel may
/// skip them (src/kernels/gemm/small.rs does; the others compute everything, which gives the
/// same values). The query rows are heads stacked in blocks of `t_q`: row r sits at position
/// `offset + r % t_q` and sees the keys up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causal {
    /// C [query rows, keys] (the scores, their gradient): the entries past a row's position are
    /// never read; a kernel may write zeros there.
    Scores { t_q: usize, offset: usize },
    /// C = op(A) [query rows, keys] @ op(B) [keys, ..] (P v, dS k): A is zero past each row's
    /// position.
    RowsByKeys { t_q: usize, offset: usize },
    /// C = op(A) [keys, query rows] @ op(B) [query rows, ..] (P^T dO, dS^T q): A is zero where
    /// the query row's position is before the key.
    KeysByRows { t_q: usize, offset: usize },
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
        causal: Option<Causal>,
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
        causal: Option<Causal>,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { engine_sgemm(m, n, k, a, b, 0.0, c, causal) }
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
        // The tile kernels compute every entry (what the mask zeroes is zero or unread anyway).
        _causal: Option<Causal>,
    ) -> Result<()> {
        // SAFETY (both arms): the caller's contract.
        match library() {
            #[cfg(feature = "fast-gemm")]
            Some(be) => unsafe { be.gemm_bf16(m, n, k, a, b, c) },
            #[cfg(not(feature = "fast-gemm"))]
            Some(be) => match *be {},
            None => {
                unsafe { native::gemm_bf16(m, n, k, a, b, c) };
                Ok(())
            }
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
    // SAFETY: f32 and MaybeUninit<f32> share their layout, and only f32 values are written.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    product_uninit(m, n, k, a, b, c, None)
}

/// The product into `c[..m * n]`, which need not be initialized: on success every one of its
/// values was written. With beta = 0 BLAS never reads C, so outputs need not be zeroed first (a
/// memset of every output, or a page-fault storm for fresh pages, saved).
fn product_uninit<T: Operand>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut [MaybeUninit<f32>],
    causal: Option<Causal>,
) -> Result<()> {
    check(m, n, k, &a, &b)?;
    if c.len() < m * n {
        bail!("gemm: output too small");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c[..m * n].fill(MaybeUninit::new(0.0));
        return Ok(());
    }
    // SAFETY: the operands were checked against (m, n, k) and `c` holds m * n values.
    profile::gemm(m, n, k, || unsafe {
        T::run(m, n, k, a, b, c.as_mut_ptr().cast(), causal)
    })
}

fn product_new<T: Operand>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
) -> Result<Vec<f32>> {
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    product_uninit(m, n, k, a, b, c.spare_capacity_mut(), None)?;
    // SAFETY: on success the product wrote all m * n values.
    unsafe { c.set_len(m * n) };
    Ok(c)
}

/// [`sgemm`] into `c[..m * n]`, which need not be initialized (all of it is written on success).
/// With `causal`, the kernel may skip what attention's causal mask zeroes (see [`Causal`]).
pub(crate) fn sgemm_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    c: &mut [MaybeUninit<f32>],
    causal: Option<Causal>,
) -> Result<()> {
    product_uninit(m, n, k, a, b, c, causal)
}

/// [`gemm_bf16`] into `c[..m * n]`, which need not be initialized.
pub(crate) fn gemm_bf16_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    c: &mut [MaybeUninit<f32>],
) -> Result<()> {
    product_uninit(m, n, k, a, b, c, None)
}

/// `c[m, n] = op(a)[m, k] @ op(b)[k, n]` in f32 with the fast engine (`c` row-major, dense,
/// overwritten).
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

/// `c[m, n] += op(a)[m, k] @ op(b)[k, n]` in f32 (BLAS beta = 1).
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
    // SAFETY (both arms): the operands and `c` (initialized: beta = 1 reads it) were checked
    // against (m, n, k) above.
    profile::gemm(m, n, k, || unsafe {
        engine_sgemm(m, n, k, a, b, 1.0, c.as_mut_ptr(), None)
    })
}

/// `c = op(a) @ op(b) + beta * c` in f32 on the engine in use (the library, else gemmkit).
///
/// # Safety
/// The operands were checked against (m, n, k); `c` holds m * n values, initialized when
/// `beta` is not 0.
#[allow(clippy::too_many_arguments)]
unsafe fn engine_sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    beta: f32,
    c: *mut f32,
    causal: Option<Causal>,
) -> Result<()> {
    // SAFETY (both arms): the caller's contract.
    match library() {
        #[cfg(feature = "fast-gemm")]
        Some(be) => unsafe { be.sgemm(m, n, k, a, b, beta, c) },
        #[cfg(not(feature = "fast-gemm"))]
        Some(be) => match *be {},
        None => {
            unsafe { native::sgemm(m, n, k, a, b, beta, c, causal) };
            Ok(())
        }
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

/// A frozen weight packed for the tile kernel, in one orientation.
pub use native::PackedB;

/// Whether bf16 products of frozen weights use packed copies ([`packed_weight`]) here, so that
/// the plain bf16 copy need not be kept.
pub fn packs_weights() -> bool {
    library().is_none() && native::packs_rhs()
}

/// Packed copies of frozen weights, keyed by (tensor id, transposed): the forward product uses
/// W^T, the input gradient W. Made on first use, bounded like the bf16 cache.
type PackedCache = HashMap<(TensorId, bool), Arc<PackedB>>;
static PACKED: Mutex<Option<PackedCache>> = Mutex::new(None);
static PACKED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The packed form of `w` [rows, cols] as the B operand: W^T (`transposed`, the forward x @ W^T)
/// or W (the input gradient g @ W; with `KTO_TRAIN_PACK_INPUT_GRAD=0` not cached but moved out
/// of the forward's form at each call). `None` when the products do not use packed operands
/// here (another engine, or a CPU without the tile kernel), or the cache is full.
pub fn packed_weight(w: &Tensor, transposed: bool) -> Result<Option<Arc<PackedB>>> {
    if !packs_weights() {
        return Ok(None);
    }
    if !transposed && !packs_input_grad() {
        // Only the forward's form is kept: this one is moved out of it for the call.
        let fwd = packed_weight(w, true)?;
        let _p = profile::phase("op: repack input-gradient operand");
        return Ok(fwd.map(|p| Arc::new(p.transposed())));
    }
    let key = (w.id(), transposed);
    if let Some(hit) = PACKED
        .lock()
        .expect("packed cache poisoned")
        .as_ref()
        .and_then(|c| c.get(&key).cloned())
    {
        return Ok(Some(hit));
    }
    let (rows, cols) = w.dims2()?;
    let used = PACKED_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    if used + rows * cols * 2 > cache_budget() {
        return Ok(None);
    }
    let Some(packed) = pack_weight(w, transposed)?.map(Arc::new) else {
        return Ok(None);
    };
    PACKED_BYTES.fetch_add(packed.bytes(), std::sync::atomic::Ordering::Relaxed);
    PACKED
        .lock()
        .expect("packed cache poisoned")
        .get_or_insert_with(HashMap::new)
        .insert(key, packed.clone());
    Ok(Some(packed))
}

/// `w` [rows, cols] packed as the B operand, W^T (`transposed`) or W, without the cache: for
/// weights held only in packed form (see `kernels::frozen`). `None` where products do not use
/// packed operands here.
pub fn pack_weight(w: &Tensor, transposed: bool) -> Result<Option<PackedB>> {
    if !packs_weights() {
        return Ok(None);
    }
    let (rows, cols) = w.dims2()?;
    let pack = |data: &[bf16]| {
        let b = MatRef {
            data,
            trans: transposed,
            ld: cols,
        };
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        native::pack_rhs(&b, k, n)
    };
    let (storage, layout) = w.storage_and_layout();
    Ok(match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => pack(&v[a..b]),
        _ => {
            drop(storage);
            // A rounded copy only for packing.
            pack(&Bf16Matrix::from_tensor(w)?.data)
        }
    })
}

/// [`gemm_bf16`] into a new [m, n] vector with a packed B.
pub(crate) fn gemm_bf16_packed_new(m: usize, a: MatRef<'_, bf16>, b: &PackedB) -> Result<Vec<f32>> {
    let (k, n) = (b.k(), b.n());
    check_operand("a", &a, m, k)?;
    if m == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `a` was checked against [m, k]; the capacity is m * n and every value is written.
    unsafe {
        let out = c.spare_capacity_mut().as_mut_ptr().cast();
        profile::gemm(m, n, k, || native::gemm_bf16_packed(m, a, b, out));
        c.set_len(m * n);
    }
    Ok(c)
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
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: length mismatch");
    // Large enough that splitting pays for waking the pool.
    const CHUNK: usize = 1 << 16;
    if src.len() <= CHUNK {
        convert_serial(src, dst);
    } else {
        crate::util::parallel::for_each_chunk_mut(dst, CHUNK, |i, d| {
            convert_serial(&src[i * CHUNK..i * CHUNK + d.len()], d)
        });
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

/// Whether the input gradient's orientation (W) is packed too (`KTO_TRAIN_PACK_INPUT_GRAD`, default
/// on); off, it is packed per call.
pub(crate) fn packs_input_grad() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KTO_TRAIN_PACK_INPUT_GRAD").map_or(true, |v| v != "0"))
}

/// Bytes of projection weights whose input-gradient form is held packed next to the forward's
/// (`KTO_TRAIN_PACK_INPUT_GRAD_MB`, default 256; 0 with `KTO_TRAIN_PACK_INPUT_GRAD=0`); the other
/// projections move it out of the forward's form at each backward. That move costs time in
/// proportion to the weights, per step, so its share falls as a step's tokens grow: measured on
/// an AMX CPU, all forms moved cost 4.5% of the real unit's speed (SmolLM2-135M, ~350 tokens per
/// micro-batch; its 212 MB of forms fit the default) and nothing measurable at SmolLM2-360M's
/// 2 x 512 tokens, where holding all 629 MB of forms was most of the step's peak above 2 GB.
pub fn input_grad_pack_budget() -> usize {
    static BUDGET: MibSetting = MibSetting::new("KTO_TRAIN_PACK_INPUT_GRAD_MB", 256);
    if packs_input_grad() {
        BUDGET.bytes()
    } else {
        0
    }
}

/// Byte bound of the bf16 weight cache: `KTO_TRAIN_BF16_CACHE_MB`, else 8 GiB (a 4B-parameter
/// model's weights in bf16; SmolLM2-360M needs 0.7 GiB).
fn cache_budget() -> usize {
    static BUDGET: MibSetting = MibSetting::new("KTO_TRAIN_BF16_CACHE_MB", 8 << 10);
    BUDGET.bytes()
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

/// Drops every cached bf16 and packed weight (e.g. after dropping a model in a long-lived
/// process).
pub fn clear_bf16_cache() {
    *CACHE.lock().expect("bf16 cache poisoned") = None;
    *PACKED.lock().expect("packed cache poisoned") = None;
    PACKED_BYTES.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes held by the bf16 weight cache.
pub fn bf16_cache_bytes() -> usize {
    CACHE
        .lock()
        .expect("bf16 cache poisoned")
        .as_ref()
        .map_or(0, |c| c.bytes)
}
