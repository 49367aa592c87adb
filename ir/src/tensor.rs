//! Concrete tensors: the values the reference interpreter computes with.

use crate::dtype::DType;
use half::{bf16, f16};
use std::fmt;

/// Element storage, one variant per [`DType`].
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// i64 elements.
    I64(Vec<i64>),
    /// i32 elements.
    I32(Vec<i32>),
    /// i8 elements.
    I8(Vec<i8>),
    /// u8 elements.
    U8(Vec<u8>),
    /// bool elements.
    Bool(Vec<bool>),
}

/// A dense row-major tensor with concrete dims.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

/// A tensor could not be built from the given parts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

impl Tensor {
    /// A tensor from dims and data; the element count must match.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, TensorError> {
        let expected = checked_numel(&shape)?;
        if expected != data.len() {
            return Err(TensorError(format!(
                "shape {shape:?} needs {expected} elements, data has {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// An f32 tensor.
    pub fn f32(shape: &[usize], values: Vec<f32>) -> Result<Tensor, TensorError> {
        Tensor::new(shape.to_vec(), Data::F32(values))
    }

    /// An i64 tensor.
    pub fn i64(shape: &[usize], values: Vec<i64>) -> Result<Tensor, TensorError> {
        Tensor::new(shape.to_vec(), Data::I64(values))
    }

    /// A bool tensor.
    pub fn bool(shape: &[usize], values: Vec<bool>) -> Result<Tensor, TensorError> {
        Tensor::new(shape.to_vec(), Data::Bool(values))
    }

    /// Decodes little-endian bytes (the layout of safetensors and of kiln's weight store).
    pub fn from_le_bytes(
        dtype: DType,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<Tensor, TensorError> {
        let numel = checked_numel(&shape)?;
        if numel.checked_mul(dtype.size_bytes()) != Some(bytes.len()) {
            return Err(TensorError(format!(
                "{dtype}{shape:?} needs {} bytes, got {}",
                numel.saturating_mul(dtype.size_bytes()),
                bytes.len()
            )));
        }
        fn chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect()
        }
        let data = match dtype {
            DType::F32 => Data::F32(chunks(bytes, f32::from_le_bytes)),
            DType::F16 => Data::F16(chunks(bytes, f16::from_le_bytes)),
            DType::BF16 => Data::BF16(chunks(bytes, bf16::from_le_bytes)),
            DType::I64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            DType::I32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            DType::I8 => Data::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::U8 => Data::U8(bytes.to_vec()),
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor { shape, data })
    }

    /// Little-endian bytes of the elements.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::U8(v) => v.clone(),
            Data::Bool(v) => v.iter().map(|&x| u8::from(x)).collect(),
        }
    }

    /// Builds a tensor of `dtype` from f64 values, rounding to the dtype (integers truncate
    /// toward zero and saturate, as a float-to-int cast does).
    pub fn from_f64s(dtype: DType, shape: Vec<usize>, values: Vec<f64>) -> Tensor {
        let data = match dtype {
            DType::F32 => Data::F32(values.iter().map(|&v| v as f32).collect()),
            DType::F16 => Data::F16(values.iter().map(|&v| f16::from_f64(v)).collect()),
            DType::BF16 => Data::BF16(values.iter().map(|&v| bf16::from_f64(v)).collect()),
            DType::I64 => Data::I64(values.iter().map(|&v| v as i64).collect()),
            DType::I32 => Data::I32(values.iter().map(|&v| v as i32).collect()),
            DType::I8 => Data::I8(values.iter().map(|&v| v as i8).collect()),
            DType::U8 => Data::U8(values.iter().map(|&v| v as u8).collect()),
            DType::Bool => Data::Bool(values.iter().map(|&v| v != 0.0).collect()),
        };
        Tensor { shape, data }
    }

    /// Builds a tensor of `dtype` from i64 values, wrapping to narrower integers as a cast does.
    pub fn from_i64s(dtype: DType, shape: Vec<usize>, values: Vec<i64>) -> Tensor {
        let data = match dtype {
            DType::I64 => Data::I64(values),
            DType::I32 => Data::I32(values.iter().map(|&v| v as i32).collect()),
            DType::I8 => Data::I8(values.iter().map(|&v| v as i8).collect()),
            DType::U8 => Data::U8(values.iter().map(|&v| v as u8).collect()),
            DType::Bool => Data::Bool(values.iter().map(|&v| v != 0).collect()),
            DType::F32 | DType::F16 | DType::BF16 => {
                return Tensor::from_f64s(dtype, shape, values.iter().map(|&v| v as f64).collect())
            }
        };
        Tensor { shape, data }
    }

    /// A bool tensor from values.
    pub fn from_bools(shape: Vec<usize>, values: Vec<bool>) -> Tensor {
        Tensor {
            shape,
            data: Data::Bool(values),
        }
    }

    /// The dims.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element storage.
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements widened to f64 (exact for every dtype but i64 beyond 2^53).
    pub fn to_f64s(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
        }
    }

    /// The elements as i64 (floats truncated toward zero).
    pub fn to_i64s(&self) -> Vec<i64> {
        match &self.data {
            Data::I64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Data::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Data::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Data::Bool(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Data::F32(_) | Data::F16(_) | Data::BF16(_) => {
                self.to_f64s().iter().map(|&x| x as i64).collect()
            }
        }
    }

    /// The elements as bools (non-zero is true).
    pub fn to_bools(&self) -> Vec<bool> {
        match &self.data {
            Data::Bool(v) => v.clone(),
            _ => self.to_f64s().iter().map(|&x| x != 0.0).collect(),
        }
    }

    /// The same elements with new dims of equal element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        Tensor::new(shape, self.data.clone())
    }

    /// Picks elements by flat index into a new tensor of `shape` (the gather every layout op is).
    pub fn take(&self, shape: Vec<usize>, indices: &[usize]) -> Tensor {
        fn pick<T: Copy>(v: &[T], indices: &[usize]) -> Vec<T> {
            indices.iter().map(|&i| v[i]).collect()
        }
        let data = match &self.data {
            Data::F32(v) => Data::F32(pick(v, indices)),
            Data::F16(v) => Data::F16(pick(v, indices)),
            Data::BF16(v) => Data::BF16(pick(v, indices)),
            Data::I64(v) => Data::I64(pick(v, indices)),
            Data::I32(v) => Data::I32(pick(v, indices)),
            Data::I8(v) => Data::I8(pick(v, indices)),
            Data::U8(v) => Data::U8(pick(v, indices)),
            Data::Bool(v) => Data::Bool(pick(v, indices)),
        };
        Tensor { shape, data }
    }
}

impl Data {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::I64(_) => DType::I64,
            Data::I32(_) => DType::I32,
            Data::I8(_) => DType::I8,
            Data::U8(_) => DType::U8,
            Data::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::BF16(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn checked_numel(shape: &[usize]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TensorError(format!("element count of {shape:?} overflows")))
}

/// Row-major strides of `shape`, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype(), self.shape)
    }
}
