//! ONNX tensors (initializers and `Constant` values) to kiln weights and tensors, including
//! external data files, which are memory-mapped rather than copied.

use kiln_ir::{DType, Tensor, Weight, WeightBytes};
use memmap2::Mmap;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::TensorProto;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// kiln's dtype for an ONNX `TensorProto.DataType` code.
pub(super) fn dtype_of(code: i32) -> Result<DType, String> {
    Ok(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        16 => DType::BF16,
        other => {
            let name = match other {
                4 => "uint16",
                5 => "int16",
                8 => "string",
                11 => "double",
                12 => "uint32",
                13 => "uint64",
                14 | 15 => "complex",
                _ => "unknown",
            };
            return Err(format!(
                "element type {name} (ONNX data type {other}) is not supported"
            ));
        }
    })
}

/// Memory maps of external data files, opened once each.
#[derive(Default)]
pub(super) struct ExternalFiles {
    maps: HashMap<PathBuf, Arc<Mmap>>,
}

impl ExternalFiles {
    fn map(&mut self, path: &Path) -> Result<Arc<Mmap>, String> {
        if let Some(map) = self.maps.get(path) {
            return Ok(Arc::clone(map));
        }
        let file = std::fs::File::open(path)
            .map_err(|e| format!("external data {}: {e}", path.display()))?;
        // SAFETY: read-only mapping of a model file kiln does not modify while it is mapped.
        let map = Arc::new(
            unsafe { Mmap::map(&file) }
                .map_err(|e| format!("external data {}: {e}", path.display()))?,
        );
        self.maps.insert(path.to_path_buf(), Arc::clone(&map));
        Ok(map)
    }
}

/// The dims of a tensor proto, checked to be non-negative.
pub(super) fn dims_of(t: &TensorProto) -> Result<Vec<usize>, String> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| format!("tensor `{}` has a negative dim {d}", t.name))
        })
        .collect()
}

/// The tensor's data as a weight: raw or typed fields copied, external data mapped.
pub(super) fn weight_of(
    t: &TensorProto,
    model_dir: &Path,
    external: &mut ExternalFiles,
) -> Result<Weight, String> {
    let dtype = dtype_of(t.data_type).map_err(|e| format!("tensor `{}`: {e}", t.name))?;
    let dims = dims_of(t)?;
    let numel = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor `{}` dims {dims:?} overflow", t.name))?;
    let fail = |what: String| format!("tensor `{}`: {what}", t.name);
    if t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) {
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let location =
            entry("location").ok_or_else(|| fail("external data without a location".into()))?;
        if Path::new(&location).is_absolute()
            || location.split(['/', '\\']).any(|part| part == "..")
        {
            return Err(fail(format!(
                "external data location `{location}` must stay inside the model's directory"
            )));
        }
        let parse = |key: &str| -> Result<Option<usize>, String> {
            entry(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| fail(format!("external data {key} `{v}` is not a number")))
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let expected = numel
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| fail("size overflows".into()))?;
        let length = parse("length")?.unwrap_or(expected);
        let map = external.map(&model_dir.join(&location)).map_err(fail)?;
        let end = offset.checked_add(length).filter(|&e| e <= map.len()).ok_or_else(|| {
            fail(format!("external data {offset}..{offset}+{length} lies beyond the end of `{location}` ({} bytes)", map.len()))
        })?;
        return Weight::from_bytes(
            dtype,
            dims,
            WeightBytes::Mapped {
                map,
                range: offset..end,
            },
        )
        .map_err(|e| fail(e.0));
    }
    let bytes: Vec<u8> = if !t.raw_data.is_empty() {
        t.raw_data.clone()
    } else {
        match dtype {
            DType::F32 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            // Narrow types and 16-bit floats are stored one per int32 (as bit patterns for floats).
            DType::I8 | DType::U8 | DType::Bool => t.int32_data.iter().map(|&v| v as u8).collect(),
            DType::F16 | DType::BF16 => t
                .int32_data
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect(),
        }
    };
    Weight::owned(dtype, dims, bytes).map_err(|e| fail(e.0))
}

/// The weight's values as a tensor.
pub(super) fn tensor_of(weight: &Weight) -> Result<Tensor, String> {
    let bytes = weight
        .data
        .as_ref()
        .map(WeightBytes::bytes)
        .ok_or("weight has no data")?;
    Tensor::from_le_bytes(weight.dtype, weight.shape.clone(), bytes).map_err(|e| e.0)
}
