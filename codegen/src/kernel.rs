//! One Cranelift function per node: a loop nest over the node's actual dims (evaluated from the
//! symbol values at run time) that reads its operands and writes its output through the buffer
//! table. Signature: `(buffers: *const *mut u8, symbols: *const i64) -> i32`, 0 on success.

use crate::math;
use crate::plan::Plan;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, Block, BlockArg, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind,
    Type, Value,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, TensorType};
use std::collections::HashMap;

use kiln_runtime::spec::{
    STATUS_ATTENTION_HEADS as ATTENTION_HEADS, STATUS_DIVISION_BY_ZERO as DIVISION_BY_ZERO,
    STATUS_EMPTY_AXIS as EMPTY_AXIS, STATUS_INDEX_OUT_OF_RANGE as INDEX_OUT_OF_RANGE,
    STATUS_ODD_HEAD_DIM as ODD_HEAD_DIM,
};
use kiln_runtime::vector::{
    Function, ERFC_SCALED_LARGE, ERF_SMALL, EXP_LN2_HIGH, EXP_LN2_LOW, EXP_OVERFLOW,
    EXP_POLYNOMIAL, EXP_UNDERFLOW,
};

/// Whether [`build`] lowers this op with these operand types.
pub(crate) fn supports(op: &Op, ty: &TensorType, operands: &[&TensorType]) -> bool {
    let input_dtype = operands.first().map_or(ty.dtype, |t| t.dtype);
    let int = |d: DType| matches!(d, DType::I64 | DType::I32);
    match op {
        Op::Input
        | Op::Constant { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Expand { .. }
        | Op::Where
        | Op::Cast { .. } => true,
        Op::Unary(u) => match input_dtype {
            DType::F32 => *u != UnaryOp::Not,
            DType::Bool => *u == UnaryOp::Not,
            d if int(d) => matches!(
                u,
                UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Sign
            ),
            _ => false,
        },
        Op::Binary(b) => match input_dtype {
            DType::F32 => !matches!(b, BinaryOp::And | BinaryOp::Or | BinaryOp::Xor),
            DType::Bool => matches!(
                b,
                BinaryOp::And | BinaryOp::Or | BinaryOp::Xor | BinaryOp::Equal
            ),
            d if int(d) => !matches!(
                b,
                BinaryOp::Pow
                    | BinaryOp::Mod
                    | BinaryOp::Rem
                    | BinaryOp::And
                    | BinaryOp::Or
                    | BinaryOp::Xor
            ),
            _ => false,
        },
        Op::MatMul | Op::Gemm(_) | Op::SwiGlu => input_dtype == DType::F32,
        Op::Softmax { .. } | Op::Reduce { .. } | Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            input_dtype == DType::F32
        }
        Op::Arg { .. } => matches!(input_dtype, DType::F32 | DType::I64 | DType::I32),
        Op::Fill { .. }
        | Op::Range { .. }
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::Gather { .. } => true,
        Op::GatherNd { batch_dims } => *batch_dims == 0,
        Op::Attention(a) => {
            input_dtype == DType::F32
                && !matches!(a.mask, kiln_ir::ops::MaskSpec::BlockSparse { .. })
        }
        Op::Rope { .. } => input_dtype == DType::F32,
    }
}

/// The most keys attention computes with materialized scores (one tile of every key); longer
/// sequences use the tiled online softmax. Set from the measurements in BENCHMARKS.md
/// (`cargo bench -p kiln-runtime --bench attention`).
const MATERIALIZED_MAX_KEYS: i64 = 256;

/// A possibly negative axis as an index into `rank` axes.
fn resolve_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let resolved = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(resolved)
        .ok()
        .filter(|&a| a < rank)
        .ok_or_else(|| format!("axis {axis} is out of range for rank {rank}"))
}

fn clif_type(dtype: DType) -> Type {
    match dtype {
        DType::F32 => types::F32,
        DType::I64 => types::I64,
        DType::I32 => types::I32,
        DType::F16 | DType::BF16 => types::I16,
        DType::I8 | DType::U8 | DType::Bool => types::I8,
    }
}

/// Builds the kernel of node `id`.
pub(crate) fn build(
    module: &mut dyn Module,
    graph: &Graph,
    plan: &Plan,
    id: NodeId,
) -> Result<FuncId, String> {
    let mut sig = module.make_signature();
    for _ in 0..4 {
        sig.params.push(AbiParam::new(types::I64));
    }
    sig.returns.push(AbiParam::new(types::I32));
    let func_id = module
        .declare_function(&format!("kernel_{}", plan.index(id)), Linkage::Local, &sig)
        .map_err(|e| e.to_string())?;
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    let mut fb_ctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let (buffers, symbols) = (params[0], params[1]);
        let split = splits(graph, id).then_some((params[2], params[3]));
        let fail = b.create_block();
        b.append_block_param(fail, types::I32);
        let mut k = Kernel {
            b,
            module,
            buffers,
            symbols,
            symbol_index: graph
                .symbols()
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.clone(), i))
                .collect(),
            fail,
            split,
        };
        k.node(graph, plan, id)?;
        let zero = k.b.ins().iconst(types::I32, 0);
        k.b.ins().return_(&[zero]);
        k.b.switch_to_block(fail);
        let status = k.b.block_params(fail)[0];
        k.b.ins().return_(&[status]);
        k.b.seal_all_blocks();
        let config = k.module.target_config();
        k.b.finalize(config);
    }
    module
        .define_function(func_id, &mut ctx)
        .map_err(|e| format!("{e:?}"))?;
    module.clear_context(&mut ctx);
    Ok(func_id)
}

/// Contiguous rows: the loops over the outer axes with their strides (in elements, whole rows),
/// and the row length.
struct Rows<'a> {
    outer: &'a [Value],
    outer_strides: Vec<Value>,
    len: Value,
}

/// What [`Kernel::gemm`] applies to each output: bias (pointer, batch base, strides along m and
/// n), activation and residual.
struct Finish {
    bias: Option<(Value, Value, Value, Value)>,
    activation: Option<UnaryOp>,
    residual: Option<Value>,
}

impl Finish {
    fn is_identity(&self) -> bool {
        self.bias.is_none() && self.activation.is_none() && self.residual.is_none()
    }
}

/// The body of a loop nest, given the current linear offsets.
type NestBody<'f, 'b> = dyn FnMut(&mut Kernel<'b>, &[Value]) -> Result<(), String> + 'f;

struct Kernel<'a> {
    b: FunctionBuilder<'a>,
    module: &'a mut dyn Module,
    buffers: Value,
    symbols: Value,
    symbol_index: HashMap<String, usize>,
    fail: Block,
    /// `(task, tasks)` while the kernel is to do only its share of the work: the first loop nest
    /// takes it and runs part `task` of `tasks` of its outermost loop.
    split: Option<(Value, Value)>,
}

/// Whether the kernel of `id` can run as parallel tasks: its first loop nest covers all of its
/// work, each iteration of that nest's outer loop writing its own outputs (see
/// [`Kernel::nest`]). Matrix products qualify only with a batch axis that is not 1 (heads):
/// otherwise the runtime's product is parallel inside.
pub(crate) fn splits(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    let rank = node.ty.rank();
    match &node.op {
        op if whole_tensor_routine(op, node.ty.dtype).is_some() => false,
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } | Op::Expand { .. } => rank >= 2,
        Op::Transpose { .. } => rank >= 2,
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => rank >= 2,
        Op::Softmax { axis } => rank >= 2 && resolve_axis(*axis, rank).is_ok_and(|a| a + 1 != rank),
        Op::MatMul | Op::Gemm(_) => {
            let batch = rank.saturating_sub(2);
            node.ty.shape.0[..batch].iter().any(|d| *d != Dim::Const(1))
        }
        _ => false,
    }
}

/// The runtime function computing a unary op over a whole f32 tensor, if it has one.
fn whole_tensor_routine(op: &Op, dtype: DType) -> Option<&'static str> {
    match (op, dtype) {
        (Op::Unary(UnaryOp::Erf), DType::F32) => Some("kiln_map_erf"),
        (Op::Unary(UnaryOp::Gelu), DType::F32) => Some("kiln_map_gelu"),
        (Op::Unary(UnaryOp::Tanh), DType::F32) => Some("kiln_map_tanh"),
        (Op::Unary(UnaryOp::GeluTanh), DType::F32) => Some("kiln_map_gelu_tanh"),
        _ => None,
    }
}

/// The runtime's lane function for an activation, if it has one.
fn runtime_function(op: UnaryOp) -> Option<Function> {
    Some(match op {
        UnaryOp::Erf => Function::Erf,
        UnaryOp::Gelu => Function::Gelu,
        UnaryOp::Tanh => Function::Tanh,
        UnaryOp::GeluTanh => Function::GeluTanh,
        UnaryOp::Silu => Function::Silu,
        UnaryOp::Relu => Function::Relu,
        _ => return None,
    })
}

/// Whether an elementwise op has a four-lane form: f32 in and out, and an op computed as code
/// without branches (the others stay scalar).
fn vectorizes(op: &Op, ty: &TensorType, operands: &[&TensorType]) -> bool {
    let all_f32 = ty.dtype == DType::F32 && operands.iter().all(|o| o.dtype == DType::F32);
    all_f32
        && match op {
            Op::Unary(u) => matches!(
                u,
                UnaryOp::Neg
                    | UnaryOp::Abs
                    | UnaryOp::Sqrt
                    | UnaryOp::Floor
                    | UnaryOp::Ceil
                    | UnaryOp::Round
                    | UnaryOp::Reciprocal
                    | UnaryOp::Relu
                    | UnaryOp::Exp
                    | UnaryOp::Sigmoid
                    | UnaryOp::Silu
            ),
            Op::Binary(b) => matches!(
                b,
                BinaryOp::Add
                    | BinaryOp::Sub
                    | BinaryOp::Mul
                    | BinaryOp::Div
                    | BinaryOp::Max
                    | BinaryOp::Min
            ),
            Op::Expand { .. } => true,
            _ => false,
        }
}

/// Flags for bitcasts between vector types: lanes in little-endian order.
fn lanes() -> MemFlagsData {
    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little)
}

/// Flags of element accesses: they cannot trap (the plan keeps them in bounds) but need not be
/// aligned (inputs and memory-mapped weights start anywhere).
fn memory() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl<'b> Kernel<'b> {
    /// The buffer of the node in table slot `slot`.
    fn buffer(&mut self, slot: usize) -> Value {
        self.b.ins().load(
            types::I64,
            MemFlagsData::trusted().with_readonly(),
            self.buffers,
            (slot * 8) as i32,
        )
    }

    fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    /// A dim's run-time value.
    fn dim(&mut self, d: &Dim) -> Value {
        match d {
            Dim::Const(v) => self.iconst(*v),
            Dim::Sym(name) => {
                let index = self.symbol_index[name];
                self.b.ins().load(
                    types::I64,
                    MemFlagsData::trusted().with_readonly(),
                    self.symbols,
                    (index * 8) as i32,
                )
            }
            Dim::Add(a, c) | Dim::Sub(a, c) | Dim::Mul(a, c) | Dim::Div(a, c) => {
                let (x, y) = (self.dim(a), self.dim(c));
                match d {
                    Dim::Add(..) => self.b.ins().iadd(x, y),
                    Dim::Sub(..) => self.b.ins().isub(x, y),
                    Dim::Mul(..) => self.b.ins().imul(x, y),
                    _ => self.floor_div(x, y),
                }
            }
        }
    }

    /// `x / y` rounded down, as `Dim` arithmetic is everywhere else; a zero divisor fails the
    /// kernel and `MIN / -1` wraps instead of trapping.
    fn floor_div(&mut self, x: Value, y: Value) -> Value {
        let zero = self.b.ins().icmp_imm_s(IntCC::Equal, y, 0);
        self.fail_if(zero, DIVISION_BY_ZERO);
        let minus_one = self.b.ins().icmp_imm_s(IntCC::Equal, y, -1);
        let one = self.iconst(1);
        let divisor = self.b.ins().select(minus_one, one, y);
        let quotient = self.b.ins().sdiv(x, divisor);
        let negated = self.b.ins().ineg(x);
        let quotient = self.b.ins().select(minus_one, negated, quotient);
        // Round toward negative infinity when the remainder is non-zero and the signs differ.
        let product = self.b.ins().imul(quotient, y);
        let inexact = self.b.ins().icmp(IntCC::NotEqual, product, x);
        let x_negative = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
        let y_negative = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, y, 0);
        let signs_differ = self.b.ins().bxor(x_negative, y_negative);
        let adjust = self.b.ins().band(inexact, signs_differ);
        let adjust = self.b.ins().uextend(types::I64, adjust);
        self.b.ins().isub(quotient, adjust)
    }

    fn dims(&mut self, ty: &TensorType) -> Vec<Value> {
        ty.shape.0.iter().map(|d| self.dim(d)).collect()
    }

    /// Row-major strides (in elements) of dims.
    fn strides(&mut self, dims: &[Value]) -> Vec<Value> {
        let mut strides = vec![self.iconst(1); dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = self.b.ins().imul(strides[i + 1], dims[i + 1]);
        }
        strides
    }

    /// Strides that read `operand` broadcast to an output of `out_rank` axes (0 on broadcast axes).
    fn broadcast_strides(&mut self, operand: &TensorType, out_rank: usize) -> Vec<Value> {
        let dims = self.dims(operand);
        let strides = self.strides(&dims);
        let lead = out_rank - operand.rank();
        let zero = self.iconst(0);
        (0..out_rank)
            .map(|axis| match axis.checked_sub(lead) {
                Some(j) if operand.shape.0[j] != Dim::Const(1) => strides[j],
                _ => zero,
            })
            .collect()
    }

    fn address(&mut self, base: Value, offset: Value, dtype: DType) -> Value {
        let bytes = self.b.ins().imul_imm_s(offset, dtype.size_bytes() as i64);
        self.b.ins().iadd(base, bytes)
    }

    fn load(&mut self, base: Value, offset: Value, dtype: DType) -> Value {
        let at = self.address(base, offset, dtype);
        let value = self.b.ins().load(clif_type(dtype), memory(), at, 0);
        if dtype == DType::Bool {
            // Any non-zero byte is true, as the interpreter reads it.
            return self.b.ins().icmp_imm_s(IntCC::NotEqual, value, 0);
        }
        value
    }

    fn store(&mut self, base: Value, offset: Value, dtype: DType, value: Value) {
        let at = self.address(base, offset, dtype);
        self.b.ins().store(memory(), value, at, 0);
    }

    /// `for i in 0..n { body(i) }`.
    fn for_range(
        &mut self,
        n: Value,
        body: &mut dyn FnMut(&mut Self, Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let zero = self.iconst(0);
        self.for_steps(zero, n, 1, body)
    }

    /// `for i in (start..end).step_by(step) { body(i) }`, stopping before `i >= end`.
    fn for_steps(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let counter = self.b.declare_var(types::I64);
        self.b.def_var(counter, start);
        let n = end;
        let (header, inner, exit) = (
            self.b.create_block(),
            self.b.create_block(),
            self.b.create_block(),
        );
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(counter);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, n);
        self.b.ins().brif(more, inner, &[], exit, &[]);
        self.b.switch_to_block(inner);
        body(self, i)?;
        let i = self.b.use_var(counter);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(counter, next);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        Ok(())
    }

    /// Nested loops over `dims`, tracking one linear offset per stride set:
    /// `offsets[k] = bases[k] + sum(index[a] * strides[k][a])`.
    fn nest(
        &mut self,
        dims: &[Value],
        strides: &[Vec<Value>],
        bases: Vec<Value>,
        body: &mut NestBody<'_, 'b>,
    ) -> Result<(), String> {
        // Axes of extent 1 loop once at offset zero: no loop at all.
        let skip = dims.iter().take_while(|&&d| self.is_one(d)).count();
        let (dims, strides): (&[Value], Vec<Vec<Value>>) = (
            &dims[skip..],
            strides.iter().map(|s| s[skip..].to_vec()).collect(),
        );
        let split = self.split.take();
        let Some((&n, rest)) = dims.split_first() else {
            return match split {
                // No loop to share: the first task does the work.
                Some((task, _)) => {
                    let (work, done) = (self.b.create_block(), self.b.create_block());
                    self.b.ins().brif(task, done, &[], work, &[]);
                    self.b.switch_to_block(work);
                    body(self, &bases)?;
                    self.b.ins().jump(done, &[]);
                    self.b.switch_to_block(done);
                    Ok(())
                }
                None => body(self, &bases),
            };
        };
        let heads: Vec<Value> = strides.iter().map(|s| s[0]).collect();
        let tails: Vec<Vec<Value>> = strides.iter().map(|s| s[1..].to_vec()).collect();
        let mut inner = |k: &mut Self, i: Value| {
            let offsets: Vec<Value> = bases
                .iter()
                .zip(&heads)
                .map(|(&base, &stride)| {
                    let step = k.b.ins().imul(i, stride);
                    k.b.ins().iadd(base, step)
                })
                .collect();
            k.nest(rest, &tails, offsets, body)
        };
        match split {
            Some((task, tasks)) => {
                // This task's share of the outer loop: [n task / tasks, n (task + 1) / tasks).
                let start = self.b.ins().imul(n, task);
                let start = self.b.ins().sdiv(start, tasks);
                let next = self.b.ins().iadd_imm_s(task, 1);
                let end = self.b.ins().imul(n, next);
                let end = self.b.ins().sdiv(end, tasks);
                self.for_steps(start, end, 1, &mut inner)
            }
            None => self.for_range(n, &mut inner),
        }
    }

    /// Whether `v` is the constant 1.
    fn is_one(&self, v: Value) -> bool {
        let dfg = &self.b.func.dfg;
        match dfg.value_def(v) {
            cranelift_codegen::ir::ValueDef::Result(inst, _) => matches!(
                dfg.insts[inst],
                cranelift_codegen::ir::InstructionData::UnaryImm {
                    opcode: cranelift_codegen::ir::Opcode::Iconst,
                    imm,
                } if imm.bits() == 1
            ),
            _ => false,
        }
    }

    fn call(&mut self, symbol: &str, args: &[Value]) -> Result<Value, String> {
        let params = vec![types::F32; args.len()];
        self.call_typed(symbol, &params, args)
    }

    /// The address of a record of 64-bit `fields` on the stack, for runtime calls that take
    /// their arguments as a `#[repr(C)]` struct.
    fn stack_record(&mut self, fields: &[Value]) -> Value {
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            8 * fields.len() as u32,
            3,
        ));
        for (i, &field) in fields.iter().enumerate() {
            self.b
                .ins()
                .stack_store(types::I64, field, slot, 8 * i as i32);
        }
        self.b.ins().stack_addr(types::I64, slot, 0)
    }

    /// Calls a runtime function of i64 arguments (sizes and addresses) returning nothing.
    fn call_void(&mut self, symbol: &str, args: &[Value]) -> Result<(), String> {
        let mut sig = self.module.make_signature();
        for _ in args {
            sig.params.push(AbiParam::new(types::I64));
        }
        let callee = self
            .module
            .declare_function(symbol, Linkage::Import, &sig)
            .map_err(|e| e.to_string())?;
        let fref = self.module.declare_func_in_func(callee, self.b.func);
        self.b.ins().call(fref, args);
        Ok(())
    }

    /// Calls a runtime function returning f32.
    fn call_typed(
        &mut self,
        symbol: &str,
        params: &[Type],
        args: &[Value],
    ) -> Result<Value, String> {
        let mut sig = self.module.make_signature();
        for &ty in params {
            sig.params.push(AbiParam::new(ty));
        }
        sig.returns.push(AbiParam::new(types::F32));
        let callee = self
            .module
            .declare_function(symbol, Linkage::Import, &sig)
            .map_err(|e| e.to_string())?;
        let fref = self.module.declare_func_in_func(callee, self.b.func);
        let call = self.b.ins().call(fref, args);
        Ok(self.b.inst_results(call)[0])
    }

    fn node(&mut self, graph: &Graph, plan: &Plan, id: NodeId) -> Result<(), String> {
        let node = graph.node(id);
        let operand_ids = graph.operands(id);
        let operands: Vec<&TensorType> = operand_ids.iter().map(|&o| &graph.node(o).ty).collect();
        let out = self.buffer(plan.index(id));
        let inputs: Vec<Value> = operand_ids
            .iter()
            .map(|&o| self.buffer(plan.index(o)))
            .collect();
        match &node.op {
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } | Op::Expand { .. } => {
                self.elementwise(&node.op, &node.ty, &operands, out, &inputs)
            }
            Op::Transpose { perm } => {
                let dims = self.dims(operands[0]);
                let strides = self.strides(&dims);
                let out_dims = self.dims(&node.ty);
                let out_strides = self.strides(&out_dims);
                let permuted: Vec<Value> = perm.iter().map(|&p| strides[p]).collect();
                let zero = self.iconst(0);
                let dtype = node.ty.dtype;
                let last = perm.len().wrapping_sub(1);
                if perm.last() == Some(&last) {
                    // The innermost axis stays innermost: copy whole contiguous runs.
                    let run = out_dims[last];
                    return self.nest(
                        &out_dims[..last],
                        &[out_strides[..last].to_vec(), permuted[..last].to_vec()],
                        vec![zero, zero],
                        &mut |k, offsets| {
                            let from = k.address(inputs[0], offsets[1], dtype);
                            let to = k.address(out, offsets[0], dtype);
                            let bytes = k.b.ins().imul_imm_s(run, dtype.size_bytes() as i64);
                            k.copy_bytes(from, to, bytes)
                        },
                    );
                }
                self.nest(
                    &out_dims,
                    &[out_strides, permuted],
                    vec![zero, zero],
                    &mut |k, offsets| {
                        let v = k.load(inputs[0], offsets[1], dtype);
                        k.store(out, offsets[0], dtype, v);
                        Ok(())
                    },
                )
            }
            Op::Reshape { .. } => {
                let dims = self.dims(&node.ty);
                let n = dims
                    .iter()
                    .copied()
                    .reduce(|a, b| self.b.ins().imul(a, b))
                    .unwrap_or_else(|| self.iconst(1));
                let dtype = node.ty.dtype;
                self.for_range(n, &mut |k, i| {
                    let v = k.load(inputs[0], i, dtype);
                    k.store(out, i, dtype, v);
                    Ok(())
                })
            }
            Op::MatMul => {
                let packed = plan.packed_slot(id, 1).map(|slot| self.buffer(slot));
                let plain = kiln_ir::ops::Gemm::default();
                self.gemm(&node.ty, &operands, out, &inputs, plain, packed)
            }
            Op::Gemm(epilogue) => {
                let packed = plan.packed_slot(id, 1).map(|slot| self.buffer(slot));
                self.gemm(&node.ty, &operands, out, &inputs, *epilogue, packed)
            }
            Op::SwiGlu => {
                let packed =
                    [1, 2].map(|operand| plan.packed_slot(id, operand).map(|s| self.buffer(s)));
                self.swiglu(&node.ty, operands[0], out, &inputs, packed)
            }
            Op::Attention(attention) => self.attention(attention, &operands, out, &inputs),
            Op::Rope { interleaved } => self.rope(
                &node.ty,
                [operands[1], operands[2]],
                *interleaved,
                out,
                &inputs,
            ),
            Op::Softmax { axis } => self.softmax(&node.ty, *axis, out, inputs[0]),
            Op::Reduce {
                op,
                axes,
                keep_dims,
            } => self.reduce(operands[0], &node.ty, *op, axes, *keep_dims, out, inputs[0]),
            Op::Fill { value, dtype, .. } => {
                let dims = self.dims(&node.ty);
                let strides = self.strides(&dims);
                let zero = self.iconst(0);
                let (value, dtype) = (*value, *dtype);
                self.nest(&dims, &[strides], vec![zero], &mut |k, at| {
                    let v = k.scalar_const(value, dtype);
                    k.store(out, at[0], dtype, v);
                    Ok(())
                })
            }
            Op::Range { start, step, .. } => {
                let dims = self.dims(&node.ty);
                let first = self.dim(start);
                let (step, dtype) = (*step, node.ty.dtype);
                self.for_range(dims[0], &mut |k, i| {
                    let offset = k.b.ins().imul_imm_s(i, step);
                    let v = k.b.ins().iadd(first, offset);
                    let v = k.cast(v, DType::I64, dtype);
                    k.store(out, i, dtype, v);
                    Ok(())
                })
            }
            Op::Slice {
                axis, start, step, ..
            } => self.slice(operands[0], &node.ty, *axis, start, *step, out, inputs[0]),
            Op::Concat { axis } => self.concat(&operands, &node.ty, *axis, out, &inputs),
            Op::Gather { axis } => self.gather(
                operands[0],
                operands[1],
                &node.ty,
                *axis,
                out,
                inputs[0],
                inputs[1],
            ),
            Op::GatherNd { .. } => {
                self.gather_nd(operands[0], operands[1], out, inputs[0], inputs[1])
            }
            Op::LayerNorm { axis, eps } => {
                self.normalize(&operands, *axis, eps.0, true, out, &inputs)
            }
            Op::RmsNorm { eps } => self.normalize(&operands, -1, eps.0, false, out, &inputs),
            Op::Arg {
                op,
                axis,
                select_last,
                ..
            } => self.arg(operands[0], *op, *axis, *select_last, out, inputs[0]),
            other => Err(format!("`{}` has no kernel", other.name())),
        }
    }

    fn elementwise(
        &mut self,
        op: &Op,
        ty: &TensorType,
        operands: &[&TensorType],
        out: Value,
        inputs: &[Value],
    ) -> Result<(), String> {
        let out_dims = self.dims(ty);
        let out_strides = self.strides(&out_dims);
        let mut strides = vec![out_strides];
        for operand in operands {
            strides.push(self.broadcast_strides(operand, ty.rank()));
        }
        let zero = self.iconst(0);
        let bases = vec![zero; strides.len()];
        let dtypes: Vec<DType> = operands.iter().map(|t| t.dtype).collect();
        let out_dtype = ty.dtype;
        if let Some(routine) = whole_tensor_routine(op, out_dtype) {
            // The runtime's kernel: 16 lanes where the CPU has AVX-512, the same bits either way.
            let count = out_dims
                .iter()
                .copied()
                .reduce(|a, b| self.b.ins().imul(a, b))
                .unwrap_or_else(|| self.iconst(1));
            return self.call_void(routine, &[count, inputs[0], out]);
        }
        if ty.rank() > 0 && vectorizes(op, ty, operands) {
            return self.elementwise_lanes(op, ty, operands, out, inputs, &out_dims, &strides);
        }
        self.nest(&out_dims, &strides, bases, &mut |k, offsets| {
            let values: Vec<Value> = inputs
                .iter()
                .zip(&dtypes)
                .zip(&offsets[1..])
                .map(|((&p, &d), &o)| k.load(p, o, d))
                .collect();
            let result = match op {
                Op::Unary(u) => k.unary(*u, dtypes[0], values[0])?,
                Op::Binary(b) => k.binary(*b, dtypes[0], values[0], values[1])?,
                Op::Where => {
                    let cond = k.b.ins().icmp_imm_s(IntCC::NotEqual, values[0], 0);
                    k.b.ins().select(cond, values[1], values[2])
                }
                Op::Cast { to } => k.cast(values[0], dtypes[0], *to),
                _ => values[0],
            };
            k.store(out, offsets[0], out_dtype, result);
            Ok(())
        })
    }

    /// An f32 elementwise op over the innermost axis four lanes at a time, then a scalar tail.
    /// Along that axis each operand is contiguous (loaded as lanes) or broadcast (one value in
    /// every lane), as its shape says.
    #[allow(clippy::too_many_arguments)]
    fn elementwise_lanes(
        &mut self,
        op: &Op,
        ty: &TensorType,
        operands: &[&TensorType],
        out: Value,
        inputs: &[Value],
        out_dims: &[Value],
        strides: &[Vec<Value>],
    ) -> Result<(), String> {
        let last = ty.rank() - 1;
        let len = out_dims[last];
        let contiguous: Vec<bool> = operands
            .iter()
            .map(|o| o.rank() > 0 && o.shape.0[o.rank() - 1] != Dim::Const(1))
            .collect();
        let outer: Vec<Vec<Value>> = strides.iter().map(|s| s[..last].to_vec()).collect();
        let zero = self.iconst(0);
        let vector_end = self.b.ins().band_imm_s(len, -4);
        let apply = |k: &mut Self, values: &[Value]| -> Result<Value, String> {
            match op {
                Op::Unary(u) => k.unary(*u, DType::F32, values[0]),
                Op::Binary(b) => k.binary(*b, DType::F32, values[0], values[1]),
                _ => Ok(values[0]),
            }
        };
        self.nest(
            &out_dims[..last],
            &outer,
            vec![zero; strides.len()],
            &mut |k, bases| {
                // Elements j.. as four lanes (`vector`) or one: operands along the axis are read
                // in place, broadcast ones once (and splatted).
                let step = |k: &mut Self, j: Value, vector: bool| -> Result<(), String> {
                    let mut values = Vec::with_capacity(inputs.len());
                    for ((&input, &base), &lanes) in inputs.iter().zip(&bases[1..]).zip(&contiguous)
                    {
                        values.push(if lanes {
                            let row = k.address(input, base, DType::F32);
                            k.load_f32s(row, j, vector)
                        } else {
                            let value = k.load(input, base, DType::F32);
                            if vector {
                                k.b.ins().splat(types::F32X4, value)
                            } else {
                                value
                            }
                        });
                    }
                    let result = apply(k, &values)?;
                    let row = k.address(out, bases[0], DType::F32);
                    let at = k.address(row, j, DType::F32);
                    k.b.ins().store(memory(), result, at, 0);
                    Ok(())
                };
                k.for_steps(zero, vector_end, 4, &mut |k, j| step(k, j, true))?;
                k.for_steps(vector_end, len, 1, &mut |k, j| step(k, j, false))
            },
        )
    }

    fn unary(&mut self, op: UnaryOp, dtype: DType, x: Value) -> Result<Value, String> {
        if dtype == DType::Bool {
            return Ok(self.b.ins().bxor_imm_s(x, 1));
        }
        if dtype != DType::F32 {
            let ty = clif_type(dtype);
            let zero = self.b.ins().iconst(ty, 0);
            let negative = self.b.ins().icmp(IntCC::SignedLessThan, x, zero);
            let negated = self.b.ins().ineg(x);
            return Ok(match op {
                UnaryOp::Neg => negated,
                UnaryOp::Abs => self.b.ins().select(negative, negated, x),
                UnaryOp::Relu => self.b.ins().select(negative, zero, x),
                _ => {
                    let positive = self.b.ins().icmp(IntCC::SignedGreaterThan, x, zero);
                    let (p, n) = (
                        self.b.ins().uextend(ty, positive),
                        self.b.ins().uextend(ty, negative),
                    );
                    self.b.ins().isub(p, n)
                }
            });
        }
        match op {
            UnaryOp::Exp => return Ok(self.exp_f32(x)),
            UnaryOp::Erf => return Ok(self.erf_f32(x)),
            UnaryOp::Sigmoid | UnaryOp::Silu => {
                // With e = e^-|x|: 1 / (1 + e) for x >= 0, e / (1 + e) below, so that e never
                // overflows and the subnormal results below x = -87.3 are kept (a regression:
                // 1 / (1 + e^-x) gave 0 there).
                let ty = self.b.func.dfg.value_type(x);
                let magnitude = self.b.ins().fabs(x);
                let negated = self.b.ins().fneg(magnitude);
                let e = self.exp_f32(negated);
                let one = self.float(ty, 1.0);
                let denominator = self.b.ins().fadd(one, e);
                let zero = self.float(ty, 0.0);
                let negative = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                let numerator = self.select_float(negative, e, one);
                let sigmoid = self.b.ins().fdiv(numerator, denominator);
                return Ok(if op == UnaryOp::Silu {
                    self.b.ins().fmul(x, sigmoid)
                } else {
                    sigmoid
                });
            }
            _ => {}
        }
        if let Some(symbol) = math::unary_symbol(op) {
            return self.call(symbol, &[x]);
        }
        let ty = self.b.func.dfg.value_type(x);
        let zero = self.float(ty, 0.0);
        Ok(match op {
            UnaryOp::Neg => self.b.ins().fneg(x),
            UnaryOp::Abs => self.b.ins().fabs(x),
            UnaryOp::Sqrt => self.b.ins().sqrt(x),
            UnaryOp::Floor => self.b.ins().floor(x),
            UnaryOp::Ceil => self.b.ins().ceil(x),
            UnaryOp::Round => self.b.ins().nearest(x),
            UnaryOp::Reciprocal => {
                let one = self.float(ty, 1.0);
                self.b.ins().fdiv(one, x)
            }
            UnaryOp::Relu => {
                let positive = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                self.select_float(positive, x, zero)
            }
            _ => {
                // Sign: -1, 0 or 1; NaN stays NaN.
                let (one, minus_one) = (self.b.ins().f32const(1.0), self.b.ins().f32const(-1.0));
                let positive = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let negative = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                let rest = self.b.ins().select(nan, x, zero);
                let rest = self.b.ins().select(negative, minus_one, rest);
                self.b.ins().select(positive, one, rest)
            }
        })
    }

    fn binary(&mut self, op: BinaryOp, dtype: DType, a: Value, c: Value) -> Result<Value, String> {
        if dtype == DType::F32 {
            if let Some(symbol) = math::binary_symbol(op) {
                return self.call(symbol, &[a, c]);
            }
            let compare = |cc| Some(cc);
            let cc = match op {
                BinaryOp::Equal => compare(FloatCC::Equal),
                BinaryOp::Less => compare(FloatCC::LessThan),
                BinaryOp::LessEqual => compare(FloatCC::LessThanOrEqual),
                BinaryOp::Greater => compare(FloatCC::GreaterThan),
                BinaryOp::GreaterEqual => compare(FloatCC::GreaterThanOrEqual),
                _ => None,
            };
            if let Some(cc) = cc {
                return Ok(self.b.ins().fcmp(cc, a, c));
            }
            return Ok(match op {
                BinaryOp::Add => self.b.ins().fadd(a, c),
                BinaryOp::Sub => self.b.ins().fsub(a, c),
                BinaryOp::Mul => self.b.ins().fmul(a, c),
                BinaryOp::Div => self.b.ins().fdiv(a, c),
                BinaryOp::Max => self.b.ins().fmax(a, c),
                _ => self.b.ins().fmin(a, c),
            });
        }
        let cc = match op {
            BinaryOp::Equal => Some(IntCC::Equal),
            BinaryOp::Less => Some(IntCC::SignedLessThan),
            BinaryOp::LessEqual => Some(IntCC::SignedLessThanOrEqual),
            BinaryOp::Greater => Some(IntCC::SignedGreaterThan),
            BinaryOp::GreaterEqual => Some(IntCC::SignedGreaterThanOrEqual),
            _ => None,
        };
        if let Some(cc) = cc {
            return Ok(self.b.ins().icmp(cc, a, c));
        }
        Ok(match op {
            BinaryOp::And => self.b.ins().band(a, c),
            BinaryOp::Or => self.b.ins().bor(a, c),
            BinaryOp::Xor => self.b.ins().bxor(a, c),
            BinaryOp::Add => self.b.ins().iadd(a, c),
            BinaryOp::Sub => self.b.ins().isub(a, c),
            BinaryOp::Mul => self.b.ins().imul(a, c),
            BinaryOp::Max => self.b.ins().smax(a, c),
            BinaryOp::Min => self.b.ins().smin(a, c),
            _ => {
                // Truncating division; zero is an error, MIN / -1 wraps as the interpreter does.
                let ty = clif_type(dtype);
                let is_zero = self.b.ins().icmp_imm_s(IntCC::Equal, c, 0);
                let status = self.b.ins().iconst(types::I32, i64::from(DIVISION_BY_ZERO));
                let ok = self.b.create_block();
                self.b
                    .ins()
                    .brif(is_zero, self.fail, &[BlockArg::Value(status)], ok, &[]);
                self.b.switch_to_block(ok);
                let minus_one = self.b.ins().icmp_imm_s(IntCC::Equal, c, -1);
                let one = self.b.ins().iconst(ty, 1);
                let divisor = self.b.ins().select(minus_one, one, c);
                let quotient = self.b.ins().sdiv(a, divisor);
                let negated = self.b.ins().ineg(a);
                self.b.ins().select(minus_one, negated, quotient)
            }
        })
    }

    fn cast(&mut self, x: Value, from: DType, to: DType) -> Value {
        if from == to {
            return x;
        }
        if to == DType::Bool {
            return if from == DType::F32 {
                let zero = self.b.ins().f32const(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, x, zero)
            } else {
                self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            };
        }
        // Integers (and bools as 0/1) widened to i64 first.
        let wide = match from {
            DType::F32 => None,
            DType::I64 => Some(x),
            DType::I32 | DType::I8 => Some(self.b.ins().sextend(types::I64, x)),
            _ => Some(self.b.ins().uextend(types::I64, x)),
        };
        match (wide, to) {
            (Some(w), DType::F32) => {
                // Through f64, rounding twice exactly as the interpreter's `as f64 as f32`.
                let wide = self.b.ins().fcvt_from_sint(types::F64, w);
                self.b.ins().fdemote(types::F32, wide)
            }
            (Some(w), DType::I64) => w,
            (Some(w), _) => self.b.ins().ireduce(clif_type(to), w),
            (None, DType::I64 | DType::I32) => self.b.ins().fcvt_to_sint_sat(clif_type(to), x),
            (None, _) => {
                // Saturate to the narrow range first, as `as i8` / `as u8` do.
                let w = self.b.ins().fcvt_to_sint_sat(types::I32, x);
                let (lo, hi) = if to == DType::I8 {
                    (-128, 127)
                } else {
                    (0, 255)
                };
                let (lo, hi) = (
                    self.b.ins().iconst(types::I32, lo),
                    self.b.ins().iconst(types::I32, hi),
                );
                let w = self.b.ins().smax(w, lo);
                let w = self.b.ins().smin(w, hi);
                self.b.ins().ireduce(types::I8, w)
            }
        }
    }

    /// `out = activation(a @ b + bias) + residual`, numpy matmul semantics (batch broadcast,
    /// 1-D operands promoted), `b` optionally stored transposed, or given `packed` into the
    /// runtime's panels; f32 accumulation.
    fn gemm(
        &mut self,
        ty: &TensorType,
        operands: &[&TensorType],
        out: Value,
        inputs: &[Value],
        epilogue: kiln_ir::ops::Gemm,
        packed: Option<Value>,
    ) -> Result<(), String> {
        let (a_ty, b_ty) = (operands[0], operands[1]);
        let a_dims = self.dims(a_ty);
        let b_dims = self.dims(b_ty);
        let out_dims = self.dims(ty);
        let one = self.iconst(1);
        let (a_rank, b_rank) = (a_ty.rank(), b_ty.rank());
        let m = if a_rank >= 2 { a_dims[a_rank - 2] } else { one };
        let kk = a_dims[a_rank - 1];
        let n = if b_rank < 2 {
            one
        } else if epilogue.trans_b {
            b_dims[b_rank - 2]
        } else {
            b_dims[b_rank - 1]
        };
        // Element strides of b along k and n.
        let (b_k, b_n) = if b_rank < 2 {
            (one, one)
        } else if epilogue.trans_b {
            (one, kk)
        } else {
            (n, one)
        };
        let matrix_axes = usize::from(a_rank >= 2) + usize::from(b_rank >= 2);
        let batch = out_dims.len() - matrix_axes;
        let mn = self.b.ins().imul(m, n);
        let mk = self.b.ins().imul(m, kk);
        let kn = self.b.ins().imul(kk, n);
        // Batch strides in whole matrices, 0 where an operand broadcasts.
        let batch_strides =
            |k: &mut Self, operand: &TensorType, dims: &[Value], matrix: Value| -> Vec<Value> {
                let operand_batch = operand.rank().saturating_sub(2);
                let lead = batch - operand_batch;
                let zero = k.iconst(0);
                let mut strides = vec![zero; batch];
                let mut stride = matrix;
                for axis in (0..batch).rev() {
                    if let Some(j) = axis.checked_sub(lead) {
                        if operand.shape.0[j] != Dim::Const(1) {
                            strides[axis] = stride;
                        }
                        stride = k.b.ins().imul(stride, dims[j]);
                    }
                }
                strides
            };
        let out_batch = {
            let mut strides = vec![mn; batch];
            for axis in (0..batch.saturating_sub(1)).rev() {
                strides[axis] = self.b.ins().imul(strides[axis + 1], out_dims[axis + 1]);
            }
            strides
        };
        let a_batch = batch_strides(self, a_ty, &a_dims, mk);
        let b_batch = batch_strides(self, b_ty, &b_dims, kn);
        let mut next = 2;
        let bias = if epilogue.bias {
            next += 1;
            let full = self.broadcast_strides(operands[2], ty.rank());
            Some((inputs[2], full))
        } else {
            None
        };
        let residual = epilogue.residual.then(|| inputs[next]);
        // Bias strides split into batch axes and the (m, n) axes, which may be absent.
        let zero = self.iconst(0);
        let (bias_ptr, bias_batch, bias_m, bias_n) = match &bias {
            Some((ptr, full)) => {
                let rank = full.len();
                let bias_m = if a_rank >= 2 {
                    full[rank - matrix_axes]
                } else {
                    zero
                };
                let bias_n = if b_rank >= 2 { full[rank - 1] } else { zero };
                (Some(*ptr), full[..batch].to_vec(), bias_m, bias_n)
            }
            None => (None, vec![zero; batch], zero, zero),
        };
        let (a, bm) = (inputs[0], inputs[1]);
        let activation = epilogue.activation;
        // Rows of b are contiguous along n unless b is stored transposed or is a vector.
        let contiguous_n = !epilogue.trans_b && b_rank >= 2;
        // The runtime's product applies the epilogue itself when the bias is one value per
        // column and it has the activation's lanes; otherwise a loop after it does.
        let column_bias = !epilogue.bias || {
            let dims = &operands[2].shape.0;
            dims.last().is_some_and(|d| *d != Dim::Const(1))
                && dims[..dims.len() - 1].iter().all(|d| *d == Dim::Const(1))
        };
        let runtime_activation = match activation {
            None => Some(0),
            Some(op) => runtime_function(op).map(|f| f as i64),
        };
        let in_product = column_bias.then_some(runtime_activation).flatten();
        self.nest(
            &out_dims[..batch],
            &[out_batch, a_batch, b_batch, bias_batch],
            vec![zero, zero, zero, zero],
            &mut |k, bases| {
                let (ob, ab, bb, cb) = (bases[0], bases[1], bases[2], bases[3]);
                let finish = Finish {
                    bias: bias_ptr.map(|p| (p, cb, bias_m, bias_n)),
                    activation,
                    residual,
                };
                if contiguous_n || packed.is_some() {
                    // The runtime's vector kernels compute the whole matrix, from the packed
                    // weight or from a row-major b.
                    let a_at = k.address(a, ab, DType::F32);
                    let c_at = k.address(out, ob, DType::F32);
                    let finish_in_product = in_product.filter(|_| !finish.is_identity());
                    let epilogue = match finish_in_product {
                        Some(code) => {
                            let residual_at = match residual {
                                Some(r) => k.address(r, ob, DType::F32),
                                None => zero,
                            };
                            let code = k.iconst(code);
                            k.stack_record(&[bias_ptr.unwrap_or(zero), code, residual_at])
                        }
                        None => zero,
                    };
                    match packed {
                        Some(panels) => k.call_void(
                            "kiln_sgemm_packed",
                            &[m, n, kk, a_at, kk, panels, c_at, n, epilogue],
                        )?,
                        None => {
                            let b_at = k.address(bm, bb, DType::F32);
                            k.call_void(
                                "kiln_sgemm",
                                &[m, n, kk, a_at, kk, b_at, b_k, c_at, n, epilogue],
                            )?
                        }
                    }
                    if finish.is_identity() || finish_in_product.is_some() {
                        return Ok(());
                    }
                    return k.for_range(m, &mut |k, i| {
                        let out_row = k.b.ins().imul(i, n);
                        let out_row = k.b.ins().iadd(ob, out_row);
                        k.for_range(n, &mut |k, j| {
                            let at = k.b.ins().iadd(out_row, j);
                            let sum = k.load(out, at, DType::F32);
                            let value = k.finish(&finish, sum, i, j, at)?;
                            k.store(out, at, DType::F32, value);
                            Ok(())
                        })
                    });
                }
                k.for_range(m, &mut |k, i| {
                    let out_row = k.b.ins().imul(i, n);
                    let out_row = k.b.ins().iadd(ob, out_row);
                    let a_row = k.b.ins().imul(i, kk);
                    let a_row = k.b.ins().iadd(ab, a_row);
                    // i-j-p order: each output is one dot product along contiguous k.
                    k.for_range(n, &mut |k, j| {
                        let acc = k.b.declare_var(types::F32);
                        let init = k.b.ins().f32const(0.0);
                        k.b.def_var(acc, init);
                        let jn = k.b.ins().imul(j, b_n);
                        let b_col = k.b.ins().iadd(bb, jn);
                        k.for_range(kk, &mut |k, p| {
                            let a_at = k.b.ins().iadd(a_row, p);
                            let pk = k.b.ins().imul(p, b_k);
                            let b_at = k.b.ins().iadd(b_col, pk);
                            let x = k.load(a, a_at, DType::F32);
                            let y = k.load(bm, b_at, DType::F32);
                            let product = k.b.ins().fmul(x, y);
                            let sum = k.b.use_var(acc);
                            let sum = k.b.ins().fadd(sum, product);
                            k.b.def_var(acc, sum);
                            Ok(())
                        })?;
                        let at = k.b.ins().iadd(out_row, j);
                        let sum = k.b.use_var(acc);
                        let value = k.finish(&finish, sum, i, j, at)?;
                        k.store(out, at, DType::F32, value);
                        Ok(())
                    })
                })
            },
        )
    }

    /// The epilogue of one output element: bias, activation, residual.
    fn finish(
        &mut self,
        finish: &Finish,
        mut value: Value,
        i: Value,
        j: Value,
        at: Value,
    ) -> Result<Value, String> {
        if let Some((bias, base, bias_m, bias_n)) = finish.bias {
            let im = self.b.ins().imul(i, bias_m);
            let jn = self.b.ins().imul(j, bias_n);
            let c_at = self.b.ins().iadd(base, im);
            let c_at = self.b.ins().iadd(c_at, jn);
            let c = self.load(bias, c_at, DType::F32);
            value = self.b.ins().fadd(value, c);
        }
        if let Some(f) = finish.activation {
            value = self.unary(f, DType::F32, value)?;
        }
        if let Some(residual) = finish.residual {
            let r = self.load(residual, at, DType::F32);
            value = self.b.ins().fadd(value, r);
        }
        Ok(value)
    }

    /// The dims and strides of every axis but `axis`, and that axis's length and stride.
    fn split_axis(
        &mut self,
        ty: &TensorType,
        axis: usize,
    ) -> (Vec<Value>, Vec<Value>, Value, Value) {
        let dims = self.dims(ty);
        let strides = self.strides(&dims);
        let outer_dims = dims
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != axis)
            .map(|(_, &d)| d)
            .collect();
        let outer_strides = strides
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != axis)
            .map(|(_, &s)| s)
            .collect();
        (outer_dims, outer_strides, dims[axis], strides[axis])
    }

    fn softmax(&mut self, ty: &TensorType, axis: i64, out: Value, x: Value) -> Result<(), String> {
        let axis = resolve_axis(axis, ty.rank())?;
        let (outer_dims, outer_strides, len, stride) = self.split_axis(ty, axis);
        if axis + 1 == ty.rank() {
            return self.softmax_rows(&outer_dims, len, out, x);
        }
        let zero = self.iconst(0);
        self.nest(&outer_dims, &[outer_strides], vec![zero], &mut |k, base| {
            let base = base[0];
            let at = |k: &mut Self, j: Value| {
                let step = k.b.ins().imul(j, stride);
                k.b.ins().iadd(base, step)
            };
            let max = k.b.declare_var(types::F32);
            let minus_inf = k.b.ins().f32const(f32::NEG_INFINITY);
            k.b.def_var(max, minus_inf);
            k.for_range(len, &mut |k, j| {
                let o = at(k, j);
                let v = k.load(x, o, DType::F32);
                let m = k.b.use_var(max);
                let m = k.b.ins().fmax(m, v);
                k.b.def_var(max, m);
                Ok(())
            })?;
            let sum = k.b.declare_var(types::F64);
            let zero_f = k.b.ins().f64const(0.0);
            k.b.def_var(sum, zero_f);
            k.for_range(len, &mut |k, j| {
                let o = at(k, j);
                let v = k.load(x, o, DType::F32);
                let m = k.b.use_var(max);
                let shifted = k.b.ins().fsub(v, m);
                let e = k.exp_f32(shifted);
                k.store(out, o, DType::F32, e);
                let s = k.b.use_var(sum);
                let wide = k.b.ins().fpromote(types::F64, e);
                let s = k.b.ins().fadd(s, wide);
                k.b.def_var(sum, s);
                Ok(())
            })?;
            k.for_range(len, &mut |k, j| {
                let o = at(k, j);
                let e = k.load(out, o, DType::F32);
                let s = k.b.use_var(sum);
                let e = k.b.ins().fpromote(types::F64, e);
                let p = k.b.ins().fdiv(e, s);
                let p = k.b.ins().fdemote(types::F32, p);
                k.store(out, o, DType::F32, p);
                Ok(())
            })
        })
    }

    /// Softmax over contiguous rows, by the runtime's row kernel (AVX-512 where the CPU has it).
    fn softmax_rows(
        &mut self,
        outer_dims: &[Value],
        len: Value,
        out: Value,
        x: Value,
    ) -> Result<(), String> {
        let rows = outer_dims
            .iter()
            .copied()
            .reduce(|a, b| self.b.ins().imul(a, b))
            .unwrap_or_else(|| self.iconst(1));
        self.call_void("kiln_softmax_rows", &[rows, len, x, out])
    }

    /// Copies `bytes` bytes from `from` to `to` (not overlapping): 16 at a time, then one by one.
    fn copy_bytes(&mut self, from: Value, to: Value, bytes: Value) -> Result<(), String> {
        let zero = self.iconst(0);
        let vector_end = self.b.ins().band_imm_s(bytes, -16);
        self.for_steps(zero, vector_end, 16, &mut |k, i| {
            let (src, dst) = (k.b.ins().iadd(from, i), k.b.ins().iadd(to, i));
            let v = k.b.ins().load(types::I8X16, memory(), src, 0);
            k.b.ins().store(memory(), v, dst, 0);
            Ok(())
        })?;
        self.for_steps(vector_end, bytes, 1, &mut |k, i| {
            let (src, dst) = (k.b.ins().iadd(from, i), k.b.ins().iadd(to, i));
            let v = k.b.ins().load(types::I8, memory(), src, 0);
            k.b.ins().store(memory(), v, dst, 0);
            Ok(())
        })
    }

    /// Loads elements `j..j + 4` of an f32 row.
    fn load_lanes(&mut self, row: Value, j: Value) -> Value {
        let at = self.address(row, j, DType::F32);
        self.b.ins().load(types::F32X4, memory(), at, 0)
    }

    /// Stores four f32 at elements `j..j + 4` of an f32 row.
    fn store_lanes(&mut self, row: Value, j: Value, value: Value) {
        let at = self.address(row, j, DType::F32);
        self.b.ins().store(memory(), value, at, 0);
    }

    /// The lanes 2 and 3 of an f32x4, moved to lanes 0 and 1.
    fn high_half(&mut self, v: Value) -> Value {
        let bytes = self.b.ins().bitcast(types::I8X16, lanes(), v);
        let order: Vec<u8> = (8..16).chain(0..8).collect();
        let order = self.b.func.dfg.immediates.push(order.into());
        let moved = self.b.ins().shuffle(bytes, bytes, order);
        self.b.ins().bitcast(types::F32X4, lanes(), moved)
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &mut self,
        x_ty: &TensorType,
        ty: &TensorType,
        op: ReduceOp,
        axes: &[i64],
        keep_dims: bool,
        out: Value,
        x: Value,
    ) -> Result<(), String> {
        let reduced: Vec<usize> = axes
            .iter()
            .map(|&a| resolve_axis(a, x_ty.rank()))
            .collect::<Result<_, _>>()?;
        let x_dims = self.dims(x_ty);
        let x_strides = self.strides(&x_dims);
        let out_dims = self.dims(ty);
        let out_strides = self.strides(&out_dims);
        let (mut kept_dims, mut kept_x, mut kept_out, mut red_dims, mut red_x) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut out_axis = 0;
        for axis in 0..x_ty.rank() {
            if reduced.contains(&axis) {
                red_dims.push(x_dims[axis]);
                red_x.push(x_strides[axis]);
                if keep_dims {
                    out_axis += 1;
                }
            } else {
                kept_dims.push(x_dims[axis]);
                kept_x.push(x_strides[axis]);
                kept_out.push(out_strides[out_axis]);
                out_axis += 1;
            }
        }
        let count = red_dims
            .iter()
            .copied()
            .reduce(|a, b| self.b.ins().imul(a, b))
            .unwrap_or_else(|| self.iconst(1));
        let zero = self.iconst(0);
        self.nest(
            &kept_dims,
            &[kept_x, kept_out],
            vec![zero, zero],
            &mut |k, bases| {
                let (xb, ob) = (bases[0], bases[1]);
                let acc = k.b.declare_var(types::F64);
                let init = k.b.ins().f64const(match op {
                    ReduceOp::Sum | ReduceOp::Mean => 0.0,
                    ReduceOp::Prod => 1.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                    ReduceOp::Min => f64::INFINITY,
                });
                k.b.def_var(acc, init);
                k.nest(
                    &red_dims,
                    std::slice::from_ref(&red_x),
                    vec![xb],
                    &mut |k, at| {
                        let v = k.load(x, at[0], DType::F32);
                        let v = k.b.ins().fpromote(types::F64, v);
                        let a = k.b.use_var(acc);
                        let a = match op {
                            ReduceOp::Sum | ReduceOp::Mean => k.b.ins().fadd(a, v),
                            ReduceOp::Prod => k.b.ins().fmul(a, v),
                            ReduceOp::Max => k.b.ins().fmax(a, v),
                            ReduceOp::Min => k.b.ins().fmin(a, v),
                        };
                        k.b.def_var(acc, a);
                        Ok(())
                    },
                )?;
                let mut result = k.b.use_var(acc);
                if op == ReduceOp::Mean {
                    let n = k.b.ins().fcvt_from_sint(types::F64, count);
                    result = k.b.ins().fdiv(result, n);
                }
                let result = k.b.ins().fdemote(types::F32, result);
                k.store(out, ob, DType::F32, result);
                Ok(())
            },
        )
    }

    fn scalar_const(&mut self, value: kiln_ir::Scalar, dtype: DType) -> Value {
        match dtype {
            DType::F32 => self.b.ins().f32const(value.as_f64() as f32),
            _ => {
                let v = match dtype {
                    DType::Bool => i64::from(value.as_f64() != 0.0),
                    _ => value.as_i64(),
                };
                self.b.ins().iconst(clif_type(dtype), v)
            }
        }
    }

    /// Clamps `v` into `lo..=hi` (signed).
    fn clamp(&mut self, v: Value, lo: Value, hi: Value) -> Value {
        let v = self.b.ins().smax(v, lo);
        self.b.ins().smin(v, hi)
    }

    /// Branches to the failure block with `status` when `condition` holds.
    fn fail_if(&mut self, condition: Value, status: i32) {
        let code = self.b.ins().iconst(types::I32, i64::from(status));
        let ok = self.b.create_block();
        self.b
            .ins()
            .brif(condition, self.fail, &[BlockArg::Value(code)], ok, &[]);
        self.b.switch_to_block(ok);
    }

    #[allow(clippy::too_many_arguments)]
    fn slice(
        &mut self,
        x_ty: &TensorType,
        ty: &TensorType,
        axis: i64,
        start: &Dim,
        step: i64,
        out: Value,
        x: Value,
    ) -> Result<(), String> {
        let axis = resolve_axis(axis, x_ty.rank())?;
        let x_dims = self.dims(x_ty);
        let x_strides = self.strides(&x_dims);
        let out_dims = self.dims(ty);
        let out_strides = self.strides(&out_dims);
        // The first index, with ONNX's negative-from-the-end rule and clamping.
        let dim = x_dims[axis];
        let s = self.dim(start);
        let negative = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, s, 0);
        let shifted = self.b.ins().iadd(s, dim);
        let s = self.b.ins().select(negative, shifted, s);
        let zero = self.iconst(0);
        let hi = if step > 0 {
            dim
        } else {
            self.b.ins().iadd_imm_s(dim, -1)
        };
        let hi = self.b.ins().smax(hi, zero);
        let first = self.clamp(s, zero, hi);
        let base = self.b.ins().imul(first, x_strides[axis]);
        let mut strides = x_strides.clone();
        strides[axis] = self.b.ins().imul_imm_s(x_strides[axis], step);
        let dtype = ty.dtype;
        self.nest(
            &out_dims,
            &[out_strides, strides],
            vec![zero, base],
            &mut |k, at| {
                let v = k.load(x, at[1], dtype);
                k.store(out, at[0], dtype, v);
                Ok(())
            },
        )
    }

    fn concat(
        &mut self,
        operands: &[&TensorType],
        ty: &TensorType,
        axis: i64,
        out: Value,
        inputs: &[Value],
    ) -> Result<(), String> {
        let axis = resolve_axis(axis, ty.rank())?;
        let out_dims = self.dims(ty);
        let out_strides = self.strides(&out_dims);
        let mut position = self.iconst(0);
        let dtype = ty.dtype;
        for (operand, &x) in operands.iter().zip(inputs) {
            let dims = self.dims(operand);
            let strides = self.strides(&dims);
            let base = self.b.ins().imul(position, out_strides[axis]);
            let zero = self.iconst(0);
            self.nest(
                &dims,
                &[out_strides.clone(), strides],
                vec![base, zero],
                &mut |k, at| {
                    let v = k.load(x, at[1], dtype);
                    k.store(out, at[0], dtype, v);
                    Ok(())
                },
            )?;
            position = self.b.ins().iadd(position, dims[axis]);
        }
        Ok(())
    }

    /// A loaded index made non-negative (counting from the end) and checked against `len`.
    fn checked_index(&mut self, index: Value, index_dtype: DType, len: Value) -> Value {
        let i = self.cast(index, index_dtype, DType::I64);
        let negative = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, i, 0);
        let shifted = self.b.ins().iadd(i, len);
        let i = self.b.ins().select(negative, shifted, i);
        let below = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, i, 0);
        let above = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, i, len);
        let outside = self.b.ins().bor(below, above);
        self.fail_if(outside, INDEX_OUT_OF_RANGE);
        i
    }

    #[allow(clippy::too_many_arguments)]
    fn gather(
        &mut self,
        data_ty: &TensorType,
        idx_ty: &TensorType,
        ty: &TensorType,
        axis: i64,
        out: Value,
        data: Value,
        indices: Value,
    ) -> Result<(), String> {
        let axis = resolve_axis(axis, data_ty.rank())?;
        let data_dims = self.dims(data_ty);
        let data_strides = self.strides(&data_dims);
        let idx_dims = self.dims(idx_ty);
        let idx_strides = self.strides(&idx_dims);
        let out_dims = self.dims(ty);
        let out_strides = self.strides(&out_dims);
        let zero = self.iconst(0);
        // Output axes: data's outer axes, then the index axes, then data's inner axes.
        let q = idx_ty.rank();
        let data_walk: Vec<Value> = (0..out_dims.len())
            .map(|a| {
                if a < axis {
                    data_strides[a]
                } else if a < axis + q {
                    zero
                } else {
                    data_strides[a - q + 1]
                }
            })
            .collect();
        let idx_walk: Vec<Value> = (0..out_dims.len())
            .map(|a| {
                if a >= axis && a < axis + q {
                    idx_strides[a - axis]
                } else {
                    zero
                }
            })
            .collect();
        let (len, axis_stride, dtype, idx_dtype) =
            (data_dims[axis], data_strides[axis], ty.dtype, idx_ty.dtype);
        // Every index is checked, even when the gathered slices are empty, as the interpreter does.
        let count = idx_dims
            .iter()
            .copied()
            .reduce(|a, b| self.b.ins().imul(a, b))
            .unwrap_or_else(|| self.iconst(1));
        self.for_range(count, &mut |k, j| {
            let raw = k.load(indices, j, idx_dtype);
            k.checked_index(raw, idx_dtype, len);
            Ok(())
        })?;
        self.nest(
            &out_dims,
            &[out_strides, data_walk, idx_walk],
            vec![zero, zero, zero],
            &mut |k, at| {
                let raw = k.load(indices, at[2], idx_dtype);
                let i = k.checked_index(raw, idx_dtype, len);
                let step = k.b.ins().imul(i, axis_stride);
                let from = k.b.ins().iadd(at[1], step);
                let v = k.load(data, from, dtype);
                k.store(out, at[0], dtype, v);
                Ok(())
            },
        )
    }

    fn gather_nd(
        &mut self,
        data_ty: &TensorType,
        idx_ty: &TensorType,
        out: Value,
        data: Value,
        indices: Value,
    ) -> Result<(), String> {
        let data_dims = self.dims(data_ty);
        let data_strides = self.strides(&data_dims);
        let idx_dims = self.dims(idx_ty);
        let tuple = idx_ty.shape.0[idx_ty.rank() - 1].as_const().unwrap_or(0) as usize;
        let lookups = &idx_dims[..idx_dims.len() - 1];
        let lookup_strides = self.strides(lookups);
        let slice_dims = data_dims[tuple..].to_vec();
        let slice_len = slice_dims
            .iter()
            .copied()
            .reduce(|a, b| self.b.ins().imul(a, b))
            .unwrap_or_else(|| self.iconst(1));
        let zero = self.iconst(0);
        let t = self.iconst(tuple as i64);
        let idx_dtype = idx_ty.dtype;
        let dtype = data_ty.dtype;
        self.nest(lookups, &[lookup_strides], vec![zero], &mut |k, at| {
            let lookup = at[0];
            let mut from = k.iconst(0);
            for j in 0..tuple {
                let position = k.b.ins().imul(lookup, t);
                let position = k.b.ins().iadd_imm_s(position, j as i64);
                let raw = k.load(indices, position, idx_dtype);
                let i = k.checked_index(raw, idx_dtype, data_dims[j]);
                let step = k.b.ins().imul(i, data_strides[j]);
                from = k.b.ins().iadd(from, step);
            }
            let to = k.b.ins().imul(lookup, slice_len);
            k.for_range(slice_len, &mut |k, e| {
                let src = k.b.ins().iadd(from, e);
                let dst = k.b.ins().iadd(to, e);
                let v = k.load(data, src, dtype);
                k.store(out, dst, dtype, v);
                Ok(())
            })
        })
    }

    /// Layer normalization (`centered`) or RMS normalization over the axes from `axis` on, with
    /// row statistics accumulated in f64 as the interpreter does.
    fn normalize(
        &mut self,
        operands: &[&TensorType],
        axis: i64,
        eps: f32,
        centered: bool,
        out: Value,
        inputs: &[Value],
    ) -> Result<(), String> {
        let x_ty = operands[0];
        let axis = resolve_axis(axis, x_ty.rank())?;
        let dims = self.dims(x_ty);
        let outer = &dims[..axis];
        let inner = dims[axis..].to_vec();
        let row = inner
            .iter()
            .copied()
            .reduce(|a, b| self.b.ins().imul(a, b))
            .unwrap_or_else(|| self.iconst(1));
        // Rows are contiguous: the outer axes step over whole rows.
        let mut outer_strides = self.strides(outer);
        for stride in outer_strides.iter_mut() {
            *stride = self.b.ins().imul(*stride, row);
        }
        let inner_strides = self.strides(&inner);
        let inner_ty = TensorType::new(x_ty.dtype, kiln_ir::Shape(x_ty.shape.0[axis..].to_vec()));
        let param_strides: Vec<Vec<Value>> = operands[1..]
            .iter()
            .map(|p| self.broadcast_strides(p, inner_ty.rank()))
            .collect();
        let zero = self.iconst(0);
        let (x, scale, bias) = (inputs[0], inputs[1], inputs.get(2).copied());
        let count = self.b.ins().fcvt_from_sint(types::F64, row);
        if axis + 1 == x_ty.rank() {
            let contiguous: Vec<bool> = operands[1..]
                .iter()
                .map(|p| p.rank() > 0 && p.shape.0[p.rank() - 1] != Dim::Const(1))
                .collect();
            let rows = Rows {
                outer,
                outer_strides,
                len: row,
            };
            return self.normalize_rows(rows, eps, centered, out, x, scale, bias, &contiguous);
        }
        self.nest(outer, &[outer_strides], vec![zero], &mut |k, base| {
            let base = base[0];
            let sum = k.b.declare_var(types::F64);
            let zero_f = k.b.ins().f64const(0.0);
            k.b.def_var(sum, zero_f);
            let mean = if centered {
                k.for_range(row, &mut |k, j| {
                    let at = k.b.ins().iadd(base, j);
                    let v = k.load(x, at, DType::F32);
                    let v = k.b.ins().fpromote(types::F64, v);
                    let s = k.b.use_var(sum);
                    let s = k.b.ins().fadd(s, v);
                    k.b.def_var(sum, s);
                    Ok(())
                })?;
                let s = k.b.use_var(sum);
                k.b.ins().fdiv(s, count)
            } else {
                k.b.ins().f64const(0.0)
            };
            let squares = k.b.declare_var(types::F64);
            k.b.def_var(squares, zero_f);
            k.for_range(row, &mut |k, j| {
                let at = k.b.ins().iadd(base, j);
                let v = k.load(x, at, DType::F32);
                let v = k.b.ins().fpromote(types::F64, v);
                let d = k.b.ins().fsub(v, mean);
                let d2 = k.b.ins().fmul(d, d);
                let s = k.b.use_var(squares);
                let s = k.b.ins().fadd(s, d2);
                k.b.def_var(squares, s);
                Ok(())
            })?;
            let s = k.b.use_var(squares);
            let variance = k.b.ins().fdiv(s, count);
            let eps = k.b.ins().f64const(f64::from(eps));
            let shifted = k.b.ins().fadd(variance, eps);
            let root = k.b.ins().sqrt(shifted);
            let one = k.b.ins().f64const(1.0);
            let inv = k.b.ins().fdiv(one, root);
            let mut strides = vec![inner_strides.clone()];
            strides.extend(param_strides.iter().cloned());
            let bases = vec![base; 1]
                .into_iter()
                .chain(param_strides.iter().map(|_| zero))
                .collect();
            k.nest(&inner, &strides, bases, &mut |k, at| {
                let v = k.load(x, at[0], DType::F32);
                let v = k.b.ins().fpromote(types::F64, v);
                let d = k.b.ins().fsub(v, mean);
                let n = k.b.ins().fmul(d, inv);
                let g = k.load(scale, at[1], DType::F32);
                let g = k.b.ins().fpromote(types::F64, g);
                let mut y = k.b.ins().fmul(n, g);
                if let Some(bias) = bias {
                    let c = k.load(bias, at[2], DType::F32);
                    let c = k.b.ins().fpromote(types::F64, c);
                    y = k.b.ins().fadd(y, c);
                }
                let y = k.b.ins().fdemote(types::F32, y);
                k.store(out, at[0], DType::F32, y);
                Ok(())
            })
        })
    }

    /// [`Kernel::normalize`] over the last axis, four lanes at a time with scalar tails: sums and
    /// squared deviations accumulate in f64 lanes, each `(x - mean) / std` is computed in f64 and
    /// rounded once, then scaled and shifted in f32.
    #[allow(clippy::too_many_arguments)]
    fn normalize_rows(
        &mut self,
        rows: Rows<'_>,
        eps: f32,
        centered: bool,
        out: Value,
        x: Value,
        scale: Value,
        bias: Option<Value>,
        contiguous: &[bool],
    ) -> Result<(), String> {
        let zero = self.iconst(0);
        let len = rows.len;
        let count = self.b.ins().fcvt_from_sint(types::F64, len);
        let vector_end = self.b.ins().band_imm_s(len, -4);
        let params: Vec<(Value, bool)> = std::iter::once(scale)
            .chain(bias)
            .zip(contiguous.iter().copied())
            .collect();
        self.nest(
            rows.outer,
            &[rows.outer_strides],
            vec![zero],
            &mut |k, base| {
                let (row_x, row_out) = (
                    k.address(x, base[0], DType::F32),
                    k.address(out, base[0], DType::F32),
                );
                let mean = if centered {
                    let sum = k.sum_f64(row_x, len, vector_end, None)?;
                    k.b.ins().fdiv(sum, count)
                } else {
                    k.b.ins().f64const(0.0)
                };
                let squares = k.sum_f64(row_x, len, vector_end, Some(mean))?;
                let variance = k.b.ins().fdiv(squares, count);
                let eps = k.b.ins().f64const(f64::from(eps));
                let shifted = k.b.ins().fadd(variance, eps);
                let root = k.b.ins().sqrt(shifted);
                let one = k.b.ins().f64const(1.0);
                let inv = k.b.ins().fdiv(one, root);
                let (mean_lanes, inv_lanes) = (
                    k.b.ins().splat(types::F64X2, mean),
                    k.b.ins().splat(types::F64X2, inv),
                );
                // A parameter along the row, or one value for the whole row.
                let param =
                    |k: &mut Self, (p, along_row): (Value, bool), j: Value, vector: bool| {
                        if along_row {
                            return k.load_f32s(p, j, vector);
                        }
                        let scalar = k.load(p, zero, DType::F32);
                        if vector {
                            k.b.ins().splat(types::F32X4, scalar)
                        } else {
                            scalar
                        }
                    };
                k.for_steps(zero, vector_end, 4, &mut |k, j| {
                    let v = k.load_lanes(row_x, j);
                    let halves = [k.b.ins().fvpromote_low(v), {
                        let high = k.high_half(v);
                        k.b.ins().fvpromote_low(high)
                    }];
                    let [low, high] = halves.map(|h| {
                        let d = k.b.ins().fsub(h, mean_lanes);
                        let n = k.b.ins().fmul(d, inv_lanes);
                        k.b.ins().fvdemote(n)
                    });
                    let mut y = k.join_low_halves(low, high);
                    let g = param(k, params[0], j, true);
                    y = k.b.ins().fmul(y, g);
                    if let Some(&shift) = params.get(1) {
                        let c = param(k, shift, j, true);
                        y = k.b.ins().fadd(y, c);
                    }
                    k.store_lanes(row_out, j, y);
                    Ok(())
                })?;
                k.for_steps(vector_end, len, 1, &mut |k, j| {
                    let v = k.load(row_x, j, DType::F32);
                    let v = k.b.ins().fpromote(types::F64, v);
                    let d = k.b.ins().fsub(v, mean);
                    let n = k.b.ins().fmul(d, inv);
                    let mut y = k.b.ins().fdemote(types::F32, n);
                    let g = param(k, params[0], j, false);
                    y = k.b.ins().fmul(y, g);
                    if let Some(&shift) = params.get(1) {
                        let c = param(k, shift, j, false);
                        y = k.b.ins().fadd(y, c);
                    }
                    k.store(row_out, j, DType::F32, y);
                    Ok(())
                })
            },
        )
    }

    /// The f64 sum of an f32 row's elements, or of their squared deviations from `center`, with
    /// two f64x2 accumulators over the first `vector_end` elements and a scalar tail.
    fn sum_f64(
        &mut self,
        row: Value,
        len: Value,
        vector_end: Value,
        center: Option<Value>,
    ) -> Result<Value, String> {
        let zero = self.iconst(0);
        let (low_sum, high_sum) = (
            self.b.declare_var(types::F64X2),
            self.b.declare_var(types::F64X2),
        );
        let zero_f64 = self.b.ins().f64const(0.0);
        let zeros = self.b.ins().splat(types::F64X2, zero_f64);
        self.b.def_var(low_sum, zeros);
        self.b.def_var(high_sum, zeros);
        let center_lanes = center.map(|c| self.b.ins().splat(types::F64X2, c));
        self.for_steps(zero, vector_end, 4, &mut |k, j| {
            let v = k.load_lanes(row, j);
            let low = k.b.ins().fvpromote_low(v);
            let high = k.high_half(v);
            let high = k.b.ins().fvpromote_low(high);
            for (sum, part) in [(low_sum, low), (high_sum, high)] {
                let part = k.squared_deviation(part, center_lanes);
                let s = k.b.use_var(sum);
                let s = k.b.ins().fadd(s, part);
                k.b.def_var(sum, s);
            }
            Ok(())
        })?;
        let total = self.b.declare_var(types::F64);
        let (low, high) = (self.b.use_var(low_sum), self.b.use_var(high_sum));
        let both = self.b.ins().fadd(low, high);
        let first = self.b.ins().extractlane(both, 0);
        let second = self.b.ins().extractlane(both, 1);
        let sum = self.b.ins().fadd(first, second);
        self.b.def_var(total, sum);
        self.for_steps(vector_end, len, 1, &mut |k, j| {
            let v = k.load(row, j, DType::F32);
            let v = k.b.ins().fpromote(types::F64, v);
            let v = k.squared_deviation(v, center);
            let s = k.b.use_var(total);
            let s = k.b.ins().fadd(s, v);
            k.b.def_var(total, s);
            Ok(())
        })?;
        Ok(self.b.use_var(total))
    }

    /// `(v - center)^2`, or `v` itself without a center.
    fn squared_deviation(&mut self, v: Value, center: Option<Value>) -> Value {
        match center {
            Some(c) => {
                let d = self.b.ins().fsub(v, c);
                self.b.ins().fmul(d, d)
            }
            None => v,
        }
    }

    /// Elements `j..j + 4` of an f32 row as lanes, or element `j` alone.
    fn load_f32s(&mut self, row: Value, j: Value, vector: bool) -> Value {
        if vector {
            self.load_lanes(row, j)
        } else {
            self.load(row, j, DType::F32)
        }
    }

    /// Lanes 0 and 1 of `a` then lanes 0 and 1 of `b`.
    fn join_low_halves(&mut self, a: Value, b: Value) -> Value {
        let (a, b) = (
            self.b.ins().bitcast(types::I8X16, lanes(), a),
            self.b.ins().bitcast(types::I8X16, lanes(), b),
        );
        let order: Vec<u8> = (0..8).chain(16..24).collect();
        let order = self.b.func.dfg.immediates.push(order.into());
        let joined = self.b.ins().shuffle(a, b, order);
        self.b.ins().bitcast(types::F32X4, lanes(), joined)
    }

    fn arg(
        &mut self,
        x_ty: &TensorType,
        op: kiln_ir::ops::ArgOp,
        axis: i64,
        select_last: bool,
        out: Value,
        x: Value,
    ) -> Result<(), String> {
        let axis = resolve_axis(axis, x_ty.rank())?;
        let (outer_dims, outer_strides, len, stride) = self.split_axis(x_ty, axis);
        let empty = self.b.ins().icmp_imm_s(IntCC::Equal, len, 0);
        self.fail_if(empty, EMPTY_AXIS);
        let out_strides = self.strides(&outer_dims);
        let zero = self.iconst(0);
        let dtype = x_ty.dtype;
        let is_float = dtype == DType::F32;
        self.nest(
            &outer_dims,
            &[outer_strides, out_strides],
            vec![zero, zero],
            &mut |k, base| {
                let (xb, ob) = (base[0], base[1]);
                let best = k.b.declare_var(types::I64);
                let zero = k.iconst(0);
                k.b.def_var(best, zero);
                k.for_range(len, &mut |k, j| {
                    let step = k.b.ins().imul(j, stride);
                    let at = k.b.ins().iadd(xb, step);
                    let v = k.load(x, at, dtype);
                    let current = k.b.use_var(best);
                    let step = k.b.ins().imul(current, stride);
                    let at = k.b.ins().iadd(xb, step);
                    let b = k.load(x, at, dtype);
                    let (better, equal) = if is_float {
                        let cc = if op == kiln_ir::ops::ArgOp::Max {
                            FloatCC::GreaterThan
                        } else {
                            FloatCC::LessThan
                        };
                        let strict = k.b.ins().fcmp(cc, v, b);
                        // NaN wins over numbers; two NaNs are equal.
                        let v_nan = k.b.ins().fcmp(FloatCC::Unordered, v, v);
                        let b_nan = k.b.ins().fcmp(FloatCC::Unordered, b, b);
                        let b_num = k.b.ins().bxor_imm_s(b_nan, 1);
                        let nan_wins = k.b.ins().band(v_nan, b_num);
                        let better = k.b.ins().bor(strict, nan_wins);
                        let same = k.b.ins().fcmp(FloatCC::Equal, v, b);
                        let both_nan = k.b.ins().band(v_nan, b_nan);
                        (better, k.b.ins().bor(same, both_nan))
                    } else {
                        let cc = if op == kiln_ir::ops::ArgOp::Max {
                            IntCC::SignedGreaterThan
                        } else {
                            IntCC::SignedLessThan
                        };
                        (k.b.ins().icmp(cc, v, b), k.b.ins().icmp(IntCC::Equal, v, b))
                    };
                    let take = if select_last {
                        k.b.ins().bor(better, equal)
                    } else {
                        better
                    };
                    let chosen = k.b.ins().select(take, j, current);
                    k.b.def_var(best, chosen);
                    Ok(())
                })?;
                let result = k.b.use_var(best);
                k.store(out, ob, DType::I64, result);
                Ok(())
            },
        )
    }

    /// Fused attention: the runtime's kernel ([`kiln_runtime::AttentionCall`]) on a call
    /// description built in a stack slot. Up to [`MATERIALIZED_MAX_KEYS`] keys one tile holds
    /// every key (the materialized lowering); beyond, tiles of the node's `tile_k` keys stream
    /// through the online softmax.
    fn attention(
        &mut self,
        attention: &kiln_ir::ops::Attention,
        operands: &[&TensorType],
        out: Value,
        inputs: &[Value],
    ) -> Result<(), String> {
        use kiln_ir::ops::MaskSpec;
        let (q_dims, k_dims, v_dims) = (
            self.dims(operands[0]),
            self.dims(operands[1]),
            self.dims(operands[2]),
        );
        let zero = self.iconst(0);
        let (mask, mask_kind, mask_strides) = match operands.get(3) {
            Some(ty) => (
                inputs[3],
                if ty.dtype == DType::Bool { 1 } else { 2 },
                self.broadcast_strides(ty, 4),
            ),
            None => (zero, 0, vec![zero; 4]),
        };
        let (static_mask, window, global) = match attention.mask {
            MaskSpec::Dense => (0, 0, 0),
            MaskSpec::Causal => (1, 0, 0),
            MaskSpec::SlidingWindow { window } => (2, i64::from(window), 0),
            MaskSpec::GlobalLocal { global, window } => (3, i64::from(window), i64::from(global)),
            MaskSpec::BlockSparse { .. } => {
                return Err("block_sparse attention masks are not compiled yet".into())
            }
        };
        // The lowering rule, at run time on the actual key count.
        let tiled = self.iconst(i64::from(attention.tile_k));
        let short = self.b.ins().icmp_imm_s(
            IntCC::SignedLessThanOrEqual,
            k_dims[2],
            MATERIALIZED_MAX_KEYS,
        );
        let tile_k = self.b.ins().select(short, k_dims[2], tiled);
        let scale = self.b.ins().f64const(f64::from(attention.scale.0));
        let constants = [
            mask_kind,
            static_mask,
            window,
            global,
            i64::from(attention.tile_q),
        ];
        let [mask_kind, static_mask, window, global, tile_q] = constants.map(|c| self.iconst(c));
        let fields: Vec<Value> = [inputs[0], inputs[1], inputs[2], out, mask, mask_kind]
            .into_iter()
            .chain(mask_strides)
            .chain([
                q_dims[0],
                q_dims[1],
                k_dims[1],
                q_dims[2],
                k_dims[2],
                q_dims[3],
                v_dims[3],
                scale,
                static_mask,
                window,
                global,
                tile_q,
                tile_k,
            ])
            .collect();
        let call = self.stack_record(&fields);
        let mut sig = self.module.make_signature();
        sig.params.push(AbiParam::new(types::I64));
        sig.returns.push(AbiParam::new(types::I64));
        let callee = self
            .module
            .declare_function("kiln_attention", Linkage::Import, &sig)
            .map_err(|e| e.to_string())?;
        let fref = self.module.declare_func_in_func(callee, self.b.func);
        let inst = self.b.ins().call(fref, &[call]);
        let status = self.b.inst_results(inst)[0];
        self.fail_if(status, ATTENTION_HEADS);
        Ok(())
    }

    /// `silu(x @ w_gate) * (x @ w_up)` in the runtime, from the packed weights when both are.
    fn swiglu(
        &mut self,
        ty: &TensorType,
        x_ty: &TensorType,
        out: Value,
        inputs: &[Value],
        packed: [Option<Value>; 2],
    ) -> Result<(), String> {
        let out_dims = self.dims(ty);
        let (n, rows) = out_dims.split_last().expect("swiglu has rank >= 2");
        let k = *self.dims(x_ty).last().expect("swiglu input has rank >= 2");
        let one = self.iconst(1);
        let m = rows.iter().fold(one, |m, &d| self.b.ins().imul(m, d));
        let (gate, up, is_packed) = match packed {
            [Some(gate), Some(up)] => (gate, up, 1),
            _ => (inputs[1], inputs[2], 0),
        };
        let is_packed = self.iconst(is_packed);
        let call = self.stack_record(&[m, *n, k, inputs[0], k, gate, up, is_packed, *n, out, *n]);
        self.call_void("kiln_swiglu", &[call])
    }

    /// Rotary embedding of `[b, h, s, d]` by cos and sin tables broadcast to it, in the runtime.
    fn rope(
        &mut self,
        ty: &TensorType,
        tables: [&TensorType; 2],
        interleaved: bool,
        out: Value,
        inputs: &[Value],
    ) -> Result<(), String> {
        let dims = self.dims(ty);
        let odd = self.b.ins().band_imm_s(dims[3], 1);
        let is_odd = self.b.ins().icmp_imm_s(IntCC::NotEqual, odd, 0);
        self.fail_if(is_odd, ODD_HEAD_DIM);
        // Strides along batch, head and position; the last axis is the contiguous head dim.
        let [cos_strides, sin_strides] = tables.map(|table| self.broadcast_strides(table, 4));
        let interleaved = self.iconst(i64::from(interleaved));
        let fields: Vec<Value> = [inputs[0], inputs[1], inputs[2], out]
            .into_iter()
            .chain(dims.iter().copied())
            .chain(cos_strides[..3].iter().copied())
            .chain(sin_strides[..3].iter().copied())
            .chain([interleaved])
            .collect();
        let call = self.stack_record(&fields);
        self.call_void("kiln_rope", &[call])
    }

    /// `e^x` for an f32 or each lane of an f32x4, as code (no call, no branch): Cephes' `expf`
    /// scheme. `n = floor(x log2(e) + 1/2)`, the reduced argument `r = x - n ln 2` (ln 2 in two
    /// parts), a degree-5 polynomial for `e^r`, then scaling by `2^n` as two normal factors so
    /// that subnormal results round once. Overflow gives +inf, underflow 0, NaN stays NaN.
    /// Maximum error measured over the f32 range: see the `exp_matches_libm_over_the_f32_range`
    /// test, whose rows run through the lanes and the scalar tail.
    fn exp_f32(&mut self, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let c = |k: &mut Self, v: f32| k.float(ty, v);
        // No clamping: outside [-103.97, 88.72] (and for NaN) the selects at the end replace
        // whatever the steps below compute.
        let log2e = c(self, std::f32::consts::LOG2_E);
        let half = c(self, 0.5);
        let scaled = self.b.ins().fmul(x, log2e);
        let scaled = self.b.ins().fadd(scaled, half);
        let n = self.b.ins().floor(scaled);
        let (c1, c2) = (c(self, EXP_LN2_HIGH), c(self, EXP_LN2_LOW));
        let r = self.b.ins().fmul(n, c1);
        let r = self.b.ins().fsub(x, r);
        let r2 = self.b.ins().fmul(n, c2);
        let r = self.b.ins().fsub(r, r2);
        let poly = self.polynomial_f32(&EXP_POLYNOMIAL, r);
        let rr = self.b.ins().fmul(r, r);
        let y = self.b.ins().fmul(poly, rr);
        let y = self.b.ins().fadd(y, r);
        let one = c(self, 1.0);
        let y = self.b.ins().fadd(y, one);
        // 2^n = 2^(n >> 1) * 2^(n - (n >> 1)), both factors normal for n in [-150, 128].
        // n as an integer: adding 1.5 * 2^23 puts it in the low mantissa bits.
        let int = ty.as_int();
        let magic = c(self, 12_582_912.0);
        let biased = self.b.ins().fadd(n, magic);
        let bits = self.b.ins().bitcast(int, lanes(), biased);
        let magic_bits = self.int32(int, 0x4b40_0000);
        let ni = self.b.ins().isub(bits, magic_bits);
        let first = self.b.ins().sshr_imm_s(ni, 1);
        let second = self.b.ins().isub(ni, first);
        let bias = self.int32(int, 127);
        let factor = |k: &mut Self, e: Value| {
            let biased = k.b.ins().iadd(e, bias);
            let bits = k.b.ins().ishl_imm_s(biased, 23);
            k.b.ins().bitcast(ty, lanes(), bits)
        };
        let (f1, f2) = (factor(self, first), factor(self, second));
        let result = self.b.ins().fmul(y, f1);
        let result = self.b.ins().fmul(result, f2);
        let (overflow, underflow) = (c(self, EXP_OVERFLOW), c(self, EXP_UNDERFLOW));
        let (inf, zero) = (c(self, f32::INFINITY), c(self, 0.0));
        let big = self.b.ins().fcmp(FloatCC::GreaterThan, x, overflow);
        let result = self.select_float(big, inf, result);
        let small = self.b.ins().fcmp(FloatCC::LessThan, x, underflow);
        let result = self.select_float(small, zero, result);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.select_float(nan, x, result)
    }

    /// An i32 constant, or an i32x4 of four of it.
    fn int32(&mut self, ty: Type, v: i64) -> Value {
        let scalar = self.b.ins().iconst(types::I32, v);
        if ty.is_vector() {
            self.b.ins().splat(ty, scalar)
        } else {
            scalar
        }
    }

    /// An f32 constant, or an f32x4 of four of it.
    fn float(&mut self, ty: Type, v: f32) -> Value {
        let scalar = self.b.ins().f32const(v);
        if ty.is_vector() {
            self.b.ins().splat(ty, scalar)
        } else {
            scalar
        }
    }

    /// `condition ? a : b` for scalars, lane by lane for vectors (`condition` from `fcmp`).
    fn select_float(&mut self, condition: Value, a: Value, b: Value) -> Value {
        let ty = self.b.func.dfg.value_type(a);
        if ty.is_vector() {
            let mask = self.b.ins().bitcast(ty, lanes(), condition);
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(condition, a, b)
        }
    }

    /// `erf(x)` for an f32, as code: for `|x| < 1`, `x + x q(x^2)` with `q` a degree-6
    /// polynomial (`erf(x)/x - 1`); for `|x| >= 1`, `1 - e^(-x^2) p(1/|x|)` with `p` a degree-9
    /// polynomial for `erfc(x) e^(x^2)` on [1, 4] (beyond 4 the f32 result is 1), with the sign of
    /// `x`. Both polynomials are least-squares fits of the relative error, iterated towards
    /// minimax (`codegen/tools/fit_erf.py`); the `erf_matches_libm_over_the_f32_range` test
    /// measures the error.
    fn erf_f32(&mut self, x: Value) -> Value {
        let c = |k: &mut Self, v: f32| k.b.ins().f32const(v);
        let a = self.b.ins().fabs(x);
        let one = c(self, 1.0);
        // A branch, not a select: either polynomial alone costs as much as libm's erf.
        let (near, far, done) = (
            self.b.create_block(),
            self.b.create_block(),
            self.b.create_block(),
        );
        let result = self.b.append_block_param(done, types::F32);
        let is_near = self.b.ins().fcmp(FloatCC::LessThan, a, one);
        self.b.ins().brif(is_near, near, &[], far, &[]);
        self.b.switch_to_block(near);
        self.b.seal_block(near);
        let t = self.b.ins().fmul(x, x);
        let q = self.polynomial_f32(&ERF_SMALL, t);
        let xq = self.b.ins().fmul(x, q);
        let small = self.b.ins().fadd(x, xq);
        self.b.ins().jump(done, &[BlockArg::Value(small)]);
        self.b.switch_to_block(far);
        self.b.seal_block(far);
        // NaN goes this way and stays NaN through fmax and fmin.
        let four = c(self, 4.0);
        let clamped = self.b.ins().fmax(a, one);
        let clamped = self.b.ins().fmin(clamped, four);
        let inverse = self.b.ins().fdiv(one, clamped);
        let p = self.polynomial_f32(&ERFC_SCALED_LARGE, inverse);
        let square = self.b.ins().fmul(clamped, clamped);
        let negated = self.b.ins().fneg(square);
        let gaussian = self.exp_f32(negated);
        let tail = self.b.ins().fmul(gaussian, p);
        let large = self.b.ins().fsub(one, tail);
        let large = self.b.ins().fcopysign(large, x);
        self.b.ins().jump(done, &[BlockArg::Value(large)]);
        self.b.switch_to_block(done);
        self.b.seal_block(done);
        result
    }

    /// `coefficients[0] v^n + ... + coefficients[n]` by Horner's rule.
    fn polynomial_f32(&mut self, coefficients: &[f32], v: Value) -> Value {
        let ty = self.b.func.dfg.value_type(v);
        let mut poly = self.float(ty, coefficients[0]);
        for &coefficient in &coefficients[1..] {
            let term = self.float(ty, coefficient);
            poly = self.b.ins().fmul(poly, v);
            poly = self.b.ins().fadd(poly, term);
        }
        poly
    }
}
