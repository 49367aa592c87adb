//! Elementwise ops: unary functions, binary arithmetic/comparison/logic with numpy
//! broadcasting, `where` and `cast`.

use super::{broadcast_shapes, expect_arity, expect_same_dtype, EvalCtx, TensorType};
use crate::dtype::DType;
use crate::tensor::{strides, Tensor};
use serde::{Deserialize, Serialize};

/// Elementwise functions of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    /// `-x` (floats and integers).
    Neg,
    /// `|x|` (floats and integers).
    Abs,
    /// `max(x, 0)` (floats and integers).
    Relu,
    /// `e^x`.
    Exp,
    /// Natural logarithm.
    Log,
    /// Square root.
    Sqrt,
    /// `1 / x`.
    Reciprocal,
    /// The error function.
    Erf,
    /// Hyperbolic tangent.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `x * sigmoid(x)`.
    Silu,
    /// `x/2 * (1 + erf(x/sqrt(2)))`.
    Gelu,
    /// `x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
    GeluTanh,
    /// Sine.
    Sin,
    /// Cosine.
    Cos,
    /// Largest integer not above `x`.
    Floor,
    /// Smallest integer not below `x`.
    Ceil,
    /// Nearest integer, halves to even (ONNX `Round`).
    Round,
    /// -1, 0 or 1 (floats and integers; NaN stays NaN).
    Sign,
    /// Logical not (bool only).
    Not,
}

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 20] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Relu,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Reciprocal,
        UnaryOp::Erf,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Floor,
        UnaryOp::Ceil,
        UnaryOp::Round,
        UnaryOp::Sign,
        UnaryOp::Not,
    ];

    /// The text name.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Relu => "relu",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Reciprocal => "reciprocal",
            UnaryOp::Erf => "erf",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Floor => "floor",
            UnaryOp::Ceil => "ceil",
            UnaryOp::Round => "round",
            UnaryOp::Sign => "sign",
            UnaryOp::Not => "not",
        }
    }

    /// Parses a text name.
    pub fn from_name(name: &str) -> Option<UnaryOp> {
        UnaryOp::ALL.into_iter().find(|op| op.name() == name)
    }

    fn accepts(self, dtype: DType) -> bool {
        match self {
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Sign => dtype != DType::Bool,
            UnaryOp::Not => dtype == DType::Bool,
            UnaryOp::Exp
            | UnaryOp::Log
            | UnaryOp::Sqrt
            | UnaryOp::Reciprocal
            | UnaryOp::Erf
            | UnaryOp::Tanh
            | UnaryOp::Sigmoid
            | UnaryOp::Silu
            | UnaryOp::Gelu
            | UnaryOp::GeluTanh
            | UnaryOp::Sin
            | UnaryOp::Cos
            | UnaryOp::Floor
            | UnaryOp::Ceil
            | UnaryOp::Round => dtype.is_float(),
        }
    }

    /// True for ops usable as a float activation (every op but `not`).
    pub fn is_float_fn(self) -> bool {
        self.accepts(DType::F32)
    }

    pub(super) fn infer(self, operands: &[&TensorType]) -> Result<TensorType, String> {
        expect_arity(operands, 1, 1)?;
        if !self.accepts(operands[0].dtype) {
            return Err(format!("{} does not accept {}", self.name(), operands[0]));
        }
        Ok(operands[0].clone())
    }

    /// The function on one f64 value.
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Reciprocal => 1.0 / x,
            UnaryOp::Erf => libm::erf(x),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::GeluTanh => {
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + inner.tanh())
            }
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Floor => x.floor(),
            UnaryOp::Ceil => x.ceil(),
            UnaryOp::Round => x.round_ties_even(),
            UnaryOp::Sign if x.is_nan() => x,
            UnaryOp::Sign => f64::from(i8::from(x > 0.0) - i8::from(x < 0.0)),
            UnaryOp::Not => f64::from(u8::from(x == 0.0)),
        }
    }

    pub(super) fn eval(self, x: &Tensor) -> Result<Tensor, String> {
        let shape = x.shape().to_vec();
        Ok(match self {
            UnaryOp::Not => Tensor::from_bools(shape, x.to_bools().iter().map(|b| !b).collect()),
            _ if x.dtype().is_int() => {
                let apply = |v: i64| match self {
                    UnaryOp::Neg => v.wrapping_neg(),
                    UnaryOp::Abs => v.wrapping_abs(),
                    UnaryOp::Sign => v.signum(),
                    UnaryOp::Relu
                    | UnaryOp::Exp
                    | UnaryOp::Log
                    | UnaryOp::Sqrt
                    | UnaryOp::Reciprocal
                    | UnaryOp::Erf
                    | UnaryOp::Tanh
                    | UnaryOp::Sigmoid
                    | UnaryOp::Silu
                    | UnaryOp::Gelu
                    | UnaryOp::GeluTanh
                    | UnaryOp::Sin
                    | UnaryOp::Cos
                    | UnaryOp::Floor
                    | UnaryOp::Ceil
                    | UnaryOp::Round
                    | UnaryOp::Not => v.max(0),
                };
                Tensor::from_i64s(
                    x.dtype(),
                    shape,
                    x.to_i64s().into_iter().map(apply).collect(),
                )
            }
            _ => Tensor::from_f64s(
                x.dtype(),
                shape,
                x.to_f64s().into_iter().map(|v| self.apply_f64(v)).collect(),
            ),
        })
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Elementwise functions of two tensors, with numpy broadcasting. Operands share a dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b` (integers truncate toward zero; division by zero is an error).
    Div,
    /// `a ^ b`.
    Pow,
    /// Remainder with the sign of the divisor (Python's `%`; integer division by zero is an
    /// error).
    Mod,
    /// Remainder with the sign of the dividend (C's `fmod`).
    Rem,
    /// The larger operand (NaN if either is NaN).
    Max,
    /// The smaller operand (NaN if either is NaN).
    Min,
    /// `a == b`, giving bool.
    Equal,
    /// `a < b`, giving bool.
    Less,
    /// `a <= b`, giving bool.
    LessEqual,
    /// `a > b`, giving bool.
    Greater,
    /// `a >= b`, giving bool.
    GreaterEqual,
    /// Logical and of bools.
    And,
    /// Logical or of bools.
    Or,
    /// Logical exclusive or of bools.
    Xor,
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 17] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Mod,
        BinaryOp::Rem,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Equal,
        BinaryOp::Less,
        BinaryOp::LessEqual,
        BinaryOp::Greater,
        BinaryOp::GreaterEqual,
        BinaryOp::And,
        BinaryOp::Or,
        BinaryOp::Xor,
    ];

    /// The text name.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Mod => "mod",
            BinaryOp::Rem => "rem",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Equal => "equal",
            BinaryOp::Less => "less",
            BinaryOp::LessEqual => "less_equal",
            BinaryOp::Greater => "greater",
            BinaryOp::GreaterEqual => "greater_equal",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
            BinaryOp::Xor => "xor",
        }
    }

    /// Parses a text name.
    pub fn from_name(name: &str) -> Option<BinaryOp> {
        BinaryOp::ALL.into_iter().find(|op| op.name() == name)
    }

    fn kind(self) -> BinaryKind {
        match self {
            BinaryOp::Add
            | BinaryOp::Sub
            | BinaryOp::Mul
            | BinaryOp::Div
            | BinaryOp::Pow
            | BinaryOp::Mod
            | BinaryOp::Rem
            | BinaryOp::Max
            | BinaryOp::Min => BinaryKind::Arithmetic,
            BinaryOp::Equal
            | BinaryOp::Less
            | BinaryOp::LessEqual
            | BinaryOp::Greater
            | BinaryOp::GreaterEqual => BinaryKind::Comparison,
            BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => BinaryKind::Logic,
        }
    }

    pub(super) fn infer(self, operands: &[&TensorType]) -> Result<TensorType, String> {
        expect_arity(operands, 2, 2)?;
        let (a, b) = (operands[0], operands[1]);
        expect_same_dtype(a, b)?;
        let dtype = match self.kind() {
            BinaryKind::Arithmetic if a.dtype == DType::Bool => {
                return Err(format!("{} does not accept bool operands", self.name()))
            }
            BinaryKind::Logic if a.dtype != DType::Bool => {
                return Err(format!("{} needs bool operands, got {a}", self.name()))
            }
            BinaryKind::Arithmetic => a.dtype,
            BinaryKind::Comparison | BinaryKind::Logic => DType::Bool,
        };
        Ok(TensorType::new(
            dtype,
            broadcast_shapes(&a.shape, &b.shape)?,
        ))
    }

    /// The arithmetic or comparison on two f64 values (comparisons give 0 or 1).
    pub fn apply_f64(self, a: f64, b: f64) -> f64 {
        let truth = |t: bool| f64::from(u8::from(t));
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => a.powf(b),
            BinaryOp::Mod => {
                let r = a % b;
                if r != 0.0 && (r < 0.0) != (b < 0.0) {
                    r + b
                } else {
                    r
                }
            }
            BinaryOp::Rem => a % b,
            BinaryOp::Max if a.is_nan() || b.is_nan() => f64::NAN,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min if a.is_nan() || b.is_nan() => f64::NAN,
            BinaryOp::Min => a.min(b),
            BinaryOp::Equal => truth(a == b),
            BinaryOp::Less => truth(a < b),
            BinaryOp::LessEqual => truth(a <= b),
            BinaryOp::Greater => truth(a > b),
            BinaryOp::GreaterEqual => truth(a >= b),
            BinaryOp::And => truth(a != 0.0 && b != 0.0),
            BinaryOp::Or => truth(a != 0.0 || b != 0.0),
            BinaryOp::Xor => truth((a != 0.0) != (b != 0.0)),
        }
    }

    fn apply_i64(self, a: i64, b: i64) -> Result<i64, String> {
        Ok(match self {
            BinaryOp::Add => a.wrapping_add(b),
            BinaryOp::Sub => a.wrapping_sub(b),
            BinaryOp::Mul => a.wrapping_mul(b),
            BinaryOp::Div if b == 0 => return Err("integer division by zero".into()),
            BinaryOp::Div => a.wrapping_div(b),
            BinaryOp::Pow => (a as f64).powf(b as f64) as i64,
            BinaryOp::Mod | BinaryOp::Rem if b == 0 => return Err("integer modulo by zero".into()),
            BinaryOp::Mod => {
                // Opposite signs: |r| < |b|, so the sum cannot overflow.
                let r = a.wrapping_rem(b);
                if r != 0 && (r < 0) != (b < 0) {
                    r + b
                } else {
                    r
                }
            }
            BinaryOp::Rem => a.wrapping_rem(b),
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Equal => i64::from(a == b),
            BinaryOp::Less => i64::from(a < b),
            BinaryOp::LessEqual => i64::from(a <= b),
            BinaryOp::Greater => i64::from(a > b),
            BinaryOp::GreaterEqual => i64::from(a >= b),
            BinaryOp::And => i64::from(a != 0 && b != 0),
            BinaryOp::Or => i64::from(a != 0 || b != 0),
            BinaryOp::Xor => i64::from((a != 0) != (b != 0)),
        })
    }

    pub(super) fn eval(self, a: &Tensor, b: &Tensor, ctx: EvalCtx) -> Result<Tensor, String> {
        let out = ctx.out_shape.to_vec();
        let (ia, ib) = (
            broadcast_offsets(a.shape(), &out),
            broadcast_offsets(b.shape(), &out),
        );
        let result_dtype = match self.kind() {
            BinaryKind::Arithmetic => a.dtype(),
            BinaryKind::Comparison | BinaryKind::Logic => DType::Bool,
        };
        if a.dtype().is_float() {
            let (va, vb) = (a.to_f64s(), b.to_f64s());
            let values = ia
                .iter()
                .zip(&ib)
                .map(|(&i, &j)| self.apply_f64(va[i], vb[j]))
                .collect();
            Ok(Tensor::from_f64s(result_dtype, out, values))
        } else {
            let (va, vb) = (a.to_i64s(), b.to_i64s());
            let values = ia
                .iter()
                .zip(&ib)
                .map(|(&i, &j)| self.apply_i64(va[i], vb[j]))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Tensor::from_i64s(result_dtype, out, values))
        }
    }
}

enum BinaryKind {
    Arithmetic,
    Comparison,
    Logic,
}

pub(super) fn infer_where(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 3, 3)?;
    let (cond, x, y) = (operands[0], operands[1], operands[2]);
    if cond.dtype != DType::Bool {
        return Err(format!("condition must be bool, got {cond}"));
    }
    expect_same_dtype(x, y)?;
    let shape = broadcast_shapes(&broadcast_shapes(&cond.shape, &x.shape)?, &y.shape)?;
    Ok(TensorType::new(x.dtype, shape))
}

pub(super) fn eval_where(operands: &[&Tensor], ctx: EvalCtx) -> Result<Tensor, String> {
    let cond = broadcast_to(operands[0], ctx.out_shape).to_bools();
    let x = broadcast_to(operands[1], ctx.out_shape);
    let y = broadcast_to(operands[2], ctx.out_shape);
    let picks: Vec<usize> = cond
        .iter()
        .enumerate()
        .map(|(i, &c)| if c { i } else { i + cond.len() })
        .collect();
    let both = concat_flat(&x, &y)?;
    Ok(both.take(ctx.out_shape.to_vec(), &picks))
}

fn concat_flat(x: &Tensor, y: &Tensor) -> Result<Tensor, String> {
    let mut bytes = x.to_le_bytes();
    bytes.extend(y.to_le_bytes());
    Tensor::from_le_bytes(x.dtype(), vec![x.numel() + y.numel()], &bytes).map_err(|e| e.to_string())
}

pub(super) fn infer_cast(operands: &[&TensorType], to: DType) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    Ok(TensorType::new(to, operands[0].shape.clone()))
}

pub(super) fn eval_cast(x: &Tensor, to: DType) -> Tensor {
    let shape = x.shape().to_vec();
    if to == DType::Bool {
        Tensor::from_bools(shape, x.to_bools())
    } else if x.dtype().is_float() {
        Tensor::from_f64s(to, shape, x.to_f64s())
    } else {
        Tensor::from_i64s(to, shape, x.to_i64s())
    }
}

/// For each element of `out` (row-major), the flat index of the `shape` element that numpy
/// broadcasting reads.
pub(crate) fn broadcast_offsets(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let lead = out.len() - shape.len();
    let in_strides = strides(shape);
    let effective: Vec<usize> = (0..out.len())
        .map(|i| match i.checked_sub(lead) {
            Some(j) if shape[j] != 1 => in_strides[j],
            _ => 0,
        })
        .collect();
    let total: usize = out.iter().product();
    let mut offsets = Vec::with_capacity(total);
    let mut index = vec![0usize; out.len()];
    let mut offset = 0usize;
    for _ in 0..total {
        offsets.push(offset);
        for axis in (0..out.len()).rev() {
            index[axis] += 1;
            offset += effective[axis];
            if index[axis] < out[axis] {
                break;
            }
            offset -= effective[axis] * index[axis];
            index[axis] = 0;
        }
    }
    offsets
}

/// `x` broadcast to `out` dims.
pub(crate) fn broadcast_to(x: &Tensor, out: &[usize]) -> Tensor {
    x.take(out.to_vec(), &broadcast_offsets(x.shape(), out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Op;
    use super::*;

    fn unary(op: UnaryOp, values: &[f32]) -> Vec<f32> {
        let x = Tensor::f32(&[values.len()], values.to_vec()).unwrap();
        f32s(&eval(&Op::Unary(op), &[x]).unwrap())
    }

    #[test]
    fn unary_functions_match_known_values() {
        // Reference values from tables of the functions (rounded to f32).
        assert_eq!(unary(UnaryOp::Neg, &[1.5, -2.0]), [-1.5, 2.0]);
        assert_eq!(unary(UnaryOp::Abs, &[-3.0, 2.0]), [3.0, 2.0]);
        assert_eq!(unary(UnaryOp::Relu, &[-1.0, 0.5]), [0.0, 0.5]);
        assert_close(
            &unary(UnaryOp::Exp, &[0.0, 1.0, -1.0]),
            &[1.0, std::f32::consts::E, 0.367_879_44],
            1e-7,
        );
        assert_close(
            &unary(UnaryOp::Log, &[1.0, 10.0]),
            &[0.0, std::f32::consts::LN_10],
            1e-7,
        );
        assert_eq!(unary(UnaryOp::Sqrt, &[4.0, 2.25]), [2.0, 1.5]);
        assert_eq!(unary(UnaryOp::Reciprocal, &[4.0, -0.5]), [0.25, -2.0]);
        assert_close(
            &unary(UnaryOp::Erf, &[0.0, 0.5, 1.0, -2.0]),
            &[0.0, 0.520_499_9, 0.842_700_8, -0.995_322_3],
            1e-7,
        );
        assert_close(
            &unary(UnaryOp::Tanh, &[0.0, 1.0]),
            &[0.0, 0.761_594_2],
            1e-7,
        );
        assert_close(
            &unary(UnaryOp::Sigmoid, &[0.0, 2.0]),
            &[0.5, 0.880_797_1],
            1e-7,
        );
        assert_close(
            &unary(UnaryOp::Silu, &[1.0, -1.0]),
            &[0.731_058_6, -0.268_941_43],
            1e-7,
        );
        // GELU(1) = 0.5 * (1 + erf(1/sqrt 2)) = 0.8413447; the tanh form gives 0.8411920.
        assert_close(
            &unary(UnaryOp::Gelu, &[1.0, -1.0]),
            &[0.841_344_7, -0.158_655_26],
            1e-7,
        );
        assert_close(&unary(UnaryOp::GeluTanh, &[1.0]), &[0.841_192], 1e-6);
        assert_close(
            &unary(UnaryOp::Sin, &[std::f32::consts::FRAC_PI_2]),
            &[1.0],
            1e-7,
        );
        assert_close(&unary(UnaryOp::Cos, &[0.0]), &[1.0], 0.0);
    }

    #[test]
    fn rounding_and_sign() {
        assert_eq!(unary(UnaryOp::Floor, &[-1.5, 1.5]), [-2.0, 1.0]);
        assert_eq!(unary(UnaryOp::Ceil, &[-1.5, 1.5]), [-1.0, 2.0]);
        assert_eq!(
            unary(UnaryOp::Round, &[0.5, 1.5, 2.5, -0.5, 2.6]),
            [0.0, 2.0, 2.0, -0.0, 3.0]
        );
        assert_eq!(unary(UnaryOp::Sign, &[-3.0, 0.0, 2.0]), [-1.0, 0.0, 1.0]);
        let ints = Tensor::i64(&[3], vec![-7, 0, 4]).unwrap();
        assert_eq!(
            eval(&Op::Unary(UnaryOp::Sign), &[ints]).unwrap().to_i64s(),
            [-1, 0, 1]
        );
    }

    #[test]
    fn modulo_follows_the_divisor_or_the_dividend() {
        let a = Tensor::i64(&[4], vec![7, -7, 7, -7]).unwrap();
        let b = Tensor::i64(&[4], vec![3, 3, -3, -3]).unwrap();
        let ev = |op| {
            eval(&Op::Binary(op), &[a.clone(), b.clone()])
                .unwrap()
                .to_i64s()
        };
        assert_eq!(ev(BinaryOp::Mod), [1, 2, -2, -1]);
        assert_eq!(ev(BinaryOp::Rem), [1, -1, 1, -1]);
        // Regression (from review): no wrap near the limits.
        let one = Tensor::i64(&[1], vec![1]).unwrap();
        let max = Tensor::i64(&[1], vec![i64::MAX]).unwrap();
        assert_eq!(
            eval(&Op::Binary(BinaryOp::Mod), &[one, max])
                .unwrap()
                .to_i64s(),
            [1]
        );
        let x = Tensor::f32(&[2], vec![-7.5, 7.5]).unwrap();
        let y = Tensor::f32(&[2], vec![2.0, -2.0]).unwrap();
        assert_eq!(
            f32s(&eval(&Op::Binary(BinaryOp::Mod), &[x.clone(), y.clone()]).unwrap()),
            [0.5, -0.5]
        );
        assert_eq!(
            f32s(&eval(&Op::Binary(BinaryOp::Rem), &[x, y]).unwrap()),
            [-1.5, 1.5]
        );
        let zero = Tensor::i64(&[1], vec![0]).unwrap();
        assert!(eval(&Op::Binary(BinaryOp::Mod), &[a, zero]).is_err());
    }

    #[test]
    fn unary_special_values() {
        let out = unary(UnaryOp::Exp, &[f32::NEG_INFINITY, f32::INFINITY, 100.0]);
        assert_eq!(out, [0.0, f32::INFINITY, f32::INFINITY]);
        assert!(unary(UnaryOp::Sqrt, &[-1.0])[0].is_nan());
        assert_eq!(unary(UnaryOp::Log, &[0.0]), [f32::NEG_INFINITY]);
    }

    #[test]
    fn integer_and_bool_unaries() {
        let x = Tensor::i64(&[3], vec![-2, 0, 5]).unwrap();
        let neg = eval(&Op::Unary(UnaryOp::Neg), std::slice::from_ref(&x)).unwrap();
        assert_eq!(neg.to_i64s(), [2, 0, -5]);
        let relu = eval(&Op::Unary(UnaryOp::Relu), std::slice::from_ref(&x)).unwrap();
        assert_eq!(relu.to_i64s(), [0, 0, 5]);
        let b = Tensor::bool(&[2], vec![true, false]).unwrap();
        assert_eq!(
            eval(&Op::Unary(UnaryOp::Not), &[b]).unwrap().to_bools(),
            [false, true]
        );
        assert!(eval(&Op::Unary(UnaryOp::Exp), &[x])
            .unwrap_err()
            .contains("does not accept"));
    }

    #[test]
    fn binary_broadcasts_numpy_style() {
        // [2, 3] + [3] and [2, 1] * [1, 3].
        let a = Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let row = Tensor::f32(&[3], vec![10., 20., 30.]).unwrap();
        let sum = eval(&Op::Binary(BinaryOp::Add), &[a, row]).unwrap();
        assert_eq!(f32s(&sum), [11., 22., 33., 14., 25., 36.]);
        let col = Tensor::f32(&[2, 1], vec![1., 2.]).unwrap();
        let row = Tensor::f32(&[1, 3], vec![1., 10., 100.]).unwrap();
        let outer = eval(&Op::Binary(BinaryOp::Mul), &[col, row]).unwrap();
        assert_eq!(outer.shape(), [2, 3]);
        assert_eq!(f32s(&outer), [1., 10., 100., 2., 20., 200.]);
    }

    #[test]
    fn binary_arithmetic_and_comparisons() {
        let a = Tensor::f32(&[4], vec![1., 4., -2., f32::NAN]).unwrap();
        let b = Tensor::f32(&[4], vec![2., 2., 3., 1.]).unwrap();
        let ev = |op| eval(&Op::Binary(op), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(f32s(&ev(BinaryOp::Sub))[..3], [-1., 2., -5.]);
        assert_eq!(f32s(&ev(BinaryOp::Div))[..3], [0.5, 2., -2. / 3.]);
        assert_eq!(f32s(&ev(BinaryOp::Pow))[..3], [1., 16., -8.]);
        assert_eq!(f32s(&ev(BinaryOp::Max))[..3], [2., 4., 3.]);
        assert!(f32s(&ev(BinaryOp::Max))[3].is_nan());
        assert_eq!(f32s(&ev(BinaryOp::Min))[..3], [1., 2., -2.]);
        assert_eq!(ev(BinaryOp::Less).to_bools(), [true, false, true, false]);
        assert_eq!(ev(BinaryOp::Equal).to_bools(), [false, false, false, false]);
        assert_eq!(
            ev(BinaryOp::GreaterEqual).to_bools(),
            [false, true, false, false]
        );
        assert_eq!(
            ev(BinaryOp::Greater).to_bools(),
            [false, true, false, false]
        );
        assert_eq!(
            ev(BinaryOp::LessEqual).to_bools(),
            [true, false, true, false]
        );
    }

    #[test]
    fn integer_division_truncates_and_rejects_zero() {
        let a = Tensor::i64(&[3], vec![7, -7, 1]).unwrap();
        let b = Tensor::i64(&[3], vec![2, 2, 1]).unwrap();
        let q = eval(&Op::Binary(BinaryOp::Div), &[a.clone(), b]).unwrap();
        assert_eq!(q.to_i64s(), [3, -3, 1]);
        let zero = Tensor::i64(&[1], vec![0]).unwrap();
        let err = eval(&Op::Binary(BinaryOp::Div), &[a, zero]).unwrap_err();
        assert_eq!(err, "integer division by zero");
    }

    #[test]
    fn logic_ops() {
        let a = Tensor::bool(&[4], vec![true, true, false, false]).unwrap();
        let b = Tensor::bool(&[4], vec![true, false, true, false]).unwrap();
        let ev = |op| {
            eval(&Op::Binary(op), &[a.clone(), b.clone()])
                .unwrap()
                .to_bools()
        };
        assert_eq!(ev(BinaryOp::And), [true, false, false, false]);
        assert_eq!(ev(BinaryOp::Or), [true, true, true, false]);
        assert_eq!(ev(BinaryOp::Xor), [false, true, true, false]);
    }

    #[test]
    fn binary_shape_rules() {
        let op = Op::Binary(BinaryOp::Add);
        let out = infer(
            &op,
            &[
                ty(DType::F32, &["batch", "seq", "4"]),
                ty(DType::F32, &["4"]),
            ],
        )
        .unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, 4]");
        let out = infer(
            &op,
            &[
                ty(DType::F32, &["batch", "1", "seq"]),
                ty(DType::F32, &["seq", "1"]),
            ],
        )
        .unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, seq]");
        let err = infer(&op, &[ty(DType::F32, &["3"]), ty(DType::F32, &["4"])]).unwrap_err();
        assert!(err.contains("do not broadcast"), "{err}");
        let err = infer(&op, &[ty(DType::F32, &["3"]), ty(DType::I64, &["3"])]).unwrap_err();
        assert!(err.contains("dtypes differ"), "{err}");
        let and = Op::Binary(BinaryOp::And);
        assert!(infer(&and, &[ty(DType::F32, &["3"]), ty(DType::F32, &["3"])]).is_err());
        let less = infer(
            &Op::Binary(BinaryOp::Less),
            &[ty(DType::I64, &["3"]), ty(DType::I64, &["1"])],
        );
        assert_eq!(less.unwrap().dtype, DType::Bool);
    }

    #[test]
    fn where_selects_with_broadcast() {
        let cond = Tensor::bool(&[2, 1], vec![true, false]).unwrap();
        let x = Tensor::f32(&[2, 2], vec![1., 2., 3., 4.]).unwrap();
        let y = Tensor::f32(&[], vec![-1.]).unwrap();
        let out = eval(&Op::Where, &[cond, x, y]).unwrap();
        assert_eq!(f32s(&out), [1., 2., -1., -1.]);
    }

    #[test]
    fn cast_rounds_truncates_and_wraps() {
        let x = Tensor::f32(&[4], vec![1.7, -1.7, 0.0, 300.0]).unwrap();
        let as_int = eval(&Op::Cast { to: DType::I64 }, std::slice::from_ref(&x)).unwrap();
        assert_eq!(as_int.to_i64s(), [1, -1, 0, 300]);
        let as_bool = eval(&Op::Cast { to: DType::Bool }, std::slice::from_ref(&x)).unwrap();
        assert_eq!(as_bool.to_bools(), [true, true, false, true]);
        let as_u8 = eval(&Op::Cast { to: DType::U8 }, &[as_int]).unwrap();
        assert_eq!(as_u8.to_i64s(), [1, 255, 0, 44]);
        let as_f16 = eval(&Op::Cast { to: DType::F16 }, &[x]).unwrap();
        assert_eq!(as_f16.to_f64s(), [1.7001953125, -1.7001953125, 0.0, 300.0]);
        let b = Tensor::bool(&[2], vec![true, false]).unwrap();
        let as_f32 = eval(&Op::Cast { to: DType::F32 }, &[b]).unwrap();
        assert_eq!(f32s(&as_f32), [1.0, 0.0]);
    }
}
