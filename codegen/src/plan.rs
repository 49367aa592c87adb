//! Where each node's values live: inputs and weights where the caller and the weight store keep
//! them, every computed node at its own offset in one arena sized for the symbols' maxima. (No
//! reuse yet: liveness-based planning comes with the pass pipeline.)

use kiln_ir::{Graph, NodeId, Op};
use std::collections::HashMap;

/// The buffer layout of a graph.
pub struct Plan {
    order: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    /// Offset and reserved bytes of each computed node.
    buffers: HashMap<NodeId, (usize, usize)>,
    scratch_offset: usize,
    scratch_bytes: usize,
    arena_bytes: usize,
}

/// The largest arena a plan may reserve.
pub const MAX_ARENA_BYTES: usize = 1 << 36;

/// Buffers start on cache-line boundaries.
const ALIGN: usize = 64;

impl Plan {
    /// Lays out `graph`; fails when a dim has no upper bound or the arena would be too large.
    pub fn new(graph: &Graph) -> Result<Plan, String> {
        let order = graph.order();
        let index = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let maxima = graph.maxima();
        let mut buffers = HashMap::new();
        let mut arena_bytes = 0usize;
        let mut scratch_bytes = 0usize;
        for &id in &order {
            let node = graph.node(id);
            if matches!(node.op, Op::Input | Op::Constant { .. }) {
                continue;
            }
            let upper = |d: &kiln_ir::Dim| {
                d.bounds(&maxima)
                    .map(|(_, hi)| hi.max(0) as usize)
                    .ok_or_else(|| format!("node %{}: dim {d} has no upper bound", node.name))
            };
            let bytes = node
                .ty
                .shape
                .0
                .iter()
                .map(upper)
                .try_fold(node.ty.dtype.size_bytes(), |acc, d| {
                    d.map(|d| acc.saturating_mul(d))
                })?;
            buffers.insert(id, (arena_bytes, bytes));
            arena_bytes = arena_bytes.saturating_add(bytes.div_ceil(ALIGN) * ALIGN);
            if let Op::Attention(_) = node.op {
                // Scores and visibility flags (f32 each) per key, shared by every attention node in turn.
                let keys = upper(&graph.node(graph.operands(id)[1]).ty.shape.0[2])?;
                scratch_bytes = scratch_bytes.max(keys.saturating_mul(8));
            }
        }
        let scratch_offset = arena_bytes;
        let arena_bytes = arena_bytes.saturating_add(scratch_bytes.div_ceil(ALIGN) * ALIGN);
        if arena_bytes > MAX_ARENA_BYTES {
            return Err(format!("the buffers need {arena_bytes} bytes at the symbols' maxima, more than {MAX_ARENA_BYTES}: lower the maxima with --shape"));
        }
        Ok(Plan {
            order,
            index,
            buffers,
            scratch_offset,
            scratch_bytes,
            arena_bytes,
        })
    }

    /// Checks that every buffer and the scratch row hold the node's values at these symbol
    /// values, so that no kernel can write past its buffer even if a bound were wrong.
    pub fn check(&self, graph: &Graph, bindings: &HashMap<String, i64>) -> Result<(), String> {
        let bytes_at = |node: &kiln_ir::Node, dims: &[kiln_ir::Dim]| -> Result<usize, String> {
            dims.iter()
                .map(|d| {
                    d.eval(bindings)
                        .map_err(|e| e.to_string())
                        .and_then(|v| usize::try_from(v).map_err(|_| format!("dim {d} is {v}")))
                })
                .try_fold(node.ty.dtype.size_bytes(), |acc, d| {
                    d.and_then(|d| {
                        acc.checked_mul(d)
                            .ok_or_else(|| "size overflows".to_string())
                    })
                })
                .map_err(|e| format!("node %{}: {e}", node.name))
        };
        for (&id, &(_, reserved)) in &self.buffers {
            let node = graph.node(id);
            let mut unbound = None;
            node.op.for_each_dim(|d| {
                if let Err(e) = d.eval(bindings) {
                    unbound.get_or_insert(e);
                }
            });
            if let Some(error) = unbound {
                return Err(format!("node %{}: {error}", node.name));
            }
            let needed = bytes_at(node, &node.ty.shape.0)?;
            if needed > reserved {
                return Err(format!(
                    "node %{} needs {needed} bytes at these dims, the plan reserved {reserved}",
                    node.name
                ));
            }
            if let Op::Attention(_) = node.op {
                let keys = &graph.node(graph.operands(id)[1]).ty.shape.0[2];
                let row = keys.eval(bindings).map_err(|e| e.to_string())?.max(0) as usize * 8;
                if row > self.scratch_bytes {
                    return Err(format!(
                        "node %{}: {row} bytes of scores exceed the planned scratch of {}",
                        node.name, self.scratch_bytes
                    ));
                }
            }
        }
        Ok(())
    }

    /// Nodes in execution order (the graph's canonical order).
    pub fn order(&self) -> &[NodeId] {
        &self.order
    }

    /// A node's position in [`Plan::order`], which is also its slot in the buffer table.
    pub fn index(&self, id: NodeId) -> usize {
        self.index[&id]
    }

    /// Arena offset of a computed node.
    pub fn offset(&self, id: NodeId) -> usize {
        self.buffers[&id].0
    }

    /// Arena offset of the scratch space kernels share (one at a time).
    pub fn scratch_offset(&self) -> usize {
        self.scratch_offset
    }

    /// The buffer-table slot of the scratch space: after every node's.
    pub fn scratch_slot(&self) -> usize {
        self.order.len()
    }

    /// Total arena size.
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }
}
