//! transformers' `LlamaForCausalLM` / `LlamaModel`: RMSNorm, rotary embeddings (the
//! `rotate_half` convention), grouped-query attention with a causal mask, SwiGLU, and a tied or
//! untied LM head.
//!
//! Input `input_ids` (i64 `[batch, seq]`, positions `0..seq`); output `logits`
//! (f32 `[batch, seq, vocab]`), or `last_hidden_state` for `LlamaModel`.

use crate::build::{config_f64, config_usize, Builder, Mask, Result, Scale};
use crate::FrontendError;
use kiln_ir::ops::{BinaryOp, UnaryOp};
use kiln_ir::{DType, Dim, NodeId, Op, F32};
use serde_json::Value;
use std::path::Path;

/// The LLaMA hyper-parameters, shared with the GGUF reader.
pub(crate) struct LlamaConfig {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub eps: f32,
    pub rope_theta: f64,
    pub max_positions: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
}

fn read_config(config: &Value, path: &Path) -> Result<LlamaConfig> {
    let usize_of = |key| config_usize(config, key, path);
    let hidden = usize_of("hidden_size")?;
    let heads = usize_of("num_attention_heads")?;
    let kv_heads = config
        .get("num_key_value_heads")
        .map_or(Ok(heads), |_| usize_of("num_key_value_heads"))?;
    let head_dim = config
        .get("head_dim")
        .map_or(Ok(hidden / heads), |_| usize_of("head_dim"))?;
    let rope_theta = match config.get("rope_parameters") {
        Some(params) => {
            let kind = params
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(FrontendError::new(
                    path,
                    format!("rope_type `{kind}` is not supported"),
                ));
            }
            config_f64(params, "rope_theta", path)?
        }
        None => config
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
    };
    if config.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err(FrontendError::new(path, "`rope_scaling` is not supported"));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if config.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(FrontendError::new(
                path,
                format!("`{key}: true` is not supported"),
            ));
        }
    }
    if let Some(act) = config
        .get("hidden_act")
        .and_then(Value::as_str)
        .filter(|a| *a != "silu")
    {
        return Err(FrontendError::new(
            path,
            format!("`hidden_act` `{act}` is not supported (LLaMA uses silu)"),
        ));
    }
    let c = LlamaConfig {
        hidden,
        heads,
        kv_heads,
        head_dim,
        layers: usize_of("num_hidden_layers")?,
        intermediate: usize_of("intermediate_size")?,
        eps: config_f64(config, "rms_norm_eps", path)? as f32,
        rope_theta,
        max_positions: usize_of("max_position_embeddings")?,
        vocab: usize_of("vocab_size")?,
        tied_embeddings: config
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    if !c.heads.is_multiple_of(c.kv_heads) || !c.head_dim.is_multiple_of(2) {
        return Err(FrontendError::new(
            path,
            format!(
                "{} heads over {} key/value heads of dim {} is not a valid LLaMA layout",
                c.heads, c.kv_heads, c.head_dim
            ),
        ));
    }
    Ok(c)
}

pub(super) fn build(
    b: &mut Builder,
    config: &Value,
    config_path: &Path,
    shapes: &crate::InputShapes,
    with_head: bool,
) -> Result<()> {
    let c = read_config(config, config_path)?;
    let names = WeightNames::transformers();
    build_decoder(b, &c, &names, shapes, with_head)
}

/// Where a LLaMA checkpoint keeps each weight.
pub(crate) struct WeightNames {
    pub embed: String,
    pub final_norm: String,
    pub head: String,
    /// Per-layer weight names given the layer index and the HF module path suffix
    /// (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...).
    pub layer: fn(usize, &str) -> String,
}

impl WeightNames {
    fn transformers() -> WeightNames {
        WeightNames {
            embed: "model.embed_tokens.weight".into(),
            final_norm: "model.norm.weight".into(),
            head: "lm_head.weight".into(),
            layer: |i, module| format!("model.layers.{i}.{module}.weight"),
        }
    }
}

pub(crate) fn build_decoder(
    b: &mut Builder,
    c: &LlamaConfig,
    names: &WeightNames,
    shapes: &crate::InputShapes,
    with_head: bool,
) -> Result<()> {
    let [batch, seq] = b.token_dims(shapes, "input_ids", 16, c.max_positions)?;
    let input_ids = b.input("input_ids", DType::I64, &[batch.clone(), seq.clone()])?;
    let table = b.weight_with_dims(&names.embed, &[c.vocab, c.hidden])?;
    let mut x = b.op("embed_tokens", Op::Gather { axis: 0 }, &[table, input_ids])?;
    let rotary = Rotary::build(b, c, &seq)?;
    let causal = b.causal_mask(&seq)?;
    for layer in 0..c.layers {
        x = decoder_layer(b, c, names, layer, x, &rotary, causal, &batch, &seq)?;
    }
    let norm = b.weight_with_dims(&names.final_norm, &[c.hidden])?;
    let x = b.op("norm", Op::RmsNorm { eps: F32(c.eps) }, &[x, norm])?;
    if !with_head {
        return b.output("last_hidden_state", x);
    }
    let head_name = if c.tied_embeddings || !b.has_weight(&names.head) {
        &names.embed
    } else {
        &names.head
    };
    let head = b.weight_with_dims(head_name, &[c.vocab, c.hidden])?;
    let head_t = b.transpose("lm_head.weight_t", head, &[1, 0])?;
    let logits = b.op("lm_head", Op::MatMul, &[x, head_t])?;
    b.output("logits", logits)
}

/// The `cos` and `sin` tables `[seq, head_dim]` of HF's rotary embedding at positions `0..seq`.
struct Rotary {
    cos: NodeId,
    sin: NodeId,
}

impl Rotary {
    fn build(b: &mut Builder, c: &LlamaConfig, seq: &Dim) -> Result<Rotary> {
        let half = c.head_dim / 2;
        // inv_freq[i] = theta^(-2i/d), rounded to f32 as transformers stores it.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / c.rope_theta.powf(2.0 * i as f64 / c.head_dim as f64)) as f32)
            .collect();
        let inv_freq = b.vector("rotary.inv_freq", &inv_freq)?;
        let positions = b.range("position_ids", seq.clone())?;
        let positions = b.cast("rotary.positions", positions, DType::F32)?;
        let column = b.reshape(
            "rotary.positions_column",
            positions,
            &[seq.clone(), 1usize.into()],
        )?;
        let freqs = b.binary("rotary.freqs", BinaryOp::Mul, column, inv_freq)?;
        let angles = b.op("rotary.angles", Op::Concat { axis: -1 }, &[freqs, freqs])?;
        Ok(Rotary {
            cos: b.unary("rotary.cos", UnaryOp::Cos, angles)?,
            sin: b.unary("rotary.sin", UnaryOp::Sin, angles)?,
        })
    }

    /// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = concat(-x2, x1)`.
    fn apply(&self, b: &mut Builder, name: &str, x: NodeId, head_dim: usize) -> Result<NodeId> {
        let half = (head_dim / 2) as i64;
        let slice = |start: i64, end: i64| Op::Slice {
            axis: -1,
            start: Dim::Const(start),
            end: Dim::Const(end),
            step: 1,
        };
        let x1 = b.op(&format!("{name}.x1"), slice(0, half), &[x])?;
        let x2 = b.op(&format!("{name}.x2"), slice(half, 2 * half), &[x])?;
        let neg_x2 = b.unary(&format!("{name}.neg_x2"), UnaryOp::Neg, x2)?;
        let rotated = b.op(
            &format!("{name}.rotate_half"),
            Op::Concat { axis: -1 },
            &[neg_x2, x1],
        )?;
        let a = b.binary(&format!("{name}.cos_part"), BinaryOp::Mul, x, self.cos)?;
        let s = b.binary(
            &format!("{name}.sin_part"),
            BinaryOp::Mul,
            rotated,
            self.sin,
        )?;
        b.binary(name, BinaryOp::Add, a, s)
    }
}

#[allow(clippy::too_many_arguments)]
fn decoder_layer(
    b: &mut Builder,
    c: &LlamaConfig,
    names: &WeightNames,
    i: usize,
    x: NodeId,
    rotary: &Rotary,
    causal: NodeId,
    batch: &Dim,
    seq: &Dim,
) -> Result<NodeId> {
    let p = format!("layers.{i}");
    let w = |module: &str| (names.layer)(i, module);
    let (q_width, kv_width) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let norm = b.weight_with_dims(&w("input_layernorm"), &[c.hidden])?;
    let h = b.op(
        &format!("{p}.input_layernorm"),
        Op::RmsNorm { eps: F32(c.eps) },
        &[x, norm],
    )?;
    let q = b.linear(
        &format!("{p}.self_attn.q_proj"),
        &w("self_attn.q_proj"),
        None,
        h,
        [q_width, c.hidden],
    )?;
    let k = b.linear(
        &format!("{p}.self_attn.k_proj"),
        &w("self_attn.k_proj"),
        None,
        h,
        [kv_width, c.hidden],
    )?;
    let v = b.linear(
        &format!("{p}.self_attn.v_proj"),
        &w("self_attn.v_proj"),
        None,
        h,
        [kv_width, c.hidden],
    )?;
    let q = b.split_heads(
        &format!("{p}.self_attn.q_heads"),
        q,
        batch,
        seq,
        c.heads,
        c.head_dim,
    )?;
    let k = b.split_heads(
        &format!("{p}.self_attn.k_heads"),
        k,
        batch,
        seq,
        c.kv_heads,
        c.head_dim,
    )?;
    let v = b.split_heads(
        &format!("{p}.self_attn.v_heads"),
        v,
        batch,
        seq,
        c.kv_heads,
        c.head_dim,
    )?;
    let q = rotary.apply(b, &format!("{p}.self_attn.q_rope"), q, c.head_dim)?;
    let k = rotary.apply(b, &format!("{p}.self_attn.k_rope"), k, c.head_dim)?;
    let k = repeat_kv(b, &format!("{p}.self_attn.k_repeat"), k, c, batch, seq)?;
    let v = repeat_kv(b, &format!("{p}.self_attn.v_repeat"), v, c, batch, seq)?;
    let context = b.attention(
        &format!("{p}.self_attn"),
        [q, k, v],
        Scale::MultiplyByInverseSqrt(c.head_dim),
        Mask::Keep(causal),
    )?;
    let context = b.merge_heads(
        &format!("{p}.self_attn.merged"),
        context,
        batch,
        seq,
        q_width,
    )?;
    let attended = b.linear(
        &format!("{p}.self_attn.o_proj"),
        &w("self_attn.o_proj"),
        None,
        context,
        [c.hidden, q_width],
    )?;
    let x = b.binary(
        &format!("{p}.attention_residual"),
        BinaryOp::Add,
        x,
        attended,
    )?;
    let norm = b.weight_with_dims(&w("post_attention_layernorm"), &[c.hidden])?;
    let h = b.op(
        &format!("{p}.post_attention_layernorm"),
        Op::RmsNorm { eps: F32(c.eps) },
        &[x, norm],
    )?;
    let gate = b.linear(
        &format!("{p}.mlp.gate_proj"),
        &w("mlp.gate_proj"),
        None,
        h,
        [c.intermediate, c.hidden],
    )?;
    let up = b.linear(
        &format!("{p}.mlp.up_proj"),
        &w("mlp.up_proj"),
        None,
        h,
        [c.intermediate, c.hidden],
    )?;
    let gate = b.unary(&format!("{p}.mlp.act"), UnaryOp::Silu, gate)?;
    let gated = b.binary(&format!("{p}.mlp.gated"), BinaryOp::Mul, gate, up)?;
    let down = b.linear(
        &format!("{p}.mlp.down_proj"),
        &w("mlp.down_proj"),
        None,
        gated,
        [c.hidden, c.intermediate],
    )?;
    b.binary(&format!("{p}.mlp_residual"), BinaryOp::Add, x, down)
}

/// Repeats each key/value head `heads / kv_heads` times (transformers' `repeat_kv`).
fn repeat_kv(
    b: &mut Builder,
    name: &str,
    x: NodeId,
    c: &LlamaConfig,
    batch: &Dim,
    seq: &Dim,
) -> Result<NodeId> {
    let groups = c.heads / c.kv_heads;
    if groups == 1 {
        return Ok(x);
    }
    let d = |n: usize| Dim::from(n);
    let split = b.reshape(
        &format!("{name}.split"),
        x,
        &[
            batch.clone(),
            d(c.kv_heads),
            d(1),
            seq.clone(),
            d(c.head_dim),
        ],
    )?;
    let expanded = b.op(
        &format!("{name}.expand"),
        Op::Expand {
            shape: kiln_ir::Shape(vec![
                batch.clone(),
                d(c.kv_heads),
                d(groups),
                seq.clone(),
                d(c.head_dim),
            ]),
        },
        &[split],
    )?;
    b.reshape(
        name,
        expanded,
        &[batch.clone(), d(c.heads), seq.clone(), d(c.head_dim)],
    )
}
