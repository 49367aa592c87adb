//! The e-graph stage: a graph is lowered into an e-graph of [`TensorLang`], rewritten to
//! saturation (within limits) by canonicalizing and fusion rules, and the cheapest equivalent
//! program under the [`cost`] model is lifted back to a graph.

mod cost;
mod extract;
mod lang;
mod rules;

pub use lang::{is_elementwise, MAX_FOLDED_ELEMENTS};
pub use lang::{ClassData, LeafName, OpLabel, ScalarLeaf, TensorLang, TypeAnalysis};
pub use rules::EPILOGUE_ACTIVATIONS;

use crate::cleanup::{drop_unused_weights, unused_weight_name, Rebuild};
use crate::pipeline::PassOutput;
use crate::PassOptions;
use egg::{Id, Language, Runner, StopReason};
use kiln_ir::{DType, Graph, NodeId, Op, Weight};
use lang::{EGraph, LeafInfo};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Bounds on equality saturation; whichever is reached first stops it.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Rewrite iterations.
    pub iterations: usize,
    /// E-nodes in the e-graph.
    pub nodes: usize,
    /// Wall time.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            iterations: 16,
            nodes: 1_000_000,
            time: Duration::from_secs(20),
        }
    }
}

/// A graph in an e-graph: the e-class of every source node, and the node whose name each e-class
/// keeps when lifted.
struct Lowered {
    egraph: EGraph,
    classes: HashMap<NodeId, Id>,
}

/// Lowers every node the outputs read. Attributes are put in a canonical form that uses the
/// operand ranks (negative axes), so that rule patterns need one spelling.
fn lower(graph: &Graph) -> Result<Lowered, String> {
    let mut analysis = TypeAnalysis {
        maxima: graph.maxima(),
        ..TypeAnalysis::default()
    };
    for id in graph.node_ids() {
        let node = graph.node(id);
        let (weight, scalar) = match &node.op {
            Op::Input => (None, None),
            Op::Constant { weight } => (Some(weight.clone()), scalar_weight(graph, weight)),
            _ => continue,
        };
        analysis.leaves.insert(
            node.name.as_str().into(),
            LeafInfo {
                ty: node.ty.clone(),
                scalar,
                weight,
            },
        );
    }
    let mut egraph = EGraph::new(analysis);
    let mut classes = HashMap::new();
    for id in graph.order() {
        let node = graph.node(id);
        let enode = match &node.op {
            Op::Input | Op::Constant { .. } => {
                TensorLang::Leaf(LeafName(node.name.as_str().into()))
            }
            op => {
                let operands = graph.operands(id);
                let rank = operands.first().map_or(0, |&o| graph.node(o).ty.rank());
                let children = operands.iter().map(|o| classes[o]).collect();
                TensorLang::Op(OpLabel::new(canonical_attributes(op, rank)), children)
            }
        };
        classes.insert(id, egraph.add(enode));
    }
    egraph.rebuild();
    Ok(Lowered { egraph, classes })
}

/// Reductions and softmax over negative axes.
fn canonical_attributes(op: &Op, rank: usize) -> Op {
    let negative = |axis: i64| if axis >= 0 { axis - rank as i64 } else { axis };
    match op {
        Op::Reduce {
            op,
            axes,
            keep_dims,
        } => {
            let mut axes: Vec<i64> = axes.iter().map(|&a| negative(a)).collect();
            axes.sort_unstable();
            Op::Reduce {
                op: *op,
                axes,
                keep_dims: *keep_dims,
            }
        }
        Op::Softmax { axis } => Op::Softmax {
            axis: negative(*axis),
        },
        other => other.clone(),
    }
}

/// The value of a one-element f32 weight.
fn scalar_weight(graph: &Graph, weight: &str) -> Option<f32> {
    let w = graph.weights().get(weight)?;
    if w.dtype != DType::F32 || w.numel() != 1 {
        return None;
    }
    let bytes: [u8; 4] = w.data.as_ref()?.bytes().try_into().ok()?;
    Some(f32::from_le_bytes(bytes))
}

/// Runs the rules to saturation or a limit and reports the run.
fn saturate(
    egraph: EGraph,
    rules: &[egg::Rewrite<TensorLang, TypeAnalysis>],
    limits: &Limits,
) -> (EGraph, Vec<String>) {
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(rules);
    let stop = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("stopped at the iteration limit {n}"),
        Some(StopReason::NodeLimit(n)) => format!("stopped at the node limit {n}"),
        Some(StopReason::TimeLimit(_)) => "stopped at the time limit".to_string(),
        Some(StopReason::Other(why)) => format!("stopped: {why}"),
        None => "stopped".to_string(),
    };
    let mut fired: HashMap<String, usize> = HashMap::new();
    for iteration in &runner.iterations {
        for (rule, count) in &iteration.applied {
            *fired.entry(rule.to_string()).or_default() += count;
        }
    }
    let mut fired: Vec<(String, usize)> = fired.into_iter().filter(|(_, n)| *n > 0).collect();
    fired.sort();
    let mut notes = vec![format!(
        "e-graph: {} iterations, {stop}; {} e-classes, {} e-nodes",
        runner.iterations.len(),
        runner.egraph.number_of_classes(),
        runner.egraph.total_number_of_nodes()
    )];
    if !fired.is_empty() {
        let list: Vec<String> = fired.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        notes.push(format!("rules applied: {}", list.join(", ")));
    }
    (runner.egraph, notes)
}

/// Lifts the cheapest program for every output back into a graph. Each e-class is named after
/// the first source node lowered into it, so names are kept across the pass; fused nodes take
/// the name of the value they compute.
fn lift(graph: &Graph, classes: &HashMap<NodeId, Id>, egraph: &EGraph) -> Result<Graph, String> {
    let cost = cost::CostModel::new(egraph);
    let extractor = extract::DagExtractor::new(egraph, &cost);
    let mut names: HashMap<Id, &str> = HashMap::new();
    for id in graph.order() {
        names
            .entry(egraph.find(classes[&id]))
            .or_insert(graph.node(id).name.as_str());
    }
    let source_names: HashSet<&str> = graph
        .node_ids()
        .map(|id| graph.node(id).name.as_str())
        .collect();
    let mut rebuild = Rebuild::new(graph)?;
    let mut lifted: HashMap<Id, NodeId> = HashMap::new();
    for &id in graph.inputs() {
        lifted.insert(egraph.find(classes[&id]), rebuild.mapped[&id]);
    }
    let mut outputs = Vec::new();
    for (name, id) in graph.outputs() {
        let root = egraph.find(classes[id]);
        let node = lift_class(
            &mut rebuild.graph,
            egraph,
            &extractor,
            &names,
            &mut lifted,
            &source_names,
            root,
        )?;
        outputs.push((name.clone(), node));
    }
    let mut lifted_graph = rebuild.graph;
    for (name, node) in outputs {
        lifted_graph
            .add_output(&name, node)
            .map_err(|e| e.to_string())?;
    }
    Ok(drop_unused_weights(lifted_graph))
}

fn lift_class(
    graph: &mut Graph,
    egraph: &EGraph,
    extractor: &extract::DagExtractor,
    names: &HashMap<Id, &str>,
    lifted: &mut HashMap<Id, NodeId>,
    source_names: &HashSet<&str>,
    root: Id,
) -> Result<NodeId, String> {
    // Iterative post-order: models are deep enough to overflow a recursive walk.
    let mut stack = vec![(egraph.find(root), false)];
    while let Some((class, expanded)) = stack.pop() {
        if lifted.contains_key(&class) {
            continue;
        }
        let enode = extractor
            .find_best_node(class)
            .ok_or_else(|| format!("e-class {class} has no well-typed program"))?
            .clone();
        if !expanded {
            stack.push((class, true));
            for &child in enode.children() {
                let child = egraph.find(child);
                if !lifted.contains_key(&child) {
                    stack.push((child, false));
                }
            }
            continue;
        }
        let name = match names.get(&class) {
            Some(name) => name.to_string(),
            None => {
                let first_operand = enode
                    .children()
                    .first()
                    .map(|c| graph.node(lifted[&egraph.find(*c)]).name.as_str());
                unused_name(graph, source_names, &fresh_name(&enode, first_operand))
            }
        };
        let node = match &enode {
            TensorLang::Leaf(leaf) => match graph.find(&leaf.0) {
                Some(existing) => existing,
                None => {
                    let weight = egraph.analysis.leaves[&leaf.0]
                        .weight
                        .as_deref()
                        .ok_or_else(|| format!("leaf %{} is not an input of the graph", leaf.0))?;
                    graph
                        .add_constant_node(&leaf.0, weight)
                        .map_err(|e| e.to_string())?
                }
            },
            TensorLang::Scalar(leaf) => {
                let weight_name = unused_weight_name(graph, &name);
                let shape = vec![1; usize::from(leaf.ty().rank() as u8)];
                let weight = Weight::owned(DType::F32, shape, leaf.value().to_le_bytes().to_vec())
                    .map_err(|e| e.to_string())?;
                graph
                    .add_constant(&name, &weight_name, weight)
                    .map_err(|e| e.to_string())?
            }
            TensorLang::Op(label, children) => {
                let operands: Vec<NodeId> =
                    children.iter().map(|c| lifted[&egraph.find(*c)]).collect();
                graph
                    .add_node(&name, label.op().clone(), &operands)
                    .map_err(|e| e.to_string())?
            }
        };
        lifted.insert(class, node);
    }
    Ok(lifted[&egraph.find(root)])
}

/// `base`, or `base.N` for the first N that names no node of the source or the lifted graph.
fn unused_name(graph: &Graph, source_names: &HashSet<&str>, base: &str) -> String {
    let free = |n: &str| !source_names.contains(n) && graph.find(n).is_none();
    if free(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}.{i}"))
        .find(|n| free(n))
        .expect("an unused suffix exists")
}

/// A name for an e-class no source node was lowered into: after its op and the name of its
/// first operand.
fn fresh_name(enode: &TensorLang, first_operand: Option<&str>) -> String {
    match enode {
        TensorLang::Op(label, _) => {
            format!("{}.{}", first_operand.unwrap_or("t"), label.op().name())
        }
        TensorLang::Scalar(_) => "scalar".to_string(),
        TensorLang::Leaf(leaf) => leaf.0.to_string(),
    }
}

/// Runs `rules` over the graph and lifts the result.
fn rewrite(
    graph: &Graph,
    options: &PassOptions,
    rules: &[egg::Rewrite<TensorLang, TypeAnalysis>],
) -> Result<PassOutput, String> {
    let Lowered { egraph, classes } = lower(graph)?;
    let (egraph, notes) = saturate(egraph, rules, &options.saturation);
    let lifted = lift(graph, &classes, &egraph)?;
    Ok(PassOutput {
        graph: lifted,
        notes,
    })
}

/// `canonicalize`.
pub(crate) fn canonicalize(graph: &Graph, options: &PassOptions) -> Result<PassOutput, String> {
    rewrite(graph, options, &rules::canonical())
}

/// `fuse`.
pub(crate) fn fuse(graph: &Graph, options: &PassOptions) -> Result<PassOutput, String> {
    let mut rules = rules::canonical();
    rules.extend(rules::fusion());
    rewrite(graph, options, &rules)
}
