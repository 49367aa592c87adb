//! `fold-constants`: an elementwise op whose operands are all weights is computed once, here,
//! and becomes a weight itself, such as a scale the canonical rules moved onto a projection's
//! weight. Layout ops of weights stay: the code generator packs a transposed weight from its
//! stored layout without a copy.

use crate::cleanup::{live_order, unused_weight_name, Rebuild};
use crate::egraph::MAX_FOLDED_ELEMENTS;
use crate::pipeline::PassOutput;
use crate::PassOptions;
use kiln_ir::{Graph, NodeId, Op, Tensor, Weight};
use std::collections::HashMap;

pub(crate) fn fold_constants(graph: &Graph, _: &PassOptions) -> Result<PassOutput, String> {
    let mut rebuild = Rebuild::new(graph)?;
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    let mut folded = 0usize;
    // Live nodes only: a weight read only by what is folded is dropped with its node.
    for id in live_order(graph) {
        if rebuild.mapped.contains_key(&id) {
            continue;
        }
        let node = graph.node(id);
        match fold(graph, id, &mut values)? {
            Some(value) => {
                let weight =
                    Weight::owned(value.dtype(), value.shape().to_vec(), value.to_le_bytes())
                        .map_err(|e| format!("folding %{}: {e}", node.name))?;
                let weight_name = unused_weight_name(&rebuild.graph, &node.name);
                let new = rebuild
                    .graph
                    .add_constant(&node.name, &weight_name, weight)
                    .map_err(|e| e.to_string())?;
                rebuild.mapped.insert(id, new);
                values.insert(id, value);
                folded += 1;
            }
            None => {
                rebuild.copy(id)?;
            }
        }
    }
    Ok(PassOutput {
        graph: rebuild.finish()?,
        notes: vec![format!("folded {folded} ops of weights into weights")],
    })
}

/// The value of `id` when it is an elementwise op of weights (or of values folded before) with
/// a fixed, bounded shape.
fn fold(
    graph: &Graph,
    id: NodeId,
    values: &mut HashMap<NodeId, Tensor>,
) -> Result<Option<Tensor>, String> {
    let node = graph.node(id);
    let elementwise = crate::egraph::is_elementwise(&node.op);
    let Some(out_shape) = node.ty.shape.as_fixed() else {
        return Ok(None);
    };
    if !elementwise || out_shape.iter().product::<usize>() > MAX_FOLDED_ELEMENTS {
        return Ok(None);
    }
    for operand in graph.operands(id) {
        if values.contains_key(&operand) {
            continue;
        }
        let Op::Constant { weight } = &graph.node(operand).op else {
            return Ok(None);
        };
        let Some(stored) = graph.weights().get(weight) else {
            return Ok(None);
        };
        let Some(bytes) = stored.data.as_ref() else {
            return Ok(None);
        };
        let tensor = Tensor::from_le_bytes(stored.dtype, stored.shape.clone(), bytes.bytes())
            .map_err(|e| format!("weight `{weight}`: {e}"))?;
        values.insert(operand, tensor);
    }
    let operands: Vec<&Tensor> = graph.operands(id).iter().map(|o| &values[o]).collect();
    let value = node
        .op
        .evaluate_fixed(&operands, MAX_FOLDED_ELEMENTS)
        .map_err(|e| format!("folding %{} ({}): {e}", node.name, node.op.name()))?;
    Ok(Some(value))
}
