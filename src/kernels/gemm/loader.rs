//! Finds and opens oneDNN or MKL at run time, so that the build needs nothing outside crates.io.
//!
//! Search order:
//! 1. `KTO_TRAIN_BLAS=/path/to/libdnnl.so.3` (or `libmkl_rt.so.3`, `.so.2`, ...): that file only;
//!    which library it is comes from the symbols it exports.
//! 2. The `lib` folders of the Python installs pip writes to: `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
//!    `python3`'s `sys.prefix`, `sys.base_prefix` and `site.getuserbase()`, then `~/.local/lib`,
//!    `/usr/local/lib`, `/usr/lib/x86_64-linux-gnu`, `/usr/lib64`, `/usr/lib`.
//!
//! Which library is preferred depends on the CPU: MKL's bf16 GEMM uses AMX on Intel CPUs that
//! have it, but on AMD CPUs MKL takes a generic path (measured 35-50 GFLOP/s here, below candle),
//! while oneDNN picks its kernels by instruction set (avx512_core_bf16 on AMD Zen 4/5).
use super::MatRef;
use candle_core::{bail, Result};
use half::bf16;
use libloading::os::unix::{Library, Symbol, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

type DnnlSgemm = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    f32,
    *const f32,
    i64,
    *const f32,
    i64,
    f32,
    *mut f32,
    i64,
) -> c_int;
type DnnlGemmBf16 = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    f32,
    *const u16,
    i64,
    *const u16,
    i64,
    f32,
    *mut f32,
    i64,
) -> c_int;
type CblasSgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type CblasGemmBf16 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const u16,
    c_int,
    *const u16,
    c_int,
    f32,
    *mut f32,
    c_int,
);

#[repr(C)]
struct DnnlVersion {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
}

enum Kind {
    Dnnl {
        sgemm: DnnlSgemm,
        bf16: DnnlGemmBf16,
    },
    Mkl {
        sgemm: CblasSgemm,
        bf16: CblasGemmBf16,
    },
}

/// A loaded library. It lives in a process-wide static, so it is never closed while its
/// function pointers can be called.
pub struct Backend {
    kind: Kind,
    path: PathBuf,
    version: String,
    _library: Library,
}

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

impl Backend {
    pub fn describe(&self) -> String {
        let name = match self.kind {
            Kind::Dnnl { .. } => "oneDNN",
            Kind::Mkl { .. } => "MKL",
        };
        format!("{name} {} ({})", self.version, self.path.display())
    }

    /// `c[m, n] = op(a) @ op(b) + beta * c`, row-major.
    ///
    /// # Safety
    /// `a` and `b` hold op(a) [m, k] and op(b) [k, n] at their leading dimensions (the checks of
    /// `super::check`), and `c` points to m * n writable f32 values, initialized when `beta` is
    /// not 0.
    #[allow(clippy::too_many_arguments)] // BLAS's own argument list
    pub unsafe fn sgemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        beta: f32,
        c: *mut f32,
    ) -> Result<()> {
        // SAFETY: the caller's contract (operands and output sized as documented).
        unsafe {
            match self.kind {
                Kind::Dnnl { sgemm, .. } => {
                    let st = sgemm(
                        tr_char(a.trans),
                        tr_char(b.trans),
                        m as i64,
                        n as i64,
                        k as i64,
                        1.0,
                        a.data.as_ptr(),
                        a.ld as i64,
                        b.data.as_ptr(),
                        b.ld as i64,
                        beta,
                        c,
                        n as i64,
                    );
                    dnnl_status("dnnl_sgemm", st)
                }
                Kind::Mkl { sgemm, .. } => {
                    sgemm(
                        CBLAS_ROW_MAJOR,
                        tr_int(a.trans),
                        tr_int(b.trans),
                        m as c_int,
                        n as c_int,
                        k as c_int,
                        1.0,
                        a.data.as_ptr(),
                        lp64(a.ld)?,
                        b.data.as_ptr(),
                        lp64(b.ld)?,
                        beta,
                        c,
                        n as c_int,
                    );
                    Ok(())
                }
            }
        }
    }

    /// `c[m, n] = op(a) @ op(b)` with bf16 operands and f32 output, row-major.
    ///
    /// # Safety
    /// As [`Backend::sgemm`] with beta = 0 (`c` need not be initialized).
    pub unsafe fn gemm_bf16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        c: *mut f32,
    ) -> Result<()> {
        // bf16 is a transparent u16 wrapper: the bit layout both libraries expect.
        let pa = a.data.as_ptr() as *const u16;
        let pb = b.data.as_ptr() as *const u16;
        // SAFETY: the caller's contract.
        unsafe {
            match self.kind {
                Kind::Dnnl { bf16, .. } => {
                    let st = bf16(
                        tr_char(a.trans),
                        tr_char(b.trans),
                        m as i64,
                        n as i64,
                        k as i64,
                        1.0,
                        pa,
                        a.ld as i64,
                        pb,
                        b.ld as i64,
                        0.0,
                        c,
                        n as i64,
                    );
                    dnnl_status("dnnl_gemm_bf16bf16f32", st)
                }
                Kind::Mkl { bf16, .. } => {
                    bf16(
                        CBLAS_ROW_MAJOR,
                        tr_int(a.trans),
                        tr_int(b.trans),
                        m as c_int,
                        n as c_int,
                        k as c_int,
                        1.0,
                        pa,
                        lp64(a.ld)?,
                        pb,
                        lp64(b.ld)?,
                        0.0,
                        c,
                        n as c_int,
                    );
                    Ok(())
                }
            }
        }
    }
}

fn tr_char(t: bool) -> c_char {
    (if t { b'T' } else { b'N' }) as c_char
}

fn tr_int(t: bool) -> c_int {
    if t {
        CBLAS_TRANS
    } else {
        CBLAS_NO_TRANS
    }
}

fn lp64(x: usize) -> Result<c_int> {
    c_int::try_from(x).map_err(|_| candle_core::Error::Msg(format!("gemm: {x} exceeds MKL lp64")))
}

fn dnnl_status(what: &str, st: c_int) -> Result<()> {
    if st != 0 {
        bail!("{what} failed with oneDNN status {st}");
    }
    Ok(())
}

/// The process-wide library, loaded on first use.
pub fn get() -> &'static std::result::Result<Backend, String> {
    static BACKEND: OnceLock<std::result::Result<Backend, String>> = OnceLock::new();
    BACKEND.get_or_init(load)
}

const DNNL_NAMES: [&str; 2] = ["libdnnl.so.3", "libdnnl.so.2"];
const MKL_NAMES: [&str; 2] = ["libmkl_rt.so.3", "libmkl_rt.so.2"];

fn load() -> std::result::Result<Backend, String> {
    if let Some(p) = std::env::var_os(super::LIBRARY_ENV) {
        let p = PathBuf::from(p);
        return open(&p).map_err(|e| format!("{}={}: {e}", super::LIBRARY_ENV, p.display()));
    }
    let dirs = search_dirs();
    let (first, second) = if cpu_is_intel() {
        (MKL_NAMES, DNNL_NAMES)
    } else {
        (DNNL_NAMES, MKL_NAMES)
    };
    let mut errors = Vec::new();
    for names in [first, second] {
        for dir in &dirs {
            for name in names {
                let p = dir.join(name);
                if p.is_file() {
                    match open(&p) {
                        Ok(b) => return Ok(b),
                        Err(e) => errors.push(format!("{}: {e}", p.display())),
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Err(format!(
            "none of {} in {}",
            DNNL_NAMES
                .iter()
                .chain(MKL_NAMES.iter())
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else {
        Err(errors.join("; "))
    }
}

fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = Vec::with_capacity(12);
        for w in [r.ebx, r.edx, r.ecx] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("lib"));
        }
    }
    // pip puts the wheels' shared libraries in <prefix>/lib (data files), next to Python's own.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, site\nprint(sys.prefix)\nprint(sys.base_prefix)\nprint(site.getuserbase())",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if !line.trim().is_empty() {
                    dirs.push(PathBuf::from(line.trim()).join("lib"));
                }
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/lib"));
    }
    for d in [
        "/usr/local/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// Opens `path` with RTLD_NOW, after its dependencies that sit in the same folder. pip's oneDNN
/// wheel needs libtbb, libsycl, ... from its own folder but has no RUNPATH, and LD_LIBRARY_PATH
/// cannot be changed for a running process: so the libraries its ELF header lists as NEEDED are
/// opened first from that folder (the dynamic linker then matches them by soname). The handles of
/// those dependencies are kept for the whole process.
fn open_with_deps(path: &Path, depth: usize) -> std::result::Result<Library, String> {
    static DEPENDENCIES: std::sync::Mutex<Vec<Library>> = std::sync::Mutex::new(Vec::new());
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if depth < 8 {
        for needed in needed_libraries(path) {
            let dep = dir.join(&needed);
            if dep != path && dep.is_file() {
                let lib = open_with_deps(&dep, depth + 1)?;
                DEPENDENCIES.lock().map_err(|e| e.to_string())?.push(lib);
            }
        }
    }
    // SAFETY: opening a library runs its initializers; the libraries opened here are oneDNN or
    // MKL and their own dependencies, whose initializers only set up their internal state.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| e.to_string())
}

/// The DT_NEEDED entries of an ELF shared library (empty when it cannot be read or parsed: the
/// open that follows then reports what is missing).
fn needed_libraries(path: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    match goblin::elf::Elf::parse(&bytes) {
        Ok(elf) => elf.libraries.iter().map(|s| s.to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A symbol's address, copied out of the library (valid while the library stays open).
///
/// # Safety
/// `T` is the symbol's true type (a function pointer of its C signature).
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Option<T> {
    // SAFETY: the caller's contract on `T`.
    let s: Symbol<T> = unsafe { lib.get(name.as_bytes()) }.ok()?;
    Some(*s)
}

fn open(path: &Path) -> std::result::Result<Backend, String> {
    let lib = open_with_deps(path, 0)?;
    // SAFETY: the types are the signatures of the libraries' public C headers (dnnl.h:
    // dnnl_sgemm, dnnl_gemm_bf16bf16f32, dnnl_version; mkl_cblas.h / mkl_service.h: cblas_sgemm,
    // cblas_gemm_bf16bf16f32, mkl_get_version_string).
    unsafe {
        if let (Some(sgemm), Some(bf16)) = (
            sym::<DnnlSgemm>(&lib, "dnnl_sgemm"),
            sym::<DnnlGemmBf16>(&lib, "dnnl_gemm_bf16bf16f32"),
        ) {
            type Version = unsafe extern "C" fn() -> *const DnnlVersion;
            let version = match sym::<Version>(&lib, "dnnl_version") {
                Some(f) => {
                    let v = &*f();
                    format!("{}.{}.{}", v.major, v.minor, v.patch)
                }
                None => "?".into(),
            };
            return Ok(Backend {
                kind: Kind::Dnnl { sgemm, bf16 },
                path: path.to_path_buf(),
                version,
                _library: lib,
            });
        }
        if let (Some(sgemm), Some(bf16)) = (
            sym::<CblasSgemm>(&lib, "cblas_sgemm"),
            sym::<CblasGemmBf16>(&lib, "cblas_gemm_bf16bf16f32"),
        ) {
            mkl_choose_threading(&lib);
            type Version = unsafe extern "C" fn(*mut c_char, c_int);
            let version = match sym::<Version>(&lib, "mkl_get_version_string") {
                Some(f) => {
                    // Space-padded to the length given, not NUL-terminated: keep the last 0.
                    let mut buf = [0 as c_char; 256];
                    f(buf.as_mut_ptr(), buf.len() as c_int - 1);
                    let s = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                    s.split("Version ")
                        .nth(1)
                        .and_then(|v| v.split_whitespace().next())
                        .unwrap_or("?")
                        .to_string()
                }
                None => "?".into(),
            };
            return Ok(Backend {
                kind: Kind::Mkl { sgemm, bf16 },
                path: path.to_path_buf(),
                version,
                _library: lib,
            });
        }
    }
    Err(
        "exports neither dnnl_sgemm + dnnl_gemm_bf16bf16f32 nor cblas_sgemm + \
         cblas_gemm_bf16bf16f32"
            .into(),
    )
}

/// MKL's default threading is Intel OpenMP, whose idle workers spin for 200 ms after every call,
/// taking a core from candle's own threads between products (there are only two). GNU OpenMP
/// sleeps almost at once. MKL exits the process when a threading library cannot be loaded, so
/// GNU is chosen only when libgomp opens; the user's MKL_THREADING_LAYER always wins.
///
/// # Safety
/// `lib` is libmkl_rt.
unsafe fn mkl_choose_threading(lib: &Library) {
    if std::env::var_os("MKL_THREADING_LAYER").is_some() {
        return;
    }
    // SAFETY: libgomp's initializers only set up its own state; the handle stays open for the
    // process (MKL will use it).
    match unsafe { Library::open(Some("libgomp.so.1"), RTLD_NOW | RTLD_LOCAL) } {
        Ok(gomp) => std::mem::forget(gomp),
        Err(_) => return,
    }
    type SetThreadingLayer = unsafe extern "C" fn(c_int) -> c_int;
    // SAFETY: MKL_Set_Threading_Layer's signature in mkl_service.h.
    if let Some(f) = unsafe { sym::<SetThreadingLayer>(lib, "MKL_Set_Threading_Layer") } {
        const MKL_THREADING_GNU: c_int = 3;
        // SAFETY: called before any MKL computation, with a documented constant.
        unsafe { f(MKL_THREADING_GNU) };
    }
}
