//! The examples run as their READMEs say: the C program and the Python script each embed the
//! fixture's sentences through a kiln-compiled all-MiniLM-L6-v2 and match the reference.

use std::path::Path;
use std::process::Command;

fn run_example(script: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(root.join(script))
        .env("KILN", env!("CARGO_BIN_EXE_kiln"))
        .env("OUT", out.path().join("minilm"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cosines: Vec<f64> = stdout
        .lines()
        .filter_map(|line| line.rsplit_once("cosine with the reference "))
        .map(|(_, value)| value.parse().unwrap())
        .collect();
    assert_eq!(cosines.len(), 6, "{stdout}");
    assert!(cosines.iter().all(|&c| c > 0.99999), "{stdout}");
}

#[test]
fn c_example_embeds_the_fixture_sentences() {
    run_example("examples/c/run.sh");
}

#[test]
fn python_example_embeds_the_fixture_sentences() {
    run_example("examples/python/run.sh");
}
