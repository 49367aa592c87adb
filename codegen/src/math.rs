//! Which runtime function computes an op the kernels do not emit inline.

use kiln_ir::ops::{BinaryOp, UnaryOp};

/// The runtime symbol computing a unary f32 op by call, if any.
pub(crate) fn unary_symbol(op: UnaryOp) -> Option<&'static str> {
    Some(match op {
        UnaryOp::Log => "kiln_log",
        UnaryOp::Tanh => "kiln_tanh",
        UnaryOp::Gelu => "kiln_gelu",
        UnaryOp::GeluTanh => "kiln_gelu_tanh",
        UnaryOp::Sin => "kiln_sin",
        UnaryOp::Cos => "kiln_cos",
        _ => return None,
    })
}

/// The runtime symbol computing a binary f32 op by call, if any.
pub(crate) fn binary_symbol(op: BinaryOp) -> Option<&'static str> {
    Some(match op {
        BinaryOp::Pow => "kiln_pow",
        BinaryOp::Mod => "kiln_mod",
        BinaryOp::Rem => "kiln_rem",
        _ => return None,
    })
}
