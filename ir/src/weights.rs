//! The weight store: the data behind `const` nodes, owned or borrowed from a memory-mapped
//! file, so that loading a large model never copies its weights.

use crate::dtype::DType;
use crate::tensor::Tensor;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The bytes of one weight.
#[derive(Clone)]
pub enum WeightBytes {
    /// Bytes owned by the store.
    Owned(Arc<[u8]>),
    /// A byte range of a memory-mapped file shared by many weights.
    Mapped {
        /// The whole mapped file.
        map: Arc<Mmap>,
        /// Where this weight's bytes lie in it.
        range: Range<usize>,
    },
}

impl WeightBytes {
    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            WeightBytes::Owned(bytes) => bytes,
            WeightBytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightBytes::Owned(bytes) => write!(f, "Owned({} bytes)", bytes.len()),
            WeightBytes::Mapped { range, .. } => write!(f, "Mapped({range:?})"),
        }
    }
}

/// One named weight: its type, dims, checksum and (when loaded) its bytes.
///
/// A graph parsed from text without its weights file knows every weight's metadata but holds
/// no bytes; such a graph prints, verifies and transforms, but the interpreter refuses it.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Element type.
    pub dtype: DType,
    /// Concrete dims.
    pub shape: Vec<usize>,
    /// [`checksum`] of the bytes.
    pub checksum: u64,
    /// The bytes, when loaded.
    pub data: Option<WeightBytes>,
}

impl Weight {
    /// A weight that owns its bytes.
    pub fn owned(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Weight, WeightError> {
        Weight::from_bytes(dtype, shape, WeightBytes::Owned(bytes.into()))
    }

    /// A weight over bytes that must match `dtype` and `shape` in length.
    pub fn from_bytes(
        dtype: DType,
        shape: Vec<usize>,
        data: WeightBytes,
    ) -> Result<Weight, WeightError> {
        let expected = shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d));
        let got = data.bytes().len();
        if expected != Some(got) {
            return Err(WeightError(format!(
                "{dtype}{shape:?} needs {} bytes, data has {got}",
                expected.map_or("more than usize::MAX".to_string(), |e| e.to_string())
            )));
        }
        Ok(Weight {
            dtype,
            shape,
            checksum: checksum(data.bytes()),
            data: Some(data),
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// The bytes, if the text and JSON forms write this weight's values inline: it has at most
    /// [`crate::text::INLINE_LIMIT`] elements and the graph owns its bytes (weights mapped from a
    /// file print by reference).
    pub fn inline_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            Some(WeightBytes::Owned(bytes)) if self.numel() <= crate::text::INLINE_LIMIT => {
                Some(bytes)
            }
            _ => None,
        }
    }
}

/// An inconsistency between a weight's metadata and its bytes, or an I/O failure loading them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WeightError(pub String);

/// Named weights, ordered by name.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    weights: BTreeMap<String, Weight>,
}

impl WeightStore {
    /// An empty store.
    pub fn new() -> WeightStore {
        WeightStore::default()
    }

    /// Adds or replaces a weight.
    pub fn insert(&mut self, name: impl Into<String>, weight: Weight) {
        self.weights.insert(name.into(), weight);
    }

    /// Looks a weight up by name.
    pub fn get(&self, name: &str) -> Option<&Weight> {
        self.weights.get(name)
    }

    /// Mutable access to a weight.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Weight> {
        self.weights.get_mut(name)
    }

    /// All weights, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Weight)> {
        self.weights.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when the store holds no weights.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Removes weights whose names `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.weights.retain(|name, _| keep(name));
    }
}

/// The tensors of a safetensors file, memory-mapped, by name.
pub fn map_safetensors(path: &Path) -> Result<BTreeMap<String, Weight>, WeightError> {
    let err = |what: String| WeightError(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    // SAFETY: the mapping is read-only; kiln never writes model files while they are mapped.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| err(e.to_string()))?);
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| err(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut weights = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
            err(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                info.dtype
            ))
        })?;
        let range = data_start + info.data_offsets.0..data_start + info.data_offsets.1;
        let bytes = WeightBytes::Mapped {
            map: Arc::clone(&map),
            range,
        };
        let weight = Weight::from_bytes(dtype, info.shape.clone(), bytes)
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        weights.insert(name.clone(), weight);
    }
    Ok(weights)
}

/// Reads every tensor of a safetensors file (e.g. the inputs of `kiln run`), by name.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, WeightError> {
    map_safetensors(path)?
        .into_iter()
        .map(|(name, weight)| {
            let bytes = weight.data.as_ref().map_or(&[][..], WeightBytes::bytes);
            let tensor = Tensor::from_le_bytes(weight.dtype, weight.shape.clone(), bytes)
                .map_err(|e| WeightError(format!("{}: tensor `{name}`: {e}", path.display())))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Writes named tensors to a safetensors file.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), WeightError> {
    let err = |what: String| WeightError(format!("{}: {what}", path.display()));
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| t.to_le_bytes()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, tensor), data)| {
            safetensors::tensor::TensorView::new(
                dtype_to_safetensors(tensor.dtype()),
                tensor.shape().to_vec(),
                data,
            )
            .map(|view| (name.clone(), view))
            .map_err(|e| err(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let serialized = safetensors::serialize(views, None).map_err(|e| err(e.to_string()))?;
    std::fs::write(path, serialized).map_err(|e| err(e.to_string()))
}

/// kiln's dtype for a safetensors dtype, if it has one.
pub fn dtype_from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The safetensors dtype for a kiln dtype.
pub fn dtype_to_safetensors(dtype: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match dtype {
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

/// A 64-bit checksum of weight bytes: FNV-1a over little-endian 64-bit words (then the tail
/// bytes), followed by a final avalanche. Word-at-a-time keeps hashing a 500 MB model well under
/// a second; it detects corrupted or swapped weight files, it is not cryptographic.
pub fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks_exact yields 8 bytes"));
        hash = (hash ^ word).wrapping_mul(PRIME);
    }
    for &byte in words.remainder() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_every_byte_and_the_length() {
        let base = checksum(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_ne!(base, checksum(&[1, 2, 3, 4, 5, 6, 7, 8, 8]));
        assert_ne!(base, checksum(&[0, 2, 3, 4, 5, 6, 7, 8, 9]));
        assert_ne!(checksum(&[0; 8]), checksum(&[0; 16]));
    }

    #[test]
    fn weight_bytes_must_match_dims() {
        assert!(Weight::owned(DType::F32, vec![2, 2], vec![0; 16]).is_ok());
        let err = Weight::owned(DType::F32, vec![2, 2], vec![0; 15]).unwrap_err();
        assert_eq!(err.0, "f32[2, 2] needs 16 bytes, data has 15");
        assert!(Weight::owned(DType::F32, vec![usize::MAX, 4], vec![]).is_err());
    }
}
