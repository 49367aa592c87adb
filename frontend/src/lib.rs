//! Model readers: each turns a model file into a [`kiln_ir::Graph`] of primitive ops.
//!
//! - a directory with `config.json` and `model.safetensors`: a template per architecture
//!   ([`safetensors`]), weights memory-mapped;
//! - an `.onnx` file: opset 13 and later, shape subgraphs folded ([`onnx`]);
//! - a `.gguf` file (llama.cpp): the LLaMA template over dequantized weights ([`gguf`]);
//! - a `.kir` file: kiln's own text format.
//!
//! Input dims come from [`InputShapes`] (`--shape input_ids=batch:8xseq:512`): constants, or
//! symbols with a compile-time maximum.
#![warn(missing_docs)]

mod build;
mod error;
pub mod gguf;
pub mod onnx;
pub mod safetensors;
mod shapes;

pub use error::FrontendError;
pub use shapes::{DimSpec, InputShapes};

use kiln_ir::Graph;
use std::path::Path;

/// Reads a model in any supported format.
pub fn load(path: &Path, shapes: &InputShapes) -> Result<Graph, FrontendError> {
    let graph = if path.is_dir() {
        safetensors::load_dir(path, shapes)?
    } else {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => gguf::load(path, shapes)?,
            Some("onnx") => onnx::load(path, shapes)?,
            Some("kir") => {
                if !shapes.is_empty() {
                    return Err(FrontendError::new(path, "--shape does not apply to .kir files: their dims are declared in the text"));
                }
                kiln_ir::text::parse_file(path).map_err(|e| FrontendError::Text(e.to_string()))?
            }
            _ => {
                return Err(FrontendError::new(
                    path,
                    "unsupported model format: kiln reads .kir files and safetensors model directories \
                     (config.json + model.safetensors), .onnx and .gguf files",
                ))
            }
        }
    };
    kiln_ir::verify(&graph).map_err(|e| FrontendError::new(path, e.to_string()))?;
    Ok(graph)
}
