//! The JIT and the AOT executable on every fixture model after the default pass pipeline (every
//! attention, norm and activation fused), against the references in `../shared/fixtures` with
//! the tolerances the readers meet through the interpreter (issue #3).
//! Both backends run the same kernels through the same runtime, so their outputs must also be
//! identical to the bit, even with the JIT on one thread and the executable on three (parallel
//! loops split whole tiles, rows and elements, never a sum).

use kiln_codegen::aot::{self, WeightPlacement};
use kiln_codegen::{compile_jit, JitModel};
use kiln_frontend::{load, InputShapes};
use kiln_ir::{load_tensors, Graph, Tensor};
#[path = "../../frontend/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use support::{fixtures, max_diff, max_diff_valid_tokens, model, shapes};

/// A model compiled both ways.
struct Compiled {
    jit: JitModel,
    /// The AOT executable and the directory holding it.
    executable: PathBuf,
    _dir: tempfile::TempDir,
}

impl Compiled {
    /// Runs the default pipeline and compiles the result. Weights go external: real models
    /// would make three copies of an embedded blob.
    fn new(graph: &Graph) -> Compiled {
        let graph = &kiln_passes::Pipeline::default().run(graph).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let artifacts = aot::compile(graph, "model", WeightPlacement::External).unwrap();
        aot::link(&artifacts, dir.path()).unwrap();
        Compiled {
            jit: compile_jit(graph).unwrap(),
            executable: dir.path().join("model"),
            _dir: dir,
        }
    }

    /// Runs both backends, checks that they agree exactly, and returns the outputs.
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        let jit: BTreeMap<String, Tensor> = self.jit.run(inputs).unwrap().into_iter().collect();
        let dir = self._dir.path();
        let (input_file, output_file) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
        let mut named: Vec<(String, Tensor)> =
            inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        kiln_ir::save_tensors(&input_file, &named).unwrap();
        let result = std::process::Command::new(&self.executable)
            .arg("--inputs")
            .arg(&input_file)
            .arg("--output")
            .arg(&output_file)
            .args(["--threads", "3"])
            .output()
            .unwrap();
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let aot = load_tensors(&output_file).unwrap();
        assert_eq!(jit, aot, "the AOT executable and the JIT differ");
        jit
    }
}

fn run(graph: &Graph, inputs: Vec<(&str, &Tensor)>) -> BTreeMap<String, Tensor> {
    let inputs: HashMap<String, Tensor> = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Compiled::new(graph).run(&inputs)
}

#[test]
fn tiny_bert_all_formats() {
    let dir = fixtures().join("tiny-bert");
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    let names = ["input_ids", "attention_mask", "token_type_ids"];
    for source in [
        dir.clone(),
        dir.join("model.onnx"),
        dir.join("model-dynamo.onnx"),
    ] {
        let graph = load(&source, &shapes(&["input_ids=batch:4xseq:128"])).unwrap();
        let out = run(&graph, names.iter().map(|n| (*n, &reference[*n])).collect());
        let diff = max_diff_valid_tokens(
            &out["last_hidden_state"],
            &reference["last_hidden_state"],
            &reference["attention_mask"],
        );
        println!("JIT and AOT tiny-bert {}: {diff:e}", source.display());
        assert!(diff <= 1e-5, "{}: {diff}", source.display());
    }
}

#[test]
fn tiny_llama_and_tiny_gpt2() {
    for (dir, tolerance) in [
        (fixtures().join("tiny-llama"), 1e-4),
        (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../frontend/tests/fixtures/tiny-gpt2"),
            1e-4,
        ),
    ] {
        let graph = load(&dir, &InputShapes::new()).unwrap();
        let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
        let out = run(&graph, vec![("input_ids", &reference["input_ids"])]);
        let diff = max_diff(&out["logits"], &reference["logits"]);
        println!("JIT and AOT {}: {diff:e}", dir.display());
        assert!(diff <= tolerance, "{}: {diff}", dir.display());
    }
}

#[test]
fn minilm_l6_and_l3() {
    let l6 = load(&model("minilm-l6"), &shapes(&["input_ids=batch:8xseq:128"])).unwrap();
    let l3 = load(
        &model("minilm-l3-onnx/paraphrase-MiniLM-L3-v2.onnx"),
        &shapes(&["input_ids=batch:8xseq:128"]),
    )
    .unwrap();
    let (mut jit6, mut jit3) = (Compiled::new(&l6), Compiled::new(&l3));
    let ref6 = load_tensors(&fixtures().join("minilm-l6/reference.safetensors")).unwrap();
    let ref3 = load_tensors(&fixtures().join("minilm-l3-onnx/reference.safetensors")).unwrap();
    for case in ["single0", "single4", "batch4_padded"] {
        let get = |r: &BTreeMap<String, Tensor>, name: &str| r[&format!("{case}.{name}")].clone();
        let feed6: HashMap<String, Tensor> = ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|n| (n.to_string(), get(&ref6, n)))
            .collect();
        let out6 = jit6.run(&feed6);
        let diff = max_diff_valid_tokens(
            &out6["last_hidden_state"],
            &get(&ref6, "last_hidden_state"),
            &get(&ref6, "attention_mask"),
        );
        println!("JIT and AOT minilm-l6 {case}: {diff:e}");
        assert!(diff <= 1e-4, "minilm-l6 {case}: {diff}");
        let feed3: HashMap<String, Tensor> = ["input_ids", "attention_mask"]
            .iter()
            .map(|n| (n.to_string(), get(&ref3, n)))
            .collect();
        for (name, tensor) in jit3.run(&feed3) {
            let diff = max_diff(&tensor, &get(&ref3, &name));
            println!("JIT and AOT minilm-l3 {case} {name}: {diff:e}");
            assert!(diff <= 1e-4, "minilm-l3 {case} {name}: {diff}");
        }
    }
}

fn argmax(row: &[f64]) -> i64 {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as i64
}

/// SmolLM2's logits on each prompt, then its 24 greedy tokens (the whole sequence recomputed for
/// each), through the JIT and the AOT executable.
#[test]
fn smollm2_gguf_logits_and_greedy_tokens() {
    let graph = load(
        &model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &shapes(&["input_ids=1xseq:64"]),
    )
    .unwrap();
    let mut compiled = Compiled::new(&graph);
    let reference = load_tensors(&fixtures().join("smollm2/reference.safetensors")).unwrap();
    let vocab = 49152;
    for prompt in ["prompt0", "prompt1", "prompt2"] {
        let mut ids = reference[&format!("{prompt}.input_ids")].to_i64s();
        let prompt_len = ids.len();
        let expected_greedy = reference[&format!("{prompt}.greedy_ids")].to_i64s();
        while ids.len() < prompt_len + expected_greedy.len() {
            let seq = ids.len();
            let feed = HashMap::from([(
                "input_ids".to_string(),
                Tensor::i64(&[1, seq], ids.clone()).unwrap(),
            )]);
            let logits = compiled.run(&feed)["logits"].to_f64s();
            if seq == prompt_len {
                let last4 = Tensor::from_f64s(
                    kiln_ir::DType::F32,
                    vec![4, vocab],
                    logits[(seq - 4) * vocab..].to_vec(),
                );
                let diff = max_diff(&last4, &reference[&format!("{prompt}.logits_last4")]);
                let top1: Vec<i64> = logits.chunks(vocab).map(argmax).collect();
                let expected: Vec<i64> = reference[&format!("{prompt}.top20_ids")]
                    .to_i64s()
                    .chunks(20)
                    .map(|r| r[0])
                    .collect();
                println!("JIT and AOT smollm2 {prompt}: {diff:e}");
                assert!(diff <= 2e-3, "{prompt}: {diff}");
                assert_eq!(top1, expected, "{prompt}");
            }
            ids.push(argmax(&logits[(seq - 1) * vocab..]));
        }
        assert_eq!(
            &ids[prompt_len..],
            &expected_greedy[..],
            "{prompt} greedy tokens"
        );
        println!("JIT and AOT smollm2 {prompt}: 24 greedy tokens equal");
    }
}
