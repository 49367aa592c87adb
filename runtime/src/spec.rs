//! What the runtime knows of a compiled model: its symbols, inputs and outputs, the buffer table
//! the kernels read, the checks that keep every kernel inside its buffers, and the kernels' names
//! for error messages. The compiler writes it (as JSON inside the object file, or in memory for the
//! JIT); nothing else about the graph reaches the runtime.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element types, with the codes the C API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(i32)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
    /// bfloat16.
    BF16 = 3,
    /// Signed 64-bit integer.
    I64 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// Signed 8-bit integer.
    I8 = 6,
    /// Unsigned 8-bit integer.
    U8 = 7,
    /// Boolean, one byte (0 or 1).
    Bool = 8,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The dtype of a C API code.
    pub fn from_code(code: i32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as i32 == code)
    }

    /// The lowercase name (`f32`, `bool`, ...), as in kiln's text IR.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An integer expression over the symbols, evaluated with overflow and division checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DimExpr {
    /// A constant.
    Const(i64),
    /// The value of the symbol at this index of [`ModelSpec::symbols`].
    Sym(usize),
    /// `a + b`.
    Add(Box<DimExpr>, Box<DimExpr>),
    /// `a - b`.
    Sub(Box<DimExpr>, Box<DimExpr>),
    /// `a * b`.
    Mul(Box<DimExpr>, Box<DimExpr>),
    /// `a / b`, rounding toward negative infinity.
    Div(Box<DimExpr>, Box<DimExpr>),
}

impl DimExpr {
    /// The value at these symbol values (`None` for a symbol no input bound).
    pub fn eval(&self, symbols: &[Option<i64>]) -> Result<i64, DimError> {
        let arithmetic = |a: &DimExpr, b: &DimExpr, f: fn(i64, i64) -> Option<i64>| {
            f(a.eval(symbols)?, b.eval(symbols)?).ok_or(DimError::Overflow)
        };
        match self {
            DimExpr::Const(v) => Ok(*v),
            DimExpr::Sym(index) => symbols
                .get(*index)
                .copied()
                .flatten()
                .ok_or(DimError::Unbound(*index)),
            DimExpr::Add(a, b) => arithmetic(a, b, i64::checked_add),
            DimExpr::Sub(a, b) => arithmetic(a, b, i64::checked_sub),
            DimExpr::Mul(a, b) => arithmetic(a, b, i64::checked_mul),
            DimExpr::Div(a, b) => {
                if b.eval(symbols)? == 0 {
                    return Err(DimError::DivisionByZero);
                }
                arithmetic(a, b, |a, b| {
                    let quotient = a.checked_div(b)?;
                    Some(if a % b != 0 && (a < 0) != (b < 0) {
                        quotient - 1
                    } else {
                        quotient
                    })
                })
            }
        }
    }

    /// Whether every symbol index is below `count`.
    pub fn symbols_within(&self, count: usize) -> bool {
        match self {
            DimExpr::Const(_) => true,
            DimExpr::Sym(index) => *index < count,
            DimExpr::Add(a, b) | DimExpr::Sub(a, b) | DimExpr::Mul(a, b) | DimExpr::Div(a, b) => {
                a.symbols_within(count) && b.symbols_within(count)
            }
        }
    }

    /// The expression in the text IR's spelling, with symbol names.
    pub fn display<'a>(&'a self, symbols: &'a [SymbolSpec]) -> impl fmt::Display + 'a {
        DisplayDim {
            expr: self,
            symbols,
        }
    }
}

/// Why a dim expression has no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimError {
    /// The symbol at this index is not bound by any input.
    Unbound(usize),
    /// A division by zero.
    DivisionByZero,
    /// The arithmetic overflows i64.
    Overflow,
}

struct DisplayDim<'a> {
    expr: &'a DimExpr,
    symbols: &'a [SymbolSpec],
}

impl fmt::Display for DisplayDim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sub = |expr| DisplayDim {
            expr,
            symbols: self.symbols,
        };
        let mut binary = |a, op: &str, b| write!(f, "({} {op} {})", sub(a), sub(b));
        match self.expr {
            DimExpr::Const(v) => write!(f, "{v}"),
            DimExpr::Sym(index) => match self.symbols.get(*index) {
                Some(symbol) => f.write_str(&symbol.name),
                None => write!(f, "?{index}"),
            },
            DimExpr::Add(a, b) => binary(a, "+", b),
            DimExpr::Sub(a, b) => binary(a, "-", b),
            DimExpr::Mul(a, b) => binary(a, "*", b),
            DimExpr::Div(a, b) => binary(a, "/", b),
        }
    }
}

/// A symbolic dim, bound at run time from the inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolSpec {
    /// Its name in the graph.
    pub name: String,
    /// The largest value the buffers were planned for.
    pub max: i64,
}

/// A graph input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Its name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Its dims, as indexes into [`ModelSpec::dims`].
    pub dims: Vec<usize>,
    /// Its slot in the buffer table.
    pub slot: usize,
}

/// Where a slot of the buffer table points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The caller's buffer for the input at this index of [`ModelSpec::inputs`].
    Input(usize),
    /// The weight at this index of [`ModelSpec::weights`].
    Weight(usize),
    /// An offset in the arena.
    Arena(usize),
    /// Nothing: a weight no kernel reads (every use reads its packed copy).
    Absent,
}

/// A buffer that must hold a node's values at the run's symbol values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferCheck {
    /// The node it belongs to, for error messages.
    pub node: String,
    /// Bytes per element.
    pub element_bytes: usize,
    /// Element counts along each axis, as indexes into [`ModelSpec::dims`].
    pub dims: Vec<usize>,
    /// Bytes the plan reserved.
    pub reserved: usize,
}

/// A weight: a range of the weight blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSpec {
    /// The node that holds it, for error messages.
    pub node: String,
    /// Offset in the blob.
    pub offset: usize,
    /// Length in bytes.
    pub bytes: usize,
}

/// A compiled node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSpec {
    /// The node's name, for error messages.
    pub node: String,
    /// Its op, for error messages.
    pub op: String,
    /// Whether the kernel can run as parallel tasks (each call does part `task` of `tasks`).
    pub parallel: bool,
    /// Its output's dims, as indexes into [`ModelSpec::dims`]: the size of its work.
    pub dims: Vec<usize>,
}

/// Everything the runtime needs to check inputs and run the kernels of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The model's name (the prefix of its C API).
    pub name: String,
    /// Symbolic dims, in the order the kernels index them.
    pub symbols: Vec<SymbolSpec>,
    /// Every dim expression the model uses: inputs, outputs, buffers and op attributes. All must
    /// evaluate at a run's symbol values before any kernel runs.
    pub dims: Vec<DimExpr>,
    /// Graph inputs, in declaration order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in declaration order.
    pub outputs: Vec<TensorSpec>,
    /// The buffer table, one slot per node in execution order, then the scratch space.
    pub slots: Vec<Slot>,
    /// The weights, at their offsets in the weight blob.
    pub weights: Vec<WeightSpec>,
    /// Buffers whose need grows with the symbols, checked against what the plan reserved.
    pub buffers: Vec<BufferCheck>,
    /// The kernels, in execution order.
    pub kernels: Vec<KernelSpec>,
    /// Bytes of the arena (intermediate buffers and scratch space).
    pub arena_bytes: usize,
    /// Bytes of the weight blob.
    pub weight_bytes: usize,
    /// A hash of the weight blob, which an external weight file must carry.
    pub weights_id: u64,
}

/// Status a kernel returns: an integer division or remainder by zero.
pub const STATUS_DIVISION_BY_ZERO: i32 = 1;
/// Status: a gather index outside its axis.
pub const STATUS_INDEX_OUT_OF_RANGE: i32 = 2;
/// Status: arg_max or arg_min over an axis of size 0.
pub const STATUS_EMPTY_AXIS: i32 = 3;
/// Status: rope over an odd head dim.
pub const STATUS_ODD_HEAD_DIM: i32 = 4;
/// Status: attention query heads that do not split evenly over the key/value heads.
pub const STATUS_ATTENTION_HEADS: i32 = 5;

/// The message of a kernel's non-zero status.
pub fn status_message(status: i32) -> String {
    match status {
        STATUS_DIVISION_BY_ZERO => "integer division by zero".into(),
        STATUS_INDEX_OUT_OF_RANGE => "gather index out of range".into(),
        STATUS_EMPTY_AXIS => "arg_max/arg_min over an empty axis".into(),
        STATUS_ODD_HEAD_DIM => "rope head_dim must be even".into(),
        STATUS_ATTENTION_HEADS => {
            "attention query heads are not a multiple of the key/value heads".into()
        }
        other => format!("kernel failed with status {other}"),
    }
}

/// FNV-1a over a byte string: the identity of a weight blob.
pub fn weights_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
