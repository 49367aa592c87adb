//! kiln's passes: named, pure `Graph -> Graph` rewrites in one pipeline, the e-graph stage that
//! fuses attention, norms and activations, and the reports that say what each pass did.
#![warn(missing_docs)]

mod cleanup;
pub mod egraph;
mod fold;
pub mod memory;
pub mod pipeline;
pub mod report;

pub use pipeline::{Exactness, Pass, PassError, PassOptions, PassOutput, Pipeline, Stage, PASSES};
