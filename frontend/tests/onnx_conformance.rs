//! The ONNX project's backend node tests (written by `../shared/tools/onnx-node-tests.py` via
//! `scripts/fetch-models.sh`) through the ONNX reader and the reference interpreter. Prints
//! pass / fail / unsupported counts; fails if a test on the committed expected-pass list does not
//! pass, or if any test of an op kiln supports fails (ONNX tolerances, rtol 1e-3, atol 1e-7; see
//! [`close`] for f16 and bf16).

use kiln_frontend::onnx::{input_names, load_with_constants, read_tensor_proto};
use kiln_frontend::{load, DimSpec, FrontendError, InputShapes};
use kiln_ir::{interp, DType, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;

enum Outcome {
    Pass,
    /// The model uses an op type or element type kiln does not read.
    Unsupported(String),
    Fail(String),
}

fn tests_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/onnx-node-tests/node");
    assert!(
        dir.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// ONNX's tolerance, widened for f16 and bf16 outputs to two units in the last place of the
/// format: those formats cannot hold 1e-3 relative precision, and the reference rounds at other
/// steps than kiln (which computes every op in f64 and rounds once).
fn close(actual: &Tensor, expected: &Tensor) -> Result<(), String> {
    if actual.shape() != expected.shape() {
        return Err(format!(
            "dims {:?}, expected {:?}",
            actual.shape(),
            expected.shape()
        ));
    }
    if actual.dtype() != expected.dtype() {
        return Err(format!(
            "dtype {}, expected {}",
            actual.dtype(),
            expected.dtype()
        ));
    }
    let mantissa_bits = match actual.dtype() {
        DType::BF16 => Some(7),
        DType::F16 => Some(10),
        _ => None,
    };
    let (a, e) = (actual.to_f64s(), expected.to_f64s());
    for (i, (a, e)) in a.iter().zip(&e).enumerate() {
        let ok = if actual.dtype().is_float() {
            let exponent = e.abs().max(f64::MIN_POSITIVE).log2().floor() as i32;
            let ulps = mantissa_bits.map_or(0.0, |bits| 2.0 * 2f64.powi(exponent - bits));
            (a.is_nan() && e.is_nan())
                || a == e
                || (a - e).abs() <= (ATOL + RTOL * e.abs()).max(ulps)
        } else {
            a == e
        };
        if !ok {
            return Err(format!("element {i}: {a} vs expected {e}"));
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Tensor, String> {
    read_tensor_proto(&std::fs::read(path).map_err(|e| e.to_string())?)
}

fn unsupported_reason(error: &FrontendError) -> Option<String> {
    let text = error.to_string();
    if text.contains("unsupported op type") {
        let ops: Vec<&str> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split(' ').next())
            .collect();
        return Some(format!("op {}", ops.join(", ")));
    }
    ["is not supported", "opset"]
        .iter()
        .any(|m| text.contains(m))
        .then(|| text.rsplit(": ").next().unwrap_or(&text).to_string())
}

fn run_case(case: &Path) -> Outcome {
    let model = case.join("model.onnx");
    let names = match input_names(&model) {
        Ok(names) => names,
        Err(e) => return Outcome::Fail(e.to_string()),
    };
    let mut sets: Vec<PathBuf> = std::fs::read_dir(case)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    for set in sets {
        let inputs: Result<Vec<Tensor>, String> = (0..names.len())
            .map(|i| read(&set.join(format!("input_{i}.pb"))))
            .collect();
        let inputs = match inputs {
            Ok(inputs) => inputs,
            Err(e) if e.contains("not supported") => return Outcome::Unsupported(e),
            Err(e) => return Outcome::Fail(format!("reading inputs: {e}")),
        };
        let mut shapes = InputShapes::new();
        for (name, tensor) in names.iter().zip(&inputs) {
            shapes.insert(
                name,
                tensor.shape().iter().map(|&d| DimSpec::Fixed(d)).collect(),
            );
        }
        let mut feed: HashMap<String, Tensor> = names.iter().cloned().zip(inputs).collect();

        // Inputs an AOT build must know (shapes, axes, bounds) are fixed to their test values:
        // first the integer ones, then, if that is not enough, all of them.
        let mut graph = load(&model, &shapes);
        for freeze_floats in [false, true] {
            match &graph {
                Err(e) if e.to_string().contains("must be") => {
                    let constants: HashMap<String, Tensor> = feed
                        .iter()
                        .filter(|(_, t)| freeze_floats || !t.dtype().is_float())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    graph = load_with_constants(&model, &shapes, &constants);
                    if graph.is_ok() {
                        feed.retain(|k, _| !constants.contains_key(k));
                    }
                }
                _ => break,
            }
        }
        let graph = match graph {
            Ok(graph) => graph,
            Err(e) => {
                return unsupported_reason(&e)
                    .map_or_else(|| Outcome::Fail(e.to_string()), Outcome::Unsupported)
            }
        };
        let outputs = match interp::run(&graph, &feed) {
            Ok(outputs) => outputs,
            Err(e) => return Outcome::Fail(e.to_string()),
        };
        for (i, (name, actual)) in outputs.iter().enumerate() {
            let expected = match read(&set.join(format!("output_{i}.pb"))) {
                Ok(t) => t,
                Err(e) if e.contains("not supported") => return Outcome::Unsupported(e),
                Err(e) => return Outcome::Fail(format!("reading outputs: {e}")),
            };
            if let Err(e) = close(actual, &expected) {
                return Outcome::Fail(format!("output `{name}`: {e}"));
            }
        }
    }
    Outcome::Pass
}

#[test]
fn onnx_node_tests() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(tests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    let expected_pass: BTreeSet<String> = include_str!("onnx-node-tests.expected-pass")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let (mut passed, mut failed, mut unsupported) =
        (Vec::new(), Vec::new(), BTreeMap::<String, usize>::new());
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        match std::panic::catch_unwind(|| run_case(case)) {
            Ok(Outcome::Pass) => passed.push(name),
            Ok(Outcome::Unsupported(reason)) => *unsupported.entry(reason).or_default() += 1,
            Ok(Outcome::Fail(reason)) => failed.push((name, reason)),
            Err(_) => failed.push((name, "panicked".into())),
        }
    }
    // Written past the test harness's capture so that every test run shows the counts.
    let summary = format!(
        "ONNX node tests: {} passed, {} failed, {} unsupported (of {})\n",
        passed.len(),
        failed.len(),
        unsupported.values().sum::<usize>(),
        cases.len()
    );
    std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes()).unwrap();
    for (name, reason) in &failed {
        println!("  FAIL {name}: {reason}");
    }
    if std::env::var_os("KILN_LIST_UNSUPPORTED").is_some() {
        for (reason, count) in &unsupported {
            println!("  unsupported x{count}: {reason}");
        }
    }
    if let Some(path) = std::env::var_os("KILN_WRITE_EXPECTED_PASS") {
        let mut list = String::from("# ONNX backend node tests that pass (regenerate: KILN_WRITE_EXPECTED_PASS=FILE cargo test --test onnx_conformance)\n");
        passed
            .iter()
            .for_each(|name| list.push_str(&format!("{name}\n")));
        std::fs::write(path, list).unwrap();
    }
    let passing: BTreeSet<&String> = passed.iter().collect();
    let regressed: Vec<&String> = expected_pass
        .iter()
        .filter(|t| !passing.contains(t))
        .collect();
    let new: Vec<&&String> = passing
        .iter()
        .filter(|t| !expected_pass.contains(**t))
        .collect();
    if !new.is_empty() {
        println!("{} tests pass that are not on the expected-pass list: add them to frontend/tests/onnx-node-tests.expected-pass", new.len());
    }
    assert!(
        regressed.is_empty(),
        "expected to pass but did not: {regressed:?}"
    );
    assert!(
        failed.is_empty(),
        "{} node tests of supported ops failed",
        failed.len()
    );
}
