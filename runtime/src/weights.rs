//! The external weight file: a 64-byte header (magic, blob length, the blob's hash) and the blob,
//! which starts on a 64-byte boundary so that the mapped weights keep their alignment. The header
//! lets the runtime refuse a file that belongs to another model before any kernel reads it.

use crate::model::{Error, ErrorCode};
use crate::spec::ModelSpec;
use std::path::Path;

/// The first bytes of every weight file.
pub const MAGIC: &[u8; 8] = b"KILNWTS1";

/// Bytes before the blob.
pub const HEADER_BYTES: usize = 64;

/// The header of a weight file holding a blob of `len` bytes with hash `id`.
pub fn header(len: usize, id: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    header[16..24].copy_from_slice(&id.to_le_bytes());
    header
}

/// Maps a weight file and checks that it holds this model's blob.
pub fn map(path: &Path, spec: &ModelSpec) -> Result<memmap2::Mmap, Error> {
    let fail = |what: String| {
        Error::new(
            ErrorCode::Weights,
            format!("weight file {}: {what}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    // SAFETY: the file is mapped read-only; like every reader of memory-mapped files, the runtime
    // relies on it not being truncated while the model lives.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| fail(e.to_string()))?;
    if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
        return Err(fail("not a kiln weight file".into()));
    }
    let field = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
    let (len, id) = (field(8), field(16));
    if id != spec.weights_id || len != spec.weight_bytes as u64 {
        return Err(fail(format!(
            "it holds the weights of another model (hash {id:#018x}, {len} bytes; `{}` needs {:#018x}, {} bytes)",
            spec.name, spec.weights_id, spec.weight_bytes
        )));
    }
    if (map.len() - HEADER_BYTES) as u64 != len {
        return Err(fail(format!(
            "{} bytes after the header, the header says {len}",
            map.len() - HEADER_BYTES
        )));
    }
    Ok(map)
}

/// Each weight's bytes within a blob laid out as the spec says.
pub fn slices<'a>(blob: &'a [u8], spec: &ModelSpec) -> Result<Vec<&'a [u8]>, Error> {
    if blob.len() != spec.weight_bytes {
        return Err(Error::new(
            ErrorCode::Weights,
            format!(
                "the weight blob holds {} bytes, `{}` needs {}",
                blob.len(),
                spec.name,
                spec.weight_bytes
            ),
        ));
    }
    spec.weights
        .iter()
        .map(|w| {
            w.offset
                .checked_add(w.bytes)
                .and_then(|end| blob.get(w.offset..end))
                .ok_or_else(|| {
                    Error::new(
                        ErrorCode::Internal,
                        format!("weight of %{} lies outside the blob", w.node),
                    )
                })
        })
        .collect()
}
