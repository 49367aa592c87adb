//! ONNX models (opset 13 and later, as the TorchScript and dynamo exporters write them).
//!
//! Values flow through the import as [`Val`]s: graph nodes, small constants known at compile
//! time, integer tensors of symbolic dims (what `Shape` and its arithmetic produce), or large
//! weights. Shape subgraphs therefore fold away: `Reshape`, `Expand`, `Slice`, `Range` and
//! `ConstantOfShape` receive their dims as symbolic expressions, and any op whose inputs are all
//! known is evaluated with the interpreter's semantics at import time.

mod ops;
mod tensor;

use crate::build::{Builder, Result};
use crate::shapes::{DimSpec, InputShapes};
use crate::FrontendError;
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Shape, Tensor, TensorType};
use onnx_protobuf::{Message, ModelProto, NodeProto};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Lowest opset kiln reads; older exports use op semantics kiln does not implement.
pub const MIN_OPSET: i64 = 13;

/// Integer constants with at most this many elements (and scalars of any type) are kept as
/// values and folded at import time; larger or float ones become weights.
const FOLD_LIMIT: usize = 64;

/// Symbols that `--shape` does not bound get this maximum.
pub const DEFAULT_MAX: usize = 512;

/// An integer tensor whose elements are dims, possibly symbolic (`Shape` and arithmetic on it).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SymInts {
    dtype: DType,
    shape: Vec<usize>,
    values: Vec<Dim>,
}

impl SymInts {
    fn from_tensor(t: &Tensor) -> Option<SymInts> {
        t.dtype().is_int().then(|| SymInts {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            values: t.to_i64s().into_iter().map(Dim::Const).collect(),
        })
    }

    fn to_tensor(&self) -> Option<Tensor> {
        let values: Option<Vec<i64>> = self.values.iter().map(Dim::as_const).collect();
        Some(Tensor::from_i64s(self.dtype, self.shape.clone(), values?))
    }

    fn vector(values: Vec<Dim>) -> SymInts {
        SymInts {
            dtype: DType::I64,
            shape: vec![values.len()],
            values,
        }
    }
}

/// An ONNX value during import.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    /// A tensor computed at run time.
    Node(NodeId),
    /// A small tensor known at compile time.
    Static(Tensor),
    /// An integer tensor of symbolic dims.
    Ints(SymInts),
    /// A large weight, by name in the builder's weights.
    Weight(String),
    /// An omitted optional input.
    Absent,
}

pub(crate) struct Importer<'a> {
    b: Builder,
    vals: HashMap<String, Val>,
    /// The model's directory, where external data lives.
    dir: std::path::PathBuf,
    /// ONNX `dim_param` names to kiln symbols.
    symbols: HashMap<String, String>,
    weight_dims: HashMap<String, (DType, Vec<usize>)>,
    /// Constants already added to the graph, by content, so equal constants share one node.
    constants: HashMap<(DType, Vec<usize>, u64), NodeId>,
    shapes: &'a InputShapes,
}

/// Decodes a serialized `TensorProto` (the `input_N.pb` files of ONNX test data).
pub fn read_tensor_proto(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    let proto = onnx_protobuf::TensorProto::parse_from_bytes(bytes)
        .map_err(|e| format!("not a TensorProto: {e}"))?;
    tensor::tensor_of(&tensor::weight_of(
        &proto,
        Path::new("."),
        &mut Default::default(),
    )?)
}

/// Parses the model file.
fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| FrontendError::new(path, e.to_string()))?;
    ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| FrontendError::new(path, format!("not a valid ONNX model: {e}")))
}

fn graph_of<'m>(model: &'m ModelProto, path: &Path) -> Result<&'m onnx_protobuf::GraphProto> {
    model
        .graph
        .as_ref()
        .ok_or_else(|| FrontendError::new(path, "the model has no graph"))
}

/// The names of a model's graph inputs (initializers excluded), in order.
pub fn input_names(path: &Path) -> Result<Vec<String>> {
    let model = read_model(path)?;
    let graph = graph_of(&model, path)?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|i| i.name.as_str()).collect();
    Ok(graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .map(|i| i.name.clone())
        .collect())
}

/// Which op types a model uses and whether kiln reads each: the report of `kiln check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// The default-domain opset the model imports.
    pub opset: i64,
    /// Per op type (with its domain when not the default): node count and whether it is supported.
    pub ops: BTreeMap<String, (usize, bool)>,
}

/// The op coverage of an ONNX model.
pub fn coverage(path: &Path) -> Result<Coverage> {
    let model = read_model(path)?;
    let graph = graph_of(&model, path)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let unsupported = ops::unsupported(&graph.node);
    let mut ops: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    for node in &graph.node {
        let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        let key = if default_domain {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        let supported = !unsupported.contains_key(&key);
        ops.entry(key).or_insert((0, supported)).0 += 1;
    }
    Ok(Coverage { opset, ops })
}

/// Reads an ONNX model.
pub fn load(path: &Path, shapes: &InputShapes) -> Result<Graph> {
    load_with_constants(path, shapes, &HashMap::new())
}

/// Reads an ONNX model with some graph inputs fixed to known values, which then fold like
/// initializers (for inputs an AOT build must know, such as shapes or axes given as inputs).
pub fn load_with_constants(
    path: &Path,
    shapes: &InputShapes,
    constants: &HashMap<String, Tensor>,
) -> Result<Graph> {
    let err = |message: String| FrontendError::new(path, message);
    let model = read_model(path)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| err("the model imports no default-domain opset".into()))?;
    if opset < MIN_OPSET {
        return Err(err(format!("opset {opset} is not supported: kiln reads opset {MIN_OPSET} and later (re-export the model)")));
    }
    let graph = graph_of(&model, path)?;
    let unsupported = ops::unsupported(&graph.node);
    if !unsupported.is_empty() {
        let lines: Vec<String> = unsupported
            .iter()
            .map(|(op, nodes)| {
                let shown: Vec<&str> = nodes.iter().take(5).map(String::as_str).collect();
                let more = if nodes.len() > 5 {
                    format!(" and {} more", nodes.len() - 5)
                } else {
                    String::new()
                };
                format!(
                    "  {op} (opset {opset}): {} node(s): {}{more}",
                    nodes.len(),
                    shown.join(", ")
                )
            })
            .collect();
        return Err(err(format!(
            "{} unsupported op type(s):\n{}",
            unsupported.len(),
            lines.join("\n")
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut external = tensor::ExternalFiles::default();
    let mut weights = BTreeMap::new();
    let mut vals = HashMap::new();
    let mut weight_dims = HashMap::new();
    for init in &graph.initializer {
        let weight = tensor::weight_of(init, dir, &mut external).map_err(&err)?;
        let foldable =
            weight.numel() <= 1 || (!weight.dtype.is_float() && weight.numel() <= FOLD_LIMIT);
        let val = if foldable {
            Val::Static(tensor::tensor_of(&weight).map_err(&err)?)
        } else {
            weight_dims.insert(init.name.clone(), (weight.dtype, weight.shape.clone()));
            weights.insert(init.name.clone(), weight);
            Val::Weight(init.name.clone())
        };
        vals.insert(init.name.clone(), val);
    }
    let name = if graph.name.is_empty() {
        "onnx"
    } else {
        graph.name.as_str()
    };
    let mut importer = Importer {
        b: Builder::new(name, path, weights),
        vals,
        dir: dir.to_path_buf(),
        symbols: HashMap::new(),
        weight_dims,
        constants: HashMap::new(),
        shapes,
    };
    for input in &graph.input {
        if importer.vals.contains_key(&input.name) {
            continue;
        }
        match constants.get(&input.name) {
            Some(value) => {
                let id_or_value = if value.numel() <= FOLD_LIMIT {
                    Val::Static(value.clone())
                } else {
                    Val::Node(importer.constant(&input.name, value).map_err(&err)?)
                };
                importer.vals.insert(input.name.clone(), id_or_value);
            }
            None => importer.add_input(input).map_err(&err)?,
        }
    }
    let unknown: Vec<&str> = constants
        .keys()
        .map(String::as_str)
        .filter(|n| !graph.input.iter().any(|i| i.name == *n))
        .collect();
    if !unknown.is_empty() {
        return Err(err(format!(
            "constant values given for unknown inputs: {}",
            unknown.join(", ")
        )));
    }
    let unknown: Vec<&str> = shapes
        .names()
        .filter(|n| !graph.input.iter().any(|i| i.name == *n))
        .collect();
    if !unknown.is_empty() {
        return Err(err(format!(
            "--shape names unknown inputs: {}",
            unknown.join(", ")
        )));
    }
    for node in &graph.node {
        importer.node(node).map_err(|e| {
            err(format!(
                "node `{}` ({}): {e}",
                node_label(node),
                node.op_type
            ))
        })?;
    }
    for output in &graph.output {
        let val = importer.val(&output.name).map_err(&err)?;
        let id = importer.node_of(&val, &output.name).map_err(&err)?;
        importer.b.output(&output.name, id)?;
    }
    Ok(importer.b.finish())
}

fn node_label(node: &NodeProto) -> &str {
    if node.name.is_empty() {
        node.output.first().map_or("", String::as_str)
    } else {
        &node.name
    }
}

/// A symbol name from an ONNX `dim_param`: identifier characters only.
fn symbol_name(param: &str) -> String {
    let cleaned: String = param
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.chars().next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => cleaned,
        _ => format!("d_{cleaned}"),
    }
}

impl Importer<'_> {
    fn add_input(
        &mut self,
        input: &onnx_protobuf::ValueInfoProto,
    ) -> std::result::Result<(), String> {
        let tensor_type = match input.type_.as_ref().and_then(|t| t.value.as_ref()) {
            Some(onnx_protobuf::type_proto::Value::TensorType(t)) => t,
            _ => return Err(format!("input `{}` is not a tensor", input.name)),
        };
        let dtype = tensor::dtype_of(tensor_type.elem_type)
            .map_err(|e| format!("input `{}`: {e}", input.name))?;
        let onnx_dims: Vec<&onnx_protobuf::tensor_shape_proto::Dimension> = tensor_type
            .shape
            .as_ref()
            .map(|s| s.dim.iter().collect())
            .unwrap_or_default();
        let requested = self.shapes.get(&input.name);
        if let Some(req) = requested {
            if req.len() != onnx_dims.len() {
                return Err(format!(
                    "--shape {}: {} dims given, the input has {}",
                    input.name,
                    req.len(),
                    onnx_dims.len()
                ));
            }
        }
        let mut dims = Vec::new();
        for (axis, dim) in onnx_dims.iter().enumerate() {
            use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
            let param = match &dim.value {
                Some(D::DimParam(p)) if !p.is_empty() => Some(p.clone()),
                _ => None,
            };
            let value = match &dim.value {
                Some(D::DimValue(v)) if *v > 0 => Some(*v as usize),
                _ => None,
            };
            let spec = requested.map(|r| r[axis].clone());
            let resolved = match (spec, value, param) {
                (Some(DimSpec::Fixed(n)), Some(v), _) if n != v => {
                    return Err(format!(
                        "--shape {}: axis {axis} is fixed to {v} in the model, not {n}",
                        input.name
                    ))
                }
                (Some(DimSpec::Fixed(n)), _, param) => {
                    if let Some(param) = param {
                        self.symbols.insert(param, n.to_string());
                    }
                    Dim::from(n)
                }
                (Some(DimSpec::Symbol { name, max }), _, param) => {
                    self.declare(&name, max)?;
                    if let Some(param) = param {
                        self.symbols.insert(param, name.clone());
                    }
                    Dim::sym(&name)
                }
                (None, Some(v), _) => Dim::from(v),
                (None, None, Some(param)) => match self.symbols.get(&param) {
                    Some(bound) => bound
                        .parse::<usize>()
                        .map_or_else(|_| Dim::sym(bound), Dim::from),
                    None => {
                        let base = symbol_name(&param);
                        let taken = |n: &String| self.symbols.values().any(|v| v == n);
                        let name = (0..)
                            .map(|i| {
                                if i == 0 {
                                    base.clone()
                                } else {
                                    format!("{base}_{i}")
                                }
                            })
                            .find(|n| !taken(n))
                            .unwrap_or(base);
                        self.declare(&name, DEFAULT_MAX)?;
                        self.symbols.insert(param, name.clone());
                        Dim::sym(&name)
                    }
                },
                (None, None, None) => {
                    return Err(format!(
                        "input `{}` axis {axis} has no size or name: give it with --shape",
                        input.name
                    ))
                }
            };
            dims.push(resolved);
        }
        let id = self
            .b
            .input(&input.name, dtype, &dims)
            .map_err(|e| e.to_string())?;
        self.vals.insert(input.name.clone(), Val::Node(id));
        Ok(())
    }

    fn declare(&mut self, name: &str, max: usize) -> std::result::Result<(), String> {
        self.b.declare_symbol(name, max).map_err(|e| e.to_string())
    }

    fn val(&self, name: &str) -> std::result::Result<Val, String> {
        if name.is_empty() {
            return Ok(Val::Absent);
        }
        self.vals
            .get(name)
            .cloned()
            .ok_or_else(|| format!("value `{name}` is used before it is defined"))
    }

    fn node(&mut self, node: &NodeProto) -> std::result::Result<(), String> {
        let inputs = node
            .input
            .iter()
            .map(|n| self.val(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let outputs = ops::import(self, node, &inputs)?;
        if outputs.len() < node.output.iter().filter(|o| !o.is_empty()).count() {
            return Err(format!(
                "produced {} outputs, the node declares {}",
                outputs.len(),
                node.output.len()
            ));
        }
        for (name, val) in node.output.iter().zip(outputs) {
            if !name.is_empty() {
                self.vals.insert(name.clone(), val);
            }
        }
        Ok(())
    }

    /// The value's type.
    fn ty(&self, val: &Val) -> std::result::Result<TensorType, String> {
        Ok(match val {
            Val::Node(id) => self.b.graph().node(*id).ty.clone(),
            Val::Static(t) => TensorType::new(t.dtype(), Shape::fixed(t.shape())),
            Val::Ints(ints) => TensorType::new(ints.dtype, Shape::fixed(&ints.shape)),
            Val::Weight(name) => {
                let (dtype, dims) = &self.weight_dims[name];
                TensorType::new(*dtype, Shape::fixed(dims))
            }
            Val::Absent => return Err("a required input is missing".into()),
        })
    }

    /// The value as integer dims, if known at compile time.
    fn ints(&self, val: &Val) -> Option<SymInts> {
        match val {
            Val::Static(t) => SymInts::from_tensor(t),
            Val::Ints(ints) => Some(ints.clone()),
            Val::Node(_) | Val::Weight(_) | Val::Absent => None,
        }
    }

    /// The value, if known at compile time as concrete numbers.
    fn known(&self, val: &Val) -> Option<Tensor> {
        match val {
            Val::Static(t) => Some(t.clone()),
            Val::Ints(ints) => ints.to_tensor(),
            Val::Node(_) | Val::Weight(_) | Val::Absent => None,
        }
    }

    /// A graph node computing the value, creating constants as needed.
    fn node_of(&mut self, val: &Val, name: &str) -> std::result::Result<NodeId, String> {
        match val {
            Val::Node(id) => Ok(*id),
            Val::Static(t) => self.constant(name, t),
            Val::Weight(weight) => self.b.weight(weight).map_err(|e| e.to_string()),
            Val::Absent => Err("a required input is missing".into()),
            Val::Ints(ints) => match ints.to_tensor() {
                Some(t) => self.constant(name, &t),
                None => self.materialize_dims(ints, name),
            },
        }
    }

    fn constant(&mut self, name: &str, t: &Tensor) -> std::result::Result<NodeId, String> {
        let key = (
            t.dtype(),
            t.shape().to_vec(),
            kiln_ir::checksum(&t.to_le_bytes()),
        );
        if let Some(&id) = self.constants.get(&key) {
            return Ok(id);
        }
        let id = self.b.constant(name, t).map_err(|e| e.to_string())?;
        self.constants.insert(key, id);
        Ok(id)
    }

    /// Symbolic dims as a run-time tensor: each dim `d` is `range(start = d, len = 1)`.
    fn materialize_dims(
        &mut self,
        ints: &SymInts,
        name: &str,
    ) -> std::result::Result<NodeId, String> {
        let mut parts = Vec::new();
        for (i, d) in ints.values.iter().enumerate() {
            let op = Op::Range {
                start: d.clone(),
                step: 1,
                len: Dim::Const(1),
                dtype: ints.dtype,
            };
            parts.push(
                self.b
                    .op(&format!("{name}.dim{i}"), op, &[])
                    .map_err(|e| e.to_string())?,
            );
        }
        let joined = if parts.len() == 1 {
            parts[0]
        } else {
            self.b
                .op(&format!("{name}.dims"), Op::Concat { axis: 0 }, &parts)
                .map_err(|e| e.to_string())?
        };
        let shape = Shape::fixed(&ints.shape);
        self.b
            .op(name, Op::Reshape { shape }, &[joined])
            .map_err(|e| e.to_string())
    }

    /// Adds `op` over the inputs, or evaluates it now when every input is known.
    fn emit(&mut self, name: &str, op: Op, inputs: &[Val]) -> std::result::Result<Val, String> {
        let known: Option<Vec<Tensor>> = inputs.iter().map(|v| self.known(v)).collect();
        if let Some(known) = known {
            let refs: Vec<&Tensor> = known.iter().collect();
            if let Ok(result) = op.evaluate_fixed(&refs, FOLD_LIMIT) {
                return Ok(Val::Static(result));
            }
        }
        let ids = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| self.node_of(v, &format!("{name}.in{i}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Val::Node(
            self.b.op(name, op, &ids).map_err(|e| e.to_string())?,
        ))
    }
}
