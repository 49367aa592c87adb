//! `kiln compile` end to end: artifacts written and linked, the executable's contract, the C API
//! through the generated header and shared library, embedded and external weights, and
//! byte-identical objects from identical inputs.

use kiln_ir::{Data, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

mod support;

use support::{example, kiln};

fn succeed(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn compile_example(dir: &Path, extra: &[&str]) -> String {
    let model = example("attention_block.kir");
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    succeed(kiln(&args), "kiln compile")
}

/// The example's outputs through the reference interpreter.
fn interpreter_outputs() -> Vec<(String, Tensor)> {
    let graph = kiln_frontend::load(&example("attention_block.kir"), &Default::default()).unwrap();
    let inputs: HashMap<String, Tensor> = kiln_ir::load_tensors(&example("inputs.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    kiln_ir::interp::run(&graph, &inputs).unwrap()
}

fn f32s(tensor: &Tensor) -> &[f32] {
    match tensor.data() {
        Data::F32(values) => values,
        other => panic!("expected f32, got {:?}", other.dtype()),
    }
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

#[test]
fn compiled_executable_matches_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let printed = compile_example(dir.path(), &[]);
    for file in [
        "attention_block.o",
        "attention_block.h",
        "libattention_block.so",
        "attention_block",
    ] {
        assert!(
            dir.path().join(file).is_file(),
            "{file} missing:\n{printed}"
        );
    }
    assert!(printed.contains("$ cc -shared"), "{printed}");
    let out = dir.path().join("out.safetensors");
    let stdout = succeed(
        Command::new(dir.path().join("attention_block"))
            .arg("--inputs")
            .arg(example("inputs.safetensors"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap(),
        "the executable",
    );
    assert!(stdout.contains("hidden_states: f32[2, 5, 16]"), "{stdout}");
    let got = kiln_ir::load_tensors(&out).unwrap();
    for (name, want) in interpreter_outputs() {
        assert_eq!(got[&name].shape(), want.shape());
        assert_close(f32s(&got[&name]), f32s(&want));
    }
}

#[test]
fn executable_refuses_bad_arguments_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    compile_example(dir.path(), &[]);
    let exe = dir.path().join("attention_block");
    let run = |args: &[&str]| {
        let output = Command::new(&exe).args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&[]).contains("--inputs is required"));
    assert!(run(&["--frobnicate", "1"]).contains("unknown argument `--frobnicate`"));
    let missing = run(&["--inputs", "/nonexistent.safetensors", "--output", "/tmp/x"]);
    assert!(missing.contains("/nonexistent.safetensors"), "{missing}");
    // A file whose tensors are not this model's inputs.
    let wrong = dir.path().join("wrong.safetensors");
    kiln_ir::save_tensors(
        &wrong,
        &[(
            "x".to_string(),
            Tensor::f32(&[1, 2, 8], vec![0.0; 16]).unwrap(),
        )],
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let message = run(&[
        "--inputs",
        wrong.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        message.contains("missing input `attention_mask`"),
        "{message}"
    );
}

#[test]
fn compiling_twice_gives_identical_objects() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    compile_example(a.path(), &[]);
    compile_example(b.path(), &[]);
    for file in ["attention_block.o", "attention_block.h"] {
        let (x, y) = (
            std::fs::read(a.path().join(file)).unwrap(),
            std::fs::read(b.path().join(file)).unwrap(),
        );
        assert!(x == y, "{file} differs between two compilations");
    }
}

#[test]
fn external_weights_are_mapped_from_beside_the_executable() {
    let dir = tempfile::tempdir().unwrap();
    compile_example(dir.path(), &["--weights", "external"]);
    let weights = dir.path().join("attention_block.weights");
    assert!(weights.is_file());
    let embedded = tempfile::tempdir().unwrap();
    compile_example(embedded.path(), &[]);
    let object_bytes = |d: &Path| {
        std::fs::metadata(d.join("attention_block.o"))
            .unwrap()
            .len()
    };
    assert!(object_bytes(dir.path()) < object_bytes(embedded.path()));
    let out = dir.path().join("out.safetensors");
    succeed(
        Command::new(dir.path().join("attention_block"))
            .arg("--inputs")
            .arg(example("inputs.safetensors"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap(),
        "the executable with external weights",
    );
    let got = kiln_ir::load_tensors(&out).unwrap();
    for (name, want) in interpreter_outputs() {
        assert_close(f32s(&got[&name]), f32s(&want));
    }
    std::fs::remove_file(&weights).unwrap();
    let output = Command::new(dir.path().join("attention_block"))
        .arg("--inputs")
        .arg(example("inputs.safetensors"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("attention_block.weights"), "{stderr}");
}

fn le_bytes(tensor: &Tensor) -> Vec<u8> {
    tensor.to_le_bytes()
}

#[test]
fn c_api_runs_the_model_and_refuses_every_bad_call() {
    let dir = tempfile::tempdir().unwrap();
    compile_example(dir.path(), &[]);
    let external = tempfile::tempdir().unwrap();
    compile_example(external.path(), &["--weights", "external"]);
    // A weight file of another model: the same header shape with a different hash.
    let mut foreign = std::fs::read(external.path().join("attention_block.weights")).unwrap();
    foreign[16] ^= 0xff;
    let foreign_path = dir.path().join("foreign.weights");
    std::fs::write(&foreign_path, foreign).unwrap();

    let inputs = kiln_ir::load_tensors(&example("inputs.safetensors")).unwrap();
    std::fs::write(dir.path().join("x.bin"), le_bytes(&inputs["x"])).unwrap();
    std::fs::write(
        dir.path().join("mask.bin"),
        le_bytes(&inputs["attention_mask"]),
    )
    .unwrap();
    let program = dir.path().join("api_contract");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/api_contract.c");
    succeed(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&program)
            .arg(&source)
            .arg("-I")
            .arg(dir.path())
            .arg("-L")
            .arg(dir.path())
            .arg(format!("-Wl,-rpath,{}", dir.path().display()))
            .arg("-lattention_block")
            .output()
            .unwrap(),
        "compiling the C program",
    );
    let out = dir.path().join("out.bin");
    let stdout = succeed(
        Command::new(&program)
            .arg(dir.path().join("x.bin"))
            .arg(dir.path().join("mask.bin"))
            .arg(&out)
            .arg(&foreign_path)
            .output()
            .unwrap(),
        "the C program",
    );
    let lines: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(": ")).collect();
    let expect = |case: &str, code: i32, fragment: &str| {
        let line = lines
            .get(case)
            .unwrap_or_else(|| panic!("no line for {case}:\n{stdout}"));
        assert!(
            line.starts_with(&format!("{code} ")) || *line == code.to_string(),
            "{case}: expected code {code}, got `{line}`"
        );
        assert!(
            line.contains(fragment),
            "{case}: `{line}` lacks `{fragment}`"
        );
    };
    expect("create", 0, "");
    expect("run", 0, "");
    assert_eq!(lines["out dims"], "2 5 16");
    expect("null context", 1, "null");
    expect("one input", 2, "1 inputs given, the model takes 2");
    expect("null inputs", 1, "inputs is null");
    expect(
        "wrong dtype",
        2,
        "input `x` is i64[2, 5, 16], expected f32[batch, seq, 16]: dtype differs",
    );
    expect(
        "wrong rank",
        2,
        "input `x` is f32[2, 5], expected f32[batch, seq, 16]: rank differs",
    );
    expect("batch above its maximum", 2, "batch = 5 is outside 1..=4");
    expect("inconsistent batch", 2, "batch is already bound to 2");
    expect("fixed dim differs", 2, "axis 2 is 8, expected 16");
    expect("input too small", 2, "input `x` holds 636 bytes");
    expect("null input data", 1, "input 1: data is null");
    expect("misaligned input", 2, "not aligned");
    expect(
        "output too small",
        3,
        "output 0 needs 640 bytes, its buffer holds 636",
    );
    expect("wrong output dtype", 3, "the output is f32");
    expect("no outputs", 3, "0 outputs given, the model has 1");
    expect("run again", 0, "");
    expect("zero threads", 2, "at least 1");
    expect("one thread", 0, "");
    expect("run on one thread", 0, "");
    expect("three threads", 0, "");
    expect("run on three threads", 0, "");
    assert_eq!(lines["threads agree"], "1");
    expect(
        "missing weight file",
        4,
        "/nonexistent/attention_block.weights",
    );
    expect("run without weights", 4, "the model was not created");
    expect("foreign weight file", 4, "weights of another model");
    expect("null out pointer", 1, "null");

    let values: Vec<f32> = std::fs::read(&out)
        .unwrap()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want = interpreter_outputs();
    assert_close(&values, f32s(&want[0].1));
}
