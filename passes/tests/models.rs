//! The pipeline on the small fixture models: the IR after each pass is snapshotted (weights by
//! reference, the fixtures' directory written as `<fixtures>`), and every pass is checked against
//! the interpreter on the graph before it with the fixture's own inputs (translation
//! validation on real graphs).

use kiln_frontend::load;
use kiln_ir::{interp, load_tensors, text, Graph, Tensor};
use kiln_passes::Pipeline;
use std::collections::HashMap;
use std::path::Path;

// Shared with the frontend's and codegen's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../frontend/tests/support/mod.rs"]
mod support;

use support::{fixtures, max_diff, shapes};

/// Runs the pipeline stage by stage; each stage's outputs must match the previous stage's
/// within `tolerance`. Returns the text of every stage.
fn validate(graph: &Graph, feed: &HashMap<String, Tensor>, tolerance: f64) -> String {
    let stages = Pipeline::default().run_stages(graph).unwrap();
    let mut previous = interp::run(graph, feed).unwrap();
    let mut printed = String::new();
    for stage in &stages {
        let outputs = interp::run(&stage.graph, feed).unwrap();
        for ((name, before), (_, after)) in previous.iter().zip(&outputs) {
            let diff = max_diff(after, before);
            assert!(
                diff <= tolerance,
                "pass {} changed output {name} by {diff}",
                stage.pass
            );
        }
        previous = outputs;
        printed.push_str(&format!("# after pass {}\n", stage.pass));
        for note in &stage.notes {
            printed.push_str(&format!("#   {note}\n"));
        }
        printed.push_str(&text::print(&stage.graph));
    }
    let root = std::fs::canonicalize(fixtures()).unwrap();
    printed.replace(&root.display().to_string(), "<fixtures>")
}

fn inputs(dir: &Path, names: &[&str]) -> HashMap<String, Tensor> {
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    names
        .iter()
        .map(|&n| (n.to_string(), reference[n].clone()))
        .collect()
}

#[test]
fn tiny_llama_after_each_pass() {
    let dir = fixtures().join("tiny-llama");
    let graph = load(&dir, &shapes(&[])).unwrap();
    insta::assert_snapshot!(validate(&graph, &inputs(&dir, &["input_ids"]), 1e-5));
}

#[test]
fn tiny_bert_after_each_pass_in_every_format() {
    let dir = fixtures().join("tiny-bert");
    let feed = inputs(&dir, &["input_ids", "attention_mask", "token_type_ids"]);
    for (name, source) in [
        ("safetensors", dir.clone()),
        ("onnx", dir.join("model.onnx")),
        ("onnx_dynamo", dir.join("model-dynamo.onnx")),
    ] {
        let graph = load(&source, &shapes(&["input_ids=batch:4xseq:128"])).unwrap();
        let printed = validate(&graph, &feed, 1e-5);
        insta::assert_snapshot!(format!("tiny_bert_{name}"), printed);
    }
}
