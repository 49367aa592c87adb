//! The `kiln` command line, end to end: the README's example, and clear errors for bad input.

use kiln_ir::Data;
use std::path::Path;

mod support;

use support::{example, kiln};

fn f32s(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let tensors = kiln_ir::load_tensors(path).unwrap();
    let tensor = &tensors[name];
    match tensor.data() {
        Data::F32(v) => (tensor.shape().to_vec(), v.clone()),
        other => panic!("{name} is {:?}", other.dtype()),
    }
}

#[test]
fn run_matches_the_independent_numpy_reference() {
    for backend in ["interp", "jit", "aot"] {
        run_example_with(backend);
    }
}

fn run_example_with(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let result = kiln(&[
        "run",
        example("attention_block.kir").to_str().unwrap(),
        "--inputs",
        example("inputs.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--backend",
        backend,
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(String::from_utf8_lossy(&result.stdout).contains("hidden_states: f32[2, 5, 16]"));
    let (shape, actual) = f32s(&out, "hidden_states");
    let (expected_shape, expected) = f32s(&example("expected.safetensors"), "hidden_states");
    assert_eq!(shape, expected_shape);
    let max_diff = actual
        .iter()
        .zip(&expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 1e-5, "{backend}: max abs diff {max_diff}");
}

#[test]
fn inspect_prints_the_graph_and_a_summary() {
    let result = kiln(&[
        "inspect",
        example("attention_block.kir").to_str().unwrap(),
        "--passes",
        "none",
        "--dim",
        "seq=16",
        "--dim",
        "batch=1",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.starts_with("graph \"attention_block\" {"));
    assert!(stdout.contains("  matmul           6\n"));
    assert!(stdout.contains("parameters: 1091 (4364 bytes)"));
    // Projections 4 x (2*16*16*16), scores and context 2 x (2*2*16*16*8), softmax 4*2*16*16, plus elementwise.
    assert!(
        stdout.contains("flops: 53280 (at batch=1, seq=16)"),
        "{stdout}"
    );
    let json = kiln(&[
        "inspect",
        example("attention_block.kir").to_str().unwrap(),
        "--json",
    ]);
    // The fused graph: the attention's scores, scale, softmax and weighted sum are one node, and
    // the four projections take their bias adds.
    let round_trip = kiln_ir::json::from_json(&String::from_utf8_lossy(&json.stdout)).unwrap();
    assert_eq!(round_trip.len(), 29);
}

fn expect_error(args: &[&str], needle: &str) {
    let result = kiln(args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(needle),
        "{args:?}: expected `{needle}` in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let out = out.to_str().unwrap();
    let model = example("attention_block.kir");
    let model = model.to_str().unwrap();
    expect_error(
        &["inspect", "model.tflite"],
        "model.tflite: unsupported model format",
    );
    expect_error(&["inspect", "missing.kir"], "missing.kir: No such file");
    expect_error(
        &["inspect", model, "--dim", "sequence=4"],
        "--dim names unknown symbols: sequence",
    );
    let weights = example("attention_block.safetensors");
    expect_error(
        &[
            "run",
            model,
            "--inputs",
            weights.to_str().unwrap(),
            "--output",
            out,
        ],
        "missing inputs: x, attention_mask",
    );
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffnot a header").unwrap();
    expect_error(
        &[
            "run",
            model,
            "--inputs",
            garbage.to_str().unwrap(),
            "--output",
            out,
        ],
        "garbage.safetensors",
    );
    let bad = dir.path().join("bad.kir");
    std::fs::write(
        &bad,
        "graph \"g\" {\n  input %x : f32[3]\n  %y = exp(%x) : f32[4]\n  output \"y\" = %y\n}\n",
    )
    .unwrap();
    expect_error(
        &["inspect", bad.to_str().unwrap()],
        "bad.kir:3:18: node %y (exp): declared type f32[4] differs from the inferred f32[3]",
    );
}

#[test]
fn inputs_beyond_a_symbol_maximum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("long.safetensors");
    let x = kiln_ir::Tensor::f32(&[1, 65, 16], vec![0.0; 65 * 16]).unwrap();
    let mask = kiln_ir::Tensor::i64(&[1, 65], vec![1; 65]).unwrap();
    kiln_ir::save_tensors(&inputs, &[("x".into(), x), ("attention_mask".into(), mask)]).unwrap();
    let out = dir.path().join("out.safetensors");
    for backend in ["interp", "jit", "aot"] {
        expect_error(
            &["run", example("attention_block.kir").to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", out.to_str().unwrap(), "--backend", backend],
            "input `x` is f32[1, 65, 16], expected f32[batch, seq, 16]: axis 1: seq = 65 is outside 1..=64",
        );
    }
}

#[test]
fn real_model_formats_run_from_the_command_line() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-bert");
    let reference = kiln_ir::load_tensors(&fixtures.join("reference.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.safetensors");
    let names = ["input_ids", "attention_mask", "token_type_ids"];
    let feed: Vec<(String, kiln_ir::Tensor)> = names
        .iter()
        .map(|n| (n.to_string(), reference[*n].clone()))
        .collect();
    kiln_ir::save_tensors(&inputs, &feed).unwrap();
    for model in [fixtures.join("model.onnx"), fixtures.clone()] {
        let out = dir.path().join("out.safetensors");
        let result = kiln(&[
            "run",
            model.to_str().unwrap(),
            "--shape",
            "input_ids=batch:2xseq:32",
            "--inputs",
            inputs.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let (shape, _) = f32s(&out, "last_hidden_state");
        assert_eq!(shape, reference["last_hidden_state"].shape());
    }
    let check = kiln(&[
        "check",
        fixtures.join("model-dynamo.onnx").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success()
            && stdout.contains("GatherND")
            && stdout.contains("all 23 op types are supported"),
        "{stdout}"
    );
}

#[test]
fn bench_reports_costs_and_latency_quantiles() {
    let result = kiln(&[
        "bench",
        example("attention_block.kir").to_str().unwrap(),
        "--dim",
        "batch=1",
        "--dim",
        "seq=8",
        "--iters",
        "3",
        "--warmup",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        stdout.contains("inputs") && stdout.contains("x=f32[1, 8, 16]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("load and passes: ") && stdout.contains("compile: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("run: median ") && stdout.contains(" p10 ") && stdout.contains(" p90 "),
        "{stdout}"
    );
    let two = kiln(&[
        "bench",
        example("attention_block.kir").to_str().unwrap(),
        "--iters",
        "2",
        "--threads",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&two.stdout).contains("2 threads)"));
    expect_error(
        &[
            "bench",
            example("attention_block.kir").to_str().unwrap(),
            "--threads",
            "0",
        ],
        "--threads must be at least 1",
    );
}

#[test]
fn inspect_reports_fusion_and_each_pass_byte_stably() {
    let model = example("attention_block.kir");
    let model = model.to_str().unwrap();
    let report = kiln(&["inspect", model, "--report", "--json"]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let attention = &json["patterns"]["attention"];
    assert_eq!(
        (attention["sites"].as_u64(), attention["fused"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(attention["misses"].as_array().map(Vec::len), Some(0));
    let unfused = kiln(&["inspect", model, "--report", "--disable-pass", "fuse"]);
    let text = String::from_utf8_lossy(&unfused.stdout);
    assert!(text.contains("attention  0 of 1 fused"), "{text}");
    assert!(text.contains("not fused at %probs"), "{text}");
    let diff = kiln(&["inspect", model, "--diff", "fuse"]);
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff_text.starts_with("--- before fuse\n+++ after fuse\n"),
        "{diff_text}"
    );
    assert!(
        diff_text.contains("\n+  %context = attention("),
        "{diff_text}"
    );
    let each = kiln(&["inspect", model, "--after-each"]);
    let each_text = String::from_utf8_lossy(&each.stdout);
    for pass in ["dce", "canonicalize", "fuse", "cse"] {
        assert!(
            each_text.contains(&format!("\n# after pass {pass}\n")),
            "{each_text}"
        );
    }
    assert_eq!(
        kiln(&["inspect", model, "--after-each"]).stdout,
        each.stdout
    );
    let memory = kiln(&["inspect", model, "--memory"]);
    let memory_text = String::from_utf8_lossy(&memory.stdout);
    assert!(
        memory_text.contains("%context") && memory_text.contains(" without sharing, "),
        "{memory_text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let dot = dir.path().join("graph.dot");
    let drawn = kiln(&["inspect", model, "--dot", dot.to_str().unwrap()]);
    assert!(
        drawn.status.success(),
        "{}",
        String::from_utf8_lossy(&drawn.stderr)
    );
    let graphviz = std::fs::read_to_string(&dot).unwrap();
    assert!(
        graphviz.starts_with("digraph \"attention_block\" {")
            && graphviz.contains("\\nattention\\n"),
        "{graphviz}"
    );
    let unknown = kiln(&["inspect", model, "--disable-pass", "fusion"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown pass `fusion`"));
}
