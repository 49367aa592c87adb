//! ggml tensor types and their dequantization to f32.

use half::{bf16, f16};

/// The ggml types kiln reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32: f16 scale `d`, 16 bytes of nibbles; `w = d * (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d * q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 signed bytes; `w = d * q`.
    Q8_0,
}

const BLOCK: usize = 32;

impl GgmlType {
    pub fn from_code(code: u32) -> Option<GgmlType> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Bytes for `numel` elements, if they fill whole blocks.
    pub fn byte_size(self, numel: usize) -> Option<usize> {
        let (per_block, block_bytes) = match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (BLOCK, 18),
            GgmlType::Q4_1 => (BLOCK, 20),
            GgmlType::Q8_0 => (BLOCK, 34),
        };
        numel
            .is_multiple_of(per_block)
            .then(|| numel / per_block)
            .and_then(|blocks| blocks.checked_mul(block_bytes))
    }
}

/// Little-endian f32 bytes of `numel` elements stored as `kind` in `bytes` (whose length
/// [`GgmlType::byte_size`] has checked).
pub(crate) fn dequantize(kind: GgmlType, bytes: &[u8], numel: usize) -> Vec<u8> {
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out: Vec<f32> = Vec::with_capacity(numel);
    match kind {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| half_at(c, 0))),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = half_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let block_bytes = if kind == GgmlType::Q4_0 { 18 } else { 20 };
            for block in bytes.chunks_exact(block_bytes) {
                let d = half_at(block, 0);
                let (min, nibbles) = if kind == GgmlType::Q4_0 {
                    (-8.0 * d, &block[2..])
                } else {
                    (half_at(block, 2), &block[4..])
                };
                out.extend(nibbles.iter().map(|&b| d * f32::from(b & 0x0f) + min));
                out.extend(nibbles.iter().map(|&b| d * f32::from(b >> 4) + min));
            }
        }
    }
    out.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn q8_0_by_hand() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = f32s(&dequantize(GgmlType::Q8_0, &block, 32));
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn q4_nibble_order_and_offsets_by_hand() {
        // Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
        let nibbles: Vec<u8> = (0..16)
            .map(|j| (j as u8) | (((15 - j) as u8) << 4))
            .collect();
        let mut q4_1 = f16::from_f32(2.0).to_le_bytes().to_vec();
        q4_1.extend(f16::from_f32(-1.0).to_le_bytes());
        q4_1.extend(&nibbles);
        let out = f32s(&dequantize(GgmlType::Q4_1, &q4_1, 32));
        assert_eq!(
            (out[0], out[15], out[16], out[31]),
            (-1.0, 29.0, 29.0, -1.0)
        );
        let mut q4_0 = f16::from_f32(0.25).to_le_bytes().to_vec();
        q4_0.extend(&nibbles);
        let out = f32s(&dequantize(GgmlType::Q4_0, &q4_0, 32));
        assert_eq!((out[0], out[8], out[16]), (-2.0, 0.0, 1.75));
    }

    #[test]
    fn sizes_need_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
        assert_eq!(GgmlType::Q8_0.byte_size(33), None);
        assert_eq!(GgmlType::F16.byte_size(3), Some(6));
        assert_eq!(GgmlType::Q8_0.byte_size(usize::MAX - 31), None);
    }
}
