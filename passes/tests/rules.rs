//! Every rewrite rule on a hand-written graph, positive and negative: the IR after the default
//! pipeline is snapshotted, and translation validation runs the interpreter on the graph before
//! and after on random inputs (the passes are exact, up to rounding).

use kiln_ir::{interp, text, Graph, Tensor};
use kiln_passes::Pipeline;
use std::collections::HashMap;

/// Deterministic inputs in [-2, 2) (booleans alternate), at the symbols' maxima.
fn inputs(graph: &Graph) -> HashMap<String, Tensor> {
    let maxima = graph.maxima();
    graph
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, &id)| {
            let node = graph.node(id);
            let shape = node.ty.shape.eval(&maxima).unwrap();
            let numel: usize = shape.iter().product();
            let tensor = if node.ty.dtype == kiln_ir::DType::Bool {
                Tensor::from_bools(shape, (0..numel).map(|i| (i + n) % 3 != 0).collect())
            } else {
                let values = (0..numel)
                    .map(|i| (((i * 37 + n * 11) % 101) as f64 / 101.0) * 4.0 - 2.0)
                    .collect();
                Tensor::from_f64s(node.ty.dtype, shape, values)
            };
            (node.name.clone(), tensor)
        })
        .collect()
}

/// Runs the pipeline, checks the result against the source with the interpreter, and returns
/// its text.
fn optimize(source: &str) -> String {
    let graph = text::parse(source).unwrap();
    let optimized = Pipeline::default().run(&graph).unwrap();
    let feed = inputs(&graph);
    let before = interp::run(&graph, &feed).unwrap();
    let after = interp::run(&optimized, &feed).unwrap();
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a.shape(), b.shape(), "{name}");
        let diff = a
            .to_f64s()
            .iter()
            .zip(b.to_f64s())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff <= 1e-5,
            "{name}: the pipeline changed the output by {diff}"
        );
    }
    text::print(&optimized)
}

fn attention(scores: &str) -> String {
    format!(
        r#"graph "attention" {{
  input %q : f32[1, 2, 8, 4]
  input %k : f32[1, 2, 8, 4]
  input %v : f32[1, 2, 8, 4]
  input %mask : f32[1, 1, 1, 8]
  input %keep : bool[1, 1, 8, 8]
  %two = const "two" [2.0] : f32[]
  %min = const "min" [-3.4028235e38] : f32[]
  %zero = const "zero" [0.0] : f32[]
  %ninf = const "ninf" [-inf] : f32[]
  %k_t = transpose(%k) {{perm = [0, 1, 3, 2]}} : f32[1, 2, 4, 8]
  %scores = matmul(%q, %k_t) : f32[1, 2, 8, 8]
{scores}
  %context = matmul(%probs, %v) : f32[1, 2, 8, 4]
  output "context" = %context
}}"#
    )
}

#[test]
fn attention_with_division_and_additive_mask() {
    insta::assert_snapshot!(optimize(&attention(
        "  %scaled = div(%scores, %two) : f32[1, 2, 8, 8]
  %masked = add(%scaled, %mask) : f32[1, 2, 8, 8]
  %probs = softmax(%masked) {axis = -1} : f32[1, 2, 8, 8]"
    )));
}

#[test]
fn attention_with_boolean_mask() {
    insta::assert_snapshot!(optimize(&attention(
        "  %masked = where(%keep, %scores, %min) : f32[1, 2, 8, 8]
  %probs = softmax(%masked) {axis = 3} : f32[1, 2, 8, 8]"
    )));
}

#[test]
fn attention_with_sdpa_export_mask_and_nan_guard() {
    insta::assert_snapshot!(optimize(&attention(
        "  %bias = where(%keep, %zero, %ninf) : f32[1, 1, 8, 8]
  %masked = add(%scores, %bias) : f32[1, 2, 8, 8]
  %p = softmax(%masked) {axis = -1} : f32[1, 2, 8, 8]
  %same = equal(%p, %p) : bool[1, 2, 8, 8]
  %nan = not(%same) : bool[1, 2, 8, 8]
  %probs = where(%nan, %zero, %p) : f32[1, 2, 8, 8]"
    )));
}

#[test]
fn attention_not_fused_when_softmax_is_not_over_keys() {
    let fused = optimize(&attention(
        "  %probs = softmax(%scores) {axis = 2} : f32[1, 2, 8, 8]",
    ));
    assert!(!fused.contains("attention("), "{fused}");
    insta::assert_snapshot!(fused);
}

#[test]
fn attention_not_fused_with_a_mask_fill_that_is_not_very_negative() {
    let fused = optimize(&attention(
        "  %masked = where(%keep, %scores, %two) : f32[1, 2, 8, 8]
  %probs = softmax(%masked) {axis = -1} : f32[1, 2, 8, 8]",
    ));
    assert!(!fused.contains("attention("), "{fused}");
}

fn activation(body: &str) -> String {
    format!(
        r#"graph "activation" {{
  input %x : f32[2, 8]
  input %y : f32[2, 8]
  %half = const "half" [0.5] : f32[]
  %one = const "one" [1.0] : f32[]
  %root2 = const "root2" [1.4142135] : f32[]
{body}
  output "out" = %out
}}"#
    )
}

#[test]
fn gelu_erf_form() {
    insta::assert_snapshot!(optimize(&activation(
        "  %scaled = div(%x, %root2) : f32[2, 8]
  %erf = erf(%scaled) : f32[2, 8]
  %shifted = add(%erf, %one) : f32[2, 8]
  %product = mul(%x, %shifted) : f32[2, 8]
  %out = mul(%product, %half) : f32[2, 8]"
    )));
}

#[test]
fn gelu_not_fused_with_the_wrong_constant() {
    let fused = optimize(&activation(
        "  %scaled = div(%x, %root2) : f32[2, 8]
  %erf = erf(%scaled) : f32[2, 8]
  %shifted = add(%erf, %one) : f32[2, 8]
  %product = mul(%x, %shifted) : f32[2, 8]
  %out = mul(%product, %one) : f32[2, 8]",
    ));
    assert!(!fused.contains("gelu("), "{fused}");
}

#[test]
fn silu_and_its_negative() {
    insta::assert_snapshot!(optimize(&activation(
        "  %gate = sigmoid(%x) : f32[2, 8]
  %silu = mul(%x, %gate) : f32[2, 8]
  %other = sigmoid(%y) : f32[2, 8]
  %not_silu = mul(%x, %other) : f32[2, 8]
  %out = add(%silu, %not_silu) : f32[2, 8]"
    )));
}

/// A decomposed layer norm of `%x` whose mean is taken of `mean_of`.
fn layer_norm(mean_of: &str) -> String {
    format!(
        r#"graph "layer_norm" {{
  input %x : f32[2, 8]
  input %y : f32[2, 8]
  %gamma = const "gamma" [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0] : f32[8]
  %beta = const "beta" [0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.0] : f32[8]
  %two = const "two" [2.0] : f32[]
  %eps = const "eps" [1e-5] : f32[]
  %mean = reduce_mean({mean_of}) {{axes = [1], keep_dims = true}} : f32[2, 1]
  %centered = sub(%x, %mean) : f32[2, 8]
  %squared = pow(%centered, %two) : f32[2, 8]
  %variance = reduce_mean(%squared) {{axes = [-1], keep_dims = true}} : f32[2, 1]
  %shifted = add(%variance, %eps) : f32[2, 1]
  %std = sqrt(%shifted) : f32[2, 1]
  %normalized = div(%centered, %std) : f32[2, 8]
  %scaled = mul(%normalized, %gamma) : f32[2, 8]
  %out = add(%scaled, %beta) : f32[2, 8]
  output "out" = %out
}}"#
    )
}

#[test]
fn layer_norm_decomposed() {
    insta::assert_snapshot!(optimize(&layer_norm("%x")));
}

#[test]
fn rms_norm_decomposed() {
    insta::assert_snapshot!(optimize(
        r#"graph "rms_norm" {
  input %x : f32[2, 8]
  %gamma = const "gamma" [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0] : f32[8]
  %two = const "two" [2.0] : f32[]
  %eps = const "eps" [1e-6] : f32[]
  %squared = pow(%x, %two) : f32[2, 8]
  %mean = reduce_mean(%squared) {axes = [-1], keep_dims = true} : f32[2, 1]
  %shifted = add(%mean, %eps) : f32[2, 1]
  %rms = sqrt(%shifted) : f32[2, 1]
  %inverse = reciprocal(%rms) : f32[2, 1]
  %normalized = mul(%x, %inverse) : f32[2, 8]
  %out = mul(%gamma, %normalized) : f32[2, 8]
  output "out" = %out
}"#
    ));
}

#[test]
fn rms_norm_not_fused_over_a_middle_axis() {
    let fused = optimize(
        r#"graph "rms_norm" {
  input %x : f32[2, 8]
  %gamma = const "gamma" [1.0, 2.0] : f32[2, 1]
  %two = const "two" [2.0] : f32[]
  %eps = const "eps" [1e-6] : f32[]
  %squared = pow(%x, %two) : f32[2, 8]
  %mean = reduce_mean(%squared) {axes = [0], keep_dims = true} : f32[1, 8]
  %shifted = add(%mean, %eps) : f32[1, 8]
  %rms = sqrt(%shifted) : f32[1, 8]
  %normalized = div(%x, %rms) : f32[2, 8]
  %out = mul(%normalized, %gamma) : f32[2, 8]
  output "out" = %out
}"#,
    );
    assert!(!fused.contains("rms_norm("), "{fused}");
}

#[test]
fn scales_on_query_and_key_meet() {
    insta::assert_snapshot!(optimize(&attention(
        "  %root = const \"root\" [0.5] : f32[]
  %q_scaled = mul(%q, %root) : f32[1, 2, 8, 4]
  %k_scaled = mul(%k_t, %root) : f32[1, 2, 4, 8]
  %both = matmul(%q_scaled, %k_scaled) : f32[1, 2, 8, 8]
  %probs = softmax(%both) {axis = -1} : f32[1, 2, 8, 8]"
    )));
}

#[test]
fn division_by_a_constant_is_a_product() {
    let graph = text::parse(&activation("  %out = div(%x, %root2) : f32[2, 8]")).unwrap();
    let canonical = Pipeline::only(&["canonicalize".into()])
        .unwrap()
        .run(&graph)
        .unwrap();
    insta::assert_snapshot!(text::print(&canonical));
}

fn grouped(values: &str) -> String {
    format!(
        r#"graph "grouped" {{
  sym seq <= 8
  input %q : f32[1, 4, seq, 4]
  input %k : f32[1, 2, seq, 4]
  input %v4 : f32[1, 4, seq, 4]
  input %v2 : f32[1, 2, seq, 4]
  %k_split = reshape(%k) {{shape = [1, 2, 1, seq, 4]}} : f32[1, 2, 1, seq, 4]
  %k_expand = expand(%k_split) {{shape = [1, 2, 2, seq, 4]}} : f32[1, 2, 2, seq, 4]
  %k_repeat = reshape(%k_expand) {{shape = [1, 4, seq, 4]}} : f32[1, 4, seq, 4]
  %v_split = reshape(%v2) {{shape = [1, 2, 1, seq, 4]}} : f32[1, 2, 1, seq, 4]
  %v_expand = expand(%v_split) {{shape = [1, 2, 2, seq, 4]}} : f32[1, 2, 2, seq, 4]
  %v_repeat = reshape(%v_expand) {{shape = [1, 4, seq, 4]}} : f32[1, 4, seq, 4]
  %k_t = transpose(%k_repeat) {{perm = [0, 1, 3, 2]}} : f32[1, 4, 4, seq]
  %scores = matmul(%q, %k_t) : f32[1, 4, seq, seq]
  %probs = softmax(%scores) {{axis = -1}} : f32[1, 4, seq, seq]
  %context = matmul(%probs, {values}) : f32[1, 4, seq, 4]
  output "context" = %context
}}"#
    )
}

#[test]
fn grouped_query_attention_reads_the_shared_heads() {
    insta::assert_snapshot!(optimize(&grouped("%v_repeat")));
}

#[test]
fn grouped_query_attention_keeps_repeated_keys_when_values_are_not_repeated() {
    let fused = optimize(&grouped("%v4"));
    assert!(fused.contains("attention(%q, %k_repeat, %v4)"), "{fused}");
}

#[test]
fn transpose_and_reshape_chains_compose() {
    insta::assert_snapshot!(optimize(
        r#"graph "layout" {
  input %x : f32[2, 3, 4]
  %t1 = transpose(%x) {perm = [1, 0, 2]} : f32[3, 2, 4]
  %t2 = transpose(%t1) {perm = [1, 0, 2]} : f32[2, 3, 4]
  %round_trip = exp(%t2) : f32[2, 3, 4]
  %t3 = transpose(%x) {perm = [0, 2, 1]} : f32[2, 4, 3]
  %t4 = transpose(%t3) {perm = [2, 0, 1]} : f32[3, 2, 4]
  %r1 = reshape(%t4) {shape = [6, 4]} : f32[6, 4]
  %r2 = reshape(%r1) {shape = [24]} : f32[24]
  %rotated = neg(%r2) : f32[24]
  output "round_trip" = %round_trip
  output "rotated" = %rotated
}"#
    ));
}

#[test]
fn gelu_tanh_form() {
    insta::assert_snapshot!(optimize(
        r#"graph "gelu_tanh" {
  input %x : f32[2, 8]
  %half = const "half" [0.5] : f32[]
  %one = const "one" [1.0] : f32[]
  %three = const "three" [3.0] : f32[]
  %a = const "a" [0.044715] : f32[]
  %c = const "c" [0.7978846] : f32[]
  %cube = pow(%x, %three) : f32[2, 8]
  %cubic = mul(%a, %cube) : f32[2, 8]
  %inner = add(%x, %cubic) : f32[2, 8]
  %scaled = mul(%c, %inner) : f32[2, 8]
  %t = tanh(%scaled) : f32[2, 8]
  %shifted = add(%t, %one) : f32[2, 8]
  %halved = mul(%half, %x) : f32[2, 8]
  %out = mul(%halved, %shifted) : f32[2, 8]
  output "out" = %out
}"#
    ));
}

#[test]
fn division_by_zero_stays_a_division() {
    let graph = text::parse(
        r#"graph "g" {
  input %x : f32[2]
  %zero = const "zero" [0.0] : f32[]
  %out = div(%x, %zero) : f32[2]
  output "out" = %out
}"#,
    )
    .unwrap();
    let canonical = Pipeline::only(&["canonicalize".into()])
        .unwrap()
        .run(&graph)
        .unwrap();
    assert!(text::print(&canonical).contains("div(%x, %zero)"));
}

#[test]
fn layer_norm_not_fused_when_the_mean_is_not_of_the_same_tensor() {
    let fused = optimize(&layer_norm("%y"));
    assert!(!fused.contains("layer_norm("), "{fused}");
}

#[test]
fn report_names_the_failing_part_of_an_unfused_attention() {
    // A softmax over the last axis written as a positive axis (regression: the report called it
    // "not over the last axis"); the mask's fill is not very negative, so nothing fuses.
    let source = attention(
        "  %masked = where(%keep, %scores, %two) : f32[1, 2, 8, 8]
  %probs = softmax(%masked) {axis = 3} : f32[1, 2, 8, 8]",
    );
    let optimized = Pipeline::default()
        .run(&text::parse(&source).unwrap())
        .unwrap();
    let report = kiln_passes::report::fusion_report(&optimized);
    let attention = &report.patterns["attention"];
    assert_eq!((attention.sites, attention.fused), (1, 0));
    assert!(
        attention.misses[0]
            .reason
            .contains("its values or types were refused"),
        "{}",
        attention.misses[0].reason
    );
}

#[test]
fn matmul_epilogues_fuse_bias_activation_and_residual() {
    insta::assert_snapshot!(optimize(
        r#"graph "ffn" {
  input %x : f32[2, 3, 4]
  %w_in = const "w_in" [0.5, -1.0, 0.25, 2.0, -0.5, 1.5, 0.75, -0.25, 1.0, 0.125, -2.0, 0.5, 0.375, -0.75, 1.25, -1.5, 0.5, 1.0, -1.0, 0.25, 2.0, -0.5, 1.5, 0.75, -0.25, 1.0, 0.125, -2.0, 0.5, 0.375, -0.75, 1.25] : f32[4, 8]
  %b_in = const "b_in" [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8] : f32[8]
  %w_out = const "w_out" [1.0, -0.5, 0.25, 0.5, -1.0, 0.75, -0.25, 2.0, 0.5, -1.5, 1.0, 0.125, -0.75, 0.25, 1.25, -0.5, 0.5, 1.0, -1.0, 0.25, 2.0, -0.5, 1.5, 0.75, -0.25, 1.0, 0.125, -2.0, 0.5, 0.375, -0.75, 1.25] : f32[8, 4]
  %b_out = const "b_out" [0.25, -0.25, 0.5, -0.5] : f32[4]
  %up = matmul(%x, %w_in) : f32[2, 3, 8]
  %up_biased = add(%b_in, %up) : f32[2, 3, 8]
  %hidden = gelu(%up_biased) : f32[2, 3, 8]
  %down = matmul(%hidden, %w_out) : f32[2, 3, 4]
  %down_biased = add(%down, %b_out) : f32[2, 3, 4]
  %residual = add(%x, %down_biased) : f32[2, 3, 4]
  output "y" = %residual
}"#
    ));
}

#[test]
fn matmul_epilogue_keeps_its_order() {
    // A bias added after the activation, and a product by a batch of matrices, stay unfused.
    insta::assert_snapshot!(optimize(
        r#"graph "unfused" {
  input %x : f32[3, 2]
  input %y : f32[4, 3, 2]
  %w = const "w" [0.5, -1.0, 0.25, 2.0, -0.5, 1.5] : f32[2, 3]
  %b = const "b" [0.1, -0.2, 0.3] : f32[3]
  %b2 = const "b2" [0.5, -0.5] : f32[2]
  %product = matmul(%x, %w) : f32[3, 3]
  %activated = relu(%product) : f32[3, 3]
  %biased = add(%activated, %b) : f32[3, 3]
  %batched = matmul(%biased, %y) : f32[4, 3, 2]
  %shifted = add(%batched, %b2) : f32[4, 3, 2]
  output "z" = %shifted
}"#
    ));
}

/// `x * cos + concat(-r[..., a:b], r[..., c:d]) * sin` for `r` = `rotated`, `(a, b)` =
/// `negated_half` and `(c, d)` = `kept_half`.
fn rotary(rotated: &str, negated_half: (u32, u32), kept_half: (u32, u32)) -> String {
    format!(
        r#"graph "rotary" {{
  sym seq <= 4
  input %x : f32[1, 2, seq, 8]
  input %other : f32[1, 2, seq, 8]
  input %cos : f32[seq, 8]
  input %sin : f32[seq, 8]
  %x2 = slice(%{rotated}) {{axis = -1, start = {}, end = {}, step = 1}} : f32[1, 2, seq, 4]
  %neg_x2 = neg(%x2) : f32[1, 2, seq, 4]
  %x1 = slice(%{rotated}) {{axis = 3, start = {}, end = {}, step = 1}} : f32[1, 2, seq, 4]
  %rotated = concat(%neg_x2, %x1) {{axis = -1}} : f32[1, 2, seq, 8]
  %cos_part = mul(%cos, %x) : f32[1, 2, seq, 8]
  %sin_part = mul(%rotated, %sin) : f32[1, 2, seq, 8]
  %y = add(%sin_part, %cos_part) : f32[1, 2, seq, 8]
  output "y" = %y
}}"#,
        negated_half.0, negated_half.1, kept_half.0, kept_half.1
    )
}

#[test]
fn rotary_embedding_is_rope() {
    // The second half's end past the axis (as exporters write INT64_MAX) is the same slice.
    insta::assert_snapshot!(optimize(&rotary("x", (4, 1000), (0, 4))));
}

#[test]
fn rotary_embedding_not_fused_with_the_halves_swapped_or_of_another_tensor() {
    for fused in [
        optimize(&rotary("x", (0, 4), (4, 8))),
        optimize(&rotary("other", (4, 8), (0, 4))),
    ] {
        assert!(!fused.contains("rope("), "{fused}");
    }
}

#[test]
fn swiglu_and_its_negative() {
    let graph = |up_input: &str| {
        format!(
            r#"graph "mlp" {{
  input %x : f32[3, 2]
  input %y : f32[3, 2]
  %w_gate = const "w_gate" [0.5, -1.0, 0.25, 2.0, -0.5, 1.5] : f32[2, 3]
  %w_up = const "w_up" [1.0, 0.5, -0.25, -2.0, 0.75, 0.125] : f32[2, 3]
  %gate = matmul(%x, %w_gate) : f32[3, 3]
  %sigmoid = sigmoid(%gate) : f32[3, 3]
  %activated = mul(%gate, %sigmoid) : f32[3, 3]
  %up = matmul(%{up_input}, %w_up) : f32[3, 3]
  %gated = mul(%up, %activated) : f32[3, 3]
  output "z" = %gated
}}"#
        )
    };
    insta::assert_snapshot!(optimize(&graph("x")));
    // Gate and up projections of different inputs: the SiLU goes into the gate's product only.
    let unfused = optimize(&graph("y"));
    assert!(!unfused.contains("swiglu("), "{unfused}");
    assert!(unfused.contains("activation = silu"), "{unfused}");
}

#[test]
fn scales_of_projections_fold_into_their_weights() {
    insta::assert_snapshot!(optimize(
        r#"graph "scaled" {
  input %x : f32[3, 2]
  input %y : f32[2, 2]
  %w = const "w" [0.5, -1.0, 0.25, 2.0] : f32[2, 2]
  %v = const "v" [1.0, 0.5, -0.25, -2.0] : f32[2, 2]
  %quarter = const "quarter" [0.25] : f32[]
  %eight = const "eight" [8.0] : f32[]
  %logits = matmul(%x, %w) : f32[3, 2]
  %scaled = div(%logits, %eight) : f32[3, 2]
  %v_t = transpose(%v) {perm = [1, 0]} : f32[2, 2]
  %projected = matmul(%x, %v_t) : f32[3, 2]
  %quartered = mul(%quarter, %projected) : f32[3, 2]
  %runtime = matmul(%x, %y) : f32[3, 2]
  %runtime_scaled = mul(%runtime, %quarter) : f32[3, 2]
  output "scaled" = %scaled
  output "quartered" = %quartered
  output "runtime_scaled" = %runtime_scaled
}"#
    ));
}
