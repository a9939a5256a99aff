//! The products in pure Rust, from crates.io: gemmkit (pinned to 0.1.2), which dispatches at run
//! time over AVX2/FMA, AVX-512F and AVX-512 BF16 (`vdpbf16ps`) and splits work over rayon.
//!
//! Measured on the 2-core Zen 5 machines here at SmolLM2's shapes (benches/gemm.rs): f32 about
//! 2x candle's GEMM and on par with oneDNN's.
//!
//! gemmkit's bf16 product writes bf16: rounding every output once more (relative 2^-9) broke the
//! bf16 mode's stated bounds (the gradient of `x @ A^T` reached 4.6e-3 against 1.6e-3 in
//! tests/gemm.rs), so the bf16 product with f32 output is our own: [`amx`] on CPUs with AMX-BF16
//! (Intel Sapphire Rapids and later: tile products, several times any vector kernel),
//! [`dpbf16`] on CPUs with AVX-512 BF16 (AMD Zen 4/5, Intel Cooper Lake), and elsewhere
//! gemmkit's f32 product of the widened operands (the same arithmetic: a product of two bf16
//! values is exact in f32).
use super::MatRef;
use gemmkit::Parallelism;
use half::bf16;

/// The output pointer that the kernels' rayon tasks, each writing its own tiles of C, share.
#[cfg(target_arch = "x86_64")]
struct Out(*mut f32);
// SAFETY: every task writes disjoint tiles only.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Out {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
impl Out {
    // A method, so that closures capture the whole (Sync) wrapper, not its raw field.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Row and column strides of op(M) for a row-major BLAS-style operand.
fn strides<T>(m: &MatRef<'_, T>) -> (isize, isize) {
    if m.trans {
        (1, m.ld as isize)
    } else {
        (m.ld as isize, 1)
    }
}

/// `c = op(a) @ op(b) + beta * c` in f32; `c` is dense row-major [m, n].
///
/// # Safety
/// `a` and `b` passed `super::check` for (m, n, k); `c` points to m * n writable values,
/// initialized when `beta` is not 0.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    beta: f32,
    c: *mut f32,
    causal: Option<super::Causal>,
) {
    if super::small::takes(m, n, k) {
        // SAFETY: the caller's contract, which the small kernel shares.
        unsafe { super::small::sgemm(m, n, k, a, b, beta, c, causal) };
        return;
    }
    let (rsa, csa) = strides(&a);
    let (rsb, csb) = strides(&b);
    // SAFETY: the caller's contract; `c` is dense row-major and aliases neither operand.
    unsafe {
        gemmkit::gemm_unchecked(
            m,
            k,
            n,
            1.0f32,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c,
            n as isize,
            1,
            Parallelism::Rayon(0),
        )
    }
}

/// `c = op(a) @ op(b)` with bf16 operands, f32 accumulation and f32 output; `c` (dense
/// row-major [m, n]) need not be initialized.
///
/// # Safety
/// As [`sgemm`] with `beta` = 0.
pub(super) unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    c: *mut f32,
) {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if amx::supported() {
            // SAFETY: the caller's contract; AMX was detected and enabled for this process.
            unsafe { amx::gemm(m, n, k, &a, &b, c) };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if dpbf16::supported() {
            // SAFETY: the caller's contract; the CPU features were just detected.
            unsafe { dpbf16::gemm(m, n, k, &a, &b, c) };
            return;
        }
    }
    let a32 = widen_operand(&a, m, k);
    let b32 = widen_operand(&b, k, n);
    let dense = |data, cols| MatRef {
        data,
        trans: false,
        ld: cols,
    };
    // SAFETY: the widened operands are dense [m, k] and [k, n]; `c` is the caller's.
    unsafe { sgemm(m, n, k, dense(&a32, k), dense(&b32, n), 0.0, c, None) }
}

/// A frozen operand B [k, n] packed once for the tile kernel (see [`amx`]), reused at every call.
#[derive(Clone)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }

    /// The packed form of B^T [n, k], moved straight from this one (no dense copy in between).
    ///
    /// Both forms pad k and n to 32 with zeros, so they cover the same 2 x 2 units of B: unit
    /// (A, R) = B[2R..2R + 2][2A..2A + 2] (R a pair of k, A a pair of n). Here the unit is two
    /// words of panel A / 8, row R: (B[2R][2A], B[2R + 1][2A]) and the same for column 2A + 1;
    /// in B^T's form it is two words of panel R / 8, row A: (B[2R][2A], B[2R][2A + 1]) and the
    /// same for row 2R + 1. So the move transposes units and swaps their two middle values.
    pub fn transposed(&self) -> PackedB {
        use rayon::prelude::*;
        let (kp, np) = (self.k.div_ceil(32) * 32, self.n.div_ceil(32) * 32);
        // Rows (pairs) per panel here and in the result.
        let (pairs, pairs_t) = (kp / 2, np / 2);
        let len = kp * pairs_t;
        // Every word is written below (the units cover both forms whole), so no zero-fill.
        let mut out: Vec<u32> = Vec::with_capacity(len);
        if len > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(pairs_t * 16)
                .enumerate()
                .for_each(|(panel_t, chunk)| {
                    for a in 0..np / 2 {
                        let src = &self.data[(a / 8) * pairs * 16 + (a % 8) * 2..];
                        let dst = &mut chunk[a * 16..a * 16 + 16];
                        for (rr, d) in dst.chunks_exact_mut(2).enumerate() {
                            let at = (panel_t * 8 + rr) * 16;
                            let (w0, w1) = (src[at], src[at + 1]);
                            d[0].write((w0 & 0xffff) | (w1 << 16));
                            d[1].write((w0 >> 16) | (w1 & 0xffff_0000));
                        }
                    }
                });
            // SAFETY: all `len` words were written above.
            unsafe { out.set_len(len) };
        }
        PackedB {
            data: out,
            k: self.n,
            n: self.k,
        }
    }

    /// The operand back as dense row-major [k, n] bf16 values (the packing only moves them).
    pub fn unpack(&self) -> Vec<bf16> {
        use rayon::prelude::*;
        let (k, n) = (self.k, self.n);
        if k == 0 || n == 0 {
            return Vec::new();
        }
        // Each panel of 16 columns holds kp / 2 rows of 16 pairs, k padded to 32 (see
        // `amx::pack_b`).
        let pairs = k.div_ceil(32) * 16;
        let mut out = vec![bf16::ZERO; k * n];
        out.par_chunks_mut(n).enumerate().for_each(|(kk, row)| {
            let (p, half) = (kk / 2, 16 * (kk % 2));
            for (j, v) in row.iter_mut().enumerate() {
                let word = self.data[(j / 16) * pairs * 16 + p * 16 + j % 16];
                *v = bf16::from_bits((word >> half) as u16);
            }
        });
        out
    }
}

/// Whether [`pack_rhs`] packs on this machine (the kernel that reads packed operands runs here).
pub(super) fn packs_rhs() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        amx::supported()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Whether this CPU multiplies bf16 natively (AMX tiles or AVX-512 BF16).
pub(super) fn bf16_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        packs_rhs() || dpbf16::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which instructions this machine's bf16 products run on.
pub(super) fn bf16_kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if packs_rhs() {
            return "AMX tiles";
        }
        if dpbf16::supported() {
            return "AVX-512 BF16 (vdpbf16ps)";
        }
    }
    "operands widened to f32"
}

/// op(b) [k, n] packed for [`gemm_bf16_packed`]; `None` where [`packs_rhs`] is false.
pub(super) fn pack_rhs(b: &MatRef<'_, bf16>, k: usize, n: usize) -> Option<PackedB> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if amx::supported() {
            return Some(PackedB {
                data: amx::pack_b(b, k, n),
                k,
                n,
            });
        }
    }
    let _ = (b, k, n);
    None
}

/// `c = op(a) @ B` for a packed B, as [`gemm_bf16`].
///
/// # Safety
/// As [`gemm_bf16`]; `a` is op(a) [m, p.k]; `c` holds m * p.n values.
pub(super) unsafe fn gemm_bf16_packed(m: usize, a: MatRef<'_, bf16>, p: &PackedB, c: *mut f32) {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // SAFETY: the caller's contract; a PackedB exists only where AMX is supported.
        unsafe { amx::gemm_packed(m, p.n, p.k, &a, &p.data, c) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = (m, a, p, c);
        unreachable!("no packed operands on this platform")
    }
}

/// op(M) [rows, cols] as a dense row-major f32 matrix.
fn widen_operand(mat: &MatRef<'_, bf16>, rows: usize, cols: usize) -> Vec<f32> {
    let (rs, cs) = strides(mat);
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            out.push(mat.data[i * rs as usize + j * cs as usize].to_f32());
        }
    }
    out
}

/// bf16 x bf16 -> f32 products with `vdpbf16ps` (AVX-512 BF16): each 32-bit lane holds a pair of
/// consecutive k values, and one instruction adds both lane products to 16 f32 accumulators.
/// A product of two bf16 values is exact in f32, so each step rounds once, as an f32 FMA chain
/// over the rounded operands would (the instruction flushes subnormals, which bf16 activations
/// and weights do not reach in practice).
///
/// Layout: op(a) is packed into blocks of `MR` rows, `[block][pair][row]`, op(b) into panels of
/// `NR` columns, `[panel][pair][column]` (zero-padded at the edges); the micro-kernel keeps an
/// MR x NR tile of C in 24 registers over `KC` pairs at a time. Work is split into MC x NC tiles
/// of C over rayon.
#[cfg(target_arch = "x86_64")]
mod dpbf16 {
    use super::{strides, MatRef, Out};
    use half::bf16;
    use std::arch::x86_64::*;

    const MR: usize = 12;
    const NR: usize = 32;
    /// Pairs per pass: an A micro-panel (12 x 192 x 4 B = 9 KB) stays in L1, the B panels of
    /// one tile (8 x 32 x 192 x 4 B = 196 KB) in L2.
    const KC: usize = 192;
    const MC: usize = 8 * MR;
    const NC: usize = 8 * NR;

    pub(super) fn supported() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }

    #[inline(always)]
    fn pair(lo: bf16, hi: bf16) -> u32 {
        lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
    }

    /// Packs op(m) [rows, k] (`rows_are_lanes`: rows go to lanes, as for A) or op(m) [k, cols]
    /// (columns go to lanes, as for B) into `[group][pair][lane]` with `width` lanes per group.
    fn pack(
        mat: &MatRef<'_, bf16>,
        lanes: usize,
        k: usize,
        width: usize,
        rows_are_lanes: bool,
    ) -> Vec<u32> {
        let (rs, cs) = strides(mat);
        // (lane stride, k stride) in the source
        let (ls, ks) = if rows_are_lanes { (rs, cs) } else { (cs, rs) };
        let (ls, ks) = (ls as usize, ks as usize);
        let kp = k.div_ceil(2);
        let groups = lanes.div_ceil(width);
        let mut out = vec![0u32; groups * kp * width];
        let data = mat.data;
        crate::util::parallel::for_each_chunk_mut(&mut out, kp * width, |g, chunk| {
            let lane0 = g * width;
            let used = width.min(lanes - lane0);
            let get = |lane: usize, kk: usize| {
                if kk < k {
                    data[(lane0 + lane) * ls + kk * ks]
                } else {
                    bf16::ZERO
                }
            };
            if ks == 1 {
                // k runs along memory: walk it innermost.
                for l in 0..used {
                    for p in 0..kp {
                        chunk[p * width + l] = pair(get(l, 2 * p), get(l, 2 * p + 1));
                    }
                }
            } else {
                for p in 0..kp {
                    for l in 0..used {
                        chunk[p * width + l] = pair(get(l, 2 * p), get(l, 2 * p + 1));
                    }
                }
            }
        });
        out
    }

    /// Writes (or, with `accumulate`, adds to) the `rows` x `cols` corner of an MR x NR tile at
    /// `c` (row stride `ldc`): the product of `kc` pairs of packed A and B.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let lo_mask: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols).wrapping_sub(1)
        };
        let hi_mask: __mmask16 = if cols >= NR {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)).wrapping_sub(1)
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: the caller passes MR x kc pairs of A, kc x NR pairs of B, and a C tile with
        // `rows` x `cols` valid values at stride `ldc`.
        unsafe {
            // Loops over all MR rows with a test inside (not `take(rows)`): constant indices
            // after unrolling keep `acc` in registers; a runtime bound would put it on the stack.
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    if r < rows {
                        let p = c.add(r * ldc);
                        row[0] = _mm512_maskz_loadu_ps(lo_mask, p);
                        row[1] = _mm512_maskz_loadu_ps(hi_mask, p.add(16));
                    }
                }
            }
            for p in 0..kc {
                let bp = b.add(p * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
                let ap = a.add(p * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
            }
            for (r, row) in acc.iter().enumerate() {
                if r < rows {
                    let p = c.add(r * ldc);
                    _mm512_mask_storeu_ps(p, lo_mask, row[0]);
                    _mm512_mask_storeu_ps(p.add(16), hi_mask, row[1]);
                }
            }
        }
    }

    /// # Safety
    /// As `super::gemm_bf16`, on a CPU where [`supported`] holds.
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: &MatRef<'_, bf16>,
        b: &MatRef<'_, bf16>,
        c: *mut f32,
    ) {
        let kp = k.div_ceil(2);
        let pa = pack(a, m, k, MR, true);
        let pb = pack(b, n, k, NR, false);
        let out = Out(c);
        let (row_tiles, col_tiles) = (m.div_ceil(MC), n.div_ceil(NC));
        let task = |t: usize| {
            let (ti, tj) = (t / col_tiles, t % col_tiles);
            let blocks = (ti * MC / MR)..((ti + 1) * MC / MR).min(m.div_ceil(MR));
            let panels = (tj * NC / NR)..((tj + 1) * NC / NR).min(n.div_ceil(NR));
            let mut p0 = 0;
            while p0 < kp {
                let kc = KC.min(kp - p0);
                for ib in blocks.clone() {
                    for jb in panels.clone() {
                        // SAFETY: the packed blocks hold kp pairs for every group; the tile
                        // (ib, jb) lies inside C and belongs to this task alone.
                        unsafe {
                            micro(
                                kc,
                                pa.as_ptr().add((ib * kp + p0) * MR),
                                pb.as_ptr().add((jb * kp + p0) * NR),
                                out.ptr().add(ib * MR * n + jb * NR),
                                n,
                                MR.min(m - ib * MR),
                                NR.min(n - jb * NR),
                                p0 > 0,
                            )
                        }
                    }
                }
                p0 += kc;
            }
        };
        crate::util::parallel::for_each_range(row_tiles * col_tiles, &|range| range.for_each(task));
    }
}

/// bf16 x bf16 -> f32 products on AMX tiles (`tdpbf16ps`): one instruction multiplies a 16 x 32
/// bf16 tile of A by a 32 x 16 tile of B (k pairs interleaved, as `vdpbf16ps` wants them) into
/// a 16 x 16 f32 tile. The micro-kernel holds a 32 x 32 block of C in four tiles over the whole
/// k, with two A and two B tiles streamed per 32 values of k.
///
/// Rust has no stable AMX intrinsics, so the instructions are inline assembly; the tile
/// registers are never used by compiled code, so they survive between the `asm!` blocks of one
/// thread. Linux gives a process the tile state only on request (`arch_prctl`), made once in
/// [`supported`]; each rayon task loads the tile configuration on its own thread.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::{strides, MatRef, Out};
    use half::bf16;
    use rayon::prelude::*;
    use std::arch::asm;
    use std::sync::OnceLock;

    /// Rows and columns of C per micro-kernel call (2 x 2 tiles of 16 x 16).
    const MB: usize = 32;
    /// k per step (one A tile row: 32 bf16 = 64 bytes).
    const KB: usize = 32;
    /// C columns per rayon task.
    const NC: usize = 8 * MB;
    /// Packed B sizes above which tasks are ordered by B columns (see `gemm_packed`).
    const B_OUTER_BYTES: usize = 16 << 20;
    /// Values per packing task at least: the attention products of short sequences pack
    /// operands of a few thousand values, where a task per row cost more than the packing.
    const PACK_TASK: usize = 1 << 14;

    /// CPU support (CPUID.7.0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE) and the kernel's grant of
    /// the tile data state to this process (Linux 5.16+). `KTO_TRAIN_NO_AMX=1` turns it off.
    pub(super) fn supported() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var_os("KTO_TRAIN_NO_AMX").is_some_and(|v| v != "0") {
                return false;
            }
            // SAFETY: cpuid leaf 7 exists on every x86_64 CPU that reports max leaf >= 7.
            let max = std::arch::x86_64::__cpuid(0).eax;
            if max < 7 {
                return false;
            }
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall with integer arguments.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }

    /// The 64-byte tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// op(a) [m, k] as dense bf16 rows of `kp` (k rounded up to KB), `mp` rows (m rounded up to
    /// MB), zero-padded.
    fn pack_a(a: &MatRef<'_, bf16>, m: usize, k: usize, mp: usize, kp: usize) -> Vec<bf16> {
        let (rs, cs) = strides(a);
        let (rs, cs) = (rs as usize, cs as usize);
        let zero = std::mem::MaybeUninit::new(bf16::ZERO);
        // Every value is written below (the rows, their k padding, the padding rows), so the
        // buffer is not zero-filled first.
        let mut out: Vec<bf16> = Vec::with_capacity(mp * kp);
        if cs != 1 && rs == 1 {
            // Stored transposed (a gradient's transpose in the attention backward, say): row i
            // is a column of the storage, and gathering it one value per cache line cost more
            // than the product at long k. A block of MB rows is read MB values of one stored
            // row at a time, contiguous, and spread into the block's rows.
            crate::util::parallel::for_each_chunk_mut(
                &mut out.spare_capacity_mut()[..mp * kp],
                MB * kp,
                |blk, rows| {
                    let i0 = blk * MB;
                    let used = MB.min(m.saturating_sub(i0));
                    for l in 0..k {
                        let src = &a.data[l * cs + i0..l * cs + i0 + used];
                        for (r, x) in src.iter().enumerate() {
                            rows[r * kp + l].write(*x);
                        }
                    }
                    for r in 0..MB {
                        let row = &mut rows[r * kp..(r + 1) * kp];
                        if r < used {
                            row[k..].fill(zero);
                        } else {
                            row.fill(zero);
                        }
                    }
                },
            );
            // SAFETY: all mp * kp values were written above (mp is a multiple of MB).
            unsafe { out.set_len(mp * kp) };
            return out;
        }
        let per_task = PACK_TASK.div_ceil(kp);
        crate::util::parallel::for_each_chunk_mut(
            &mut out.spare_capacity_mut()[..mp * kp],
            per_task * kp,
            |task, rows| {
                for (r, row) in rows.chunks_mut(kp).enumerate() {
                    let i = task * per_task + r;
                    if i >= m {
                        row.fill(zero);
                        continue;
                    }
                    let (vals, pad) = row.split_at_mut(k);
                    if cs == 1 {
                        for (v, x) in vals.iter_mut().zip(&a.data[i * rs..i * rs + k]) {
                            v.write(*x);
                        }
                    } else {
                        for (l, v) in vals.iter_mut().enumerate() {
                            v.write(a.data[i * rs + l * cs]);
                        }
                    }
                    pad.fill(zero);
                }
            },
        );
        // SAFETY: all mp * kp values were written above.
        unsafe { out.set_len(mp * kp) };
        out
    }

    /// op(b) [k, n] in tile order: panels of 16 columns, each `kp / 2` rows of 16 pairs
    /// (b[2p][j], b[2p + 1][j]) as u32, zero-padded.
    pub(super) fn pack_b(b: &MatRef<'_, bf16>, k: usize, n: usize) -> Vec<u32> {
        let (np, kp) = (n.div_ceil(MB) * MB, k.div_ceil(KB) * KB);
        let (rs, cs) = strides(b);
        let (rs, cs) = (rs as usize, cs as usize);
        if cs == 1 && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512BW; op(b) [k, n] has rows of n values at `rs`.
            return unsafe { pack_b_rows(b.data, rs, k, n) };
        }
        let pairs = kp / 2;
        let mut out = vec![0u32; np * pairs];
        out.par_chunks_mut(pairs * 16)
            .with_min_len(PACK_TASK.div_ceil(pairs * 16))
            .enumerate()
            .for_each(|(panel, chunk)| {
                let j0 = panel * 16;
                let cols = 16.min(n.saturating_sub(j0));
                if cols == 0 {
                    return; // a padding panel: zeros
                }
                if cs == 1 {
                    // Rows along memory (an activation, not a stored transpose): walking down
                    // a column touched one cache line per value; two rows' 16 values at a time
                    // read each line once.
                    for p in 0..pairs {
                        let row = |kk: usize| (kk < k).then(|| &b.data[kk * rs + j0..][..cols]);
                        let (r0, r1) = (row(2 * p), row(2 * p + 1));
                        let dst = &mut chunk[p * 16..p * 16 + cols];
                        for (jj, d) in dst.iter_mut().enumerate() {
                            let lo = r0.map_or(0, |r| r[jj].to_bits() as u32);
                            let hi = r1.map_or(0, |r| r[jj].to_bits() as u32);
                            *d = lo | (hi << 16);
                        }
                    }
                    return;
                }
                for jj in 0..16 {
                    let j = panel * 16 + jj;
                    if j >= n {
                        break;
                    }
                    let at = |kk: usize| {
                        if kk < k {
                            b.data[kk * rs + j * cs].to_bits() as u32
                        } else {
                            0
                        }
                    };
                    for p in 0..pairs {
                        chunk[p * 16 + jj] = at(2 * p) | (at(2 * p + 1) << 16);
                    }
                }
            });
        out
    }

    /// [`pack_b`] of a B whose rows lie along memory (an activation: attention's
    /// probabilities or their gradient, a transposed product's other operand): each pair of
    /// rows read once, 32 columns at a time, their values interleaved by one permutation per
    /// 16 columns and written as one line per panel. Walking a panel at a time instead read
    /// each row's line once per panel, one line per row, and cost about as much as the product.
    ///
    /// # Safety
    /// The CPU has AVX-512BW; `data` holds k rows of n values `rs` apart.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_b_rows(data: &[bf16], rs: usize, k: usize, n: usize) -> Vec<u32> {
        use std::arch::x86_64::{
            __mmask32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, _mm512_permutex2var_epi16,
            _mm512_setzero_si512, _mm512_storeu_si512,
        };
        let (np, kp) = (n.div_ceil(MB) * MB, k.div_ceil(KB) * KB);
        let pairs = kp / 2;
        let mut out: Vec<u32> = Vec::with_capacity(np * pairs);
        // 16-bit lane e of the low half takes column e / 2 of row 2p (e even) or 2p + 1 (odd);
        // the high half columns 16 + e / 2.
        let lo: [i16; 32] = std::array::from_fn(|e| (e / 2 + 32 * (e % 2)) as i16);
        let hi: [i16; 32] = std::array::from_fn(|e| (16 + e / 2 + 32 * (e % 2)) as i16);
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        let dst = Out(out.as_mut_ptr().cast());
        let src = data.as_ptr() as usize;
        let run = |range: std::ops::Range<usize>| {
            let dst = dst.ptr() as *mut u32;
            let src = src as *const bf16;
            for p in range {
                let row = |kk: usize| (kk < k).then(|| src.wrapping_add(kk * rs));
                let (r0, r1) = (row(2 * p), row(2 * p + 1));
                for j0 in (0..np).step_by(32) {
                    let left = n.saturating_sub(j0);
                    let mask: __mmask32 = if left >= 32 {
                        u32::MAX
                    } else {
                        (1u32 << left) - 1
                    };
                    // SAFETY: masked loads read columns j0.. below n of rows below k only;
                    // both panels' lines lie inside `out` (np is a multiple of 32).
                    unsafe {
                        let load = |r: Option<*const bf16>| match r {
                            Some(r) => _mm512_maskz_loadu_epi16(mask, r.add(j0).cast()),
                            None => _mm512_setzero_si512(),
                        };
                        let (v0, v1) = (load(r0), load(r1));
                        let panel = j0 / 16;
                        let at = |panel: usize| dst.add(panel * pairs * 16 + p * 16);
                        _mm512_storeu_si512(
                            at(panel).cast(),
                            _mm512_permutex2var_epi16(v0, lo, v1),
                        );
                        _mm512_storeu_si512(
                            at(panel + 1).cast(),
                            _mm512_permutex2var_epi16(v0, hi, v1),
                        );
                    }
                }
            }
        };
        crate::util::parallel::for_each_range(pairs, &run);
        // SAFETY: every pair of every panel was written above.
        unsafe { out.set_len(np * pairs) };
        out
    }

    #[inline(always)]
    fn prefetch(p: *const u32) {
        // SAFETY: a prefetch is a hint; it neither faults nor changes memory.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
    }

    /// One 32 x 32 block of C: rows `i0..`, B panels `jp, jp + 1`, all of k, stored at `c` (32
    /// rows of 32 f32, `ldc` values apart).
    ///
    /// # Safety
    /// The tile configuration is loaded on this thread; `a` holds rows i0..i0 + 32 of `kp`
    /// values, `b` panels jp..jp + 2 of kp / 2 rows; `c` has 32 writable rows of 32 values.
    unsafe fn block(
        a: *const bf16,
        kp: usize,
        b0: *const u32,
        b1: *const u32,
        c: *mut f32,
        ldc: usize,
    ) {
        let sa = kp * 2; // A row stride in bytes
        let a1 = unsafe { a.add(16 * kp) };
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
            let steps = kp / KB;
            for s in 0..steps {
                if s + 1 < steps {
                    // The next step's B tiles (16 lines each). A frozen weight's packed panels
                    // come from memory once per row block, and a tile load that misses the
                    // caches stalls the tile unit (about 110 ns against 21 from L1, measured
                    // here): a product whose weight is not cached ran 1.25-1.3x faster with
                    // this in a standalone test at SmolLM2's shapes.
                    for l in 0..16 {
                        prefetch(b0.add((s + 1) * 256 + l * 16));
                        prefetch(b1.add((s + 1) * 256 + l * 16));
                    }
                }
                let pa0 = a.add(s * KB);
                let pa1 = a1.add(s * KB);
                let pb0 = b0.add(s * 256);
                let pb1 = b1.add(s * 256);
                // Each product follows the loads it needs at once, so that the tile unit starts
                // on the first while the later tiles load (a tile load costs about as much as a
                // product here: 8-15% faster than four loads, then four products).
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) pa0,
                    a1 = in(reg) pa1,
                    b0 = in(reg) pb0,
                    b1 = in(reg) pb1,
                    sa = in(reg) sa,
                    sb = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * ldc),
                c3 = in(reg) c.add(16 * ldc + 16),
                sc = in(reg) ldc * 4,
                options(nostack),
            );
        }
    }

    /// # Safety
    /// As `super::gemm_bf16`, after [`supported`] returned true.
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: &MatRef<'_, bf16>,
        b: &MatRef<'_, bf16>,
        c: *mut f32,
    ) {
        if a.trans && m > n && std::is_x86_feature_detected!("avx512bw") {
            // A transposed A (attention's dK = dS^T q, dV = P^T dO: A stored [k, m]) would be
            // packed by gathering each tile row from a column of its storage, which cost more
            // than the product (dK at 512 keys x 64 x 1536 query rows: 435 us against 160 for
            // the same A stored untransposed, measured here). C^T = op(B)^T op(A)^T instead
            // packs A's storage as B, along its rows ([`pack_b_rows`]), and transposes the
            // smaller operand and C.
            let bt = MatRef {
                trans: !b.trans,
                ..*b
            };
            let at = MatRef { trans: false, ..*a };
            let mut ct: Vec<f32> = Vec::with_capacity(n * m);
            // SAFETY: op(bt) [n, k] and op(at) [k, m] are the caller's operands viewed
            // transposed; `ct` has room for n * m values, all written by the product.
            unsafe {
                gemm(n, m, k, &bt, &at, ct.as_mut_ptr());
                ct.set_len(n * m);
            }
            // SAFETY: `c` holds m * n values (the caller's contract).
            let c = unsafe { std::slice::from_raw_parts_mut(c, m * n) };
            // Rows of C in chunks; each reads its 16-row strips of C^T column by column.
            crate::util::parallel::for_each_chunk_mut(c, 64 * n, |chunk, rows| {
                let i0 = chunk * 64;
                for j0 in (0..n).step_by(16) {
                    for (r, row) in rows.chunks_mut(n).enumerate() {
                        for j in j0..(j0 + 16).min(n) {
                            row[j] = ct[j * m + i0 + r];
                        }
                    }
                }
            });
            return;
        }
        let pb = pack_b(b, k, n);
        // SAFETY: the caller's contract; `pb` is op(b) packed.
        unsafe { gemm_packed(m, n, k, a, &pb, c) }
    }

    /// [`gemm`] with op(b) already packed by [`pack_b`].
    ///
    /// # Safety
    /// As [`gemm`].
    pub(super) unsafe fn gemm_packed(
        m: usize,
        n: usize,
        k: usize,
        a: &MatRef<'_, bf16>,
        pb: &[u32],
        c: *mut f32,
    ) {
        let (mp, kp) = (m.div_ceil(MB) * MB, k.div_ceil(KB) * KB);
        let pa = pack_a(a, m, k, mp, kp);
        let out = Out(c);
        let (row_blocks, col_tasks) = (mp / MB, n.div_ceil(NC));
        // The order of the tasks (each thread claims contiguous ranges of them): by default a
        // thread's consecutive tasks share their A rows; for a B much larger than L2 (the
        // lm_head: 56 MB at SmolLM2-135M) they share their B columns instead, so that B is read
        // from memory about once instead of once per row block (1.2-1.4x there in a test that
        // ran both orders interleaved, which also found the default order faster at the k/v and
        // down projections' shapes). Not for a long k (the
        // lm_head's input gradient), where a block's B panels alone outgrow L2.
        let b_outer = pb.len() * 4 > B_OUTER_BYTES && k <= 4096;
        // One task: row block ib, columns tj * NC.., the tile configuration loaded.
        let task = |t: usize| {
            let (ib, tj) = if b_outer {
                (t % row_blocks, t / row_blocks)
            } else {
                (t / col_tasks, t % col_tasks)
            };
            let mut tmp = [0f32; 1024];
            let i0 = ib * MB;
            let rows = MB.min(m - i0);
            let mut j0 = tj * NC;
            while j0 < n.min((tj + 1) * NC) {
                let jp = j0 / 16;
                let cols = MB.min(n - j0);
                // A whole block is stored into C directly; an edge block through `tmp`.
                let whole = rows == MB && cols == MB;
                let (dst, ldc) = if whole {
                    // SAFETY: rows i0..i0 + 32, columns j0..j0 + 32 lie inside C.
                    (unsafe { out.ptr().add(i0 * n + j0) }, n)
                } else {
                    (tmp.as_mut_ptr(), MB)
                };
                // SAFETY: the packed operands are padded to whole blocks; `dst` as above.
                unsafe {
                    block(
                        pa.as_ptr().add(i0 * kp),
                        kp,
                        pb.as_ptr().add(jp * (kp / 2) * 16),
                        pb.as_ptr().add((jp + 1) * (kp / 2) * 16),
                        dst,
                        ldc,
                    )
                };
                if !whole {
                    for r in 0..rows {
                        // SAFETY: row i0 + r, columns j0..j0 + cols lie inside C and this block.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.ptr().add((i0 + r) * n + j0), cols)
                        };
                        dst.copy_from_slice(&tmp[r * MB..r * MB + cols]);
                    }
                }
                j0 += MB;
            }
        };
        // Claimed ranges of tasks, the calling thread among the workers (util::parallel).
        let run = |range: std::ops::Range<usize>| {
            let cfg = &CONFIG;
            // SAFETY: a valid configuration; tiles are released when the range is done.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) cfg as *const TileConfig, options(nostack, readonly))
            };
            for t in range {
                task(t);
            }
            // SAFETY: releases this thread's tile state.
            unsafe { asm!("tilerelease", options(nostack)) };
        };
        crate::util::parallel::for_each_range(row_blocks * col_tasks, &run);
    }
}
