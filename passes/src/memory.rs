//! Memory planning: the liveness of every intermediate over an execution order, and offsets in
//! one arena where buffers whose lifetimes do not overlap share bytes. Sizes are taken at the
//! symbols' maxima, so one plan serves every run.
//!
//! A reshape owns no buffer: it reads its source's bytes, whose lifetime it extends. An
//! elementwise op whose full-shape operand dies at it writes its result in place over that
//! operand (each element is read before the same element is written). Offsets are assigned
//! greedily by size, largest first, each at the lowest offset free for its whole lifetime (the
//! strategy TFLite's arena planner uses).

use kiln_ir::{Graph, NodeId, Op};
use std::collections::HashMap;
use std::fmt;

/// Buffers start on cache-line boundaries.
pub const ALIGN: usize = 64;

/// Where one computed node's result lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Byte offset in the arena.
    pub offset: usize,
    /// Bytes at the symbols' maxima.
    pub bytes: usize,
    /// The step (position in the order) that writes it.
    pub first: usize,
    /// The last step that reads it; the order's length for graph outputs.
    pub last: usize,
    /// The operand whose bytes it overwrites, when computed in place.
    pub in_place_of: Option<NodeId>,
}

/// Offsets and lifetimes of every computed node of a graph, in an execution order.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    order: Vec<NodeId>,
    buffers: HashMap<NodeId, Buffer>,
    aliases: HashMap<NodeId, NodeId>,
    arena_bytes: usize,
    unshared_bytes: usize,
}

impl MemoryPlan {
    /// Plans the buffers of `graph` run in `order`; fails when a dim has no upper bound.
    pub fn new(graph: &Graph, order: &[NodeId]) -> Result<MemoryPlan, String> {
        let maxima = graph.maxima();
        let step: HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let mut aliases: HashMap<NodeId, NodeId> = HashMap::new();
        let mut owners: Vec<NodeId> = Vec::new();
        let mut bytes: HashMap<NodeId, usize> = HashMap::new();
        for &id in order {
            let node = graph.node(id);
            match node.op {
                Op::Input | Op::Constant { .. } => continue,
                Op::Reshape { .. } => {
                    let source = graph.operands(id)[0];
                    aliases.insert(id, aliases.get(&source).copied().unwrap_or(source));
                    continue;
                }
                _ => {}
            }
            let size = node
                .ty
                .shape
                .0
                .iter()
                .try_fold(node.ty.dtype.size_bytes(), |acc, d| {
                    d.bounds(&maxima)
                        .map(|(_, hi)| acc.saturating_mul(hi.max(0) as usize))
                        .ok_or_else(|| format!("node %{}: dim {d} has no upper bound", node.name))
                })?;
            bytes.insert(id, size.div_ceil(ALIGN) * ALIGN);
            owners.push(id);
        }
        let owner = |id: NodeId| aliases.get(&id).copied().unwrap_or(id);
        // Lifetimes: from the producer to the last reader of the buffer or of any view of it.
        let end = order.len();
        let mut last: HashMap<NodeId, usize> = owners.iter().map(|&id| (id, step[&id])).collect();
        for &id in order {
            for operand in graph.operands(id) {
                if let Some(l) = last.get_mut(&owner(operand)) {
                    *l = (*l).max(step[&id]);
                }
            }
        }
        for (_, id) in graph.outputs() {
            if let Some(l) = last.get_mut(&owner(*id)) {
                *l = end;
            }
        }
        // In-place chains: a group of owners sharing one buffer, led by the first of them.
        let mut leader: HashMap<NodeId, NodeId> = HashMap::new();
        let mut in_place_of: HashMap<NodeId, NodeId> = HashMap::new();
        for &id in &owners {
            if let Some(victim) = in_place_operand(graph, id, &owner, &last, &step, &bytes) {
                let group = leader.get(&victim).copied().unwrap_or(victim);
                leader.insert(id, group);
                in_place_of.insert(id, victim);
            }
        }
        let group_of = |id: NodeId| leader.get(&id).copied().unwrap_or(id);
        let mut groups: HashMap<NodeId, (usize, usize, usize)> = HashMap::new();
        for &id in &owners {
            let entry = groups.entry(group_of(id)).or_insert((usize::MAX, 0, 0));
            entry.0 = entry.0.min(step[&id]);
            entry.1 = entry.1.max(last[&id]);
            entry.2 = entry.2.max(bytes[&id]);
        }
        // Largest first; ties by first step, then by order, so the plan is deterministic.
        let mut sorted: Vec<(NodeId, (usize, usize, usize))> = groups.into_iter().collect();
        sorted.sort_by_key(|&(id, (first, _, size))| (std::cmp::Reverse(size), first, step[&id]));
        let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut offsets: HashMap<NodeId, usize> = HashMap::new();
        let mut arena_bytes = 0usize;
        for (group, (first, last_step, size)) in sorted {
            let mut conflicts: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&(_, _, f, l)| f <= last_step && first <= l)
                .map(|&(offset, size, _, _)| (offset, size))
                .collect();
            conflicts.sort_unstable();
            let mut offset = 0usize;
            for (start, len) in conflicts {
                if offset.saturating_add(size) <= start {
                    break;
                }
                offset = offset.max(start.saturating_add(len));
            }
            placed.push((offset, size, first, last_step));
            offsets.insert(group, offset);
            arena_bytes = arena_bytes.max(offset.saturating_add(size));
        }
        let unshared_bytes = owners
            .iter()
            .map(|id| bytes[id])
            .fold(0usize, usize::saturating_add);
        let buffers = owners
            .iter()
            .map(|&id| {
                (
                    id,
                    Buffer {
                        offset: offsets[&group_of(id)],
                        bytes: bytes[&id],
                        first: step[&id],
                        last: last[&id],
                        in_place_of: in_place_of.get(&id).copied(),
                    },
                )
            })
            .collect();
        Ok(MemoryPlan {
            order: order.to_vec(),
            buffers,
            aliases,
            arena_bytes,
            unshared_bytes,
        })
    }

    /// The buffer of a computed node that owns one.
    pub fn buffer(&self, id: NodeId) -> Option<&Buffer> {
        self.buffers.get(&id)
    }

    /// The node whose buffer a reshape reads.
    pub fn alias_of(&self, id: NodeId) -> Option<NodeId> {
        self.aliases.get(&id).copied()
    }

    /// Peak arena bytes with sharing.
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    /// Arena bytes if no buffer were shared.
    pub fn unshared_bytes(&self) -> usize {
        self.unshared_bytes
    }

    /// The plan as text: one line per buffer in execution order, then the totals.
    pub fn display<'a>(&'a self, graph: &'a Graph) -> impl fmt::Display + 'a {
        PlanText { plan: self, graph }
    }
}

/// The operand `id` may overwrite: an elementwise op's operand of the same type as the result,
/// owning its buffer (not a view), read by nothing after this step and by no other operand slot.
fn in_place_operand(
    graph: &Graph,
    id: NodeId,
    owner: &impl Fn(NodeId) -> NodeId,
    last: &HashMap<NodeId, usize>,
    step: &HashMap<NodeId, usize>,
    bytes: &HashMap<NodeId, usize>,
) -> Option<NodeId> {
    let node = graph.node(id);
    if !matches!(node.op, Op::Unary(_) | Op::Binary(_)) {
        return None;
    }
    let operands = graph.operands(id);
    operands.iter().copied().find(|&operand| {
        let source = graph.node(operand);
        owner(operand) == operand
            && bytes.contains_key(&operand)
            && source.ty == node.ty
            && last.get(&operand) == Some(&step[&id])
            && operands.iter().filter(|&&o| owner(o) == operand).count() == 1
    })
}

struct PlanText<'a> {
    plan: &'a MemoryPlan,
    graph: &'a Graph,
}

impl fmt::Display for PlanText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |step: usize| {
            self.plan
                .order
                .get(step)
                .map_or("(output)".to_string(), |&id| {
                    format!("%{}", self.graph.node(id).name)
                })
        };
        writeln!(f, "{:>12} {:>12}  {:<40} live", "offset", "bytes", "buffer")?;
        for &id in &self.plan.order {
            if let Some(buffer) = self.plan.buffers.get(&id) {
                let shared = match buffer.in_place_of {
                    Some(victim) => format!(" (in place of %{})", self.graph.node(victim).name),
                    None => String::new(),
                };
                writeln!(
                    f,
                    "{:>12} {:>12}  {:<40} {} .. {}{shared}",
                    buffer.offset,
                    buffer.bytes,
                    format!("%{}", self.graph.node(id).name),
                    name(buffer.first),
                    name(buffer.last),
                )?;
            }
        }
        writeln!(
            f,
            "arena: {} bytes at the symbols' maxima ({} without sharing, {} buffers, {} in place)",
            self.plan.arena_bytes,
            self.plan.unshared_bytes,
            self.plan.buffers.len(),
            self.plan
                .buffers
                .values()
                .filter(|b| b.in_place_of.is_some())
                .count()
        )
    }
}
