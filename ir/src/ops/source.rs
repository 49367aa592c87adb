//! Ops with no operands that compute their value from attributes: `fill` and `range`.

use super::{expect_arity, AttrValue, Attrs, EvalCtx, Op, TensorType};
use crate::dim::{Dim, Shape};
use crate::dtype::{DType, Scalar};
use crate::tensor::Tensor;

pub(super) fn fill_attrs(
    value: Scalar,
    dtype: DType,
    shape: &Shape,
) -> Vec<(&'static str, AttrValue)> {
    let value = match value {
        Scalar::Float(_) => AttrValue::Float(value.to_string()),
        Scalar::Int(v) => AttrValue::int(v),
        Scalar::Bool(b) => AttrValue::Bool(b),
    };
    vec![
        ("value", value),
        ("dtype", AttrValue::ident(dtype.name())),
        ("shape", AttrValue::dims(shape)),
    ]
}

pub(super) fn parse_fill(attrs: &mut Attrs) -> Result<Op, String> {
    let value = attrs.scalar("value")?;
    let dtype = attrs.dtype("dtype")?;
    Ok(Op::Fill {
        value: value.cast(dtype),
        dtype,
        shape: attrs.shape("shape")?,
    })
}

pub(super) fn infer_fill(
    operands: &[&TensorType],
    value: Scalar,
    dtype: DType,
    shape: &Shape,
) -> Result<TensorType, String> {
    expect_arity(operands, 0, 0)?;
    if value.cast(dtype) != value {
        return Err(format!("fill value {value} is not stored as {dtype}"));
    }
    Ok(TensorType::new(dtype, shape.clone()))
}

pub(super) fn eval_fill(value: Scalar, dtype: DType, ctx: EvalCtx) -> Tensor {
    let numel = ctx.out_shape.iter().product();
    let shape = ctx.out_shape.to_vec();
    match value {
        Scalar::Int(v) => Tensor::from_i64s(dtype, shape, vec![v; numel]),
        Scalar::Float(_) | Scalar::Bool(_) => {
            Tensor::from_f64s(dtype, shape, vec![value.as_f64(); numel])
        }
    }
}

pub(super) fn range_attrs(
    start: &Dim,
    step: i64,
    len: &Dim,
    dtype: DType,
) -> Vec<(&'static str, AttrValue)> {
    vec![
        ("start", AttrValue::Dim(start.clone())),
        ("step", AttrValue::int(step)),
        ("len", AttrValue::Dim(len.clone())),
        ("dtype", AttrValue::ident(dtype.name())),
    ]
}

pub(super) fn parse_range(attrs: &mut Attrs) -> Result<Op, String> {
    Ok(Op::Range {
        start: attrs.dim("start")?,
        step: attrs.int("step")?,
        len: attrs.dim("len")?,
        dtype: attrs.dtype("dtype")?,
    })
}

pub(super) fn infer_range(
    operands: &[&TensorType],
    start: &Dim,
    step: i64,
    len: &Dim,
    dtype: DType,
) -> Result<TensorType, String> {
    expect_arity(operands, 0, 0)?;
    if dtype == DType::Bool {
        return Err("range cannot produce bool".into());
    }
    if step == 0 && *start == Dim::Const(0) && len.as_const().is_some_and(|l| l > 1) {
        return Err("range step must not be 0".into());
    }
    Ok(TensorType::new(dtype, Shape(vec![len.clone()])))
}

pub(super) fn eval_range(
    start: &Dim,
    step: i64,
    dtype: DType,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let start = start.eval(ctx.bindings).map_err(|e| e.to_string())?;
    let len = ctx.out_shape[0];
    let values: Vec<i64> = (0..len as i64)
        .map(|i| start.wrapping_add(i.wrapping_mul(step)))
        .collect();
    Ok(Tensor::from_i64s(dtype, vec![len], values))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn fill_broadcasts_its_value_over_symbolic_dims() {
        let op = Op::Fill {
            value: Scalar::float(-0.5),
            dtype: DType::F32,
            shape: Shape(vec![Dim::sym("seq"), Dim::Const(2)]),
        };
        let bindings = HashMap::from([("seq".to_string(), 3)]);
        let out = eval_with(&op, &[], &bindings).unwrap();
        assert_eq!(out.shape(), [3, 2]);
        assert_eq!(f32s(&out), [-0.5; 6]);
        let ints = Op::Fill {
            value: Scalar::Int(7),
            dtype: DType::I64,
            shape: Shape::fixed(&[2]),
        };
        assert_eq!(eval(&ints, &[]).unwrap().to_i64s(), [7, 7]);
    }

    #[test]
    fn range_counts_from_a_symbolic_start() {
        let op = Op::Range {
            start: Dim::sym("past"),
            step: 2,
            len: Dim::sym("seq"),
            dtype: DType::I64,
        };
        let bindings = HashMap::from([("seq".to_string(), 4), ("past".to_string(), 10)]);
        let out = eval_with(&op, &[], &bindings).unwrap();
        assert_eq!(out.to_i64s(), [10, 12, 14, 16]);
        let negative = Op::Range {
            start: Dim::Const(3),
            step: -1,
            len: Dim::Const(3),
            dtype: DType::F32,
        };
        assert_eq!(f32s(&eval(&negative, &[]).unwrap()), [3., 2., 1.]);
    }
}
