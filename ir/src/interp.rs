//! The reference interpreter: deliberately naive loops, f64 arithmetic inside every op (so
//! reductions and matrix products accumulate in f64), results rounded to the node's dtype.
//! Symbolic dims are bound from the actual input dims.

use crate::graph::{Graph, NodeId};
use crate::ops::{EvalCtx, Op};
use crate::tensor::Tensor;
use crate::Dim;
use std::collections::HashMap;

/// The most elements one tensor may have: the interpreter holds values as f64, so this bounds
/// one intermediate at 16 GiB.
pub const MAX_ELEMENTS: usize = 1 << 31;

fn check_size(dims: &[usize]) -> Result<(), String> {
    match dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => Err(format!(
            "a tensor of dims {dims:?} exceeds the interpreter's limit of {MAX_ELEMENTS} elements"
        )),
    }
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterpError {
    /// The inputs do not fit the graph.
    #[error("{0}")]
    Inputs(String),
    /// A node failed to evaluate.
    #[error("node %{node} ({op}): {message}")]
    Node {
        /// The node's name.
        node: String,
        /// The node's op name.
        op: String,
        /// What went wrong.
        message: String,
    },
}

/// Binds every symbol from the inputs' actual dims and checks dtypes, ranks, constant dims and
/// maxima.
pub fn bind_symbols(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, i64>, InterpError> {
    let missing: Vec<&str> = graph
        .inputs()
        .iter()
        .map(|&id| graph.node(id).name.as_str())
        .filter(|name| !inputs.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        return Err(InterpError::Inputs(format!(
            "missing inputs: {}",
            missing.join(", ")
        )));
    }
    let mut unknown: Vec<&str> = inputs
        .keys()
        .map(String::as_str)
        .filter(|name| {
            graph
                .find(name)
                .is_none_or(|id| !graph.inputs().contains(&id))
        })
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(InterpError::Inputs(format!(
            "unknown inputs: {}",
            unknown.join(", ")
        )));
    }
    let mut bindings = HashMap::new();
    let mut deferred = Vec::new();
    for &id in graph.inputs() {
        let node = graph.node(id);
        let tensor = &inputs[&node.name];
        let fail = |what: String| {
            InterpError::Inputs(format!(
                "input `{}` is {tensor}, expected {}: {what}",
                node.name, node.ty
            ))
        };
        if tensor.dtype() != node.ty.dtype {
            return Err(fail("dtype differs".into()));
        }
        if tensor.shape().len() != node.ty.rank() {
            return Err(fail("rank differs".into()));
        }
        check_size(tensor.shape()).map_err(fail)?;
        for (axis, (dim, &actual)) in node.ty.shape.0.iter().zip(tensor.shape()).enumerate() {
            let actual = actual as i64;
            match dim {
                Dim::Sym(name) => {
                    if let Some(&bound) = bindings.get(name) {
                        if bound != actual {
                            return Err(fail(format!(
                                "axis {axis}: {name} is already bound to {bound}"
                            )));
                        }
                    }
                    let max = graph
                        .symbols()
                        .iter()
                        .find(|s| &s.name == name)
                        .map_or(0, |s| s.max);
                    if actual < 1 || actual > max {
                        return Err(fail(format!(
                            "axis {axis}: {name} = {actual} is outside 1..={max}"
                        )));
                    }
                    bindings.insert(name.clone(), actual);
                }
                _ => deferred.push((node, tensor, axis, dim, actual)),
            }
        }
    }
    for (node, tensor, axis, dim, actual) in deferred {
        let expected = dim
            .eval(&bindings)
            .map_err(|e| InterpError::Inputs(format!("input `{}` axis {axis}: {e}", node.name)))?;
        if expected != actual {
            return Err(InterpError::Inputs(format!(
                "input `{}` is {tensor}, expected {}: axis {axis} must be {expected}",
                node.name, node.ty
            )));
        }
    }
    Ok(bindings)
}

/// Runs the graph on named inputs and returns its outputs in declaration order.
pub fn run(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, InterpError> {
    let bindings = bind_symbols(graph, inputs)?;
    let order = graph.order();
    let mut remaining_uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for operand in graph.operands(id) {
            *remaining_uses.entry(operand).or_default() += 1;
        }
    }
    for (_, id) in graph.outputs() {
        *remaining_uses.entry(*id).or_default() += 1;
    }
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for id in order {
        let node = graph.node(id);
        let fail = |message: String| InterpError::Node {
            node: node.name.clone(),
            op: node.op.name().to_string(),
            message,
        };
        let operand_ids = graph.operands(id);
        let value = match &node.op {
            Op::Input => inputs[&node.name].clone(),
            Op::Constant { weight } => {
                let stored = graph
                    .weights()
                    .get(weight)
                    .ok_or_else(|| fail(format!("weight `{weight}` is not in the store")))?;
                let bytes = stored.data.as_ref().ok_or_else(|| {
                    fail(format!("weight `{weight}` has no data: load the graph together with its weights file"))
                })?;
                Tensor::from_le_bytes(stored.dtype, stored.shape.clone(), bytes.bytes())
                    .map_err(|e| fail(e.to_string()))?
            }
            op => {
                let out_shape = node
                    .ty
                    .shape
                    .eval(&bindings)
                    .map_err(|e| fail(e.to_string()))?;
                check_size(&out_shape).map_err(fail)?;
                let operands: Vec<&Tensor> = operand_ids.iter().map(|o| &values[o]).collect();
                let result = op
                    .eval(
                        &operands,
                        EvalCtx {
                            bindings: &bindings,
                            out_shape: &out_shape,
                        },
                    )
                    .map_err(fail)?;
                if result.shape() != out_shape.as_slice() || result.dtype() != node.ty.dtype {
                    return Err(fail(format!(
                        "produced {result}, its type says {} = {out_shape:?}",
                        node.ty
                    )));
                }
                result
            }
        };
        for operand in operand_ids {
            let uses = remaining_uses.get_mut(&operand).expect("counted above");
            *uses -= 1;
            if *uses == 0 {
                values.remove(&operand);
            }
        }
        if remaining_uses.get(&id).copied().unwrap_or(0) > 0 {
            values.insert(id, value);
        }
    }
    Ok(graph
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), values[id].clone()))
        .collect())
}
