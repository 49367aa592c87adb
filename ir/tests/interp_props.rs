//! Property test: the interpreter runs every random graph to a result or a clear error, never a
//! panic, and its results have the dims and dtypes the graph declares.

mod common;

use common::arb_graph;
use kiln_ir::{interp, Tensor};
use proptest::prelude::*;
use std::collections::HashMap;

/// Deterministic inputs for every graph input with `batch = 2`, `seq = 3`; integers stay small
/// so gathers mostly index in range.
fn inputs_for(graph: &kiln_ir::Graph) -> HashMap<String, Tensor> {
    let bindings = HashMap::from([("batch".to_string(), 2), ("seq".to_string(), 3)]);
    graph
        .inputs()
        .iter()
        .map(|&id| {
            let node = graph.node(id);
            let dims = node
                .ty
                .shape
                .eval(&bindings)
                .expect("inputs use declared symbols");
            let numel: usize = dims.iter().product();
            let values: Vec<f64> = (0..numel)
                .map(|i| ((i * 7 % 5) as f64 - 1.0) * 0.5)
                .collect();
            let tensor = if node.ty.dtype.is_float() {
                Tensor::from_f64s(node.ty.dtype, dims, values)
            } else {
                Tensor::from_i64s(
                    node.ty.dtype,
                    dims,
                    (0..numel as i64).map(|i| i % 2).collect(),
                )
            };
            (node.name.clone(), tensor)
        })
        .collect()
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn interpreter_never_panics_and_honours_types(graph in arb_graph()) {
        let bindings = HashMap::from([("batch".to_string(), 2), ("seq".to_string(), 3)]);
        if let Ok(outputs) = interp::run(&graph, &inputs_for(&graph)) {
            for ((name, tensor), (_, id)) in outputs.iter().zip(graph.outputs()) {
                let ty = &graph.node(*id).ty;
                prop_assert_eq!(tensor.dtype(), ty.dtype, "output {}", name);
                let dims = ty.shape.eval(&bindings).unwrap();
                prop_assert_eq!(tensor.shape(), dims.as_slice(), "output {}", name);
            }
        }
    }
}
