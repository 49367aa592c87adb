//! Runtime functions the kernels call: the runtime's matrix product, and scalar math for
//! functions Cranelift has no instruction for. Each of those computes in f64 and rounds once, like
//! the reference interpreter, so JIT and interpreter agree to the last bit on these.

use cranelift_jit::JITBuilder;
use kiln_ir::ops::{BinaryOp, UnaryOp};

macro_rules! unary_fns {
    ($($name:ident => $op:expr),* $(,)?) => {
        $(
            extern "C" fn $name(x: f32) -> f32 {
                $op.apply_f64(f64::from(x)) as f32
            }
        )*
        /// The runtime symbol for a unary op computed by call, if any.
        pub(crate) fn unary_symbol(op: UnaryOp) -> Option<&'static str> {
            $(if op == $op { return Some(stringify!($name)); })*
            None
        }
        fn register_unary(builder: &mut JITBuilder) {
            $(builder.symbol(stringify!($name), $name as *const u8);)*
        }
    };
}

unary_fns! {
    kiln_log => UnaryOp::Log,
    kiln_tanh => UnaryOp::Tanh,
    kiln_gelu => UnaryOp::Gelu,
    kiln_gelu_tanh => UnaryOp::GeluTanh,
    kiln_sin => UnaryOp::Sin,
    kiln_cos => UnaryOp::Cos,
}

macro_rules! binary_fns {
    ($($name:ident => $op:expr),* $(,)?) => {
        $(
            extern "C" fn $name(a: f32, b: f32) -> f32 {
                $op.apply_f64(f64::from(a), f64::from(b)) as f32
            }
        )*
        /// The runtime symbol for a binary f32 op computed by call, if any.
        pub(crate) fn binary_symbol(op: BinaryOp) -> Option<&'static str> {
            $(if op == $op { return Some(stringify!($name)); })*
            None
        }
        fn register_binary(builder: &mut JITBuilder) {
            $(builder.symbol(stringify!($name), $name as *const u8);)*
        }
    };
}

binary_fns! {
    kiln_pow => BinaryOp::Pow,
    kiln_mod => BinaryOp::Mod,
    kiln_rem => BinaryOp::Rem,
}

/// The rotary angle of pair `pair` of `dim` at position `pos`: `pos * theta^(-2 pair / dim)`,
/// in f64 as the interpreter computes it.
fn rope_angle(pos: i64, pair: i64, dim: i64, theta: f32) -> f64 {
    pos as f64 * f64::from(theta).powf(-2.0 * pair as f64 / dim as f64)
}

pub(crate) extern "C" fn kiln_rope_cos(pos: i64, pair: i64, dim: i64, theta: f32) -> f32 {
    rope_angle(pos, pair, dim, theta).cos() as f32
}

pub(crate) extern "C" fn kiln_rope_sin(pos: i64, pair: i64, dim: i64, theta: f32) -> f32 {
    rope_angle(pos, pair, dim, theta).sin() as f32
}

/// Makes the math functions callable from JIT code.
pub(crate) fn register(builder: &mut JITBuilder) {
    register_unary(builder);
    register_binary(builder);
    builder.symbol("kiln_rope_cos", kiln_rope_cos as *const u8);
    builder.symbol("kiln_sgemm", kiln_runtime::kiln_sgemm as *const u8);
    builder.symbol("kiln_rope_sin", kiln_rope_sin as *const u8);
}
