//! Graph-level cleanup: dead code and common subexpressions, and the rebuilding helper every
//! pass uses to produce a fresh graph.

use crate::pipeline::PassOutput;
use crate::PassOptions;
use kiln_ir::{Graph, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// A new graph with the same name, symbols, weights and inputs as `source`, into which a pass
/// adds the nodes it keeps. Unreferenced weights are dropped by [`Rebuild::finish`].
pub(crate) struct Rebuild<'a> {
    pub source: &'a Graph,
    pub graph: Graph,
    /// Source node to rebuilt node.
    pub mapped: HashMap<NodeId, NodeId>,
}

impl<'a> Rebuild<'a> {
    pub fn new(source: &'a Graph) -> Result<Rebuild<'a>, String> {
        let mut graph = Graph::new(source.name());
        for symbol in source.symbols() {
            graph
                .declare_symbol(&symbol.name, symbol.max)
                .map_err(|e| e.to_string())?;
        }
        graph.set_weights_file(source.weights_file().map(str::to_string));
        *graph.weights_mut() = source.weights().clone();
        let mut mapped = HashMap::new();
        for &id in source.inputs() {
            let node = source.node(id);
            let new = graph
                .add_input(&node.name, node.ty.clone())
                .map_err(|e| e.to_string())?;
            mapped.insert(id, new);
        }
        Ok(Rebuild {
            source,
            graph,
            mapped,
        })
    }

    /// Copies a source node whose operands are already mapped, under its own name.
    pub fn copy(&mut self, id: NodeId) -> Result<NodeId, String> {
        if let Some(&done) = self.mapped.get(&id) {
            return Ok(done);
        }
        let node = self.source.node(id);
        let new = match &node.op {
            Op::Constant { weight } => self.graph.add_constant_node(&node.name, weight),
            op => {
                let operands: Vec<NodeId> = self
                    .source
                    .operands(id)
                    .iter()
                    .map(|o| self.mapped[o])
                    .collect();
                self.graph
                    .add_node_typed(&node.name, op.clone(), &operands, node.ty.clone())
            }
        }
        .map_err(|e| e.to_string())?;
        self.mapped.insert(id, new);
        Ok(new)
    }

    /// Declares the source's outputs on their mapped nodes, drops weights no constant reads,
    /// and returns the graph.
    pub fn finish(mut self) -> Result<Graph, String> {
        for (name, id) in self.source.outputs() {
            let mapped = *self
                .mapped
                .get(id)
                .ok_or_else(|| format!("output `{name}` was not rebuilt"))?;
            self.graph
                .add_output(name, mapped)
                .map_err(|e| e.to_string())?;
        }
        Ok(drop_unused_weights(self.graph))
    }
}

/// `base.value`, or `base.value.N`, unused in the weight store.
pub(crate) fn unused_weight_name(graph: &Graph, base: &str) -> String {
    let base = format!("{base}.value");
    std::iter::once(base.clone())
        .chain((1..).map(|i| format!("{base}.{i}")))
        .find(|n| graph.weights().get(n).is_none())
        .expect("an unused suffix exists")
}

/// Removes weights no constant node reads.
pub(crate) fn drop_unused_weights(mut graph: Graph) -> Graph {
    let used: HashSet<String> = graph
        .node_ids()
        .filter_map(|id| match &graph.node(id).op {
            Op::Constant { weight } => Some(weight.clone()),
            _ => None,
        })
        .collect();
    graph.weights_mut().retain(|name| used.contains(name));
    graph
}

/// The nodes the outputs depend on, in the graph's canonical order.
pub(crate) fn live_order(graph: &Graph) -> Vec<NodeId> {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(graph.operands(id));
        }
    }
    graph
        .order()
        .into_iter()
        .filter(|id| live.contains(id))
        .collect()
}

/// `dce`: keeps the inputs and the nodes some output reads.
pub(crate) fn dead_code(graph: &Graph, _: &PassOptions) -> Result<PassOutput, String> {
    let mut rebuild = Rebuild::new(graph)?;
    let order = live_order(graph);
    let live_operations = order
        .iter()
        .filter(|id| !graph.inputs().contains(id))
        .count();
    let removed = graph.len() - graph.inputs().len() - live_operations;
    for id in order {
        rebuild.copy(id)?;
    }
    Ok(PassOutput {
        graph: rebuild.finish()?,
        notes: vec![format!("removed {removed} dead nodes")],
    })
}

/// `cse`: the first of several nodes with equal ops and operands stands for all of them.
pub(crate) fn common_subexpressions(graph: &Graph, _: &PassOptions) -> Result<PassOutput, String> {
    let mut rebuild = Rebuild::new(graph)?;
    let mut seen: HashMap<(Op, Vec<NodeId>), NodeId> = HashMap::new();
    let mut merged = 0usize;
    for id in live_order(graph) {
        if rebuild.mapped.contains_key(&id) {
            continue;
        }
        let operands: Vec<NodeId> = graph
            .operands(id)
            .iter()
            .map(|o| rebuild.mapped[o])
            .collect();
        let key = (graph.node(id).op.clone(), operands);
        if let Some(&same) = seen.get(&key) {
            rebuild.mapped.insert(id, same);
            merged += 1;
            continue;
        }
        let new = rebuild.copy(id)?;
        seen.insert(key, new);
    }
    Ok(PassOutput {
        graph: rebuild.finish()?,
        notes: vec![format!("merged {merged} duplicate nodes")],
    })
}
