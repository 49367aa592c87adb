//! kiln's tensor IR.
//!
//! A [`Graph`] is a DAG of [`Node`]s, each computing one [`Op`] with a [`TensorType`] result.
//! Dims are constants or symbols with compile-time maxima ([`Dim`]). Weights live in a
//! [`WeightStore`], owned or memory-mapped. The text format (`.kir`, [`text`]) round-trips
//! exactly and is what `kiln inspect` prints and snapshot tests compare; [`json`] is the
//! machine-readable twin. [`verify`] checks a graph, and [`interp`] is the reference interpreter
//! every pass and code generator is tested against.
//!
//! ```
//! use kiln_ir::{text, interp, Tensor};
//! use std::collections::HashMap;
//!
//! let graph = text::parse(r#"
//! graph "scale" {
//!   sym n <= 4
//!   input %x : f32[n]
//!   %y = mul(%x, %x) : f32[n]
//!   output "y" = %y
//! }"#).unwrap();
//! let x = Tensor::f32(&[3], vec![1.0, 2.0, 3.0]).unwrap();
//! let outputs = interp::run(&graph, &HashMap::from([("x".to_string(), x)])).unwrap();
//! assert_eq!(outputs[0].1.to_f64s(), [1.0, 4.0, 9.0]);
//! ```
#![warn(missing_docs)]

mod dim;
mod dtype;
mod graph;
pub mod interp;
pub mod json;
pub mod ops;
mod summary;
mod tensor;
pub mod text;
mod verify;
mod weights;

pub use dim::{Dim, DimError, Shape};
pub use dtype::{DType, Scalar, F32};
pub use graph::{Graph, GraphError, Node, NodeId, Symbol};
pub use ops::{Op, TensorType};
pub use summary::Summary;
pub use tensor::{Data, Tensor, TensorError};
pub use verify::{verify, VerifyError};
pub use weights::{
    checksum, dtype_from_safetensors, dtype_to_safetensors, load_tensors, map_safetensors,
    save_tensors, Weight, WeightBytes, WeightError, WeightStore,
};
