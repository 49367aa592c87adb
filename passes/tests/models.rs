//! The pipeline on the fixture models: the IR after each pass is snapshotted (weights by
//! reference, the fixtures' and models' directories written as `<fixtures>` and `<models>`). On
//! the small models every pass is also checked against the interpreter on the graph before it
//! with the fixture's own inputs (translation validation on real graphs); the large ones are
//! checked through the JIT and the executable in `codegen/tests/fixtures.rs`.

use kiln_frontend::load;
use kiln_ir::{interp, load_tensors, text, Graph, Tensor};
use kiln_passes::Pipeline;
use std::collections::HashMap;
use std::path::Path;

// Shared with the frontend's and codegen's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../frontend/tests/support/mod.rs"]
mod support;

use support::{fixtures, max_diff, model, shapes};

/// Runs the pipeline stage by stage; with `feed`, each stage's outputs must match the previous
/// stage's within `tolerance`. Returns the text of every stage.
fn validate(graph: &Graph, feed: Option<&HashMap<String, Tensor>>, tolerance: f64) -> String {
    let stages = Pipeline::default().run_stages(graph).unwrap();
    let mut previous = feed.map(|feed| interp::run(graph, feed).unwrap());
    let mut printed = String::new();
    for stage in &stages {
        if let (Some(feed), Some(before)) = (feed, &previous) {
            let outputs = interp::run(&stage.graph, feed).unwrap();
            for ((name, before), (_, after)) in before.iter().zip(&outputs) {
                let diff = max_diff(after, before);
                assert!(
                    diff <= tolerance,
                    "pass {} changed output {name} by {diff}",
                    stage.pass
                );
            }
            previous = Some(outputs);
        }
        printed.push_str(&format!("# after pass {}\n", stage.pass));
        for note in &stage.notes {
            printed.push_str(&format!("#   {note}\n"));
        }
        printed.push_str(&text::print(&stage.graph));
    }
    let fixtures_root = std::fs::canonicalize(fixtures()).unwrap();
    let models_root = std::fs::canonicalize(model("")).unwrap();
    printed
        .replace(&fixtures_root.display().to_string(), "<fixtures>")
        .replace(&models_root.display().to_string(), "<models>")
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
    insta::assert_snapshot!(validate(&graph, Some(&inputs(&dir, &["input_ids"])), 1e-5));
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
        let printed = validate(&graph, Some(&feed), 1e-5);
        insta::assert_snapshot!(format!("tiny_bert_{name}"), printed);
    }
}

#[test]
fn real_models_after_each_pass() {
    for (name, source, shape) in [
        (
            "minilm_l3_onnx",
            "minilm-l3-onnx/paraphrase-MiniLM-L3-v2.onnx",
            "input_ids=batch:8xseq:128",
        ),
        ("minilm_l6", "minilm-l6", "input_ids=batch:8xseq:128"),
        (
            "smollm2",
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "input_ids=1xseq:512",
        ),
    ] {
        let graph = load(&model(source), &shapes(&[shape])).unwrap();
        insta::assert_snapshot!(name, validate(&graph, None, 0.0));
        // Regression: extraction by tree cost left the residual adds of SmolLM2's layers 14 on
        // unfused (twelve paths per layer to the previous one; the savings rounded away).
        let fused = Pipeline::default().run(&graph).unwrap();
        let report = kiln_passes::report::fusion_report(&fused);
        for (pattern, tally) in &report.patterns {
            assert!(
                tally.misses.is_empty(),
                "{name}: {pattern} missed\n{report}"
            );
        }
    }
}
