//! Graph statistics for `kiln inspect`: op histogram, parameter count, FLOPs.

use crate::graph::Graph;
use crate::ops::Op;
use crate::DimError;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What a graph holds and costs at given dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Node count per op name.
    pub op_histogram: BTreeMap<&'static str, usize>,
    /// Elements in all weights that constants read.
    pub parameters: u64,
    /// Bytes of those weights.
    pub weight_bytes: u64,
    /// Floating-point operations of one run at `bindings` (see [`Op::flops`]).
    pub flops: u64,
    /// The symbol values FLOPs were counted at.
    pub bindings: BTreeMap<String, i64>,
}

impl Summary {
    /// Summarizes `graph` with symbols bound to `bindings`; unbound symbols take their maximum.
    pub fn of(graph: &Graph, bindings: &HashMap<String, i64>) -> Result<Summary, DimError> {
        let mut bound: HashMap<String, i64> = graph.maxima();
        bound.extend(bindings.iter().map(|(k, v)| (k.clone(), *v)));
        let mut summary = Summary {
            op_histogram: BTreeMap::new(),
            parameters: 0,
            weight_bytes: 0,
            flops: 0,
            bindings: bound.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        };
        for id in graph.order() {
            let node = graph.node(id);
            *summary.op_histogram.entry(node.op.name()).or_default() += 1;
            if let Op::Constant { weight } = &node.op {
                if let Some(w) = graph.weights().get(weight) {
                    summary.parameters = summary.parameters.saturating_add(w.numel() as u64);
                    summary.weight_bytes = summary.weight_bytes.saturating_add(
                        (w.numel() as u64).saturating_mul(w.dtype.size_bytes() as u64),
                    );
                }
            }
            let out = node.ty.shape.eval(&bound)?;
            let operands = graph
                .operands(id)
                .into_iter()
                .map(|o| graph.node(o).ty.shape.eval(&bound))
                .collect::<Result<Vec<_>, _>>()?;
            let operand_refs: Vec<&[usize]> = operands.iter().map(Vec::as_slice).collect();
            summary.flops = summary
                .flops
                .saturating_add(node.op.flops(&operand_refs, &out));
        }
        Ok(summary)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: usize = self.op_histogram.values().sum();
        writeln!(f, "nodes: {nodes}")?;
        for (op, count) in &self.op_histogram {
            writeln!(f, "  {op:<16} {count}")?;
        }
        writeln!(
            f,
            "parameters: {} ({} bytes)",
            self.parameters, self.weight_bytes
        )?;
        let at: Vec<String> = self
            .bindings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if at.is_empty() {
            write!(f, "flops: {}", self.flops)
        } else {
            write!(f, "flops: {} (at {})", self.flops, at.join(", "))
        }
    }
}
