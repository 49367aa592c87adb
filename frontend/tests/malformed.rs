//! Malformed model files get errors naming the file and what is wrong: never a panic, never a
//! huge allocation.

use kiln_frontend::{load, InputShapes};
use std::path::Path;

fn load_error(path: &Path) -> String {
    match load(path, &InputShapes::new()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// A GGUF writer for hand-made test files.
struct Gguf(Vec<u8>);

impl Gguf {
    fn new(version: u32, tensors: u64, kvs: u64) -> Gguf {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(tensors.to_le_bytes());
        bytes.extend(kvs.to_le_bytes());
        Gguf(bytes)
    }

    fn string(mut self, s: &[u8]) -> Gguf {
        self.0.extend((s.len() as u64).to_le_bytes());
        self.0.extend(s);
        self
    }

    fn byte(mut self, b: u8) -> Gguf {
        self.0.push(b);
        self
    }

    fn u32(mut self, v: u32) -> Gguf {
        self.0.extend(v.to_le_bytes());
        self
    }

    fn u64(mut self, v: u64) -> Gguf {
        self.0.extend(v.to_le_bytes());
        self
    }

    fn kv_str(self, key: &str, value: &str) -> Gguf {
        self.string(key.as_bytes()).u32(8).string(value.as_bytes())
    }

    /// A tensor info: name, dims (GGUF order), type, offset.
    fn tensor(self, name: &[u8], dims: &[u64], kind: u32, offset: u64) -> Gguf {
        let mut g = self.string(name).u32(dims.len() as u32);
        for &d in dims {
            g = g.u64(d);
        }
        g.u32(kind).u64(offset)
    }

    fn pad_and_data(mut self, data: &[u8]) -> Gguf {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend(data);
        self
    }

    fn write(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.0).unwrap();
        path
    }
}

#[test]
fn malformed_gguf_files_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: Vec<(&str, Gguf, &str)> = vec![
        (
            "magic.gguf",
            Gguf(b"GGML\x03\0\0\0".to_vec()),
            "not a GGUF file",
        ),
        (
            "empty.gguf",
            Gguf(Vec::new()),
            "truncated: magic needs 4 bytes",
        ),
        (
            "version.gguf",
            Gguf::new(7, 0, 0),
            "GGUF version 7 is not supported",
        ),
        (
            "count.gguf",
            Gguf::new(3, u64::MAX, 0),
            "tensor count is 18446744073709551615, more than any model has",
        ),
        (
            "truncated-kv.gguf",
            Gguf::new(3, 0, 1).string(b"general.architecture"),
            "truncated: type of metadata `general.architecture`",
        ),
        (
            "lying-string.gguf",
            Gguf::new(3, 0, 1).string(b"key").u32(8).u64(1 << 40),
            "truncated: metadata `key` needs 1099511627776 bytes",
        ),
        (
            "lying-array.gguf",
            Gguf::new(3, 0, 1).string(b"key").u32(9).u32(4).u64(1 << 60),
            "array of 1152921504606846976 elements does not fit",
        ),
        (
            "bad-type.gguf",
            Gguf::new(3, 0, 1).string(b"key").u32(99),
            "metadata `key` has unknown value type 99",
        ),
        (
            "utf8.gguf",
            Gguf::new(3, 0, 1).string(b"k\xffy"),
            "metadata key at offset 32 is not UTF-8",
        ),
        (
            "bad-bool.gguf",
            Gguf::new(3, 0, 1).string(b"key").u32(7).byte(2),
            "bool byte is 2",
        ),
        (
            "rank.gguf",
            Gguf::new(3, 1, 0).string(b"t").u32(0),
            "tensor `t` has 0 dims",
        ),
        (
            "absurd-dims.gguf",
            Gguf::new(3, 1, 0).tensor(b"t", &[1 << 40, 1 << 40], 0, 0),
            "tensor `t` dims [1099511627776, 1099511627776] overflow",
        ),
        (
            "beyond.gguf",
            Gguf::new(3, 1, 0)
                .tensor(b"t", &[4, 4], 0, 0)
                .pad_and_data(&[0; 8]),
            "lies beyond the end of the file",
        ),
        (
            "offset.gguf",
            Gguf::new(3, 1, 0)
                .tensor(b"t", &[1], 0, 1 << 62)
                .pad_and_data(&[0; 4]),
            "lies beyond the end of the file",
        ),
        (
            "blocks.gguf",
            Gguf::new(3, 1, 0)
                .tensor(b"t", &[33], 8, 0)
                .pad_and_data(&[0; 64]),
            "33 elements are not whole Q8_0 blocks",
        ),
        (
            "ggml-type.gguf",
            Gguf::new(3, 1, 0).tensor(b"t", &[32], 12, 0),
            "unsupported ggml type 12",
        ),
        (
            "arch.gguf",
            Gguf::new(3, 0, 1).kv_str("general.architecture", "mamba"),
            "architecture `mamba` is not supported",
        ),
        (
            "no-arch.gguf",
            Gguf::new(3, 0, 0),
            "metadata `general.architecture` is missing",
        ),
        (
            "no-params.gguf",
            Gguf::new(3, 0, 1).kv_str("general.architecture", "llama"),
            "metadata `llama.embedding_length` is missing",
        ),
    ];
    for (name, file, expected) in cases {
        let path = file.write(d, name);
        let error = load_error(&path);
        assert!(
            error.starts_with(&path.display().to_string()),
            "{name}: {error}"
        );
        assert!(
            error.contains(expected),
            "{name}: expected `{expected}` in `{error}`"
        );
    }
}

#[test]
fn malformed_safetensors_directories_are_rejected_with_clear_errors() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-bert");
    let config = std::fs::read_to_string(fixture.join("config.json")).unwrap();
    let weights = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let setup = |config: &str, weights: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
        dir
    };
    let check = |dir: &tempfile::TempDir, expected: &str| {
        let error = load_error(dir.path());
        assert!(
            error.contains(expected),
            "expected `{expected}` in `{error}`"
        );
    };
    check(&setup("{not json", &weights), "config.json: invalid JSON");
    check(
        &setup(&config.replace("BertModel", "T5Model"), &weights),
        "architecture `T5Model` has no template",
    );
    check(
        &setup(
            &config.replace("\"hidden_size\": 64", "\"hidden_size\": 65"),
            &weights,
        ),
        "hidden_size 65 is not a multiple of num_attention_heads 4",
    );
    check(&setup(&config.replace("\"intermediate_size\": 256", "\"intermediate_size\": 128"), &weights), "tensor `encoder.layer.0.intermediate.dense.weight` has dims [256, 64], the config implies [128, 64]");
    check(
        &setup(
            &config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
            &weights,
        ),
        "tensor `encoder.layer.2.attention.self.query.weight` is missing",
    );
    check(
        &setup(
            &config.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swish\""),
            &weights,
        ),
        "`hidden_act` `swish` is not supported",
    );
    check(
        &setup(&config.replace("\"num_attention_heads\": 4,", ""), &weights),
        "`num_attention_heads` is missing",
    );
    check(
        &setup(&config, &weights[..weights.len() / 2]),
        "model.safetensors",
    );
    check(
        &setup(&config, b"\x08\0\0\0\0\0\0\0{\"a\":1}"),
        "model.safetensors",
    );
    let empty = tempfile::tempdir().unwrap();
    check(&empty, "no config.json");
}

#[test]
fn shape_requests_are_checked() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-llama");
    let mut shapes = InputShapes::new();
    shapes.parse_arg("input_ids=1x4096").unwrap();
    let error = load(&fixture, &shapes).err().unwrap().to_string();
    assert!(
        error.contains("seq 4096 exceeds the model's 128 positions"),
        "{error}"
    );
    let mut shapes = InputShapes::new();
    shapes.parse_arg("pixels=1x3").unwrap();
    let error = load(&fixture, &shapes).err().unwrap().to_string();
    assert!(
        error.contains("--shape names unknown inputs: pixels"),
        "{error}"
    );
    let mut shapes = InputShapes::new();
    shapes.parse_arg("input_ids=2x16").unwrap();
    let graph = load(&fixture, &shapes).unwrap();
    assert!(graph.symbols().is_empty());
    assert_eq!(
        graph.node(graph.outputs()[0].1).ty.to_string(),
        "f32[2, 16, 256]"
    );
}
