//! transformers' `GPT2LMHeadModel`: learned positions, pre-norm blocks, the fused `c_attn`
//! projection split into q, k, v, causal attention, tanh GELU, and the LM head tied to the token
//! embedding. `Conv1D` weights are stored `[in, out]`, so they multiply without a transpose.
//!
//! Input `input_ids` (i64 `[batch, seq]`, positions `0..seq`); output `logits`
//! (f32 `[batch, seq, vocab]`).

use crate::build::{config_usize, Builder, Mask, Result, Scale};
use crate::FrontendError;
use kiln_ir::ops::{BinaryOp, UnaryOp};
use kiln_ir::{DType, Dim, NodeId, Op};
use serde_json::Value;
use std::path::Path;

struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    inner: usize,
    positions: usize,
    vocab: usize,
    eps: f32,
    activation: UnaryOp,
}

fn read_config(config: &Value, path: &Path) -> Result<Config> {
    let usize_of = |key| config_usize(config, key, path);
    let hidden = usize_of("n_embd")?;
    let heads = usize_of("n_head")?;
    if !hidden.is_multiple_of(heads) {
        return Err(FrontendError::new(
            path,
            format!("n_embd {hidden} is not a multiple of n_head {heads}"),
        ));
    }
    let activation = match config
        .get("activation_function")
        .and_then(Value::as_str)
        .unwrap_or("gelu_new")
    {
        "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
        "gelu" => UnaryOp::Gelu,
        "relu" => UnaryOp::Relu,
        other => {
            return Err(FrontendError::new(
                path,
                format!("`activation_function` `{other}` is not supported"),
            ))
        }
    };
    for key in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if config.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(FrontendError::new(
                path,
                format!("`{key}: true` is not supported"),
            ));
        }
    }
    if config.get("scale_attn_weights").and_then(Value::as_bool) == Some(false) {
        return Err(FrontendError::new(
            path,
            "`scale_attn_weights: false` is not supported",
        ));
    }
    Ok(Config {
        hidden,
        heads,
        layers: usize_of("n_layer")?,
        inner: match config.get("n_inner") {
            Some(v) if !v.is_null() => usize_of("n_inner")?,
            _ => 4 * hidden,
        },
        positions: usize_of("n_positions")?,
        vocab: usize_of("vocab_size")?,
        eps: config
            .get("layer_norm_epsilon")
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32,
        activation,
    })
}

pub(super) fn build(
    b: &mut Builder,
    config: &Value,
    config_path: &Path,
    shapes: &crate::InputShapes,
) -> Result<()> {
    let c = read_config(config, config_path)?;
    let p = if b.has_weight("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let [batch, seq] = b.token_dims(shapes, "input_ids", 16, c.positions)?;
    let input_ids = b.input("input_ids", DType::I64, &[batch.clone(), seq.clone()])?;
    let wte = b.weight_with_dims(&format!("{p}wte.weight"), &[c.vocab, c.hidden])?;
    let wpe = b.weight_with_dims(&format!("{p}wpe.weight"), &[c.positions, c.hidden])?;
    let tokens = b.op("wte", Op::Gather { axis: 0 }, &[wte, input_ids])?;
    let position_ids = b.range("position_ids", seq.clone())?;
    let positions = b.op("wpe", Op::Gather { axis: 0 }, &[wpe, position_ids])?;
    let mut x = b.binary("embeddings", BinaryOp::Add, tokens, positions)?;
    let causal = b.causal_mask(&seq)?;
    for layer in 0..c.layers {
        x = block(b, &c, &format!("{p}h.{layer}"), x, causal, &batch, &seq)?;
    }
    let x = b.layer_norm(&format!("{p}ln_f"), x, c.hidden, c.eps)?;
    let head = if b.has_weight("lm_head.weight") {
        "lm_head.weight".to_string()
    } else {
        format!("{p}wte.weight")
    };
    let head = b.weight_with_dims(&head, &[c.vocab, c.hidden])?;
    let head_t = b.transpose("lm_head.weight_t", head, &[1, 0])?;
    let logits = b.op("lm_head", Op::MatMul, &[x, head_t])?;
    b.output("logits", logits)
}

/// `x @ W + b` for a GPT-2 `Conv1D` stored `[in, out]`.
fn conv1d(b: &mut Builder, prefix: &str, x: NodeId, dims: [usize; 2]) -> Result<NodeId> {
    let w = b.weight_with_dims(&format!("{prefix}.weight"), &dims)?;
    let product = b.op(&format!("{prefix}.matmul"), Op::MatMul, &[x, w])?;
    let bias = b.weight_with_dims(&format!("{prefix}.bias"), &dims[1..])?;
    b.binary(prefix, BinaryOp::Add, product, bias)
}

fn block(
    b: &mut Builder,
    c: &Config,
    p: &str,
    x: NodeId,
    causal: NodeId,
    batch: &Dim,
    seq: &Dim,
) -> Result<NodeId> {
    let head_dim = c.hidden / c.heads;
    let h = b.layer_norm(&format!("{p}.ln_1"), x, c.hidden, c.eps)?;
    let qkv = conv1d(b, &format!("{p}.attn.c_attn"), h, [c.hidden, 3 * c.hidden])?;
    let mut parts = Vec::new();
    for (i, name) in ["q", "k", "v"].iter().enumerate() {
        let (start, end) = ((i * c.hidden) as i64, ((i + 1) * c.hidden) as i64);
        let op = Op::Slice {
            axis: -1,
            start: Dim::Const(start),
            end: Dim::Const(end),
            step: 1,
        };
        let part = b.op(&format!("{p}.attn.{name}"), op, &[qkv])?;
        parts.push(b.split_heads(
            &format!("{p}.attn.{name}_heads"),
            part,
            batch,
            seq,
            c.heads,
            head_dim,
        )?);
    }
    let context = b.attention(
        &format!("{p}.attn"),
        [parts[0], parts[1], parts[2]],
        Scale::DivideBySqrt(head_dim),
        Mask::Keep(causal),
    )?;
    let context = b.merge_heads(&format!("{p}.attn.merged"), context, batch, seq, c.hidden)?;
    let attended = conv1d(
        b,
        &format!("{p}.attn.c_proj"),
        context,
        [c.hidden, c.hidden],
    )?;
    let x = b.binary(
        &format!("{p}.attention_residual"),
        BinaryOp::Add,
        x,
        attended,
    )?;
    let h = b.layer_norm(&format!("{p}.ln_2"), x, c.hidden, c.eps)?;
    let up = conv1d(b, &format!("{p}.mlp.c_fc"), h, [c.hidden, c.inner])?;
    let act = b.unary(&format!("{p}.mlp.act"), c.activation, up)?;
    let down = conv1d(b, &format!("{p}.mlp.c_proj"), act, [c.inner, c.hidden])?;
    b.binary(&format!("{p}.mlp_residual"), BinaryOp::Add, x, down)
}
