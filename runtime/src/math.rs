//! Scalar math for the functions generated code does not compute inline. Each computes in f64
//! and rounds once, as kiln's reference interpreter does, so that compiled code and interpreter
//! agree to the last bit on them (the JIT's tests compare the two).

use std::f64::consts::{PI, SQRT_2};

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let inner = (2.0 / PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

/// Remainder with the sign of the divisor (Python's `%`).
fn floor_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}

macro_rules! unary {
    ($($name:ident => $f:expr),* $(,)?) => {
        $(
            #[doc = concat!("`", stringify!($f), "` on one f32, through f64.")]
            #[no_mangle]
            pub extern "C" fn $name(x: f32) -> f32 {
                let f: fn(f64) -> f64 = $f;
                f(f64::from(x)) as f32
            }
        )*
    };
}

unary! {
    kiln_log => f64::ln,
    kiln_tanh => f64::tanh,
    kiln_gelu => gelu,
    kiln_gelu_tanh => gelu_tanh,
    kiln_sin => f64::sin,
    kiln_cos => f64::cos,
}

macro_rules! binary {
    ($($name:ident => $f:expr),* $(,)?) => {
        $(
            #[doc = concat!("`", stringify!($f), "` on two f32, through f64.")]
            #[no_mangle]
            pub extern "C" fn $name(a: f32, b: f32) -> f32 {
                let f: fn(f64, f64) -> f64 = $f;
                f(f64::from(a), f64::from(b)) as f32
            }
        )*
    };
}

binary! {
    kiln_pow => f64::powf,
    kiln_mod => floor_mod,
    kiln_rem => |a, b| a % b,
}
