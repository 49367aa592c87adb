//! The JIT on every fixture model, against the references in `../shared/fixtures` with the
//! tolerances the readers meet through the interpreter (issue #3).

use kiln_codegen::compile_jit;
use kiln_frontend::{load, InputShapes};
use kiln_ir::{load_tensors, Tensor};
#[path = "../../frontend/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use support::{fixtures, max_diff, max_diff_valid_tokens, model, shapes};

fn run(graph: &kiln_ir::Graph, inputs: Vec<(&str, &Tensor)>) -> BTreeMap<String, Tensor> {
    let mut jit = compile_jit(graph).unwrap();
    let inputs: HashMap<String, Tensor> = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    jit.run(&inputs).unwrap().into_iter().collect()
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
        println!("JIT tiny-bert {}: {diff:e}", source.display());
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
        println!("JIT {}: {diff:e}", dir.display());
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
    let (mut jit6, mut jit3) = (compile_jit(&l6).unwrap(), compile_jit(&l3).unwrap());
    let ref6 = load_tensors(&fixtures().join("minilm-l6/reference.safetensors")).unwrap();
    let ref3 = load_tensors(&fixtures().join("minilm-l3-onnx/reference.safetensors")).unwrap();
    for case in ["single0", "single4", "batch4_padded"] {
        let get = |r: &BTreeMap<String, Tensor>, name: &str| r[&format!("{case}.{name}")].clone();
        let feed6: HashMap<String, Tensor> = ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|n| (n.to_string(), get(&ref6, n)))
            .collect();
        let out6: BTreeMap<String, Tensor> = jit6.run(&feed6).unwrap().into_iter().collect();
        let diff = max_diff_valid_tokens(
            &out6["last_hidden_state"],
            &get(&ref6, "last_hidden_state"),
            &get(&ref6, "attention_mask"),
        );
        println!("JIT minilm-l6 {case}: {diff:e}");
        assert!(diff <= 1e-4, "minilm-l6 {case}: {diff}");
        let feed3: HashMap<String, Tensor> = ["input_ids", "attention_mask"]
            .iter()
            .map(|n| (n.to_string(), get(&ref3, n)))
            .collect();
        for (name, tensor) in jit3.run(&feed3).unwrap() {
            let diff = max_diff(&tensor, &get(&ref3, &name));
            println!("JIT minilm-l3 {case} {name}: {diff:e}");
            assert!(diff <= 1e-4, "minilm-l3 {case} {name}: {diff}");
        }
    }
}

#[test]
fn smollm2_gguf() {
    let graph = load(
        &model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &shapes(&["input_ids=1xseq:64"]),
    )
    .unwrap();
    let mut jit = compile_jit(&graph).unwrap();
    let reference = load_tensors(&fixtures().join("smollm2/reference.safetensors")).unwrap();
    for prompt in ["prompt0", "prompt1", "prompt2"] {
        let ids = &reference[&format!("{prompt}.input_ids")];
        let seq = ids.shape()[0];
        let feed = HashMap::from([("input_ids".to_string(), ids.reshaped(vec![1, seq]).unwrap())]);
        let out = jit.run(&feed).unwrap();
        let logits = out[0].1.to_f64s();
        let vocab = 49152;
        let last4 = Tensor::from_f64s(
            kiln_ir::DType::F32,
            vec![4, vocab],
            logits[(seq - 4) * vocab..].to_vec(),
        );
        let diff = max_diff(&last4, &reference[&format!("{prompt}.logits_last4")]);
        let top1: Vec<i64> = logits
            .chunks(vocab)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0 as i64
            })
            .collect();
        let expected: Vec<i64> = reference[&format!("{prompt}.top20_ids")]
            .to_i64s()
            .chunks(20)
            .map(|r| r[0])
            .collect();
        println!("JIT smollm2 {prompt}: {diff:e}");
        assert!(diff <= 2e-3, "{prompt}: {diff}");
        assert_eq!(top1, expected, "{prompt}");
    }
}
