//! The verifier: every invariant a well-formed graph keeps, checked after every pass.

use crate::graph::{node_error, Graph, GraphError};
use crate::ops::{InferCtx, Op, TensorType};
use crate::Shape;
use std::collections::HashSet;
use std::fmt;

/// Everything wrong with a graph, one error per problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError(pub Vec<GraphError>);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "graph is invalid ({} problems):", self.0.len())?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// Checks types against the shape rules, operand counts, weights against their constants,
/// symbols against their declarations and outputs. (Cycles cannot be built: a node's operands
/// must exist before it.)
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let mut errors = Vec::new();
    let maxima = graph.maxima();
    let declared: HashSet<&str> = graph.symbols().iter().map(|s| s.name.as_str()).collect();
    if graph.outputs().is_empty() {
        errors.push(GraphError::Graph("the graph has no outputs".into()));
    }
    let inputs: HashSet<_> = graph.inputs().iter().collect();
    for id in graph.order() {
        let node = graph.node(id);
        let fail = |message: String| node_error(&node.name, &node.op, message);
        let mut undeclared = Vec::new();
        let mut visit = |s: &str| {
            if !declared.contains(s) {
                undeclared.push(s.to_string());
            }
        };
        node.ty
            .shape
            .0
            .iter()
            .for_each(|d| d.for_each_symbol(&mut visit));
        node.op.for_each_dim(|d| d.for_each_symbol(&mut visit));
        if let Some(symbol) = undeclared.first() {
            errors.push(fail(format!("symbol `{symbol}` is not declared")));
        }
        let operands = graph.operands(id);
        match &node.op {
            Op::Input => {
                if !inputs.contains(&id) {
                    errors.push(fail("input node is not among the graph inputs".into()));
                }
            }
            Op::Constant { weight } => match graph.weights().get(weight) {
                None => errors.push(fail(format!("weight `{weight}` is not in the store"))),
                Some(w) => {
                    let expected = TensorType::new(w.dtype, Shape::fixed(&w.shape));
                    if expected != node.ty {
                        errors.push(fail(format!(
                            "weight `{weight}` is {expected}, the node says {}",
                            node.ty
                        )));
                    }
                }
            },
            op => {
                let types: Vec<&TensorType> = operands.iter().map(|&o| &graph.node(o).ty).collect();
                match op.infer(&types, InferCtx { maxima: &maxima }) {
                    Err(message) => errors.push(fail(message)),
                    Ok(inferred) if !inferred.equiv(&node.ty) => errors.push(fail(format!(
                        "type {} differs from the inferred {inferred}",
                        node.ty
                    ))),
                    Ok(_) => {}
                }
            }
        }
        if matches!(node.op, Op::Input | Op::Constant { .. }) && !operands.is_empty() {
            errors.push(fail("sources take no operands".into()));
        }
        if let Some(bad) = node
            .ty
            .shape
            .0
            .iter()
            .find(|d| d.as_const().is_some_and(|v| v < 0))
        {
            errors.push(fail(format!("negative dim {bad}")));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyError(errors))
    }
}
