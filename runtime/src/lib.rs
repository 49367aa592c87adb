//! The runtime kiln's generated code calls into. It knows nothing of the compiler: plain
//! `extern "C"` functions over raw buffers, each choosing the best code path for this CPU once.
//!
//! Today: [`kiln_sgemm`], the f32 matrix product `C = A · B` for row-major `A` and `B`, with
//! AVX-512 and AVX2 (FMA) paths and a portable one.
#![warn(missing_docs)]

mod sgemm;

pub use sgemm::kiln_sgemm;
