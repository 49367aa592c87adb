//! Whole-row math the generated code calls where Cranelift's 128-bit vectors are measured too
//! slow: softmax over contiguous rows and `erf` over a run of values. Both follow exactly the
//! operation sequence of the code generator's inline `exp` and `erf` (Cephes' `expf` scheme; two
//! fitted polynomials for `erf`, see `codegen/tools/fit_erf.py`), multiplications and additions
//! kept separate, so every path gives the bits of the generated scalar code: 16 lanes with
//! AVX-512 where the CPU has it, one value at a time elsewhere. The constants live here, and the
//! code generator uses them too.

/// `erf(x)/x - 1` as a polynomial in `x^2` on [0, 1], highest power first.
pub const ERF_SMALL: [f32; 7] = [
    7.854_23e-5,
    -8.010_315e-4,
    5.188_343e-3,
    -2.685_382_2e-2,
    0.112_835_854,
    -0.376_126_26,
    0.128_379_17,
];

/// `erfc(x) e^(x^2)` as a polynomial in `1/x` on [1, 4], highest power first.
pub const ERFC_SCALED_LARGE: [f32; 10] = [
    3.071_601e-2,
    -0.179_724_13,
    0.438_267_6,
    -0.536_986_3,
    0.238_366_32,
    0.230_376_99,
    -0.375_856_5,
    2.053_434_8e-2,
    0.561_768_2,
    1.210_676_2e-4,
];

/// `(e^r - 1 - r) / r^2` as a polynomial in `r` on [-ln2/2, ln2/2], highest power first.
pub const EXP_POLYNOMIAL: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `(tanh(x) - x) / x^3` as a polynomial in `x^2` on [0, 0.625], highest power first
/// (`codegen/tools/fit_tanh.py`: 0.84 ulp in f32 arithmetic).
pub const TANH_SMALL: [f32; 6] = [
    0.001_729_244_4,
    -0.007_811_956_6,
    0.021_597_976,
    -0.053_938_355,
    0.133_332_34,
    -0.333_333_34,
];

/// Below this `|x|`, tanh is its polynomial; above, `1 - 2 / (e^(2|x|) + 1)`.
const TANH_LIMIT: f32 = 0.625;

/// `sqrt(2 / pi)`, the scale inside GELU's tanh form.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// ln 2 in two parts: the high part has few mantissa bits, so `n * high` is exact.
pub const EXP_LN2_HIGH: f32 = 0.693_359_4;
/// The rest of ln 2.
pub const EXP_LN2_LOW: f32 = -2.121_944_4e-4;
/// Above this, `e^x` is +inf in f32.
pub const EXP_OVERFLOW: f32 = 88.722_84;
/// Below this, `e^x` rounds to 0 in f32.
pub const EXP_UNDERFLOW: f32 = -103.972_08;

/// 1.5 * 2^23: adding it to an integer-valued f32 of magnitude below 2^22 puts the integer in the
/// low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

fn polynomial(coefficients: &[f32], v: f32) -> f32 {
    coefficients[1..]
        .iter()
        .fold(coefficients[0], |poly, &c| poly * v + c)
}

/// `e^x`, scalar, as the generated code computes it.
pub fn exp(x: f32) -> f32 {
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * EXP_LN2_HIGH;
    let r = r - n * EXP_LN2_LOW;
    let y = polynomial(&EXP_POLYNOMIAL, r) * (r * r) + r + 1.0;
    // Outside the range the selects below keep, n is meaningless: wrap like the vector code.
    let ni = ((n + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let first = ni >> 1;
    let second = ni.wrapping_sub(first);
    let factor = |e: i32| f32::from_bits((e.wrapping_add(127) << 23) as u32);
    let result = y * factor(first) * factor(second);
    if x.is_nan() {
        x
    } else if x < EXP_UNDERFLOW {
        0.0
    } else if x > EXP_OVERFLOW {
        f32::INFINITY
    } else {
        result
    }
}

/// `erf(x)`, scalar, as the generated code computes it.
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    if a < 1.0 {
        let t = x * x;
        return x + x * polynomial(&ERF_SMALL, t);
    }
    if a.is_nan() {
        return a;
    }
    let clamped = a.clamp(1.0, 4.0);
    let p = polynomial(&ERFC_SCALED_LARGE, 1.0 / clamped);
    let tail = exp(-(clamped * clamped)) * p;
    (1.0 - tail).copysign(x)
}

/// `erfc(a) = e^(-a^2) p(1/a)` for `a >= 1`, without the cancellation of `1 - erf(a)`; the
/// polynomial is taken at `min(a, 4)` (its fitted range) while the Gaussian decays on. `a^2`
/// rounded would carry an error `a^2` times larger into the exponential, so `e^(-a^2)` is
/// `e^(-s^2) e^((s - a)(s + a))` with `s` = `a` cut to 12 significant bits, whose square is exact.
fn erfc_far(a: f32) -> f32 {
    let s = f32::from_bits(a.to_bits() & SQUARE_EXACT_MASK);
    let gaussian = exp(-(s * s)) * exp((s - a) * (s + a));
    gaussian * polynomial(&ERFC_SCALED_LARGE, 1.0 / a.clamp(1.0, 4.0))
}

/// The sign bit of an f32.
const SIGN_BIT: u32 = 0x8000_0000;

/// Keeps the sign, exponent and top 11 stored mantissa bits of an f32.
const SQUARE_EXACT_MASK: u32 = 0xffff_f000;

/// GELU with the error function, `x/2 (1 + erf(x/sqrt 2))`, scalar. Below `x/sqrt 2 = -1` the sum
/// `1 + erf` is computed as `erfc(|x|/sqrt 2)` directly, which keeps the relative accuracy of the
/// small negative outputs.
pub fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let one_plus_erf = if z <= -1.0 {
        erfc_far(-z)
    } else {
        1.0 + erf(z)
    };
    0.5 * x * one_plus_erf
}

/// `tanh(x)`, scalar.
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    if a < TANH_LIMIT {
        let t = x * x;
        return x + (x * t) * polynomial(&TANH_SMALL, t);
    }
    let e = exp(a + a);
    (1.0 - 2.0 / (e + 1.0)).copysign(x)
}

/// GELU's tanh form, `x/2 (1 + tanh(u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, scalar,
/// computed as `x sigmoid(2u)`: `x / (1 + e)` for `u >= 0` and `x e / (1 + e)` below, with
/// `e = e^(-2|u|)`, so that no `1 + tanh` cancels.
pub fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let e = exp(-(2.0 * u).abs());
    let numerator = if u < 0.0 { e } else { 1.0 };
    x * (numerator / (1.0 + e))
}

/// SiLU, `x sigmoid(x)`, scalar, as the generated code computes it: with `e = e^(-|x|)`,
/// `x / (1 + e)` for `x >= 0` and `x e / (1 + e)` below, so that `e` never overflows.
pub fn silu(x: f32) -> f32 {
    let e = exp(-x.abs());
    let numerator = if x < 0.0 { e } else { 1.0 };
    x * (numerator / (1.0 + e))
}

/// `max(x, 0)` as the generated code computes it: `x` if `x > 0`, else 0 (also for NaN and
/// `-0`).
pub fn relu(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Softmax of one row of `len` f32 from `x` into `y`, which may be the same row: each element
/// is read before it is written.
///
/// # Safety
/// `x` and `y` must hold `len` f32.
unsafe fn softmax_row(x: *const f32, y: *mut f32, len: usize) {
    // SAFETY: element i of each row exists (caller's contract).
    let read = |i: usize| unsafe { *x.add(i) };
    let max = (0..len).map(read).fold(f32::NEG_INFINITY, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    });
    let mut sum = 0f64;
    for i in 0..len {
        let e = exp(read(i) - max);
        // SAFETY: as above.
        unsafe { *y.add(i) = e };
        sum += f64::from(e);
    }
    let inverse = (1.0 / sum) as f32;
    for i in 0..len {
        // SAFETY: as above.
        unsafe { *y.add(i) *= inverse };
    }
}

/// Softmax over `rows` contiguous rows of `len` f32: `y[r, :] = softmax(x[r, :])`, the maximum
/// subtracted first, the sum in f64, then a multiplication by its reciprocal.
///
/// # Safety
/// `x` and `y` must hold `rows * len` f32 each; they may be the same buffer but not otherwise
/// overlap. Negative sizes are treated as zero.
#[no_mangle]
pub unsafe extern "C" fn kiln_softmax_rows(rows: i64, len: i64, x: *const f32, y: *mut f32) {
    let (rows, len) = (
        usize::try_from(rows).unwrap_or(0),
        usize::try_from(len).unwrap_or(0),
    );
    if rows == 0 || len == 0 {
        return;
    }
    let (x, y) = (x as usize, y as usize);
    split(rows, rows * len, &|range| {
        let (x, y) = (
            (x as *const f32).wrapping_add(range.start * len),
            (y as *mut f32).wrapping_add(range.start * len),
        );
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has AVX-512F; these rows of the buffers as the caller promised.
            return unsafe { avx512::softmax_rows(range.len(), len, x, y) };
        }
        for r in 0..range.len() {
            // SAFETY: row r of each buffer holds `len` f32 (caller's contract).
            unsafe { softmax_row(x.add(r * len), y.add(r * len), len) };
        }
    });
}

/// Elementwise work below this many elements runs on one thread.
const PARALLEL_ELEMENTS: usize = 1 << 14;

/// Runs `body` over `0..items` split into one contiguous range per thread of the run's team
/// (`elements` is the work, for deciding whether to split at all).
pub(crate) fn split(items: usize, elements: usize, body: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let threads = crate::pool::current_threads().min(items);
    if threads < 2 || elements < PARALLEL_ELEMENTS {
        return body(0..items);
    }
    crate::pool::parallel_for(threads, &|t| {
        body(t * items / threads..(t + 1) * items / threads)
    });
}

/// The functions [`map`] and the matrix product's epilogue apply over a run of values; the
/// discriminant is the code generated code passes for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Function {
    /// [`erf`].
    Erf = 1,
    /// [`gelu`].
    Gelu = 2,
    /// [`tanh`].
    Tanh = 3,
    /// [`gelu_tanh`].
    GeluTanh = 4,
    /// [`silu`].
    Silu = 5,
    /// [`relu`].
    Relu = 6,
}

impl Function {
    /// Every function.
    pub const ALL: [Function; 6] = [
        Function::Erf,
        Function::Gelu,
        Function::Tanh,
        Function::GeluTanh,
        Function::Silu,
        Function::Relu,
    ];

    /// The function with this code.
    pub fn from_code(code: i64) -> Option<Function> {
        Function::ALL.into_iter().find(|f| *f as i64 == code)
    }

    /// The function of one value.
    pub fn scalar(self, x: f32) -> f32 {
        match self {
            Function::Erf => erf(x),
            Function::Gelu => gelu(x),
            Function::Tanh => tanh(x),
            Function::GeluTanh => gelu_tanh(x),
            Function::Silu => silu(x),
            Function::Relu => relu(x),
        }
    }
}

/// `y[i] = f(x[i])` for `i < n` on this thread, with the widest lanes the CPU has.
///
/// # Safety
/// As [`map`].
unsafe fn map_run(function: Function, n: usize, x: *const f32, y: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512F; the buffers as the caller promised.
            return unsafe { avx512::map(function, n, x, y) };
        }
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; as above.
            return unsafe { avx2::map(function, n, x, y) };
        }
    }
    for i in 0..n {
        // SAFETY: element i of both buffers exists (caller's contract).
        unsafe { *y.add(i) = function.scalar(*x.add(i)) };
    }
}

/// `x[i] = f(x[i])` on this thread.
pub(crate) fn apply_in_place(function: Function, x: &mut [f32]) {
    let at = x.as_mut_ptr();
    // SAFETY: the slice holds its length in f32, each read before it is written.
    unsafe { map_run(function, x.len(), at, at) }
}

/// `y[i] = f(x[i])` for `i < n`, split over the run's team, 16 lanes where the CPU has AVX-512.
///
/// # Safety
/// `x` and `y` must hold `n` f32 each; they may be the same buffer but not otherwise overlap.
unsafe fn map(function: Function, n: i64, x: *const f32, y: *mut f32) {
    let n = usize::try_from(n).unwrap_or(0);
    let (x, y) = (x as usize, y as usize);
    split(n, n, &|range| {
        // SAFETY: this range of the buffers, as the caller promised.
        unsafe {
            map_run(
                function,
                range.len(),
                (x as *const f32).wrapping_add(range.start),
                (y as *mut f32).wrapping_add(range.start),
            )
        }
    });
}

macro_rules! map_functions {
    ($($name:ident => $function:expr, $what:literal;)*) => {
        $(
            #[doc = concat!("`y[i] = ", $what, "` for `i < n`.")]
            ///
            /// # Safety
            /// `x` and `y` must hold `n` f32 each; they may be the same buffer but not otherwise
            /// overlap.
            #[no_mangle]
            pub unsafe extern "C" fn $name(n: i64, x: *const f32, y: *mut f32) {
                // SAFETY: forwarded from the caller's contract.
                unsafe { map($function, n, x, y) }
            }
        )*
    };
}

map_functions! {
    kiln_map_erf => Function::Erf, "erf(x[i])";
    kiln_map_gelu => Function::Gelu, "gelu(x[i])` (the error-function form)";
    kiln_map_tanh => Function::Tanh, "tanh(x[i])";
    kiln_map_gelu_tanh => Function::GeluTanh, "gelu_tanh(x[i])";
}

/// `x[j] = e^(x[j] - shift)` in place; returns the sum of the results.
pub(crate) fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512::exp_shifted_in_place(x, shift) };
        }
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::exp_shifted_in_place(x, shift) };
        }
    }
    x.iter_mut()
        .map(|v| {
            *v = exp(*v - shift);
            *v
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// The lane math of [`exp`], [`erf`], [`tanh`], [`gelu`] and [`gelu_tanh`], written once over
/// the operations each lane module defines (`splat`, `add`, ..., `select`), so that every vector
/// width performs the scalar functions' operations in the same order: the same bits.
#[cfg(target_arch = "x86_64")]
/// Lane operations that are one intrinsic each, for [`lane_math!`]: `name(args) -> out =
/// intrinsic` defines `name` as that intrinsic on the module's vector type.
macro_rules! one_intrinsic_ops {
    ($feature:literal, $v:ty; $($name:ident($($arg:ident),*) -> $out:ty = $intrinsic:path;)*) => {
        $(
            #[target_feature(enable = $feature)]
            fn $name($($arg: $v),*) -> $out {
                $intrinsic($($arg),*)
            }
        )*
    };
}

macro_rules! lane_math {
    ($feature:literal, $v:ty) => {
        #[target_feature(enable = $feature)]
        fn abs(a: $v) -> $v {
            and_bits(a, !SIGN_BIT)
        }

        /// The sign bits alone.
        #[target_feature(enable = $feature)]
        fn sign(a: $v) -> $v {
            and_bits(a, SIGN_BIT)
        }

        #[target_feature(enable = $feature)]
        fn polynomial(coefficients: &[f32], v: $v) -> $v {
            coefficients[1..]
                .iter()
                .fold(splat(coefficients[0]), |poly, &c| {
                    add(mul(poly, v), splat(c))
                })
        }

        /// [`super::exp`] on every lane.
        #[target_feature(enable = $feature)]
        pub(super) fn exp(x: $v) -> $v {
            let n = floor(add(mul(x, splat(std::f32::consts::LOG2_E)), splat(0.5)));
            let r = sub(x, mul(n, splat(EXP_LN2_HIGH)));
            let r = sub(r, mul(n, splat(EXP_LN2_LOW)));
            let y = add(mul(polynomial(&EXP_POLYNOMIAL, r), mul(r, r)), r);
            let result = times_power_of_two(add(y, splat(1.0)), n);
            let result = select(gt(x, splat(EXP_OVERFLOW)), splat(f32::INFINITY), result);
            let result = select(lt(x, splat(EXP_UNDERFLOW)), splat(0.0), result);
            select(unordered(x), x, result)
        }

        /// [`super::erf`] on every lane: both pieces, then a blend.
        #[target_feature(enable = $feature)]
        fn erf(x: $v) -> $v {
            let a = abs(x);
            let t = mul(x, x);
            let near = add(x, mul(x, polynomial(&ERF_SMALL, t)));
            // max(1, a) and min(4, .) return their second operand for NaN, which keeps it.
            let clamped = min(splat(4.0), max(splat(1.0), a));
            let p = polynomial(&ERFC_SCALED_LARGE, div(splat(1.0), clamped));
            let tail = mul(exp(negate(mul(clamped, clamped))), p);
            let far = or_bits(sub(splat(1.0), tail), sign(x));
            select(lt(a, splat(1.0)), near, far)
        }

        /// [`super::tanh`] on every lane.
        #[target_feature(enable = $feature)]
        fn tanh(x: $v) -> $v {
            let a = abs(x);
            let t = mul(x, x);
            let near = add(x, mul(mul(x, t), polynomial(&TANH_SMALL, t)));
            let e = exp(add(a, a));
            let far = sub(splat(1.0), div(splat(2.0), add(e, splat(1.0))));
            select(lt(a, splat(TANH_LIMIT)), near, or_bits(far, sign(x)))
        }

        /// [`super::gelu_tanh`] on every lane.
        #[target_feature(enable = $feature)]
        fn gelu_tanh(x: $v) -> $v {
            let cube = mul(mul(mul(splat(0.044_715), x), x), x);
            let u = mul(splat(SQRT_2_OVER_PI), add(x, cube));
            let e = exp(negate(abs(mul(splat(2.0), u))));
            let numerator = select(lt(u, splat(0.0)), e, splat(1.0));
            mul(x, div(numerator, add(splat(1.0), e)))
        }

        /// [`super::gelu`] on every lane.
        #[target_feature(enable = $feature)]
        fn gelu(x: $v) -> $v {
            let z = mul(x, splat(std::f32::consts::FRAC_1_SQRT_2));
            let near = add(splat(1.0), erf(z));
            let a = abs(z);
            let clamped = min(splat(4.0), max(splat(1.0), a));
            let p = polynomial(&ERFC_SCALED_LARGE, div(splat(1.0), clamped));
            let s = and_bits(a, SQUARE_EXACT_MASK);
            let correction = mul(sub(s, a), add(s, a));
            let gaussian = mul(exp(negate(mul(s, s))), exp(correction));
            let one_plus_erf = select(le(z, splat(-1.0)), mul(gaussian, p), near);
            mul(mul(splat(0.5), x), one_plus_erf)
        }

        /// [`super::silu`] on every lane.
        #[target_feature(enable = $feature)]
        fn silu(x: $v) -> $v {
            let e = exp(negate(abs(x)));
            let numerator = select(lt(x, splat(0.0)), e, splat(1.0));
            mul(x, div(numerator, add(splat(1.0), e)))
        }

        #[target_feature(enable = $feature)]
        fn apply(function: Function, v: $v) -> $v {
            match function {
                Function::Erf => erf(v),
                Function::Gelu => gelu(v),
                Function::Tanh => tanh(v),
                Function::GeluTanh => gelu_tanh(v),
                Function::Silu => silu(v),
                Function::Relu => select(gt(v, splat(0.0)), v, splat(0.0)),
            }
        }
    };
}

/// 16 AVX-512 lanes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    lane_math!("avx512f", __m512);

    /// Lanes whose index is below `count` (at most 16).
    fn mask(count: usize) -> __mmask16 {
        if count >= 16 {
            0xffff
        } else {
            (1u16 << count) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }
    one_intrinsic_ops! { "avx512f", __m512;
        add(a, b) -> __m512 = _mm512_add_ps;
        sub(a, b) -> __m512 = _mm512_sub_ps;
        mul(a, b) -> __m512 = _mm512_mul_ps;
        div(a, b) -> __m512 = _mm512_div_ps;
        min(a, b) -> __m512 = _mm512_min_ps;
        max(a, b) -> __m512 = _mm512_max_ps;
        lt(a, b) -> __mmask16 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>;
        le(a, b) -> __mmask16 = _mm512_cmp_ps_mask::<_CMP_LE_OQ>;
        gt(a, b) -> __mmask16 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>;
    }
    #[target_feature(enable = "avx512f")]
    fn floor(a: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(a)
    }
    #[target_feature(enable = "avx512f")]
    fn unordered(a: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a)
    }
    /// `mask ? then : otherwise`, lane by lane.
    #[target_feature(enable = "avx512f")]
    fn select(mask: __mmask16, then: __m512, otherwise: __m512) -> __m512 {
        _mm512_mask_mov_ps(otherwise, mask, then)
    }
    #[target_feature(enable = "avx512f")]
    fn and_bits(a: __m512, bits: u32) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(bits as i32),
        ))
    }
    #[target_feature(enable = "avx512f")]
    fn or_bits(a: __m512, b: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(a),
            _mm512_castps_si512(b),
        ))
    }
    #[target_feature(enable = "avx512f")]
    fn negate(a: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(SIGN_BIT as i32),
        ))
    }
    /// `y * 2^n` for integral `n`, as two factors so that neither overflows.
    #[target_feature(enable = "avx512f")]
    fn times_power_of_two(y: __m512, n: __m512) -> __m512 {
        let ni = _mm512_sub_epi32(
            _mm512_castps_si512(_mm512_add_ps(n, splat(MAGIC))),
            _mm512_set1_epi32(MAGIC.to_bits() as i32),
        );
        let first = _mm512_srai_epi32::<1>(ni);
        let second = _mm512_sub_epi32(ni, first);
        let factor = |e: __m512i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                e,
                _mm512_set1_epi32(127),
            )))
        };
        _mm512_mul_ps(_mm512_mul_ps(y, factor(first)), factor(second))
    }

    /// # Safety
    /// As [`super::map`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn map(function: Function, n: usize, x: *const f32, y: *mut f32) {
        for start in (0..n).step_by(16) {
            let lanes = mask(n - start);
            // SAFETY: the masked lanes lie within the n elements.
            unsafe {
                let v = _mm512_maskz_loadu_ps(lanes, x.add(start));
                _mm512_mask_storeu_ps(y.add(start), lanes, apply(function, v));
            }
        }
    }

    /// As [`super::exp_shifted_in_place`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
        let mut total = _mm512_setzero_ps();
        let len = x.len();
        for start in (0..len).step_by(16) {
            let lanes = mask(len - start);
            // SAFETY: the masked lanes lie within the slice.
            let v = unsafe {
                _mm512_mask_loadu_ps(splat(f32::NEG_INFINITY), lanes, x.as_ptr().add(start))
            };
            let e = exp(sub(v, splat(shift)));
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(x.as_mut_ptr().add(start), lanes, e) };
            total = add(total, _mm512_maskz_mov_ps(lanes, e));
        }
        _mm512_reduce_add_ps(total)
    }

    /// As [`super::kiln_softmax_rows`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_rows(rows: usize, len: usize, x: *const f32, y: *mut f32) {
        for r in 0..rows {
            // SAFETY: row r of both buffers holds `len` f32 (caller's contract).
            let (x, y) = unsafe { (x.add(r * len), y.add(r * len)) };
            let mut max = splat(f32::NEG_INFINITY);
            let mut nan = false;
            for start in (0..len).step_by(16) {
                let lanes = mask(len - start);
                // SAFETY: the masked lanes lie within the row.
                let v =
                    unsafe { _mm512_mask_loadu_ps(splat(f32::NEG_INFINITY), lanes, x.add(start)) };
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) != 0;
                max = _mm512_max_ps(max, v);
            }
            let max = splat(if nan {
                f32::NAN
            } else {
                _mm512_reduce_max_ps(max)
            });
            let (mut low, mut high) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for start in (0..len).step_by(16) {
                let lanes = mask(len - start);
                // SAFETY: the masked lanes lie within the row.
                let v = unsafe { _mm512_maskz_loadu_ps(lanes, x.add(start)) };
                let e = _mm512_maskz_mov_ps(lanes, exp(_mm512_sub_ps(v, max)));
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(y.add(start), lanes, e) };
                let halves = _mm512_castps_si512(e);
                low = _mm512_add_pd(
                    low,
                    _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_castsi512_si256(halves))),
                );
                high = _mm512_add_pd(
                    high,
                    _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64::<1>(halves))),
                );
            }
            let sum = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
            let inverse = splat((1.0 / sum) as f32);
            for start in (0..len).step_by(16) {
                let lanes = mask(len - start);
                // SAFETY: the masked lanes lie within the row.
                unsafe {
                    let e = _mm512_maskz_loadu_ps(lanes, y.add(start));
                    _mm512_mask_storeu_ps(y.add(start), lanes, _mm512_mul_ps(e, inverse));
                }
            }
        }
    }
}

/// 8 AVX2 lanes; the elements past the last whole group of 8 take the scalar functions (the same
/// bits).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    lane_math!("avx2,fma", __m256);

    #[target_feature(enable = "avx2,fma")]
    fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }
    one_intrinsic_ops! { "avx2,fma", __m256;
        add(a, b) -> __m256 = _mm256_add_ps;
        sub(a, b) -> __m256 = _mm256_sub_ps;
        mul(a, b) -> __m256 = _mm256_mul_ps;
        div(a, b) -> __m256 = _mm256_div_ps;
        min(a, b) -> __m256 = _mm256_min_ps;
        max(a, b) -> __m256 = _mm256_max_ps;
        lt(a, b) -> __m256 = _mm256_cmp_ps::<_CMP_LT_OQ>;
        le(a, b) -> __m256 = _mm256_cmp_ps::<_CMP_LE_OQ>;
        gt(a, b) -> __m256 = _mm256_cmp_ps::<_CMP_GT_OQ>;
    }
    #[target_feature(enable = "avx2,fma")]
    fn floor(a: __m256) -> __m256 {
        _mm256_floor_ps(a)
    }
    #[target_feature(enable = "avx2,fma")]
    fn unordered(a: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a)
    }
    /// `mask ? then : otherwise`, lane by lane.
    #[target_feature(enable = "avx2,fma")]
    fn select(mask: __m256, then: __m256, otherwise: __m256) -> __m256 {
        _mm256_blendv_ps(otherwise, then, mask)
    }
    #[target_feature(enable = "avx2,fma")]
    fn and_bits(a: __m256, bits: u32) -> __m256 {
        _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(bits as i32)))
    }
    #[target_feature(enable = "avx2,fma")]
    fn or_bits(a: __m256, b: __m256) -> __m256 {
        _mm256_or_ps(a, b)
    }
    #[target_feature(enable = "avx2,fma")]
    fn negate(a: __m256) -> __m256 {
        _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(SIGN_BIT as i32)))
    }
    /// `y * 2^n` for integral `n`, as two factors so that neither overflows.
    #[target_feature(enable = "avx2,fma")]
    fn times_power_of_two(y: __m256, n: __m256) -> __m256 {
        let ni = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_add_ps(n, splat(MAGIC))),
            _mm256_set1_epi32(MAGIC.to_bits() as i32),
        );
        let first = _mm256_srai_epi32::<1>(ni);
        let second = _mm256_sub_epi32(ni, first);
        let factor = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        _mm256_mul_ps(_mm256_mul_ps(y, factor(first)), factor(second))
    }

    /// # Safety
    /// As [`super::map`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn map(function: Function, n: usize, x: *const f32, y: *mut f32) {
        let whole = n / 8 * 8;
        for start in (0..whole).step_by(8) {
            // SAFETY: 8 elements from start lie within the n elements.
            unsafe {
                let v = _mm256_loadu_ps(x.add(start));
                _mm256_storeu_ps(y.add(start), apply(function, v));
            }
        }
        for i in whole..n {
            // SAFETY: element i of both buffers exists.
            unsafe { *y.add(i) = function.scalar(*x.add(i)) };
        }
    }

    /// As [`super::exp_shifted_in_place`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
        let mut total = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 8 f32.
            let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            let e = exp(sub(v, splat(shift)));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), e) };
            total = add(total, e);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 f32 of room.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        let tail: f32 = chunks
            .into_remainder()
            .iter_mut()
            .map(|v| {
                *v = super::exp(*v - shift);
                *v
            })
            .sum();
        lanes.iter().sum::<f32>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (review): ReLU kept NaN while the IR and the generated code give 0.
    #[test]
    fn relu_gives_zero_for_nan_and_negative_zero() {
        let values = [f32::NAN, -0.0, -1.0, 2.0, 0.0, -3.0, 4.0, f32::NAN, 5.0];
        let mut got = [1f32; 9];
        // SAFETY: both buffers hold 9 f32.
        unsafe { map(Function::Relu, 9, values.as_ptr(), got.as_mut_ptr()) };
        let want = [0.0f32, 0.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.0, 5.0];
        assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits));
    }

    /// Every 4096th f32 and the special values, 16-lane path against the scalar one, bit for bit.
    #[test]
    fn lanes_and_scalar_paths_agree() {
        let mut values: Vec<f32> = (0u32..u32::MAX).step_by(4096).map(f32::from_bits).collect();
        values.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
            4.0,
        ]);
        let mut got = vec![0f32; values.len()];
        for function in Function::ALL {
            // SAFETY: both buffers hold values.len() f32.
            unsafe {
                map(
                    function,
                    values.len() as i64,
                    values.as_ptr(),
                    got.as_mut_ptr(),
                )
            };
            for (&x, &y) in values.iter().zip(&got) {
                let want = function.scalar(x);
                assert!(
                    y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                    "f({x:e}): {y:e} vs {want:e}"
                );
            }
        }
        for len in 1..40 {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 + 11) % 17) as f32 - 8.0)
                .collect();
            let mut got = vec![0f32; len];
            // SAFETY: both buffers hold one row of len f32.
            unsafe { kiln_softmax_rows(1, len as i64, row.as_ptr(), got.as_mut_ptr()) };
            let mut want = vec![0f32; len];
            // SAFETY: both rows hold len f32.
            unsafe { softmax_row(row.as_ptr(), want.as_mut_ptr(), len) };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-30),
                    "len {len}: {g} vs {w}"
                );
            }
        }
    }
}
