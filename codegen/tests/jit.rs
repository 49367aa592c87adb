//! The JIT against the reference interpreter: the shipped attention block, random graphs of the
//! ops it lowers, and run-time errors.

use kiln_codegen::{compile_jit, CodegenError};
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{interp, DType, Dim, Graph, NodeId, Op, Shape, Tensor, TensorType};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// Largest difference allowed: f32 accumulation in the JIT against f64 in the interpreter.
fn assert_close(jit: &Tensor, reference: &Tensor, context: &str) {
    assert_eq!(jit.shape(), reference.shape(), "{context}");
    assert_eq!(jit.dtype(), reference.dtype(), "{context}");
    for (i, (a, e)) in jit.to_f64s().iter().zip(reference.to_f64s()).enumerate() {
        let ok = (a.is_nan() && e.is_nan()) || a == &e || (a - e).abs() <= 1e-5 + 1e-4 * e.abs();
        assert!(ok, "{context}: element {i}: jit {a} vs interpreter {e}");
    }
}

#[test]
fn attention_block_matches_the_interpreter() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/attention_block");
    let graph = kiln_ir::text::parse_file(&dir.join("attention_block.kir")).unwrap();
    let inputs: HashMap<String, Tensor> = kiln_ir::load_tensors(&dir.join("inputs.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let mut jit = compile_jit(&graph).unwrap();
    let expected = interp::run(&graph, &inputs).unwrap();
    for _ in 0..2 {
        let actual = jit.run(&inputs).unwrap();
        assert_close(&actual[0].1, &expected[0].1, "hidden_states");
    }
    // A shorter sequence through the same compiled code: dims come from the symbols at run time.
    let short: HashMap<String, Tensor> = [
        (
            "x".to_string(),
            Tensor::f32(
                &[1, 3, 16],
                (0..48).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect(),
            )
            .unwrap(),
        ),
        (
            "attention_mask".to_string(),
            Tensor::i64(&[1, 3], vec![1, 1, 0]).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    assert_close(
        &jit.run(&short).unwrap()[0].1,
        &interp::run(&graph, &short).unwrap()[0].1,
        "short",
    );
}

#[test]
fn unsupported_ops_are_listed() {
    let graph = kiln_ir::text::parse(
        "graph \"g\" {\n  input %h : f16[4]\n  %e = exp(%h)\n  output \"e\" = %e\n}",
    )
    .unwrap();
    match compile_jit(&graph) {
        Err(CodegenError::Unsupported(ops)) => {
            assert_eq!(ops, ["exp on f16", "input on f16"])
        }
        other => panic!("expected unsupported ops, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn attention_masks_and_rope_match_the_interpreter() {
    for mask in [
        "dense",
        "causal",
        "sliding_window(window = 2)",
        "global_local(global = 1, window = 2)",
    ] {
        for runtime in ["", ", %keep", ", %bias"] {
            check_text_graph(&format!(
                "graph \"g\" {{\n  sym seq <= 6\n  input %q : f32[2, 4, seq, 4]\n  input %kv : f32[2, 2, seq, 4]\n  input %bias : f32[2, 1, 1, seq]\n  %zero = const \"zero\" [0.0] : f32[]\n  %keep = greater(%bias, %zero)\n  %z = attention(%q, %kv, %kv{runtime}) {{scale = 0.5, mask = {mask}, tile_q = 16, tile_k = 16}}\n  output \"z\" = %z\n}}"
            ));
        }
    }
    // One query against a longer cache: positions align to the end of the keys.
    check_text_graph("graph \"g\" {\n  sym seq <= 6\n  input %q : f32[1, 2, 2, 4]\n  input %kv : f32[1, 1, seq, 4]\n  %z = attention(%q, %kv, %kv) {scale = 0.5, mask = sliding_window(window = 2), tile_q = 16, tile_k = 16}\n  output \"z\" = %z\n}");
    for interleaved in [false, true] {
        check_text_graph(&format!(
            "graph \"g\" {{\n  sym seq <= 6\n  input %x : f32[2, 3, seq, 8]\n  input %cos : f32[seq, 8]\n  input %sin : f32[2, 1, seq, 8]\n  %y = rope(%x, %cos, %sin) {{interleaved = {interleaved}}}\n  output \"y\" = %y\n}}"
        ));
    }
}

#[test]
fn tiled_attention_matches_the_interpreter() {
    // 300 keys: beyond the materialized lowering's 256, so 64-key tiles stream through the
    // online softmax, over several 32-query tiles; the banded masks skip hidden tiles.
    for mask in [
        "dense",
        "causal",
        "sliding_window(window = 70)",
        "global_local(global = 3, window = 40)",
    ] {
        for runtime in ["", ", %keep", ", %bias"] {
            for queries in ["seq", "5"] {
                check_text_graph_at(
                    &format!(
                        "graph \"g\" {{\n  sym seq <= 320\n  input %q : f32[1, 4, {queries}, 8]\n  input %kv : f32[1, 2, seq, 8]\n  input %bias : f32[1, 1, 1, seq]\n  %zero = const \"zero\" [0.0] : f32[]\n  %keep = greater(%bias, %zero)\n  %z = attention(%q, %kv, %kv{runtime}) {{scale = 0.7, mask = {mask}, tile_q = 32, tile_k = 64}}\n  output \"z\" = %z\n}}"
                    ),
                    300,
                );
            }
        }
    }
}

#[test]
fn gather_checks_indices_even_when_the_output_is_empty() {
    // Regression (found by the random-graph property): the interpreter refuses an index out of
    // range even when the gathered slices are empty, and so must the JIT.
    let graph = kiln_ir::text::parse(
        "graph \"g\" {\n  input %x : f32[2, 0]\n  %i = range {start = 1, step = 1, len = 2, dtype = i64} : i64[2]\n  %y = gather(%x, %i) {axis = 0}\n  output \"y\" = %y\n}",
    )
    .unwrap();
    let feed: HashMap<String, Tensor> = [("x".to_string(), Tensor::f32(&[2, 0], vec![]).unwrap())]
        .into_iter()
        .collect();
    assert!(interp::run(&graph, &feed).is_err());
    assert_eq!(
        compile_jit(&graph)
            .unwrap()
            .run(&feed)
            .unwrap_err()
            .to_string(),
        "node %y (gather): gather index out of range"
    );
}

#[test]
fn integer_division_by_zero_is_an_error_not_a_crash() {
    let graph = kiln_ir::text::parse("graph \"g\" {\n  input %a : i64[2]\n  input %b : i64[2]\n  %q = div(%a, %b)\n  output \"q\" = %q\n}").unwrap();
    let mut jit = compile_jit(&graph).unwrap();
    let feed = |b: Vec<i64>| -> HashMap<String, Tensor> {
        [
            (
                "a".to_string(),
                Tensor::i64(&[2], vec![i64::MIN, 7]).unwrap(),
            ),
            ("b".to_string(), Tensor::i64(&[2], b).unwrap()),
        ]
        .into_iter()
        .collect()
    };
    assert_eq!(
        jit.run(&feed(vec![-1, 2])).unwrap()[0].1.to_i64s(),
        [i64::MIN, 3]
    );
    let error = jit.run(&feed(vec![1, 0])).unwrap_err().to_string();
    assert_eq!(error, "node %q (div): integer division by zero");
}

/// A random graph over the ops the JIT lowers.
fn random_graph(steps: &[(u8, u16, u16)]) -> Graph {
    let mut g = Graph::new("random");
    g.declare_symbol("seq", 6).unwrap();
    let shapes = [
        vec![Dim::sym("seq"), Dim::Const(4)],
        vec![Dim::Const(2), Dim::sym("seq"), Dim::Const(4)],
        vec![Dim::Const(4)],
        vec![Dim::Const(2), Dim::Const(1), Dim::Const(4)],
    ];
    let mut nodes: Vec<NodeId> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            g.add_input(
                &format!("x{i}"),
                TensorType::new(DType::F32, Shape(s.clone())),
            )
            .unwrap()
        })
        .collect();
    for (i, &(kind, a, b)) in steps.iter().enumerate() {
        let pick = |k: u16| nodes[k as usize % nodes.len()];
        let (first, second) = (pick(a), pick(b));
        let rank = g.node(first).ty.rank();
        let (op, operands): (Op, Vec<NodeId>) = match kind % 16 {
            0 => (Op::Unary(UnaryOp::ALL[a as usize % 19]), vec![first]),
            1 => (
                Op::Binary(
                    [
                        BinaryOp::Add,
                        BinaryOp::Sub,
                        BinaryOp::Mul,
                        BinaryOp::Div,
                        BinaryOp::Max,
                        BinaryOp::Min,
                        BinaryOp::Pow,
                    ][b as usize % 7],
                ),
                vec![first, second],
            ),
            2 if rank >= 2 => {
                // x @ x^T always contracts matching dims.
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(rank - 2, rank - 1);
                match g.add_node(&format!("t{i}"), Op::Transpose { perm }, &[first]) {
                    Ok(t) => (Op::MatMul, vec![first, t]),
                    Err(_) => continue,
                }
            }
            2 => continue,
            3 => (
                Op::Softmax {
                    axis: -1 - (a as i64 % rank.max(1) as i64),
                },
                vec![first],
            ),
            4 => (
                Op::Reduce {
                    op: ReduceOp::ALL[b as usize % 5],
                    axes: vec![-1],
                    keep_dims: a % 2 == 0,
                },
                vec![first],
            ),
            5 => {
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.reverse();
                (Op::Transpose { perm }, vec![first])
            }
            6 => (
                Op::Reshape {
                    shape: Shape(vec![g.node(first).ty.shape.numel()]),
                },
                vec![first],
            ),
            7 => {
                let cond = g.add_node(
                    &format!("c{i}"),
                    Op::Binary(BinaryOp::Less),
                    &[first, second],
                );
                match cond {
                    Ok(c) => (Op::Where, vec![c, first, second]),
                    Err(_) => continue,
                }
            }
            8 => (
                Op::Expand {
                    shape: Shape(
                        std::iter::once(Dim::Const(2))
                            .chain(g.node(first).ty.shape.0.iter().cloned())
                            .collect(),
                    ),
                },
                vec![first],
            ),
            9 => (
                Op::Slice {
                    axis: -1,
                    start: Dim::Const(a as i64 % 3 - 1),
                    end: Dim::Const(4),
                    step: [1, 2, -1][b as usize % 3],
                },
                vec![first],
            ),
            10 => (Op::Concat { axis: -1 }, vec![first, second]),
            11 => (
                Op::LayerNorm {
                    axis: -1,
                    eps: kiln_ir::F32(1e-5),
                },
                vec![first, second],
            ),
            12 => (
                Op::RmsNorm {
                    eps: kiln_ir::F32(1e-6),
                },
                vec![first, second],
            ),
            13 => {
                let range = Op::Range {
                    start: Dim::Const(a as i64 % 2),
                    step: 1,
                    len: Dim::Const(2),
                    dtype: DType::I64,
                };
                match g.add_node(&format!("ids{i}"), range, &[]) {
                    Ok(ids) => (Op::Gather { axis: 0 }, vec![first, ids]),
                    Err(_) => continue,
                }
            }
            14 => {
                let op = if a % 2 == 0 {
                    kiln_ir::ops::ArgOp::Max
                } else {
                    kiln_ir::ops::ArgOp::Min
                };
                match g.add_node(
                    &format!("arg{i}"),
                    Op::Arg {
                        op,
                        axis: -1,
                        keep_dims: true,
                        select_last: b % 2 == 0,
                    },
                    &[first],
                ) {
                    Ok(index) => (Op::Cast { to: DType::F32 }, vec![index]),
                    Err(_) => continue,
                }
            }
            _ => (
                Op::Fill {
                    value: kiln_ir::Scalar::float(0.25),
                    dtype: DType::F32,
                    shape: g.node(first).ty.shape.clone(),
                },
                vec![],
            ),
        };
        if let Ok(id) = g.add_node(&format!("n{i}"), op, &operands) {
            nodes.push(id);
        }
    }
    let last = *nodes.last().unwrap();
    g.add_output("out", last).unwrap();
    if last != nodes[0] {
        g.add_output("first", nodes[0]).unwrap();
    }
    g
}

fn random_inputs(graph: &Graph, seq: usize) -> HashMap<String, Tensor> {
    let bindings = HashMap::from([("seq".to_string(), seq as i64)]);
    graph
        .inputs()
        .iter()
        .map(|&id| {
            let node = graph.node(id);
            let dims = node.ty.shape.eval(&bindings).unwrap();
            let n: usize = dims.iter().product();
            let values = (0..n)
                .map(|i| ((i * 37 + 11) % 17) as f32 / 8.0 - 1.0)
                .collect();
            (node.name.clone(), Tensor::f32(&dims, values).unwrap())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_match_the_interpreter(steps in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 1..12), seq in 1usize..=6) {
        let graph = random_graph(&steps);
        let inputs = random_inputs(&graph, seq);
        let mut jit = compile_jit(&graph).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match (interp::run(&graph, &inputs), jit.run(&inputs)) {
            (Ok(expected), Ok(actual)) => {
                for ((name, a), (_, e)) in actual.iter().zip(&expected) {
                    assert_close(a, e, &format!("{name} of\n{}", kiln_ir::text::print(&graph)));
                }
            }
            (Err(_), Err(_)) => {}
            (expected, actual) => {
                return Err(TestCaseError::fail(format!("interpreter {:?} but JIT {:?}", expected.map(|_| ()), actual.map(|_| ()))));
            }
        }
    }
}

/// Runs `src` on deterministic inputs through the JIT and the interpreter and compares.
fn check_text_graph(src: &str) {
    check_text_graph_at(src, 3);
}

/// As [`check_text_graph`], with the symbol `seq` bound to `seq`.
fn check_text_graph_at(src: &str, seq: usize) {
    let graph = kiln_ir::text::parse(src).unwrap();
    let inputs = random_inputs(&graph, seq);
    let expected = interp::run(&graph, &inputs).unwrap();
    let actual = compile_jit(&graph).unwrap().run(&inputs).unwrap();
    for ((name, a), (_, e)) in actual.iter().zip(&expected) {
        assert_close(a, e, name);
    }
}

#[test]
fn gemm_epilogues_and_vector_matmuls_match_the_interpreter() {
    let weights = "[0.5, -0.25, 0.125, 1.0, 0.0, 0.75, -1.0, 0.25, 0.5, 0.5, -0.5, 0.0, 1.5, -0.75, 0.25, 0.125]";
    for (trans_b, bias, activation, residual) in [
        (true, true, "gelu", true),
        (false, false, "none", false),
        (false, true, "silu", false),
        (true, false, "tanh", true),
        (false, true, "relu", true),
        (false, true, "gelu_tanh", true),
        (true, true, "erf", false),
        (false, true, "sigmoid", true),
    ] {
        let operands = format!(
            "%a, %w{}{}",
            if bias { ", %b" } else { "" },
            if residual { ", %r" } else { "" }
        );
        check_text_graph(&format!(
            "graph \"g\" {{\n  input %a : f32[2, 3, 4]\n  input %r : f32[2, 3, 4]\n  %w = const \"w\" {weights} : f32[4, 4]\n  %b = const \"b\" [0.5, -0.5, 0.25, 0.0] : f32[4]\n  %y = gemm({operands}) {{trans_b = {trans_b}, bias = {bias}, activation = {activation}, residual = {residual}}}\n  output \"y\" = %y\n  output \"r\" = %r\n  output \"bias\" = %b\n}}"
        ));
    }
    // The gated product from packed weights, and from weights computed at run time.
    check_text_graph(&format!(
        "graph \"g\" {{\n  input %a : f32[2, 3, 4]\n  input %u : f32[4, 4]\n  %w = const \"w\" {weights} : f32[4, 4]\n  %v = const \"v\" [1.0, -0.5, 0.25, 0.0, 0.5, 0.75, -1.0, 0.125, 0.0, 0.25, 0.5, -0.25, 1.5, 0.5, -0.75, 1.0] : f32[4, 4]\n  %packed = swiglu(%a, %w, %v)\n  %plain = swiglu(%a, %u, %u)\n  output \"packed\" = %packed\n  output \"plain\" = %plain\n}}"
    ));
    // A bias that is not one value per column takes the loop after the product.
    check_text_graph(&format!(
        "graph \"g\" {{\n  input %a : f32[2, 3, 4]\n  input %r : f32[2, 3, 4]\n  input %b : f32[3, 1]\n  %w = const \"w\" {weights} : f32[4, 4]\n  %y = gemm(%a, %w, %b, %r) {{trans_b = false, bias = true, activation = gelu, residual = true}}\n  output \"y\" = %y\n}}"
    ));
    check_text_graph(&format!(
        "graph \"g\" {{\n  input %v : f32[4]\n  %w = const \"w\" {weights} : f32[4, 4]\n  %vm = matmul(%v, %w) : f32[4]\n  %mv = matmul(%w, %v) : f32[4]\n  %dot = matmul(%v, %v) : f32[]\n  output \"vm\" = %vm\n  output \"mv\" = %mv\n  output \"dot\" = %dot\n}}"
    ));
}

#[test]
fn buffers_without_an_upper_bound_are_refused() {
    let graph = kiln_ir::text::parse(
        "graph \"g\" {\n  sym seq <= 8\n  input %x : f32[seq]\n  %y = fill {value = 1.0, dtype = f32, shape = [4/(seq-1)]}\n  output \"y\" = %y\n  output \"x\" = %x\n}",
    )
    .unwrap();
    match compile_jit(&graph) {
        Err(CodegenError::Plan(message)) => {
            assert!(message.contains("has no upper bound"), "{message}")
        }
        other => panic!("expected a planning error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn review_regressions_match_the_interpreter() {
    // Dims round down like `Dim::eval`: (3 - 8) / 2 is -3, not -2.
    check_text_graph("graph \"g\" {\n  sym seq <= 8\n  input %x : f32[seq]\n  %y = fill {value = 1.0, dtype = f32, shape = [((seq-8)/2+4)*4]}\n  output \"y\" = %y\n  output \"x\" = %x\n}");
    // Reductions, softmax and attention accumulate in f64 like the interpreter.
    check_text_graph("graph \"g\" {\n  input %x : f32[1]\n  %c = const \"c\" [100000000.0, 1.0, -100000000.0] : f32[3]\n  %s = reduce_sum(%c) {axes = [0], keep_dims = false}\n  output \"s\" = %s\n  output \"x\" = %x\n}");
}

/// Units in the last place between `got` and the correctly rounded `want`.
fn ulps(got: f32, want: f32) -> u32 {
    let key = |v: f32| {
        let bits = v.to_bits() as i32;
        if bits < 0 {
            i32::MIN.wrapping_sub(bits)
        } else {
            bits
        }
    };
    key(got).abs_diff(key(want))
}

/// `op` applied by the JIT to each of `values`.
fn run_unary_f32(op: &str, values: &[f32]) -> Vec<f64> {
    let n = values.len();
    let graph = kiln_ir::text::parse(&format!(
        "graph \"g\" {{\n  input %x : f32[{n}]\n  %y = {op}(%x)\n  output \"y\" = %y\n}}"
    ))
    .unwrap();
    let feed: HashMap<String, Tensor> =
        [("x".to_string(), Tensor::f32(&[n], values.to_vec()).unwrap())]
            .into_iter()
            .collect();
    let out = compile_jit(&graph).unwrap().run(&feed).unwrap();
    out[0].1.to_f64s()
}

#[test]
fn erf_matches_libm_over_the_f32_range() {
    // Every 256th finite f32 (the polynomials' seams at |x| = 1 and 4 included), then the
    // special values.
    let mut values: Vec<f32> = (0u32..u32::MAX)
        .step_by(256)
        .map(f32::from_bits)
        .filter(|v| v.is_finite())
        .collect();
    values.extend([
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        1.0,
        -1.0,
        4.0,
        f32::MIN_POSITIVE,
        f32::MAX,
    ]);
    let got = run_unary_f32("erf", &values);
    let mut worst = 0u32;
    for (&x, &y) in values.iter().zip(&got) {
        let (y, want) = (y as f32, UnaryOp::Erf.apply_f64(f64::from(x)) as f32);
        if x.is_nan() {
            assert!(y.is_nan());
            continue;
        }
        let error = ulps(y, want);
        assert!(error <= 2, "erf({x:e}) = {y:e}, want {want:e}: {error} ulp");
        worst = worst.max(error);
    }
    println!("erf over {} values: {worst} ulp", values.len());
}

#[test]
fn exp_matches_libm_over_the_f32_range() {
    // Every 256th f32 between -110 and 100, then the special values softmax and GELU meet.
    let mut values: Vec<f32> = Vec::new();
    for bits in (0u32..u32::MAX).step_by(256) {
        let v = f32::from_bits(bits);
        if v.is_finite() && (-110.0..=100.0).contains(&v) {
            values.push(v);
        }
    }
    values.extend([
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        88.72283,
        88.72284,
        -87.33655,
        -103.97207,
        f32::MAX,
        f32::MIN,
    ]);
    let n = values.len();
    let got = run_unary_f32("exp", &values);
    let (mut worst_normal, mut worst_subnormal) = (0u32, 0u32);
    for (&x, &y) in values.iter().zip(&got) {
        let (y, want) = (y as f32, f64::from(x).exp() as f32);
        if x.is_nan() {
            assert!(y.is_nan());
            continue;
        }
        let error = ulps(y, want);
        if want.is_normal() || want.is_infinite() || want == 0.0 && x < -104.0 {
            worst_normal = worst_normal.max(error);
        } else {
            worst_subnormal = worst_subnormal.max(error);
        }
    }
    println!("exp over {n} values: {worst_normal} ulp (normal results), {worst_subnormal} ulp (subnormal results)");
    assert!(worst_normal <= 1, "normal results: {worst_normal} ulp");
    assert!(
        worst_subnormal <= 1,
        "subnormal results: {worst_subnormal} ulp"
    );
}

/// The four-lane row kernels (softmax, layer and RMS norm, elementwise) at every row length
/// around the lane count, with parameters along the row or broadcast, rows far from zero (a
/// mean of 1000 and a spread of 0.01), and -inf and NaN in softmax rows.
#[test]
fn vector_rows_match_the_interpreter() {
    for len in 1..=9 {
        let values = |offset: f32, spread: f32| {
            let row: Vec<String> = (0..3 * len)
                .map(|i| {
                    format!(
                        "{:?}",
                        offset + spread * (((i * 37 + 11) % 17) as f32 / 8.0 - 1.0)
                    )
                })
                .collect();
            format!("[{}]", row.join(", "))
        };
        let params = |value: f32| vec![format!("{value:?}"); len].join(", ");
        let (near, far) = (values(0.0, 1.0), values(1000.0, 0.01));
        check_text_graph(&format!(
            "graph \"g\" {{\n  input %x : f32[3, {len}]\n  %near = const \"near\" {near} : f32[3, {len}]\n  %far = const \"far\" {far} : f32[3, {len}]\n  %g = const \"g\" [{}] : f32[{len}]\n  %b = const \"b\" [{}] : f32[{len}]\n  %one = const \"one\" [1.5] : f32[1]\n  %ln = layer_norm(%far, %g, %b) {{axis = -1, eps = 1e-5}}\n  %ln1 = layer_norm(%near, %one) {{axis = -1, eps = 1e-5}}\n  %rms = rms_norm(%far, %g) {{eps = 1e-6}}\n  %soft = softmax(%near) {{axis = -1}}\n  %sum = add(%x, %near)\n  %scaled = mul(%near, %one)\n  %rowwise = sub(%near, %g)\n  %e = exp(%near)\n  %s = silu(%far)\n  output \"ln\" = %ln\n  output \"ln1\" = %ln1\n  output \"rms\" = %rms\n  output \"soft\" = %soft\n  output \"sum\" = %sum\n  output \"scaled\" = %scaled\n  output \"rowwise\" = %rowwise\n  output \"e\" = %e\n  output \"s\" = %s\n}}",
            params(0.75),
            params(-0.5)
        ));
        let special: Vec<&str> = (0..len)
            .map(|i| match i % 3 {
                0 => "-inf",
                1 => "0.5",
                _ => "-2.0",
            })
            .collect();
        let graph = kiln_ir::text::parse(&format!(
            "graph \"g\" {{\n  input %x : f32[1, {len}]\n  %c = const \"c\" [{}] : f32[1, {len}]\n  %s = softmax(%c) {{axis = -1}}\n  output \"s\" = %s\n  output \"x\" = %x\n}}",
            special.join(", ")
        ))
        .unwrap();
        let inputs = random_inputs(&graph, 1);
        let expected = interp::run(&graph, &inputs).unwrap();
        let actual = compile_jit(&graph).unwrap().run(&inputs).unwrap();
        assert_close(
            &actual[0].1,
            &expected[0].1,
            &format!("softmax with -inf, len {len}"),
        );
    }
}

/// Reshapes own no buffer: they read their source's, here an input's, whose pointer each run sets
/// in every slot that shares it (a regression: the shared slots were left null).
#[test]
fn reshapes_share_their_source_buffers() {
    check_text_graph("graph \"g\" {\n  sym seq <= 8\n  input %x : f32[seq, 4]\n  %flat = reshape(%x) {shape = [seq*4]}\n  %again = reshape(%flat) {shape = [2, seq*2]}\n  %doubled = add(%again, %again)\n  %w = const \"w\" [1.0, 2.0, 3.0, 4.0] : f32[4]\n  %wide = reshape(%w) {shape = [2, 2]}\n  output \"flat\" = %flat\n  output \"doubled\" = %doubled\n  output \"wide\" = %wide\n}");
}

/// Kernels large enough to run as parallel tasks (transposes, elementwise ops with and without
/// lanes, normalization, softmax over a middle axis, batched products over heads) give the same
/// bits on one thread and on three, and match the interpreter.
#[test]
fn parallel_tasks_match_one_thread_and_the_interpreter() {
    let graph = kiln_ir::text::parse(
        "graph \"g\" {\n  sym seq <= 128\n  input %x : f32[3, seq, 128]\n  input %y : f32[3, seq, 128]\n  %t = transpose(%x) {perm = [1, 0, 2]}\n  %u = transpose(%x) {perm = [2, 1, 0]}\n  %s = add(%x, %y)\n  %m = mul(%x, %y)\n  %c = equal(%x, %y)\n  %w = where(%c, %x, %y)\n  %g = const \"g\" [0.5] : f32[1]\n  %n = layer_norm(%s, %g) {axis = -1, eps = 1e-5}\n  %p = softmax(%x) {axis = 1}\n  %u2 = transpose(%y) {perm = [0, 2, 1]}\n  %q = matmul(%x, %u2)\n  output \"t\" = %t\n  output \"u\" = %u\n  output \"m\" = %m\n  output \"w\" = %w\n  output \"n\" = %n\n  output \"p\" = %p\n  output \"q\" = %q\n}",
    )
    .unwrap();
    // 3 x 128 x 128 outputs: above the runtime's threshold for splitting a kernel.
    let inputs = random_inputs(&graph, 128);
    let expected = interp::run(&graph, &inputs).unwrap();
    let mut jit = compile_jit(&graph).unwrap();
    let single = jit.run(&inputs).unwrap();
    jit.set_threads(3).unwrap();
    let parallel = jit.run(&inputs).unwrap();
    for (((name, one), (_, three)), (_, want)) in single.iter().zip(&parallel).zip(&expected) {
        assert_eq!(one, three, "{name}: one thread and three differ");
        assert_close(three, want, name);
    }
}

/// Every 256th finite f32, then the special values.
fn f32_sweep() -> Vec<f32> {
    let mut values: Vec<f32> = (0u32..u32::MAX)
        .step_by(256)
        .map(f32::from_bits)
        .filter(|v| v.is_finite())
        .collect();
    values.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0]);
    values
}

/// Where a function's small outputs are checked in absolute terms: for `x` with `applies(x)`,
/// `|got - want| <= max(relative |want|, absolute)`.
struct Tail {
    applies: fn(f32) -> bool,
    relative: f64,
    absolute: f64,
}

/// Runs `name` on `values` through the JIT and checks it against the f64 reference: NaN where
/// the reference is NaN, within the tail's bound where it applies, within `bound` ulp elsewhere.
/// Prints the worst ulp error and the worst tail error.
fn check_against_reference(
    name: &str,
    op: UnaryOp,
    values: &[f32],
    bound: u32,
    tail: Option<Tail>,
) {
    let got = run_unary_f32(name, values);
    let (mut worst, mut worst_tail) = (0u32, 0f64);
    for (&x, &y) in values.iter().zip(&got) {
        let want = op.apply_f64(f64::from(x)) as f32;
        if want.is_nan() {
            assert!(y.is_nan(), "{name}({x:e}) = {y:e}, want NaN");
            continue;
        }
        if let Some(tail) = tail.as_ref().filter(|t| (t.applies)(x)) {
            let error = (y - f64::from(want)).abs();
            let allowed = (tail.relative * f64::from(want).abs()).max(tail.absolute);
            assert!(error <= allowed, "{name}({x:e}) = {y:e}, want {want:e}");
            worst_tail = worst_tail.max(error);
            continue;
        }
        let error = ulps(y as f32, want);
        assert!(
            error <= bound,
            "{name}({x:e}) = {y:e}, want {want:e}: {error} ulp"
        );
        worst = worst.max(error);
    }
    println!(
        "{name} over {} values: {worst} ulp, tail {worst_tail:e}",
        values.len()
    );
}

/// GELU (error-function form, the runtime's 16-lane kernel) from -20 to 20. Measured: at most
/// 27 ulp where `x/sqrt 2 >= -4` (growing toward x = -5.6, where the erfc polynomial's relative
/// error shows in outputs below 0.02 in magnitude), and beyond, where outputs are below 4.5e-8 in
/// magnitude, within 4.7e-10.
#[test]
fn gelu_matches_the_reference_over_its_range() {
    let mut values: Vec<f32> = f32_sweep()
        .into_iter()
        .filter(|v| !v.is_finite() || (-20.0..=20.0).contains(v))
        .collect();
    values.extend([1.0, -1.0, -5.656_854, 5.656_854]);
    let tail = Tail {
        applies: |x| f64::from(x) / std::f64::consts::SQRT_2 < -4.0,
        relative: 0.0,
        absolute: 1e-9,
    };
    check_against_reference("gelu", UnaryOp::Gelu, &values, 32, Some(tail));
}

/// Sigmoid and SiLU (f32x4 lanes with the inline `exp`, scalar tail), subnormal sigmoids below
/// x = -87.3 included (a regression: they came out 0). Measured: sigmoid 2 ulp, SiLU 3 ulp (below
/// x = -87.33, where it is x times a subnormal sigmoid, within 1e-5 relative or 1e-42).
#[test]
fn sigmoid_matches_the_reference_over_the_f32_range() {
    let mut values = f32_sweep();
    values.extend([88.7, -88.7, -104.0]);
    check_against_reference("sigmoid", UnaryOp::Sigmoid, &values, 2, None);
    let tail = Tail {
        applies: |x| x < -87.33,
        relative: 1e-5,
        absolute: 1e-42,
    };
    check_against_reference("silu", UnaryOp::Silu, &values, 4, Some(tail));
}

/// tanh and GELU's tanh form (the runtime's 16-lane kernels). Measured: tanh 1 ulp; GELU-tanh 14
/// ulp from x = -3 up and 3.1e-9 absolute below, where its outputs are under 0.004 in magnitude
/// (e^(-2|u|) carries the rounding of u times 2|u|).
#[test]
fn tanh_and_gelu_tanh_match_the_reference_over_the_f32_range() {
    let mut values = f32_sweep();
    values.extend([0.625, -0.625]);
    check_against_reference("tanh", UnaryOp::Tanh, &values, 1, None);
    let tail = Tail {
        applies: |x| x < -3.0,
        relative: 0.0,
        absolute: 4e-9,
    };
    check_against_reference("gelu_tanh", UnaryOp::GeluTanh, &values, 16, Some(tail));
}

/// A weight stored `n × k` and transposed by the graph (PyTorch's `Linear`) is packed from its
/// stored layout and the transpose never runs; a weight also read elsewhere keeps its bytes.
#[test]
fn transposed_constant_weights_are_packed_from_their_layout() {
    let values: Vec<String> = (0..40)
        .map(|i| format!("{:?}", (i % 7) as f32 * 0.25 - 0.5))
        .collect();
    let w = values.join(", ");
    check_text_graph(&format!(
        "graph \"g\" {{\n  input %x : f32[2, 3, 8]\n  %w = const \"w\" [{w}] : f32[5, 8]\n  %v = const \"v\" [{w}] : f32[5, 8]\n  %wt = transpose(%w) {{perm = [1, 0]}}\n  %vt = transpose(%v) {{perm = [1, 0]}}\n  %y = matmul(%x, %wt)\n  %z = matmul(%x, %vt)\n  %g = gemm(%x, %vt) {{trans_b = false, bias = false, activation = relu, residual = false}}\n  %h = gemm(%x, %v) {{trans_b = true, bias = false, activation = none, residual = false}}\n  output \"y\" = %y\n  output \"z\" = %z\n  output \"g\" = %g\n  output \"h\" = %h\n  output \"vt\" = %vt\n}}"
    ));
}
