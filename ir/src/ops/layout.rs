//! Ops that move elements without arithmetic: transpose, reshape, expand, concat, slice,
//! gather.

use super::{
    broadcast_shapes, expect_arity, normalize_axis, AttrValue, Attrs, EvalCtx, InferCtx, Op,
    TensorType,
};
use crate::dim::{Dim, Shape};
use crate::tensor::{strides, Tensor};
use std::ops::{Add, Div, Sub};

pub(super) fn infer_transpose(
    operands: &[&TensorType],
    perm: &[usize],
) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    let x = operands[0];
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() {
        return Err(format!(
            "perm {perm:?} has {} entries for rank {}",
            perm.len(),
            x.rank()
        ));
    }
    for &p in perm {
        if p >= x.rank() || std::mem::replace(&mut seen[p], true) {
            return Err(format!(
                "perm {perm:?} is not a permutation of 0..{}",
                x.rank()
            ));
        }
    }
    let dims = perm.iter().map(|&p| x.shape.0[p].clone()).collect();
    Ok(TensorType::new(x.dtype, Shape(dims)))
}

pub(super) fn eval_transpose(x: &Tensor, perm: &[usize], ctx: EvalCtx) -> Tensor {
    take_by_coordinates(x, ctx.out_shape, |axis, i| (perm[axis], i))
}

/// Builds a tensor of `out_shape` whose element at coordinate `i` on each output `axis` is read
/// at `source(axis, i) = (input axis, input coordinate)`.
fn take_by_coordinates(
    x: &Tensor,
    out_shape: &[usize],
    source: impl Fn(usize, usize) -> (usize, usize),
) -> Tensor {
    let in_strides = strides(x.shape());
    let out_strides = strides(out_shape);
    let total: usize = out_shape.iter().product();
    let indices: Vec<usize> = (0..total)
        .map(|flat| {
            let mut rem = flat;
            let mut offset = 0;
            for (axis, &stride) in out_strides.iter().enumerate() {
                let (in_axis, in_index) = source(axis, rem / stride);
                offset += in_index * in_strides[in_axis];
                rem %= stride;
            }
            offset
        })
        .collect();
    x.take(out_shape.to_vec(), &indices)
}

fn expect_sizes(shape: &Shape) -> Result<(), String> {
    match shape.0.iter().find(|d| d.as_const().is_some_and(|v| v < 0)) {
        Some(d) => Err(format!("shape {shape} has a negative dim {d}")),
        None => Ok(()),
    }
}

pub(super) fn infer_reshape(operands: &[&TensorType], shape: &Shape) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    expect_sizes(shape)?;
    let x = operands[0];
    if !x.shape.numel().equiv(&shape.numel()) {
        return Err(format!(
            "cannot reshape {} to {shape}: element counts {} and {} differ",
            x.shape,
            x.shape.numel(),
            shape.numel()
        ));
    }
    Ok(TensorType::new(x.dtype, shape.clone()))
}

pub(super) fn infer_expand(operands: &[&TensorType], shape: &Shape) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    expect_sizes(shape)?;
    let x = operands[0];
    Ok(TensorType::new(x.dtype, broadcast_shapes(&x.shape, shape)?))
}

pub(super) fn infer_concat(operands: &[&TensorType], axis: i64) -> Result<TensorType, String> {
    if operands.is_empty() {
        return Err("concat needs at least one operand".into());
    }
    let first = operands[0];
    let axis = normalize_axis(axis, first.rank())?;
    let mut total = Dim::Const(0);
    for (i, x) in operands.iter().enumerate() {
        if x.dtype != first.dtype || x.rank() != first.rank() {
            return Err(format!("operand {i} is {x}, operand 0 is {first}"));
        }
        for (a, (d, d0)) in x.shape.0.iter().zip(&first.shape.0).enumerate() {
            if a != axis && !d.equiv(d0) {
                return Err(format!(
                    "operand {i} is {x}, operand 0 is {first}: axis {a} differs"
                ));
            }
        }
        total = Dim::add(total, x.shape.0[axis].clone());
    }
    let mut dims = first.shape.0.clone();
    dims[axis] = total;
    Ok(TensorType::new(first.dtype, Shape(dims)))
}

pub(super) fn eval_concat(operands: &[&Tensor], axis: i64, ctx: EvalCtx) -> Result<Tensor, String> {
    let axis = normalize_axis(axis, ctx.out_shape.len())?;
    let outer: usize = ctx.out_shape[..axis].iter().product();
    let parts: Vec<(Vec<u8>, usize)> = operands
        .iter()
        .map(|x| {
            (
                x.to_le_bytes(),
                x.shape()[axis..].iter().product::<usize>() * x.dtype().size_bytes(),
            )
        })
        .collect();
    let mut bytes = Vec::new();
    for o in 0..outer {
        for (data, row) in &parts {
            bytes.extend_from_slice(&data[o * row..(o + 1) * row]);
        }
    }
    Tensor::from_le_bytes(operands[0].dtype(), ctx.out_shape.to_vec(), &bytes)
        .map_err(|e| e.to_string())
}

pub(super) fn slice_attrs(
    axis: i64,
    start: &Dim,
    end: &Dim,
    step: i64,
) -> Vec<(&'static str, AttrValue)> {
    vec![
        ("axis", AttrValue::int(axis)),
        ("start", AttrValue::Dim(start.clone())),
        ("end", AttrValue::Dim(end.clone())),
        ("step", AttrValue::int(step)),
    ]
}

pub(super) fn parse_slice(attrs: &mut Attrs) -> Result<Op, String> {
    Ok(Op::Slice {
        axis: attrs.int("axis")?,
        start: attrs.dim("start")?,
        end: attrs.dim("end")?,
        step: attrs.int("step")?,
    })
}

/// ONNX Slice on one axis of size `dim` with concrete bounds: negative bounds count from the
/// end, then clamp. Returns the first index and the element count (computed in i128, so no step
/// or bound overflows).
fn resolve_slice(start: i64, end: i64, step: i64, dim: i64) -> (i64, i64) {
    let (start, end, step, dim) = (
        i128::from(start),
        i128::from(end),
        i128::from(step),
        i128::from(dim.max(0)),
    );
    let from_end = |v: i128| if v < 0 { v + dim } else { v };
    let (start, end) = (from_end(start), from_end(end));
    let (first, len) = if dim == 0 {
        (0, 0)
    } else if step > 0 {
        let (start, end) = (start.clamp(0, dim), end.clamp(0, dim));
        (start, ((end - start).max(0) + step - 1) / step)
    } else {
        let (start, end) = (start.clamp(0, dim - 1), end.clamp(-1, dim - 1));
        (start, ((start - end).max(0) + (-step) - 1) / (-step))
    };
    // Both are at most `dim`, which came from an i64.
    (first as i64, len as i64)
}

pub(super) fn infer_slice(
    operands: &[&TensorType],
    axis: i64,
    start: &Dim,
    end: &Dim,
    step: i64,
    ctx: InferCtx,
) -> Result<TensorType, String> {
    expect_arity(operands, 1, 1)?;
    let x = operands[0];
    let axis_index = normalize_axis(axis, x.rank())?;
    if step == 0 {
        return Err("slice step must not be 0".into());
    }
    let dim = &x.shape.0[axis_index];
    let len = match (start.as_const(), end.as_const(), dim.as_const()) {
        (Some(s), Some(e), Some(d)) => Dim::Const(resolve_slice(s, e, step, d).1),
        _ => symbolic_slice_len(start, end, step, dim, ctx)?,
    };
    let mut dims = x.shape.0.clone();
    dims[axis_index] = len;
    Ok(TensorType::new(x.dtype, Shape(dims)))
}

/// With symbolic bounds or dims, the length is `ceil((end - start) / step)` once
/// `0 <= start <= end <= dim` is proven from the symbols' maxima (so clamping is a no-op).
fn symbolic_slice_len(
    start: &Dim,
    end: &Dim,
    step: i64,
    dim: &Dim,
    ctx: InferCtx,
) -> Result<Dim, String> {
    let from_end = |d: &Dim| match d.as_const() {
        Some(v) if v < 0 => Dim::add(dim.clone(), d.clone()),
        _ => d.clone(),
    };
    let (first, last) = (from_end(start), from_end(end));
    let nonnegative = |d: &Dim| d.bounds(ctx.maxima).is_some_and(|(lo, _)| lo >= 0);
    let proven = step > 0
        && nonnegative(&first)
        && nonnegative(&Dim::sub(last.clone(), first.clone()))
        && nonnegative(&Dim::sub(dim.clone(), last.clone()));
    if !proven {
        return Err(format!(
            "cannot prove slice {start}..{end} step {step} lies within dim {dim}; bind the dims or \
             give the symbols smaller maxima"
        ));
    }
    let span = Dim::sub(last, first);
    let len = Dim::div(Dim::add(span, Dim::Const(step - 1)), Dim::Const(step));
    Ok(len.as_const_equiv().map_or(len, Dim::Const))
}

pub(super) fn eval_slice(
    x: &Tensor,
    axis: i64,
    start: &Dim,
    end: &Dim,
    step: i64,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let axis = normalize_axis(axis, x.shape().len())?;
    let eval = |d: &Dim| d.eval(ctx.bindings).map_err(|e| e.to_string());
    let dim = x.shape()[axis];
    let (first, len) = resolve_slice(eval(start)?, eval(end)?, step, dim as i64);
    if len as usize != ctx.out_shape[axis] {
        return Err(format!(
            "slice {start}..{end} step {step} of dim {dim} gives {len} elements, the type says {}",
            ctx.out_shape[axis]
        ));
    }
    Ok(take_by_coordinates(x, ctx.out_shape, |a, i| {
        let index = if a == axis {
            (first + i as i64 * step) as usize
        } else {
            i
        };
        (a, index)
    }))
}

pub(super) fn infer_gather(operands: &[&TensorType], axis: i64) -> Result<TensorType, String> {
    expect_arity(operands, 2, 2)?;
    let (data, indices) = (operands[0], operands[1]);
    if !indices.dtype.is_int() {
        return Err(format!("gather indices must be integers, got {indices}"));
    }
    let axis = normalize_axis(axis, data.rank())?;
    let mut dims = data.shape.0[..axis].to_vec();
    dims.extend(indices.shape.0.iter().cloned());
    dims.extend(data.shape.0[axis + 1..].iter().cloned());
    Ok(TensorType::new(data.dtype, Shape(dims)))
}

pub(super) fn eval_gather(
    data: &Tensor,
    indices: &Tensor,
    axis: i64,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let axis = normalize_axis(axis, data.shape().len())?;
    let dim = data.shape()[axis];
    let outer: usize = data.shape()[..axis].iter().product();
    let inner: usize = data.shape()[axis + 1..].iter().product();
    let picks = indices
        .to_i64s()
        .into_iter()
        .map(|i| {
            let resolved = if i < 0 { i + dim as i64 } else { i };
            usize::try_from(resolved)
                .ok()
                .filter(|&r| r < dim)
                .ok_or_else(|| format!("gather index {i} is out of range for axis of size {dim}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut flat = Vec::with_capacity(outer * picks.len() * inner);
    for o in 0..outer {
        for &p in &picks {
            let base = (o * dim + p) * inner;
            flat.extend(base..base + inner);
        }
    }
    Ok(data.take(ctx.out_shape.to_vec(), &flat))
}

pub(super) fn infer_gather_nd(
    operands: &[&TensorType],
    batch_dims: usize,
) -> Result<TensorType, String> {
    expect_arity(operands, 2, 2)?;
    let (data, indices) = (operands[0], operands[1]);
    if !indices.dtype.is_int() || indices.rank() < 1 {
        return Err(format!(
            "gather_nd indices must be integers of rank >= 1, got {indices}"
        ));
    }
    let tuple = indices.shape.0[indices.rank() - 1]
        .as_const()
        .ok_or_else(|| format!("gather_nd needs a constant index length, got {indices}"))?;
    let tuple = usize::try_from(tuple)
        .map_err(|_| format!("gather_nd index length {tuple} is negative"))?;
    if batch_dims >= indices.rank() || batch_dims.saturating_add(tuple) > data.rank() || tuple == 0
    {
        return Err(format!("gather_nd of {data} with indices {indices} and batch_dims {batch_dims} is out of range"));
    }
    for axis in 0..batch_dims {
        if !data.shape.0[axis].equiv(&indices.shape.0[axis]) {
            return Err(format!(
                "gather_nd batch axis {axis} differs: {data} vs {indices}"
            ));
        }
    }
    let mut dims = indices.shape.0[..indices.rank() - 1].to_vec();
    dims.extend(data.shape.0[batch_dims + tuple..].iter().cloned());
    Ok(TensorType::new(data.dtype, Shape(dims)))
}

pub(super) fn eval_gather_nd(
    data: &Tensor,
    indices: &Tensor,
    batch_dims: usize,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let tuple = indices.shape()[indices.shape().len() - 1];
    let batch: usize = data.shape()[..batch_dims].iter().product();
    let indexed = &data.shape()[batch_dims..batch_dims + tuple];
    let slice: usize = data.shape()[batch_dims + tuple..].iter().product();
    let per_batch_data: usize = data.shape()[batch_dims..].iter().product();
    let index_values = indices.to_i64s();
    let lookups = index_values.len() / tuple.max(1);
    let per_batch_lookups = lookups / batch.max(1);
    let mut flat = Vec::with_capacity(lookups * slice);
    for (n, index) in index_values.chunks(tuple).enumerate() {
        let mut offset = 0usize;
        for (axis, (&i, &dim)) in index.iter().zip(indexed).enumerate() {
            let resolved = if i < 0 { i + dim as i64 } else { i };
            let resolved = usize::try_from(resolved)
                .ok()
                .filter(|&r| r < dim)
                .ok_or_else(|| {
                    format!(
                        "gather_nd index {i} is out of range for axis {} of size {dim}",
                        batch_dims + axis
                    )
                })?;
            offset = offset * dim + resolved;
        }
        let base = (n / per_batch_lookups.max(1)) * per_batch_data + offset * slice;
        flat.extend(base..base + slice);
    }
    Ok(data.take(ctx.out_shape.to_vec(), &flat))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::dtype::DType;
    use std::collections::HashMap;
    use std::ops::Mul;

    fn iota(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::f32(dims, (0..n).map(|v| v as f32).collect()).unwrap()
    }

    #[test]
    fn transpose_by_hand() {
        // [[0, 1, 2], [3, 4, 5]]^T = [[0, 3], [1, 4], [2, 5]]
        let out = eval(&Op::Transpose { perm: vec![1, 0] }, &[iota(&[2, 3])]).unwrap();
        assert_eq!(out.shape(), [3, 2]);
        assert_eq!(f32s(&out), [0., 3., 1., 4., 2., 5.]);
        // [1, 2, 3] with perm [2, 0, 1]: out[k, 0, j] = in[0, j, k].
        let out = eval(
            &Op::Transpose {
                perm: vec![2, 0, 1],
            },
            &[iota(&[1, 2, 3])],
        )
        .unwrap();
        assert_eq!(out.shape(), [3, 1, 2]);
        assert_eq!(f32s(&out), [0., 3., 1., 4., 2., 5.]);
        assert!(infer(
            &Op::Transpose { perm: vec![0, 0] },
            &[ty(DType::F32, &["2", "2"])]
        )
        .is_err());
    }

    #[test]
    fn reshape_checks_symbolic_element_counts() {
        let op = Op::Reshape {
            shape: Shape(vec![
                Dim::sym("batch"),
                Dim::sym("seq"),
                Dim::Const(2),
                Dim::Const(8),
            ]),
        };
        let out = infer(&op, &[ty(DType::F32, &["batch", "seq", "16"])]).unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, 2, 8]");
        let err = infer(&op, &[ty(DType::F32, &["batch", "seq", "15"])]).unwrap_err();
        assert!(err.contains("element counts"), "{err}");
        let flat = Op::Reshape {
            shape: Shape(vec![
                Dim::mul(Dim::sym("batch"), Dim::sym("seq")),
                Dim::Const(16),
            ]),
        };
        assert!(infer(&flat, &[ty(DType::F32, &["seq", "batch", "16"])]).is_ok());
        let fixed = Op::Reshape {
            shape: Shape::fixed(&[1, 2, 2, 8]),
        };
        let out = eval(&fixed, &[iota(&[1, 2, 16])]).unwrap();
        assert_eq!(out.shape(), [1, 2, 2, 8]);
        assert_eq!(f32s(&out)[17], 17.0);
    }

    #[test]
    fn expand_broadcasts_both_ways() {
        let op = Op::Expand {
            shape: Shape::fixed(&[2, 1, 3]),
        };
        let out = eval(&op, &[Tensor::f32(&[2, 1], vec![1., 2.]).unwrap()]).unwrap();
        assert_eq!(out.shape(), [2, 2, 3]);
        assert_eq!(f32s(&out), [1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2.]);
    }

    #[test]
    fn concat_by_hand() {
        let a = Tensor::f32(&[2, 1], vec![1., 2.]).unwrap();
        let b = Tensor::f32(&[2, 2], vec![3., 4., 5., 6.]).unwrap();
        let out = eval(&Op::Concat { axis: -1 }, &[a.clone(), b]).unwrap();
        assert_eq!(f32s(&out), [1., 3., 4., 2., 5., 6.]);
        let out = eval(&Op::Concat { axis: 0 }, &[a.clone(), a]).unwrap();
        assert_eq!(
            (out.shape(), f32s(&out)),
            (&[4, 1][..], vec![1., 2., 1., 2.])
        );
        let sym = infer(
            &Op::Concat { axis: 1 },
            &[
                ty(DType::F32, &["1", "past", "4"]),
                ty(DType::F32, &["1", "seq", "4"]),
            ],
        );
        assert_eq!(sym.unwrap().to_string(), "f32[1, past+seq, 4]");
        assert!(infer(
            &Op::Concat { axis: 0 },
            &[ty(DType::F32, &["1", "2"]), ty(DType::F32, &["1", "3"])]
        )
        .is_err());
    }

    fn slice(axis: i64, start: impl Into<Dim>, end: impl Into<Dim>, step: i64) -> Op {
        Op::Slice {
            axis,
            start: start.into(),
            end: end.into(),
            step,
        }
    }

    #[test]
    fn slice_follows_onnx_semantics() {
        let x = iota(&[10]);
        let run = |op: Op| f32s(&eval(&op, std::slice::from_ref(&x)).unwrap());
        assert_eq!(run(slice(0, 2i64, 5i64, 1)), [2., 3., 4.]);
        assert_eq!(run(slice(0, -3i64, 100i64, 1)), [7., 8., 9.]);
        assert_eq!(run(slice(0, 1i64, 8i64, 3)), [1., 4., 7.]);
        assert_eq!(run(slice(0, -1i64, -100i64, -4)), [9., 5., 1.]);
        assert_eq!(run(slice(0, 5i64, 2i64, 1)), [] as [f32; 0]);
        // Regression (found by the round-trip property test): a reversed slice of an empty axis.
        let empty = eval(&slice(0, 0i64, -1i64, -1), &[iota(&[0])]).unwrap();
        assert_eq!(empty.shape(), [0]);
        let rows = eval(&slice(-2, 1i64, 2i64, 1), &[iota(&[3, 2])]).unwrap();
        assert_eq!((rows.shape(), f32s(&rows)), (&[1, 2][..], vec![2., 3.]));
    }

    #[test]
    fn symbolic_slice_needs_a_proof() {
        // position_ids[:, :seq] of a [1, 512] buffer, with seq <= 512.
        let op = slice(1, 0i64, "seq", 1);
        let out = infer(&op, &[ty(DType::I64, &["1", "512"])]).unwrap();
        assert_eq!(out.to_string(), "i64[1, seq]");
        let err = infer(&op, &[ty(DType::I64, &["1", "100"])]).unwrap_err();
        assert!(err.contains("cannot prove"), "{err}");
        let tail = infer(&slice(1, -1i64, "seq", 1), &[ty(DType::F32, &["2", "seq"])]).unwrap();
        assert_eq!(tail.to_string(), "f32[2, 1]");
        let bindings = HashMap::from([("seq".to_string(), 3)]);
        let buffer = Tensor::i64(&[1, 5], vec![0, 1, 2, 3, 4]).unwrap();
        let out = eval_with(&op, &[buffer], &bindings).unwrap();
        assert_eq!((out.shape(), out.to_i64s()), (&[1, 3][..], vec![0, 1, 2]));
    }

    #[test]
    fn gather_nd_by_hand() {
        // data [[0, 1], [2, 3]]: tuples (1, 0) and (0, 1) pick 2 and 1; a 1-tuple picks a row.
        let data = iota(&[2, 2]);
        let pairs = Tensor::i64(&[2, 2], vec![1, 0, 0, 1]).unwrap();
        let out = eval(&Op::GatherNd { batch_dims: 0 }, &[data.clone(), pairs]).unwrap();
        assert_eq!((out.shape(), f32s(&out)), (&[2][..], vec![2., 1.]));
        let rows = Tensor::i64(&[1, 1], vec![-1]).unwrap();
        let out = eval(&Op::GatherNd { batch_dims: 0 }, &[data.clone(), rows]).unwrap();
        assert_eq!((out.shape(), f32s(&out)), (&[1, 2][..], vec![2., 3.]));
        // batch_dims 1: each batch row indexes its own slice.
        let per_batch = Tensor::i64(&[2, 1], vec![1, 0]).unwrap();
        let out = eval(&Op::GatherNd { batch_dims: 1 }, &[data, per_batch]).unwrap();
        assert_eq!((out.shape(), f32s(&out)), (&[2][..], vec![1., 2.]));
    }

    #[test]
    fn gather_by_hand() {
        // Embedding lookup: table [4, 2], ids [[3, 0], [-1, 1]].
        let table = iota(&[4, 2]);
        let ids = Tensor::i64(&[2, 2], vec![3, 0, -1, 1]).unwrap();
        let out = eval(&Op::Gather { axis: 0 }, &[table.clone(), ids]).unwrap();
        assert_eq!(out.shape(), [2, 2, 2]);
        assert_eq!(f32s(&out), [6., 7., 0., 1., 6., 7., 2., 3.]);
        // Gather along axis 1 with a scalar index drops the axis.
        let scalar = Tensor::i64(&[], vec![1]).unwrap();
        let out = eval(&Op::Gather { axis: 1 }, &[table.clone(), scalar]).unwrap();
        assert_eq!((out.shape(), f32s(&out)), (&[4][..], vec![1., 3., 5., 7.]));
        let bad = Tensor::i64(&[1], vec![4]).unwrap();
        let err = eval(&Op::Gather { axis: 0 }, &[table, bad]).unwrap_err();
        assert_eq!(err, "gather index 4 is out of range for axis of size 4");
    }
}
