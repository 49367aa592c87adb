//! transformers' `BertModel` (eager attention), plus sentence-transformers mean pooling and
//! L2 normalization when the model directory declares them (`modules.json`).
//!
//! Inputs `input_ids`, `attention_mask`, `token_type_ids` (i64 `[batch, seq]`); outputs
//! `last_hidden_state` (f32 `[batch, seq, hidden]`) and, when pooled, `sentence_embedding`
//! (f32 `[batch, hidden]`).

use super::read_json;
use crate::build::{config_f64, config_usize, Builder, Mask, Result, Scale};
use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{DType, Dim, NodeId, Op};
use serde_json::Value;
use std::path::Path;

struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    eps: f32,
    activation: UnaryOp,
    max_positions: usize,
    vocab: usize,
    type_vocab: usize,
}

fn read_config(config: &Value, path: &Path) -> Result<Config> {
    let usize_of = |key| config_usize(config, key, path);
    let activation = match config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu")
    {
        "gelu" => UnaryOp::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
        "relu" => UnaryOp::Relu,
        other => {
            return Err(crate::FrontendError::new(
                path,
                format!("`hidden_act` `{other}` is not supported"),
            ))
        }
    };
    let position_kind = config
        .get("position_embedding_type")
        .and_then(Value::as_str)
        .unwrap_or("absolute");
    if position_kind != "absolute" {
        return Err(crate::FrontendError::new(
            path,
            format!("`position_embedding_type` `{position_kind}` is not supported"),
        ));
    }
    let config = Config {
        hidden: usize_of("hidden_size")?,
        heads: usize_of("num_attention_heads")?,
        layers: usize_of("num_hidden_layers")?,
        intermediate: usize_of("intermediate_size")?,
        eps: config_f64(config, "layer_norm_eps", path)? as f32,
        activation,
        max_positions: usize_of("max_position_embeddings")?,
        vocab: usize_of("vocab_size")?,
        type_vocab: usize_of("type_vocab_size")?,
    };
    if !config.hidden.is_multiple_of(config.heads) {
        return Err(crate::FrontendError::new(
            path,
            format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden, config.heads
            ),
        ));
    }
    Ok(config)
}

/// Whether `modules.json` chains mean pooling and normalization after the transformer.
fn sentence_pooling(dir: &Path) -> Result<bool> {
    let Some(modules) = read_json(&dir.join("modules.json"))? else {
        return Ok(false);
    };
    let types: Vec<&str> = modules
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|module| module.get("type").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let pooling = types.contains(&"sentence_transformers.models.Pooling");
    let normalize = types.contains(&"sentence_transformers.models.Normalize");
    if !pooling {
        return Ok(false);
    }
    let pooling_path = dir.join("1_Pooling/config.json");
    let pooling_config = read_json(&pooling_path)?.ok_or_else(|| {
        crate::FrontendError::new(
            dir,
            "modules.json names a Pooling module but 1_Pooling/config.json is missing",
        )
    })?;
    let mean = pooling_config
        .get("pooling_mode_mean_tokens")
        .and_then(Value::as_bool)
        == Some(true);
    let others = [
        "pooling_mode_cls_token",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
    ]
    .iter()
    .any(|key| pooling_config.get(key).and_then(Value::as_bool) == Some(true));
    if !mean || others || !normalize {
        return Err(crate::FrontendError::new(
            &pooling_path,
            "only mean pooling followed by Normalize is supported",
        ));
    }
    Ok(true)
}

pub(super) fn build(
    b: &mut Builder,
    config: &Value,
    config_path: &Path,
    dir: &Path,
    shapes: &crate::InputShapes,
) -> Result<()> {
    let c = read_config(config, config_path)?;
    let prefix = if b.has_weight("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    };
    let [batch, seq] = b.token_dims(shapes, "input_ids", 64, c.max_positions)?;
    let tokens = [batch.clone(), seq.clone()];
    let input_ids = b.input("input_ids", DType::I64, &tokens)?;
    let attention_mask = b.input("attention_mask", DType::I64, &tokens)?;
    let token_type_ids = b.input("token_type_ids", DType::I64, &tokens)?;

    let emb = format!("{prefix}embeddings");
    let word_table = b.weight_with_dims(
        &format!("{emb}.word_embeddings.weight"),
        &[c.vocab, c.hidden],
    )?;
    let type_table = b.weight_with_dims(
        &format!("{emb}.token_type_embeddings.weight"),
        &[c.type_vocab, c.hidden],
    )?;
    let position_table = b.weight_with_dims(
        &format!("{emb}.position_embeddings.weight"),
        &[c.max_positions, c.hidden],
    )?;
    let words = b.op(
        &format!("{emb}.word_embeddings"),
        Op::Gather { axis: 0 },
        &[word_table, input_ids],
    )?;
    let types = b.op(
        &format!("{emb}.token_type_embeddings"),
        Op::Gather { axis: 0 },
        &[type_table, token_type_ids],
    )?;
    let position_ids = b.range("position_ids", seq.clone())?;
    let positions = b.op(
        &format!("{emb}.position_embeddings"),
        Op::Gather { axis: 0 },
        &[position_table, position_ids],
    )?;
    let sum = b.binary(&format!("{emb}.add_types"), BinaryOp::Add, words, types)?;
    let sum = b.binary(
        &format!("{emb}.add_positions"),
        BinaryOp::Add,
        sum,
        positions,
    )?;
    let mut hidden = b.layer_norm(&format!("{emb}.LayerNorm"), sum, c.hidden, c.eps)?;

    let mask_bias = additive_padding_mask(b, attention_mask, &batch, &seq)?;
    for layer in 0..c.layers {
        hidden = encoder_layer(
            b,
            &c,
            &format!("{prefix}encoder.layer.{layer}"),
            hidden,
            mask_bias,
            &batch,
            &seq,
        )?;
    }
    b.output("last_hidden_state", hidden)?;
    if sentence_pooling(dir)? {
        let embedding = mean_pool_normalize(b, hidden, attention_mask, &batch, &seq)?;
        b.output("sentence_embedding", embedding)?;
    }
    Ok(())
}

/// `(1 - mask) * f32::MIN` as `[batch, 1, 1, seq]`, transformers' extended attention mask.
fn additive_padding_mask(b: &mut Builder, mask: NodeId, batch: &Dim, seq: &Dim) -> Result<NodeId> {
    let rows = b.reshape(
        "extended_attention_mask.rows",
        mask,
        &[batch.clone(), 1usize.into(), 1usize.into(), seq.clone()],
    )?;
    let as_float = b.cast("extended_attention_mask.float", rows, DType::F32)?;
    let one = b.scalar("one", 1.0)?;
    let inverted = b.binary(
        "extended_attention_mask.inverted",
        BinaryOp::Sub,
        one,
        as_float,
    )?;
    let min = b.scalar("f32_min", f32::MIN)?;
    b.binary("extended_attention_mask", BinaryOp::Mul, inverted, min)
}

fn encoder_layer(
    b: &mut Builder,
    c: &Config,
    p: &str,
    x: NodeId,
    mask_bias: NodeId,
    batch: &Dim,
    seq: &Dim,
) -> Result<NodeId> {
    let head_dim = c.hidden / c.heads;
    let square = [c.hidden, c.hidden];
    let q = linear(b, &format!("{p}.attention.self.query"), x, square)?;
    let k = linear(b, &format!("{p}.attention.self.key"), x, square)?;
    let v = linear(b, &format!("{p}.attention.self.value"), x, square)?;
    let q = b.split_heads(
        &format!("{p}.attention.self.query_heads"),
        q,
        batch,
        seq,
        c.heads,
        head_dim,
    )?;
    let k = b.split_heads(
        &format!("{p}.attention.self.key_heads"),
        k,
        batch,
        seq,
        c.heads,
        head_dim,
    )?;
    let v = b.split_heads(
        &format!("{p}.attention.self.value_heads"),
        v,
        batch,
        seq,
        c.heads,
        head_dim,
    )?;
    let context = b.attention(
        &format!("{p}.attention.self"),
        [q, k, v],
        Scale::DivideBySqrt(head_dim),
        Mask::Additive(mask_bias),
    )?;
    let context = b.merge_heads(
        &format!("{p}.attention.self.merged"),
        context,
        batch,
        seq,
        c.hidden,
    )?;
    let attended = linear(b, &format!("{p}.attention.output.dense"), context, square)?;
    let residual = b.binary(
        &format!("{p}.attention.output.residual"),
        BinaryOp::Add,
        attended,
        x,
    )?;
    let h = b.layer_norm(
        &format!("{p}.attention.output.LayerNorm"),
        residual,
        c.hidden,
        c.eps,
    )?;
    let up = linear(
        b,
        &format!("{p}.intermediate.dense"),
        h,
        [c.intermediate, c.hidden],
    )?;
    let act = b.unary(&format!("{p}.intermediate.act"), c.activation, up)?;
    let down = linear(
        b,
        &format!("{p}.output.dense"),
        act,
        [c.hidden, c.intermediate],
    )?;
    let residual = b.binary(&format!("{p}.output.residual"), BinaryOp::Add, down, h)?;
    b.layer_norm(&format!("{p}.output.LayerNorm"), residual, c.hidden, c.eps)
}

/// A `Linear` with bias named `prefix` (weights `{prefix}.weight`, `{prefix}.bias`).
fn linear(b: &mut Builder, prefix: &str, x: NodeId, dims: [usize; 2]) -> Result<NodeId> {
    b.linear(
        prefix,
        &format!("{prefix}.weight"),
        Some(&format!("{prefix}.bias")),
        x,
        dims,
    )
}

/// sentence-transformers: mean over tokens where the mask is 1 (count clamped at 1e-9), then
/// L2 normalization (norm clamped at 1e-12).
fn mean_pool_normalize(
    b: &mut Builder,
    hidden: NodeId,
    mask: NodeId,
    batch: &Dim,
    seq: &Dim,
) -> Result<NodeId> {
    let column = b.reshape(
        "pooling.mask",
        mask,
        &[batch.clone(), seq.clone(), 1usize.into()],
    )?;
    let weights = b.cast("pooling.mask_float", column, DType::F32)?;
    let masked = b.binary("pooling.masked", BinaryOp::Mul, hidden, weights)?;
    let summed = b.reduce("pooling.sum", ReduceOp::Sum, masked, &[1], false)?;
    let count = b.reduce("pooling.count", ReduceOp::Sum, weights, &[1], false)?;
    let floor = b.scalar("pooling.min_count", 1e-9)?;
    let count = b.binary("pooling.count_clamped", BinaryOp::Max, count, floor)?;
    let mean = b.binary("pooling.mean", BinaryOp::Div, summed, count)?;
    let squares = b.binary("normalize.squares", BinaryOp::Mul, mean, mean)?;
    let sum_squares = b.reduce("normalize.sum_squares", ReduceOp::Sum, squares, &[-1], true)?;
    let norm = b.unary("normalize.norm", UnaryOp::Sqrt, sum_squares)?;
    let floor = b.scalar("normalize.min_norm", 1e-12)?;
    let norm = b.binary("normalize.norm_clamped", BinaryOp::Max, norm, floor)?;
    b.binary("sentence_embedding", BinaryOp::Div, mean, norm)
}
