//! Writes the weights and sample inputs of `attention_block.kir` (deterministic):
//! `cargo run --example attention_block`. The `.kir` file pins every weight by checksum, so a
//! changed generator shows up as a load error, not as silently different numbers.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

const HIDDEN: usize = 16;

/// A linear congruential generator: reproducible without a crate.
struct Lcg(u64);

impl Lcg {
    /// An integer in `-range..=range`.
    fn next(&mut self, range: i64) -> i64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % (2 * range as u64 + 1)) as i64 - range
    }

    /// Multiples of 1/64 in [-0.25, 0.25], exact in f32 and short in text.
    fn weights(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next(16) as f32 / 64.0).collect()
    }
}

fn write(path: &Path, tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> std::io::Result<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes).expect("sizes match");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
    std::fs::write(path, bytes)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/attention_block");
    let mut rng = Lcg(2026);
    let mut weights = Vec::new();
    for layer in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        let weight = f32_bytes(&rng.weights(HIDDEN * HIDDEN));
        weights.push((
            format!("{layer}.weight"),
            Dtype::F32,
            vec![HIDDEN, HIDDEN],
            weight,
        ));
        weights.push((
            format!("{layer}.bias"),
            Dtype::F32,
            vec![HIDDEN],
            f32_bytes(&rng.weights(HIDDEN)),
        ));
    }
    write(&dir.join("attention_block.safetensors"), weights)?;

    let (batch, seq) = (2, 5);
    let x: Vec<f32> = (0..batch * seq * HIDDEN)
        .map(|_| rng.next(16) as f32 / 16.0)
        .collect();
    let mask: Vec<i64> = (0..batch * seq)
        .map(|i| i64::from(i < seq || i % seq < 3))
        .collect();
    let mask_bytes = mask.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(
        &dir.join("inputs.safetensors"),
        vec![
            (
                "x".to_string(),
                Dtype::F32,
                vec![batch, seq, HIDDEN],
                f32_bytes(&x),
            ),
            (
                "attention_mask".to_string(),
                Dtype::I64,
                vec![batch, seq],
                mask_bytes,
            ),
        ],
    )
}
