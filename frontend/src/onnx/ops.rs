//! One import function per ONNX op type, and the table that names them.

use super::{node_label, tensor, Importer, SymInts, Val};
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{DType, Dim, Op, Scalar, Shape, Tensor, F32};
use onnx_protobuf::{AttributeProto, NodeProto};
use std::collections::BTreeMap;
use std::ops::{Add, Div, Mul, Sub};

type Outputs = Result<Vec<Val>, String>;
type Handler = fn(&mut Importer, &NodeProto, &[Val]) -> Outputs;

/// The import function for an op type of the default domain.
fn handler(op_type: &str) -> Option<Handler> {
    Some(match op_type {
        "Identity" => identity,
        "Dropout" => dropout,
        "Constant" => constant,
        "Shape" => shape,
        "Gather" => gather,
        "GatherND" => gather_nd,
        "Unsqueeze" => unsqueeze,
        "Squeeze" => squeeze,
        "Concat" => concat,
        "Reshape" => reshape,
        "Flatten" => flatten,
        "Expand" => expand,
        "ConstantOfShape" => constant_of_shape,
        "Range" => range,
        "Slice" => slice,
        "Split" => split,
        "Transpose" => transpose,
        "Cast" => cast,
        "CastLike" => cast_like,
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "LessOrEqual" | "Greater"
        | "GreaterOrEqual" | "And" | "Or" | "Xor" => binary,
        "Max" | "Min" => min_max,
        "Where" => where_,
        "Not" => not,
        "IsNaN" => is_nan,
        "Neg" | "Abs" | "Relu" | "Exp" | "Log" | "Sqrt" | "Reciprocal" | "Erf" | "Tanh"
        | "Sigmoid" | "Sin" | "Cos" => unary,
        "Gelu" => gelu,
        "Floor" | "Ceil" | "Round" | "Sign" => unary,
        "Mod" => modulo,
        "ArgMax" | "ArgMin" => arg,
        "Size" => size,
        "LogSoftmax" => log_softmax,
        "Trilu" => trilu,
        "Tile" => tile,
        "ReduceL1" | "ReduceL2" | "ReduceSumSquare" | "ReduceLogSum" | "ReduceLogSumExp" => {
            reduce_composite
        }
        "Sum" | "Mean" => sum_mean,
        "LeakyRelu" | "HardSigmoid" | "HardSwish" | "Softplus" | "Softsign" | "Elu" | "Selu"
        | "Celu" | "ThresholdedRelu" | "PRelu" => activation,
        "RMSNormalization" => rms_norm,
        "MatMul" => matmul,
        "Gemm" => gemm,
        "Softmax" => softmax,
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" => reduce,
        "LayerNormalization" => layer_norm,
        "Clip" => clip,
        "DequantizeLinear" => dequantize_linear,
        _ => return None,
    })
}

/// Op types (with their domain when not the default) that have no import function, each with
/// the names of its nodes.
pub(super) fn unsupported(nodes: &[NodeProto]) -> BTreeMap<String, Vec<String>> {
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in nodes {
        let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        if !default_domain || handler(&node.op_type).is_none() {
            let key = if default_domain {
                node.op_type.clone()
            } else {
                format!("{}.{}", node.domain, node.op_type)
            };
            missing
                .entry(key)
                .or_default()
                .push(node_label(node).to_string());
        }
    }
    missing
}

pub(super) fn import(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let handler = handler(&node.op_type).ok_or("unsupported op")?;
    handler(imp, node, inputs)
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_str(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

fn input(inputs: &[Val], i: usize) -> &Val {
    inputs.get(i).unwrap_or(&Val::Absent)
}

fn present(inputs: &[Val], i: usize) -> bool {
    !matches!(input(inputs, i), Val::Absent)
}

/// The longest float `Range` evaluated at import time.
const MAX_FOLDED_RANGE: usize = 1 << 24;

/// The single value of a known scalar (or one-element) tensor.
fn first_f64(t: &Tensor) -> Result<f64, String> {
    t.to_f64s()
        .first()
        .copied()
        .ok_or_else(|| "expected one value, got an empty tensor".to_string())
}

/// The first `n` inputs, all present.
fn operands(inputs: &[Val], n: usize) -> Result<&[Val], String> {
    match inputs.get(..n) {
        Some(first) if !first.iter().any(|v| matches!(v, Val::Absent)) => Ok(first),
        _ => Err(format!("expects at least {n} inputs, got {}", inputs.len())),
    }
}

fn name(node: &NodeProto) -> String {
    node_label(node).to_string()
}

/// Integer values that must be known at compile time (shapes, axes, bounds).
fn known_ints(imp: &Importer, val: &Val, what: &str) -> Result<SymInts, String> {
    imp.ints(val)
        .ok_or_else(|| format!("input `{what}` must be computable at compile time"))
}

/// Known integers that must also be constants (axes, steps, perms).
fn const_ints(imp: &Importer, val: &Val, what: &str) -> Result<Vec<i64>, String> {
    known_ints(imp, val, what)?
        .values
        .iter()
        .map(|d| {
            d.as_const()
                .ok_or_else(|| format!("input `{what}` must be constant, got `{d}`"))
        })
        .collect()
}

/// Axes from the `axes` input (newer opsets) or attribute (older ones).
fn axes_of(
    imp: &Importer,
    node: &NodeProto,
    inputs: &[Val],
    input_index: usize,
) -> Result<Option<Vec<i64>>, String> {
    if present(inputs, input_index) {
        return const_ints(imp, input(inputs, input_index), "axes").map(Some);
    }
    Ok(attr_ints(node, "axes"))
}

fn identity(_: &mut Importer, _: &NodeProto, inputs: &[Val]) -> Outputs {
    Ok(vec![input(inputs, 0).clone()])
}

/// Inference-mode dropout: the identity, with an all-true mask when one is requested.
fn dropout(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0).clone();
    let training = match input(inputs, 2) {
        Val::Absent => false,
        v => imp
            .known(v)
            .map(|t| first_f64(&t).map(|v| v != 0.0))
            .ok_or("`training_mode` must be known at compile time")??,
    };
    let ratio = imp
        .known(input(inputs, 1))
        .map_or(Ok(0.5), |t| first_f64(&t))?;
    if training && ratio != 0.0 {
        return Err("Dropout in training mode is not supported".into());
    }
    let mut outputs = vec![x.clone()];
    if node.output.get(1).is_some_and(|o| !o.is_empty()) {
        let shape = imp.ty(&x)?.shape;
        outputs.push(imp.emit(
            &format!("{}.mask", name(node)),
            Op::Fill {
                value: Scalar::Bool(true),
                dtype: DType::Bool,
                shape,
            },
            &[],
        )?);
    }
    Ok(outputs)
}

fn constant(imp: &mut Importer, node: &NodeProto, _: &[Val]) -> Outputs {
    let a = node
        .attribute
        .first()
        .ok_or("Constant has no value attribute")?;
    let t = match a.name.as_str() {
        "value" => {
            let proto = a.t.as_ref().ok_or("`value` holds no tensor")?;
            let weight = tensor::weight_of(proto, &imp.dir, &mut Default::default())?;
            tensor::tensor_of(&weight)?
        }
        "value_float" => Tensor::f32(&[], vec![a.f]).map_err(|e| e.0)?,
        "value_floats" => Tensor::f32(&[a.floats.len()], a.floats.clone()).map_err(|e| e.0)?,
        "value_int" => Tensor::i64(&[], vec![a.i]).map_err(|e| e.0)?,
        "value_ints" => Tensor::i64(&[a.ints.len()], a.ints.clone()).map_err(|e| e.0)?,
        other => return Err(format!("Constant attribute `{other}` is not supported")),
    };
    if t.numel() <= super::FOLD_LIMIT {
        return Ok(vec![Val::Static(t)]);
    }
    let id = imp.constant(&name(node), &t)?;
    Ok(vec![Val::Node(id)])
}

fn shape(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let dims = imp.ty(input(inputs, 0))?.shape.0;
    let rank = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(attr_int(node, "start", 0));
    let end = clamp(attr_int(node, "end", rank));
    let values = if start < end {
        dims[start..end].to_vec()
    } else {
        vec![]
    };
    Ok(vec![Val::Ints(SymInts::vector(values))])
}

fn gather(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let axis = attr_int(node, "axis", 0);
    let (data, indices) = (input(inputs, 0), input(inputs, 1));
    if let (Some(ints), Some(idx)) = (imp.ints(data), imp.known(indices)) {
        if ints.shape.len() == 1 && (axis == 0 || axis == -1) {
            let len = ints.values.len() as i64;
            let values = idx
                .to_i64s()
                .iter()
                .map(|&i| {
                    let at = if i < 0 { i + len } else { i };
                    usize::try_from(at)
                        .ok()
                        .and_then(|a| ints.values.get(a).cloned())
                        .ok_or_else(|| format!("index {i} is out of range for {len} values"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(vec![Val::Ints(SymInts {
                dtype: ints.dtype,
                shape: idx.shape().to_vec(),
                values,
            })]);
        }
    }
    Ok(vec![imp.emit(
        &name(node),
        Op::Gather { axis },
        &[data.clone(), indices.clone()],
    )?])
}

fn gather_nd(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let batch_dims =
        usize::try_from(attr_int(node, "batch_dims", 0)).map_err(|_| "negative batch_dims")?;
    Ok(vec![imp.emit(
        &name(node),
        Op::GatherNd { batch_dims },
        operands(inputs, 2)?,
    )?])
}

/// Reshapes a value to `dims`: static integers keep their values, others get a `reshape`.
fn reshaped(imp: &mut Importer, node_name: &str, val: &Val, dims: Vec<Dim>) -> Result<Val, String> {
    if let Some(ints) = imp.ints(val) {
        let fixed: Option<Vec<usize>> = dims
            .iter()
            .map(|d| d.as_const().and_then(|v| usize::try_from(v).ok()))
            .collect();
        if let Some(shape) = fixed {
            if shape.iter().product::<usize>() == ints.values.len() {
                return Ok(Val::Ints(SymInts { shape, ..ints }));
            }
        }
    }
    imp.emit(
        node_name,
        Op::Reshape { shape: Shape(dims) },
        std::slice::from_ref(val),
    )
}

fn resolve_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out: Vec<usize> = axes
        .iter()
        .map(|&a| {
            let r = if a < 0 { a + rank as i64 } else { a };
            usize::try_from(r)
                .ok()
                .filter(|&r| r < rank)
                .ok_or_else(|| format!("axis {a} is out of range for rank {rank}"))
        })
        .collect::<Result<_, _>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("axes {axes:?} repeat"));
    }
    Ok(out)
}

fn unsqueeze(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let axes = axes_of(imp, node, inputs, 1)?.ok_or("Unsqueeze needs axes")?;
    let axes = resolve_axes(&axes, dims.len() + axes.len())?;
    let mut out = dims.into_iter();
    let new_dims: Vec<Dim> = (0..axes.len() + out.len())
        .map(|i| {
            if axes.contains(&i) {
                Dim::Const(1)
            } else {
                out.next().unwrap_or(Dim::Const(1))
            }
        })
        .collect();
    Ok(vec![reshaped(imp, &name(node), x, new_dims)?])
}

fn squeeze(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let axes = match axes_of(imp, node, inputs, 1)? {
        Some(axes) => resolve_axes(&axes, dims.len())?,
        None => (0..dims.len())
            .filter(|&i| dims[i] == Dim::Const(1))
            .collect(),
    };
    if let Some(&bad) = axes.iter().find(|&&a| dims[a] != Dim::Const(1)) {
        return Err(format!("cannot squeeze axis {bad} of size {}", dims[bad]));
    }
    let new_dims = dims
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, d)| d)
        .collect();
    Ok(vec![reshaped(imp, &name(node), x, new_dims)?])
}

fn concat(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let axis = attr_int(node, "axis", 0);
    let parts: Vec<Val> = inputs
        .iter()
        .filter(|v| !matches!(v, Val::Absent))
        .cloned()
        .collect();
    if parts.is_empty() {
        return Err("Concat needs at least one input".into());
    }
    let ints: Option<Vec<SymInts>> = parts.iter().map(|v| imp.ints(v)).collect();
    if let Some(ints) = ints {
        let total: usize = ints.iter().map(|i| i.values.len()).sum();
        if ints.iter().all(|i| i.shape.len() == 1)
            && (axis == 0 || axis == -1)
            && total <= super::FOLD_LIMIT
        {
            let values: Vec<Dim> = ints.iter().flat_map(|i| i.values.iter().cloned()).collect();
            return Ok(vec![Val::Ints(SymInts {
                dtype: ints[0].dtype,
                shape: vec![values.len()],
                values,
            })]);
        }
    }
    Ok(vec![imp.emit(&name(node), Op::Concat { axis }, &parts)?])
}

fn reshape(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let target = known_ints(imp, input(inputs, 1), "shape")?.values;
    let allow_zero = attr_int(node, "allowzero", 0) == 1;
    let mut resolved = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, d) in target.iter().enumerate() {
        match d.as_const() {
            Some(0) if !allow_zero => resolved.push(
                dims.get(i)
                    .cloned()
                    .ok_or(format!("shape entry {i} copies a missing input axis"))?,
            ),
            Some(-1) => {
                if infer_at.replace(i).is_some() {
                    return Err("shape has more than one -1".into());
                }
                resolved.push(Dim::Const(1));
            }
            Some(v) if v < -1 => return Err(format!("shape entry {v} is invalid")),
            _ => resolved.push(d.clone()),
        }
    }
    if let Some(i) = infer_at {
        let known = Dim::product(&resolved);
        let total = Dim::product(&dims);
        resolved[i] = exact_div(&total, &known).ok_or_else(|| {
            format!("cannot infer the -1 in {target:?}: {total} is not a multiple of {known}")
        })?;
    }
    Ok(vec![reshaped(imp, &name(node), x, resolved)?])
}

/// `a / b` when it divides exactly: constants, or monomials whose symbols cancel.
fn exact_div(a: &Dim, b: &Dim) -> Option<Dim> {
    fn factors(d: &Dim, syms: &mut Vec<String>) -> Option<i64> {
        match d {
            Dim::Const(v) => Some(*v),
            Dim::Sym(s) => {
                syms.push(s.clone());
                Some(1)
            }
            Dim::Mul(x, y) => Some(factors(x, syms)? * factors(y, syms)?),
            _ => None,
        }
    }
    let (mut num_syms, mut den_syms) = (Vec::new(), Vec::new());
    let (num, den) = (factors(a, &mut num_syms)?, factors(b, &mut den_syms)?);
    for s in den_syms {
        let at = num_syms.iter().position(|n| *n == s)?;
        num_syms.remove(at);
    }
    if den == 0 || num % den != 0 {
        return None;
    }
    Some(
        num_syms
            .into_iter()
            .fold(Dim::Const(num / den), |acc, s| Dim::mul(Dim::sym(s), acc)),
    )
}

fn flatten(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let axis = attr_int(node, "axis", 1);
    let axis = if axis < 0 {
        axis + dims.len() as i64
    } else {
        axis
    };
    let axis = usize::try_from(axis)
        .ok()
        .filter(|&a| a <= dims.len())
        .ok_or("axis out of range")?;
    let new_dims = vec![Dim::product(&dims[..axis]), Dim::product(&dims[axis..])];
    Ok(vec![reshaped(imp, &name(node), x, new_dims)?])
}

fn expand(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let shape = Shape(known_ints(imp, input(inputs, 1), "shape")?.values);
    Ok(vec![imp.emit(
        &name(node),
        Op::Expand { shape },
        operands(inputs, 1)?,
    )?])
}

fn constant_of_shape(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let shape = Shape(known_ints(imp, input(inputs, 0), "input")?.values);
    let value = match attr(node, "value").and_then(|a| a.t.as_ref()) {
        Some(proto) => tensor::tensor_of(&tensor::weight_of(
            proto,
            &imp.dir,
            &mut Default::default(),
        )?)?,
        None => Tensor::f32(&[1], vec![0.0]).map_err(|e| e.0)?,
    };
    let dtype = value.dtype();
    let scalar = if dtype.is_float() {
        Scalar::float(first_f64(&value)?)
    } else if dtype == DType::Bool {
        Scalar::Bool(first_f64(&value)? != 0.0)
    } else {
        Scalar::Int(*value.to_i64s().first().ok_or("`value` is empty")?)
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Fill {
            value: scalar,
            dtype,
            shape,
        },
        &[],
    )?])
}

fn range(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let dtype = imp.ty(input(inputs, 0))?.dtype;
    if dtype.is_float() {
        let get = |i: usize| {
            imp.known(input(inputs, i))
                .map(|t| first_f64(&t))
                .ok_or("float Range inputs must be known at compile time")?
        };
        let (start, limit, delta) = (get(0)?, get(1)?, get(2)?);
        let len = ((limit - start) / delta).ceil().max(0.0);
        if !len.is_finite() || len > MAX_FOLDED_RANGE as f64 {
            return Err(format!(
                "a float Range of {len} elements is not supported (at most {MAX_FOLDED_RANGE})"
            ));
        }
        let len = len as usize;
        let values = (0..len).map(|i| start + i as f64 * delta).collect();
        return Ok(vec![Val::Static(Tensor::from_f64s(
            dtype,
            vec![len],
            values,
        ))]);
    }
    let scalar = |imp: &Importer, i: usize, what: &str| -> Result<Dim, String> {
        let ints = known_ints(imp, input(inputs, i), what)?;
        ints.values
            .first()
            .cloned()
            .filter(|_| ints.values.len() == 1)
            .ok_or(format!("`{what}` must be a scalar"))
    };
    let start = scalar(imp, 0, "start")?;
    let limit = scalar(imp, 1, "limit")?;
    let delta = scalar(imp, 2, "delta")?
        .as_const()
        .ok_or("`delta` must be constant")?;
    if delta == 0 {
        return Err("`delta` must not be 0".into());
    }
    // ceil(span / delta) with a non-negative divisor: for negative steps the span is negated.
    let (span, stride) = if delta > 0 {
        (Dim::sub(limit, start.clone()), delta)
    } else {
        (
            Dim::sub(start.clone(), limit),
            delta.checked_neg().ok_or("`delta` overflows")?,
        )
    };
    let len = if stride == 1 {
        span
    } else {
        Dim::div(Dim::add(span, Dim::Const(stride - 1)), Dim::Const(stride))
    };
    let len = len.as_const_equiv().map_or(len, |v| Dim::Const(v.max(0)));
    Ok(vec![imp.emit(
        &name(node),
        Op::Range {
            start,
            step: delta,
            len,
            dtype,
        },
        &[],
    )?])
}

fn slice(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let starts = known_ints(imp, input(inputs, 1), "starts")?.values;
    let ends = known_ints(imp, input(inputs, 2), "ends")?.values;
    let axes = if present(inputs, 3) {
        const_ints(imp, input(inputs, 3), "axes")?
    } else {
        (0..starts.len() as i64).collect()
    };
    let steps = if present(inputs, 4) {
        const_ints(imp, input(inputs, 4), "steps")?
    } else {
        vec![1; starts.len()]
    };
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    // Exporters write "to the end" as i64 extremes; with a symbolic axis that is the dim itself.
    let huge = |d: &Dim| d.as_const().is_some_and(|v| v >= 1 << 40);
    if let Some(ints) = imp
        .ints(x)
        .filter(|i| i.shape.len() == 1 && axes.len() == 1)
    {
        let len = ints.values.len() as i64;
        if let (Some(s), Some(e)) = (starts[0].as_const(), ends[0].as_const()) {
            let probe = Tensor::from_i64s(DType::I64, vec![len as usize], (0..len).collect());
            let picked = Op::Slice {
                axis: 0,
                start: Dim::Const(s),
                end: Dim::Const(e),
                step: steps[0],
            }
            .evaluate_fixed(&[&probe], super::FOLD_LIMIT)?;
            let values = picked
                .to_i64s()
                .iter()
                .map(|&i| ints.values[i as usize].clone())
                .collect::<Vec<_>>();
            return Ok(vec![Val::Ints(SymInts::vector(values))]);
        }
    }
    let mut current = x.clone();
    for (k, (((start, end), &axis), &step)) in
        starts.iter().zip(&ends).zip(&axes).zip(&steps).enumerate()
    {
        let rank = dims.len() as i64;
        let axis_index = if axis < 0 { axis + rank } else { axis };
        let dim = usize::try_from(axis_index)
            .ok()
            .and_then(|a| dims.get(a))
            .ok_or(format!("axis {axis} is out of range"))?;
        let end = if huge(end) && step > 0 {
            dim.clone()
        } else {
            end.clone()
        };
        let start = if huge(&start.clone()) && step > 0 {
            Dim::Const(if start.as_const().unwrap_or(0) > 0 {
                i64::MAX
            } else {
                0
            })
        } else {
            start.clone()
        };
        let start = if start.as_const() == Some(i64::MAX) {
            dim.clone()
        } else {
            start
        };
        let step_name = if k + 1 == starts.len() {
            name(node)
        } else {
            format!("{}.{k}", name(node))
        };
        current = imp.emit(
            &step_name,
            Op::Slice {
                axis,
                start,
                end,
                step,
            },
            &[current],
        )?;
    }
    Ok(vec![current])
}

fn split(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0);
    let dims = imp.ty(x)?.shape.0;
    let axis = attr_int(node, "axis", 0);
    let axis_index = usize::try_from(if axis < 0 {
        axis + dims.len() as i64
    } else {
        axis
    })
    .ok()
    .filter(|&a| a < dims.len())
    .ok_or("axis out of range")?;
    let count = node.output.len();
    if count == 0 {
        return Err("Split needs at least one output".into());
    }
    let sizes: Vec<Dim> = if present(inputs, 1) {
        known_ints(imp, input(inputs, 1), "split")?.values
    } else if let Some(sizes) = attr_ints(node, "split") {
        sizes.into_iter().map(Dim::Const).collect()
    } else {
        let dim = &dims[axis_index];
        match dim.as_const() {
            Some(total) => {
                let n = count as i64;
                let chunk = (total + n - 1) / n;
                (0..n)
                    .map(|i| Dim::Const(chunk.min(total - chunk * i).max(0)))
                    .collect()
            }
            None => vec![Dim::div(dim.clone(), Dim::Const(count as i64)); count],
        }
    };
    if sizes.len() != count {
        return Err(format!("{} split sizes for {count} outputs", sizes.len()));
    }
    let mut start = Dim::Const(0);
    let mut outs = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        let end = Dim::add(start.clone(), size);
        let op = Op::Slice {
            axis,
            start: start.clone(),
            end: end.clone(),
            step: 1,
        };
        outs.push(imp.emit(&format!("{}.{i}", name(node)), op, std::slice::from_ref(x))?);
        start = end;
    }
    Ok(outs)
}

fn transpose(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let rank = imp.ty(input(inputs, 0))?.rank();
    let perm = match attr_ints(node, "perm") {
        Some(p) => p
            .into_iter()
            .map(|v| usize::try_from(v).map_err(|_| format!("perm entry {v}")))
            .collect::<Result<Vec<_>, _>>()?,
        None => (0..rank).rev().collect(),
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Transpose { perm },
        operands(inputs, 1)?,
    )?])
}

fn cast_to(imp: &mut Importer, node: &NodeProto, x: &Val, to: DType) -> Result<Val, String> {
    // Symbolic dims stay symbolic through casts to types that hold them; constants fold below.
    if let Some(ints) = imp
        .ints(x)
        .filter(|i| matches!(to, DType::I64 | DType::I32) && i.to_tensor().is_none())
    {
        return Ok(Val::Ints(SymInts { dtype: to, ..ints }));
    }
    imp.emit(&name(node), Op::Cast { to }, std::slice::from_ref(x))
}

fn cast(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let to = tensor::dtype_of(attr_int(node, "to", 1) as i32)?;
    Ok(vec![cast_to(imp, node, input(inputs, 0), to)?])
}

fn cast_like(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let to = imp.ty(input(inputs, 1))?.dtype;
    Ok(vec![cast_to(imp, node, input(inputs, 0), to)?])
}

fn binary_op(op_type: &str) -> BinaryOp {
    match op_type {
        "Add" => BinaryOp::Add,
        "Sub" => BinaryOp::Sub,
        "Mul" => BinaryOp::Mul,
        "Div" => BinaryOp::Div,
        "Pow" => BinaryOp::Pow,
        "Max" => BinaryOp::Max,
        "Min" => BinaryOp::Min,
        "Equal" => BinaryOp::Equal,
        "Less" => BinaryOp::Less,
        "LessOrEqual" => BinaryOp::LessEqual,
        "Greater" => BinaryOp::Greater,
        "GreaterOrEqual" => BinaryOp::GreaterEqual,
        "And" => BinaryOp::And,
        "Or" => BinaryOp::Or,
        _ => BinaryOp::Xor,
    }
}

/// Pairs of flat indices that numpy broadcasting combines, for small concrete shapes.
/// The broadcast dims and, per output element, the flat indices read from each side.
type Broadcast = (Vec<usize>, Vec<(usize, usize)>);

fn broadcast_pairs(a: &[usize], b: &[usize]) -> Option<Broadcast> {
    let rank = a.len().max(b.len());
    let pad = |s: &[usize]| {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (pad(a), pad(b));
    let out: Vec<usize> = pa
        .iter()
        .zip(&pb)
        .map(|(&x, &y)| {
            if x == y || y == 1 {
                Some(x)
            } else if x == 1 {
                Some(y)
            } else {
                None
            }
        })
        .collect::<Option<_>>()?;
    let total: usize = out.iter().product();
    let index = |padded: &[usize], flat: usize| {
        let mut rem = flat;
        let mut offset = 0;
        for axis in 0..rank {
            let stride: usize = out[axis + 1..].iter().product();
            let i = rem / stride;
            rem %= stride;
            let in_stride: usize = padded[axis + 1..].iter().product();
            offset += if padded[axis] == 1 { 0 } else { i * in_stride };
        }
        offset
    };
    Some((
        out.clone(),
        (0..total).map(|f| (index(&pa, f), index(&pb, f))).collect(),
    ))
}

/// `a op b` on dims: arithmetic when it stays a dim, comparisons when the symbols' ranges decide.
fn dim_binary(imp: &Importer, op: BinaryOp, a: &Dim, b: &Dim) -> Option<Result<Dim, bool>> {
    let result = dim_binary_unbounded(imp, op, a, b)?;
    match &result {
        Ok(dim) if dim_size(dim) > MAX_DIM_NODES => None,
        _ => Some(result),
    }
}

/// Dim expressions larger than this are left to run time instead of folded, so that repeated
/// arithmetic cannot grow them without bound.
const MAX_DIM_NODES: usize = 64;

fn dim_size(d: &Dim) -> usize {
    match d {
        Dim::Const(_) | Dim::Sym(_) => 1,
        Dim::Add(a, b) | Dim::Sub(a, b) | Dim::Mul(a, b) | Dim::Div(a, b) => {
            1 + dim_size(a) + dim_size(b)
        }
    }
}

fn dim_binary_unbounded(
    imp: &Importer,
    op: BinaryOp,
    a: &Dim,
    b: &Dim,
) -> Option<Result<Dim, bool>> {
    let maxima = imp.b.graph().maxima();
    let diff = Dim::sub(a.clone(), b.clone());
    let (lo, hi) = diff.bounds(&maxima)?;
    let decided = |truth: Option<bool>| truth.map(Err);
    match op {
        BinaryOp::Add => Some(Ok(Dim::add(a.clone(), b.clone()))),
        BinaryOp::Sub => Some(Ok(diff)),
        BinaryOp::Mul => Some(Ok(Dim::mul(a.clone(), b.clone()))),
        BinaryOp::Div => match (a.as_const(), b.as_const()) {
            (Some(x), Some(y)) => x.checked_div(y).map(|q| Ok(Dim::Const(q))),
            (_, Some(y)) if y > 0 => exact_div(a, b)
                .or_else(|| Some(Dim::div(a.clone(), b.clone())))
                .map(Ok),
            _ => None,
        },
        BinaryOp::Max => (lo >= 0)
            .then(|| a.clone())
            .or_else(|| (hi <= 0).then(|| b.clone()))
            .map(Ok),
        BinaryOp::Min => (lo >= 0)
            .then(|| b.clone())
            .or_else(|| (hi <= 0).then(|| a.clone()))
            .map(Ok),
        BinaryOp::Equal => decided(if lo == 0 && hi == 0 {
            Some(true)
        } else if lo > 0 || hi < 0 {
            Some(false)
        } else {
            None
        }),
        BinaryOp::Less => decided(if hi < 0 {
            Some(true)
        } else if lo >= 0 {
            Some(false)
        } else {
            None
        }),
        BinaryOp::LessEqual => decided(if hi <= 0 {
            Some(true)
        } else if lo > 0 {
            Some(false)
        } else {
            None
        }),
        BinaryOp::Greater => decided(if lo > 0 {
            Some(true)
        } else if hi <= 0 {
            Some(false)
        } else {
            None
        }),
        BinaryOp::GreaterEqual => decided(if lo >= 0 {
            Some(true)
        } else if hi < 0 {
            Some(false)
        } else {
            None
        }),
        BinaryOp::Pow
        | BinaryOp::Mod
        | BinaryOp::Rem
        | BinaryOp::And
        | BinaryOp::Or
        | BinaryOp::Xor => None,
    }
}

/// `a op b` over symbolic integer tensors, when every element can be decided.
fn sym_binary(imp: &Importer, op: BinaryOp, a: &SymInts, b: &SymInts) -> Option<Val> {
    let (shape, pairs) = broadcast_pairs(&a.shape, &b.shape)?;
    let results: Vec<Result<Dim, bool>> = pairs
        .iter()
        .map(|&(i, j)| dim_binary(imp, op, &a.values[i], &b.values[j]))
        .collect::<Option<_>>()?;
    if results.iter().all(Result::is_err) {
        let bools = results
            .into_iter()
            .map(|r| r.err().unwrap_or(false))
            .collect();
        return Some(Val::Static(Tensor::from_bools(shape, bools)));
    }
    let values: Vec<Dim> = results.into_iter().collect::<Result<_, _>>().ok()?;
    Some(Val::Ints(SymInts {
        dtype: a.dtype,
        shape,
        values,
    }))
}

fn binary_on(
    imp: &mut Importer,
    node_name: &str,
    op: BinaryOp,
    a: &Val,
    b: &Val,
) -> Result<Val, String> {
    if let (Some(x), Some(y)) = (imp.ints(a), imp.ints(b)) {
        let symbolic = x.to_tensor().is_none() || y.to_tensor().is_none();
        if symbolic {
            if let Some(val) = sym_binary(imp, op, &x, &y) {
                return Ok(val);
            }
        }
    }
    imp.emit(node_name, Op::Binary(op), &[a.clone(), b.clone()])
}

fn binary(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = binary_op(&node.op_type);
    let (a, b) = (input(inputs, 0), input(inputs, 1));
    if op == BinaryOp::Pow {
        return Ok(vec![pow(imp, node, a, b)?]);
    }
    Ok(vec![binary_on(imp, &name(node), op, a, b)?])
}

/// ONNX `Pow` lets the exponent's type differ from the base's; the result has the base's type.
fn pow(imp: &mut Importer, node: &NodeProto, base: &Val, exponent: &Val) -> Result<Val, String> {
    let n = name(node);
    let (base_ty, exp_ty) = (imp.ty(base)?.dtype, imp.ty(exponent)?.dtype);
    if base_ty == exp_ty {
        return binary_on(imp, &n, BinaryOp::Pow, base, exponent);
    }
    if base_ty.is_float() {
        let exponent = imp.emit(
            &format!("{n}.exponent"),
            Op::Cast { to: base_ty },
            std::slice::from_ref(exponent),
        )?;
        return binary_on(imp, &n, BinaryOp::Pow, base, &exponent);
    }
    let wide = imp.emit(
        &format!("{n}.base"),
        Op::Cast { to: exp_ty },
        std::slice::from_ref(base),
    )?;
    let power = binary_on(imp, &format!("{n}.power"), BinaryOp::Pow, &wide, exponent)?;
    imp.emit(&n, Op::Cast { to: base_ty }, &[power])
}

fn min_max(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = binary_op(&node.op_type);
    let mut acc = input(inputs, 0).clone();
    for (i, next) in inputs.iter().enumerate().skip(1) {
        let step_name = if i + 1 == inputs.len() {
            name(node)
        } else {
            format!("{}.{i}", name(node))
        };
        acc = binary_on(imp, &step_name, op, &acc, next)?;
    }
    Ok(vec![acc])
}

fn where_(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let (cond, x, y) = (input(inputs, 0), input(inputs, 1), input(inputs, 2));
    if let (Some(c), Some(xs), Some(ys)) = (imp.known(cond), imp.ints(x), imp.ints(y)) {
        if let Some((shape, pairs)) = broadcast_pairs(c.shape(), &xs.shape)
            .filter(|(s, _)| broadcast_pairs(s, &ys.shape).is_some())
        {
            let (shape, outer) = broadcast_pairs(&shape, &ys.shape).unwrap_or((shape, vec![]));
            let bools = c.to_bools();
            let values = outer
                .iter()
                .map(|&(k, j)| {
                    let (ci, xi) = pairs[k % pairs.len()];
                    if bools[ci] {
                        xs.values[xi].clone()
                    } else {
                        ys.values[j].clone()
                    }
                })
                .collect();
            return Ok(vec![Val::Ints(SymInts {
                dtype: xs.dtype,
                shape,
                values,
            })]);
        }
    }
    Ok(vec![imp.emit(
        &name(node),
        Op::Where,
        &[cond.clone(), x.clone(), y.clone()],
    )?])
}

fn not(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    Ok(vec![imp.emit(
        &name(node),
        Op::Unary(UnaryOp::Not),
        operands(inputs, 1)?,
    )?])
}

/// `IsNaN(x)` is `not(x == x)`.
fn is_nan(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let x = input(inputs, 0).clone();
    let equal = imp.emit(
        &format!("{}.self_equal", name(node)),
        Op::Binary(BinaryOp::Equal),
        &[x.clone(), x],
    )?;
    Ok(vec![imp.emit(
        &name(node),
        Op::Unary(UnaryOp::Not),
        &[equal],
    )?])
}

fn unary(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = match node.op_type.as_str() {
        "Neg" => UnaryOp::Neg,
        "Abs" => UnaryOp::Abs,
        "Relu" => UnaryOp::Relu,
        "Exp" => UnaryOp::Exp,
        "Log" => UnaryOp::Log,
        "Sqrt" => UnaryOp::Sqrt,
        "Reciprocal" => UnaryOp::Reciprocal,
        "Erf" => UnaryOp::Erf,
        "Tanh" => UnaryOp::Tanh,
        "Sigmoid" => UnaryOp::Sigmoid,
        "Sin" => UnaryOp::Sin,
        "Floor" => UnaryOp::Floor,
        "Ceil" => UnaryOp::Ceil,
        "Round" => UnaryOp::Round,
        "Sign" => UnaryOp::Sign,
        _ => UnaryOp::Cos,
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Unary(op),
        operands(inputs, 1)?,
    )?])
}

fn gelu(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = match attr_str(node, "approximate").as_deref().unwrap_or("none") {
        "none" => UnaryOp::Gelu,
        "tanh" => UnaryOp::GeluTanh,
        other => return Err(format!("approximate `{other}` is not supported")),
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Unary(op),
        operands(inputs, 1)?,
    )?])
}

fn matmul(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    Ok(vec![imp.emit(
        &name(node),
        Op::MatMul,
        operands(inputs, 2)?,
    )?])
}

/// `alpha * A' @ B' + beta * C`, in primitives.
fn gemm(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let mut a = input(inputs, 0).clone();
    let mut b = input(inputs, 1).clone();
    if attr_int(node, "transA", 0) == 1 {
        a = imp.emit(
            &format!("{n}.a_t"),
            Op::Transpose { perm: vec![1, 0] },
            &[a],
        )?;
    }
    if attr_int(node, "transB", 0) == 1 {
        b = imp.emit(
            &format!("{n}.b_t"),
            Op::Transpose { perm: vec![1, 0] },
            &[b],
        )?;
    }
    let (alpha, beta) = (
        attr_float(node, "alpha", 1.0),
        attr_float(node, "beta", 1.0),
    );
    let has_c = present(inputs, 2);
    let mut y = imp.emit(
        &if has_c || alpha != 1.0 {
            format!("{n}.matmul")
        } else {
            n.clone()
        },
        Op::MatMul,
        &[a, b],
    )?;
    let dtype = imp.ty(&y)?.dtype;
    let scalar = |v: f32| Val::Static(Tensor::from_f64s(dtype, vec![], vec![f64::from(v)]));
    if alpha != 1.0 {
        y = imp.emit(
            &if has_c {
                format!("{n}.alpha")
            } else {
                n.clone()
            },
            Op::Binary(BinaryOp::Mul),
            &[y, scalar(alpha)],
        )?;
    }
    if has_c {
        let mut c = input(inputs, 2).clone();
        if beta != 1.0 {
            c = imp.emit(
                &format!("{n}.beta"),
                Op::Binary(BinaryOp::Mul),
                &[c, scalar(beta)],
            )?;
        }
        y = imp.emit(&n, Op::Binary(BinaryOp::Add), &[y, c])?;
    }
    Ok(vec![y])
}

fn softmax(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    Ok(vec![imp.emit(
        &name(node),
        Op::Softmax {
            axis: attr_int(node, "axis", -1),
        },
        operands(inputs, 1)?,
    )?])
}

fn reduce(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = match node.op_type.as_str() {
        "ReduceSum" => ReduceOp::Sum,
        "ReduceMean" => ReduceOp::Mean,
        "ReduceMax" => ReduceOp::Max,
        "ReduceMin" => ReduceOp::Min,
        _ => ReduceOp::Prod,
    };
    let x = input(inputs, 0);
    let rank = imp.ty(x)?.rank();
    let axes = axes_of(imp, node, inputs, 1)?.unwrap_or_default();
    let keep_dims = attr_int(node, "keepdims", 1) == 1;
    if axes.is_empty() && attr_int(node, "noop_with_empty_axes", 0) == 1 {
        return Ok(vec![x.clone()]);
    }
    if rank == 0 {
        return Ok(vec![x.clone()]);
    }
    let axes = if axes.is_empty() {
        (0..rank as i64).collect()
    } else {
        axes
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Reduce {
            op,
            axes,
            keep_dims,
        },
        std::slice::from_ref(x),
    )?])
}

fn layer_norm(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let (axis, eps) = (
        attr_int(node, "axis", -1),
        attr_float(node, "epsilon", 1e-5),
    );
    let op = Op::LayerNorm {
        axis,
        eps: F32(eps),
    };
    let operands: Vec<Val> = inputs
        .iter()
        .take(3)
        .filter(|v| !matches!(v, Val::Absent))
        .cloned()
        .collect();
    let mut outputs = vec![imp.emit(&name(node), op, &operands)?];
    if node.output.iter().skip(1).any(|o| !o.is_empty()) {
        // Mean and 1/sqrt(var + eps) over the normalized axes, kept as size-1 axes.
        let n = name(node);
        let x = input(inputs, 0).clone();
        let ty = imp.ty(&x)?;
        let first = if axis < 0 {
            axis + ty.rank() as i64
        } else {
            axis
        };
        let axes: Vec<i64> = (first..ty.rank() as i64).collect();
        let reduce = |axes: &[i64]| Op::Reduce {
            op: ReduceOp::Mean,
            axes: axes.to_vec(),
            keep_dims: true,
        };
        let mean = imp.emit(
            &format!("{n}.mean"),
            reduce(&axes),
            std::slice::from_ref(&x),
        )?;
        let centered = imp.emit(
            &format!("{n}.centered"),
            Op::Binary(BinaryOp::Sub),
            &[x, mean.clone()],
        )?;
        let squares = imp.emit(
            &format!("{n}.squares"),
            Op::Binary(BinaryOp::Mul),
            &[centered.clone(), centered],
        )?;
        let variance = imp.emit(&format!("{n}.variance"), reduce(&axes), &[squares])?;
        let eps = Val::Static(Tensor::from_f64s(ty.dtype, vec![], vec![f64::from(eps)]));
        let shifted = imp.emit(
            &format!("{n}.variance_eps"),
            Op::Binary(BinaryOp::Add),
            &[variance, eps],
        )?;
        let std = imp.emit(&format!("{n}.std"), Op::Unary(UnaryOp::Sqrt), &[shifted])?;
        let inv_std = imp.emit(
            &format!("{n}.inv_std"),
            Op::Unary(UnaryOp::Reciprocal),
            &[std],
        )?;
        outputs.extend([mean, inv_std]);
    }
    Ok(outputs)
}

fn clip(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let mut y = input(inputs, 0).clone();
    let dtype = imp.ty(&y)?.dtype;
    let bound = |i: usize, attr_name: &str| -> Option<Val> {
        if present(inputs, i) {
            Some(input(inputs, i).clone())
        } else {
            attr(node, attr_name)
                .map(|a| Val::Static(Tensor::from_f64s(dtype, vec![], vec![f64::from(a.f)])))
        }
    };
    let (lo, hi) = (bound(1, "min"), bound(2, "max"));
    if let Some(lo) = lo {
        y = imp.emit(
            &if hi.is_some() {
                format!("{n}.min")
            } else {
                n.clone()
            },
            Op::Binary(BinaryOp::Max),
            &[y, lo],
        )?;
    }
    if let Some(hi) = hi {
        y = imp.emit(&n, Op::Binary(BinaryOp::Min), &[y, hi])?;
    }
    Ok(vec![y])
}

/// `(x - zero_point) * scale`, per tensor or per `axis`.
fn dequantize_linear(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    if attr_int(node, "block_size", 0) != 0 {
        return Err("blocked quantization is not supported".into());
    }
    let n = name(node);
    let x = input(inputs, 0).clone();
    let x_ty = imp.ty(&x)?;
    let scale = input(inputs, 1).clone();
    let scale_ty = imp.ty(&scale)?;
    let per_axis = |imp: &mut Importer, v: Val, what: &str| -> Result<Val, String> {
        if imp.ty(&v)?.rank() != 1 || x_ty.rank() == 0 {
            return Ok(v);
        }
        let axis = attr_int(node, "axis", 1);
        let axis = usize::try_from(if axis < 0 {
            axis + x_ty.rank() as i64
        } else {
            axis
        })
        .map_err(|_| "axis out of range")?;
        let dims: Vec<Dim> = (0..x_ty.rank())
            .map(|i| {
                if i == axis {
                    imp.ty(&v)
                        .map(|t| t.shape.0[0].clone())
                        .unwrap_or(Dim::Const(1))
                } else {
                    Dim::Const(1)
                }
            })
            .collect();
        reshaped(imp, &format!("{n}.{what}_axis"), &v, dims)
    };
    let mut values = imp.emit(&format!("{n}.float"), Op::Cast { to: scale_ty.dtype }, &[x])?;
    if present(inputs, 2) {
        let zero = imp.emit(
            &format!("{n}.zero_float"),
            Op::Cast { to: scale_ty.dtype },
            &inputs[2..3],
        )?;
        let zero = per_axis(imp, zero, "zero")?;
        values = imp.emit(
            &format!("{n}.centered"),
            Op::Binary(BinaryOp::Sub),
            &[values, zero],
        )?;
    }
    let scale = per_axis(imp, scale, "scale")?;
    Ok(vec![imp.emit(
        &n,
        Op::Binary(BinaryOp::Mul),
        &[values, scale],
    )?])
}

/// A scalar of `dtype` as a known value.
fn scalar(dtype: DType, value: f64) -> Val {
    Val::Static(Tensor::from_f64s(dtype, vec![], vec![value]))
}

fn modulo(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    // fmod=1 is C's fmod (sign of the dividend); fmod=0 is Python's % (sign of the divisor).
    let op = if attr_int(node, "fmod", 0) == 1 {
        BinaryOp::Rem
    } else {
        BinaryOp::Mod
    };
    Ok(vec![imp.emit(
        &name(node),
        Op::Binary(op),
        operands(inputs, 2)?,
    )?])
}

fn arg(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let op = if node.op_type == "ArgMax" {
        kiln_ir::ops::ArgOp::Max
    } else {
        kiln_ir::ops::ArgOp::Min
    };
    let arg = Op::Arg {
        op,
        axis: attr_int(node, "axis", 0),
        keep_dims: attr_int(node, "keepdims", 1) == 1,
        select_last: attr_int(node, "select_last_index", 0) == 1,
    };
    Ok(vec![imp.emit(&name(node), arg, operands(inputs, 1)?)?])
}

fn size(imp: &mut Importer, _: &NodeProto, inputs: &[Val]) -> Outputs {
    let numel = imp.ty(input(inputs, 0))?.shape.numel();
    Ok(vec![Val::Ints(SymInts {
        dtype: DType::I64,
        shape: vec![],
        values: vec![numel],
    })])
}

/// `(x - max) - log(sum(exp(x - max)))` along the axis.
fn log_softmax(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let axis = attr_int(node, "axis", -1);
    let x = operands(inputs, 1)?[0].clone();
    let keep = |op| Op::Reduce {
        op,
        axes: vec![axis],
        keep_dims: true,
    };
    let max = imp.emit(
        &format!("{n}.max"),
        keep(ReduceOp::Max),
        std::slice::from_ref(&x),
    )?;
    let shifted = imp.emit(
        &format!("{n}.shifted"),
        Op::Binary(BinaryOp::Sub),
        &[x, max],
    )?;
    let exp = imp.emit(
        &format!("{n}.exp"),
        Op::Unary(UnaryOp::Exp),
        std::slice::from_ref(&shifted),
    )?;
    let sum = imp.emit(&format!("{n}.sum"), keep(ReduceOp::Sum), &[exp])?;
    let log = imp.emit(&format!("{n}.log_sum"), Op::Unary(UnaryOp::Log), &[sum])?;
    Ok(vec![imp.emit(
        &n,
        Op::Binary(BinaryOp::Sub),
        &[shifted, log],
    )?])
}

/// Keeps the upper (or lower) triangle of the last two axes from diagonal `k`, zeroing the rest.
fn trilu(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let x = operands(inputs, 1)?[0].clone();
    let ty = imp.ty(&x)?;
    if ty.rank() < 2 {
        return Err("Trilu needs a tensor of rank >= 2".into());
    }
    let k = if present(inputs, 1) {
        let ints = const_ints(imp, input(inputs, 1), "k")?;
        *ints.first().ok_or("`k` is empty")?
    } else {
        0
    };
    let (rows, cols) = (
        ty.shape.0[ty.rank() - 2].clone(),
        ty.shape.0[ty.rank() - 1].clone(),
    );
    let range = |len: Dim| Op::Range {
        start: Dim::Const(0),
        step: 1,
        len,
        dtype: DType::I64,
    };
    let row_ids = imp.emit(&format!("{n}.rows"), range(rows.clone()), &[])?;
    let row_ids = reshaped(
        imp,
        &format!("{n}.row_column"),
        &row_ids,
        vec![rows, Dim::Const(1)],
    )?;
    let col_ids = imp.emit(&format!("{n}.cols"), range(cols), &[])?;
    let offset = imp.emit(
        &format!("{n}.offset"),
        Op::Binary(BinaryOp::Sub),
        &[col_ids, row_ids],
    )?;
    let k = Val::Static(Tensor::from_i64s(DType::I64, vec![], vec![k]));
    let compare = if attr_int(node, "upper", 1) == 1 {
        BinaryOp::GreaterEqual
    } else {
        BinaryOp::LessEqual
    };
    let keep = imp.emit(&format!("{n}.keep"), Op::Binary(compare), &[offset, k])?;
    let zero = scalar(ty.dtype, 0.0);
    Ok(vec![imp.emit(&n, Op::Where, &[keep, x, zero])?])
}

/// Repeats along each axis: `[.., d, ..]` becomes `[.., r, d, ..]` by broadcast, then `r*d`.
fn tile(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let mut x = operands(inputs, 2)?[0].clone();
    let repeats = const_ints(imp, input(inputs, 1), "repeats")?;
    let dims = imp.ty(&x)?.shape.0;
    if repeats.len() != dims.len() || repeats.iter().any(|&r| r < 0) {
        return Err(format!(
            "repeats {repeats:?} do not fit rank {}",
            dims.len()
        ));
    }
    let mut current = dims.clone();
    for (axis, &r) in repeats.iter().enumerate() {
        if r == 1 {
            continue;
        }
        let mut split = current.clone();
        split.insert(axis, Dim::Const(1));
        let mut expanded = split.clone();
        expanded[axis] = Dim::Const(r);
        let y = reshaped(imp, &format!("{n}.split{axis}"), &x, split)?;
        let y = imp.emit(
            &format!("{n}.expand{axis}"),
            Op::Expand {
                shape: Shape(expanded),
            },
            &[y],
        )?;
        current[axis] = Dim::mul(current[axis].clone(), Dim::Const(r));
        x = reshaped(imp, &format!("{n}.merge{axis}"), &y, current.clone())?;
    }
    Ok(vec![x])
}

/// L1, L2, sum-of-squares, log-sum and log-sum-exp reductions, in primitives.
fn reduce_composite(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let x = operands(inputs, 1)?[0].clone();
    let rank = imp.ty(&x)?.rank() as i64;
    let keep_dims = attr_int(node, "keepdims", 1) == 1;
    let axes = axes_of(imp, node, inputs, 1)?.unwrap_or_default();
    if axes.is_empty() && attr_int(node, "noop_with_empty_axes", 0) == 1 {
        return Ok(vec![x]);
    }
    let axes = if axes.is_empty() {
        (0..rank).collect()
    } else {
        axes
    };
    let sum = |keep: bool| Op::Reduce {
        op: ReduceOp::Sum,
        axes: axes.clone(),
        keep_dims: keep,
    };
    let op_type = node.op_type.as_str();
    if op_type == "ReduceLogSumExp" {
        // max + log(sum(exp(x - max))), with the max kept for broadcasting.
        let max_op = Op::Reduce {
            op: ReduceOp::Max,
            axes: axes.clone(),
            keep_dims: true,
        };
        let max = imp.emit(&format!("{n}.max"), max_op, std::slice::from_ref(&x))?;
        let shifted = imp.emit(
            &format!("{n}.shifted"),
            Op::Binary(BinaryOp::Sub),
            &[x, max.clone()],
        )?;
        let exp = imp.emit(&format!("{n}.exp"), Op::Unary(UnaryOp::Exp), &[shifted])?;
        let summed = imp.emit(&format!("{n}.sum"), sum(true), &[exp])?;
        let log = imp.emit(&format!("{n}.log"), Op::Unary(UnaryOp::Log), &[summed])?;
        let kept_name = if keep_dims {
            n.clone()
        } else {
            format!("{n}.kept")
        };
        let kept = imp.emit(&kept_name, Op::Binary(BinaryOp::Add), &[log, max])?;
        if keep_dims {
            return Ok(vec![kept]);
        }
        let dims: Vec<Dim> = {
            let ty = imp.ty(&kept)?;
            let drop: Vec<usize> = axes
                .iter()
                .map(|&a| (if a < 0 { a + rank } else { a }) as usize)
                .collect();
            ty.shape
                .0
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, d)| d)
                .collect()
        };
        return Ok(vec![reshaped(imp, &n, &kept, dims)?]);
    }
    let prepared = match op_type {
        "ReduceL1" => imp.emit(&format!("{n}.abs"), Op::Unary(UnaryOp::Abs), &[x])?,
        "ReduceL2" | "ReduceSumSquare" => imp.emit(
            &format!("{n}.square"),
            Op::Binary(BinaryOp::Mul),
            &[x.clone(), x],
        )?,
        _ => x,
    };
    let finish = match op_type {
        "ReduceL2" => Some(UnaryOp::Sqrt),
        "ReduceLogSum" => Some(UnaryOp::Log),
        _ => None,
    };
    let summed = imp.emit(
        &if finish.is_some() {
            format!("{n}.sum")
        } else {
            n.clone()
        },
        sum(keep_dims),
        &[prepared],
    )?;
    match finish {
        Some(f) => Ok(vec![imp.emit(&n, Op::Unary(f), &[summed])?]),
        None => Ok(vec![summed]),
    }
}

fn sum_mean(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let parts = operands(inputs, inputs.len().max(1))?;
    let mut acc = parts[0].clone();
    let mean = node.op_type == "Mean";
    for (i, next) in parts.iter().enumerate().skip(1) {
        let step = if i + 1 == parts.len() && !mean {
            n.clone()
        } else {
            format!("{n}.add{i}")
        };
        acc = imp.emit(&step, Op::Binary(BinaryOp::Add), &[acc, next.clone()])?;
    }
    if mean {
        let dtype = imp.ty(&acc)?.dtype;
        acc = imp.emit(
            &n,
            Op::Binary(BinaryOp::Div),
            &[acc, scalar(dtype, parts.len() as f64)],
        )?;
    }
    Ok(vec![acc])
}

/// The activation functions ONNX defines by formula, in primitives.
fn activation(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let x = operands(inputs, 1)?[0].clone();
    let out_dtype = imp.ty(&x)?.dtype;
    // Half-precision inputs are computed in f32 and rounded once, as the ONNX formulas intend.
    let half = matches!(out_dtype, DType::F16 | DType::BF16);
    let x = if half {
        imp.emit(&format!("{n}.f32"), Op::Cast { to: DType::F32 }, &[x])?
    } else {
        x
    };
    let dtype = if half { DType::F32 } else { out_dtype };
    let c = |v: f32| scalar(dtype, f64::from(v));
    let mut step = 0;
    let mut emit = |imp: &mut Importer, op: Op, args: &[Val]| {
        step += 1;
        imp.emit(&format!("{n}.{step}"), op, args)
    };
    let bin = |op| Op::Binary(op);
    let un = |op| Op::Unary(op);
    let y = match node.op_type.as_str() {
        "LeakyRelu" => {
            let scaled = emit(
                imp,
                bin(BinaryOp::Mul),
                &[x.clone(), c(attr_float(node, "alpha", 0.01))],
            )?;
            let neg = emit(imp, bin(BinaryOp::Less), &[x.clone(), c(0.0)])?;
            emit(imp, Op::Where, &[neg, scaled, x])?
        }
        "PRelu" => {
            let slope = operands(inputs, 2)?[1].clone();
            let scaled = emit(imp, bin(BinaryOp::Mul), &[x.clone(), slope])?;
            let neg = emit(imp, bin(BinaryOp::Less), &[x.clone(), c(0.0)])?;
            emit(imp, Op::Where, &[neg, scaled, x])?
        }
        "HardSigmoid" | "HardSwish" => {
            let (alpha, beta) = if node.op_type == "HardSwish" {
                (1.0 / 6.0, 0.5)
            } else {
                (
                    attr_float(node, "alpha", 0.2),
                    attr_float(node, "beta", 0.5),
                )
            };
            let scaled = emit(imp, bin(BinaryOp::Mul), &[x.clone(), c(alpha)])?;
            let shifted = emit(imp, bin(BinaryOp::Add), &[scaled, c(beta)])?;
            let low = emit(imp, bin(BinaryOp::Max), &[shifted, c(0.0)])?;
            let hard = emit(imp, bin(BinaryOp::Min), &[low, c(1.0)])?;
            if node.op_type == "HardSwish" {
                emit(imp, bin(BinaryOp::Mul), &[x, hard])?
            } else {
                hard
            }
        }
        "Softplus" => {
            let exp = emit(imp, un(UnaryOp::Exp), &[x])?;
            let plus = emit(imp, bin(BinaryOp::Add), &[exp, c(1.0)])?;
            emit(imp, un(UnaryOp::Log), &[plus])?
        }
        "Softsign" => {
            let abs = emit(imp, un(UnaryOp::Abs), std::slice::from_ref(&x))?;
            let plus = emit(imp, bin(BinaryOp::Add), &[abs, c(1.0)])?;
            emit(imp, bin(BinaryOp::Div), &[x, plus])?
        }
        "ThresholdedRelu" => {
            let above = emit(
                imp,
                bin(BinaryOp::Greater),
                &[x.clone(), c(attr_float(node, "alpha", 1.0))],
            )?;
            emit(imp, Op::Where, &[above, x, c(0.0)])?
        }
        // Elu, Selu and Celu: x for x >= 0, else a scaled exponential.
        kind => {
            let (alpha, gamma) = match kind {
                "Selu" => (
                    attr_float(node, "alpha", 1.673_263_2),
                    attr_float(node, "gamma", 1.050_701),
                ),
                _ => (attr_float(node, "alpha", 1.0), 1.0),
            };
            let inner = if kind == "Celu" {
                emit(imp, bin(BinaryOp::Div), &[x.clone(), c(alpha)])?
            } else {
                x.clone()
            };
            let exp = emit(imp, un(UnaryOp::Exp), &[inner])?;
            let minus = emit(imp, bin(BinaryOp::Sub), &[exp, c(1.0)])?;
            let curve = emit(imp, bin(BinaryOp::Mul), &[minus, c(alpha)])?;
            let neg = emit(imp, bin(BinaryOp::Less), &[x.clone(), c(0.0)])?;
            let y = emit(imp, Op::Where, &[neg, curve, x])?;
            if kind == "Selu" {
                emit(imp, bin(BinaryOp::Mul), &[y, c(gamma)])?
            } else {
                y
            }
        }
    };
    if half {
        return Ok(vec![imp.emit(&n, Op::Cast { to: out_dtype }, &[y])?]);
    }
    Ok(vec![y])
}

/// `x / sqrt(mean(x^2 over axes axis..) + eps) * scale`.
fn rms_norm(imp: &mut Importer, node: &NodeProto, inputs: &[Val]) -> Outputs {
    let n = name(node);
    let both = operands(inputs, 2)?;
    let (x, scale) = (both[0].clone(), both[1].clone());
    let ty = imp.ty(&x)?;
    let eps = attr_float(node, "epsilon", 1e-5);
    let axis = attr_int(node, "axis", -1);
    let first = if axis < 0 {
        axis + ty.rank() as i64
    } else {
        axis
    };
    if first == ty.rank() as i64 - 1 && imp.ty(&scale)?.rank() <= 1 {
        return Ok(vec![imp.emit(
            &n,
            Op::RmsNorm { eps: F32(eps) },
            &[x, scale],
        )?]);
    }
    let axes: Vec<i64> = (first..ty.rank() as i64).collect();
    let squares = imp.emit(
        &format!("{n}.squares"),
        Op::Binary(BinaryOp::Mul),
        &[x.clone(), x.clone()],
    )?;
    let mean = imp.emit(
        &format!("{n}.mean"),
        Op::Reduce {
            op: ReduceOp::Mean,
            axes,
            keep_dims: true,
        },
        &[squares],
    )?;
    let shifted = imp.emit(
        &format!("{n}.eps"),
        Op::Binary(BinaryOp::Add),
        &[mean, scalar(ty.dtype, f64::from(eps))],
    )?;
    let rms = imp.emit(&format!("{n}.rms"), Op::Unary(UnaryOp::Sqrt), &[shifted])?;
    let normalized = imp.emit(
        &format!("{n}.normalized"),
        Op::Binary(BinaryOp::Div),
        &[x, rms],
    )?;
    Ok(vec![imp.emit(
        &n,
        Op::Binary(BinaryOp::Mul),
        &[normalized, scale],
    )?])
}
