//! The interpreter at graph level: symbolic dims bound from inputs, and input checking.

use kiln_ir::interp::{run, InterpError};
use kiln_ir::text::{parse, parse_file};
use kiln_ir::{Data, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn f32s(t: &Tensor) -> Vec<f32> {
    match t.data() {
        Data::F32(v) => v.clone(),
        other => panic!("expected f32, got {:?}", other.dtype()),
    }
}

fn inputs(pairs: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

const CONCAT_POSITIONS: &str = r#"graph "positions" {
  sym past <= 8
  sym seq <= 8
  input %cache : f32[past, 2]
  input %new : f32[seq, 2]
  %all = concat(%cache, %new) {axis = 0} : f32[past+seq, 2]
  %positions = range {start = past, step = 1, len = seq, dtype = i64} : i64[seq]
  %last = slice(%all) {axis = 0, start = -1, end = past+seq, step = 1} : f32[1, 2]
  output "all" = %all
  output "positions" = %positions
  output "last" = %last
}"#;

#[test]
fn symbols_bind_from_input_dims_and_flow_through_expressions() {
    let graph = parse(CONCAT_POSITIONS).unwrap();
    for (past, seq) in [(1usize, 1usize), (3, 2), (8, 8)] {
        let cache = Tensor::f32(&[past, 2], (0..past * 2).map(|v| v as f32).collect()).unwrap();
        let new = Tensor::f32(&[seq, 2], (0..seq * 2).map(|v| -(v as f32)).collect()).unwrap();
        let out = run(&graph, &inputs(vec![("cache", cache), ("new", new)])).unwrap();
        assert_eq!(out[0].1.shape(), [past + seq, 2]);
        assert_eq!(
            out[1].1.to_i64s(),
            (past as i64..(past + seq) as i64).collect::<Vec<_>>()
        );
        let last = -((seq * 2 - 2) as f32);
        assert_eq!(f32s(&out[2].1), [last, last - 1.0]);
    }
}

#[test]
fn inputs_are_checked_against_the_declared_types() {
    let graph = parse(CONCAT_POSITIONS).unwrap();
    let two = |rows: usize| Tensor::f32(&[rows, 2], vec![0.0; rows * 2]).unwrap();
    let err = |pairs| run(&graph, &inputs(pairs)).unwrap_err().to_string();
    assert_eq!(err(vec![("cache", two(1))]), "missing inputs: new");
    assert_eq!(
        err(vec![("cache", two(1)), ("new", two(1)), ("extra", two(1))]),
        "unknown inputs: extra"
    );
    assert_eq!(
        err(vec![("cache", two(9)), ("new", two(1))]),
        "input `cache` is f32[9, 2], expected f32[past, 2]: axis 0: past = 9 is outside 1..=8"
    );
    assert_eq!(
        err(vec![
            ("cache", Tensor::f32(&[1, 3], vec![0.0; 3]).unwrap()),
            ("new", two(1))
        ]),
        "input `cache` is f32[1, 3], expected f32[past, 2]: axis 1 must be 2"
    );
    assert_eq!(
        err(vec![
            ("cache", Tensor::i64(&[1, 2], vec![0; 2]).unwrap()),
            ("new", two(1))
        ]),
        "input `cache` is i64[1, 2], expected f32[past, 2]: dtype differs"
    );
}

#[test]
fn one_symbol_must_bind_consistently() {
    let graph = parse(
        r#"graph "g" {
  sym seq <= 8
  input %a : f32[seq]
  input %b : f32[seq]
  %c = add(%a, %b) : f32[seq]
  output "c" = %c
}"#,
    )
    .unwrap();
    let a = Tensor::f32(&[2], vec![1., 2.]).unwrap();
    let b = Tensor::f32(&[3], vec![1., 2., 3.]).unwrap();
    let error = run(&graph, &inputs(vec![("a", a), ("b", b)])).unwrap_err();
    assert!(
        matches!(error, InterpError::Inputs(ref m) if m.contains("seq is already bound to 2")),
        "{error}"
    );
}

#[test]
fn weights_without_data_are_refused_by_name() {
    let example = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/attention_block/attention_block.kir"
    ));
    let metadata_only = parse(&kiln_ir::text::print(&parse_file(example).unwrap())).unwrap();
    let x = Tensor::f32(&[1, 2, 16], vec![0.0; 32]).unwrap();
    let mask = Tensor::i64(&[1, 2], vec![1, 1]).unwrap();
    let error = run(
        &metadata_only,
        &inputs(vec![("x", x), ("attention_mask", mask)]),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "node %q_proj.weight (const): weight `q_proj.weight` has no data: load the graph together with its weights file"
    );
}

#[test]
fn attention_block_rows_do_not_depend_on_batch_or_padding() {
    // The same sequence run alone (seq 3) and as row 1 of a padded batch (seq 5) gives the same
    // hidden states on its valid tokens: symbolic batch and seq bind per run.
    let example = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/attention_block/attention_block.kir"
    ));
    let graph = parse_file(example).unwrap();
    let token = |t: usize, c: usize| ((t * 16 + c) % 7) as f32 / 8.0 - 0.4;
    let alone_x = Tensor::f32(
        &[1, 3, 16],
        (0..48).map(|i| token(i / 16, i % 16)).collect(),
    )
    .unwrap();
    let alone_mask = Tensor::i64(&[1, 3], vec![1; 3]).unwrap();
    let alone = run(
        &graph,
        &inputs(vec![("x", alone_x), ("attention_mask", alone_mask)]),
    )
    .unwrap();
    let batch_x: Vec<f32> = (0..2 * 5 * 16)
        .map(|i| {
            let (row, t, c) = (i / 80, (i / 16) % 5, i % 16);
            if row == 1 && t < 3 {
                token(t, c)
            } else {
                0.3
            }
        })
        .collect();
    let batch_mask = Tensor::i64(&[2, 5], vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]).unwrap();
    let batched = run(
        &graph,
        &inputs(vec![
            ("x", Tensor::f32(&[2, 5, 16], batch_x).unwrap()),
            ("attention_mask", batch_mask),
        ]),
    )
    .unwrap();
    let alone = f32s(&alone[0].1);
    let batched = f32s(&batched[0].1);
    for (i, a) in alone.iter().enumerate() {
        let b = batched[80 + i];
        assert!(
            (a - b).abs() < 1e-6,
            "token {} channel {}: {a} vs {b}",
            i / 16,
            i % 16
        );
    }
}
