//! Native code for kiln graphs through Cranelift.
//!
//! Today: a JIT that compiles every node of a graph into its own Cranelift function (a loop nest
//! over the node's actual dims, read from the symbol values at run time) and runs them in order
//! over buffers planned for the symbols' maxima. It covers the elementwise, layout, matrix-product,
//! softmax and reduction ops on f32, integer and bool tensors, scalar code with math functions
//! called from the runtime side. Graphs with other ops are refused with the list of what is
//! missing. Vector kernels, the GEMM microkernels, the remaining ops and AOT artifacts are the next
//! steps (issue #4).

mod kernel;
mod math;
mod plan;

pub use plan::Plan;

use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use kiln_ir::{interp, DType, Graph, Op, Tensor, WeightBytes};
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
    /// The inputs do not fit the graph.
    #[error(transparent)]
    Inputs(#[from] interp::InterpError),
    /// A kernel reported an error at run time.
    #[error("node %{node} ({op}): {message}")]
    Run {
        /// The node.
        node: String,
        /// Its op.
        op: String,
        /// What went wrong.
        message: String,
    },
}

/// A kernel: `(buffer table, symbol values) -> status` (0 is success).
type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64) -> i32;

/// A graph compiled in memory, ready to run.
pub struct JitModel {
    graph: Graph,
    plan: Plan,
    /// One kernel per computed node, in execution order, with the node's index in the plan.
    kernels: Vec<(usize, KernelFn)>,
    arena: Vec<u64>,
    /// Keeps the compiled code alive.
    _module: JITModule,
}

/// The dtypes the JIT handles.
pub(crate) fn supported_dtype(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32 | DType::I64 | DType::I32 | DType::I8 | DType::U8 | DType::Bool
    )
}

/// Compiles every node of `graph` for this CPU.
pub fn compile_jit(graph: &Graph) -> Result<JitModel, CodegenError> {
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
    if !unsupported.is_empty() {
        return Err(CodegenError::Unsupported(unsupported.into_iter().collect()));
    }
    let mut flags = settings::builder();
    let cranelift_error = |message: String| CodegenError::Cranelift {
        node: String::new(),
        message,
    };
    flags
        .set("opt_level", "speed")
        .map_err(|e| cranelift_error(e.to_string()))?;
    let isa = cranelift_native::builder()
        .map_err(|e| cranelift_error(e.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| cranelift_error(e.to_string()))?;
    let mut builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
    math::register(&mut builder);
    let mut module = JITModule::new(builder);
    let plan = Plan::new(graph).map_err(CodegenError::Plan)?;
    let mut ids = Vec::new();
    for (index, &id) in plan.order().iter().enumerate() {
        let node = graph.node(id);
        if matches!(node.op, Op::Input | Op::Constant { .. }) {
            continue;
        }
        let func = kernel::build(&mut module, graph, &plan, id).map_err(|message| {
            CodegenError::Cranelift {
                node: node.name.clone(),
                message,
            }
        })?;
        ids.push((index, func));
    }
    module
        .finalize_definitions()
        .map_err(|e| cranelift_error(e.to_string()))?;
    let kernels = ids
        .into_iter()
        .map(|(index, func)| {
            // SAFETY: the function was defined with the `KernelFn` signature in `kernel::build`.
            let f: KernelFn = unsafe { std::mem::transmute(module.get_finalized_function(func)) };
            (index, f)
        })
        .collect();
    let mut arena = Vec::new();
    arena
        .try_reserve_exact(plan.arena_bytes().div_ceil(8))
        .map_err(|e| {
            CodegenError::Plan(format!(
                "cannot allocate {} bytes of buffers: {e}",
                plan.arena_bytes()
            ))
        })?;
    arena.resize(plan.arena_bytes().div_ceil(8), 0u64);
    Ok(JitModel {
        graph: graph.clone(),
        plan,
        kernels,
        arena,
        _module: module,
    })
}

impl JitModel {
    /// Bytes of intermediate buffers, planned for the symbols' maxima.
    pub fn arena_bytes(&self) -> usize {
        self.plan.arena_bytes()
    }

    /// Runs the model on named inputs; outputs in declaration order.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<Vec<(String, Tensor)>, CodegenError> {
        let bindings = interp::bind_symbols(&self.graph, inputs)?;
        self.plan
            .check(&self.graph, &bindings)
            .map_err(CodegenError::Plan)?;
        // Symbols no input binds are unused by the nodes (`Plan::check` evaluates every dim), so
        // their value does not matter.
        let symbols: Vec<i64> = self
            .graph
            .symbols()
            .iter()
            .map(|s| bindings.get(&s.name).copied().unwrap_or(0))
            .collect();
        let input_bytes: HashMap<&str, Vec<u8>> = inputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_le_bytes()))
            .collect();
        let arena = self.arena.as_mut_ptr().cast::<u8>();
        let mut table: Vec<*mut u8> = Vec::with_capacity(self.plan.order().len());
        for &id in self.plan.order() {
            let node = self.graph.node(id);
            let pointer = match &node.op {
                Op::Input => input_bytes[node.name.as_str()].as_ptr().cast_mut(),
                Op::Constant { weight } => {
                    let stored = self.graph.weights().get(weight);
                    let bytes = stored.and_then(|w| w.data.as_ref()).map(WeightBytes::bytes);
                    let fail = |message: String| CodegenError::Run {
                        node: node.name.clone(),
                        op: "const".into(),
                        message,
                    };
                    let bytes =
                        bytes.ok_or_else(|| fail(format!("weight `{weight}` has no data")))?;
                    let expected =
                        stored.map_or(0, |w| w.numel().saturating_mul(w.dtype.size_bytes()));
                    let typed = node
                        .ty
                        .shape
                        .as_fixed()
                        .map(|d| d.iter().product::<usize>() * node.ty.dtype.size_bytes());
                    if bytes.len() != expected || typed != Some(expected) {
                        return Err(fail(format!(
                            "weight `{weight}` holds {} bytes, its type needs {expected}",
                            bytes.len()
                        )));
                    }
                    bytes.as_ptr().cast_mut()
                }
                // SAFETY: the plan keeps every offset plus its buffer within the arena.
                _ => unsafe { arena.add(self.plan.offset(id)) },
            };
            table.push(pointer);
        }
        // SAFETY: the scratch space lies at the end of the arena.
        table.push(unsafe { arena.add(self.plan.scratch_offset()) });
        for &(index, kernel) in &self.kernels {
            // SAFETY: every pointer in `table` addresses a buffer at least as large as its node's
            // type at the maxima, the symbols are within their maxima (checked by bind_symbols),
            // and the kernel reads and writes only within its operands' and output's dims.
            let status = unsafe { kernel(table.as_ptr(), symbols.as_ptr()) };
            if status != 0 {
                let node = self.graph.node(self.plan.order()[index]);
                return Err(CodegenError::Run {
                    node: node.name.clone(),
                    op: node.op.name().into(),
                    message: kernel::status_message(status),
                });
            }
        }
        self.graph
            .outputs()
            .iter()
            .map(|(name, id)| {
                let node = self.graph.node(*id);
                let dims = node
                    .ty
                    .shape
                    .eval(&bindings)
                    .map_err(|e| CodegenError::Run {
                        node: node.name.clone(),
                        op: node.op.name().into(),
                        message: e.to_string(),
                    })?;
                let numel: usize = dims.iter().product();
                let index = self.plan.index(*id);
                // SAFETY: the buffer holds at least `numel` elements of the node's dtype.
                let bytes = unsafe {
                    std::slice::from_raw_parts(table[index], numel * node.ty.dtype.size_bytes())
                };
                let tensor = Tensor::from_le_bytes(node.ty.dtype, dims, bytes).map_err(|e| {
                    CodegenError::Run {
                        node: node.name.clone(),
                        op: node.op.name().into(),
                        message: e.0,
                    }
                })?;
                Ok((name.clone(), tensor))
            })
            .collect()
    }
}
