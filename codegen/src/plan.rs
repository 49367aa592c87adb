//! Where each node's values live: inputs and weights where the caller and the weight store keep
//! them, every computed node at its own offset in one arena sized for the symbols' maxima. (No
//! reuse yet: liveness-based planning comes with the pass pipeline.)

use kiln_ir::{Graph, NodeId, Op};
use std::collections::HashMap;

/// The buffer layout of a graph.
pub struct Plan {
    order: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    offsets: HashMap<NodeId, usize>,
    scratch_offset: usize,
    arena_bytes: usize,
}

/// Buffers start on cache-line boundaries.
const ALIGN: usize = 64;

impl Plan {
    /// Lays out `graph`.
    pub fn new(graph: &Graph) -> Plan {
        let order = graph.order();
        let index = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let maxima = graph.maxima();
        let mut offsets = HashMap::new();
        let mut arena_bytes = 0usize;
        let mut scratch_bytes = 0usize;
        for &id in &order {
            let node = graph.node(id);
            if matches!(node.op, Op::Input | Op::Constant { .. }) {
                continue;
            }
            let bytes = node
                .ty
                .shape
                .0
                .iter()
                .map(|d| d.bounds(&maxima).map_or(0, |(_, hi)| hi.max(0) as usize))
                .fold(node.ty.dtype.size_bytes(), usize::saturating_mul);
            offsets.insert(id, arena_bytes);
            arena_bytes = arena_bytes.saturating_add(bytes.div_ceil(ALIGN) * ALIGN);
            if let Op::Attention(_) = node.op {
                // One row of scores (f32) per key, shared by every attention node in turn.
                let keys = graph.node(graph.operands(id)[1]).ty.shape.0[2]
                    .bounds(&maxima)
                    .map_or(0, |(_, hi)| hi.max(0) as usize);
                scratch_bytes = scratch_bytes.max(keys.saturating_mul(4));
            }
        }
        let scratch_offset = arena_bytes;
        let arena_bytes = arena_bytes.saturating_add(scratch_bytes.div_ceil(ALIGN) * ALIGN);
        Plan {
            order,
            index,
            offsets,
            scratch_offset,
            arena_bytes,
        }
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
        self.offsets[&id]
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
