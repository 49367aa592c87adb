//! Running a compiled model: inputs checked against the spec and bound to the symbols, every dim
//! and buffer checked at those values, then the kernels in order over one arena allocated once.
//! `run` allocates nothing.

use crate::spec::{DType, DimError, ModelSpec, Slot};
use std::fmt;

/// A compiled kernel: `(buffer table, symbol values, task, tasks) -> status`, 0 on success. A
/// kernel described as parallel does part `task` of `tasks` of its work; the others take
/// `(0, 1)`.
pub type Kernel = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64) -> i32;

/// Kernels with fewer output elements than this run as one task: waking the team costs more.
const PARALLEL_ELEMENTS: i64 = 1 << 14;

/// The classes of errors, with the codes the C API returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    /// A required pointer was null.
    NullPointer = 1,
    /// The inputs do not fit the model: count, dtype, rank, dims or size.
    Input = 2,
    /// The output buffers do not fit the outputs: count, dtype, rank or capacity.
    Output = 3,
    /// The weights could not be loaded or do not belong to this model.
    Weights = 4,
    /// A kernel failed at run time (an index out of range, a division by zero).
    Kernel = 5,
    /// Memory for the model's buffers could not be allocated.
    Memory = 6,
    /// The model's own description is invalid, or the runtime failed internally.
    Internal = 7,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::NullPointer,
        ErrorCode::Input,
        ErrorCode::Output,
        ErrorCode::Weights,
        ErrorCode::Kernel,
        ErrorCode::Memory,
        ErrorCode::Internal,
    ];

    /// The C name's suffix (`KILN_ERROR_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NullPointer => "NULL_POINTER",
            ErrorCode::Input => "INPUT",
            ErrorCode::Output => "OUTPUT",
            ErrorCode::Weights => "WEIGHTS",
            ErrorCode::Kernel => "KERNEL",
            ErrorCode::Memory => "MEMORY",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// What the code means, for the generated header.
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::NullPointer => "a required pointer was null",
            ErrorCode::Input => {
                "the inputs do not fit the model: count, dtype, rank, dims, size or alignment"
            }
            ErrorCode::Output => {
                "the output tensors do not fit the outputs: count, dtype, rank or capacity"
            }
            ErrorCode::Weights => "the weights could not be loaded or belong to another model",
            ErrorCode::Kernel => {
                "a kernel failed at run time (an index out of range, a division by zero)"
            }
            ErrorCode::Memory => "the model's buffers could not be allocated",
            ErrorCode::Internal => "the model's description is invalid or the runtime failed",
        }
    }
}

/// An error with its class and a message naming what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// The class.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl Error {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// One input of a run.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dims.
    pub dims: &'a [i64],
    /// Little-endian values, row-major: at least the product of the dims times the element size,
    /// aligned to the element size.
    pub data: &'a [u8],
}

/// The buffers of a model: zeroed memory from the allocator, which for large sizes maps fresh
/// zero pages lazily, so that only the pages a run touches (buffers are planned for the symbols'
/// maxima) are ever faulted in, and creating a model costs no pass over all of it.
struct Arena {
    allocation: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl Arena {
    /// Buffers start on cache lines, and so does the arena.
    const ALIGN: usize = 64;

    /// The allocation asks only for the alignment `calloc` gives (an over-aligned zeroed
    /// allocation is an aligned allocation plus a memset over every page) and rounds the start up
    /// itself.
    fn zeroed(bytes: usize) -> Option<Arena> {
        let layout =
            std::alloc::Layout::from_size_align(bytes.checked_add(Self::ALIGN)?, 16).ok()?;
        // SAFETY: the layout has a non-zero size.
        let allocation = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Arena { allocation, layout })
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        let start = self.allocation.as_ptr();
        // SAFETY: the allocation holds ALIGN bytes more than the arena, so rounding the start up
        // to ALIGN stays inside it.
        unsafe { start.add(start.align_offset(Self::ALIGN)) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.allocation.as_ptr(), self.layout) };
    }
}

/// A model ready to run: its spec, kernels, weights and arena.
pub struct Model {
    spec: ModelSpec,
    kernels: Vec<Kernel>,
    arena: Arena,
    /// One pointer per slot of the spec's buffer table; input slots are set by each run.
    table: Vec<*mut u8>,
    /// The slots that point at each input (its own, and those of nodes sharing its bytes).
    input_slots: Vec<Vec<usize>>,
    /// Symbol values as bound by the inputs (`None` when no input binds the symbol).
    bindings: Vec<Option<i64>>,
    /// Symbol values as the kernels read them.
    symbols: Vec<i64>,
    /// Every dim of the spec at the current bindings.
    dim_values: Vec<i64>,
    /// The worker threads of parallel loops (none: one thread).
    pool: Option<crate::pool::Pool>,
    /// Keeps memory-mapped weights alive.
    pub(crate) _weights: Option<memmap2::Mmap>,
}

impl Model {
    /// A model over its spec, compiled kernels and weights (one byte slice per weight of the spec).
    ///
    /// # Safety
    /// `kernels` must be this spec's kernels, each reading and writing only within the buffers
    /// the spec gives it whenever the spec's checks pass; the weight bytes must stay valid and
    /// unchanged for as long as the model lives.
    pub unsafe fn new(
        spec: ModelSpec,
        kernels: Vec<Kernel>,
        weights: &[&[u8]],
    ) -> Result<Model, Error> {
        let internal = |message: String| Error::new(ErrorCode::Internal, message);
        if kernels.len() != spec.kernels.len() {
            return Err(internal(format!(
                "{} kernels for {} described",
                kernels.len(),
                spec.kernels.len()
            )));
        }
        if weights.len() != spec.weights.len() {
            return Err(internal(format!(
                "{} weights for {} described",
                weights.len(),
                spec.weights.len()
            )));
        }
        for (weight, bytes) in spec.weights.iter().zip(weights) {
            if bytes.len() != weight.bytes {
                return Err(Error::new(
                    ErrorCode::Weights,
                    format!(
                        "weight of %{} holds {} bytes, the model needs {}",
                        weight.node,
                        bytes.len(),
                        weight.bytes
                    ),
                ));
            }
        }
        let mut arena = Arena::zeroed(spec.arena_bytes).ok_or_else(|| {
            Error::new(
                ErrorCode::Memory,
                format!("cannot allocate {} bytes of buffers", spec.arena_bytes),
            )
        })?;
        let base = arena.as_mut_ptr();
        let table = spec
            .slots
            .iter()
            .map(|slot| match *slot {
                Slot::Input(index) if index < spec.inputs.len() => Ok(std::ptr::null_mut()),
                Slot::Absent => Ok(std::ptr::null_mut()),
                Slot::Weight(index) => weights
                    .get(index)
                    .map(|bytes| bytes.as_ptr().cast_mut())
                    .ok_or_else(|| internal(format!("slot names weight {index}"))),
                Slot::Arena(offset) if offset <= spec.arena_bytes => {
                    // SAFETY: the offset lies within the arena.
                    Ok(unsafe { base.add(offset) })
                }
                ref other => Err(internal(format!("invalid slot {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let slot_ok = |slot: usize| slot < table.len();
        if !spec
            .inputs
            .iter()
            .chain(&spec.outputs)
            .all(|t| slot_ok(t.slot))
        {
            return Err(internal("an input or output names no slot".into()));
        }
        if !spec
            .dims
            .iter()
            .all(|d| d.symbols_within(spec.symbols.len()))
        {
            return Err(internal("a dim names no symbol".into()));
        }
        let dim_ok = |dims: &[usize]| dims.iter().all(|&d| d < spec.dims.len());
        if !spec
            .inputs
            .iter()
            .chain(&spec.outputs)
            .all(|t| dim_ok(&t.dims))
            || !spec.buffers.iter().all(|b| dim_ok(&b.dims))
        {
            return Err(internal("a tensor names no dim".into()));
        }
        let input_slots = (0..spec.inputs.len())
            .map(|input| {
                spec.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| **slot == Slot::Input(input))
                    .map(|(index, _)| index)
                    .collect()
            })
            .collect();
        Ok(Model {
            input_slots,
            bindings: vec![None; spec.symbols.len()],
            symbols: vec![0; spec.symbols.len()],
            dim_values: vec![0; spec.dims.len()],
            spec,
            kernels,
            arena,
            table,
            pool: None,
            _weights: None,
        })
    }

    /// Runs the model's parallel loops on `threads` threads (the caller's and `threads - 1`
    /// workers started now); 1 runs everything on the caller's thread.
    pub fn set_threads(&mut self, threads: usize) -> Result<(), Error> {
        self.pool = None;
        if threads > 1 {
            let pool = crate::pool::Pool::new(threads).map_err(|e| {
                Error::new(
                    ErrorCode::Memory,
                    format!("cannot start {threads} threads: {e}"),
                )
            })?;
            self.pool = Some(pool);
        }
        Ok(())
    }

    /// Threads the model runs on.
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, crate::pool::Pool::threads)
    }

    /// The model's description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Runs the model; the outputs stay readable in the returned view until the next run.
    pub fn run<'a>(&'a mut self, inputs: &[Input<'a>]) -> Result<Outputs<'a>, Error> {
        self.bind(inputs)?;
        for (slots, input) in self.input_slots.iter().zip(inputs) {
            // Kernels only read their operands, so the input's bytes are never written.
            let pointer = if input.data.is_empty() {
                self.arena.as_mut_ptr()
            } else {
                input.data.as_ptr().cast_mut()
            };
            for &slot in slots {
                self.table[slot] = pointer;
            }
        }
        let _team = self.pool.as_ref().map(crate::pool::Pool::install);
        let threads = self.pool.as_ref().map_or(1, crate::pool::Pool::threads);
        for (index, &kernel) in self.kernels.iter().enumerate() {
            let spec = &self.spec.kernels[index];
            let elements: i64 = spec.dims.iter().map(|&d| self.dim_values[d]).product();
            let (table, symbols) = (self.table.as_ptr() as usize, self.symbols.as_ptr() as usize);
            // SAFETY: `bind` checked the inputs' sizes, every dim and every buffer's size at these
            // symbol values; the kernels' contract (`Model::new`) does the rest. Parallel tasks
            // write disjoint parts of the kernel's output.
            let call = |task: usize, tasks: usize| unsafe {
                kernel(
                    table as *const *mut u8,
                    symbols as *const i64,
                    task as i64,
                    tasks as i64,
                )
            };
            let status = if spec.parallel && threads > 1 && elements >= PARALLEL_ELEMENTS {
                let failed = std::sync::atomic::AtomicI32::new(0);
                crate::pool::parallel_for(threads, &|task| {
                    let status = call(task, threads);
                    if status != 0 {
                        let _ = failed.compare_exchange(
                            0,
                            status,
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                        );
                    }
                });
                failed.into_inner()
            } else {
                call(0, 1)
            };
            if status != 0 {
                let spec = &self.spec.kernels[index];
                return Err(Error::new(
                    ErrorCode::Kernel,
                    format!(
                        "node %{} ({}): {}",
                        spec.node,
                        spec.op,
                        crate::spec::status_message(status)
                    ),
                ));
            }
        }
        Ok(Outputs { model: self })
    }

    fn dim_error(&self, index: usize, error: DimError) -> Error {
        let expr = self.spec.dims[index].display(&self.spec.symbols);
        let why = match error {
            DimError::Unbound(symbol) => format!(
                "no input binds symbol `{}`",
                self.spec
                    .symbols
                    .get(symbol)
                    .map_or("?", |s| s.name.as_str())
            ),
            DimError::DivisionByZero => "it divides by zero".into(),
            DimError::Overflow => "it overflows".into(),
        };
        Error::new(
            ErrorCode::Input,
            format!("dim `{expr}` has no value at these inputs: {why}"),
        )
    }

    /// Checks the inputs against the spec, binds the symbols and evaluates every dim.
    fn bind(&mut self, inputs: &[Input<'_>]) -> Result<(), Error> {
        let spec = &self.spec;
        let input_error = |message: String| Error::new(ErrorCode::Input, message);
        if inputs.len() != spec.inputs.len() {
            return Err(input_error(format!(
                "{} inputs given, the model takes {}",
                inputs.len(),
                spec.inputs.len()
            )));
        }
        self.bindings.fill(None);
        for (tensor, input) in spec.inputs.iter().zip(inputs) {
            let fail = |what: String| {
                let given: Vec<String> = input.dims.iter().map(i64::to_string).collect();
                let expected: Vec<String> = tensor
                    .dims
                    .iter()
                    .map(|&d| spec.dims[d].display(&spec.symbols).to_string())
                    .collect();
                input_error(format!(
                    "input `{}` is {}[{}], expected {}[{}]: {what}",
                    tensor.name,
                    input.dtype,
                    given.join(", "),
                    tensor.dtype,
                    expected.join(", ")
                ))
            };
            if input.dtype != tensor.dtype {
                return Err(fail("dtype differs".into()));
            }
            if input.dims.len() != tensor.dims.len() {
                return Err(fail("rank differs".into()));
            }
            for (axis, (&dim, &actual)) in tensor.dims.iter().zip(input.dims).enumerate() {
                if let crate::spec::DimExpr::Sym(symbol) = spec.dims[dim] {
                    let declared = &spec.symbols[symbol];
                    if let Some(bound) = self.bindings[symbol] {
                        if bound != actual {
                            return Err(fail(format!(
                                "axis {axis} is {actual}, but {} is already bound to {bound}",
                                declared.name
                            )));
                        }
                    }
                    if actual < 1 || actual > declared.max {
                        return Err(fail(format!(
                            "axis {axis}: {} = {actual} is outside 1..={}",
                            declared.name, declared.max
                        )));
                    }
                    self.bindings[symbol] = Some(actual);
                }
            }
        }
        for (value, symbol) in self.symbols.iter_mut().zip(&self.bindings) {
            *value = symbol.unwrap_or(0);
        }
        for index in 0..spec.dims.len() {
            self.dim_values[index] = spec.dims[index]
                .eval(&self.bindings)
                .map_err(|e| self.dim_error(index, e))?;
        }
        let spec = &self.spec;
        let values = &self.dim_values;
        let bytes = |dims: &[usize], element: usize| -> Option<usize> {
            dims.iter().try_fold(element, |acc, &d| {
                acc.checked_mul(usize::try_from(values[d]).ok()?)
            })
        };
        for (tensor, input) in spec.inputs.iter().zip(inputs) {
            let shape = |dims: &[usize]| {
                dims.iter()
                    .map(|&d| values[d].to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            };
            for (axis, (&dim, &actual)) in tensor.dims.iter().zip(input.dims).enumerate() {
                if values[dim] != actual {
                    return Err(input_error(format!(
                        "input `{}`: axis {axis} is {actual}, expected {} ({})",
                        tensor.name,
                        values[dim],
                        spec.dims[dim].display(&spec.symbols)
                    )));
                }
            }
            if input.data.as_ptr().align_offset(tensor.dtype.size_bytes()) != 0 {
                return Err(input_error(format!(
                    "input `{}`: data is not aligned to its {}-byte elements",
                    tensor.name,
                    tensor.dtype.size_bytes()
                )));
            }
            let needed = bytes(&tensor.dims, tensor.dtype.size_bytes()).ok_or_else(|| {
                input_error(format!("input `{}`: its size overflows", tensor.name))
            })?;
            if input.data.len() < needed {
                return Err(input_error(format!(
                    "input `{}` holds {} bytes, {} {} needs {needed}",
                    tensor.name,
                    input.data.len(),
                    tensor.dtype,
                    shape(&tensor.dims)
                )));
            }
        }
        for buffer in &spec.buffers {
            match bytes(&buffer.dims, buffer.element_bytes) {
                Some(needed) if needed <= buffer.reserved => {}
                needed => {
                    return Err(input_error(format!(
                        "node %{} needs {} bytes at these inputs, the plan reserved {}",
                        buffer.node,
                        needed.map_or("too many".into(), |n| n.to_string()),
                        buffer.reserved
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The outputs of the last run.
pub struct Outputs<'a> {
    model: &'a Model,
}

impl Outputs<'_> {
    /// The dims of output `index` (in the spec's order).
    pub fn dims(&self, index: usize) -> impl Iterator<Item = i64> + '_ {
        self.model.spec.outputs[index]
            .dims
            .iter()
            .map(|&d| self.model.dim_values[d])
    }

    /// The bytes of output `index`.
    pub fn bytes(&self, index: usize) -> &[u8] {
        let spec = &self.model.spec.outputs[index];
        let numel: i64 = self.dims(index).product();
        let len = usize::try_from(numel).unwrap_or(0) * spec.dtype.size_bytes();
        // SAFETY: the slot holds the node's values at the bound dims (checked by `bind`).
        unsafe { std::slice::from_raw_parts(self.model.table[spec.slot], len) }
    }
}
