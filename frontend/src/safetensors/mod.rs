//! Safetensors model directories (`config.json` + `model.safetensors`, as transformers'
//! `save_pretrained` writes them): the architecture named in `config.json` picks a template that
//! builds the graph; weights stay memory-mapped.

mod bert;
mod gpt2;
pub(crate) mod llama;

use crate::build::{Builder, Result};
use crate::error::FrontendError;
use crate::shapes::InputShapes;
use kiln_ir::Graph;
use std::path::Path;

/// The architectures with a template, as `config.json` names them.
pub const ARCHITECTURES: [&str; 4] = [
    "BertModel",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "LlamaModel",
];

/// Builds the graph of the model in `dir`.
pub fn load_dir(dir: &Path, shapes: &InputShapes) -> Result<Graph> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?.ok_or_else(|| {
        FrontendError::new(dir, "no config.json: not a safetensors model directory")
    })?;
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        let message = if dir.join("model.safetensors.index.json").exists() {
            "sharded checkpoints (model.safetensors.index.json) are not supported yet"
        } else {
            "no model.safetensors"
        };
        return Err(FrontendError::new(dir, message));
    }
    let weights = kiln_ir::map_safetensors(&weights_path)
        .map_err(|e| FrontendError::new(&weights_path, e.0))?;
    let architecture = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("(none)")
        .to_string();
    let mut builder = Builder::new(&architecture, &weights_path, weights);
    builder.set_weights_file(&weights_path);
    match architecture.as_str() {
        "BertModel" => bert::build(&mut builder, &config, &config_path, dir, shapes)?,
        "GPT2LMHeadModel" => gpt2::build(&mut builder, &config, &config_path, shapes)?,
        "LlamaForCausalLM" | "LlamaModel" => llama::build(
            &mut builder,
            &config,
            &config_path,
            shapes,
            architecture == "LlamaForCausalLM",
        )?,
        other => {
            return Err(FrontendError::new(
                &config_path,
                format!(
                    "architecture `{other}` has no template (supported: {})",
                    ARCHITECTURES.join(", ")
                ),
            ))
        }
    }
    let unknown: Vec<&str> = shapes
        .names()
        .filter(|name| {
            builder
                .graph()
                .find(name)
                .is_none_or(|id| !builder.graph().inputs().contains(&id))
        })
        .collect();
    if !unknown.is_empty() {
        return Err(FrontendError::new(
            dir,
            format!("--shape names unknown inputs: {}", unknown.join(", ")),
        ));
    }
    Ok(builder.finish())
}

/// Parses a JSON file; `Ok(None)` if it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FrontendError::new(path, e.to_string())),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FrontendError::new(path, format!("invalid JSON: {e}"))),
    }
}
