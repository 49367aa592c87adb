//! Rewrite rules. Canonicalizing rules make the spellings of different exporters meet; fusion
//! rules recognize each fused op in every spelling that survives canonicalization. Patterns are
//! generated from their parts (scale by multiplication or none, additive or boolean mask, the
//! operand orders of commutative ops), and appliers check values and types before adding the
//! fused node, so a match that would change the result is never applied.

use super::lang::{EGraph, OpLabel, ScalarLeaf, TensorLang, TypeAnalysis};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Var};
use kiln_ir::ops::{Attention, BinaryOp, Gemm, MaskSpec, UnaryOp};
use kiln_ir::{DType, Op, TensorType, F32};
use std::sync::Arc;

type Rule = Rewrite<TensorLang, TypeAnalysis>;

/// Default tile sizes of fused attention; the codegen rule picks the kernel per shape.
pub const TILE_Q: u32 = 32;
/// See [`TILE_Q`].
pub const TILE_K: u32 = 64;

fn var(name: &str) -> Var {
    name.parse().expect("a valid pattern variable")
}

fn pattern(text: &str) -> Pattern<TensorLang> {
    text.parse()
        .unwrap_or_else(|e| panic!("rule pattern `{text}` does not parse: {e}"))
}

/// The value of a scalar e-class.
fn scalar(egraph: &EGraph, id: Id) -> Option<f32> {
    egraph[id].data.scalar
}

fn close(value: f32, expected: f64) -> bool {
    (f64::from(value) - expected).abs() <= 1e-6 * expected.abs().max(1.0)
}

/// Adds `enode` and merges it into `class` if its type equals the class's; returns the merged
/// class, or nothing when the types disagree.
fn add_checked(egraph: &mut EGraph, class: Id, enode: TensorLang) -> Vec<Id> {
    let added = egraph.add(enode);
    let same = match (&egraph[added].data.ty, &egraph[class].data.ty) {
        (Some(a), Some(b)) => a.equiv(b),
        _ => false,
    };
    if same && egraph.union(class, added) {
        vec![added]
    } else {
        vec![]
    }
}

fn op(op: Op, children: Vec<Id>) -> TensorLang {
    TensorLang::Op(OpLabel::new(op), children)
}

/// The right-hand side of a rewrite as Rust code: given the match (its e-class and
/// substitution), it adds what the match equals and returns the classes it changed.
trait Rewriter {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id>;
}

/// A [`Rewriter`] as egg's applier.
struct Apply<R>(R);

impl<R: Rewriter> Applier<TensorLang, TypeAnalysis> for Apply<R> {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        class: Id,
        subst: &Subst,
        _: Option<&PatternAst<TensorLang>>,
        _: egg::Symbol,
    ) -> Vec<Id> {
        self.0.rewrite(egraph, class, subst)
    }
}

/// The left-hand side of a rewrite as Rust code, for matches a pattern cannot state (the
/// attributes of ops vary): the substitutions matching in one e-class, at most `limit`.
trait Finder {
    fn find(&self, egraph: &EGraph, eclass: Id, limit: usize) -> Vec<Subst>;
    fn vars(&self) -> Vec<Var>;
}

/// A [`Finder`] as egg's searcher.
struct Search<F>(F);

impl<F: Finder> egg::Searcher<TensorLang, TypeAnalysis> for Search<F> {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, TensorLang>> {
        let substs = self.0.find(egraph, eclass, limit);
        (!substs.is_empty()).then_some(egg::SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

/// A rule whose right-hand side is Rust code.
fn rule(name: &str, lhs: &str, rewriter: impl Rewriter + Send + Sync + 'static) -> Rule {
    Rewrite::new(name, pattern(lhs), Apply(rewriter))
        .unwrap_or_else(|e| panic!("rule `{name}`: {e}"))
}

/// `x / c` as `x * (1/c)` for a finite non-zero scalar `c`, so that scale folding and fusion see
/// one form.
struct DivisionByConstant;

impl Rewriter for DivisionByConstant {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let (x, c) = (subst[var("?x")], subst[var("?c")]);
        let (Some(value), Some(ty)) = (scalar(egraph, c), egraph[c].data.ty.clone()) else {
            return vec![];
        };
        let inverse = 1.0 / value;
        if value == 0.0 || !inverse.is_finite() || ty.dtype != DType::F32 {
            return vec![];
        }
        let leaf = egraph.add(TensorLang::Scalar(ScalarLeaf::new(
            inverse,
            ty.rank() as u8,
        )));
        if egraph[leaf].data.ty.as_ref() != Some(&ty) {
            return vec![];
        }
        add_checked(egraph, class, op(Op::Binary(BinaryOp::Mul), vec![x, leaf]))
    }
}

/// `(a * s) @ (b * t)` as `(a @ b) * (s t)` for scalars `s` and `t`: exporters of scaled
/// dot-product attention scale the query and the key by `sqrt(scale)` each. (A one-sided scale
/// stays where it is: hoisting it would pull GELU's factor 0.5 past the next projection.)
struct HoistScales;

impl Rewriter for HoistScales {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let Some(folded) = scalar_product(egraph, subst[var("?s")], subst[var("?t")]) else {
            return vec![];
        };
        let product = egraph.add(op(Op::MatMul, vec![subst[var("?a")], subst[var("?b")]]));
        add_checked(
            egraph,
            class,
            op(Op::Binary(BinaryOp::Mul), vec![product, folded]),
        )
    }
}

/// A scalar leaf holding `s * t`, of the larger rank of the two.
fn scalar_product(egraph: &mut EGraph, s: Id, t: Id) -> Option<Id> {
    let value = scalar(egraph, s)? * scalar(egraph, t)?;
    let rank = [s, t]
        .iter()
        .filter_map(|&c| egraph[c].data.ty.as_ref().map(|t| t.rank()))
        .max()
        .unwrap_or(0);
    Some(egraph.add(TensorLang::Scalar(ScalarLeaf::new(value, rank as u8))))
}

/// `(x * s) * t` as `x * (s t)` for scalars `s` and `t`.
struct FoldScales;

impl Rewriter for FoldScales {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let Some(folded) = scalar_product(egraph, subst[var("?s")], subst[var("?t")]) else {
            return vec![];
        };
        add_checked(
            egraph,
            class,
            op(Op::Binary(BinaryOp::Mul), vec![subst[var("?x")], folded]),
        )
    }
}

/// `(x @ w) * s` as `x @ (w * s)` for a scalar `s` and a 2-D weight `w` (or the transpose of
/// one, scaled before it is transposed), so that the scale costs nothing at run time: the
/// `fold-constants` pass computes `w * s` once (the cost model assumes that pass runs, as it
/// does in the default pipeline).
struct ScaleIntoWeight;

impl Rewriter for ScaleIntoWeight {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let (x, w, s) = (subst[var("?x")], subst[var("?w")], subst[var("?s")]);
        if scalar(egraph, s).is_none() {
            return vec![];
        }
        let data = &egraph[w].data;
        let weight = if data.weight_only && data.ty.as_ref().map(TensorType::rank) == Some(2) {
            egraph.add(op(Op::Binary(BinaryOp::Mul), vec![w, s]))
        } else {
            let transposed = unary_nodes(
                egraph,
                w,
                &|o| matches!(o, Op::Transpose { perm } if perm.as_slice() == [1, 0]),
            )
            .map(|(_, source)| source)
            .find(|&source| egraph[source].data.weight_only);
            let Some(source) = transposed else {
                return vec![];
            };
            let scaled = egraph.add(op(Op::Binary(BinaryOp::Mul), vec![source, s]));
            egraph.add(op(Op::Transpose { perm: vec![1, 0] }, vec![scaled]))
        };
        add_checked(egraph, class, op(Op::MatMul, vec![x, weight]))
    }
}

/// Two layout ops in a row, `outer(inner(x))`, both transposes or both reshapes.
struct LayoutChains;

/// The one layout op equal to `outer(inner(x))`, or `None` for the identity.
fn compose(outer: &Op, inner: &Op) -> Option<Option<Op>> {
    match (outer, inner) {
        (Op::Transpose { perm: p }, Op::Transpose { perm: q }) if p.len() == q.len() => {
            let perm: Vec<usize> = p.iter().map(|&i| q[i]).collect();
            let identity = perm.iter().enumerate().all(|(i, &p)| i == p);
            Some((!identity).then_some(Op::Transpose { perm }))
        }
        (Op::Reshape { shape }, Op::Reshape { .. }) => Some(Some(Op::Reshape {
            shape: shape.clone(),
        })),
        _ => None,
    }
}

fn is_layout(op: &Op) -> bool {
    matches!(op, Op::Transpose { .. } | Op::Reshape { .. })
}

impl Finder for LayoutChains {
    fn find(&self, egraph: &EGraph, eclass: Id, limit: usize) -> Vec<Subst> {
        let mut substs = Vec::new();
        for (outer, middle) in unary_nodes(egraph, eclass, &is_layout) {
            for (inner, x) in unary_nodes(egraph, middle, &is_layout) {
                if compose(outer, inner).is_some() && substs.len() < limit {
                    let mut subst = Subst::with_capacity(2);
                    subst.insert(var("?middle"), middle);
                    subst.insert(var("?x"), x);
                    substs.push(subst);
                }
            }
        }
        substs
    }

    fn vars(&self) -> Vec<Var> {
        vec![var("?middle"), var("?x")]
    }
}

impl Rewriter for LayoutChains {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let (middle, x) = (subst[var("?middle")], subst[var("?x")]);
        let pairs: Vec<Option<Op>> = unary_nodes(egraph, class, &is_layout)
            .filter(|&(_, m)| egraph.find(m) == egraph.find(middle))
            .flat_map(|(outer, _)| {
                unary_nodes(egraph, middle, &is_layout)
                    .filter(|&(_, inner_x)| egraph.find(inner_x) == egraph.find(x))
                    .filter_map(|(inner, _)| compose(outer, inner))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut changed = Vec::new();
        for composed in pairs {
            match composed {
                None => {
                    let same = egraph[class]
                        .data
                        .ty
                        .as_ref()
                        .zip(egraph[x].data.ty.as_ref());
                    if same.is_some_and(|(a, b)| a.equiv(b)) && egraph.union(class, x) {
                        changed.push(x);
                    }
                }
                Some(op_) => changed.extend(add_checked(egraph, class, op(op_, vec![x]))),
            }
        }
        changed
    }
}

/// The canonicalizing rules.
pub fn canonical() -> Vec<Rule> {
    vec![
        Rewrite::new(
            "compose-layout-chains",
            Search(LayoutChains),
            Apply(LayoutChains),
        )
        .expect("valid rule"),
        rule("div-by-constant", "(div ?x ?c)", DivisionByConstant),
        rule(
            "hoist-scales",
            "(matmul (mul ?a ?s) (mul ?b ?t))",
            HoistScales,
        ),
        rule("fold-scales", "(mul (mul ?x ?s) ?t)", FoldScales),
        rule(
            "scale-into-weight-0",
            "(mul (matmul ?x ?w) ?s)",
            ScaleIntoWeight,
        ),
        rule(
            "scale-into-weight-1",
            "(mul ?s (matmul ?x ?w))",
            ScaleIntoWeight,
        ),
        // Exporters transpose keys straight from [b, s, h, d] to [b, h, d, s]; attention wants the
        // head split [b, h, s, d] and a transpose of its last two axes.
        Rewrite::new(
            "split-key-transpose",
            pattern("(transpose{perm=[0,2,3,1]} ?x)"),
            pattern("(transpose{perm=[0,1,3,2]} (transpose{perm=[0,2,1,3]} ?x))"),
        )
        .expect("valid rule"),
    ]
}

/// How a spelling of attention scales its scores.
#[derive(Clone, Copy)]
enum ScaleSite {
    /// `scores * s` or `s * scores`.
    Scores,
    /// No scale (the model folded it into the query weights).
    Unscaled,
}

/// How it masks them.
#[derive(Clone, Copy)]
enum MaskSite {
    /// `scores + mask` (either order).
    Additive,
    /// `where(keep, scores, very negative)`.
    Keep,
    /// `scores + where(keep, 0, very negative)` (either order).
    KeepAdditive,
    /// Nothing.
    Unmasked,
}

/// Fuses `softmax(scale * q @ k^T + mask) @ v` into `attention`.
struct FuseAttention {
    scaled: bool,
    mask: MaskSite,
    /// The probabilities pass through `where(isnan(p), 0, p)` (PyTorch's SDPA export), which
    /// zeroes fully masked rows as the fused op does.
    nan_guard: bool,
}

impl Rewriter for FuseAttention {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let scale = if self.scaled {
            match scalar(egraph, subst[var("?s")]) {
                Some(s) if s.is_finite() => s,
                _ => return vec![],
            }
        } else {
            1.0
        };
        let is_zero = |name: &str| scalar(egraph, subst[var(name)]) == Some(0.0);
        if self.nan_guard && !is_zero("?guard_zero") {
            return vec![];
        }
        let mut children = vec![subst[var("?q")], subst[var("?k")], subst[var("?v")]];
        match self.mask {
            MaskSite::Additive => children.push(subst[var("?mask")]),
            MaskSite::Keep | MaskSite::KeepAdditive => {
                let fill = scalar(egraph, subst[var("?fill")]);
                // Softmax gives a key scored f32::MIN (or -inf) exactly zero weight unless every
                // key of the row is masked. Such a row (a padding query) is the one difference:
                // exporters give it NaN or the mean of the values, the fused op zeros, as the
                // NaN-guarded spelling does.
                if !fill.is_some_and(|f| f <= -1e30) {
                    return vec![];
                }
                if matches!(self.mask, MaskSite::KeepAdditive) && !is_zero("?zero") {
                    return vec![];
                }
                let keep = subst[var("?keep")];
                if egraph[keep].data.ty.as_ref().map(|t| t.dtype) != Some(DType::Bool) {
                    return vec![];
                }
                children.push(keep);
            }
            MaskSite::Unmasked => {}
        }
        let fused = Op::Attention(Attention {
            scale: F32(scale),
            mask: MaskSpec::Dense,
            tile_q: TILE_Q,
            tile_k: TILE_K,
        });
        add_checked(egraph, class, op(fused, children))
    }
}

fn attention_rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    let product = "(matmul ?q (transpose{perm=[0,1,3,2]} ?k))";
    for scale in [ScaleSite::Scores, ScaleSite::Unscaled] {
        let scaled: Vec<String> = match scale {
            ScaleSite::Scores => commuted("mul", product, "?s").to_vec(),
            ScaleSite::Unscaled => vec![product.to_string()],
        };
        for mask in [
            MaskSite::Additive,
            MaskSite::Keep,
            MaskSite::KeepAdditive,
            MaskSite::Unmasked,
        ] {
            let masked: Vec<String> = scaled
                .iter()
                .flat_map(|s| match mask {
                    MaskSite::Additive => commuted("add", s, "?mask").to_vec(),
                    MaskSite::Keep => vec![format!("(where ?keep {s} ?fill)")],
                    MaskSite::KeepAdditive => {
                        commuted("add", s, "(where ?keep ?zero ?fill)").to_vec()
                    }
                    MaskSite::Unmasked => vec![s.clone()],
                })
                .collect();
            for (i, scores) in masked.iter().enumerate() {
                for nan_guard in [false, true] {
                    let probs = format!("(softmax{{axis=-1}} {scores})");
                    let probs = if nan_guard {
                        format!("(where (not (equal {probs} {probs})) ?guard_zero {probs})")
                    } else {
                        probs
                    };
                    let name = format!(
                        "fuse-attention-{}-{}{}-{i}",
                        match scale {
                            ScaleSite::Scores => "scaled",
                            ScaleSite::Unscaled => "unscaled",
                        },
                        match mask {
                            MaskSite::Additive => "additive",
                            MaskSite::Keep => "keep",
                            MaskSite::KeepAdditive => "keep-additive",
                            MaskSite::Unmasked => "unmasked",
                        },
                        if nan_guard { "-guarded" } else { "" }
                    );
                    rules.push(rule(
                        &name,
                        &format!("(matmul {probs} ?v)"),
                        FuseAttention {
                            scaled: matches!(scale, ScaleSite::Scores),
                            mask,
                            nan_guard,
                        },
                    ));
                }
            }
        }
    }
    rules
}

/// Replaces the matched class by `unary(?x)` when the scalars named in `checks` have the
/// expected values.
struct FuseUnary {
    unary: UnaryOp,
    checks: Arc<[(&'static str, f64)]>,
}

impl Rewriter for FuseUnary {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let values_match = self.checks.iter().all(|(name, expected)| {
            scalar(egraph, subst[var(name)]).is_some_and(|v| close(v, *expected))
        });
        if !values_match {
            return vec![];
        }
        add_checked(
            egraph,
            class,
            op(Op::Unary(self.unary), vec![subst[var("?x")]]),
        )
    }
}

/// `(op a b)` and `(op b a)`: both operand orders of a commutative op.
fn commuted(op: &str, a: &str, b: &str) -> [String; 2] {
    [format!("({op} {a} {b})"), format!("({op} {b} {a})")]
}

/// Every way of writing the product of three factors `a * b * c` as two binary multiplications.
fn products_of_three(a: &str, b: &str, c: &str) -> Vec<String> {
    let mut forms = Vec::new();
    for (x, y, z) in [(a, b, c), (a, c, b), (b, c, a)] {
        // (x * y) * z in both operand orders at both levels.
        for inner in commuted("mul", x, y) {
            forms.extend(commuted("mul", &inner, z));
        }
    }
    forms
}

fn activation_rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    // GELU, erf form: x * 0.5 * (1 + erf(x / sqrt 2)); the division is canonical as a product.
    let erf_terms = [
        "(add (erf (mul ?x ?r)) ?one)",
        "(add ?one (erf (mul ?x ?r)))",
    ];
    let erf_checks: Arc<[(&str, f64)]> = Arc::from(vec![
        ("?r", std::f64::consts::FRAC_1_SQRT_2),
        ("?one", 1.0),
        ("?half", 0.5),
    ]);
    for (t, term) in erf_terms.iter().enumerate() {
        for (i, form) in products_of_three("?x", "?half", term).iter().enumerate() {
            rules.push(rule(
                &format!("fuse-gelu-erf-{t}-{i}"),
                form,
                FuseUnary {
                    unary: UnaryOp::Gelu,
                    checks: erf_checks.clone(),
                },
            ));
        }
    }
    // GELU, tanh form: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
    let cube_forms = [
        "(pow ?x ?three)",
        "(mul ?x (mul ?x ?x))",
        "(mul (mul ?x ?x) ?x)",
    ];
    let tanh_checks: Arc<[(&str, f64)]> = Arc::from(vec![
        ("?c", (2.0 / std::f64::consts::PI).sqrt()),
        ("?a", 0.044715),
        ("?one", 1.0),
        ("?half", 0.5),
        ("?three", 3.0),
    ]);
    let mut n = 0;
    for cube in cube_forms {
        for inner in commuted("mul", cube, "?a").map(|term| format!("(add ?x {term})")) {
            for scaled in commuted("mul", &inner, "?c") {
                let term = format!("(add (tanh {scaled}) ?one)");
                for form in products_of_three("?x", "?half", &term) {
                    let checks: Arc<[(&str, f64)]> = if cube.starts_with("(pow") {
                        tanh_checks.clone()
                    } else {
                        Arc::from(&tanh_checks[..4])
                    };
                    rules.push(rule(
                        &format!("fuse-gelu-tanh-{n}"),
                        &form,
                        FuseUnary {
                            unary: UnaryOp::GeluTanh,
                            checks,
                        },
                    ));
                    n += 1;
                }
            }
        }
    }
    // SiLU: x * sigmoid(x).
    for (i, form) in ["(mul ?x (sigmoid ?x))", "(mul (sigmoid ?x) ?x)"]
        .iter()
        .enumerate()
    {
        rules.push(rule(
            &format!("fuse-silu-{i}"),
            form,
            FuseUnary {
                unary: UnaryOp::Silu,
                checks: Arc::from(Vec::new()),
            },
        ));
    }
    rules
}

/// Fuses a decomposed layer norm (with bias) or RMS norm over the last axis.
enum FuseNorm {
    Layer,
    Rms,
}

impl Rewriter for FuseNorm {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let two = scalar(egraph, subst[var("?two")]);
        let eps = scalar(egraph, subst[var("?eps")]);
        let (Some(2.0), Some(eps)) = (two, eps) else {
            return vec![];
        };
        if eps.is_nan() || eps < 0.0 {
            return vec![];
        }
        let (x, gamma) = (subst[var("?x")], subst[var("?gamma")]);
        let (norm, children) = match self {
            FuseNorm::Layer => (
                Op::LayerNorm {
                    axis: -1,
                    eps: F32(eps),
                },
                vec![x, gamma, subst[var("?beta")]],
            ),
            FuseNorm::Rms => (Op::RmsNorm { eps: F32(eps) }, vec![x, gamma]),
        };
        add_checked(egraph, class, op(norm, children))
    }
}

fn norm_rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    let mean = "reduce_mean{axes=[-1],keep_dims=true}";
    let centered = format!("(sub ?x ({mean} ?x))");
    let variance = format!("({mean} (pow {centered} ?two))");
    let stddev = format!("(sqrt (add {variance} ?eps))");
    let normalized = [
        format!("(div {centered} {stddev})"),
        format!("(mul {centered} (reciprocal {stddev}))"),
    ];
    let layer_forms = normalized
        .iter()
        .flat_map(|norm| commuted("mul", norm, "?gamma"))
        .flat_map(|scaled| commuted("add", &scaled, "?beta"));
    for (n, form) in layer_forms.enumerate() {
        rules.push(rule(
            &format!("fuse-layer-norm-{n}"),
            &form,
            FuseNorm::Layer,
        ));
    }
    let rms = format!("(sqrt (add ({mean} (pow ?x ?two)) ?eps))");
    let normalized = [
        format!("(div ?x {rms})"),
        format!("(mul ?x (reciprocal {rms}))"),
        format!("(mul (reciprocal {rms}) ?x)"),
    ];
    let rms_forms = normalized
        .iter()
        .flat_map(|norm| commuted("mul", norm, "?gamma"));
    for (n, form) in rms_forms.enumerate() {
        rules.push(rule(&format!("fuse-rms-norm-{n}"), &form, FuseNorm::Rms));
    }
    rules
}

/// The key/value head a `repeat_kv` (transformers' grouped-query attention) repeats, and the
/// repetition: `reshape [b, hk*g, s, d] (expand [b, hk, g, s, d] (reshape [b, hk, 1, s, d] x))`.
fn repeated_heads(egraph: &EGraph, class: Id) -> Option<(Id, kiln_ir::Dim)> {
    let op_child = |class: Id, matches: &dyn Fn(&Op) -> bool| {
        unary_nodes(egraph, class, matches)
            .next()
            .map(|(op, child)| (op.clone(), child))
    };
    let (merged, expanded) = op_child(
        class,
        &|op| matches!(op, Op::Reshape { shape } if shape.rank() == 4),
    )?;
    let (Op::Expand { shape: grouped }, split) = op_child(
        expanded,
        &|op| matches!(op, Op::Expand { shape } if shape.rank() == 5),
    )?
    else {
        return None;
    };
    let (_, source) = op_child(
        split,
        &|op| matches!(op, Op::Reshape { shape } if shape.rank() == 5 && shape.0[2] == kiln_ir::Dim::Const(1)),
    )?;
    let source_ty = egraph[source].data.ty.as_ref()?;
    let Op::Reshape { shape: merged } = merged else {
        return None;
    };
    let (g, x, m) = (&grouped.0, &source_ty.shape.0, &merged.0);
    let consistent = x.len() == 4
        && [(0, 0), (1, 1), (3, 2), (4, 3)]
            .iter()
            .all(|&(a, b)| g[a].equiv(&x[b]))
        && [(0, 0), (3, 2), (4, 3)]
            .iter()
            .all(|&(a, b)| g[a].equiv(&m[b]))
        && m[1].equiv(&kiln_ir::Dim::product([&g[1], &g[2]]));
    consistent.then(|| (source, g[2].clone()))
}

/// Finds attention whose keys and values are `repeat_kv` of fewer heads by the same factor.
struct RepeatedKeyValues;

impl Finder for RepeatedKeyValues {
    fn find(&self, egraph: &EGraph, eclass: Id, limit: usize) -> Vec<Subst> {
        let substs: Vec<Subst> = egraph[eclass]
            .nodes
            .iter()
            .filter_map(|node| {
                let TensorLang::Op(label, children) = node else {
                    return None;
                };
                if !matches!(label.op(), Op::Attention(_)) {
                    return None;
                }
                let (k, k_groups) = repeated_heads(egraph, children[1])?;
                let (v, v_groups) = repeated_heads(egraph, children[2])?;
                if !k_groups.equiv(&v_groups) {
                    return None;
                }
                let mut subst = Subst::with_capacity(5);
                subst.insert(var("?node_q"), children[0]);
                subst.insert(var("?node_k"), children[1]);
                subst.insert(var("?node_v"), children[2]);
                subst.insert(var("?k"), k);
                subst.insert(var("?v"), v);
                Some(subst)
            })
            .take(limit)
            .collect();
        substs
    }

    fn vars(&self) -> Vec<Var> {
        ["?node_q", "?node_k", "?node_v", "?k", "?v"]
            .iter()
            .map(|v| var(v))
            .collect()
    }
}

/// Attention on the shared key/value heads instead of their repeated copies: the fused op reads
/// head `i / (h / hk)` itself.
struct SharedKeyValues;

impl Rewriter for SharedKeyValues {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let (q, k, v) = (
            subst[var("?node_q")],
            subst[var("?node_k")],
            subst[var("?node_v")],
        );
        let found = egraph[class].nodes.iter().find_map(|node| match node {
            TensorLang::Op(label, children)
                if matches!(label.op(), Op::Attention(_)) && children[..3] == [q, k, v] =>
            {
                Some((label.clone(), children[3..].to_vec()))
            }
            _ => None,
        });
        let Some((label, mask)) = found else {
            return vec![];
        };
        let mut children = vec![q, subst[var("?k")], subst[var("?v")]];
        children.extend(mask);
        add_checked(egraph, class, TensorLang::Op(label, children))
    }
}

/// The one-operand nodes of a class whose op satisfies `wanted`, with their operand.
fn unary_nodes<'a>(
    egraph: &'a EGraph,
    class: Id,
    wanted: &'a dyn Fn(&Op) -> bool,
) -> impl Iterator<Item = (&'a Op, Id)> + 'a {
    egraph[class]
        .nodes
        .iter()
        .filter_map(move |node| match node {
            TensorLang::Op(label, children) if children.len() == 1 && wanted(label.op()) => {
                Some((label.op(), children[0]))
            }
            _ => None,
        })
}

/// The operand pairs of the `op` nodes of a class, in both orders.
fn binary_operands(egraph: &EGraph, class: Id, op: BinaryOp) -> Vec<(Id, Id)> {
    egraph[class]
        .nodes
        .iter()
        .filter_map(|node| match node {
            TensorLang::Op(label, children)
                if children.len() == 2 && *label.op() == Op::Binary(op) =>
            {
                Some([(children[0], children[1]), (children[1], children[0])])
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// The last-axis slice `[start, end)` of a class, with its source.
fn last_axis_slices(egraph: &EGraph, class: Id) -> Vec<(i64, i64, Id)> {
    unary_nodes(egraph, class, &|op| matches!(op, Op::Slice { step: 1, .. }))
        .filter_map(|(op, source)| {
            let Op::Slice {
                axis, start, end, ..
            } = op
            else {
                return None;
            };
            let rank = egraph[source].data.ty.as_ref()?.rank() as i64;
            let last = *axis == -1 || *axis == rank - 1;
            last.then_some((start.as_const()?, end.as_const()?, source))
        })
        .collect()
}

/// The `x` of a class that is HF's `rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])` over the
/// last axis of a tensor with a constant, even last dim `d`.
fn rotate_half_source(egraph: &EGraph, class: Id) -> Vec<Id> {
    let mut sources = Vec::new();
    for node in &egraph[class].nodes {
        let TensorLang::Op(label, children) = node else {
            continue;
        };
        let Op::Concat { axis } = label.op() else {
            continue;
        };
        let last = *axis == -1
            || egraph[class].data.ty.as_ref().map(|t| t.rank() as i64 - 1) == Some(*axis);
        if children.len() != 2 || !last {
            continue;
        }
        for (_, negated) in unary_nodes(egraph, children[0], &|op| *op == Op::Unary(UnaryOp::Neg)) {
            for (start, end, x) in last_axis_slices(egraph, negated) {
                let Some(d) = egraph[x]
                    .data
                    .ty
                    .as_ref()
                    .and_then(|t| t.shape.0.last()?.as_const())
                else {
                    continue;
                };
                let half = d / 2;
                let first_half = last_axis_slices(egraph, children[1])
                    .into_iter()
                    .any(|(s, e, y)| (s, e) == (0, half) && egraph.find(y) == egraph.find(x));
                if d % 2 == 0 && start == half && end >= d && first_half {
                    sources.push(egraph.find(x));
                }
            }
        }
    }
    sources
}

/// HF's rotary embedding, `x * cos + rotate_half(x) * sin`, in any operand order.
struct RotaryEmbedding;

impl Finder for RotaryEmbedding {
    fn find(&self, egraph: &EGraph, eclass: Id, limit: usize) -> Vec<Subst> {
        let mut substs = Vec::new();
        for (direct, rotated) in binary_operands(egraph, eclass, BinaryOp::Add) {
            for (x, cos) in binary_operands(egraph, direct, BinaryOp::Mul) {
                for (rotation, sin) in binary_operands(egraph, rotated, BinaryOp::Mul) {
                    if rotate_half_source(egraph, rotation).contains(&egraph.find(x))
                        && substs.len() < limit
                    {
                        let mut subst = Subst::with_capacity(3);
                        subst.insert(var("?x"), x);
                        subst.insert(var("?cos"), cos);
                        subst.insert(var("?sin"), sin);
                        substs.push(subst);
                    }
                }
            }
        }
        substs
    }

    fn vars(&self) -> Vec<Var> {
        vec![var("?x"), var("?cos"), var("?sin")]
    }
}

impl Rewriter for RotaryEmbedding {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let children = vec![subst[var("?x")], subst[var("?cos")], subst[var("?sin")]];
        add_checked(egraph, class, op(Op::Rope { interleaved: false }, children))
    }
}

/// `silu(x @ w_gate) * (x @ w_up)` with 2-D weights of one type as `swiglu`.
struct FuseSwiGlu;

impl Rewriter for FuseSwiGlu {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let children = vec![subst[var("?x")], subst[var("?gate")], subst[var("?up")]];
        add_checked(egraph, class, op(Op::SwiGlu, children))
    }
}

fn swiglu_rules() -> Vec<Rule> {
    commuted("mul", "(silu (matmul ?x ?gate))", "(matmul ?x ?up)")
        .iter()
        .enumerate()
        .map(|(i, form)| rule(&format!("fuse-swiglu-{i}"), form, FuseSwiGlu))
        .collect()
}

/// The matrix products in a class, as gemms: a `matmul` of a rank >= 2 operand by a 2-D one is
/// a gemm with no epilogue.
fn products(egraph: &EGraph, class: Id) -> Vec<(Gemm, Vec<Id>)> {
    let rank = |id: Id| egraph[id].data.ty.as_ref().map(TensorType::rank);
    egraph[class]
        .nodes
        .iter()
        .filter_map(|node| {
            let TensorLang::Op(label, children) = node else {
                return None;
            };
            match label.op() {
                Op::MatMul if rank(children[1]) == Some(2) && rank(children[0]) >= Some(2) => {
                    Some((Gemm::default(), children.clone()))
                }
                Op::Gemm(gemm) => Some((*gemm, children.clone())),
                _ => None,
            }
        })
        .collect()
}

/// One more step of a gemm's epilogue, `activation(a @ b + bias) + residual`, taken in order.
#[derive(Clone, Copy)]
enum EpilogueStep {
    /// `product + ?other`: a bias when `?other` broadcasts, a residual when it has the
    /// product's shape.
    Add,
    /// `activation(product)`.
    Activation(UnaryOp),
}

/// Fuses a bias, an activation or a residual add into the matrix product under `?product`.
struct FuseEpilogue(EpilogueStep);

impl Rewriter for FuseEpilogue {
    fn rewrite(&self, egraph: &mut EGraph, class: Id, subst: &Subst) -> Vec<Id> {
        let Some(class_ty) = egraph[class].data.ty.clone() else {
            return vec![];
        };
        let mut changed = Vec::new();
        for (gemm, mut children) in products(egraph, subst[var("?product")]) {
            let fused = match self.0 {
                EpilogueStep::Activation(activation) => {
                    if gemm.activation.is_some() || gemm.residual {
                        continue;
                    }
                    Gemm {
                        activation: Some(activation),
                        ..gemm
                    }
                }
                EpilogueStep::Add => {
                    let other = subst[var("?other")];
                    let Some(other_ty) = egraph[other].data.ty.as_ref() else {
                        continue;
                    };
                    if other_ty.equiv(&class_ty) {
                        if gemm.residual {
                            continue;
                        }
                        children.push(other);
                        Gemm {
                            residual: true,
                            ..gemm
                        }
                    } else {
                        if gemm.bias || gemm.activation.is_some() || gemm.residual {
                            continue;
                        }
                        children.insert(2, other);
                        Gemm { bias: true, ..gemm }
                    }
                }
            };
            changed.extend(add_checked(egraph, class, op(Op::Gemm(fused), children)));
        }
        changed
    }
}

/// Activations a matrix product's epilogue takes.
pub const EPILOGUE_ACTIVATIONS: [UnaryOp; 5] = [
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
    UnaryOp::Silu,
    UnaryOp::Relu,
    UnaryOp::Tanh,
];

fn epilogue_rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = commuted("add", "?product", "?other")
        .iter()
        .enumerate()
        .map(|(i, form)| {
            rule(
                &format!("fuse-gemm-add-{i}"),
                form,
                FuseEpilogue(EpilogueStep::Add),
            )
        })
        .collect();
    for activation in EPILOGUE_ACTIVATIONS {
        rules.push(rule(
            &format!("fuse-gemm-{}", activation.name()),
            &format!("({} ?product)", activation.name()),
            FuseEpilogue(EpilogueStep::Activation(activation)),
        ));
    }
    rules
}

/// The fusion rules.
pub fn fusion() -> Vec<Rule> {
    let mut rules = attention_rules();
    rules.push(
        Rewrite::new(
            "attention-shared-kv-heads",
            Search(RepeatedKeyValues),
            Apply(SharedKeyValues),
        )
        .expect("valid rule"),
    );
    rules.extend(activation_rules());
    rules.extend(norm_rules());
    rules.push(
        Rewrite::new("fuse-rope", Search(RotaryEmbedding), Apply(RotaryEmbedding))
            .expect("valid rule"),
    );
    rules.extend(epilogue_rules());
    rules.extend(swiglu_rules());
    rules
}
