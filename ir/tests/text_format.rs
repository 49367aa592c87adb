//! The text format: exact round trips, and clear errors (with line and column) for malformed
//! input.

use kiln_ir::text::{parse, parse_file, print};
use std::path::Path;

fn example_path() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/attention_block/attention_block.kir"
    ))
}

#[test]
fn attention_block_prints_as_snapshot_and_round_trips() {
    let graph = parse_file(example_path()).unwrap();
    kiln_ir::verify(&graph).unwrap();
    let printed = print(&graph);
    insta::assert_snapshot!("attention_block", printed);
    let reparsed =
        kiln_ir::text::parse_with_base(&printed, example_path().parent().unwrap()).unwrap();
    assert_eq!(print(&reparsed), printed);
}

#[test]
fn text_without_weights_file_keeps_references() {
    let graph = parse_file(example_path()).unwrap();
    let printed = print(&graph);
    let metadata_only = parse(&printed).unwrap();
    assert_eq!(print(&metadata_only), printed);
    let weight = metadata_only.weights().get("q_proj.weight").unwrap();
    assert!(weight.data.is_none());
    assert_eq!(
        weight.checksum,
        graph.weights().get("q_proj.weight").unwrap().checksum
    );
}

#[test]
fn names_and_strings_that_need_quoting_round_trip() {
    let src = r#"graph "odd \"names\"" {
  input %"onnx::Shape_0" : f32[2]
  %"a b" = neg(%"onnx::Shape_0") : f32[2]
  %/encoder/layer.0/Add_1-x = exp(%"a b") : f32[2]
  output "461" = %/encoder/layer.0/Add_1-x
  output "tab\there" = %"a b"
}
"#;
    let graph = parse(src).unwrap();
    assert_eq!(print(&graph), src);
}

#[test]
fn dim_expressions_round_trip_with_minimal_parentheses() {
    let src = r#"graph "dims" {
  sym a <= 8
  sym b <= 8
  input %x : f32[a*b, (a+b)*2, a-(b-1), a/2+1, -3+a]
  %y = neg(%x) : f32[a*b, (a+b)*2, a-(b-1), a/2+1, -3+a]
  output "y" = %y
}
"#;
    assert_eq!(print(&parse(src).unwrap()), src);
}

/// Each case: a malformed text, and the `line:col: message` it must be rejected with.
const MALFORMED: &[(&str, &str)] = &[
    ("", "1:1: expected `graph`, found end of input"),
    ("graph g {}", "1:7: expected the graph name as a string, found `g`"),
    ("graph \"g\" {\n  input %x : f32[2]\n}", "3:2: the graph declares no outputs"),
    ("graph \"g\" {\n  input %x : f33[2]\n  output \"x\" = %x\n}", "2:14: unknown dtype `f33`"),
    ("graph \"g\" {\n  input %x : f32[seq]\n  output \"x\" = %x\n}", "2:9: node %x (input): symbol `seq` is not declared"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = exp(%z)\n  output \"y\" = %y\n}", "3:12: node %z is not defined before this use"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = frobnicate(%x)\n  output \"y\" = %y\n}", "3:8: frobnicate: unknown op `frobnicate`"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = softmax(%x) {axis = 1, axis = 0}\n  output \"y\" = %y\n}", "3:31: attribute `axis` is given twice"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = softmax(%x) {axs = 0}\n  output \"y\" = %y\n}", "3:8: softmax: missing attribute `axis`"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = softmax(%x) {axis = 3}\n  output \"y\" = %y\n}", "3:8: node %y (softmax): axis 3 is out of range for rank 1"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = exp(%x) : f32[3]\n  output \"y\" = %y\n}", "3:18: node %y (exp): declared type f32[3] differs from the inferred f32[2]"),
    ("graph \"g\" {\n  input %x : f32[2]\n  input %x : f32[2]\n  output \"x\" = %x\n}", "3:9: node %x is defined twice"),
    ("graph \"g\" {\n  input %x : f32[2]\n  output \"x\" = %x\n  output \"x\" = %x\n}", "4:10: output `x` is declared twice"),
    ("graph \"g\" {\n  input %x : f32[2]\n  output \"x = %x\n}", "3:10: unterminated string"),
    ("graph \"g\" {\n  input %x : f32[2] $\n}", "2:21: unexpected character '$'"),
    ("graph \"g\" {\n  input %x : f32[99999999999999999999]\n}", "2:18: integer `99999999999999999999` does not fit in i64"),
    ("graph \"g\" {\n  %w = const \"w\" [1.0, 2.0] : f32[3]\n  output \"w\" = %w\n}", "2:18: 2 values given for 3 elements"),
    ("graph \"g\" {\n  %w = const \"w\" : f32[3]\n  output \"w\" = %w\n}", "2:20: weight `w` needs inline values or a checksum"),
    ("graph \"g\" {\n  %w = const \"w\" [1, 300] : u8[2]\n  output \"w\" = %w\n}", "2:18: `300` is out of range for u8"),
    ("graph \"g\" {\n  sym seq <= 0\n}", "2:7: symbol `seq` needs a maximum >= 1, got 0"),
    ("graph \"g\" {\n  sym inf <= 4\n}", "2:7: `inf` cannot name a symbol"),
    ("graph \"g\" {\n  input %x : f32[2]\n  output \"x\" = %x\n} trailing", "4:3: expected end of input after the graph, found `trailing`"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = transpose(%x) {perm = [-1]}\n  output \"y\" = %y\n}", "3:8: transpose: negative perm entry -1"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = attention(%x, %x, %x) {scale = 1.0, mask = causal(window = 2), tile_q = 1, tile_k = 1}\n  output \"y\" = %y\n}", "3:8: attention: unknown attribute `window`"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = cast(%x) {to = \"f16\"}\n  output \"y\" = %y\n}", "3:8: cast: attribute `to` must be a name, got `\"f16\"`"),
    ("graph \"g\" {\n  input %x : f32[2]\n  %y = exp(%x) : f32[2\n}", "4:1: expected `]`, found `}`"),
];

#[test]
fn malformed_text_is_rejected_with_line_and_column() {
    let base = std::env::temp_dir();
    for (src, expected) in MALFORMED {
        let error = kiln_ir::text::parse_with_base(src, &base)
            .expect_err(src)
            .to_string();
        assert!(
            error.starts_with(expected),
            "for input:\n{src}\nexpected error starting with: {expected}\n                   got: {error}"
        );
    }
}

#[test]
fn missing_weights_file_is_named() {
    let src = "graph \"g\" {\n  weights \"does-not-exist.safetensors\"\n}";
    let error = kiln_ir::text::parse_with_base(src, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("2:11: /nonexistent/does-not-exist.safetensors: "),
        "{error}"
    );
}

#[test]
fn extreme_integers_round_trip_and_long_chains_are_refused() {
    let src = "graph \"g\" {\n  input %x : f32[4]\n  %y = slice(%x) {axis = 0, start = -9223372036854775808, end = 9223372036854775807, step = 1} : f32[4]\n  output \"y\" = %y\n}\n";
    assert_eq!(print(&parse(src).unwrap()), src);
    let chain = format!(
        "graph \"g\" {{\n  input %x : f32[1{}]\n  output \"x\" = %x\n}}",
        "+1".repeat(100_000)
    );
    assert!(parse(&chain)
        .unwrap_err()
        .message
        .contains("more than 256 operators"));
    let negative = "graph \"g\" {\n  input %x : f32[-1]\n  output \"x\" = %x\n}";
    assert!(
        parse(negative)
            .unwrap_err()
            .message
            .contains("negative dim"),
        "{:?}",
        parse(negative).err()
    );
}

#[test]
fn deeply_nested_input_is_an_error_not_a_stack_overflow() {
    let dims = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let src = format!("graph \"g\" {{\n  input %x : f32[{dims}]\n  output \"x\" = %x\n}}");
    assert!(parse(&src)
        .unwrap_err()
        .message
        .contains("nested too deeply"));
    let list = format!("graph \"g\" {{\n  input %x : f32[1]\n  %y = softmax(%x) {{axis = {}1{}}}\n  output \"y\" = %y\n}}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(parse(&list)
        .unwrap_err()
        .message
        .contains("nested too deeply"));
}

#[test]
fn weights_file_checksums_and_types_are_checked() {
    let printed = print(&parse_file(example_path()).unwrap());
    let base = example_path().parent().unwrap();
    let at = printed.find("checksum 0x").unwrap() + "checksum 0x".len() + 15;
    let flipped = if &printed[at..=at] == "0" { "1" } else { "0" };
    let tampered = format!("{}{flipped}{}", &printed[..at], &printed[at + 1..]);
    let error = kiln_ir::text::parse_with_base(&tampered, base).unwrap_err();
    assert!(error.message.contains("has checksum"), "{error}");
    let retyped = printed.replacen(": f32[16, 16] checksum", ": f32[16, 8] checksum", 1);
    let error = kiln_ir::text::parse_with_base(&retyped, base).unwrap_err();
    assert!(
        error
            .message
            .contains("in the weights file, the text says f32[16, 8]"),
        "{error}"
    );
    let renamed = printed.replacen("const \"q_proj.weight\"", "const \"q_proj.weights\"", 1);
    let error = kiln_ir::text::parse_with_base(&renamed, base).unwrap_err();
    assert!(
        error.message.contains("is not in the weights file"),
        "{error}"
    );
}
