//! Native code for kiln graphs through Cranelift.
//!
//! Every node of a graph becomes its own Cranelift function (a loop nest over the node's actual
//! dims, read from the symbol values at run time) over buffers planned for the symbols' maxima;
//! the runtime (`kiln-runtime`) checks inputs and runs the kernels in order. Two backends share
//! that code: a JIT ([`compile_jit`]) and object files linked into shared libraries and
//! executables ([`aot`]). Ops are covered on f32, integer and bool tensors; graphs with other ops
//! or dtypes are refused with the list of what is missing.

pub mod aot;
mod describe;
mod kernel;
mod math;
mod plan;

pub use plan::Plan;

use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Module};
use kiln_ir::{DType, Graph, NodeId, Tensor};
use std::collections::{BTreeSet, HashMap};

/// Why a graph could not be compiled or run.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The graph uses ops or dtypes the code generator does not lower yet.
    #[error("the JIT does not support: {}", .0.join(", "))]
    Unsupported(Vec<String>),
    /// Cranelift rejected a function.
    #[error("code generation failed for node %{node}: {message}")]
    Cranelift {
        /// The node whose kernel failed.
        node: String,
        /// Cranelift's message.
        message: String,
    },
    /// The graph's buffers cannot be planned (unbounded dims, too much memory).
    #[error("{0}")]
    Plan(String),
    /// A constant's weight is missing or does not fit its type.
    #[error("node %{node}: {message}")]
    Weights {
        /// The constant node.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// The inputs do not fit the graph.
    #[error("{0}")]
    Inputs(String),
    /// The runtime refused the inputs or a kernel failed.
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::Error),
    /// Writing an artifact or linking failed.
    #[error("{0}")]
    Artifact(String),
}

/// The dtypes the code generator handles.
pub(crate) fn supported_dtype(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32 | DType::I64 | DType::I32 | DType::I8 | DType::U8 | DType::Bool
    )
}

/// Refuses graphs with ops or dtypes the code generator does not lower, listing all of them.
fn check_supported(graph: &Graph) -> Result<(), CodegenError> {
    let unsupported: BTreeSet<String> = graph
        .order()
        .into_iter()
        .filter_map(|id| {
            let node = graph.node(id);
            let operands = graph.operands(id);
            let dtypes_ok = supported_dtype(node.ty.dtype)
                && operands
                    .iter()
                    .all(|&o| supported_dtype(graph.node(o).ty.dtype));
            if !dtypes_ok {
                return Some(format!("{} on {}", node.op.name(), node.ty.dtype));
            }
            (!kernel::supports(
                &node.op,
                &node.ty,
                &operands
                    .iter()
                    .map(|&o| &graph.node(o).ty)
                    .collect::<Vec<_>>(),
            ))
            .then(|| node.op.name().to_string())
        })
        .collect();
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(CodegenError::Unsupported(unsupported.into_iter().collect()))
    }
}

fn cranelift_error(message: impl ToString) -> CodegenError {
    CodegenError::Cranelift {
        node: String::new(),
        message: message.to_string(),
    }
}

/// The host's ISA with every feature it has (AVX2, FMA, ...); position-independent code for
/// objects, which may end up in shared libraries.
fn host_isa(position_independent: bool) -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(cranelift_error)?;
    flags
        .set(
            "is_pic",
            if position_independent {
                "true"
            } else {
                "false"
            },
        )
        .map_err(cranelift_error)?;
    cranelift_native::builder()
        .map_err(cranelift_error)?
        .finish(settings::Flags::new(flags))
        .map_err(cranelift_error)
}

/// Defines one kernel function per node of `nodes` in `module`.
fn define_kernels(
    module: &mut dyn Module,
    graph: &Graph,
    plan: &Plan,
    nodes: &[NodeId],
) -> Result<Vec<FuncId>, CodegenError> {
    nodes
        .iter()
        .map(|&id| {
            kernel::build(module, graph, plan, id).map_err(|message| CodegenError::Cranelift {
                node: graph.node(id).name.clone(),
                message,
            })
        })
        .collect()
}

/// A graph compiled in memory, ready to run.
pub struct JitModel {
    model: kiln_runtime::Model,
    /// Keeps the compiled code alive.
    _module: JITModule,
    /// Keeps the packed weights the model reads alive.
    _packed: Vec<Vec<u8>>,
    /// Keeps the weights the model reads alive.
    _graph: Graph,
}

/// Compiles every node of `graph` for this CPU.
pub fn compile_jit(graph: &Graph) -> Result<JitModel, CodegenError> {
    check_supported(graph)?;
    let mut builder =
        JITBuilder::with_isa(host_isa(false)?, cranelift_module::default_libcall_names());
    for (name, address) in kiln_runtime::symbols() {
        builder.symbol(name, address);
    }
    let mut module = JITModule::new(builder);
    let plan = Plan::new(graph).map_err(CodegenError::Plan)?;
    let graph = graph.clone();
    let description = describe::describe(&graph, &plan, graph.name())?;
    let ids = define_kernels(&mut module, &graph, &plan, &description.kernel_nodes)?;
    module.finalize_definitions().map_err(cranelift_error)?;
    let kernels = ids
        .into_iter()
        .map(|func| {
            // SAFETY: the function was defined with the `Kernel` signature in `kernel::build`.
            unsafe {
                std::mem::transmute::<*const u8, kiln_runtime::Kernel>(
                    module.get_finalized_function(func),
                )
            }
        })
        .collect();
    let slices: Vec<&[u8]> = description.weights.iter().map(|w| w.as_ref()).collect();
    // SAFETY: the kernels were compiled from this plan, which the spec describes; the weights
    // belong to `graph` or are packed copies, both of which the model keeps (moving them does
    // not move their bytes: the graph's are shared, the copies are heap vectors).
    let model = unsafe { kiln_runtime::Model::new(description.spec, kernels, &slices) }?;
    let packed = description
        .weights
        .into_iter()
        .filter_map(|w| match w {
            std::borrow::Cow::Owned(bytes) => Some(bytes),
            std::borrow::Cow::Borrowed(_) => None,
        })
        .collect();
    Ok(JitModel {
        model,
        _module: module,
        _packed: packed,
        _graph: graph,
    })
}

impl JitModel {
    /// Runs the model's parallel loops (matrix products, softmax, erf) on `threads` threads.
    pub fn set_threads(&mut self, threads: usize) -> Result<(), CodegenError> {
        Ok(self.model.set_threads(threads)?)
    }

    /// Bytes of intermediate buffers, planned for the symbols' maxima.
    pub fn arena_bytes(&self) -> usize {
        self.model.spec().arena_bytes
    }

    /// Runs the model on named inputs; outputs in declaration order.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<Vec<(String, Tensor)>, CodegenError> {
        let spec = self.model.spec();
        let missing: Vec<&str> = spec
            .inputs
            .iter()
            .map(|i| i.name.as_str())
            .filter(|name| !inputs.contains_key(*name))
            .collect();
        if !missing.is_empty() {
            return Err(CodegenError::Inputs(format!(
                "missing inputs: {}",
                missing.join(", ")
            )));
        }
        let mut unknown: Vec<&str> = inputs
            .keys()
            .map(String::as_str)
            .filter(|name| !spec.inputs.iter().any(|i| i.name == *name))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(CodegenError::Inputs(format!(
                "unknown inputs: {}",
                unknown.join(", ")
            )));
        }
        let ordered: Vec<(&Tensor, Vec<i64>, Vec<u64>, usize)> = spec
            .inputs
            .iter()
            .map(|i| {
                let tensor = &inputs[&i.name];
                let dims = tensor.shape().iter().map(|&d| d as i64).collect();
                let bytes = tensor.to_le_bytes();
                // Kernels and the runtime read elements in place: copy into aligned words.
                let mut words = vec![0u64; bytes.len().div_ceil(8)];
                for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
                    let mut padded = [0u8; 8];
                    padded[..chunk.len()].copy_from_slice(chunk);
                    *word = u64::from_ne_bytes(padded);
                }
                (tensor, dims, words, bytes.len())
            })
            .collect();
        let views: Vec<kiln_runtime::Input<'_>> = ordered
            .iter()
            .map(|(tensor, dims, words, len)| kiln_runtime::Input {
                dtype: describe::runtime_dtype(tensor.dtype()),
                dims,
                // SAFETY: `words` holds at least `len` bytes.
                data: unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), *len) },
            })
            .collect();
        let names: Vec<(String, DType)> = spec
            .outputs
            .iter()
            .map(|o| (o.name.clone(), ir_dtype(o.dtype)))
            .collect();
        let outputs = self.model.run(&views)?;
        names
            .into_iter()
            .enumerate()
            .map(|(index, (name, dtype))| {
                let dims = outputs.dims(index).map(|d| d as usize).collect();
                let tensor = Tensor::from_le_bytes(dtype, dims, outputs.bytes(index))
                    .map_err(|e| CodegenError::Inputs(format!("output `{name}`: {}", e.0)))?;
                Ok((name, tensor))
            })
            .collect()
    }
}

/// kiln's dtype for the runtime's.
fn ir_dtype(dtype: kiln_runtime::spec::DType) -> DType {
    DType::ALL
        .into_iter()
        .find(|&d| describe::runtime_dtype(d) == dtype)
        .expect("every runtime dtype is a kiln dtype")
}
