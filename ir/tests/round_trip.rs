//! Property tests: random graphs of every op survive the text format and JSON unchanged, and
//! mutilated text never panics the parser.

mod common;

use common::arb_graph;
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::text::{parse, print};
use kiln_ir::{json, Op};
use proptest::prelude::*;

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn random_graphs_round_trip_through_text(graph in arb_graph()) {
        kiln_ir::verify(&graph).unwrap();
        let printed = print(&graph);
        let reparsed = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(print(&reparsed), printed);
        kiln_ir::verify(&reparsed).unwrap();
    }

    #[test]
    fn random_graphs_round_trip_through_json(graph in arb_graph()) {
        let encoded = json::to_json(&graph);
        let decoded = json::from_json(&encoded).map_err(|e| TestCaseError::fail(format!("{e}\n{encoded}")))?;
        prop_assert_eq!(json::to_json(&decoded), encoded);
        prop_assert_eq!(print(&decoded), print(&graph));
    }

    #[test]
    fn mutilated_text_never_panics(graph in arb_graph(), edits in prop::collection::vec((any::<usize>(), any::<char>(), any::<bool>()), 1..6)) {
        let mut text: Vec<char> = print(&graph).chars().collect();
        for (at, c, insert) in edits {
            let at = at % (text.len() + 1);
            if insert || at == text.len() {
                text.insert(at, c);
            } else {
                text.remove(at);
            }
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = parse(&text) {
            prop_assert!(e.line >= 1 && e.col >= 1);
        }
    }
}

#[test]
fn generator_exercises_every_op() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeMap;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut nodes = 0;
    for _ in 0..1024 {
        let graph = arb_graph().new_tree(&mut runner).unwrap().current();
        nodes += graph.len();
        for id in graph.node_ids() {
            let node = graph.node(id);
            let key = match &node.op {
                Op::Attention(a) => format!("attention/{:?}", std::mem::discriminant(&a.mask)),
                op => op.name().to_string(),
            };
            *counts.entry(key).or_default() += 1;
        }
    }
    let names: Vec<&str> = UnaryOp::ALL
        .iter()
        .map(|op| op.name())
        .chain(BinaryOp::ALL.iter().map(|op| op.name()))
        .chain(ReduceOp::ALL.iter().map(|op| op.name()))
        .chain([
            "input",
            "const",
            "fill",
            "range",
            "where",
            "cast",
            "matmul",
            "gemm",
            "softmax",
            "transpose",
            "reshape",
            "expand",
            "concat",
            "slice",
            "gather",
            "layer_norm",
            "rms_norm",
            "rope",
        ])
        .collect();
    let missing: Vec<&&str> = names.iter().filter(|n| !counts.contains_key(**n)).collect();
    assert!(
        missing.is_empty(),
        "ops never generated: {missing:?}\ncounts: {counts:?}"
    );
    let attention_masks = counts
        .keys()
        .filter(|k| k.starts_with("attention/"))
        .count();
    assert_eq!(attention_masks, 5, "attention masks generated: {counts:?}");
    assert!(
        nodes > 256 * 8,
        "graphs are too small: {nodes} nodes in 256 graphs"
    );
}
