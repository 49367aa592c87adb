//! The closed set of ops. Each op has one home module holding its shape rule, its text
//! attributes and its interpreter semantics; this module only dispatches to them.

mod attention;
mod elementwise;
mod layout;
mod matmul;
mod norm;
mod reduce;
mod rope;
mod source;

pub use attention::{Attention, MaskSpec};
pub use elementwise::{BinaryOp, UnaryOp};
pub use matmul::Gemm;
pub use reduce::{ArgOp, ReduceOp};

use crate::dim::{Dim, Shape};
use crate::dtype::{DType, Scalar, F32};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// The dtype and shape of a node's output.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Dims, possibly symbolic.
    pub shape: Shape,
}

impl TensorType {
    /// A type from a dtype and dims.
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> TensorType {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    /// Same dtype, and dims equal for every value of the symbols.
    pub fn equiv(&self, other: &TensorType) -> bool {
        self.dtype == other.dtype
            && self.rank() == other.rank()
            && self
                .shape
                .0
                .iter()
                .zip(&other.shape.0)
                .all(|(a, b)| a.equiv(b))
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// One operation. Plain data: every attribute is part of equality and hashing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A graph input; its type is the node's declared type.
    Input,
    /// A weight from the graph's [`crate::WeightStore`], by name.
    Constant {
        /// Name of the weight in the store.
        weight: String,
    },
    /// A tensor of `shape` filled with `value` (ONNX ConstantOfShape with symbolic dims).
    Fill {
        /// The element value.
        value: Scalar,
        /// Element type.
        dtype: DType,
        /// Output dims.
        shape: Shape,
    },
    /// `[start, start + step, ...]`, `len` elements.
    Range {
        /// First value.
        start: Dim,
        /// Increment.
        step: i64,
        /// Number of elements.
        len: Dim,
        /// Element type.
        dtype: DType,
    },
    /// An elementwise function of one tensor.
    Unary(UnaryOp),
    /// An elementwise function of two tensors with numpy broadcasting.
    Binary(BinaryOp),
    /// `cond ? x : y`, elementwise with broadcasting.
    Where,
    /// Elementwise conversion to another dtype.
    Cast {
        /// Target dtype.
        to: DType,
    },
    /// Batched matrix product with numpy semantics (broadcast batch dims; 1-D operands promoted).
    MatMul,
    /// Matrix product against a 2-D weight with a fused epilogue.
    Gemm(Gemm),
    /// The gated feed-forward product of LLaMA-style models, `silu(x @ w_gate) * (x @ w_up)`,
    /// both weights 2-D.
    SwiGlu,
    /// Reduction over axes.
    Reduce {
        /// The reduction.
        op: ReduceOp,
        /// Axes to reduce (negative counts from the end).
        axes: Vec<i64>,
        /// Keep reduced axes as size 1.
        keep_dims: bool,
    },
    /// The index of the largest (or smallest) element along one axis, as i64.
    Arg {
        /// Largest or smallest.
        op: ArgOp,
        /// The axis (negative counts from the end).
        axis: i64,
        /// Keep the axis as size 1.
        keep_dims: bool,
        /// On ties, the last index instead of the first.
        select_last: bool,
    },
    /// Softmax along one axis.
    Softmax {
        /// The axis (negative counts from the end).
        axis: i64,
    },
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// Same elements, new dims (with equal element count).
    Reshape {
        /// Output dims.
        shape: Shape,
    },
    /// Numpy broadcast of the input against `shape` (ONNX Expand).
    Expand {
        /// Target dims.
        shape: Shape,
    },
    /// Concatenation of all operands along an axis.
    Concat {
        /// The axis (negative counts from the end).
        axis: i64,
    },
    /// Elements `start, start+step, ...` before `end` along one axis, with ONNX semantics:
    /// negative constant bounds count from the end, constant bounds are clamped.
    Slice {
        /// The axis (negative counts from the end).
        axis: i64,
        /// First index.
        start: Dim,
        /// One past the last index (for positive steps).
        end: Dim,
        /// Stride, non-zero.
        step: i64,
    },
    /// ONNX GatherND: index the leading axes of `data` (after `batch_dims` shared batch axes)
    /// with the tuples in the last axis of an integer tensor.
    GatherNd {
        /// Leading axes shared by `data` and the indices.
        batch_dims: usize,
    },
    /// ONNX Gather: index `data` along `axis` with an integer tensor.
    Gather {
        /// The axis (negative counts from the end).
        axis: i64,
    },
    /// Layer normalization over axes `axis..` with scale and optional bias operands.
    LayerNorm {
        /// First normalized axis (negative counts from the end).
        axis: i64,
        /// Added to the variance.
        eps: F32,
    },
    /// RMS normalization over the last axis with a scale operand.
    RmsNorm {
        /// Added to the mean square.
        eps: F32,
    },
    /// Fused scaled dot-product attention.
    Attention(Attention),
    /// Rotary position embedding of `[batch, heads, seq, head_dim]` by `cos` and `sin` tables.
    Rope {
        /// Rotate pairs `(2i, 2i+1)` (GPT-J, llama.cpp) instead of `(i, i + d/2)` (HF).
        interleaved: bool,
    },
}

/// An attribute value in the text format.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// An integer, an identifier or a dim expression.
    Dim(Dim),
    /// A float literal, kept as written so each op parses it at its own precision.
    Float(String),
    /// `true` or `false`.
    Bool(bool),
    /// A quoted string.
    Str(String),
    /// `[a, b, ...]`.
    List(Vec<AttrValue>),
    /// `name(key = value, ...)`: a structured value such as a mask.
    Call(String, Vec<(String, AttrValue)>),
}

impl AttrValue {
    /// An identifier such as `f32` or `causal`.
    pub fn ident(name: &str) -> AttrValue {
        AttrValue::Dim(Dim::sym(name))
    }

    /// An integer.
    pub fn int(value: i64) -> AttrValue {
        AttrValue::Dim(Dim::Const(value))
    }

    /// A list of integers.
    pub fn ints(values: impl IntoIterator<Item = i64>) -> AttrValue {
        AttrValue::List(values.into_iter().map(AttrValue::int).collect())
    }

    /// A list of dims.
    pub fn dims(shape: &Shape) -> AttrValue {
        AttrValue::List(shape.0.iter().cloned().map(AttrValue::Dim).collect())
    }

    /// An f32, written shortest-round-trip.
    pub fn f32(value: F32) -> AttrValue {
        AttrValue::Float(value.to_string())
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Dim(d) => write!(f, "{d}"),
            AttrValue::Float(text) => f.write_str(text),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            AttrValue::Call(name, args) => {
                write!(f, "{name}(")?;
                write_attr_list(f, args.iter().map(|(k, v)| (k.as_str(), v)))?;
                f.write_str(")")
            }
        }
    }
}

/// Writes `key = value, ...`.
pub(crate) fn write_attr_list<'a>(
    f: &mut impl fmt::Write,
    attrs: impl Iterator<Item = (&'a str, &'a AttrValue)>,
) -> fmt::Result {
    for (i, (key, value)) in attrs.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{key} = {value}")?;
    }
    Ok(())
}

/// Named attributes being read by an op's text parser; every read removes the key, and
/// [`Attrs::finish`] rejects whatever is left.
#[derive(Debug, Default)]
pub struct Attrs {
    items: Vec<(String, AttrValue)>,
}

impl Attrs {
    /// Attributes in the order written.
    pub fn new(items: Vec<(String, AttrValue)>) -> Attrs {
        Attrs { items }
    }

    fn take(&mut self, key: &str) -> Result<AttrValue, String> {
        let at = self
            .items
            .iter()
            .position(|(k, _)| k == key)
            .ok_or_else(|| format!("missing attribute `{key}`"))?;
        Ok(self.items.remove(at).1)
    }

    /// Fails on attributes nobody read.
    pub fn finish(self) -> Result<(), String> {
        match self.items.first() {
            None => Ok(()),
            Some((key, _)) => Err(format!("unknown attribute `{key}`")),
        }
    }

    pub(crate) fn int(&mut self, key: &str) -> Result<i64, String> {
        as_int(key, self.take(key)?)
    }

    pub(crate) fn positive_u32(&mut self, key: &str) -> Result<u32, String> {
        let v = self.int(key)?;
        u32::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("attribute `{key}` must be a positive integer, got {v}"))
    }

    pub(crate) fn dim(&mut self, key: &str) -> Result<Dim, String> {
        match self.take(key)? {
            AttrValue::Dim(d) => Ok(d),
            other => Err(format!("attribute `{key}` must be a dim, got `{other}`")),
        }
    }

    pub(crate) fn bool(&mut self, key: &str) -> Result<bool, String> {
        match self.take(key)? {
            AttrValue::Bool(b) => Ok(b),
            other => Err(format!(
                "attribute `{key}` must be true or false, got `{other}`"
            )),
        }
    }

    pub(crate) fn f32(&mut self, key: &str) -> Result<F32, String> {
        match self.take(key)? {
            AttrValue::Float(text) => text
                .parse::<f32>()
                .map(F32)
                .map_err(|_| format!("attribute `{key}`: `{text}` is not an f32")),
            AttrValue::Dim(Dim::Const(v)) => Ok(F32(v as f32)),
            other => Err(format!("attribute `{key}` must be a float, got `{other}`")),
        }
    }

    pub(crate) fn ident(&mut self, key: &str) -> Result<String, String> {
        as_ident(key, self.take(key)?)
    }

    pub(crate) fn dtype(&mut self, key: &str) -> Result<DType, String> {
        let name = self.ident(key)?;
        DType::from_name(&name).ok_or_else(|| format!("attribute `{key}`: unknown dtype `{name}`"))
    }

    pub(crate) fn ints(&mut self, key: &str) -> Result<Vec<i64>, String> {
        self.list(key)?
            .into_iter()
            .map(|v| as_int(key, v))
            .collect()
    }

    pub(crate) fn shape(&mut self, key: &str) -> Result<Shape, String> {
        self.list(key)?
            .into_iter()
            .map(|v| match v {
                AttrValue::Dim(d) => Ok(d),
                other => Err(format!("attribute `{key}`: `{other}` is not a dim")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Shape)
    }

    pub(crate) fn list(&mut self, key: &str) -> Result<Vec<AttrValue>, String> {
        match self.take(key)? {
            AttrValue::List(items) => Ok(items),
            other => Err(format!("attribute `{key}` must be a list, got `{other}`")),
        }
    }

    pub(crate) fn call(&mut self, key: &str) -> Result<(String, Attrs), String> {
        match self.take(key)? {
            AttrValue::Call(name, args) => Ok((name, Attrs::new(args))),
            AttrValue::Dim(Dim::Sym(name)) => Ok((name, Attrs::default())),
            other => Err(format!("attribute `{key}` must be a name, got `{other}`")),
        }
    }

    pub(crate) fn scalar(&mut self, key: &str) -> Result<Scalar, String> {
        match self.take(key)? {
            AttrValue::Float(text) => text
                .parse::<f64>()
                .map(Scalar::float)
                .map_err(|_| format!("attribute `{key}`: `{text}` is not a number")),
            AttrValue::Dim(Dim::Const(v)) => Ok(Scalar::Int(v)),
            AttrValue::Bool(b) => Ok(Scalar::Bool(b)),
            other => Err(format!("attribute `{key}` must be a number, got `{other}`")),
        }
    }
}

fn as_int(key: &str, value: AttrValue) -> Result<i64, String> {
    match value {
        AttrValue::Dim(Dim::Const(v)) => Ok(v),
        other => Err(format!(
            "attribute `{key}` must be an integer, got `{other}`"
        )),
    }
}

fn as_ident(key: &str, value: AttrValue) -> Result<String, String> {
    match value {
        AttrValue::Dim(Dim::Sym(name)) => Ok(name),
        other => Err(format!("attribute `{key}` must be a name, got `{other}`")),
    }
}

/// What shape inference may consult besides operand types: the maxima of the graph's symbols,
/// to prove bounds such as `seq <= 512`.
#[derive(Clone, Copy, Debug)]
pub struct InferCtx<'a> {
    /// Maximum of each symbol.
    pub maxima: &'a HashMap<String, i64>,
}

/// What evaluation may consult besides operand values.
#[derive(Clone, Copy, Debug)]
pub struct EvalCtx<'a> {
    /// The run-time value of each symbol.
    pub bindings: &'a HashMap<String, i64>,
    /// The node's output dims under `bindings`.
    pub out_shape: &'a [usize],
}

impl Op {
    /// The op's name in the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Constant { .. } => "const",
            Op::Fill { .. } => "fill",
            Op::Range { .. } => "range",
            Op::Unary(op) => op.name(),
            Op::Binary(op) => op.name(),
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::MatMul => "matmul",
            Op::Gemm(_) => "gemm",
            Op::SwiGlu => "swiglu",
            Op::Reduce { op, .. } => op.name(),
            Op::Softmax { .. } => "softmax",
            Op::Arg { op, .. } => op.name(),
            Op::Transpose { .. } => "transpose",
            Op::Reshape { .. } => "reshape",
            Op::Expand { .. } => "expand",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::Gather { .. } => "gather",
            Op::GatherNd { .. } => "gather_nd",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Attention(_) => "attention",
            Op::Rope { .. } => "rope",
        }
    }

    /// True for the fused ops that passes produce (as opposed to the primitives frontends emit).
    pub fn is_fused(&self) -> bool {
        match self {
            Op::Gemm(_)
            | Op::SwiGlu
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention(_)
            | Op::Rope { .. } => true,
            Op::Input
            | Op::Constant { .. }
            | Op::Fill { .. }
            | Op::Range { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Where
            | Op::Cast { .. }
            | Op::MatMul
            | Op::Reduce { .. }
            | Op::Softmax { .. }
            | Op::Arg { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::Expand { .. }
            | Op::Concat { .. }
            | Op::Slice { .. }
            | Op::Gather { .. }
            | Op::GatherNd { .. } => false,
        }
    }

    /// Calls `f` on every dim the op's attributes hold.
    pub fn for_each_dim(&self, mut f: impl FnMut(&Dim)) {
        match self {
            Op::Fill { shape, .. } | Op::Reshape { shape } | Op::Expand { shape } => {
                shape.0.iter().for_each(f)
            }
            Op::Range { start, len, .. } => {
                f(start);
                f(len);
            }
            Op::Slice { start, end, .. } => {
                f(start);
                f(end);
            }
            Op::Input
            | Op::Constant { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Where
            | Op::Cast { .. }
            | Op::MatMul
            | Op::Gemm(_)
            | Op::SwiGlu
            | Op::Reduce { .. }
            | Op::Softmax { .. }
            | Op::Arg { .. }
            | Op::Transpose { .. }
            | Op::Concat { .. }
            | Op::Gather { .. }
            | Op::GatherNd { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention(_)
            | Op::Rope { .. } => {}
        }
    }

    /// The attributes as the text format writes them, in a fixed order.
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        match self {
            Op::Input | Op::Constant { .. } => vec![],
            Op::Fill {
                value,
                dtype,
                shape,
            } => source::fill_attrs(*value, *dtype, shape),
            Op::Range {
                start,
                step,
                len,
                dtype,
            } => source::range_attrs(start, *step, len, *dtype),
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::MatMul | Op::SwiGlu => vec![],
            Op::Cast { to } => vec![("to", AttrValue::ident(to.name()))],
            Op::Gemm(gemm) => gemm.attrs(),
            Op::Reduce {
                axes, keep_dims, ..
            } => reduce::reduce_attrs(axes, *keep_dims),
            Op::GatherNd { batch_dims } => vec![("batch_dims", AttrValue::int(*batch_dims as i64))],
            Op::Arg {
                axis,
                keep_dims,
                select_last,
                ..
            } => reduce::arg_attrs(*axis, *keep_dims, *select_last),
            Op::Softmax { axis } | Op::Concat { axis } | Op::Gather { axis } => {
                vec![("axis", AttrValue::int(*axis))]
            }
            Op::Transpose { perm } => {
                vec![("perm", AttrValue::ints(perm.iter().map(|&p| p as i64)))]
            }
            Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", AttrValue::dims(shape))],
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => layout::slice_attrs(*axis, start, end, *step),
            Op::LayerNorm { axis, eps } => norm::layer_norm_attrs(*axis, *eps),
            Op::RmsNorm { eps } => vec![("eps", AttrValue::f32(*eps))],
            Op::Attention(attention) => attention.attrs(),
            Op::Rope { interleaved } => rope::rope_attrs(*interleaved),
        }
    }

    /// Builds an op from its text name and attributes (`input` and `const` have their own
    /// syntax and are not built here).
    pub fn from_text(name: &str, mut attrs: Attrs) -> Result<Op, String> {
        let op = if let Some(op) = UnaryOp::from_name(name) {
            Op::Unary(op)
        } else if let Some(op) = BinaryOp::from_name(name) {
            Op::Binary(op)
        } else if let Some(op) = ArgOp::from_name(name) {
            reduce::parse_arg(op, &mut attrs)?
        } else if let Some(op) = ReduceOp::from_name(name) {
            let (axes, keep_dims) = reduce::parse_reduce_attrs(&mut attrs)?;
            Op::Reduce {
                op,
                axes,
                keep_dims,
            }
        } else {
            match name {
                "fill" => source::parse_fill(&mut attrs)?,
                "range" => source::parse_range(&mut attrs)?,
                "where" => Op::Where,
                "cast" => Op::Cast {
                    to: attrs.dtype("to")?,
                },
                "matmul" => Op::MatMul,
                "swiglu" => Op::SwiGlu,
                "gemm" => Op::Gemm(Gemm::parse(&mut attrs)?),
                "softmax" => Op::Softmax {
                    axis: attrs.int("axis")?,
                },
                "transpose" => Op::Transpose {
                    perm: attrs
                        .ints("perm")?
                        .into_iter()
                        .map(|p| usize::try_from(p).map_err(|_| format!("negative perm entry {p}")))
                        .collect::<Result<_, _>>()?,
                },
                "reshape" => Op::Reshape {
                    shape: attrs.shape("shape")?,
                },
                "expand" => Op::Expand {
                    shape: attrs.shape("shape")?,
                },
                "concat" => Op::Concat {
                    axis: attrs.int("axis")?,
                },
                "slice" => layout::parse_slice(&mut attrs)?,
                "gather_nd" => Op::GatherNd {
                    batch_dims: usize::try_from(attrs.int("batch_dims")?)
                        .map_err(|_| "`batch_dims` must not be negative".to_string())?,
                },
                "gather" => Op::Gather {
                    axis: attrs.int("axis")?,
                },
                "layer_norm" => norm::parse_layer_norm(&mut attrs)?,
                "rms_norm" => Op::RmsNorm {
                    eps: attrs.f32("eps")?,
                },
                "attention" => Op::Attention(Attention::parse(&mut attrs)?),
                "rope" => rope::parse_rope(&mut attrs)?,
                _ => return Err(format!("unknown op `{name}`")),
            }
        };
        attrs.finish()?;
        Ok(op)
    }

    /// The output type for the given operand types, or why they are invalid.
    pub fn infer(&self, operands: &[&TensorType], ctx: InferCtx) -> Result<TensorType, String> {
        match self {
            Op::Input | Op::Constant { .. } => {
                expect_arity(operands, 0, 0)?;
                Err("source ops take their type from the graph, not from operands".into())
            }
            Op::Fill {
                value,
                dtype,
                shape,
            } => source::infer_fill(operands, *value, *dtype, shape),
            Op::Range {
                start,
                step,
                len,
                dtype,
            } => source::infer_range(operands, start, *step, len, *dtype),
            Op::Unary(op) => op.infer(operands),
            Op::Binary(op) => op.infer(operands),
            Op::Where => elementwise::infer_where(operands),
            Op::Cast { to } => elementwise::infer_cast(operands, *to),
            Op::MatMul => matmul::infer_matmul(operands),
            Op::Gemm(gemm) => gemm.infer(operands),
            Op::SwiGlu => matmul::infer_swiglu(operands),
            Op::Reduce {
                op,
                axes,
                keep_dims,
            } => reduce::infer_reduce(operands, *op, axes, *keep_dims),
            Op::Softmax { axis } => reduce::infer_softmax(operands, *axis),
            Op::Arg {
                axis, keep_dims, ..
            } => reduce::infer_arg(operands, *axis, *keep_dims),
            Op::Transpose { perm } => layout::infer_transpose(operands, perm),
            Op::Reshape { shape } => layout::infer_reshape(operands, shape),
            Op::Expand { shape } => layout::infer_expand(operands, shape),
            Op::Concat { axis } => layout::infer_concat(operands, *axis),
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => layout::infer_slice(operands, *axis, start, end, *step, ctx),
            Op::Gather { axis } => layout::infer_gather(operands, *axis),
            Op::GatherNd { batch_dims } => layout::infer_gather_nd(operands, *batch_dims),
            Op::LayerNorm { axis, .. } => norm::infer_layer_norm(operands, *axis),
            Op::RmsNorm { .. } => norm::infer_rms_norm(operands),
            Op::Attention(attention) => attention.infer(operands),
            Op::Rope { .. } => rope::infer_rope(operands),
        }
    }

    /// Evaluates the op on concrete operands: the reference semantics.
    pub fn eval(&self, operands: &[&Tensor], ctx: EvalCtx) -> Result<Tensor, String> {
        match self {
            Op::Input | Op::Constant { .. } => {
                Err("source ops take their value from the graph, not from operands".into())
            }
            Op::Fill { value, dtype, .. } => Ok(source::eval_fill(*value, *dtype, ctx)),
            Op::Range {
                start, step, dtype, ..
            } => source::eval_range(start, *step, *dtype, ctx),
            Op::Unary(op) => op.eval(operands[0]),
            Op::Binary(op) => op.eval(operands[0], operands[1], ctx),
            Op::Where => elementwise::eval_where(operands, ctx),
            Op::Cast { to } => Ok(elementwise::eval_cast(operands[0], *to)),
            Op::MatMul => matmul::eval_matmul(operands[0], operands[1], ctx),
            Op::Gemm(gemm) => gemm.eval(operands, ctx),
            Op::SwiGlu => matmul::eval_swiglu(operands, ctx),
            Op::Reduce { op, axes, .. } => reduce::eval_reduce(operands[0], *op, axes, ctx),
            Op::Softmax { axis } => reduce::eval_softmax(operands[0], *axis),
            Op::Arg {
                op,
                axis,
                select_last,
                ..
            } => reduce::eval_arg(operands[0], *op, *axis, *select_last, ctx),
            Op::Transpose { perm } => Ok(layout::eval_transpose(operands[0], perm, ctx)),
            Op::Reshape { .. } => operands[0]
                .reshaped(ctx.out_shape.to_vec())
                .map_err(|e| e.to_string()),
            Op::Expand { .. } => Ok(elementwise::broadcast_to(operands[0], ctx.out_shape)),
            Op::Concat { axis } => layout::eval_concat(operands, *axis, ctx),
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => layout::eval_slice(operands[0], *axis, start, end, *step, ctx),
            Op::Gather { axis } => layout::eval_gather(operands[0], operands[1], *axis, ctx),
            Op::GatherNd { batch_dims } => {
                layout::eval_gather_nd(operands[0], operands[1], *batch_dims, ctx)
            }
            Op::LayerNorm { axis, eps } => norm::eval_layer_norm(operands, *axis, *eps, ctx),
            Op::RmsNorm { eps } => norm::eval_rms_norm(operands, *eps, ctx),
            Op::Attention(attention) => attention.eval(operands, ctx),
            Op::Rope { interleaved } => rope::eval_rope(operands, *interleaved, ctx),
        }
    }

    /// Evaluates the op on concrete operands alone, inferring the output dims from theirs:
    /// constant folding. Fails for sources (`input`, `const`), for symbolic output dims, and when
    /// the output would have more than `max_elements` elements (checked before evaluating).
    pub fn evaluate_fixed(
        &self,
        operands: &[&Tensor],
        max_elements: usize,
    ) -> Result<Tensor, String> {
        let types: Vec<TensorType> = operands
            .iter()
            .map(|t| TensorType::new(t.dtype(), Shape::fixed(t.shape())))
            .collect();
        let none = HashMap::new();
        let out = self.infer(
            &types.iter().collect::<Vec<_>>(),
            InferCtx { maxima: &none },
        )?;
        let out_shape = out.shape.eval(&none).map_err(|e| e.to_string())?;
        match out_shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        {
            Some(n) if n <= max_elements => {}
            _ => {
                return Err(format!(
                    "output {out} has more than {max_elements} elements"
                ))
            }
        }
        self.eval(
            operands,
            EvalCtx {
                bindings: &none,
                out_shape: &out_shape,
            },
        )
    }

    /// Floating-point operations to evaluate the op on operands and output of these dims
    /// (multiply-add counts as two; transcendental functions as one).
    pub fn flops(&self, operands: &[&[usize]], out: &[usize]) -> u64 {
        let numel = |dims: &[usize]| saturating_product(dims.iter().map(|&d| d as u64));
        let out_numel = numel(out);
        match self {
            Op::Input
            | Op::Constant { .. }
            | Op::Fill { .. }
            | Op::Range { .. }
            | Op::Cast { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::Expand { .. }
            | Op::Concat { .. }
            | Op::Slice { .. }
            | Op::Gather { .. }
            | Op::GatherNd { .. } => 0,
            Op::Unary(_) | Op::Binary(_) | Op::Where => out_numel,
            Op::MatMul => {
                let k = operands[0].last().copied().unwrap_or(1) as u64;
                out_numel.saturating_mul(k).saturating_mul(2)
            }
            Op::Gemm(gemm) => gemm.flops(operands, out),
            Op::SwiGlu => matmul::swiglu_flops(operands, out),
            Op::Reduce { .. } => numel(operands[0]),
            Op::Softmax { .. } => out_numel.saturating_mul(4),
            Op::Arg { .. } => numel(operands[0]),
            Op::LayerNorm { .. } => out_numel.saturating_mul(8),
            Op::RmsNorm { .. } => out_numel.saturating_mul(4),
            Op::Attention(attention) => attention.flops(operands),
            Op::Rope { .. } => out_numel.saturating_mul(3),
        }
    }
}

/// The product of `values`, saturating at `u64::MAX` (FLOP counts of absurd dims).
pub(crate) fn saturating_product(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(1u64, u64::saturating_mul)
}

/// Checks the operand count is within `min..=max`.
pub(crate) fn expect_arity<T>(operands: &[T], min: usize, max: usize) -> Result<(), String> {
    let n = operands.len();
    if n < min || n > max {
        let expected = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(format!("expects {expected} operands, got {n}"));
    }
    Ok(())
}

/// Resolves a possibly negative axis against `rank`.
pub(crate) fn normalize_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let rank_i = rank as i64;
    let resolved = if axis < 0 { axis + rank_i } else { axis };
    if (0..rank_i).contains(&resolved) {
        Ok(resolved as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// The numpy broadcast of two symbolic shapes.
pub(crate) fn broadcast_shapes(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let rank = a.rank().max(b.rank());
    let one = Dim::Const(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.rank()).checked_sub(rank).map_or(&one, |j| &a.0[j]);
        let db = (i + b.rank()).checked_sub(rank).map_or(&one, |j| &b.0[j]);
        let dim = if da.equiv(db) || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err(format!(
                "shapes {a} and {b} do not broadcast (axis {i}: {da} vs {db})"
            ));
        };
        out.push(dim);
    }
    Ok(Shape(out))
}

/// True when `shape` broadcasts to exactly `target` (numpy rules, without growing `target`).
pub(crate) fn broadcasts_to(shape: &Shape, target: &Shape) -> bool {
    broadcast_shapes(target, shape).is_ok_and(|out| {
        out.rank() == target.rank() && out.0.iter().zip(&target.0).all(|(a, b)| a.equiv(b))
    })
}

/// Requires a float dtype.
pub(crate) fn expect_float(what: &str, ty: &TensorType) -> Result<(), String> {
    if ty.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{what} must be a float tensor, got {ty}"))
    }
}

/// Requires equal dtypes.
pub(crate) fn expect_same_dtype(a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.dtype == b.dtype {
        Ok(())
    } else {
        Err(format!("operand dtypes differ: {a} vs {b}"))
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn ty(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType::new(
            dtype,
            Shape(
                dims.iter()
                    .map(|d| d.parse::<i64>().map_or_else(|_| Dim::sym(*d), Dim::Const))
                    .collect(),
            ),
        )
    }

    pub fn infer(op: &Op, operands: &[TensorType]) -> Result<TensorType, String> {
        let maxima = HashMap::from([("seq".to_string(), 512), ("batch".to_string(), 8)]);
        op.infer(
            &operands.iter().collect::<Vec<_>>(),
            InferCtx { maxima: &maxima },
        )
    }

    /// Evaluates `op` with the output dims from its shape rule, the way the interpreter does.
    pub fn eval(op: &Op, operands: &[Tensor]) -> Result<Tensor, String> {
        eval_with(op, operands, &HashMap::new())
    }

    pub fn eval_with(
        op: &Op,
        operands: &[Tensor],
        bindings: &HashMap<String, i64>,
    ) -> Result<Tensor, String> {
        let types: Vec<TensorType> = operands
            .iter()
            .map(|t| TensorType::new(t.dtype(), Shape::fixed(t.shape())))
            .collect();
        let maxima: HashMap<String, i64> = bindings.clone();
        let out = op.infer(
            &types.iter().collect::<Vec<_>>(),
            InferCtx { maxima: &maxima },
        )?;
        let out_shape = out.shape.eval(bindings).map_err(|e| e.to_string())?;
        let result = op.eval(
            &operands.iter().collect::<Vec<_>>(),
            EvalCtx {
                bindings,
                out_shape: &out_shape,
            },
        )?;
        assert_eq!(
            result.shape(),
            out_shape.as_slice(),
            "{} result dims",
            op.name()
        );
        assert_eq!(result.dtype(), out.dtype, "{} result dtype", op.name());
        Ok(result)
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        match t.data() {
            crate::tensor::Data::F32(v) => v.clone(),
            other => panic!("expected f32 data, got {:?}", other.dtype()),
        }
    }

    pub fn assert_close(actual: &[f32], expected: &[f32], tol: f32) {
        assert_eq!(
            actual.len(),
            expected.len(),
            "lengths of {actual:?} vs {expected:?}"
        );
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tol || (a.is_nan() && e.is_nan()),
                "element {i}: {a} vs expected {e} (tolerance {tol}); all: {actual:?}"
            );
        }
    }
}
