//! The `.kir` text format: what `kiln inspect` prints, what snapshot tests compare and what
//! pass tests start from. `print(parse(print(g))) == print(g)` for every graph.
//!
//! ```text
//! graph "attention_block" {
//!   sym seq <= 512
//!   weights "attention_block.safetensors"
//!   input %x : f32[1, seq, 16]
//!   %wq = const "wq" : f32[16, 16] checksum 0x9f3c0d6a2b1e4c55
//!   %q = matmul(%x, %wq) : f32[1, seq, 16]
//!   %p = softmax(%s) {axis = -1} : f32[1, 2, seq, seq]
//!   output "y" = %q
//! }
//! ```
//!
//! Nodes print in [`crate::Graph::order`]. Weights print by reference (name, type, checksum) and
//! live in the safetensors file named by `weights`, relative to the `.kir` file; small weights the
//! graph owns (at most [`INLINE_LIMIT`] elements, not read from a file) print their values inline. `#` starts a comment. Node names are bare
//! (`[A-Za-z0-9_./-]+`) or quoted (`%"onnx::Shape_422"`).

mod lexer;
mod parser;
mod printer;

pub use parser::{parse, parse_file, parse_with_base, LoadError, ParseError};
pub use printer::print;

/// Weights with at most this many elements print their values inline.
pub const INLINE_LIMIT: usize = 16;
