//! GGUF (llama.cpp's model file): header, metadata, tensor infos and alignment, dequantization
//! of F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and the `llama` architecture mapped onto the LLaMA
//! template (with the q/k row un-permutation llama.cpp's rotary layout needs).
//!
//! Every length, count, dim and offset is checked against the file before it is used, so a
//! truncated or lying file is an error naming what is wrong, never a panic or a huge allocation.

mod quant;

use crate::build::{Builder, Result};
use crate::safetensors::llama::{build_decoder, LlamaConfig, WeightNames};
use crate::{FrontendError, InputShapes};
use kiln_ir::{DType, Graph, Weight, WeightBytes};
use memmap2::Mmap;
use quant::GgmlType;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array: its length, and its first [`MAX_ARRAY_ITEMS`] elements (the rest are read
    /// past, not kept, so a long vocabulary costs no memory).
    Array {
        /// Number of elements in the file.
        len: u64,
        /// The elements kept.
        head: Vec<Value>,
    },
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(v) => Some(*v),
            Value::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Uint(v) => Some(*v as f64),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

/// One tensor's description in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Dims in row-major order (GGUF lists them innermost first; this is reversed).
    pub dims: Vec<usize>,
    kind: GgmlType,
    /// Byte range in the file.
    range: std::ops::Range<usize>,
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    map: Arc<Mmap>,
    /// Format version.
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// No real model has more than this many tensors or metadata entries, or dims per tensor.
const MAX_COUNT: u64 = 1 << 20;

/// Array elements kept per metadata value.
pub const MAX_ARRAY_ITEMS: usize = 64;
const MAX_DIMS: u32 = 8;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &str) -> std::result::Result<u64, String> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(format!(
                "{what} is {n}, more than any model has ({MAX_COUNT})"
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| format!("{what} length {len} is absurd"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("{what} at offset {} is not UTF-8", self.pos - len))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> std::result::Result<Value, String> {
        let what = format!("metadata `{key}`");
        Ok(match kind {
            0 => Value::Uint(u64::from(self.array::<1>(&what)?[0])),
            1 => Value::Int(i64::from(self.array::<1>(&what)?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.array(&what)?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.array(&what)?))),
            4 => Value::Uint(u64::from(self.u32(&what)?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.array(&what)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.array(&what)?))),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(format!("{what}: bool byte is {other}")),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let item_kind = self.u32(&what)?;
                let n = self.u64(&what)?;
                // Each element takes at least one byte: a count beyond the bytes left is a lie.
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(format!(
                        "{what}: array of {n} elements does not fit in the file"
                    ));
                }
                let mut head = Vec::new();
                for _ in 0..n {
                    let item = self.value(item_kind, key, depth + 1)?;
                    if head.len() < MAX_ARRAY_ITEMS {
                        head.push(item);
                    }
                }
                Value::Array { len: n, head }
            }
            10 => Value::Uint(self.u64(&what)?),
            11 => Value::Int(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::Float(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let err = |message: String| FrontendError::new(path, message);
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        // SAFETY: read-only mapping of a model file kiln does not modify while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(e.to_string()))?;
        let (version, metadata, tensors) = parse(&map).map_err(err)?;
        Ok(GgufFile {
            map: Arc::new(map),
            version,
            metadata,
            tensors,
        })
    }

    fn weight(&self, info: &TensorInfo) -> std::result::Result<Weight, String> {
        let bytes = &self.map[info.range.clone()];
        let shape = info.dims.clone();
        let numel: usize = shape.iter().product();
        match info.kind {
            GgmlType::F32 => Weight::from_bytes(
                DType::F32,
                shape,
                WeightBytes::Mapped {
                    map: Arc::clone(&self.map),
                    range: info.range.clone(),
                },
            ),
            kind => Weight::owned(DType::F32, shape, quant::dequantize(kind, bytes, numel)),
        }
        .map_err(|e| format!("tensor `{}`: {e}", info.name))
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>);

fn parse(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(format!(
            "not a GGUF file (magic {magic:?}, expected \"GGUF\")"
        ));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let tensor_count = r.count("tensor count")?;
    let kv_count = r.count("metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("metadata key")?;
        let kind = r.u32(&format!("type of metadata `{key}`"))?;
        let value = r.value(kind, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format!("general.alignment {v:?} is not a power of two"))?,
    } as usize;
    let mut infos = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&format!("tensor `{name}` rank"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dims"));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = r.u64(&format!("tensor `{name}` dims"))?;
            dims.push(
                usize::try_from(d).map_err(|_| format!("tensor `{name}` dim {d} is absurd"))?,
            );
        }
        dims.reverse();
        let kind_code = r.u32(&format!("tensor `{name}` type"))?;
        let kind = GgmlType::from_code(kind_code)
            .ok_or_else(|| format!("tensor `{name}` has unsupported ggml type {kind_code}"))?;
        let offset = r.u64(&format!("tensor `{name}` offset"))?;
        infos.push((name, dims, kind, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let tensors = infos
        .into_iter()
        .map(|(name, dims, kind, offset)| {
            let numel = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("tensor `{name}` dims {dims:?} overflow"))?;
            let size = kind.byte_size(numel).ok_or_else(|| format!("tensor `{name}`: {numel} elements are not whole {kind:?} blocks"))?;
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(size)).filter(|&e| e <= bytes.len());
            match (start, end) {
                (Some(start), Some(end)) if (start - data_start).is_multiple_of(alignment) => Ok(TensorInfo { name, dims, kind, range: start..end }),
                (Some(_), Some(_)) => Err(format!("tensor `{name}` offset {offset} is not aligned to {alignment}")),
                _ => Err(format!("tensor `{name}` ({size} bytes at offset {offset}) lies beyond the end of the file ({} bytes)", bytes.len())),
            }
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    // Every tensor owns its bytes: overlapping ranges would let a small file expand into huge
    // dequantized weights.
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|t| (t.range.start, t.range.end, t.name.as_str()))
        .collect();
    ranges.sort_unstable();
    if let Some(pair) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(format!(
            "tensors `{}` and `{}` overlap in the file",
            pair[0].2, pair[1].2
        ));
    }
    Ok((version, metadata, tensors))
}

/// Builds the graph of a GGUF model (architecture `llama`).
pub fn load(path: &Path, shapes: &InputShapes) -> Result<Graph> {
    let file = GgufFile::open(path)?;
    let err = |message: String| FrontendError::new(path, message);
    let architecture = match file.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(err("metadata `general.architecture` is missing".into())),
    };
    if architecture != "llama" {
        return Err(err(format!(
            "architecture `{architecture}` is not supported (llama is)"
        )));
    }
    let meta_u = |key: &str| {
        file.metadata
            .get(&format!("llama.{key}"))
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v > 0 && v <= crate::build::MAX_HYPERPARAMETER)
            .ok_or_else(|| {
                err(format!(
                    "metadata `llama.{key}` is missing or not an integer in 1..={}",
                    crate::build::MAX_HYPERPARAMETER
                ))
            })
    };
    let hidden = meta_u("embedding_length")?;
    let heads = meta_u("attention.head_count")?;
    let embed = file
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .ok_or_else(|| err("tensor `token_embd.weight` is missing".into()))?;
    let config = LlamaConfig {
        hidden,
        heads,
        kv_heads: meta_u("attention.head_count_kv").unwrap_or(heads),
        head_dim: meta_u("rope.dimension_count").unwrap_or(hidden / heads),
        layers: meta_u("block_count")?,
        intermediate: meta_u("feed_forward_length")?,
        eps: file
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                err("metadata `llama.attention.layer_norm_rms_epsilon` is missing".into())
            })? as f32,
        rope_theta: file
            .metadata
            .get("llama.rope.freq_base")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
        max_positions: meta_u("context_length")?,
        vocab: embed.dims[0],
        tied_embeddings: !file.tensors.iter().any(|t| t.name == "output.weight"),
    };
    if config.head_dim.checked_mul(heads) != Some(hidden)
        && file.metadata.contains_key("llama.rope.dimension_count")
    {
        return Err(err(format!(
            "head_dim {} x {heads} heads differs from the embedding length {hidden}",
            config.head_dim
        )));
    }
    let mut weights = BTreeMap::new();
    for info in &file.tensors {
        let mut weight = file.weight(info).map_err(err)?;
        let permuted_heads = if info.name.ends_with("attn_q.weight") {
            Some(config.heads)
        } else if info.name.ends_with("attn_k.weight") {
            Some(config.kv_heads)
        } else {
            None
        };
        if let Some(n_heads) = permuted_heads {
            weight = unpermute_rows(&weight, n_heads)
                .map_err(|e| err(format!("tensor `{}`: {e}", info.name)))?;
        }
        weights.insert(info.name.clone(), weight);
    }
    let mut builder = Builder::new("llama", path, weights);
    build_decoder(&mut builder, &config, &gguf_names(), shapes, true)?;
    Ok(builder.finish())
}

fn gguf_names() -> WeightNames {
    WeightNames {
        embed: "token_embd.weight".into(),
        final_norm: "output_norm.weight".into(),
        head: "output.weight".into(),
        layer: |i, module| {
            let name = match module {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => other,
            };
            format!("blk.{i}.{name}.weight")
        },
    }
}

/// Undoes llama.cpp's rotary row permutation of a `[n_heads * head_dim, hidden]` f32 weight:
/// HF row `h*d + j*d/2 + i` is GGUF row `h*d + 2i + j`.
fn unpermute_rows(weight: &Weight, n_heads: usize) -> std::result::Result<Weight, String> {
    let [rows, cols] = weight.shape[..] else {
        return Err(format!("expected a matrix, got dims {:?}", weight.shape));
    };
    if n_heads == 0 || rows % n_heads != 0 || !(rows / n_heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows do not split into {n_heads} heads of even size"
        ));
    }
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let bytes = weight
        .data
        .as_ref()
        .map(WeightBytes::bytes)
        .ok_or("weight has no data")?;
    let row_bytes = cols * 4;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&bytes[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    Weight::owned(DType::F32, weight.shape.clone(), out).map_err(|e| e.0)
}
