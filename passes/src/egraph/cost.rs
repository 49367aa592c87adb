//! The extraction cost model: floating-point work plus memory traffic, at the symbols' maxima.
//!
//! An op costs its FLOPs (divisions and transcendental functions weighted as several) plus the
//! bytes it reads and writes, so that a fused op, which never materializes its intermediates,
//! is cheaper than the chain it replaces. Leaves cost nothing; an ill-typed node costs infinity
//! and is never chosen.

use super::lang::EGraph;
use egg::Id;
use kiln_ir::ops::{BinaryOp, InferCtx};
use kiln_ir::{Op, TensorType};
use std::collections::HashMap;

/// Costs e-nodes of one e-graph.
pub struct CostModel<'a> {
    egraph: &'a EGraph,
    maxima: HashMap<String, i64>,
}

impl<'a> CostModel<'a> {
    /// A model reading types from `egraph`.
    pub fn new(egraph: &'a EGraph) -> CostModel<'a> {
        CostModel {
            egraph,
            maxima: egraph.analysis.maxima.clone(),
        }
    }

    fn dims(&self, ty: &TensorType) -> Option<Vec<usize>> {
        ty.shape.eval(&self.maxima).ok()
    }

    /// The cost of the node alone.
    pub fn own_cost(&self, op: &Op, children: &[Id]) -> f64 {
        let types: Option<Vec<&TensorType>> = children
            .iter()
            .map(|&c| self.egraph[c].data.ty.as_ref())
            .collect();
        let Some(types) = types else {
            return f64::INFINITY;
        };
        // Folded into a weight by `fold-constants` (in the default pipeline) before run time.
        if super::lang::is_elementwise(op)
            && children.iter().all(|&c| self.egraph[c].data.weight_only)
        {
            return 0.0;
        }
        let ctx = InferCtx {
            maxima: &self.maxima,
        };
        let Ok(out) = op.infer(&types, ctx) else {
            return f64::INFINITY;
        };
        let Some(operand_dims) = types
            .iter()
            .map(|t| self.dims(t))
            .collect::<Option<Vec<_>>>()
        else {
            return f64::INFINITY;
        };
        let Some(out_dims) = self.dims(&out) else {
            return f64::INFINITY;
        };
        let slices: Vec<&[usize]> = operand_dims.iter().map(Vec::as_slice).collect();
        let flops = op.flops(&slices, &out_dims) as f64 * op_weight(op);
        let bytes = |dims: &[usize], ty: &TensorType| {
            dims.iter().product::<usize>() as f64 * ty.dtype.size_bytes() as f64
        };
        let read: f64 = operand_dims
            .iter()
            .zip(&types)
            .map(|(d, t)| bytes(d, t))
            .sum();
        // Views cost nothing to write; a layout change is a copy.
        let written = if matches!(op, Op::Reshape { .. }) {
            0.0
        } else {
            bytes(&out_dims, &out)
        };
        flops + read + written
    }
}

/// How many plain FLOPs one FLOP of this op is worth.
fn op_weight(op: &Op) -> f64 {
    match op {
        Op::Binary(BinaryOp::Div | BinaryOp::Pow) => 4.0,
        Op::Unary(_) => 4.0,
        _ => 1.0,
    }
}
