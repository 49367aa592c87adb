//! Parity with the reference outputs in `../shared/fixtures`, computed by transformers and ONNX
//! Runtime on real models, through the reference interpreter. Real models come from
//! `scripts/fetch-models.sh`; a missing model fails the test.

mod support;

use kiln_frontend::{load, InputShapes};
use kiln_ir::{interp, load_tensors, Data, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use support::{fixtures, max_diff, max_diff_valid_tokens, model, shapes};

fn f32s(t: &Tensor) -> &[f32] {
    match t.data() {
        Data::F32(v) => v,
        other => panic!("expected f32, got {:?}", other.dtype()),
    }
}

fn run(graph: &kiln_ir::Graph, inputs: Vec<(&str, &Tensor)>) -> BTreeMap<String, Tensor> {
    let inputs: HashMap<String, Tensor> = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    interp::run(graph, &inputs).unwrap().into_iter().collect()
}

#[test]
fn tiny_bert_safetensors_matches_transformers() {
    let dir = fixtures().join("tiny-bert");
    let graph = load(&dir, &InputShapes::new()).unwrap();
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    let out = run(
        &graph,
        vec![
            ("input_ids", &reference["input_ids"]),
            ("attention_mask", &reference["attention_mask"]),
            ("token_type_ids", &reference["token_type_ids"]),
        ],
    );
    let diff = max_diff_valid_tokens(
        &out["last_hidden_state"],
        &reference["last_hidden_state"],
        &reference["attention_mask"],
    );
    println!("tiny-bert safetensors: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

#[test]
fn tiny_llama_safetensors_matches_transformers() {
    let dir = fixtures().join("tiny-llama");
    let graph = load(&dir, &InputShapes::new()).unwrap();
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    let out = run(&graph, vec![("input_ids", &reference["input_ids"])]);
    let diff = max_diff(&out["logits"], &reference["logits"]);
    println!("tiny-llama: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn minilm_l6_safetensors_matches_transformers_and_sentence_transformers() {
    let graph = load(&model("minilm-l6"), &InputShapes::new()).unwrap();
    let reference = load_tensors(&fixtures().join("minilm-l6/reference.safetensors")).unwrap();
    let cases = [
        "single0",
        "single1",
        "single2",
        "single3",
        "single4",
        "single5",
        "batch4_padded",
    ];
    for case in cases {
        let get = |name: &str| &reference[&format!("{case}.{name}")];
        let out = run(
            &graph,
            vec![
                ("input_ids", get("input_ids")),
                ("attention_mask", get("attention_mask")),
                ("token_type_ids", get("token_type_ids")),
            ],
        );
        let diff = max_diff_valid_tokens(
            &out["last_hidden_state"],
            get("last_hidden_state"),
            get("attention_mask"),
        );
        let width = 384;
        let cosines: Vec<f64> = f32s(&out["sentence_embedding"])
            .chunks(width)
            .zip(f32s(get("sentence_embedding")).chunks(width))
            .map(|(a, e)| {
                let dot: f64 = a
                    .iter()
                    .zip(e)
                    .map(|(a, e)| f64::from(*a) * f64::from(*e))
                    .sum();
                let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                dot / (norm(a) * norm(e))
            })
            .collect();
        let worst = cosines.iter().copied().fold(1.0, f64::min);
        println!("minilm-l6 {case}: max abs diff {diff:e}, min cosine {worst:.9}");
        assert!(diff <= 1e-4, "{case}: max abs diff {diff}");
        assert!(worst >= 0.99999, "{case}: cosine {worst}");
    }
}

#[test]
fn smollm2_gguf_unpermutes_q_and_k_exactly() {
    let file =
        kiln_frontend::gguf::GgufFile::open(&model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.tensors.len(), 272);
    let graph = load(
        &model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &InputShapes::new(),
    )
    .unwrap();
    let reference =
        load_tensors(&fixtures().join("smollm2/layer0_qk_dequantized.safetensors")).unwrap();
    for (gguf, hf) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
    ] {
        let weight = graph.weights().get(gguf).unwrap();
        let ours = Tensor::from_le_bytes(
            weight.dtype,
            weight.shape.clone(),
            weight.data.as_ref().unwrap().bytes(),
        )
        .unwrap();
        assert_eq!(max_diff(&ours, &reference[hf]), 0.0, "{gguf}");
    }
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let graph = load(
        &model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &InputShapes::new(),
    )
    .unwrap();
    let reference = load_tensors(&fixtures().join("smollm2/reference.safetensors")).unwrap();
    for prompt in ["prompt0", "prompt1", "prompt2"] {
        let ids = &reference[&format!("{prompt}.input_ids")];
        let seq = ids.shape()[0];
        let ids = ids.reshaped(vec![1, seq]).unwrap();
        let out = run(&graph, vec![("input_ids", &ids)]);
        let logits = f32s(&out["logits"]);
        let vocab = 49152;
        assert_eq!(logits.len(), seq * vocab);
        let last4 = Tensor::f32(&[4, vocab], logits[(seq - 4) * vocab..].to_vec()).unwrap();
        let diff = max_diff(&last4, &reference[&format!("{prompt}.logits_last4")]);
        let top1: Vec<i64> = logits
            .chunks(vocab)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 {
                            (i, v)
                        } else {
                            best
                        }
                    })
                    .0 as i64
            })
            .collect();
        let expected_top1: Vec<i64> = reference[&format!("{prompt}.top20_ids")]
            .to_i64s()
            .chunks(20)
            .map(|row| row[0])
            .collect();
        println!("smollm2 {prompt}: max abs diff of the last 4 logits {diff:e}");
        assert!(diff <= 2e-3, "{prompt}: max abs diff {diff}");
        assert_eq!(top1, expected_top1, "{prompt}: top-1 ids");
    }
}

#[test]
fn tiny_bert_onnx_exports_match_onnxruntime() {
    let dir = fixtures().join("tiny-bert");
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    for (file, expected) in [
        ("model.onnx", "last_hidden_state_onnxruntime"),
        ("model-dynamo.onnx", "last_hidden_state_onnxruntime_dynamo"),
    ] {
        let graph = load(&dir.join(file), &shapes(&["input_ids=batch:4xseq:128"])).unwrap();
        let out = run(
            &graph,
            vec![
                ("input_ids", &reference["input_ids"]),
                ("attention_mask", &reference["attention_mask"]),
                ("token_type_ids", &reference["token_type_ids"]),
            ],
        );
        let mask = &reference["attention_mask"];
        let to_ort = max_diff_valid_tokens(&out["last_hidden_state"], &reference[expected], mask);
        let to_transformers = max_diff_valid_tokens(
            &out["last_hidden_state"],
            &reference["last_hidden_state"],
            mask,
        );
        println!("tiny-bert {file}: max abs diff {to_ort:e} to ONNX Runtime, {to_transformers:e} to transformers");
        assert!(
            to_ort <= 1e-5 && to_transformers <= 1e-5,
            "{file}: {to_ort} / {to_transformers}"
        );
    }
}

#[test]
fn minilm_l3_onnx_matches_onnxruntime() {
    let graph = load(
        &model("minilm-l3-onnx/paraphrase-MiniLM-L3-v2.onnx"),
        &shapes(&["input_ids=batch:8xseq:128"]),
    )
    .unwrap();
    let reference = load_tensors(&fixtures().join("minilm-l3-onnx/reference.safetensors")).unwrap();
    let outputs: Vec<String> = graph
        .outputs()
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(outputs, ["output", "463", "onnx::Shape_422", "461"]);
    for case in [
        "single0",
        "single1",
        "single2",
        "single3",
        "single4",
        "single5",
        "batch4_padded",
    ] {
        let get = |name: &str| &reference[&format!("{case}.{name}")];
        let out = run(
            &graph,
            vec![
                ("input_ids", get("input_ids")),
                ("attention_mask", get("attention_mask")),
            ],
        );
        for name in &outputs {
            let diff = max_diff(&out[name], get(name));
            println!("minilm-l3 {case} {name}: max abs diff {diff:e}");
            assert!(diff <= 1e-4, "{case} {name}: max abs diff {diff}");
        }
    }
}

#[test]
fn tiny_gpt2_safetensors_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2");
    let graph = load(&dir, &InputShapes::new()).unwrap();
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    let out = run(&graph, vec![("input_ids", &reference["input_ids"])]);
    let diff = max_diff(&out["logits"], &reference["logits"]);
    println!("tiny-gpt2: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}
