//! Locating the fixture references and fetched models, and comparing outputs against them: shared
//! by the reader parity tests here and the JIT parity tests in `codegen/tests/fixtures.rs`.

use kiln_frontend::InputShapes;
use kiln_ir::Tensor;
use std::path::{Path, PathBuf};

/// `../shared/fixtures`, beside the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// A model fetched by `scripts/fetch-models.sh`; a missing one fails the test.
pub fn model(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    path
}

/// Input shapes from `--shape`-style arguments.
pub fn shapes(args: &[&str]) -> InputShapes {
    let mut shapes = InputShapes::new();
    for arg in args {
        shapes.parse_arg(arg).unwrap();
    }
    shapes
}

/// Max abs difference over every element.
pub fn max_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.shape(), expected.shape());
    assert_eq!(actual.dtype(), expected.dtype());
    let (a, e) = (actual.to_f64s(), expected.to_f64s());
    a.iter()
        .zip(&e)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f64::max)
}

/// Max abs difference over tokens whose mask is 1; `[batch, seq, width]` against `[batch, seq]`.
pub fn max_diff_valid_tokens(actual: &Tensor, expected: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(actual.shape(), expected.shape());
    let width = actual.shape()[2];
    let (a, e) = (actual.to_f64s(), expected.to_f64s());
    a.chunks(width)
        .zip(e.chunks(width))
        .zip(mask.to_i64s())
        .filter(|(_, m)| *m == 1)
        .flat_map(|((a, e), _)| a.iter().zip(e).map(|(a, e)| (a - e).abs()))
        .fold(0.0, f64::max)
}
