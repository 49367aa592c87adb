//! Reductions over axes, and softmax.

use super::{expect_arity, expect_float, normalize_axis, AttrValue, Attrs, EvalCtx, TensorType};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::tensor::{strides, Tensor};
use serde::{Deserialize, Serialize};

/// A reduction, accumulated in f64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Maximum (NaN if any element is NaN).
    Max,
    /// Minimum (NaN if any element is NaN).
    Min,
    /// Product.
    Prod,
}

impl ReduceOp {
    /// Every reduction.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Prod,
    ];

    /// The text name of the op.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Min => "reduce_min",
            ReduceOp::Prod => "reduce_prod",
        }
    }

    /// Parses a text name.
    pub fn from_name(name: &str) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|op| op.name() == name)
    }

    fn reduce(self, values: impl Iterator<Item = f64>, count: usize) -> f64 {
        match self {
            ReduceOp::Sum => values.sum(),
            ReduceOp::Mean => values.sum::<f64>() / count as f64,
            ReduceOp::Prod => values.product(),
            ReduceOp::Max => values.fold(f64::NEG_INFINITY, |m, v| {
                if v.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(v)
                }
            }),
            ReduceOp::Min => values.fold(f64::INFINITY, |m, v| {
                if v.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.min(v)
                }
            }),
        }
    }
}

pub(super) fn reduce_attrs(axes: &[i64], keep_dims: bool) -> Vec<(&'static str, AttrValue)> {
    vec![
        ("axes", AttrValue::ints(axes.iter().copied())),
        ("keep_dims", AttrValue::Bool(keep_dims)),
    ]
}

pub(super) fn parse_reduce_attrs(attrs: &mut Attrs) -> Result<(Vec<i64>, bool), String> {
    Ok((attrs.ints("axes")?, attrs.bool("keep_dims")?))
}

fn resolve_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    if axes.is_empty() {
        return Err("reduction needs at least one axis".into());
    }
    let mut resolved = axes
        .iter()
        .map(|&a| normalize_axis(a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    resolved.sort_unstable();
    if resolved.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("axes {axes:?} repeat an axis"));
    }
    Ok(resolved)
}

pub(super) fn infer_reduce(
    operands: &[&TensorType],
    op: ReduceOp,
    axes: &[i64],
    keep_dims: bool,
) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    let x = operands[0];
    if x.dtype == DType::Bool && !matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(format!("{} does not accept bool", op.name()));
    }
    if op == ReduceOp::Mean {
        expect_float("reduce_mean input", x)?;
    }
    let axes = resolve_axes(axes, x.rank())?;
    let dims = x
        .shape
        .0
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match (axes.contains(&i), keep_dims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Const(1)),
            (true, false) => None,
        })
        .collect();
    Ok(TensorType::new(x.dtype, Shape(dims)))
}

/// Calls `f(outer_base, reduced_offsets)` for each output element: the flat index of its first
/// input element and the offsets of all elements reduced into it.
fn for_each_group(shape: &[usize], axes: &[usize], mut f: impl FnMut(usize, &[usize])) {
    let st = strides(shape);
    let reduced_dims: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let reduced_strides: Vec<usize> = axes.iter().map(|&a| st[a]).collect();
    let reduced_count: usize = reduced_dims.iter().product();
    let reduced_row_strides = strides(&reduced_dims);
    let reduced_offsets: Vec<usize> = (0..reduced_count)
        .map(|flat| {
            let mut rem = flat;
            let mut offset = 0;
            for (row_stride, in_stride) in reduced_row_strides.iter().zip(&reduced_strides) {
                offset += (rem / row_stride) * in_stride;
                rem %= row_stride;
            }
            offset
        })
        .collect();
    let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
    let kept_dims: Vec<usize> = kept.iter().map(|&a| shape[a]).collect();
    let kept_strides = strides(&kept_dims);
    let outer: usize = kept_dims.iter().product();
    for flat in 0..outer {
        let mut rem = flat;
        let mut base = 0;
        for (i, &axis) in kept.iter().enumerate() {
            base += (rem / kept_strides[i]) * st[axis];
            rem %= kept_strides[i];
        }
        f(base, &reduced_offsets);
    }
}

pub(super) fn eval_reduce(
    x: &Tensor,
    op: ReduceOp,
    axes: &[i64],
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let axes = resolve_axes(axes, x.shape().len())?;
    if x.dtype() == DType::Bool {
        // Max is "any" and min is "all"; over no elements they give false and true.
        let bools = x.to_bools();
        let mut out = Vec::new();
        for_each_group(x.shape(), &axes, |base, offsets| {
            let mut items = offsets.iter().map(|&o| bools[base + o]);
            out.push(if op == ReduceOp::Max {
                items.any(|b| b)
            } else {
                items.all(|b| b)
            });
        });
        return Ok(Tensor::from_bools(ctx.out_shape.to_vec(), out));
    }
    if x.dtype().is_int() && op != ReduceOp::Mean {
        let mut out = Vec::new();
        let ints = x.to_i64s();
        for_each_group(x.shape(), &axes, |base, offsets| {
            let items = offsets.iter().map(|&o| ints[base + o]);
            out.push(match op {
                ReduceOp::Sum | ReduceOp::Mean => items.fold(0i64, i64::wrapping_add),
                ReduceOp::Prod => items.fold(1i64, i64::wrapping_mul),
                ReduceOp::Max => items.max().unwrap_or(i64::MIN),
                ReduceOp::Min => items.min().unwrap_or(i64::MAX),
            });
        });
        return Ok(Tensor::from_i64s(x.dtype(), ctx.out_shape.to_vec(), out));
    }
    let values = x.to_f64s();
    let mut out = Vec::new();
    for_each_group(x.shape(), &axes, |base, offsets| {
        out.push(op.reduce(offsets.iter().map(|&o| values[base + o]), offsets.len()));
    });
    Ok(Tensor::from_f64s(x.dtype(), ctx.out_shape.to_vec(), out))
}

/// Which extreme [`super::Op::Arg`] finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgOp {
    /// Index of the largest element (NaN counts as largest).
    Max,
    /// Index of the smallest element (NaN counts as smallest).
    Min,
}

impl ArgOp {
    /// The text name of the op.
    pub fn name(self) -> &'static str {
        match self {
            ArgOp::Max => "arg_max",
            ArgOp::Min => "arg_min",
        }
    }

    /// Parses a text name.
    pub fn from_name(name: &str) -> Option<ArgOp> {
        [ArgOp::Max, ArgOp::Min]
            .into_iter()
            .find(|op| op.name() == name)
    }
}

pub(super) fn arg_attrs(
    axis: i64,
    keep_dims: bool,
    select_last: bool,
) -> Vec<(&'static str, AttrValue)> {
    vec![
        ("axis", AttrValue::int(axis)),
        ("keep_dims", AttrValue::Bool(keep_dims)),
        ("select_last", AttrValue::Bool(select_last)),
    ]
}

pub(super) fn parse_arg(op: ArgOp, attrs: &mut Attrs) -> Result<super::Op, String> {
    Ok(super::Op::Arg {
        op,
        axis: attrs.int("axis")?,
        keep_dims: attrs.bool("keep_dims")?,
        select_last: attrs.bool("select_last")?,
    })
}

pub(super) fn infer_arg(
    operands: &[&TensorType],
    axis: i64,
    keep_dims: bool,
) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    let x = operands[0];
    if x.dtype == DType::Bool {
        return Err(format!("arg_max/arg_min do not accept {x}"));
    }
    let axis = normalize_axis(axis, x.rank())?;
    let dims = x
        .shape
        .0
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match (i == axis, keep_dims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Const(1)),
            (true, false) => None,
        });
    Ok(TensorType::new(DType::I64, Shape(dims.collect())))
}

pub(super) fn eval_arg(
    x: &Tensor,
    op: ArgOp,
    axis: i64,
    select_last: bool,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let axis = normalize_axis(axis, x.shape().len())?;
    if x.shape()[axis] == 0 {
        return Err("arg_max/arg_min over an empty axis".into());
    }
    // Integers compare exactly (f64 would merge values beyond 2^53).
    let ints = x.dtype().is_int().then(|| x.to_i64s());
    let floats = x.to_f64s();
    let mut out = Vec::new();
    for_each_group(x.shape(), &[axis], |base, offsets| {
        let mut best = 0usize;
        for (i, &o) in offsets.iter().enumerate().skip(1) {
            let (at, best_at) = (base + o, base + offsets[best]);
            let (better, tie) = match &ints {
                Some(v) => {
                    let better = if op == ArgOp::Max {
                        v[at] > v[best_at]
                    } else {
                        v[at] < v[best_at]
                    };
                    (better, v[at] == v[best_at])
                }
                None => {
                    let (v, b) = (floats[at], floats[best_at]);
                    let strict = if op == ArgOp::Max { v > b } else { v < b };
                    (
                        strict || (v.is_nan() && !b.is_nan()),
                        v == b || (v.is_nan() && b.is_nan()),
                    )
                }
            };
            if better || (select_last && tie) {
                best = i;
            }
        }
        out.push(best as i64);
    });
    Ok(Tensor::from_i64s(DType::I64, ctx.out_shape.to_vec(), out))
}

pub(super) fn infer_softmax(operands: &[&TensorType], axis: i64) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    expect_float("softmax input", operands[0])?;
    normalize_axis(axis, operands[0].rank())?;
    Ok(operands[0].clone())
}

/// `exp(x - max) / sum(exp(x - max))` along `axis`; a slice that is all `-inf` gives NaN, as
/// the unfused formula does.
pub(super) fn eval_softmax(x: &Tensor, axis: i64) -> Result<Tensor, String> {
    let axis = normalize_axis(axis, x.shape().len())?;
    let values = x.to_f64s();
    let mut out = vec![0.0; values.len()];
    for_each_group(x.shape(), &[axis], |base, offsets| {
        let max = offsets
            .iter()
            .map(|&o| values[base + o])
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = offsets
            .iter()
            .map(|&o| (values[base + o] - max).exp())
            .sum();
        for &o in offsets {
            out[base + o] = (values[base + o] - max).exp() / sum;
        }
    });
    Ok(Tensor::from_f64s(x.dtype(), x.shape().to_vec(), out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Op;
    use super::*;

    fn reduce(op: ReduceOp, axes: &[i64], keep_dims: bool) -> Op {
        Op::Reduce {
            op,
            axes: axes.to_vec(),
            keep_dims,
        }
    }

    #[test]
    fn reductions_by_hand() {
        // x = [[1, 2, 3], [4, 5, 6]]
        let x = Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let run = |op, axes: &[i64], keep| {
            eval(&reduce(op, axes, keep), std::slice::from_ref(&x)).unwrap()
        };
        assert_eq!(f32s(&run(ReduceOp::Sum, &[1], false)), [6., 15.]);
        assert_eq!(f32s(&run(ReduceOp::Sum, &[0], false)), [5., 7., 9.]);
        assert_eq!(f32s(&run(ReduceOp::Mean, &[-1], true)), [2., 5.]);
        assert_eq!(run(ReduceOp::Mean, &[-1], true).shape(), [2, 1]);
        assert_eq!(f32s(&run(ReduceOp::Max, &[0, 1], false)), [6.]);
        assert_eq!(run(ReduceOp::Max, &[0, 1], false).shape(), [] as [usize; 0]);
        assert_eq!(f32s(&run(ReduceOp::Min, &[-2], false)), [1., 2., 3.]);
        assert_eq!(f32s(&run(ReduceOp::Prod, &[1], false)), [6., 120.]);
    }

    #[test]
    fn reduce_middle_axis_of_3d() {
        // x[i, j, k] = 100 i + 10 j + k, dims [2, 3, 2]; sum over j = 300 i + 30 + 3 k.
        let values = (0..2)
            .flat_map(|i| {
                (0..3).flat_map(move |j| (0..2).map(move |k| (100 * i + 10 * j + k) as f32))
            })
            .collect();
        let x = Tensor::f32(&[2, 3, 2], values).unwrap();
        let out = eval(&reduce(ReduceOp::Sum, &[1], false), &[x]).unwrap();
        assert_eq!(f32s(&out), [30., 33., 330., 333.]);
    }

    #[test]
    fn integer_reductions_stay_integer() {
        let x = Tensor::i64(&[2, 2], vec![i64::MAX - 1, 1, -3, 4]).unwrap();
        let sum = eval(
            &reduce(ReduceOp::Sum, &[1], false),
            std::slice::from_ref(&x),
        )
        .unwrap();
        assert_eq!(sum.to_i64s(), [i64::MAX, 1]);
        let max = eval(&reduce(ReduceOp::Max, &[0], false), &[x]).unwrap();
        assert_eq!(max.to_i64s(), [i64::MAX - 1, 4]);
    }

    #[test]
    fn bool_max_is_any_and_min_is_all() {
        let x = Tensor::bool(&[2, 2], vec![true, false, false, false]).unwrap();
        let any = eval(
            &reduce(ReduceOp::Max, &[1], false),
            std::slice::from_ref(&x),
        )
        .unwrap();
        assert_eq!(any.to_bools(), [true, false]);
        let all = eval(
            &reduce(ReduceOp::Min, &[0], false),
            std::slice::from_ref(&x),
        )
        .unwrap();
        assert_eq!(all.to_bools(), [false, false]);
        let empty = Tensor::bool(&[0, 2], vec![]).unwrap();
        let any = eval(
            &reduce(ReduceOp::Max, &[0], false),
            std::slice::from_ref(&empty),
        )
        .unwrap();
        assert_eq!(any.to_bools(), [false, false]);
        assert!(infer(
            &reduce(ReduceOp::Sum, &[0], false),
            &[ty(DType::Bool, &["2"])]
        )
        .is_err());
    }

    #[test]
    fn reduce_shape_rules() {
        let op = reduce(ReduceOp::Mean, &[-1], true);
        let out = infer(&op, &[ty(DType::F32, &["batch", "seq", "384"])]).unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, 1]");
        assert!(infer(
            &reduce(ReduceOp::Sum, &[3], false),
            &[ty(DType::F32, &["2", "2"])]
        )
        .is_err());
        assert!(infer(
            &reduce(ReduceOp::Sum, &[1, -1], false),
            &[ty(DType::F32, &["2", "2"])]
        )
        .is_err());
        assert!(infer(
            &reduce(ReduceOp::Sum, &[], false),
            &[ty(DType::F32, &["2"])]
        )
        .is_err());
    }

    #[test]
    fn arg_max_and_min_by_hand() {
        // [[1, 3, 3], [2, 0, -1]]
        let x = Tensor::f32(&[2, 3], vec![1., 3., 3., 2., 0., -1.]).unwrap();
        let arg = |op, axis, keep_dims, select_last| {
            eval(
                &Op::Arg {
                    op,
                    axis,
                    keep_dims,
                    select_last,
                },
                std::slice::from_ref(&x),
            )
            .unwrap()
        };
        assert_eq!(arg(ArgOp::Max, 1, false, false).to_i64s(), [1, 0]);
        assert_eq!(arg(ArgOp::Max, 1, false, true).to_i64s(), [2, 0]);
        assert_eq!(arg(ArgOp::Min, -1, true, false).shape(), [2, 1]);
        assert_eq!(arg(ArgOp::Min, 0, false, false).to_i64s(), [0, 1, 1]);
    }

    #[test]
    fn integer_arg_max_compares_exactly() {
        // Regression (from review): beyond 2^53 an f64 comparison sees a tie.
        let x = Tensor::i64(&[2], vec![1 << 53, (1 << 53) + 1]).unwrap();
        let op = Op::Arg {
            op: ArgOp::Max,
            axis: 0,
            keep_dims: false,
            select_last: false,
        };
        assert_eq!(eval(&op, &[x]).unwrap().to_i64s(), [1]);
    }

    #[test]
    fn softmax_by_hand() {
        // softmax([0, ln 3]) = [1/4, 3/4]; along axis 0 of [[0],[ln 3]] the same.
        let x = Tensor::f32(&[2], vec![0.0, 3f32.ln()]).unwrap();
        assert_close(
            &f32s(&eval(&Op::Softmax { axis: -1 }, &[x]).unwrap()),
            &[0.25, 0.75],
            1e-7,
        );
        let col = Tensor::f32(&[2, 1], vec![0.0, 3f32.ln()]).unwrap();
        assert_close(
            &f32s(&eval(&Op::Softmax { axis: 0 }, &[col]).unwrap()),
            &[0.25, 0.75],
            1e-7,
        );
    }

    #[test]
    fn softmax_handles_large_and_masked_values() {
        let x = Tensor::f32(
            &[2, 3],
            vec![
                1000.0,
                1000.0,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
            ],
        )
        .unwrap();
        let out = f32s(&eval(&Op::Softmax { axis: 1 }, &[x]).unwrap());
        assert_eq!(out[..3], [0.5, 0.5, 0.0]);
        assert!(out[3..].iter().all(|v| v.is_nan()));
    }
}
