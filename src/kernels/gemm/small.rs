//! f32 products with one small side: a LoRA rank (x A^T, h B^T and their gradients) or an
//! attention head's width (q k^T, P v and theirs), at the few hundred rows of a training pass.
//!
//! A general GEMM packs both operands into cache-sized panels first; with r = 16 columns or a
//! 16-long inner dimension that packing and the per-call setup cost as much as the product
//! (gemmkit ran these at 62-113 GFLOP/s in a real-data step's profile, against 900 on the large
//! frozen products). Here op(A) is read in place, one broadcast per element, and op(B) is read
//! in place when its rows are contiguous (copied to rows once otherwise): each output tile of
//! MR rows x up to 64 columns stays in registers for the whole inner dimension and is written
//! once.
//!
//! Each output value is one FMA chain over k in order, whatever the split over threads, so the
//! result does not depend on the thread count.
use super::{Causal, MatRef};
use crate::util::env::FlagSetting;

/// Whether this kernel runs the f32 product (m, n, k) on this CPU: one side at most
/// [`SMALL`] (the output's width or the inner dimension) or at most 16 output rows.
pub(super) fn takes(m: usize, n: usize, k: usize) -> bool {
    active() && (n <= SMALL || k <= SMALL || m <= 16)
}

/// The largest "small" output width or inner dimension: one tile's four vectors.
const SMALL: usize = 64;

/// `KTO_TRAIN_SMALL_GEMM=0` leaves these products to gemmkit.
static SWITCH: FlagSetting = FlagSetting::new("KTO_TRAIN_SMALL_GEMM", true);

/// Turns the kernel on (where the CPU has it) or off for the whole process (benches compare it
/// with gemmkit).
pub(super) fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether the kernel runs here: the CPU has AVX-512F and it is not turned off.
pub(super) fn active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && SWITCH.get()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c = op(a) @ op(b) + beta * c`; `c` is dense row-major [m, n].
///
/// # Safety
/// As `native::sgemm`: the operands passed `super::check` for (m, n, k), `c` points to m * n
/// writable values (initialized when `beta` is not 0), and [`takes`] returned true.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    beta: f32,
    c: *mut f32,
    causal: Option<Causal>,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; AVX-512F was detected by `takes`.
    unsafe {
        avx512::sgemm(m, n, k, a, b, beta, c, causal)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, a, b, beta, c, causal);
        unreachable!("small::takes is false off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Causal, MatRef};
    use std::arch::x86_64::*;

    /// op(M)'s (row stride, column stride) in elements.
    fn strides(m: &MatRef<'_, f32>) -> (usize, usize) {
        if m.trans {
            (1, m.ld)
        } else {
            (m.ld, 1)
        }
    }

    /// Products below this many multiply-adds run on the calling thread: handing work to
    /// rayon's workers costs a few microseconds, the time of such a product.
    const PARALLEL_FROM: usize = 1 << 16;

    /// Pointers that the tasks share: the operands read, the output written in disjoint tiles.
    #[derive(Clone, Copy)]
    struct Ptrs {
        a: *const f32,
        b: *const f32,
        c: *mut f32,
    }
    // SAFETY: the operands are only read, and every task writes disjoint tiles of C.
    unsafe impl Send for Ptrs {}
    unsafe impl Sync for Ptrs {}

    impl Ptrs {
        // A method, so that closures capture the whole (Sync) value, not its raw fields.
        fn get(&self) -> (*const f32, *const f32, *mut f32) {
            (self.a, self.b, self.c)
        }
    }

    /// op(A) as a tile reads it: row-major (rows at stride `rs`, each contiguous), or
    /// column-major (`cs` between columns, a column's rows adjacent: a transposed operand, whose
    /// tile rows are then read at constant offsets).
    #[derive(Clone, Copy)]
    struct ALayout {
        rs: usize,
        cs: usize,
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        beta: f32,
        c: *mut f32,
        causal: Option<Causal>,
    ) {
        // op(B) with contiguous rows, as the tiles load them: in place, or copied once (read
        // along the stored rows, which are op(B)'s columns).
        let (rsb, csb) = strides(&b);
        let copy;
        let (bp, ldb) = if csb == 1 {
            (b.data.as_ptr(), rsb)
        } else if csb > i32::MAX as usize / 16 {
            // Beyond the gather's 32-bit indices: column by column.
            let mut t = vec![0f32; k * n];
            for j in 0..n {
                for p in 0..k {
                    t[p * n + j] = b.data[j * csb + p * rsb];
                }
            }
            copy = Rows {
                data: t,
                start: 0,
                ld: n,
            };
            copy.rows()
        } else {
            // SAFETY: op(B) [k, n] lies within `b` (the caller's contract).
            copy = unsafe { rows_of(b.data.as_ptr(), rsb, csb, k, n) };
            copy.rows()
        };
        let (rsa, csa) = strides(&a);
        let al = ALayout { rs: rsa, cs: csa };
        let ptrs = Ptrs {
            a: a.data.as_ptr(),
            b: bp,
            c,
        };
        let nv = n.min(super::SMALL).div_ceil(16);
        // Tile rows for the tile's vectors: at most 28 of the 32 registers hold accumulators.
        // SAFETY (all arms): the caller's contract; `bp` holds k rows of n values at `ldb`.
        unsafe {
            match (a.trans, nv) {
                (true, 1) => tiles::<16, 1, true>(m, n, k, ptrs, al, ldb, beta, causal),
                (true, 2) => tiles::<12, 2, true>(m, n, k, ptrs, al, ldb, beta, causal),
                (true, 3) => tiles::<8, 3, true>(m, n, k, ptrs, al, ldb, beta, causal),
                (true, _) => tiles::<6, 4, true>(m, n, k, ptrs, al, ldb, beta, causal),
                (false, 1) => tiles::<12, 1, false>(m, n, k, ptrs, al, ldb, beta, causal),
                (false, 2) => tiles::<12, 2, false>(m, n, k, ptrs, al, ldb, beta, causal),
                (false, 3) => tiles::<8, 3, false>(m, n, k, ptrs, al, ldb, beta, causal),
                (false, _) => tiles::<6, 4, false>(m, n, k, ptrs, al, ldb, beta, causal),
            }
        }
    }

    /// A copy of op(B) whose rows start on cache lines, so that no vector load of a row
    /// straddles two lines.
    struct Rows {
        data: Vec<f32>,
        start: usize,
        ld: usize,
    }

    impl Rows {
        fn rows(&self) -> (*const f32, usize) {
            (self.data[self.start..].as_ptr(), self.ld)
        }
    }

    /// op(B) [k, n] (column stride `cs`, row stride `rs`) copied to rows: for each row, 16
    /// columns at a time gathered in one instruction (a scalar loop writing the copy's strided
    /// columns cost as much as the product it served).
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_of(b: *const f32, rs: usize, cs: usize, k: usize, n: usize) -> Rows {
        let ld = n.next_multiple_of(16);
        let mut data: Vec<f32> = Vec::with_capacity(k * ld + 16);
        let start = data.as_ptr().align_offset(64).min(15);
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(cs as i32),
        );
        let t = data.as_mut_ptr().wrapping_add(start);
        for j0 in (0..ld).step_by(16) {
            let left = n.saturating_sub(j0);
            let mask: __mmask16 = if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            for p in 0..k {
                // SAFETY: columns j0..j0 + 16 (masked to n) of row p lie within op(B); the
                // copy has room for k rows of `ld` values after `start`. Columns past n are
                // written as zeros.
                unsafe {
                    let src = b.add(j0 * cs + p * rs);
                    let v =
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, src.cast());
                    _mm512_storeu_ps(t.add(p * ld + j0), v);
                }
            }
        }
        // SAFETY: the `start` values before the first row are zeroed here, the rows were
        // written above.
        unsafe {
            std::ptr::write_bytes(data.as_mut_ptr(), 0, start);
            data.set_len(start + k * ld);
        }
        Rows { data, start, ld }
    }

    /// Splits C into tiles of MR rows x 16 NV columns and runs them, shared with rayon's
    /// workers (`util::parallel`) when the product is large enough. With a column-major op(A)
    /// (`A_T`), the last, partial row block reads a zero-padded copy of its rows, so that every
    /// tile reads MR rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles<const MR: usize, const NV: usize, const A_T: bool>(
        m: usize,
        n: usize,
        k: usize,
        ptrs: Ptrs,
        al: ALayout,
        ldb: usize,
        beta: f32,
        causal: Option<Causal>,
    ) {
        let nr = 16 * NV;
        let (row_blocks, panels) = (m.div_ceil(MR), n.div_ceil(nr));
        let count = row_blocks * panels;
        let full = m / MR;
        let edge: Vec<f32> = if A_T && full < row_blocks {
            let mut e = vec![0f32; k * MR];
            for p in 0..k {
                for r in 0..m - full * MR {
                    // SAFETY: row full * MR + r < m and column p < k of op(A).
                    e[p * MR + r] = unsafe { *ptrs.a.add((full * MR + r) * al.rs + p * al.cs) };
                }
            }
            e
        } else {
            Vec::new()
        };
        let edge_ptr = edge.as_ptr() as usize;
        // Tile t: row block t / panels, panel t % panels, so that a row block's A stays in L1
        // across its panels; with a few rows only (LoRA's dA = dh^T x: 16 rows, x of 1,024
        // tokens x 960 = 3.75 MiB), panel by panel instead, so that each panel of B is read
        // from memory once, not once per row block.
        let by_panel = m <= 16;
        let run = |range: std::ops::Range<usize>| {
            let (pa, pb, pc) = ptrs.get();
            for t in range {
                let (blk, panel) = if by_panel {
                    (t % row_blocks, t / row_blocks)
                } else {
                    (t / panels, t % panels)
                };
                let j0 = panel * nr;
                let i0 = blk * MR;
                let (rows, cols) = (MR.min(m - i0), nr.min(n - j0));
                let terms = match causal {
                    None => Terms::all(k),
                    Some(cm) => match Terms::of(cm, k, i0..i0 + rows, j0) {
                        Some(terms) => terms,
                        None => {
                            // Entries past every row's position: never read, written zero.
                            // SAFETY: the tile lies within C [m, n].
                            unsafe { zero_tile(pc.add(i0 * n + j0), n, rows, cols) };
                            continue;
                        }
                    },
                };
                let (a, al) = if A_T && blk == full {
                    (edge_ptr as *const f32, ALayout { rs: 1, cs: MR })
                } else {
                    (pa.wrapping_add(i0 * al.rs), al)
                };
                // SAFETY: the tile lies within op(A) [m, k] (or its padded copy), op(B) [k, n]
                // and C [m, n].
                unsafe {
                    tile::<MR, NV, A_T>(
                        terms.ranges(),
                        a,
                        al,
                        pb.add(j0),
                        ldb,
                        pc.add(i0 * n + j0),
                        n,
                        (rows, cols),
                        beta,
                    )
                }
            }
        };
        if m * n * k < PARALLEL_FROM || count == 1 {
            run(0..count);
        } else {
            crate::util::parallel::for_each_range(count, &run);
        }
    }

    /// The inner indices a tile sums over: all of k, or what a causal mask leaves (see
    /// [`Causal`]): the keys up to the tile's last row position, or per head block the query
    /// rows at or after the tile's first key. Head blocks beyond this many take the whole range.
    struct Terms {
        ranges: [(usize, usize); MAX_BLOCKS],
        len: usize,
    }

    const MAX_BLOCKS: usize = 32;

    impl Terms {
        fn all(k: usize) -> Self {
            let mut ranges = [(0, 0); MAX_BLOCKS];
            ranges[0] = (0, k);
            Terms { ranges, len: 1 }
        }

        /// The tile's terms, or `None` when it holds only never-read entries (`Scores`).
        fn of(causal: Causal, k: usize, rows: std::ops::Range<usize>, col0: usize) -> Option<Self> {
            let (Causal::Scores { t_q, .. }
            | Causal::RowsByKeys { t_q, .. }
            | Causal::KeysByRows { t_q, .. }) = causal;
            if t_q == 0 {
                return Some(Terms::all(k));
            }
            // The last row's position is the tile's largest unless a head block starts inside
            // the tile: then some row ends its block (position offset + t_q - 1).
            let last_pos = |t_q: usize, offset: usize| {
                let (first, last) = (rows.start, rows.end - 1);
                if first / t_q != last / t_q {
                    offset + t_q - 1
                } else {
                    offset + last % t_q
                }
            };
            match causal {
                Causal::Scores { t_q, offset } => {
                    (col0 <= last_pos(t_q, offset)).then(|| Terms::all(k))
                }
                Causal::RowsByKeys { t_q, offset } => {
                    Some(Terms::all(k.min(last_pos(t_q, offset) + 1)))
                }
                Causal::KeysByRows { t_q, offset } => {
                    // Key j is seen by the rows of each block at positions >= j.
                    let skip = rows.start.saturating_sub(offset).min(t_q);
                    let blocks = k.div_ceil(t_q);
                    if blocks > MAX_BLOCKS {
                        return Some(Terms::all(k));
                    }
                    let mut ranges = [(0, 0); MAX_BLOCKS];
                    for (h, r) in ranges.iter_mut().take(blocks).enumerate() {
                        *r = ((h * t_q + skip).min(k), ((h + 1) * t_q).min(k));
                    }
                    Some(Terms {
                        ranges,
                        len: blocks,
                    })
                }
            }
        }

        fn ranges(&self) -> &[(usize, usize)] {
            &self.ranges[..self.len]
        }
    }

    /// Zeros into a `rows` x `cols` block of C (row stride `ldc`).
    unsafe fn zero_tile(c: *mut f32, ldc: usize, rows: usize, cols: usize) {
        for r in 0..rows {
            // SAFETY: the caller passes a block within C.
            unsafe { std::ptr::write_bytes(c.add(r * ldc), 0, cols) };
        }
    }

    /// One tile: `rows` x `cols` of C (at most MR x 16 NV), the sum over the inner indices in
    /// `terms` (ranges; all of k without a causal mask) of op(A)'s columns times op(B)'s rows
    /// (stride `ldb`, contiguous). Row-major op(A): rows past `rows` repeat the
    /// last one (computed, not written), so that the loop over the tile's rows has a constant
    /// bound and its accumulators stay in registers. Column-major (`A_T`): all MR rows exist.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize, const NV: usize, const A_T: bool>(
        terms: &[(usize, usize)],
        a: *const f32,
        al: ALayout,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        beta: f32,
    ) {
        let mask = |v: usize| -> __mmask16 {
            let left = cols.saturating_sub(16 * v);
            if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            }
        };
        let masks: [__mmask16; NV] = std::array::from_fn(mask);
        let rows_at: [*const f32; MR] =
            std::array::from_fn(|r| a.wrapping_add(r.min(rows - 1) * al.rs));
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        // SAFETY (all below): the caller passes a tile within the operands; masked loads and
        // stores touch only the valid columns.
        // The ranges outermost and a plain loop over each (a flattened iterator cost the inner
        // loop its registers: the real unit's products took 0.79 s per step instead of 0.59).
        for &(p0, p1) in terms {
            for p in p0..p1 {
                let bp = b.wrapping_add(p * ldb);
                let bv: [__m512; NV] = std::array::from_fn(|v| unsafe {
                    _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v))
                });
                let off = p * al.cs;
                for r in 0..MR {
                    let x = if A_T {
                        unsafe { *a.add(off + r) }
                    } else {
                        unsafe { *rows_at[r].add(off) }
                    };
                    let av = _mm512_set1_ps(x);
                    for v in 0..NV {
                        acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                    }
                }
            }
        }
        let bb = _mm512_set1_ps(beta);
        for (r, row) in acc.iter().enumerate() {
            if r < rows {
                for v in 0..NV {
                    let p = unsafe { c.add(r * ldc + 16 * v) };
                    let x = if beta == 0.0 {
                        row[v]
                    } else {
                        let old = unsafe { _mm512_maskz_loadu_ps(masks[v], p) };
                        _mm512_fmadd_ps(bb, old, row[v])
                    };
                    unsafe { _mm512_mask_storeu_ps(p, masks[v], x) };
                }
            }
        }
    }
}
