//! The fusion report: for each pattern, how many sites the frontend's graph has, how many the
//! final graph fused, and for each site left unfused, which part of the pattern did not match
//! and where. Also Graphviz output of a graph.

use crate::egraph::EPILOGUE_ACTIVATIONS;
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{Graph, NodeId, Op};
use std::collections::BTreeMap;
use std::fmt;

/// A site a pattern could have fused and did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    /// The node that marks the site (the softmax of an attention, the erf of a GELU, ...).
    pub node: String,
    /// Which part of the pattern failed, naming the nodes involved.
    pub reason: String,
}

/// One pattern's tally.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatternReport {
    /// Sites: fused plus missed.
    pub sites: usize,
    /// Fused ops of this kind in the final graph.
    pub fused: usize,
    /// The sites left unfused.
    pub misses: Vec<Miss>,
}

/// Every pattern's tally, by pattern name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusionReport {
    /// By pattern name: `attention`, `epilogue`, `gelu`, `layernorm`, `rmsnorm`, `rope`, `silu`,
    /// `swiglu`.
    pub patterns: BTreeMap<&'static str, PatternReport>,
}

impl FusionReport {
    /// `{"patterns": {"attention": {"sites": M, "fused": N, "misses": [...]}, ...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let patterns: serde_json::Map<String, serde_json::Value> = self
            .patterns
            .iter()
            .map(|(name, p)| {
                let misses: Vec<serde_json::Value> = p
                    .misses
                    .iter()
                    .map(|m| serde_json::json!({"node": m.node, "reason": m.reason}))
                    .collect();
                (
                    name.to_string(),
                    serde_json::json!({"sites": p.sites, "fused": p.fused, "misses": misses}),
                )
            })
            .collect();
        serde_json::json!({ "patterns": patterns })
    }
}

impl fmt::Display for FusionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, p) in &self.patterns {
            writeln!(f, "{name:<10} {} of {} fused", p.fused, p.sites)?;
            for miss in &p.misses {
                writeln!(f, "  not fused at %{}: {}", miss.node, miss.reason)?;
            }
        }
        Ok(())
    }
}

/// What the passes fused in `g`, and why each site they left was not fused. Sites are the fused
/// ops plus the anchors still in the graph, so a softmax kept for another reader after its
/// attention fused counts once more, as a miss.
pub fn fusion_report(g: &Graph) -> FusionReport {
    let mut patterns = BTreeMap::new();
    let count =
        |pred: &dyn Fn(&Op) -> bool| g.node_ids().filter(|&id| pred(&g.node(id).op)).count();
    let tally = |fused: usize, misses: Vec<Miss>| PatternReport {
        sites: fused + misses.len(),
        fused,
        misses,
    };
    patterns.insert(
        "attention",
        tally(
            count(&|op| matches!(op, Op::Attention(_))),
            misses(
                g,
                |id| matches!(g.node(id).op, Op::Softmax { .. }),
                |id| attention_miss(g, id),
            ),
        ),
    );
    patterns.insert(
        "layernorm",
        tally(
            count(&|op| matches!(op, Op::LayerNorm { .. })),
            misses(
                g,
                |id| is_centering(g, id),
                |id| {
                    format!(
                "x - mean(x) is not followed by the rest of a layer norm over the last axis \
                 ((x - mean) / sqrt(mean((x - mean)^2) + eps) * gamma + beta); it is read by {}",
                users(g, id)
            )
                },
            ),
        ),
    );
    patterns.insert(
        "rmsnorm",
        tally(
            count(&|op| matches!(op, Op::RmsNorm { .. })),
            misses(g, |id| is_mean_square(g, id), |id| format!(
                "mean(x^2) is not part of x / sqrt(mean(x^2) + eps) * gamma over the last axis; it is read by {}",
                users(g, id)
            )),
        ),
    );
    patterns.insert(
        "gelu",
        tally(
            count(&|op| {
                matches!(op, Op::Unary(UnaryOp::Gelu | UnaryOp::GeluTanh))
                    || matches!(op, Op::Gemm(gemm) if matches!(gemm.activation, Some(UnaryOp::Gelu | UnaryOp::GeluTanh)))
            }),
            misses(
                g,
                |id| matches!(g.node(id).op, Op::Unary(UnaryOp::Erf)),
                |id| format!(
                    "erf is not inside x * 0.5 * (1 + erf(x / sqrt 2)); it reads {} and is read by {}",
                    operands(g, id),
                    users(g, id)
                ),
            ),
        ),
    );
    patterns.insert(
        "silu",
        tally(
            count(&|op| {
                matches!(op, Op::Unary(UnaryOp::Silu) | Op::SwiGlu)
                    || matches!(op, Op::Gemm(gemm) if gemm.activation == Some(UnaryOp::Silu))
            }),
            misses(
                g,
                |id| matches!(g.node(id).op, Op::Unary(UnaryOp::Sigmoid)),
                |id| {
                    format!(
                        "sigmoid(x) is not multiplied by the same x; it is read by {}",
                        users(g, id)
                    )
                },
            ),
        ),
    );
    patterns.insert(
        "swiglu",
        tally(
            count(&|op| matches!(op, Op::SwiGlu)),
            misses(
                g,
                |id| is_gated_silu(g, id),
                |id| {
                    format!(
                        "silu(x @ w_gate) * y is not gated by y = x @ w_up of the same x and one weight type; it reads {}",
                        operands(g, id)
                    )
                },
            ),
        ),
    );
    patterns.insert(
        "rope",
        tally(
            count(&|op| matches!(op, Op::Rope { .. })),
            misses(
                g,
                |id| is_rotate_half(g, id),
                |id| {
                    format!(
                        "concat(-x2, x1) is not in x * cos + concat(-x2, x1) * sin; it is read by {}",
                        users(g, id)
                    )
                },
            ),
        ),
    );
    patterns.insert(
        "epilogue",
        tally(
            count(&|op| {
                matches!(op, Op::Gemm(gemm) if gemm.bias || gemm.activation.is_some() || gemm.residual)
            }),
            misses(
                g,
                |id| is_finished_product(g, id),
                |id| {
                    format!(
                        "the matrix product's bias, activation or residual add stays a separate op; it is read by {}",
                        users(g, id)
                    )
                },
            ),
        ),
    );
    FusionReport { patterns }
}

/// A product with a SiLU of a matrix product, the gate of a SwiGLU.
fn is_gated_silu(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::Binary(BinaryOp::Mul))
        && g.operands(id).into_iter().any(|o| match &g.node(o).op {
            Op::Gemm(gemm) => gemm.activation == Some(UnaryOp::Silu),
            Op::Unary(UnaryOp::Silu) => g
                .operands(o)
                .iter()
                .any(|&p| matches!(g.node(p).op, Op::MatMul | Op::Gemm(_))),
            _ => false,
        })
}

/// A concatenation of a negated tensor and another, HF's `rotate_half`.
fn is_rotate_half(g: &Graph, id: NodeId) -> bool {
    let operands = g.operands(id);
    matches!(g.node(id).op, Op::Concat { .. })
        && operands.len() == 2
        && matches!(g.node(operands[0]).op, Op::Unary(UnaryOp::Neg))
}

/// A matrix product by a 2-D operand, without an epilogue, read by an add or an activation a
/// gemm epilogue takes.
fn is_finished_product(g: &Graph, id: NodeId) -> bool {
    let plain_product = match &g.node(id).op {
        Op::MatMul => {
            let operands = g.operands(id);
            g.node(operands[0]).ty.rank() >= 2 && g.node(operands[1]).ty.rank() == 2
        }
        Op::Gemm(gemm) => !gemm.bias && gemm.activation.is_none() && !gemm.residual,
        _ => false,
    };
    plain_product
        && g.users(id).into_iter().any(|user| match g.node(user).op {
            Op::Binary(BinaryOp::Add) => true,
            Op::Unary(unary) => EPILOGUE_ACTIVATIONS.contains(&unary),
            _ => false,
        })
}

/// The sites `anchor` marks, in the graph's canonical order, each with its `reason`.
fn misses(
    g: &Graph,
    anchor: impl Fn(NodeId) -> bool,
    reason: impl Fn(NodeId) -> String,
) -> Vec<Miss> {
    g.order()
        .into_iter()
        .filter(|&id| anchor(id))
        .map(|id| Miss {
            node: g.node(id).name.clone(),
            reason: reason(id),
        })
        .collect()
}

fn describe(g: &Graph, id: NodeId) -> String {
    let node = g.node(id);
    format!("%{} ({})", node.name, node.op.name())
}

fn users(g: &Graph, id: NodeId) -> String {
    let list: Vec<String> = g.users(id).into_iter().map(|u| describe(g, u)).collect();
    if list.is_empty() {
        "nothing".into()
    } else {
        list.join(", ")
    }
}

fn operands(g: &Graph, id: NodeId) -> String {
    let list: Vec<String> = g.operands(id).into_iter().map(|u| describe(g, u)).collect();
    list.join(", ")
}

fn is_mean(g: &Graph, id: NodeId) -> bool {
    matches!(
        &g.node(id).op,
        Op::Reduce {
            op: ReduceOp::Mean,
            ..
        }
    )
}

/// `x - mean(x)`.
fn is_centering(g: &Graph, id: NodeId) -> bool {
    let operands = g.operands(id);
    matches!(g.node(id).op, Op::Binary(BinaryOp::Sub))
        && is_mean(g, operands[1])
        && g.operands(operands[1])[0] == operands[0]
}

/// `mean(x^2)` or `mean(x * x)` of an `x` that is not centered (that is a layer norm's variance).
fn is_mean_square(g: &Graph, id: NodeId) -> bool {
    if !is_mean(g, id) {
        return false;
    }
    let square = g.operands(id)[0];
    let base = g.operands(square);
    let squared = match g.node(square).op {
        Op::Binary(BinaryOp::Pow) => true,
        Op::Binary(BinaryOp::Mul) => base[0] == base[1],
        _ => false,
    };
    squared && !is_centering(g, base[0])
}

/// Why the attention around `softmax` was not fused: the first part of
/// `softmax(q @ k^T * scale + mask) @ v` that does not match.
fn attention_miss(g: &Graph, softmax: NodeId) -> String {
    let last = g.node(softmax).ty.rank() as i64 - 1;
    if !matches!(g.node(softmax).op, Op::Softmax { axis } if axis == -1 || axis == last) {
        return "softmax is not over the last axis".into();
    }
    let readers = g.users(softmax);
    let weighted = readers
        .iter()
        .all(|&u| matches!(g.node(u).op, Op::MatMul) && g.operands(u)[0] == softmax);
    if readers.is_empty() || !weighted {
        return format!(
            "the probabilities must be read only as the left operand of a matmul with the values; they are read by {}",
            users(g, softmax)
        );
    }
    let mut scores = g.operands(softmax)[0];
    let mut steps = Vec::new();
    loop {
        let op = &g.node(scores).op;
        let next = match op {
            Op::Binary(BinaryOp::Add) => {
                steps.push("additive mask");
                Some(g.operands(scores)[0])
            }
            Op::Where => {
                steps.push("boolean mask");
                Some(g.operands(scores)[1])
            }
            Op::Binary(BinaryOp::Mul | BinaryOp::Div) => {
                steps.push("scale");
                Some(g.operands(scores)[0])
            }
            _ => None,
        };
        match next {
            Some(n) if steps.len() <= 3 => scores = n,
            _ => break,
        }
    }
    let product = g.node(scores);
    if !matches!(product.op, Op::MatMul) {
        return format!(
            "after {} the scores come from {}, expected matmul(q, transpose(k, [0, 1, 3, 2]))",
            if steps.is_empty() {
                "nothing".to_string()
            } else {
                steps.join(", ")
            },
            describe(g, scores)
        );
    }
    let key = g.operands(scores)[1];
    if !matches!(&g.node(key).op, Op::Transpose { perm } if perm == &[0, 1, 3, 2]) {
        return format!(
            "the keys of {} come from {}, expected a transpose of the last two axes of [batch, heads, seq, head_dim] keys",
            describe(g, scores),
            describe(g, key)
        );
    }
    format!(
        "the pattern's structure matched at {} but its values or types were refused: scale and fill must be constants, masks must broadcast to the scores, q/k/v must be [batch, heads, seq, head_dim]",
        describe(g, scores)
    )
}

/// The graph in Graphviz `dot` syntax: one box per node with its op and type, edges in operand
/// order; fused ops filled.
pub fn to_dot(graph: &Graph) -> String {
    let mut out = format!(
        "digraph {:?} {{\n  node [shape=box, fontname=\"monospace\"];\n",
        graph.name()
    );
    let order = graph.order();
    let index: BTreeMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        let style = if node.op.is_fused() {
            ", style=filled, fillcolor=\"#ffd58a\""
        } else {
            ""
        };
        let label = format!("%{}\\n{}\\n{}", node.name, node.op.name(), node.ty);
        out.push_str(&format!("  n{i} [label={:?}{style}];\n", label).replace("\\\\n", "\\n"));
    }
    for &id in &order {
        for (slot, operand) in graph.operands(id).into_iter().enumerate() {
            out.push_str(&format!(
                "  n{} -> n{} [label=\"{slot}\"];\n",
                index[&operand], index[&id]
            ));
        }
    }
    for (name, id) in graph.outputs() {
        out.push_str(&format!(
            "  out_{i} [label={name:?}, shape=ellipse];\n  n{} -> out_{i};\n",
            index[id],
            i = index[id]
        ));
    }
    out.push_str("}\n");
    out
}
