//! A generator of random, valid graphs over every op, shared by the property tests.

use kiln_ir::ops::{ArgOp, Attention, BinaryOp, Gemm, MaskSpec, ReduceOp, UnaryOp};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Scalar, Shape, TensorType, Weight, F32};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::ops::Mul;

/// One construction step: which op to try and the numbers that pick its operands and attributes.
type Step = (u8, u16, u16, u16);

const FLOATS: [f32; 8] = [
    1e-12,
    0.125,
    -0.0,
    3.402_823_5e38,
    1.0 / 3.0,
    f32::MIN_POSITIVE,
    f32::INFINITY,
    1e-5,
];

fn pick<T: Clone>(items: &[T], k: u16) -> T {
    items[k as usize % items.len()].clone()
}

fn node_name(graph: &Graph, i: usize, flavor: u16) -> String {
    let base = match flavor % 5 {
        0 => format!("n{i}"),
        1 => format!("/layer.{i}/Add_1"),
        2 => format!("onnx::Shape_{i}"),
        3 => format!("with space {i}"),
        _ => format!("grüße-{i}"),
    };
    graph.unique_name(&base)
}

fn shapes() -> Vec<Shape> {
    let s = Dim::sym;
    vec![
        Shape(vec![s("seq"), Dim::Const(4)]),
        Shape(vec![s("batch"), s("seq"), Dim::Const(8)]),
        Shape(vec![Dim::Const(2), Dim::Const(3)]),
        Shape(vec![s("batch"), Dim::Const(2), s("seq"), Dim::Const(4)]),
        Shape(vec![Dim::Const(4)]),
        Shape(vec![]),
        Shape(vec![Dim::mul(s("batch"), s("seq")), Dim::Const(8)]),
        Shape(vec![s("seq")]),
        Shape(vec![s("batch"), s("seq")]),
    ]
}

/// A node whose type satisfies `wanted`, or any node if none does.
fn choose(graph: &Graph, nodes: &[NodeId], k: u16, wanted: impl Fn(&TensorType) -> bool) -> NodeId {
    let fitting: Vec<NodeId> = nodes
        .iter()
        .copied()
        .filter(|&id| wanted(&graph.node(id).ty))
        .collect();
    let pool = if fitting.is_empty() { nodes } else { &fitting };
    pool[k as usize % pool.len()]
}

fn constant(graph: &mut Graph, i: usize, a: u16, b: u16) -> Option<NodeId> {
    let dtype = pick(
        &[DType::F32, DType::I64, DType::F16, DType::Bool, DType::U8],
        a,
    );
    let dims = pick(
        &[vec![4usize], vec![2, 3], vec![], vec![8, 8], vec![3, 4, 2]],
        b,
    );
    let numel: usize = dims.iter().product();
    let bytes: Vec<u8> = (0..numel * dtype.size_bytes())
        .map(|j| match dtype {
            DType::Bool => (j % 2) as u8,
            _ => (j as u8).wrapping_mul(37).wrapping_add(a as u8) & 0x3f,
        })
        .collect();
    let mut weight = Weight::owned(dtype, dims, bytes).ok()?;
    if b % 7 == 3 {
        weight.data = None;
    }
    let name = node_name(graph, i, a);
    graph
        .add_constant(&name, &format!("weights.{i}"), weight)
        .ok()
}

fn op_for(step: Step, a_ty: &TensorType) -> Op {
    let (kind, _, p, q) = step;
    let rank = a_ty.rank() as i64;
    match kind % 23 {
        0 => Op::Unary(pick(&UnaryOp::ALL, p)),
        1 => Op::Binary(pick(&BinaryOp::ALL, p)),
        2 => Op::Cast {
            to: pick(&DType::ALL, p),
        },
        3 => Op::MatMul,
        4 => Op::Reduce {
            op: pick(&ReduceOp::ALL, p),
            axes: vec![-1 - (q as i64 % rank.max(1))],
            keep_dims: q % 2 == 0,
        },
        5 => Op::Softmax { axis: -1 },
        6 => {
            let mut perm: Vec<usize> = (0..a_ty.rank()).collect();
            perm.rotate_left(p as usize % a_ty.rank().max(1));
            Op::Transpose { perm }
        }
        7 => Op::Reshape {
            shape: Shape(vec![a_ty.shape.numel()]),
        },
        8 => Op::Expand {
            shape: Shape(
                vec![Dim::Const(2)]
                    .into_iter()
                    .chain(a_ty.shape.0.iter().cloned())
                    .collect(),
            ),
        },
        9 => Op::Concat { axis: -1 },
        10 => Op::Slice {
            axis: -1,
            start: Dim::Const(p as i64 % 3 - 1),
            end: pick(&[Dim::Const(2), Dim::Const(-1), Dim::sym("seq")], q),
            step: pick(&[1, 2, -1], p),
        },
        11 => Op::Gather { axis: 0 },
        12 => Op::LayerNorm {
            axis: -1,
            eps: F32(pick(&FLOATS, p)),
        },
        13 => Op::RmsNorm {
            eps: F32(pick(&FLOATS, q)),
        },
        14 => Op::Attention(Attention {
            scale: F32(pick(&FLOATS, p)),
            mask: pick(
                &[
                    MaskSpec::Dense,
                    MaskSpec::Causal,
                    MaskSpec::SlidingWindow { window: 3 },
                    MaskSpec::GlobalLocal {
                        global: 1,
                        window: 2,
                    },
                    MaskSpec::BlockSparse {
                        block: 2,
                        layout: vec![vec![true, false], vec![true, true]],
                    },
                ],
                p / 7,
            ),
            tile_q: 16,
            tile_k: 32,
        }),
        15 => Op::Rope {
            interleaved: p % 2 == 0,
        },
        16 => Op::Gemm(Gemm {
            trans_b: p % 2 == 0,
            bias: q % 2 == 0,
            activation: if p % 3 == 0 {
                None
            } else {
                Some(pick(&UnaryOp::ALL[..15], q))
            },
            residual: q % 3 == 0,
        }),
        17 => Op::Where,
        22 => Op::SwiGlu,
        18 => Op::Fill {
            value: pick(
                &[
                    Scalar::float(-3.4028234663852886e38),
                    Scalar::Int(3),
                    Scalar::Bool(true),
                    Scalar::float(f64::NEG_INFINITY),
                ],
                p,
            ),
            dtype: pick(&[DType::F32, DType::I64, DType::Bool, DType::F32], p),
            shape: pick(&shapes(), q),
        },
        20 => Op::Arg {
            op: if p % 2 == 0 { ArgOp::Max } else { ArgOp::Min },
            axis: -1,
            keep_dims: q % 2 == 0,
            select_last: p % 3 == 0,
        },
        19 => Op::GatherNd {
            batch_dims: usize::from(q % 3 == 0),
        },
        _ => Op::Range {
            start: pick(&[Dim::Const(0), Dim::sym("seq"), Dim::Const(-2)], p),
            step: pick(&[1, 2, -1], q),
            len: pick(&[Dim::sym("seq"), Dim::Const(5)], q),
            dtype: pick(&[DType::I64, DType::F32, DType::I32], p),
        },
    }
}

fn build(inputs: &[(u16, u16)], steps: &[Step]) -> Graph {
    let mut graph = Graph::new("random");
    graph.declare_symbol("batch", 4).unwrap();
    graph.declare_symbol("seq", 16).unwrap();
    let mut nodes = Vec::new();
    for (i, &(shape_k, dtype_k)) in inputs.iter().enumerate() {
        let ty = TensorType::new(
            pick(
                &[DType::F32, DType::I64, DType::Bool, DType::F32, DType::BF16],
                dtype_k,
            ),
            pick(&shapes(), shape_k),
        );
        let name = node_name(&graph, i, dtype_k);
        nodes.push(graph.add_input(&name, ty).unwrap());
    }
    for (i, &step) in steps.iter().enumerate() {
        let (kind, a, b, c) = step;
        if kind % 23 == 22 {
            if let Some(id) = constant(&mut graph, i, a, b) {
                nodes.push(id);
            }
            continue;
        }
        let wants_bool = |t: &TensorType| t.dtype == DType::Bool;
        let wants_float = |t: &TensorType| t.dtype.is_float();
        let logic = matches!(kind % 22, 0 | 1 | 17)
            && (pick(&UnaryOp::ALL, b) == UnaryOp::Not
                || matches!(
                    pick(&BinaryOp::ALL, b),
                    BinaryOp::And | BinaryOp::Or | BinaryOp::Xor
                )
                || kind % 22 == 17);
        let first = if logic {
            choose(&graph, &nodes, a, wants_bool)
        } else if c % 4 == 0 {
            nodes[a as usize % nodes.len()]
        } else {
            choose(&graph, &nodes, a, wants_float)
        };
        let first_ty = graph.node(first).ty.clone();
        let op = op_for((kind, a, b, c), &first_ty);
        let arity = match &op {
            Op::Fill { .. } | Op::Range { .. } => 0,
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Arg { .. }
            | Op::Softmax { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::Expand { .. }
            | Op::Slice { .. } => 1,
            Op::Attention(_) => 3 + usize::from(c % 2 == 0),
            Op::Where | Op::Rope { .. } | Op::SwiGlu => 3,
            Op::Gemm(g) => 2 + usize::from(g.bias) + usize::from(g.residual),
            Op::LayerNorm { .. } => 2 + usize::from(c % 2 == 0),
            Op::Concat { .. } => 1 + c as usize % 3,
            _ => 2,
        };
        let mut operands = if arity == 0 { vec![] } else { vec![first] };
        for j in 1..arity {
            let k = b.wrapping_add(c.wrapping_mul(j as u16));
            let next = match (&op, j) {
                (Op::Gather { .. } | Op::GatherNd { .. }, 1) => {
                    choose(&graph, &nodes, k, |t| t.dtype.is_int())
                }
                (Op::Where, _) => choose(&graph, &nodes, k, |t| t.dtype != DType::Bool),
                (Op::Attention(_), 3) => choose(&graph, &nodes, k, |t| {
                    t.dtype == DType::Bool || t.rank() == 4
                }),
                _ if c % 5 == 0 => nodes[k as usize % nodes.len()],
                _ => choose(&graph, &nodes, k, |t| {
                    t.dtype == first_ty.dtype && t.rank() + (k as usize % 2) >= first_ty.rank()
                }),
            };
            operands.push(next);
        }
        let name = node_name(&graph, i + inputs.len(), c);
        if let Ok(id) = graph.add_node(&name, op, &operands) {
            nodes.push(id);
        }
    }
    let outputs = 1 + steps.len() % 3;
    for (k, id) in nodes.iter().rev().take(outputs).enumerate() {
        graph.add_output(&format!("out{k}"), *id).unwrap();
    }
    graph
}

pub fn arb_graph() -> impl Strategy<Value = Graph> {
    (
        prop::collection::vec((any::<u16>(), any::<u16>()), 1..4),
        prop::collection::vec(
            (any::<u8>(), any::<u16>(), any::<u16>(), any::<u16>()),
            0..40,
        ),
    )
        .prop_map(|(inputs, steps)| build(&inputs, &steps))
}

/// The property tests' settings: 256 cases per run (more with `PROPTEST_CASES=N`), failures
/// saved beside the test source.
pub fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
        .max(256);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}
