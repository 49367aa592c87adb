//! The runtime's view of a planned graph: the [`ModelSpec`] (symbols, inputs, outputs, buffer
//! table, checks, kernel names) and the bytes of each weight, in the order of the weight blob.
//! The JIT and the object backend describe a model the same way, so the runtime code they run
//! is the same.

use crate::plan::Plan;
use crate::CodegenError;
use kiln_ir::{DType, Dim, Graph, NodeId, Op, WeightBytes};
use kiln_runtime::spec::{
    BufferCheck, DimExpr, KernelSpec, ModelSpec, Slot, SymbolSpec, TensorSpec, WeightSpec,
};
use std::borrow::Cow;
use std::collections::HashMap;

/// Weights start on cache-line boundaries in the blob.
const WEIGHT_ALIGN: usize = 64;

/// A model as the runtime sees it, with its weights' bytes.
pub(crate) struct Description<'g> {
    pub spec: ModelSpec,
    /// The bytes of each weight of `spec.weights`: the graph's, or packed here.
    pub weights: Vec<Cow<'g, [u8]>>,
    /// The nodes with kernels, in execution order (`spec.kernels`'s order).
    pub kernel_nodes: Vec<NodeId>,
}

/// The runtime's dtype for kiln's.
pub(crate) fn runtime_dtype(dtype: DType) -> kiln_runtime::spec::DType {
    use kiln_runtime::spec::DType as R;
    match dtype {
        DType::F32 => R::F32,
        DType::F16 => R::F16,
        DType::BF16 => R::BF16,
        DType::I64 => R::I64,
        DType::I32 => R::I32,
        DType::I8 => R::I8,
        DType::U8 => R::U8,
        DType::Bool => R::Bool,
    }
}

/// Interns dim expressions into the spec's table.
struct Dims<'g> {
    symbols: HashMap<&'g str, usize>,
    index: HashMap<Dim, usize>,
    table: Vec<DimExpr>,
}

impl Dims<'_> {
    fn expr(&self, dim: &Dim) -> DimExpr {
        let pair = |a: &Dim, b: &Dim| (Box::new(self.expr(a)), Box::new(self.expr(b)));
        match dim {
            Dim::Const(v) => DimExpr::Const(*v),
            // Every symbol a dim names is declared: the verifier checks it.
            Dim::Sym(name) => DimExpr::Sym(
                self.symbols
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(usize::MAX),
            ),
            Dim::Add(a, b) => {
                let (a, b) = pair(a, b);
                DimExpr::Add(a, b)
            }
            Dim::Sub(a, b) => {
                let (a, b) = pair(a, b);
                DimExpr::Sub(a, b)
            }
            Dim::Mul(a, b) => {
                let (a, b) = pair(a, b);
                DimExpr::Mul(a, b)
            }
            Dim::Div(a, b) => {
                let (a, b) = pair(a, b);
                DimExpr::Div(a, b)
            }
        }
    }

    fn intern(&mut self, dim: &Dim) -> usize {
        if let Some(&index) = self.index.get(dim) {
            return index;
        }
        let expr = self.expr(dim);
        self.table.push(expr);
        self.index.insert(dim.clone(), self.table.len() - 1);
        self.table.len() - 1
    }

    fn shape(&mut self, dims: &[Dim]) -> Vec<usize> {
        dims.iter().map(|d| self.intern(d)).collect()
    }
}

/// Describes `graph` as planned by `plan`, under the C name `name`.
pub(crate) fn describe<'g>(
    graph: &'g Graph,
    plan: &Plan,
    name: &str,
) -> Result<Description<'g>, CodegenError> {
    let mut dims = Dims {
        symbols: graph
            .symbols()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect(),
        index: HashMap::new(),
        table: Vec::new(),
    };
    let tensor = |dims: &mut Dims, id: NodeId, name: &str| {
        let node = graph.node(id);
        TensorSpec {
            name: name.to_string(),
            dtype: runtime_dtype(node.ty.dtype),
            dims: dims.shape(&node.ty.shape.0),
            slot: plan.index(id),
        }
    };
    let inputs: Vec<TensorSpec> = graph
        .inputs()
        .iter()
        .map(|&id| tensor(&mut dims, id, &graph.node(id).name))
        .collect();
    let outputs: Vec<TensorSpec> = graph
        .outputs()
        .iter()
        .map(|(name, id)| tensor(&mut dims, *id, name))
        .collect();
    let mut slots: Vec<Slot> = Vec::with_capacity(plan.order().len() + 1);
    let mut blob = Blob::default();
    let mut weight_index: HashMap<&str, usize> = HashMap::new();
    let mut buffers = Vec::new();
    let mut kernels = Vec::new();
    let mut kernel_nodes = Vec::new();
    for &id in plan.order() {
        let node = graph.node(id);
        if let Some(source) = plan.alias_of(id) {
            slots.push(slots[plan.index(source)].clone());
            continue;
        }
        let slot = match &node.op {
            Op::Input => Slot::Input(
                graph
                    .inputs()
                    .iter()
                    .position(|&i| i == id)
                    .unwrap_or(usize::MAX),
            ),
            Op::Constant { .. } | Op::Transpose { .. } if plan.only_packed(graph, id) => {
                Slot::Absent
            }
            Op::Constant { weight } => {
                if let Some(&index) = weight_index.get(weight.as_str()) {
                    Slot::Weight(index)
                } else {
                    let bytes = weight_data(graph, id, weight)?;
                    let index = add_weight(&mut blob, &node.name, Cow::Borrowed(bytes));
                    weight_index.insert(weight, index);
                    Slot::Weight(index)
                }
            }
            _ => {
                node.op.for_each_dim(|d| {
                    dims.intern(d);
                });
                buffers.push(BufferCheck {
                    node: node.name.clone(),
                    element_bytes: node.ty.dtype.size_bytes(),
                    dims: dims.shape(&node.ty.shape.0),
                    reserved: plan.reserved(id),
                });
                kernels.push(KernelSpec {
                    node: node.name.clone(),
                    op: node.op.name().to_string(),
                    parallel: crate::kernel::splits(graph, id),
                    dims: dims.shape(&node.ty.shape.0),
                });
                kernel_nodes.push(id);
                Slot::Arena(plan.offset(id))
            }
        };
        slots.push(slot);
    }
    for packed in plan.packed() {
        let weight = graph.node(packed.weight);
        let Op::Constant { weight: name } = &weight.op else {
            unreachable!("the plan packs constants only")
        };
        let bytes = weight_data(graph, packed.weight, name)?;
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let (rows, cols) = (
            weight.ty.shape.0[0].as_const(),
            weight.ty.shape.0[1].as_const(),
        );
        let (Some(rows), Some(cols)) = (rows, cols) else {
            unreachable!("weights have fixed shapes (checked by weight_data)")
        };
        let (k, n) = if packed.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let panels = kiln_runtime::pack_b(k as usize, n as usize, &values, packed.transposed);
        let bytes: Vec<u8> = panels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let name = format!(
            "{} (operand {} packed)",
            graph.node(packed.product).name,
            packed.operand
        );
        let index = add_weight(&mut blob, &name, Cow::Owned(bytes));
        slots.push(Slot::Weight(index));
    }
    let Blob {
        weights,
        bytes: weight_bytes,
        len: blob_len,
    } = blob;
    Ok(Description {
        spec: ModelSpec {
            name: name.to_string(),
            symbols: graph
                .symbols()
                .iter()
                .map(|s| SymbolSpec {
                    name: s.name.clone(),
                    max: s.max,
                })
                .collect(),
            dims: dims.table,
            inputs,
            outputs,
            slots,
            weights,
            buffers,
            kernels,
            arena_bytes: plan.arena_bytes(),
            weight_bytes: blob_len,
            weights_id: 0,
        },
        weights: weight_bytes,
        kernel_nodes,
    })
}

/// The weights laid out so far.
#[derive(Default)]
struct Blob<'g> {
    weights: Vec<WeightSpec>,
    bytes: Vec<Cow<'g, [u8]>>,
    len: usize,
}

/// Appends a weight to the blob at the next aligned offset; returns its index.
fn add_weight<'g>(blob: &mut Blob<'g>, node: &str, bytes: Cow<'g, [u8]>) -> usize {
    let offset = blob.len.div_ceil(WEIGHT_ALIGN) * WEIGHT_ALIGN;
    blob.len = offset + bytes.len();
    blob.weights.push(WeightSpec {
        node: node.to_string(),
        offset,
        bytes: bytes.len(),
    });
    blob.bytes.push(bytes);
    blob.weights.len() - 1
}

/// The bytes of a constant node's weight, checked against the node's type.
fn weight_data<'g>(graph: &'g Graph, id: NodeId, weight: &str) -> Result<&'g [u8], CodegenError> {
    let node = graph.node(id);
    let fail = |message: String| CodegenError::Weights {
        node: node.name.clone(),
        message,
    };
    let stored = graph.weights().get(weight);
    let bytes = stored
        .and_then(|w| w.data.as_ref())
        .map(WeightBytes::bytes)
        .ok_or_else(|| fail(format!("weight `{weight}` has no data")))?;
    let expected = stored.map_or(0, |w| w.numel().saturating_mul(w.dtype.size_bytes()));
    let typed = node
        .ty
        .shape
        .as_fixed()
        .map(|d| d.iter().product::<usize>() * node.ty.dtype.size_bytes());
    if bytes.len() != expected || typed != Some(expected) {
        return Err(fail(format!(
            "weight `{weight}` holds {} bytes, its type needs {}",
            bytes.len(),
            typed.map_or("a fixed shape".into(), |t| t.to_string())
        )));
    }
    Ok(bytes)
}
