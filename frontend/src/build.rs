//! A graph builder for model templates: named nodes, weights by name from a mapped file, and the
//! few compound patterns (linear layers, head splits) every transformer repeats.

use crate::error::FrontendError;
use crate::shapes::{DimSpec, InputShapes};
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Shape, TensorType, Weight, F32};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) type Result<T> = std::result::Result<T, FrontendError>;

pub(crate) struct Builder {
    graph: Graph,
    source: PathBuf,
    weights: BTreeMap<String, Weight>,
}

impl Builder {
    pub fn new(name: &str, source: &Path, weights: BTreeMap<String, Weight>) -> Builder {
        Builder {
            graph: Graph::new(name),
            source: source.to_path_buf(),
            weights,
        }
    }

    pub fn error(&self, message: impl Into<String>) -> FrontendError {
        FrontendError::new(&self.source, message)
    }

    fn wrap(&self, error: kiln_ir::GraphError) -> FrontendError {
        self.error(error.to_string())
    }

    /// Records the weights file by absolute path, so the printed graph reloads from anywhere.
    pub fn set_weights_file(&mut self, path: &Path) {
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.graph
            .set_weights_file(Some(absolute.display().to_string()));
    }

    /// The `[batch, seq]` dims of a token input: as requested with `--shape`, else symbols
    /// `batch <= default_batch` and `seq <= max_seq`.
    pub fn token_dims(
        &mut self,
        shapes: &InputShapes,
        input: &str,
        default_batch: usize,
        max_seq: usize,
    ) -> Result<[Dim; 2]> {
        let defaults = [
            DimSpec::Symbol {
                name: "batch".into(),
                max: default_batch,
            },
            DimSpec::Symbol {
                name: "seq".into(),
                max: max_seq,
            },
        ];
        let specs = shapes.get(input).unwrap_or(&defaults);
        let [batch, seq] = specs else {
            return Err(self.error(format!(
                "--shape {input} needs 2 dims [batch, seq], got {}",
                specs.len()
            )));
        };
        let mut dim = |spec: &DimSpec| -> Result<Dim> {
            Ok(match spec {
                DimSpec::Fixed(n) => Dim::from(*n),
                DimSpec::Symbol { name, max } => {
                    if !self.graph.symbols().iter().any(|s| &s.name == name) {
                        self.graph
                            .declare_symbol(name, *max as i64)
                            .map_err(|e| self.wrap(e))?;
                    }
                    Dim::sym(name)
                }
            })
        };
        let (DimSpec::Fixed(longest) | DimSpec::Symbol { max: longest, .. }) = seq;
        if *longest > max_seq {
            return Err(self.error(format!(
                "--shape {input}: seq {longest} exceeds the model's {max_seq} positions"
            )));
        }
        Ok([dim(batch)?, dim(seq)?])
    }

    pub fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> Result<NodeId> {
        let ty = TensorType::new(dtype, Shape(dims.to_vec()));
        self.graph.add_input(name, ty).map_err(|e| self.wrap(e))
    }

    pub fn has_weight(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// A `const` node for the weight `name` of the model file, named after it.
    pub fn weight(&mut self, name: &str) -> Result<NodeId> {
        if let Some(id) = self.graph.find(name) {
            return Ok(id);
        }
        let weight = self
            .weights
            .get(name)
            .cloned()
            .ok_or_else(|| self.error(format!("tensor `{name}` is missing")))?;
        self.graph
            .add_constant(name, name, weight)
            .map_err(|e| self.wrap(e))
    }

    /// The weight `name`, checked to have `dims`.
    pub fn weight_with_dims(&mut self, name: &str, dims: &[usize]) -> Result<NodeId> {
        let id = self.weight(name)?;
        let actual = self
            .graph
            .weights()
            .get(name)
            .map(|w| w.shape.clone())
            .unwrap_or_default();
        if actual != dims {
            return Err(self.error(format!(
                "tensor `{name}` has dims {actual:?}, the config implies {dims:?}"
            )));
        }
        Ok(id)
    }

    /// Declares a symbol unless it already is (with the same maximum).
    pub fn declare_symbol(&mut self, name: &str, max: usize) -> Result<()> {
        match self.graph.symbols().iter().find(|s| s.name == name) {
            Some(s) if s.max == max as i64 => Ok(()),
            Some(s) => Err(self.error(format!(
                "symbol `{name}` is bounded twice: {} and {max}",
                s.max
            ))),
            None => self
                .graph
                .declare_symbol(name, max as i64)
                .map_err(|e| self.wrap(e)),
        }
    }

    /// A constant owned by the graph with the tensor's values.
    pub fn constant(&mut self, name: &str, tensor: &kiln_ir::Tensor) -> Result<NodeId> {
        let name = self.graph.unique_name(name);
        let weight = Weight::owned(
            tensor.dtype(),
            tensor.shape().to_vec(),
            tensor.to_le_bytes(),
        )
        .map_err(|e| self.error(e.0))?;
        self.graph
            .add_constant(&name, &name, weight)
            .map_err(|e| self.wrap(e))
    }

    /// A scalar f32 constant owned by the graph.
    pub fn scalar(&mut self, name: &str, value: f32) -> Result<NodeId> {
        let name = self.graph.unique_name(name);
        let weight = Weight::owned(DType::F32, vec![], value.to_le_bytes().to_vec())
            .map_err(|e| self.error(e.0))?;
        self.graph
            .add_constant(&name, &name, weight)
            .map_err(|e| self.wrap(e))
    }

    /// An f32 vector constant owned by the graph.
    pub fn vector(&mut self, name: &str, values: &[f32]) -> Result<NodeId> {
        let name = self.graph.unique_name(name);
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let weight =
            Weight::owned(DType::F32, vec![values.len()], bytes).map_err(|e| self.error(e.0))?;
        self.graph
            .add_constant(&name, &name, weight)
            .map_err(|e| self.wrap(e))
    }

    pub fn op(&mut self, name: &str, op: Op, operands: &[NodeId]) -> Result<NodeId> {
        let name = self.graph.unique_name(name);
        self.graph
            .add_node(&name, op, operands)
            .map_err(|e| self.wrap(e))
    }

    pub fn binary(&mut self, name: &str, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.op(name, Op::Binary(op), &[a, b])
    }

    pub fn unary(&mut self, name: &str, op: UnaryOp, x: NodeId) -> Result<NodeId> {
        self.op(name, Op::Unary(op), &[x])
    }

    pub fn reshape(&mut self, name: &str, x: NodeId, dims: &[Dim]) -> Result<NodeId> {
        self.op(
            name,
            Op::Reshape {
                shape: Shape(dims.to_vec()),
            },
            &[x],
        )
    }

    pub fn transpose(&mut self, name: &str, x: NodeId, perm: &[usize]) -> Result<NodeId> {
        self.op(
            name,
            Op::Transpose {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    pub fn reduce(
        &mut self,
        name: &str,
        op: ReduceOp,
        x: NodeId,
        axes: &[i64],
        keep_dims: bool,
    ) -> Result<NodeId> {
        self.op(
            name,
            Op::Reduce {
                op,
                axes: axes.to_vec(),
                keep_dims,
            },
            &[x],
        )
    }

    pub fn cast(&mut self, name: &str, x: NodeId, to: DType) -> Result<NodeId> {
        self.op(name, Op::Cast { to }, &[x])
    }

    pub fn range(&mut self, name: &str, len: Dim) -> Result<NodeId> {
        self.op(
            name,
            Op::Range {
                start: Dim::Const(0),
                step: 1,
                len,
                dtype: DType::I64,
            },
            &[],
        )
    }

    /// `x @ W^T (+ bias)` for a PyTorch `Linear` whose weight (named `weight`) is stored
    /// `[out, in]`; the result is named `name`.
    pub fn linear(
        &mut self,
        name: &str,
        weight: &str,
        bias: Option<&str>,
        x: NodeId,
        dims: [usize; 2],
    ) -> Result<NodeId> {
        let w = self.weight_with_dims(weight, &dims)?;
        let w_t = self.transpose(&format!("{name}.weight_t"), w, &[1, 0])?;
        let Some(bias) = bias else {
            return self.op(name, Op::MatMul, &[x, w_t]);
        };
        let product = self.op(&format!("{name}.matmul"), Op::MatMul, &[x, w_t])?;
        let bias = self.weight_with_dims(bias, &dims[..1])?;
        self.binary(name, BinaryOp::Add, product, bias)
    }

    pub fn layer_norm(
        &mut self,
        prefix: &str,
        x: NodeId,
        width: usize,
        eps: f32,
    ) -> Result<NodeId> {
        let gamma = self.weight_with_dims(&format!("{prefix}.weight"), &[width])?;
        let beta = self.weight_with_dims(&format!("{prefix}.bias"), &[width])?;
        self.op(
            prefix,
            Op::LayerNorm {
                axis: -1,
                eps: F32(eps),
            },
            &[x, gamma, beta],
        )
    }

    /// `[b, s, heads*d]` to `[b, heads, s, d]`.
    pub fn split_heads(
        &mut self,
        name: &str,
        x: NodeId,
        batch: &Dim,
        seq: &Dim,
        heads: usize,
        head_dim: usize,
    ) -> Result<NodeId> {
        let split = self.reshape(
            &format!("{name}.heads"),
            x,
            &[batch.clone(), seq.clone(), heads.into(), head_dim.into()],
        )?;
        self.transpose(name, split, &[0, 2, 1, 3])
    }

    /// `[b, heads, s, d]` to `[b, s, heads*d]`.
    pub fn merge_heads(
        &mut self,
        name: &str,
        x: NodeId,
        batch: &Dim,
        seq: &Dim,
        width: usize,
    ) -> Result<NodeId> {
        let t = self.transpose(&format!("{name}.transpose"), x, &[0, 2, 1, 3])?;
        self.reshape(name, t, &[batch.clone(), seq.clone(), width.into()])
    }

    /// `[seq, seq]` bool, true where key `j <= query i`.
    pub fn causal_mask(&mut self, seq: &Dim) -> Result<NodeId> {
        let positions = self.range("causal.positions", seq.clone())?;
        let rows = self.reshape("causal.rows", positions, &[seq.clone(), 1usize.into()])?;
        self.binary("causal.allowed", BinaryOp::LessEqual, positions, rows)
    }

    /// `softmax(scale(q @ k^T) with mask) @ v` over `[b, h, s, d]` heads, as eager attention
    /// writes it; nodes are named `{p}.scores`, `{p}.probs`, ...
    pub fn attention(
        &mut self,
        p: &str,
        [q, k, v]: [NodeId; 3],
        scale: Scale,
        mask: Mask,
    ) -> Result<NodeId> {
        let k_t = self.transpose(&format!("{p}.k_t"), k, &[0, 1, 3, 2])?;
        let scores = self.op(&format!("{p}.scores"), Op::MatMul, &[q, k_t])?;
        let scaled = match scale {
            Scale::DivideBySqrt(head_dim) => {
                let sqrt_d = self.scalar("sqrt_head_dim", (head_dim as f32).sqrt())?;
                self.binary(&format!("{p}.scaled"), BinaryOp::Div, scores, sqrt_d)?
            }
            Scale::MultiplyByInverseSqrt(head_dim) => {
                let scaling = self.scalar("attention_scaling", (head_dim as f32).powf(-0.5))?;
                self.binary(&format!("{p}.scaled"), BinaryOp::Mul, scores, scaling)?
            }
        };
        let masked = match mask {
            Mask::Additive(bias) => {
                self.binary(&format!("{p}.masked"), BinaryOp::Add, scaled, bias)?
            }
            Mask::Keep(keep) => {
                let min = self.scalar("f32_min", f32::MIN)?;
                self.op(&format!("{p}.masked"), Op::Where, &[keep, scaled, min])?
            }
        };
        let probs = self.op(&format!("{p}.probs"), Op::Softmax { axis: -1 }, &[masked])?;
        self.op(&format!("{p}.context"), Op::MatMul, &[probs, v])
    }

    pub fn output(&mut self, name: &str, node: NodeId) -> Result<()> {
        self.graph.add_output(name, node).map_err(|e| self.wrap(e))
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn finish(self) -> Graph {
        self.graph
    }
}

/// How a template scales attention scores, as its reference implementation does (the two differ
/// in the last bit).
pub(crate) enum Scale {
    /// `scores / sqrt(head_dim)`.
    DivideBySqrt(usize),
    /// `scores * head_dim^-0.5`.
    MultiplyByInverseSqrt(usize),
}

/// How a template masks attention scores.
pub(crate) enum Mask {
    /// Added to the scaled scores (transformers' extended attention mask).
    Additive(NodeId),
    /// True keeps a score; the rest become `f32::MIN`.
    Keep(NodeId),
}

/// The largest size a config may give (widths, counts, vocabularies): every product of two of
/// them still fits in 64 bits, and a lying file cannot make a template allocate without bound.
pub(crate) const MAX_HYPERPARAMETER: usize = 1 << 24;

/// Reads an integer from a JSON config, with an error naming the key.
pub(crate) fn config_usize(config: &serde_json::Value, key: &str, path: &Path) -> Result<usize> {
    config
        .get(key)
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0 && v <= MAX_HYPERPARAMETER)
        .ok_or_else(|| {
            FrontendError::new(
                path,
                format!("`{key}` is missing or not an integer in 1..={MAX_HYPERPARAMETER}"),
            )
        })
}

/// Reads a float from a JSON config.
pub(crate) fn config_f64(config: &serde_json::Value, key: &str, path: &Path) -> Result<f64> {
    config
        .get(key)
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| FrontendError::new(path, format!("`{key}` is missing or not a number")))
}
