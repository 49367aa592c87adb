//! Memory planning: lifetimes, sharing and in-place updates on hand-written graphs, and on the
//! fixture models the invariant that buffers alive at the same time never share bytes.

use kiln_frontend::load;
use kiln_ir::{text, Graph, NodeId};
use kiln_passes::memory::MemoryPlan;
use kiln_passes::Pipeline;

// Shared with the frontend's and codegen's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../frontend/tests/support/mod.rs"]
mod support;

/// The first node of an in-place chain.
fn chain_head(plan: &MemoryPlan, mut id: NodeId) -> NodeId {
    while let Some(victim) = plan.buffer(id).and_then(|b| b.in_place_of) {
        id = victim;
    }
    id
}

/// Buffers whose lifetimes overlap occupy disjoint bytes, unless one continues the other in
/// place.
fn check_no_overlap(graph: &Graph, plan: &MemoryPlan) {
    let owners: Vec<NodeId> = graph
        .order()
        .into_iter()
        .filter(|&id| plan.buffer(id).is_some())
        .collect();
    for (i, &a) in owners.iter().enumerate() {
        for &b in &owners[i + 1..] {
            let (x, y) = (plan.buffer(a).unwrap(), plan.buffer(b).unwrap());
            let live_together = x.first <= y.last && y.first <= x.last;
            let bytes_overlap = x.offset < y.offset + y.bytes && y.offset < x.offset + x.bytes;
            if live_together && bytes_overlap {
                assert_eq!(
                    chain_head(plan, a),
                    chain_head(plan, b),
                    "%{} and %{} are alive together in the same bytes",
                    graph.node(a).name,
                    graph.node(b).name
                );
            }
        }
        assert!(
            plan.buffer(a).unwrap().offset + plan.buffer(a).unwrap().bytes <= plan.arena_bytes()
        );
    }
}

#[test]
fn dead_buffers_are_reused_and_elementwise_ops_run_in_place() {
    let graph = text::parse(
        r#"graph "chain" {
  sym n <= 16
  input %x : f32[n, 16]
  %w = const "w" [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0] : f32[16, 1]
  %a = exp(%x) : f32[n, 16]
  %b = neg(%a) : f32[n, 16]
  %c = matmul(%b, %w) : f32[n, 1]
  %d = matmul(%a, %w) : f32[n, 1]
  %e = transpose(%b) {perm = [1, 0]} : f32[16, n]
  %f = transpose(%e) {perm = [1, 0]} : f32[n, 16]
  %g = sqrt(%f) : f32[n, 16]
  output "c" = %c
  output "d" = %d
  output "g" = %g
}"#,
    )
    .unwrap();
    let plan = MemoryPlan::new(&graph, &graph.order()).unwrap();
    let id = |name: &str| graph.find(name).unwrap();
    // %a is read after %b (by %d): %b cannot overwrite it.
    assert_eq!(plan.buffer(id("b")).unwrap().in_place_of, None);
    // %f dies at %g, which has its type: in place.
    assert_eq!(plan.buffer(id("g")).unwrap().in_place_of, Some(id("f")));
    assert_eq!(
        plan.buffer(id("g")).unwrap().offset,
        plan.buffer(id("f")).unwrap().offset
    );
    // Outputs live to the end.
    assert_eq!(plan.buffer(id("c")).unwrap().last, graph.order().len());
    assert!(plan.arena_bytes() < plan.unshared_bytes());
    check_no_overlap(&graph, &plan);
    insta::assert_snapshot!(plan.display(&graph).to_string());
}

#[test]
fn fixture_models_never_share_live_bytes() {
    let fixtures = support::fixtures();
    for (source, shape) in [
        (fixtures.join("tiny-llama"), vec![]),
        (
            fixtures.join("tiny-bert/model.onnx"),
            vec!["input_ids=batch:4xseq:128"],
        ),
        (
            fixtures.join("tiny-bert/model-dynamo.onnx"),
            vec!["input_ids=batch:4xseq:128"],
        ),
    ] {
        let graph = load(&source, &support::shapes(&shape)).unwrap();
        for graph in [graph.clone(), Pipeline::default().run(&graph).unwrap()] {
            let plan = MemoryPlan::new(&graph, &graph.order()).unwrap();
            check_no_overlap(&graph, &plan);
            assert!(plan.arena_bytes() <= plan.unshared_bytes());
        }
    }
}
