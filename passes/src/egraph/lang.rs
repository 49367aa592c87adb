//! The tensor language of the e-graph and its type analysis.
//!
//! Every IR op is one e-node label (`Op`), so the language covers the whole IR without a second
//! list of ops to keep in sync: the label carries the op, and the op's own shape rule types the
//! e-class. Graph inputs and weights are leaves named after their node; scalars the analysis
//! folds become `Scalar` leaves. Labels print in a compact text form (`softmax{axis=-1}`,
//! `transpose{perm=[0,2,1,3]}`) that rule patterns are written in.

use egg::{Analysis, DidMerge, Id};
use kiln_ir::ops::{AttrValue, Attrs, InferCtx};
use kiln_ir::{DType, Op, Tensor, TensorType};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

/// An IR op as an e-node label. Identified and ordered by its compact text, which is injective
/// because the IR's text form round-trips.
#[derive(Clone, Debug)]
pub struct OpLabel {
    text: Arc<str>,
    op: Arc<Op>,
}

impl OpLabel {
    /// The label of `op`.
    pub fn new(op: Op) -> OpLabel {
        let mut text = op.name().to_string();
        let attrs = op.attrs();
        if !attrs.is_empty() {
            let items: Vec<String> = attrs
                .iter()
                .map(|(key, value)| format!("{key}={}", value.to_string().replace(' ', "")))
                .collect();
            text = format!("{text}{{{}}}", items.join(","));
        }
        OpLabel {
            text: text.into(),
            op: Arc::new(op),
        }
    }

    /// The op.
    pub fn op(&self) -> &Op {
        &self.op
    }
}

impl PartialEq for OpLabel {
    fn eq(&self, other: &OpLabel) -> bool {
        self.text == other.text
    }
}

impl Eq for OpLabel {}

impl Hash for OpLabel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for OpLabel {
    fn partial_cmp(&self, other: &OpLabel) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OpLabel {
    fn cmp(&self, other: &OpLabel) -> Ordering {
        self.text.cmp(&other.text)
    }
}

impl fmt::Display for OpLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for OpLabel {
    type Err = String;

    /// Reads `name` or `name{key=value,...}` with integer, float, boolean, name and list values.
    fn from_str(text: &str) -> Result<OpLabel, String> {
        let (name, attrs) = match text.split_once('{') {
            None => (text, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("`{text}`: unclosed attributes"))?;
                let attrs = split_top_level(body)
                    .into_iter()
                    .map(|item| {
                        let (key, value) = item
                            .split_once('=')
                            .ok_or_else(|| format!("`{text}`: expected key=value, got `{item}`"))?;
                        Ok((key.to_string(), parse_value(value)?))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                (name, attrs)
            }
        };
        if matches!(name, "input" | "const") || name.starts_with('%') {
            return Err(format!("`{name}` is a leaf, not an op"));
        }
        Op::from_text(name, Attrs::new(attrs)).map(OpLabel::new)
    }
}

/// Splits `a,b,[c,d]` at the commas outside brackets.
fn split_top_level(body: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !body.is_empty() {
        items.push(&body[start..]);
    }
    items
}

fn parse_value(text: &str) -> Result<AttrValue, String> {
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return split_top_level(inner)
            .into_iter()
            .map(parse_value)
            .collect::<Result<_, _>>()
            .map(AttrValue::List);
    }
    Ok(match text {
        "true" => AttrValue::Bool(true),
        "false" => AttrValue::Bool(false),
        _ => {
            if let Ok(int) = text.parse::<i64>() {
                AttrValue::int(int)
            } else if text.parse::<f64>().is_ok() {
                AttrValue::Float(text.to_string())
            } else if !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || c == '_') {
                AttrValue::ident(text)
            } else {
                return Err(format!("cannot read attribute value `{text}`"));
            }
        }
    })
}

/// A graph input or weight, by its node name; prints as `%name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafName(pub Arc<str>);

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

impl FromStr for LeafName {
    type Err = String;

    fn from_str(text: &str) -> Result<LeafName, String> {
        text.strip_prefix('%')
            .filter(|name| !name.is_empty())
            .map(|name| LeafName(name.into()))
            .ok_or_else(|| format!("`{text}` is not a %leaf"))
    }
}

/// A constant the analysis folded: one f32 value as a tensor of `rank` unit axes; prints as
/// `#value` or `#value/rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScalarLeaf {
    bits: u32,
    rank: u8,
}

impl ScalarLeaf {
    /// The f32 `value` with `rank` unit axes.
    pub fn new(value: f32, rank: u8) -> ScalarLeaf {
        ScalarLeaf {
            bits: value.to_bits(),
            rank,
        }
    }

    /// The value.
    pub fn value(self) -> f32 {
        f32::from_bits(self.bits)
    }

    /// Its type.
    pub fn ty(self) -> TensorType {
        TensorType::new(
            DType::F32,
            kiln_ir::Shape::fixed(&vec![1; self.rank.into()]),
        )
    }
}

impl fmt::Display for ScalarLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            0 => write!(f, "#{}", self.value()),
            rank => write!(f, "#{}/{rank}", self.value()),
        }
    }
}

impl FromStr for ScalarLeaf {
    type Err = String;

    fn from_str(text: &str) -> Result<ScalarLeaf, String> {
        let body = text
            .strip_prefix('#')
            .ok_or_else(|| format!("`{text}` is not a #scalar"))?;
        let (value, rank) = body.split_once('/').unwrap_or((body, "0"));
        let value = value
            .parse::<f32>()
            .map_err(|_| format!("`{text}`: bad value"))?;
        let rank = rank
            .parse::<u8>()
            .map_err(|_| format!("`{text}`: bad rank"))?;
        Ok(ScalarLeaf::new(value, rank))
    }
}

mod language {
    // The macro takes no attributes on variants: `Leaf` is a graph input or weight, `Scalar` a
    // folded constant, `Op` an IR op over its operands' e-classes.
    #![allow(missing_docs)]
    use super::{LeafName, OpLabel, ScalarLeaf};
    use egg::{define_language, Id};

    define_language! {
        /// kiln's tensor language: IR ops over e-classes, with input, weight and scalar leaves.
        pub enum TensorLang {
            Leaf(LeafName),
            Scalar(ScalarLeaf),
            Op(OpLabel, Vec<Id>),
        }
    }
}

pub use language::TensorLang;

/// What the analysis knows of a leaf.
#[derive(Clone, Debug)]
pub struct LeafInfo {
    /// Its type.
    pub ty: TensorType,
    /// Its value, when it is a one-element f32 weight.
    pub scalar: Option<f32>,
    /// The weight a constant reads; `None` for graph inputs.
    pub weight: Option<String>,
}

/// The type analysis: every e-class has one tensor type, computed by the op's own shape rule
/// from its operands' types; e-classes of one-element f32 values also know the value, folded by
/// the interpreter's semantics, and gain a [`ScalarLeaf`] so extraction can pick the constant.
#[derive(Debug, Default)]
pub struct TypeAnalysis {
    /// Leaves by name.
    pub leaves: HashMap<Arc<str>, LeafInfo>,
    /// Symbol maxima, for shape rules that bound dims.
    pub maxima: HashMap<String, i64>,
}

/// The facts about an e-class.
#[derive(Clone, Debug)]
pub struct ClassData {
    /// The type, or `None` when a rewrite built an ill-typed node (never extracted).
    pub ty: Option<TensorType>,
    /// The value of a one-element f32 class.
    pub scalar: Option<f32>,
    /// Computed from weights alone: a weight, or an elementwise op of such values with a fixed
    /// shape of at most [`MAX_FOLDED_ELEMENTS`], which the `fold-constants` pass (in the default
    /// pipeline after `fuse`) turns into a weight.
    pub weight_only: bool,
}

pub type EGraph = egg::EGraph<TensorLang, TypeAnalysis>;

impl Analysis<TensorLang> for TypeAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph, enode: &TensorLang) -> ClassData {
        match enode {
            TensorLang::Leaf(name) => match egraph.analysis.leaves.get(&name.0) {
                Some(info) => ClassData {
                    ty: Some(info.ty.clone()),
                    scalar: info.scalar,
                    weight_only: info.weight.is_some(),
                },
                None => ClassData {
                    ty: None,
                    scalar: None,
                    weight_only: false,
                },
            },
            TensorLang::Scalar(leaf) => ClassData {
                ty: Some(leaf.ty()),
                scalar: Some(leaf.value()),
                weight_only: true,
            },
            TensorLang::Op(label, children) => {
                let data: Vec<&ClassData> = children.iter().map(|&c| &egraph[c].data).collect();
                let Some(types) = data
                    .iter()
                    .map(|d| d.ty.as_ref())
                    .collect::<Option<Vec<_>>>()
                else {
                    return ClassData {
                        ty: None,
                        scalar: None,
                        weight_only: false,
                    };
                };
                let ctx = InferCtx {
                    maxima: &egraph.analysis.maxima,
                };
                let ty = label.op().infer(&types, ctx).ok();
                let scalars: Option<Vec<f32>> = data.iter().map(|d| d.scalar).collect();
                let scalar = match (&ty, scalars) {
                    (Some(ty), Some(values)) if !children.is_empty() => {
                        fold_scalar(label.op(), ty, &types, &values)
                    }
                    _ => None,
                };
                let weight_only = is_elementwise(label.op())
                    && data.iter().all(|d| d.weight_only)
                    && ty.as_ref().is_some_and(|t| {
                        t.shape.as_fixed().is_some_and(|dims| {
                            dims.iter().product::<usize>() <= MAX_FOLDED_ELEMENTS
                        })
                    });
                ClassData {
                    ty,
                    scalar,
                    weight_only,
                }
            }
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        let mut changed_a = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty.clone();
            changed_a = true;
        }
        if a.scalar.is_none() && b.scalar.is_some() {
            a.scalar = b.scalar;
            changed_a = true;
        }
        if !a.weight_only && b.weight_only {
            a.weight_only = true;
            changed_a = true;
        }
        let changed_b = (b.ty.is_none() && a.ty.is_some())
            || (b.scalar.is_none() && a.scalar.is_some())
            || (!b.weight_only && a.weight_only);
        DidMerge(changed_a, changed_b)
    }

    fn modify(egraph: &mut EGraph, id: Id) {
        let data = &egraph[id].data;
        let (Some(value), Some(ty)) = (data.scalar, data.ty.as_ref()) else {
            return;
        };
        if ty.dtype != DType::F32 || ty.rank() > usize::from(u8::MAX) {
            return;
        }
        let leaf = ScalarLeaf::new(value, ty.rank() as u8);
        if leaf.ty() != *ty {
            return;
        }
        let has_leaf = egraph[id]
            .nodes
            .iter()
            .any(|n| matches!(n, TensorLang::Scalar(_) | TensorLang::Leaf(_)));
        if !has_leaf {
            let folded = egraph.add(TensorLang::Scalar(leaf));
            egraph.union(id, folded);
        }
    }
}

/// Results of `fold-constants` larger than this many elements are left to run time.
pub const MAX_FOLDED_ELEMENTS: usize = 1 << 28;

/// Whether `op` is elementwise, the kind of op the `fold-constants` pass folds.
pub fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. }
    )
}

/// The value of an elementwise op on one-element f32 operands, by the interpreter.
fn fold_scalar(op: &Op, ty: &TensorType, types: &[&TensorType], values: &[f32]) -> Option<f32> {
    if !matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Reshape { .. }) || ty.dtype != DType::F32 {
        return None;
    }
    let tensors: Vec<Tensor> = types
        .iter()
        .zip(values)
        .map(|(t, &v)| Tensor::f32(&t.shape.as_fixed()?, vec![v]).ok())
        .collect::<Option<_>>()?;
    let operands: Vec<&Tensor> = tensors.iter().collect();
    let values = op.evaluate_fixed(&operands, 1).ok()?.to_f64s();
    (values.len() == 1).then(|| values[0] as f32)
}
