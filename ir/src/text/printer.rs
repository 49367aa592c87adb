//! Graph to text.

use super::lexer::is_name_char;
use crate::graph::Graph;
use crate::ops::{write_attr_list, Op};
use crate::tensor::{Data, Tensor};
use crate::weights::Weight;
use std::fmt::Write;

/// Prints `graph` in the text format.
pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    write_graph(&mut out, graph).expect("writing to a String cannot fail");
    out
}

fn write_graph(out: &mut String, graph: &Graph) -> std::fmt::Result {
    writeln!(out, "graph {:?} {{", graph.name())?;
    for symbol in graph.symbols() {
        writeln!(out, "  sym {} <= {}", symbol.name, symbol.max)?;
    }
    if let Some(path) = graph.weights_file() {
        writeln!(out, "  weights {path:?}")?;
    }
    for id in graph.order() {
        let node = graph.node(id);
        let name = node_name(&node.name);
        match &node.op {
            Op::Input => writeln!(out, "  input {name} : {}", node.ty)?,
            Op::Constant { weight } => {
                write!(out, "  {name} = const {weight:?}")?;
                match graph.weights().get(weight) {
                    Some(w) if inline_values(w).is_some() => {
                        let values = inline_values(w).unwrap_or_default();
                        writeln!(out, " [{}] : {}", values.join(", "), node.ty)?;
                    }
                    Some(w) => writeln!(out, " : {} checksum 0x{:016x}", node.ty, w.checksum)?,
                    None => writeln!(out, " : {}", node.ty)?,
                }
            }
            op => {
                write!(out, "  {name} = {}", op.name())?;
                let operands = graph.operands(id);
                if !operands.is_empty() {
                    let names: Vec<String> = operands
                        .iter()
                        .map(|&o| node_name(&graph.node(o).name))
                        .collect();
                    write!(out, "({})", names.join(", "))?;
                }
                let attrs = op.attrs();
                if !attrs.is_empty() {
                    out.push_str(" {");
                    write_attr_list(out, attrs.iter().map(|(k, v)| (*k, v)))?;
                    out.push('}');
                }
                writeln!(out, " : {}", node.ty)?;
            }
        }
    }
    for (name, id) in graph.outputs() {
        writeln!(
            out,
            "  output {name:?} = {}",
            node_name(&graph.node(*id).name)
        )?;
    }
    out.push_str("}\n");
    Ok(())
}

/// `%name`, quoted when it holds characters a bare name cannot.
pub(super) fn node_name(name: &str) -> String {
    if !name.is_empty() && name.chars().all(is_name_char) {
        format!("%{name}")
    } else {
        format!("%{name:?}")
    }
}

/// The values of a weight the text writes inline: a small one that the graph owns (weights read
/// from a file print by reference, so that the text and the file stay separate).
fn inline_values(weight: &Weight) -> Option<Vec<String>> {
    let bytes = weight.inline_bytes()?;
    let tensor = Tensor::from_le_bytes(weight.dtype, weight.shape.clone(), bytes).ok()?;
    Some(match tensor.data() {
        Data::F32(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        Data::F16(v) => v.iter().map(|x| format!("{:?}", x.to_f32())).collect(),
        Data::BF16(v) => v.iter().map(|x| format!("{:?}", x.to_f32())).collect(),
        Data::Bool(v) => v.iter().map(|x| x.to_string()).collect(),
        Data::I64(_) | Data::I32(_) | Data::I8(_) | Data::U8(_) => {
            tensor.to_i64s().iter().map(|x| x.to_string()).collect()
        }
    })
}
