//! Scalar math the kernels call: functions Cranelift has no instruction for. Each computes in
//! f64 and rounds once, like the reference interpreter, so JIT and interpreter agree to the last
//! bit on these.

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
    kiln_exp => UnaryOp::Exp,
    kiln_log => UnaryOp::Log,
    kiln_erf => UnaryOp::Erf,
    kiln_tanh => UnaryOp::Tanh,
    kiln_sigmoid => UnaryOp::Sigmoid,
    kiln_silu => UnaryOp::Silu,
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

/// Makes the math functions callable from JIT code.
pub(crate) fn register(builder: &mut JITBuilder) {
    register_unary(builder);
    register_binary(builder);
}
