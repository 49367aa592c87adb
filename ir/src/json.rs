//! The JSON form of a graph, for tools: the same content as the text format (nodes in
//! [`Graph::order`], weights by reference with small ones inline), through serde.

use crate::graph::{Graph, Symbol};
use crate::ops::{Op, TensorType};
use crate::weights::Weight;
use crate::DType;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphDoc {
    name: String,
    symbols: Vec<Symbol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights_file: Option<String>,
    nodes: Vec<NodeDoc>,
    outputs: Vec<OutputDoc>,
    weights: Vec<WeightDoc>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDoc {
    name: String,
    op: Op,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    operands: Vec<String>,
    #[serde(rename = "type")]
    ty: TensorType,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputDoc {
    name: String,
    node: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightDoc {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    checksum: String,
    /// Little-endian bytes in hex, for the weights [`Weight::inline_bytes`] writes inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_hex: Option<String>,
}

/// An invalid JSON graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(pub String);

/// The graph as pretty-printed JSON.
pub fn to_json(graph: &Graph) -> String {
    let order = graph.order();
    let mut weight_names: Vec<&str> = order
        .iter()
        .filter_map(|&id| match &graph.node(id).op {
            Op::Constant { weight } => Some(weight.as_str()),
            _ => None,
        })
        .collect();
    weight_names.sort_unstable();
    weight_names.dedup();
    let doc = GraphDoc {
        name: graph.name().to_string(),
        symbols: graph.symbols().to_vec(),
        weights_file: graph.weights_file().map(str::to_string),
        nodes: order
            .iter()
            .map(|&id| {
                let node = graph.node(id);
                NodeDoc {
                    name: node.name.clone(),
                    op: node.op.clone(),
                    operands: graph
                        .operands(id)
                        .iter()
                        .map(|&o| graph.node(o).name.clone())
                        .collect(),
                    ty: node.ty.clone(),
                }
            })
            .collect(),
        outputs: graph
            .outputs()
            .iter()
            .map(|(name, id)| OutputDoc {
                name: name.clone(),
                node: graph.node(*id).name.clone(),
            })
            .collect(),
        weights: weight_names
            .into_iter()
            .filter_map(|name| graph.weights().get(name).map(|w| (name, w)))
            .map(|(name, w)| WeightDoc {
                name: name.to_string(),
                dtype: w.dtype,
                shape: w.shape.clone(),
                checksum: format!("{:016x}", w.checksum),
                data_hex: w
                    .inline_bytes()
                    .map(|bytes| bytes.iter().map(|b| format!("{b:02x}")).collect()),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&doc).expect("graph documents always serialize")
}

/// Reads a graph from JSON, checking it as the builder does.
pub fn from_json(src: &str) -> Result<Graph, JsonError> {
    let doc: GraphDoc = serde_json::from_str(src).map_err(|e| JsonError(e.to_string()))?;
    let mut graph = Graph::new(doc.name);
    let fail = |e: crate::GraphError| JsonError(e.to_string());
    for symbol in &doc.symbols {
        graph
            .declare_symbol(&symbol.name, symbol.max)
            .map_err(fail)?;
    }
    graph.set_weights_file(doc.weights_file);
    for w in doc.weights {
        let checksum = u64::from_str_radix(&w.checksum, 16).map_err(|_| {
            JsonError(format!(
                "weight `{}`: invalid checksum `{}`",
                w.name, w.checksum
            ))
        })?;
        let weight = match w.data_hex {
            Some(hex) => {
                let bytes = decode_hex(&hex)
                    .ok_or_else(|| JsonError(format!("weight `{}`: invalid data_hex", w.name)))?;
                let weight = Weight::owned(w.dtype, w.shape, bytes)
                    .map_err(|e| JsonError(format!("weight `{}`: {e}", w.name)))?;
                if weight.checksum != checksum {
                    return Err(JsonError(format!(
                        "weight `{}`: data does not match its checksum",
                        w.name
                    )));
                }
                weight
            }
            None => Weight {
                dtype: w.dtype,
                shape: w.shape,
                checksum,
                data: None,
            },
        };
        graph.weights_mut().insert(w.name, weight);
    }
    for node in doc.nodes {
        let operands = node
            .operands
            .iter()
            .map(|o| {
                graph.find(o).ok_or_else(|| {
                    JsonError(format!(
                        "node `{}` reads `{o}` before it is defined",
                        node.name
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = match &node.op {
            Op::Input => graph.add_input(&node.name, node.ty.clone()).map_err(fail)?,
            Op::Constant { weight } => graph.add_constant_node(&node.name, weight).map_err(fail)?,
            op => graph
                .add_node_typed(&node.name, op.clone(), &operands, node.ty.clone())
                .map_err(fail)?,
        };
        if graph.node(id).ty != node.ty || graph.operands(id).len() != operands.len() {
            return Err(JsonError(format!(
                "node `{}` does not match its declared type or operands",
                node.name
            )));
        }
    }
    for output in doc.outputs {
        let id = graph.find(&output.node).ok_or_else(|| {
            JsonError(format!(
                "output `{}` refers to unknown node `{}`",
                output.name, output.node
            ))
        })?;
        graph.add_output(&output.name, id).map_err(fail)?;
    }
    Ok(graph)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}
