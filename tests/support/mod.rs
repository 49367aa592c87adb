//! What the command-line tests share: the shipped example and a way to run `kiln`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A file of the shipped attention-block example.
pub fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/attention_block")
        .join(file)
}

/// Runs the `kiln` binary built for these tests.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}
