//! Hand-built ONNX models: one error listing every unsupported op, malformed files, external
//! data, and weight-only quantized exports.

use kiln_frontend::{load, InputShapes};
use kiln_ir::{interp, Tensor};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for &d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d));
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem_type;
    tensor.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tensor));
    let mut info = ValueInfoProto::new();
    info.name = name.into();
    info.type_ = Some(ty).into();
    info
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

fn int_attr(name: &str, value: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = value;
    a
}

fn tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.into();
    t.data_type = data_type;
    t.dims = dims.to_vec();
    t.raw_data = raw;
    t
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn model(
    opset: i64,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> ModelProto {
    let mut graph = GraphProto::new();
    graph.name = "test".into();
    graph.node = nodes;
    graph.input = inputs;
    graph.output = outputs;
    graph.initializer = initializers;
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut op = OperatorSetIdProto::new();
    op.version = opset;
    m.opset_import.push(op);
    m.graph = Some(graph).into();
    m
}

fn write(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, m.write_to_bytes().unwrap()).unwrap();
    path
}

fn error_of(path: &Path) -> String {
    load(path, &InputShapes::new())
        .expect_err("the model must be rejected")
        .to_string()
}

const F32: i32 = 1;
const I8: i32 = 3;

#[test]
fn one_error_lists_every_unsupported_op_with_nodes_and_opset() {
    let dir = tempfile::tempdir().unwrap();
    let mut custom = node("FusedThing", "custom_0", &["x"], &["c"]);
    custom.domain = "com.example".into();
    let m = model(
        17,
        vec![
            node("Conv", "conv_a", &["x", "x"], &["a"]),
            node("NonZero", "nz", &["a"], &["b"]),
            node("Conv", "conv_b", &["b", "x"], &["d"]),
            custom,
            node("Add", "fine", &["d", "c"], &["y"]),
        ],
        vec![value_info("x", F32, &[2, 2])],
        vec![value_info("y", F32, &[2, 2])],
        vec![],
    );
    let error = error_of(&write(dir.path(), "m.onnx", &m));
    assert!(error.contains("3 unsupported op type(s):"), "{error}");
    assert!(
        error.contains("  Conv (opset 17): 2 node(s): conv_a, conv_b"),
        "{error}"
    );
    assert!(
        error.contains("  NonZero (opset 17): 1 node(s): nz"),
        "{error}"
    );
    assert!(
        error.contains("  com.example.FusedThing (opset 17): 1 node(s): custom_0"),
        "{error}"
    );
}

#[test]
fn malformed_onnx_files_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = model(
        17,
        vec![node("Relu", "r", &["x"], &["y"])],
        vec![value_info("x", F32, &[2])],
        vec![value_info("y", F32, &[2])],
        vec![],
    );
    let bytes = good.write_to_bytes().unwrap();
    std::fs::write(d.join("truncated.onnx"), &bytes[..bytes.len() - 5]).unwrap();
    assert!(error_of(&d.join("truncated.onnx")).contains("not a valid ONNX model"));
    std::fs::write(d.join("garbage.onnx"), b"\xff\xff\xff\xff garbage").unwrap();
    assert!(error_of(&d.join("garbage.onnx")).contains("not a valid ONNX model"));
    let old = model(
        11,
        good.graph.node.clone(),
        good.graph.input.clone(),
        good.graph.output.clone(),
        vec![],
    );
    assert!(error_of(&write(d, "old.onnx", &old))
        .contains("opset 11 is not supported: kiln reads opset 13 and later"));
    let undefined = model(
        17,
        vec![node("Relu", "r", &["nope"], &["y"])],
        good.graph.input.clone(),
        good.graph.output.clone(),
        vec![],
    );
    assert!(error_of(&write(d, "undefined.onnx", &undefined))
        .contains("node `r` (Relu): value `nope` is used before it is defined"));
    let double = model(
        17,
        good.graph.node.clone(),
        vec![value_info("x", 11, &[2])],
        good.graph.output.clone(),
        vec![],
    );
    assert!(error_of(&write(d, "double.onnx", &double))
        .contains("input `x`: element type double (ONNX data type 11) is not supported"));
    let lying = tensor("w", F32, &[4], vec![0; 8]);
    let lying_model = model(
        17,
        vec![node("Add", "a", &["x", "w"], &["y"])],
        vec![value_info("x", F32, &[4])],
        vec![value_info("y", F32, &[4])],
        vec![lying],
    );
    assert!(error_of(&write(d, "lying.onnx", &lying_model))
        .contains("tensor `w`: f32[4] needs 16 bytes, data has 8"));
    let negative = tensor("w", F32, &[-4], vec![]);
    let negative_model = model(
        17,
        vec![node("Add", "a", &["x", "w"], &["y"])],
        vec![value_info("x", F32, &[4])],
        vec![value_info("y", F32, &[4])],
        vec![negative],
    );
    assert!(error_of(&write(d, "negative.onnx", &negative_model))
        .contains("tensor `w` has a negative dim -4"));
    let mut shape_mismatch = model(
        17,
        vec![node("MatMul", "mm", &["x", "x"], &["y"])],
        vec![value_info("x", F32, &[2, 3])],
        vec![value_info("y", F32, &[2, 2])],
        vec![],
    );
    shape_mismatch.graph.as_mut().unwrap().node[0].name = "/layer/MatMul".into();
    let error = error_of(&write(d, "mismatch.onnx", &shape_mismatch));
    assert!(
        error.contains("node `/layer/MatMul` (MatMul)")
            && error.contains("contraction dims differ"),
        "{error}"
    );
}

fn external_model(location: &str, offset: usize, length: usize) -> ModelProto {
    let mut w = TensorProto::new();
    w.name = "w".into();
    w.data_type = F32;
    w.dims = vec![100];
    w.data_location = DataLocation::EXTERNAL.into();
    for (key, value) in [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", length.to_string()),
    ] {
        let mut entry = StringStringEntryProto::new();
        entry.key = key.into();
        entry.value = value;
        w.external_data.push(entry);
    }
    model(
        17,
        vec![node("Add", "add", &["x", "w"], &["y"])],
        vec![value_info("x", F32, &[100])],
        vec![value_info("y", F32, &[100])],
        vec![w],
    )
}

#[test]
fn external_data_is_mapped_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut data = vec![0u8; 16];
    data.extend(f32_bytes(&(0..100).map(|i| i as f32).collect::<Vec<_>>()));
    std::fs::write(d.join("weights.bin"), &data).unwrap();
    let path = write(d, "external.onnx", &external_model("weights.bin", 16, 400));
    let graph = load(&path, &InputShapes::new()).unwrap();
    let weight = graph.weights().get("w").unwrap();
    assert!(
        matches!(weight.data, Some(kiln_ir::WeightBytes::Mapped { .. })),
        "external data must be mapped, not copied"
    );
    let x = Tensor::f32(&[100], vec![1.0; 100]).unwrap();
    let out = interp::run(&graph, &HashMap::from([("x".to_string(), x)])).unwrap();
    assert_eq!(out[0].1.to_f64s()[..3], [1.0, 2.0, 3.0]);
    let beyond = write(d, "beyond.onnx", &external_model("weights.bin", 100, 400));
    assert!(error_of(&beyond)
        .contains("external data 100..100+400 lies beyond the end of `weights.bin` (416 bytes)"));
    let escape = write(d, "escape.onnx", &external_model("../etc/passwd", 0, 400));
    assert!(error_of(&escape).contains("must stay inside the model's directory"));
    let missing = write(d, "missing.onnx", &external_model("nope.bin", 0, 400));
    assert!(error_of(&missing).contains("external data"));
}

#[test]
fn weight_only_quantized_exports_dequantize() {
    let dir = tempfile::tempdir().unwrap();
    let q: Vec<u8> = [-128i8, -1, 0, 1, 2, 127, 10, -10]
        .iter()
        .map(|&v| v as u8)
        .collect();
    // Cast + Mul: w = q * 0.5, then x @ w with x = [[1, 1]] over w [2, 4].
    let cast = {
        let mut n = node("Cast", "cast", &["wq"], &["wf"]);
        n.attribute.push(int_attr("to", F32.into()));
        n
    };
    let m = model(
        17,
        vec![
            cast,
            node("Mul", "scale", &["wf", "s"], &["w"]),
            node("MatMul", "mm", &["x", "w"], &["y"]),
        ],
        vec![value_info("x", F32, &[1, 2])],
        vec![value_info("y", F32, &[1, 4])],
        vec![
            tensor("wq", I8, &[2, 4], q.clone()),
            tensor("s", F32, &[], f32_bytes(&[0.5])),
        ],
    );
    let graph = load(&write(dir.path(), "cast_mul.onnx", &m), &InputShapes::new()).unwrap();
    let x = Tensor::f32(&[1, 2], vec![1.0, 1.0]).unwrap();
    let out = interp::run(&graph, &HashMap::from([("x".to_string(), x.clone())])).unwrap();
    assert_eq!(out[0].1.to_f64s(), [-63.0, 63.0, 5.0, -4.5]);
    // DequantizeLinear per output column (axis 1) with zero points: w = (q - z[c]) * s[c].
    let mut dq = node("DequantizeLinear", "dq", &["wq", "scales", "zeros"], &["w"]);
    dq.attribute.push(int_attr("axis", 1));
    let m = model(
        19,
        vec![dq, node("MatMul", "mm", &["x", "w"], &["y"])],
        vec![value_info("x", F32, &[1, 2])],
        vec![value_info("y", F32, &[1, 4])],
        vec![
            tensor("wq", I8, &[2, 4], q),
            tensor("scales", F32, &[4], f32_bytes(&[1.0, 0.5, 0.25, 2.0])),
            tensor("zeros", I8, &[4], vec![0, 1, 0, 255]),
        ],
    );
    let graph = load(
        &write(dir.path(), "dequantize.onnx", &m),
        &InputShapes::new(),
    )
    .unwrap();
    let out = interp::run(&graph, &HashMap::from([("x".to_string(), x)])).unwrap();
    // Column sums of (q - z) * s: (-128 + 2) * 1, (-1 - 1 + 127 - 1) * 0.5, (0 + 10) * 0.25, (1 + 1 - 10 + 1) * 2.
    assert_eq!(out[0].1.to_f64s(), [-126.0, 62.0, 2.5, -14.0]);
}

fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    tensor(
        name,
        7,
        dims,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

#[test]
fn review_regressions_fold_correctly_and_never_allocate_what_a_file_claims() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Range with a negative step of -2: ONNX gives [6, 4, 2].
    let range = model(
        17,
        vec![node("Range", "r", &["start", "limit", "delta"], &["y"])],
        vec![],
        vec![value_info("y", 7, &[3])],
        vec![
            i64_tensor("start", &[], &[6]),
            i64_tensor("limit", &[], &[0]),
            i64_tensor("delta", &[], &[-2]),
        ],
    );
    let graph = load(&write(d, "range.onnx", &range), &InputShapes::new()).unwrap();
    let out = interp::run(&graph, &HashMap::new()).unwrap();
    assert_eq!(out[0].1.to_i64s(), [6, 4, 2]);
    // A constant of 10^15 elements is a `fill` node, not an allocation at import.
    let huge = model(
        17,
        vec![node("ConstantOfShape", "c", &["shape"], &["y"])],
        vec![],
        vec![value_info("y", F32, &[100000, 100000, 100000])],
        vec![i64_tensor("shape", &[3], &[100000, 100000, 100000])],
    );
    let graph = load(&write(d, "huge.onnx", &huge), &InputShapes::new()).unwrap();
    let error = interp::run(&graph, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(error.contains("exceeds the interpreter's limit"), "{error}");
    // Degenerate nodes are errors, not panics.
    let empty_concat = model(
        17,
        vec![node("Concat", "c", &[], &["y"])],
        vec![],
        vec![value_info("y", F32, &[1])],
        vec![],
    );
    assert!(error_of(&write(d, "concat.onnx", &empty_concat))
        .contains("Concat needs at least one input"));
    let no_inputs = model(
        17,
        vec![node("Relu", "r", &[], &["y"])],
        vec![],
        vec![value_info("y", F32, &[1])],
        vec![],
    );
    assert!(
        error_of(&write(d, "relu.onnx", &no_inputs)).contains("expects at least 1 inputs, got 0")
    );
}
