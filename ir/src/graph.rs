//! The graph: a DAG of [`Node`]s on petgraph, with named inputs and outputs, symbolic dims and
//! the weight store behind its constants.

use crate::ops::{InferCtx, Op, TensorType};
use crate::weights::{Weight, WeightStore};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A node handle. Valid only for the graph that issued it; prints as `node#N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex<u32>);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0.index())
    }
}

/// One operation and the type of its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Unique within the graph; printed as `%name`. Passes keep names stable so that the text of
    /// two stages diffs line by line.
    pub name: String,
    /// What the node computes.
    pub op: Op,
    /// The output's dtype and dims.
    pub ty: TensorType,
}

/// A symbolic dim and its compile-time maximum; at run time it takes a value in `1..=max`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    /// The name used in dims, e.g. `seq`.
    pub name: String,
    /// The largest value it may take.
    pub max: i64,
}

/// An error building or checking a graph. Node errors name the node and its op.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// A problem with one node.
    #[error("node %{node} ({op}): {message}")]
    Node {
        /// The node's name.
        node: String,
        /// The node's op name.
        op: String,
        /// What is wrong.
        message: String,
    },
    /// A problem with the graph as a whole.
    #[error("{0}")]
    Graph(String),
}

/// Names that cannot be symbols because the text format reads them as literals or keywords.
const RESERVED: [&str; 5] = ["inf", "nan", "NaN", "true", "false"];

/// A tensor program: nodes in a DAG, inputs and outputs by name, symbolic dims with maxima and
/// the weights of its constants.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    name: String,
    symbols: Vec<Symbol>,
    weights_file: Option<String>,
    dag: StableDiGraph<Node, u32, u32>,
    by_name: HashMap<String, NodeId>,
    inputs: Vec<NodeId>,
    outputs: Vec<(String, NodeId)>,
    weights: WeightStore,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// The graph's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Declared symbols, in declaration order.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// The maximum of every symbol, by name.
    pub fn maxima(&self) -> HashMap<String, i64> {
        self.symbols
            .iter()
            .map(|s| (s.name.clone(), s.max))
            .collect()
    }

    /// Declares a symbolic dim with its maximum.
    pub fn declare_symbol(&mut self, name: &str, max: i64) -> Result<(), GraphError> {
        if self.symbols.iter().any(|s| s.name == name) {
            return Err(GraphError::Graph(format!(
                "symbol `{name}` is declared twice"
            )));
        }
        if RESERVED.contains(&name) || !is_identifier(name) {
            return Err(GraphError::Graph(format!("`{name}` cannot name a symbol")));
        }
        if max < 1 {
            return Err(GraphError::Graph(format!(
                "symbol `{name}` needs a maximum >= 1, got {max}"
            )));
        }
        self.symbols.push(Symbol {
            name: name.to_string(),
            max,
        });
        Ok(())
    }

    /// The safetensors file (relative to the `.kir` file) that holds the referenced weights.
    pub fn weights_file(&self) -> Option<&str> {
        self.weights_file.as_deref()
    }

    /// Sets the weights file recorded in the text form.
    pub fn set_weights_file(&mut self, path: Option<String>) {
        self.weights_file = path;
    }

    /// The weight store.
    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    /// Mutable access to the weight store.
    pub fn weights_mut(&mut self) -> &mut WeightStore {
        &mut self.weights
    }

    /// Graph inputs, in declaration order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// Graph outputs: name and producing node, in declaration order.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The node behind a handle.
    ///
    /// # Panics
    /// If `id` was not issued by this graph.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id.0]
    }

    /// Looks a node up by name.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    /// True when the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    /// Every node, in insertion order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.dag.node_indices().map(NodeId)
    }

    /// The operands of a node, in order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .dag
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect();
        edges.sort_unstable_by_key(|&(slot, _)| slot);
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that read `id`, each once, in insertion order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .dag
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    /// A node name not yet used, derived from `base` (`base`, `base.1`, `base.2`, ...).
    pub fn unique_name(&self, base: &str) -> String {
        if !self.by_name.contains_key(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}.{i}"))
            .find(|n| !self.by_name.contains_key(n))
            .expect("an unused suffix exists")
    }

    fn check_new_name(&self, name: &str) -> Result<(), GraphError> {
        if name.is_empty() {
            return Err(GraphError::Graph("node names must not be empty".into()));
        }
        if self.by_name.contains_key(name) {
            return Err(GraphError::Graph(format!("node %{name} is defined twice")));
        }
        Ok(())
    }

    fn check_type(&self, node: &str, op: &Op, ty: &TensorType) -> Result<(), GraphError> {
        let declared: HashSet<&str> = self.symbols.iter().map(|s| s.name.as_str()).collect();
        let mut missing = None;
        let mut visit = |s: &str| {
            if !declared.contains(s) && missing.is_none() {
                missing = Some(s.to_string());
            }
        };
        ty.shape
            .0
            .iter()
            .for_each(|d| d.for_each_symbol(&mut visit));
        op.for_each_dim(|d| d.for_each_symbol(&mut visit));
        if let Some(symbol) = missing {
            return Err(node_error(
                node,
                op,
                format!("symbol `{symbol}` is not declared"),
            ));
        }
        match ty
            .shape
            .0
            .iter()
            .find(|d| d.as_const().is_some_and(|v| v < 0))
        {
            Some(bad) => Err(node_error(node, op, format!("negative dim {bad} in {ty}"))),
            None => Ok(()),
        }
    }

    fn insert(&mut self, node: Node, operands: &[NodeId]) -> NodeId {
        let name = node.name.clone();
        let id = NodeId(self.dag.add_node(node));
        for (slot, operand) in operands.iter().enumerate() {
            self.dag.add_edge(operand.0, id.0, slot as u32);
        }
        self.by_name.insert(name, id);
        id
    }

    /// Adds a graph input of the given type.
    pub fn add_input(&mut self, name: &str, ty: TensorType) -> Result<NodeId, GraphError> {
        self.check_new_name(name)?;
        self.check_type(name, &Op::Input, &ty)?;
        let id = self.insert(
            Node {
                name: name.to_string(),
                op: Op::Input,
                ty,
            },
            &[],
        );
        self.inputs.push(id);
        Ok(id)
    }

    /// Adds a weight to the store and a `const` node reading it.
    pub fn add_constant(
        &mut self,
        name: &str,
        weight_name: &str,
        weight: Weight,
    ) -> Result<NodeId, GraphError> {
        self.weights.insert(weight_name, weight);
        self.add_constant_node(name, weight_name)
    }

    /// Adds a `const` node for a weight already in the store.
    pub fn add_constant_node(
        &mut self,
        name: &str,
        weight_name: &str,
    ) -> Result<NodeId, GraphError> {
        self.check_new_name(name)?;
        let op = Op::Constant {
            weight: weight_name.to_string(),
        };
        let weight = self.weights.get(weight_name).ok_or_else(|| {
            node_error(
                name,
                &op,
                format!("weight `{weight_name}` is not in the store"),
            )
        })?;
        let ty = TensorType::new(weight.dtype, crate::Shape::fixed(&weight.shape));
        Ok(self.insert(
            Node {
                name: name.to_string(),
                op,
                ty,
            },
            &[],
        ))
    }

    /// Adds a node, inferring its type from its operands.
    pub fn add_node(
        &mut self,
        name: &str,
        op: Op,
        operands: &[NodeId],
    ) -> Result<NodeId, GraphError> {
        let ty = self.infer(name, &op, operands)?;
        self.add_node_typed(name, op, operands, ty)
    }

    /// Adds a node with a declared type, which must be equivalent to the inferred one.
    pub fn add_node_typed(
        &mut self,
        name: &str,
        op: Op,
        operands: &[NodeId],
        ty: TensorType,
    ) -> Result<NodeId, GraphError> {
        self.check_new_name(name)?;
        let inferred = self.infer(name, &op, operands)?;
        if !inferred.equiv(&ty) {
            return Err(node_error(
                name,
                &op,
                format!("declared type {ty} differs from the inferred {inferred}"),
            ));
        }
        self.check_type(name, &op, &ty)?;
        Ok(self.insert(
            Node {
                name: name.to_string(),
                op,
                ty,
            },
            operands,
        ))
    }

    /// The type `op` would produce on these operands.
    pub fn infer(
        &self,
        name: &str,
        op: &Op,
        operands: &[NodeId],
    ) -> Result<TensorType, GraphError> {
        if matches!(op, Op::Input | Op::Constant { .. }) {
            return Err(node_error(
                name,
                op,
                "inputs and constants have their own constructors".into(),
            ));
        }
        if let Some(bad) = operands.iter().find(|id| !self.dag.contains_node(id.0)) {
            return Err(node_error(
                name,
                op,
                format!("operand {bad} is not in the graph"),
            ));
        }
        let types: Vec<&TensorType> = operands.iter().map(|&id| &self.node(id).ty).collect();
        let maxima = self.maxima();
        op.infer(&types, InferCtx { maxima: &maxima })
            .map_err(|message| node_error(name, op, message))
    }

    /// Declares `node` as the graph output `name`.
    pub fn add_output(&mut self, name: &str, node: NodeId) -> Result<(), GraphError> {
        if self.outputs.iter().any(|(n, _)| n == name) {
            return Err(GraphError::Graph(format!(
                "output `{name}` is declared twice"
            )));
        }
        if !self.dag.contains_node(node.0) {
            return Err(GraphError::Graph(format!(
                "output `{name}` refers to {node}, not in the graph"
            )));
        }
        self.outputs.push((name.to_string(), node));
        Ok(())
    }

    /// Nodes in the canonical order the text format prints: inputs as declared, then a
    /// depth-first post-order from the outputs (operands left to right), then any nodes no
    /// output reads. The order depends only on the graph's structure, so passes that keep names
    /// produce readable diffs.
    pub fn order(&self) -> Vec<NodeId> {
        let mut visited: HashSet<NodeId> = self.inputs.iter().copied().collect();
        let mut order: Vec<NodeId> = self.inputs.clone();
        let roots = self
            .outputs
            .iter()
            .map(|(_, id)| *id)
            .chain(self.node_ids())
            .collect::<Vec<_>>();
        for root in roots {
            if !visited.insert(root) {
                continue;
            }
            let mut stack = vec![(root, self.operands(root), 0usize)];
            while let Some((node, operands, next)) = stack.last_mut() {
                if let Some(&operand) = operands.get(*next) {
                    *next += 1;
                    if visited.insert(operand) {
                        let operand_operands = self.operands(operand);
                        stack.push((operand, operand_operands, 0));
                    }
                } else {
                    order.push(*node);
                    stack.pop();
                }
            }
        }
        order
    }
}

pub(crate) fn node_error(node: &str, op: &Op, message: String) -> GraphError {
    GraphError::Node {
        node: node.to_string(),
        op: op.name().to_string(),
        message,
    }
}

/// True for `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
