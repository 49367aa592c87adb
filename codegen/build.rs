//! Builds kiln-runtime as a static library for linking compiled models, with a cargo of its own
//! in a target directory under OUT_DIR (a nested build in the outer target directory would wait
//! on the outer build's lock). The library is embedded in kiln-codegen, so a `kiln` binary links
//! artifacts wherever it is installed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("codegen/ lies in the workspace");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("runtime");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "rustc",
            "--offline",
            "--release",
            "--package",
            "kiln-runtime",
            "--lib",
            "--crate-type",
            "staticlib",
            "--target-dir",
        ])
        .arg(&target_dir)
        .args(["--", "--print", "native-static-libs"])
        .output()
        .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!("building the kiln-runtime static library failed:\n{stderr}");
    }
    let native_libs = stderr
        .lines()
        .find_map(|line| {
            line.split_once("native-static-libs: ")
                .map(|(_, libs)| libs.trim())
        })
        .unwrap_or("-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc");
    let library = target_dir.join("release").join("libkiln_runtime.a");
    println!(
        "cargo:rustc-env=KILN_RUNTIME_STATICLIB={}",
        library.display()
    );
    println!("cargo:rustc-env=KILN_RUNTIME_NATIVE_LIBS={native_libs}");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("runtime").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
}
