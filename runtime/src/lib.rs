//! The runtime kiln's generated code calls and runs inside. It knows nothing of the compiler:
//! a model arrives as a [`ModelSpec`] (inputs, outputs, symbols, buffer table, checks) and a list
//! of compiled kernels, and the runtime binds the inputs, checks every dim and buffer, and runs
//! the kernels over one arena ([`Model`]). Around it: the C API every generated library
//! forwards to ([`capi`]), the `main` of generated executables, the external weight file
//! format, and the `extern "C"` functions kernels call: [`kiln_sgemm`] (AVX-512, AVX2 or
//! portable, chosen once at start-up) and scalar math.
#![warn(missing_docs)]

mod attention;
pub mod capi;
mod exe;
pub mod math;
mod model;
pub mod pool;
mod rope;
mod sgemm;
pub mod spec;
pub mod vector;
pub mod weights;

pub use attention::{kiln_attention, AttentionCall};
pub use model::{Error, ErrorCode, Input, Kernel, Model, Outputs};
pub use rope::{kiln_rope, RopeCall};
pub use sgemm::{
    kiln_sgemm, kiln_sgemm_packed, kiln_swiglu, pack_b, packed_len, Epilogue, SwiGluCall, PANEL,
};
pub use spec::ModelSpec;

/// Every function generated code may call, by symbol name: what a JIT registers and what the
/// runtime's static library exports to compiled objects.
pub fn symbols() -> [(&'static str, *const u8); 19] {
    [
        ("kiln_attention", kiln_attention as *const u8),
        ("kiln_softmax_rows", vector::kiln_softmax_rows as *const u8),
        ("kiln_map_erf", vector::kiln_map_erf as *const u8),
        ("kiln_map_gelu", vector::kiln_map_gelu as *const u8),
        ("kiln_map_tanh", vector::kiln_map_tanh as *const u8),
        (
            "kiln_map_gelu_tanh",
            vector::kiln_map_gelu_tanh as *const u8,
        ),
        ("kiln_sgemm", kiln_sgemm as *const u8),
        ("kiln_sgemm_packed", kiln_sgemm_packed as *const u8),
        ("kiln_swiglu", kiln_swiglu as *const u8),
        ("kiln_log", math::kiln_log as *const u8),
        ("kiln_tanh", math::kiln_tanh as *const u8),
        ("kiln_gelu", math::kiln_gelu as *const u8),
        ("kiln_gelu_tanh", math::kiln_gelu_tanh as *const u8),
        ("kiln_sin", math::kiln_sin as *const u8),
        ("kiln_cos", math::kiln_cos as *const u8),
        ("kiln_pow", math::kiln_pow as *const u8),
        ("kiln_mod", math::kiln_mod as *const u8),
        ("kiln_rem", math::kiln_rem as *const u8),
        ("kiln_rope", kiln_rope as *const u8),
    ]
}
