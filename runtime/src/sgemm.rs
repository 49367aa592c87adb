//! `C[m×n] = A[m×k] · B[k×n]`, row-major, f32, with `B` either plain (any row stride) or packed
//! ahead of time into panels of [`PANEL`] columns ([`pack_b`]), the layout kiln stores weights in.
//!
//! Both walk `B` panel by panel and, within a panel, `A` in blocks of rows: a block's products
//! accumulate in registers (AVX-512: 12 rows x 32 columns in 24 registers; AVX2: 6 x 16) while the
//! panel streams from cache, one row of it per step of `k`, and one element of `A` is broadcast per
//! row. A packed panel is contiguous (`k` rows of [`PANEL`] floats, zero beyond `n`), so the
//! stream is sequential; a plain `B` is read in place at its stride.

use crate::vector::Function;
use std::sync::OnceLock;

/// Columns per panel of a packed `B`.
pub const PANEL: usize = 32;

/// Computes the columns of one panel of `C` (`width` <= [`PANEL`] of them) for all `m` rows: the
/// panel of `B` starts at `b` with row stride `ldb`.
type PanelKernel =
    unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, *mut f32, usize);

fn panel_kernel() -> PanelKernel {
    static CHOSEN: OnceLock<PanelKernel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return x86::panel_avx512 as PanelKernel;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return x86::panel_avx2 as PanelKernel;
            }
        }
        panel_portable as PanelKernel
    })
}

/// What a product does to `C` once it is computed, `C = activation(C + bias) + residual`, row
/// by row over the run's team: a matrix product's bias, activation and residual add fused into
/// one call. (Finishing each panel's block right after computing it measured 5-10% slower at
/// MiniLM's shapes than whole rows afterwards: `cargo bench -p kiln-runtime --bench sgemm --
/// epilogue`.)
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Epilogue {
    /// `n` values, one per column, added to every row; or null.
    pub bias: *const f32,
    /// The [`Function`] code applied after the bias; 0 (or any other code) for none.
    pub activation: i64,
    /// A matrix of `C`'s shape, rows `ldc` apart, added last; or null.
    pub residual: *const f32,
}

// SAFETY: the bias and the residual are only read, by threads finishing disjoint rows of C.
unsafe impl Sync for Epilogue {}

impl Epilogue {
    /// `C = activation(C + bias) + residual` for the `m × n` matrix `C` (rows `ldc` apart), whole
    /// rows split over the run's team.
    ///
    /// # Safety
    /// `C` and the epilogue's operands hold those rows; `C` overlaps neither operand.
    unsafe fn finish(&self, m: usize, n: usize, c: *mut f32, ldc: usize) {
        let activation = Function::from_code(self.activation);
        if self.bias.is_null() && activation.is_none() && self.residual.is_null() {
            return;
        }
        let c = c as usize;
        crate::vector::split(m, m * n, &|rows| {
            for i in rows {
                // SAFETY: row i of C and of the residual, and the bias's n values, exist; C
                // overlaps neither (the caller's contract).
                let row =
                    unsafe { std::slice::from_raw_parts_mut((c as *mut f32).add(i * ldc), n) };
                if !self.bias.is_null() {
                    // SAFETY: as above.
                    let bias = unsafe { std::slice::from_raw_parts(self.bias, n) };
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                if let Some(function) = activation {
                    crate::vector::apply_in_place(function, row);
                }
                if !self.residual.is_null() {
                    // SAFETY: as above.
                    let residual =
                        unsafe { std::slice::from_raw_parts(self.residual.add(i * ldc), n) };
                    row.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
                }
            }
        });
    }
}

/// Converts a C API size or stride; negative ones make the product empty.
fn size(value: i64) -> usize {
    usize::try_from(value).unwrap_or(0)
}

/// `C = A · B` over f32, then the `epilogue` if it is not null: `A` is `m × k` with row stride
/// `lda`, `B` is `k × n` with row stride `ldb`, `C` is `m × n` with row stride `ldc` (all in
/// elements). `C` is overwritten.
///
/// # Safety
/// The pointers must address buffers holding the matrices at those strides, and `C` must not
/// overlap `A`, `B` or the epilogue's operands. Negative sizes or strides are treated as an
/// empty product.
#[no_mangle]
pub unsafe extern "C" fn kiln_sgemm(
    m: i64,
    n: i64,
    k: i64,
    a: *const f32,
    lda: i64,
    b: *const f32,
    ldb: i64,
    c: *mut f32,
    ldc: i64,
    epilogue: *const Epilogue,
) {
    let [m, n, k, lda, ldb, ldc] = [m, n, k, lda, ldb, ldc].map(size);
    let b = b as usize;
    // SAFETY: forwarded from the caller's contract; column j of B is inside B.
    unsafe {
        product(
            m,
            n,
            k,
            a,
            lda,
            c,
            ldc,
            &|_, j| (b as *const f32).wrapping_add(j),
            ldb,
        );
        if let Some(epilogue) = epilogue.as_ref() {
            epilogue.finish(m, n, c, ldc);
        }
    }
}

/// `C = A · B` with `B` packed by [`pack_b`], then the `epilogue` if it is not null: `A` is
/// `m × k` with row stride `lda`, `C` is `m × n` with row stride `ldc`. `C` is overwritten.
///
/// # Safety
/// `b_packed` must hold `B` packed for these `k` and `n`; `A` and `C` as for [`kiln_sgemm`].
#[no_mangle]
pub unsafe extern "C" fn kiln_sgemm_packed(
    m: i64,
    n: i64,
    k: i64,
    a: *const f32,
    lda: i64,
    b_packed: *const f32,
    c: *mut f32,
    ldc: i64,
    epilogue: *const Epilogue,
) {
    let [m, n, k, lda, ldc] = [m, n, k, lda, ldc].map(size);
    let b = b_packed as usize;
    // SAFETY: forwarded from the caller's contract; panel q holds k rows of PANEL floats (the
    // packing's layout).
    unsafe {
        product(
            m,
            n,
            k,
            a,
            lda,
            c,
            ldc,
            &|q, _| (b as *const f32).wrapping_add(q * k * PANEL),
            PANEL,
        );
        if let Some(epilogue) = epilogue.as_ref() {
            epilogue.finish(m, n, c, ldc);
        }
    }
}

/// Computes every panel of `C`, on the run's thread team when there is one: whole panels per
/// thread when there are enough of them, otherwise blocks of rows. `panel(q, j)` is the start
/// of panel `q` (first column `j`) of `B`, whose rows are `ldb` apart.
///
/// # Safety
/// As [`kiln_sgemm`], with `panel` giving pointers inside `B`.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    c: *mut f32,
    ldc: usize,
    panel: &(dyn Fn(usize, usize) -> *const f32 + Sync),
    ldb: usize,
) {
    let kernel = panel_kernel();
    let (a, c) = (a as usize, c as usize);
    for_each_block(m, n, k, &|rows, q| {
        let j = q * PANEL;
        let width = PANEL.min(n - j);
        let (a_rows, c_block) = (
            (a as *const f32).wrapping_add(rows.start * lda),
            (c as *mut f32).wrapping_add(rows.start * ldc + j),
        );
        // SAFETY: rows `rows` of A and C and panel q are inside the matrices.
        unsafe {
            kernel(
                rows.len(),
                width,
                k,
                a_rows,
                lda,
                panel(q, j),
                ldb,
                c_block,
                ldc,
            )
        };
    });
}

/// Runs `block(rows, q)` over every block of an `m × n` product (panel `q` of [`PANEL`]
/// columns, a range of rows) on the run's thread team when the product is large enough:
/// whole panels per thread when there are enough of them, otherwise blocks of rows.
fn for_each_block(
    m: usize,
    n: usize,
    k: usize,
    block: &(dyn Fn(std::ops::Range<usize>, usize) + Sync),
) {
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(PANEL);
    let threads = crate::pool::current_threads();
    let compute = |rows: std::ops::Range<usize>, quads: std::ops::Range<usize>| {
        for q in quads {
            block(rows.clone(), q);
        }
    };
    if threads < 2 || m * n * k < PARALLEL_WORK {
        compute(0..m, 0..panels);
    } else if panels >= threads {
        crate::pool::parallel_for(threads, &|t| {
            compute(0..m, t * panels / threads..(t + 1) * panels / threads)
        });
    } else {
        // Few panels (a narrow product): split the rows, in multiples of a tile's height.
        let blocks = m.div_ceil(ROW_BLOCK);
        crate::pool::parallel_for(threads, &|t| {
            let (first, last) = (t * blocks / threads, (t + 1) * blocks / threads);
            compute(first * ROW_BLOCK..(last * ROW_BLOCK).min(m), 0..panels);
        });
    }
}

/// One gated product, `C = silu(A · B_gate) ⊙ (A · B_up)`, as generated code lays it out:
/// 8-byte fields in this order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SwiGluCall {
    /// Rows of `A` and `C`.
    pub m: i64,
    /// Columns of `C` and of both weights.
    pub n: i64,
    /// Columns of `A`, rows of both weights.
    pub k: i64,
    /// `m × k`, rows `lda` apart.
    pub a: *const f32,
    /// Row stride of `A`.
    pub lda: i64,
    /// The gate weight, `k × n`.
    pub gate: *const f32,
    /// The up weight, laid out as the gate.
    pub up: *const f32,
    /// Non-zero: both weights are packed by [`pack_b`]; zero: row-major, rows `ldb` apart.
    pub packed: i64,
    /// Row stride of unpacked weights.
    pub ldb: i64,
    /// `m × n`, rows `ldc` apart; overwritten, overlapping no operand.
    pub c: *mut f32,
    /// Row stride of `C`.
    pub ldc: i64,
}

/// Rows of a gated block computed at a time: the up product's block waits in a buffer of this
/// many rows of a panel (a multiple of every path's tile height).
const GATED_ROWS: usize = 48;

/// Computes a gated product: for each block, the gate product into `C`, the up product into a
/// buffer, then `C = silu(C) * buffer`, each rounded as the unfused ops round it.
///
/// # Safety
/// `call` must point to a [`SwiGluCall`] whose pointers address matrices of those shapes and
/// strides. Negative sizes or strides are treated as an empty product.
#[no_mangle]
pub unsafe extern "C" fn kiln_swiglu(call: *const SwiGluCall) {
    // SAFETY: the caller's contract.
    let call = unsafe { *call };
    let [m, n, k, lda, ldb, ldc] = [call.m, call.n, call.k, call.lda, call.ldb, call.ldc].map(size);
    let kernel = panel_kernel();
    let (a, gate, up, c) = (
        call.a as usize,
        call.gate as usize,
        call.up as usize,
        call.c as usize,
    );
    let packed = call.packed != 0;
    // Panel q of a weight and its row stride.
    let panel = move |weight: usize, q: usize| {
        if packed {
            ((weight as *const f32).wrapping_add(q * k * PANEL), PANEL)
        } else {
            ((weight as *const f32).wrapping_add(q * PANEL), ldb)
        }
    };
    for_each_block(m, n, k, &|rows, q| {
        let j = q * PANEL;
        let width = PANEL.min(n - j);
        let mut buffer = [0f32; GATED_ROWS * PANEL];
        for start in rows.clone().step_by(GATED_ROWS) {
            let count = GATED_ROWS.min(rows.end - start);
            let a_rows = (a as *const f32).wrapping_add(start * lda);
            let c_block = (c as *mut f32).wrapping_add(start * ldc + j);
            let ((gate_panel, gate_ld), (up_panel, up_ld)) = (panel(gate, q), panel(up, q));
            // SAFETY: these rows of A and C and panel q of each weight are inside the matrices;
            // the buffer holds `count` rows of PANEL floats.
            unsafe {
                kernel(
                    count, width, k, a_rows, lda, gate_panel, gate_ld, c_block, ldc,
                );
                kernel(
                    count,
                    width,
                    k,
                    a_rows,
                    lda,
                    up_panel,
                    up_ld,
                    buffer.as_mut_ptr(),
                    PANEL,
                );
            }
            for (r, up_row) in buffer.chunks_exact(PANEL).take(count).enumerate() {
                // SAFETY: row `start + r` of this block of C.
                let row = unsafe { std::slice::from_raw_parts_mut(c_block.add(r * ldc), width) };
                crate::vector::apply_in_place(Function::Silu, row);
                row.iter_mut().zip(up_row).for_each(|(g, u)| *g *= u);
            }
        }
    });
}

/// Products smaller than this many multiply-adds run on one thread: waking the team costs more.
const PARALLEL_WORK: usize = 1 << 16;

/// Rows split between threads come in multiples of this (a multiple of every path's tile height).
const ROW_BLOCK: usize = 12;

/// The number of floats [`pack_b`] writes for a `k × n` matrix.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(PANEL) * k * PANEL
}

/// Packs `B` (`k × n`; element `(p, j)` at `b[p * n + j]`, or at `b[j * k + p]` when
/// `transposed`) into panels of [`PANEL`] columns: panel `q` holds rows `0..k` of columns
/// `q * PANEL..`, each row [`PANEL`] floats, zero past column `n`.
///
/// # Panics
/// If `b` holds fewer than `k * n` floats.
pub fn pack_b(k: usize, n: usize, b: &[f32], transposed: bool) -> Vec<f32> {
    assert!(
        b.len() >= k * n,
        "B holds {} floats, not {k} x {n}",
        b.len()
    );
    let mut packed = vec![0.0; packed_len(k, n)];
    for (panel, chunk) in packed.chunks_mut((k * PANEL).max(1)).enumerate() {
        for (p, row) in chunk.chunks_mut(PANEL).enumerate() {
            for (jj, value) in row.iter_mut().enumerate() {
                let j = panel * PANEL + jj;
                if j < n {
                    *value = if transposed {
                        b[j * k + p]
                    } else {
                        b[p * n + j]
                    };
                }
            }
        }
    }
    packed
}

/// The portable path: one output at a time, a dot product along `k`.
///
/// # Safety
/// As [`PanelKernel`]: `A` holds `m` rows of `k`, the panel `k` rows of `width` at `ldb`, `C` `m`
/// rows of `width` at `ldc`.
#[allow(clippy::too_many_arguments)] // The BLAS argument list, kept for recognizability.
unsafe fn panel_portable(
    m: usize,
    width: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    for i in 0..m {
        for j in 0..width {
            let mut sum = 0.0f32;
            for p in 0..k {
                // SAFETY: A[i, p] and B[p, j] are inside the matrices.
                sum = unsafe { (*a.add(i * lda + p)).mul_add(*b.add(p * ldb + j), sum) };
            }
            // SAFETY: C[i, j] is inside C.
            unsafe { *c.add(i * ldc + j) = sum };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows of `C` an AVX-512 tile holds: 12 x 2 accumulators, 2 panel loads and a broadcast fit
    /// in the 32 vector registers.
    const ROWS_AVX512: usize = 12;

    /// How many rows of the panel ahead of the current one the AVX-512 tile prefetches.
    const PREFETCH_ROWS: usize = 16;

    /// Rows of `C` an AVX2 tile holds: 6 x 2 accumulators of the 16 registers.
    const ROWS_AVX2: usize = 6;

    /// # Safety
    /// As [`super::PanelKernel`], on a CPU with AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_avx512(
        m: usize,
        width: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mask_of = |w: usize| -> __mmask16 {
            if w >= 16 {
                0xffff
            } else {
                (1u16 << w) - 1
            }
        };
        let masks = [mask_of(width), mask_of(width.saturating_sub(16))];
        let mut i = 0;
        while i < m {
            let rows = ROWS_AVX512.min(m - i);
            // SAFETY: rows i.. of A and C are inside the matrices.
            let (a, c) = unsafe { (a.add(i * lda), c.add(i * ldc)) };
            // SAFETY: forwarded; the tile reads `rows` rows of A and writes `rows` rows of C.
            unsafe {
                match rows {
                    12 => tile_avx512::<12>(k, a, lda, b, ldb, c, ldc, masks),
                    11 => tile_avx512::<11>(k, a, lda, b, ldb, c, ldc, masks),
                    10 => tile_avx512::<10>(k, a, lda, b, ldb, c, ldc, masks),
                    9 => tile_avx512::<9>(k, a, lda, b, ldb, c, ldc, masks),
                    8 => tile_avx512::<8>(k, a, lda, b, ldb, c, ldc, masks),
                    7 => tile_avx512::<7>(k, a, lda, b, ldb, c, ldc, masks),
                    6 => tile_avx512::<6>(k, a, lda, b, ldb, c, ldc, masks),
                    5 => tile_avx512::<5>(k, a, lda, b, ldb, c, ldc, masks),
                    4 => tile_avx512::<4>(k, a, lda, b, ldb, c, ldc, masks),
                    3 => tile_avx512::<3>(k, a, lda, b, ldb, c, ldc, masks),
                    2 => tile_avx512::<2>(k, a, lda, b, ldb, c, ldc, masks),
                    _ => tile_avx512::<1>(k, a, lda, b, ldb, c, ldc, masks),
                }
            }
            i += rows;
        }
    }

    /// `R` rows by up to 32 columns (the lanes `masks` select), accumulated over all of `k`.
    ///
    /// # Safety
    /// `A` holds `R` rows of `k` at `lda`; the masked lanes of `k` rows of the panel at `ldb` and
    /// of `R` rows of `C` at `ldc` are inside their matrices.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_avx512<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        masks: [__mmask16; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..k {
            // The first row block meets each panel row cold: fetch a few rows ahead (a prefetch
            // never faults, so past the panel's end it is merely wasted).
            let ahead = b.wrapping_add((p + PREFETCH_ROWS) * ldb);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
            // SAFETY: the masked lanes of row p of the panel are inside B.
            let (y0, y1) = unsafe {
                (
                    _mm512_maskz_loadu_ps(masks[0], b.add(p * ldb)),
                    _mm512_maskz_loadu_ps(masks[1], b.add(p * ldb + 16)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: A[r, p] is inside A.
                let x = _mm512_set1_ps(unsafe { *a.add(r * lda + p) });
                acc[0] = _mm512_fmadd_ps(x, y0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, y1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: the masked lanes of row r of C are inside C.
            unsafe {
                _mm512_mask_storeu_ps(c.add(r * ldc), masks[0], acc[0]);
                _mm512_mask_storeu_ps(c.add(r * ldc + 16), masks[1], acc[1]);
            }
        }
    }

    /// # Safety
    /// As [`super::PanelKernel`], on a CPU with AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_avx2(
        m: usize,
        width: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let lane_mask = |start: usize| {
            let lanes: [i32; 8] = std::array::from_fn(|l| if start + l < width { -1 } else { 0 });
            // SAFETY: eight i32 read from an array of eight.
            unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
        };
        for half in (0..width).step_by(16) {
            let masks = [lane_mask(half), lane_mask(half + 8)];
            // Masked loads and stores are slow on some CPUs (AMD's are microcoded): whole
            // 16-column blocks use plain ones.
            let whole = half + 16 <= width;
            let mut i = 0;
            while i < m {
                let rows = ROWS_AVX2.min(m - i);
                // SAFETY: rows i.. of A and C, columns half.. of the panel and C, are inside.
                let (a, b, c) = unsafe { (a.add(i * lda), b.add(half), c.add(i * ldc + half)) };
                // SAFETY: forwarded; the tile reads `rows` rows of A and writes `rows` of C.
                unsafe {
                    match (rows, whole) {
                        (6, true) => tile_avx2::<6, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (5, true) => tile_avx2::<5, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (4, true) => tile_avx2::<4, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (3, true) => tile_avx2::<3, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (2, true) => tile_avx2::<2, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (_, true) => tile_avx2::<1, true>(k, a, lda, b, ldb, c, ldc, masks),
                        (6, false) => tile_avx2::<6, false>(k, a, lda, b, ldb, c, ldc, masks),
                        (5, false) => tile_avx2::<5, false>(k, a, lda, b, ldb, c, ldc, masks),
                        (4, false) => tile_avx2::<4, false>(k, a, lda, b, ldb, c, ldc, masks),
                        (3, false) => tile_avx2::<3, false>(k, a, lda, b, ldb, c, ldc, masks),
                        (2, false) => tile_avx2::<2, false>(k, a, lda, b, ldb, c, ldc, masks),
                        (_, false) => tile_avx2::<1, false>(k, a, lda, b, ldb, c, ldc, masks),
                    }
                }
                i += rows;
            }
        }
    }

    /// `R` rows by up to 16 columns (the lanes `masks` select, or all 16 when `WHOLE`),
    /// accumulated over all of `k`.
    ///
    /// # Safety
    /// As [`tile_avx512`], for 16 columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const R: usize, const WHOLE: bool>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        masks: [__m256i; 2],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..k {
            // SAFETY: the masked lanes (all 16 when whole) of row p of the panel are inside B.
            let (y0, y1) = unsafe {
                if WHOLE {
                    (
                        _mm256_loadu_ps(b.add(p * ldb)),
                        _mm256_loadu_ps(b.add(p * ldb + 8)),
                    )
                } else {
                    (
                        _mm256_maskload_ps(b.add(p * ldb), masks[0]),
                        _mm256_maskload_ps(b.add(p * ldb + 8), masks[1]),
                    )
                }
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: A[r, p] is inside A.
                let x = _mm256_set1_ps(unsafe { *a.add(r * lda + p) });
                acc[0] = _mm256_fmadd_ps(x, y0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, y1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: the masked lanes (all 16 when whole) of row r of C are inside C.
            unsafe {
                if WHOLE {
                    _mm256_storeu_ps(c.add(r * ldc), acc[0]);
                    _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
                } else {
                    _mm256_maskstore_ps(c.add(r * ldc), masks[0], acc[0]);
                    _mm256_maskstore_ps(c.add(r * ldc + 8), masks[1], acc[1]);
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn paths() -> Vec<(&'static str, super::PanelKernel)> {
        let mut paths: Vec<(&'static str, super::PanelKernel)> = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            paths.push(("avx512", panel_avx512 as super::PanelKernel));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            paths.push(("avx2", panel_avx2 as super::PanelKernel));
        }
        paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        (0..m * n)
            .map(|e| {
                (0..k)
                    .map(|p| f64::from(a[(e / n) * k + p]) * f64::from(b[p * n + e % n]))
                    .sum()
            })
            .collect()
    }

    fn every_path() -> Vec<(&'static str, PanelKernel)> {
        #[allow(unused_mut)]
        let mut paths: Vec<(&'static str, PanelKernel)> =
            vec![("portable", panel_portable as PanelKernel)];
        #[cfg(target_arch = "x86_64")]
        paths.extend(x86::paths());
        paths
    }

    /// Runs `product` into a C with a guard column on each side and checks it against the f64
    /// reference and that nothing was written outside C.
    fn check(
        name: &str,
        m: usize,
        n: usize,
        expected: &[f64],
        product: impl FnOnce(*mut f32, usize),
    ) -> Result<(), TestCaseError> {
        let ldc = n + 2;
        let mut c = vec![f32::NAN; m * ldc];
        // SAFETY: C's first element is inside the buffer.
        product(unsafe { c.as_mut_ptr().add(1) }, ldc);
        for i in 0..m {
            prop_assert!(c[i * ldc].is_nan(), "{}: wrote before row {}", name, i);
            for j in 0..n {
                let (got, want) = (f64::from(c[i * ldc + 1 + j]), expected[i * n + j]);
                prop_assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{} at ({}, {}): {} vs {}",
                    name,
                    i,
                    j,
                    got,
                    want
                );
            }
            if i * ldc + n + 1 < c.len() {
                prop_assert!(
                    c[i * ldc + n + 1].is_nan(),
                    "{}: wrote after row {}",
                    name,
                    i
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Every path, plain and packed (from either layout), against an f64 reference, including
        /// row and column tails.
        #[test]
        fn every_path_matches_a_naive_product(m in 1usize..30, n in 1usize..70, k in 0usize..20, seed in any::<u32>()) {
            let value = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0;
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 7919)).collect();
            let b_transposed: Vec<f32> = (0..n * k).map(|e| b[(e % k) * n + e / k]).collect();
            let expected = naive(m, n, k, &a, &b);
            let packed = pack_b(k, n, &b, false);
            prop_assert_eq!(&pack_b(k, n, &b_transposed, true), &packed);
            for (name, kernel) in every_path() {
                check(name, m, n, &expected, |c, ldc| {
                    for j in (0..n).step_by(PANEL) {
                        // SAFETY: the buffers hold the matrices at these strides.
                        unsafe { kernel(m, PANEL.min(n - j), k, a.as_ptr(), k, b.as_ptr().add(j), n, c.add(j), ldc) };
                    }
                })?;
                check(name, m, n, &expected, |c, ldc| {
                    for (q, j) in (0..n).step_by(PANEL).enumerate() {
                        // SAFETY: the packed panels hold k rows of PANEL floats each.
                        unsafe { kernel(m, PANEL.min(n - j), k, a.as_ptr(), k, packed.as_ptr().add(q * k * PANEL), PANEL, c.add(j), ldc) };
                    }
                })?;
            }
            // SAFETY: as above, through the exported entry points.
            check("kiln_sgemm", m, n, &expected, |c, ldc| unsafe {
                kiln_sgemm(m as i64, n as i64, k as i64, a.as_ptr(), k as i64, b.as_ptr(), n as i64, c, ldc as i64, std::ptr::null())
            })?;
            // SAFETY: as above.
            check("kiln_sgemm_packed", m, n, &expected, |c, ldc| unsafe {
                kiln_sgemm_packed(m as i64, n as i64, k as i64, a.as_ptr(), k as i64, packed.as_ptr(), c, ldc as i64, std::ptr::null())
            })?;
        }

        /// The gated product, plain and packed, against silu and products in f64, over more
        /// rows than one gated block.
        #[test]
        fn the_gated_product_matches_silu_times_up(m in 1usize..100, n in 1usize..70, k in 1usize..20, seed in any::<u32>()) {
            let value = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0;
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let gate: Vec<f32> = (0..k * n).map(|i| value(i + 7919)).collect();
            let up: Vec<f32> = (0..k * n).map(|i| value(i + 104_729)).collect();
            let expected: Vec<f64> = naive(m, n, k, &a, &gate)
                .iter()
                .zip(naive(m, n, k, &a, &up))
                .map(|(&g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let (gate_packed, up_packed) = (pack_b(k, n, &gate, false), pack_b(k, n, &up, false));
            for (name, gate, up, packed) in [
                ("kiln_swiglu", &gate, &up, 0),
                ("kiln_swiglu packed", &gate_packed, &up_packed, 1),
            ] {
                check(name, m, n, &expected, |c, ldc| {
                    let call = SwiGluCall {
                        m: m as i64,
                        n: n as i64,
                        k: k as i64,
                        a: a.as_ptr(),
                        lda: k as i64,
                        gate: gate.as_ptr(),
                        up: up.as_ptr(),
                        packed,
                        ldb: n as i64,
                        c,
                        ldc: ldc as i64,
                    };
                    // SAFETY: the call describes these buffers.
                    unsafe { kiln_swiglu(&call) }
                })?;
            }
        }

        /// The epilogue, `activation(C + bias) + residual`, on both entry points, with a residual
        /// at C's row stride.
        #[test]
        fn the_epilogue_finishes_every_row(m in 1usize..30, n in 1usize..70, k in 1usize..20, function in 0usize..7, seed in any::<u32>()) {
            let value = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0;
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 7919)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i + 31)).collect();
            let ldc = n + 2;
            let residual: Vec<f32> = (0..m * ldc).map(|i| value(i + 101)).collect();
            let activation = Function::ALL.get(function).copied();
            let expected: Vec<f64> = naive(m, n, k, &a, &b)
                .iter()
                .enumerate()
                .map(|(e, &sum)| {
                    let biased = sum + f64::from(bias[e % n]);
                    let activated = activation.map_or(biased, |f| f64::from(f.scalar(biased as f32)));
                    activated + f64::from(residual[(e / n) * ldc + 1 + e % n])
                })
                .collect();
            let epilogue = Epilogue {
                bias: bias.as_ptr(),
                activation: activation.map_or(0, |f| f as i64),
                // SAFETY: the residual's first element is at C's offset inside its buffer.
                residual: unsafe { residual.as_ptr().add(1) },
            };
            let packed = pack_b(k, n, &b, false);
            // SAFETY: the buffers hold the matrices at these strides.
            check("kiln_sgemm with an epilogue", m, n, &expected, |c, ldc| unsafe {
                kiln_sgemm(m as i64, n as i64, k as i64, a.as_ptr(), k as i64, b.as_ptr(), n as i64, c, ldc as i64, &epilogue)
            })?;
            // SAFETY: as above.
            check("kiln_sgemm_packed with an epilogue", m, n, &expected, |c, ldc| unsafe {
                kiln_sgemm_packed(m as i64, n as i64, k as i64, a.as_ptr(), k as i64, packed.as_ptr(), c, ldc as i64, &epilogue)
            })?;
        }
    }
}
