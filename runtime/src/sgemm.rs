//! `C[m×n] = A[m×k] · B[k×n]`, all row-major with leading dimensions, f32.
//!
//! The vector paths hold a block of six rows of `C` by one or two vectors of columns in registers and
//! stream `B` row by row, broadcasting one element of `A` per row: no packing yet, so they reach a
//! fraction of the machine's peak (packed panels are the next step).

use std::sync::OnceLock;

type Kernel = unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, *mut f32, usize);

fn kernel() -> Kernel {
    static CHOSEN: OnceLock<Kernel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return x86::sgemm_avx512 as Kernel;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return x86::sgemm_avx2 as Kernel;
            }
        }
        sgemm_portable as Kernel
    })
}

/// `C = A · B` over f32: `A` is `m × k` with row stride `lda`, `B` is `k × n` with row stride
/// `ldb`, `C` is `m × n` with row stride `ldc` (all in elements). `C` is overwritten.
///
/// # Safety
/// The pointers must address buffers holding the matrices at those strides, and `C` must not
/// overlap `A` or `B`. Negative sizes or strides are treated as an empty product.
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
) {
    let dims = [m, n, k, lda, ldb, ldc].map(|v| usize::try_from(v).unwrap_or(0));
    let [m, n, k, lda, ldb, ldc] = dims;
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe { kernel()(m, n, k, a, lda, b, ldb, c, ldc) }
}

/// The portable path: row by row, `C[i, :] += A[i, p] · B[p, :]`.
///
/// # Safety
/// As [`kiln_sgemm`].
#[allow(clippy::too_many_arguments)] // The BLAS argument list, kept for recognizability.
unsafe fn sgemm_portable(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    for i in 0..m {
        // SAFETY: row i of C holds n elements (caller's contract).
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        row.fill(0.0);
        for p in 0..k {
            // SAFETY: A[i, p] and row p of B are inside the matrices.
            let (x, b_row) = unsafe {
                (
                    *a.add(i * lda + p),
                    std::slice::from_raw_parts(b.add(p * ldb), n),
                )
            };
            for (out, y) in row.iter_mut().zip(b_row) {
                *out += x * y;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows of `C` held in registers at once.
    const ROWS: usize = 6;

    /// # Safety
    /// As [`super::kiln_sgemm`], on a CPU with AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sgemm_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // A tile of ROWS x 32 columns: 12 accumulators, two loads of B and ROWS broadcasts of A
        // per step of k.
        let mask_of = |width: usize| -> __mmask16 {
            if width >= 16 {
                0xffff
            } else {
                (1u16 << width) - 1
            }
        };
        let mut i = 0;
        while i < m {
            let rows = ROWS.min(m - i);
            let mut j = 0;
            while j < n {
                let (left, right) = (mask_of(n - j), mask_of((n - j).saturating_sub(16)));
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                for p in 0..k {
                    // SAFETY: the masked lanes of row p of B from column j are inside B.
                    let (y0, y1) = unsafe {
                        (
                            _mm512_maskz_loadu_ps(left, b.add(p * ldb + j)),
                            _mm512_maskz_loadu_ps(right, b.add(p * ldb + j + 16)),
                        )
                    };
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        // SAFETY: A[i + r, p] is inside A.
                        let x = _mm512_set1_ps(unsafe { *a.add((i + r) * lda + p) });
                        acc[0] = _mm512_fmadd_ps(x, y0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(x, y1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // SAFETY: the masked lanes of row i + r of C from column j are inside C.
                    unsafe {
                        _mm512_mask_storeu_ps(c.add((i + r) * ldc + j), left, acc[0]);
                        _mm512_mask_storeu_ps(c.add((i + r) * ldc + j + 16), right, acc[1]);
                    }
                }
                j += 32;
            }
            i += ROWS;
        }
    }

    /// # Safety
    /// As [`super::kiln_sgemm`], on a CPU with AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sgemm_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let whole = n - n % 8;
        let mut i = 0;
        while i < m {
            let rows = ROWS.min(m - i);
            let mut j = 0;
            while j < whole {
                let mut acc = [_mm256_setzero_ps(); ROWS];
                for p in 0..k {
                    // SAFETY: eight columns of row p of B from column j are inside B.
                    let y = unsafe { _mm256_loadu_ps(b.add(p * ldb + j)) };
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        // SAFETY: A[i + r, p] is inside A.
                        let x = _mm256_set1_ps(unsafe { *a.add((i + r) * lda + p) });
                        *acc = _mm256_fmadd_ps(x, y, *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // SAFETY: eight columns of row i + r of C from column j are inside C.
                    unsafe { _mm256_storeu_ps(c.add((i + r) * ldc + j), *acc) };
                }
                j += 8;
            }
            for r in 0..rows {
                for j in whole..n {
                    let mut sum = 0.0f32;
                    for p in 0..k {
                        // SAFETY: A[i + r, p] and B[p, j] are inside the matrices.
                        sum = unsafe {
                            (*a.add((i + r) * lda + p)).mul_add(*b.add(p * ldb + j), sum)
                        };
                    }
                    // SAFETY: C[i + r, j] is inside C.
                    unsafe { *c.add((i + r) * ldc + j) = sum };
                }
            }
            i += ROWS;
        }
    }

    #[cfg(test)]
    pub(super) fn paths() -> Vec<(&'static str, super::Kernel)> {
        let mut paths: Vec<(&'static str, super::Kernel)> = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            paths.push(("avx512", sgemm_avx512 as super::Kernel));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            paths.push(("avx2", sgemm_avx2 as super::Kernel));
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

    fn every_path() -> Vec<(&'static str, Kernel)> {
        #[allow(unused_mut)]
        let mut paths: Vec<(&'static str, Kernel)> = vec![("portable", sgemm_portable as Kernel)];
        #[cfg(target_arch = "x86_64")]
        paths.extend(x86::paths());
        paths
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Every path against an f64 reference, including row and column tails.
        #[test]
        fn every_path_matches_a_naive_product(m in 1usize..11, n in 1usize..41, k in 0usize..20, seed in any::<u32>()) {
            let value = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0;
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 7919)).collect();
            let expected = naive(m, n, k, &a, &b);
            for (name, path) in every_path() {
                // A guard column on each side of C checks nothing is written outside it.
                let ldc = n + 2;
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: the buffers hold the matrices at these strides.
                unsafe { path(m, n, k, a.as_ptr(), k, b.as_ptr(), n, c.as_mut_ptr().add(1), ldc) };
                for i in 0..m {
                    prop_assert!(c[i * ldc].is_nan(), "{}: wrote before row {}", name, i);
                    for j in 0..n {
                        let (got, want) = (f64::from(c[i * ldc + 1 + j]), expected[i * n + j]);
                        prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{} at ({}, {}): {} vs {}", name, i, j, got, want);
                    }
                    if i * ldc + n + 1 < c.len() {
                        prop_assert!(c[i * ldc + n + 1].is_nan(), "{}: wrote after row {}", name, i);
                    }
                }
            }
        }
    }
}
