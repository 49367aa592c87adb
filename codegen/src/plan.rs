//! Where each node's values live: inputs and weights where the caller and the weight store keep
//! them, every computed node in one arena sized for the symbols' maxima, at the offset the
//! memory planner ([`kiln_passes::memory`]) gives it (buffers with disjoint lifetimes share
//! bytes), and packed copies of the weights matrix products read.

use kiln_ir::{DType, Graph, NodeId, Op};
use kiln_passes::memory::MemoryPlan;
use std::collections::HashMap;

/// The buffer layout of a graph.
pub struct Plan {
    order: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    /// Offsets, sizes and views of the computed nodes.
    memory: MemoryPlan,
    /// Matrix products whose right operand is a weight packed at compile time, in order.
    packed: Vec<PackedWeight>,
}

/// A weight operand of a matrix product, a 2-D f32 constant, stored packed into the runtime's
/// panels ([`kiln_runtime::pack_b`]).
#[derive(Clone, Copy, Debug)]
pub struct PackedWeight {
    /// The matmul, gemm or swiglu node.
    pub product: NodeId,
    /// Which of its operands.
    pub operand: usize,
    /// The constant it packs: the operand, or the source of the operand when that is a 2-D
    /// transpose of a constant.
    pub weight: NodeId,
    /// That transpose, if any.
    pub through: Option<NodeId>,
    /// Whether the weight is stored `n × k` (a gemm with `trans_b`, or a transposed constant).
    pub transposed: bool,
}

/// The weight operands of `id` to pack.
fn packed_weights(graph: &Graph, id: NodeId) -> Vec<PackedWeight> {
    let node = graph.node(id);
    let (operands, transposed): (&[usize], bool) = match node.op {
        Op::MatMul => (&[1], false),
        Op::Gemm(epilogue) => (&[1], epilogue.trans_b),
        Op::SwiGlu => (&[1, 2], false),
        _ => return vec![],
    };
    let all = graph.operands(id);
    let packed: Vec<PackedWeight> = operands
        .iter()
        .filter_map(|&operand| {
            let mut weight = *all.get(operand)?;
            let mut transposed = transposed;
            let mut through = None;
            // A weight stored the other way round and transposed by the graph (PyTorch's
            // `Linear`) is packed from its stored layout, and the transpose never runs.
            if let Op::Transpose { perm } = &graph.node(weight).op {
                let source = graph.operands(weight)[0];
                if perm.as_slice() == [1, 0] && matches!(graph.node(source).op, Op::Constant { .. })
                {
                    through = Some(weight);
                    weight = source;
                    transposed = !transposed;
                }
            }
            let b = graph.node(weight);
            let packable = node.ty.dtype == DType::F32
                && matches!(b.op, Op::Constant { .. })
                && b.ty.dtype == DType::F32
                && b.ty.rank() == 2
                && graph.node(all[0]).ty.rank() >= 1;
            packable.then_some(PackedWeight {
                product: id,
                operand,
                weight,
                through,
                transposed,
            })
        })
        .collect();
    // A gated product reads both weights packed or neither.
    if packed.len() == operands.len() {
        packed
    } else {
        vec![]
    }
}

/// The largest arena a plan may reserve.
pub const MAX_ARENA_BYTES: usize = 1 << 36;

impl Plan {
    /// Lays out `graph`; fails when a dim has no upper bound or the arena would be too large.
    pub fn new(graph: &Graph) -> Result<Plan, String> {
        let order = graph.order();
        let index = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let memory = MemoryPlan::new(graph, &order)?;
        let arena_bytes = memory.arena_bytes();
        let packed = order
            .iter()
            .flat_map(|&id| packed_weights(graph, id))
            .collect();
        if arena_bytes > MAX_ARENA_BYTES {
            return Err(format!("the buffers need {arena_bytes} bytes at the symbols' maxima, more than {MAX_ARENA_BYTES}: lower the maxima with --shape"));
        }
        Ok(Plan {
            order,
            index,
            memory,
            packed,
        })
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
        self.buffer(id).offset
    }

    /// Bytes reserved for a computed node.
    pub fn reserved(&self, id: NodeId) -> usize {
        self.buffer(id).bytes
    }

    fn buffer(&self, id: NodeId) -> &kiln_passes::memory::Buffer {
        self.memory
            .buffer(id)
            .expect("every computed node that is not a view has a buffer")
    }

    /// The node whose buffer `id` shares, when it owns none (a reshape of it).
    pub fn alias_of(&self, id: NodeId) -> Option<NodeId> {
        self.memory.alias_of(id)
    }

    /// The products with packed weights, in execution order.
    pub fn packed(&self) -> &[PackedWeight] {
        &self.packed
    }

    /// The buffer-table slot of operand `operand` of product `id` packed, if it is: after every
    /// node's slot, one per packed weight.
    pub fn packed_slot(&self, id: NodeId, operand: usize) -> Option<usize> {
        self.packed
            .iter()
            .position(|p| p.product == id && p.operand == operand)
            .map(|i| self.order.len() + i)
    }

    /// Whether every use of `id` (a constant, or a transpose of one) reads a packed copy, so that
    /// its bytes are not needed at run time: it gets no buffer or kernel.
    pub fn only_packed(&self, graph: &Graph, id: NodeId) -> bool {
        let users = graph.users(id);
        !users.is_empty()
            && !graph.outputs().iter().any(|(_, o)| *o == id)
            && users.iter().all(|&user| {
                let reads_packed = graph
                    .operands(user)
                    .iter()
                    .enumerate()
                    .filter(|&(_, &o)| o == id)
                    .all(|(i, _)| {
                        self.packed.iter().any(|p| {
                            p.product == user
                                && p.operand == i
                                && (p.weight == id || p.through == Some(id))
                        })
                    });
                let packed_transpose = self.packed.iter().any(|p| p.through == Some(user))
                    && self.only_packed(graph, user);
                reads_packed || packed_transpose
            })
    }

    /// Total arena size.
    pub fn arena_bytes(&self) -> usize {
        self.memory.arena_bytes()
    }
}
