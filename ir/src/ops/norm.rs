//! Normalizations: `layer_norm` (ONNX LayerNormalization) and `rms_norm` (LLaMA's RMSNorm).

use super::{
    broadcasts_to, expect_arity, expect_float, expect_same_dtype, normalize_axis, AttrValue, Attrs,
    EvalCtx, Op, TensorType,
};
use crate::dim::Shape;
use crate::dtype::F32;
use crate::tensor::Tensor;

pub(super) fn layer_norm_attrs(axis: i64, eps: F32) -> Vec<(&'static str, AttrValue)> {
    vec![("axis", AttrValue::int(axis)), ("eps", AttrValue::f32(eps))]
}

pub(super) fn parse_layer_norm(attrs: &mut Attrs) -> Result<Op, String> {
    Ok(Op::LayerNorm {
        axis: attrs.int("axis")?,
        eps: attrs.f32("eps")?,
    })
}

/// Checks that each parameter broadcasts to the normalized dims without growing them.
fn check_params(x: &TensorType, normalized: &Shape, params: &[&TensorType]) -> Result<(), String> {
    for param in params {
        expect_same_dtype(x, param)?;
        if !broadcasts_to(&param.shape, normalized) {
            return Err(format!(
                "parameter {param} does not broadcast to the normalized dims {normalized}"
            ));
        }
    }
    Ok(())
}

pub(super) fn infer_layer_norm(operands: &[&TensorType], axis: i64) -> Result<TensorType, String> {
    expect_arity(operands, 2, 3)?;
    let x = operands[0];
    expect_float("layer_norm input", x)?;
    let axis = normalize_axis(axis, x.rank())?;
    let normalized = Shape(x.shape.0[axis..].to_vec());
    check_params(x, &normalized, &operands[1..])?;
    Ok(x.clone())
}

pub(super) fn infer_rms_norm(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 2, 2)?;
    let x = operands[0];
    expect_float("rms_norm input", x)?;
    let axis = normalize_axis(-1, x.rank())?;
    let normalized = Shape(x.shape.0[axis..].to_vec());
    check_params(x, &normalized, &operands[1..])?;
    Ok(x.clone())
}

/// Normalizes each row of the axes `axis..` by
/// `scale_of(mean, variance, mean_square) -> (center, scale)` (two-pass variance),
/// then multiplies by the first parameter and adds the second, if any.
fn normalize_rows(
    x: &Tensor,
    axis: usize,
    params: &[&Tensor],
    scale_of: impl Fn(f64, f64, f64) -> (f64, f64),
) -> Vec<f64> {
    let inner_dims = &x.shape()[axis..];
    let inner: usize = inner_dims.iter().product();
    let params: Vec<Vec<f64>> = params
        .iter()
        .map(|p| super::elementwise::broadcast_to(p, inner_dims).to_f64s())
        .collect();
    let values = x.to_f64s();
    let mut out = Vec::with_capacity(values.len());
    for row in values.chunks(inner.max(1)) {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let mean_square = row.iter().map(|v| v * v).sum::<f64>() / n;
        let (center, scale) = scale_of(mean, variance, mean_square);
        for (i, v) in row.iter().enumerate() {
            let bias = params.get(1).map_or(0.0, |b| b[i]);
            out.push((v - center) * scale * params[0][i] + bias);
        }
    }
    out
}

/// `(x - mean) / sqrt(var + eps) * scale + bias` over axes `axis..`, with the biased variance.
pub(super) fn eval_layer_norm(
    operands: &[&Tensor],
    axis: i64,
    eps: F32,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let x = operands[0];
    let axis = normalize_axis(axis, x.shape().len())?;
    let eps = f64::from(eps.0);
    let out = normalize_rows(x, axis, &operands[1..], |mean, variance, _| {
        (mean, 1.0 / (variance + eps).sqrt())
    });
    Ok(Tensor::from_f64s(x.dtype(), ctx.out_shape.to_vec(), out))
}

/// `x / sqrt(mean(x^2) + eps) * scale` over the last axis.
pub(super) fn eval_rms_norm(
    operands: &[&Tensor],
    eps: F32,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let x = operands[0];
    let axis = x.shape().len() - 1;
    let eps = f64::from(eps.0);
    let out = normalize_rows(x, axis, &operands[1..], |_, _, mean_square| {
        (0.0, 1.0 / (mean_square + eps).sqrt())
    });
    Ok(Tensor::from_f64s(x.dtype(), ctx.out_shape.to_vec(), out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn layer_norm_by_hand() {
        // Row [1, 2, 3, 4]: mean 2.5, biased variance 1.25, 1/sqrt(1.25) = 0.894427191.
        let x = Tensor::f32(&[1, 4], vec![1., 2., 3., 4.]).unwrap();
        let scale = Tensor::f32(&[4], vec![1., 1., 2., 2.]).unwrap();
        let bias = Tensor::f32(&[4], vec![0., 1., 0., 1.]).unwrap();
        let op = Op::LayerNorm {
            axis: -1,
            eps: F32(0.0),
        };
        let out = eval(&op, &[x, scale, bias]).unwrap();
        let k = 0.894_427_2f32;
        assert_close(
            &f32s(&out),
            &[-1.5 * k, -0.5 * k + 1.0, 0.5 * k * 2.0, 1.5 * k * 2.0 + 1.0],
            1e-6,
        );
    }

    #[test]
    fn layer_norm_over_two_axes_without_bias() {
        // axis 1 of [1, 2, 2] normalizes all four values together.
        let x = Tensor::f32(&[1, 2, 2], vec![1., 2., 3., 4.]).unwrap();
        let scale = Tensor::f32(&[2, 2], vec![1.; 4]).unwrap();
        let out = eval(
            &Op::LayerNorm {
                axis: 1,
                eps: F32(1e-5),
            },
            &[x, scale],
        )
        .unwrap();
        // (x - 2.5) / sqrt(1.25 + 1e-5)
        let k = 1.0 / (1.25f64 + 1e-5).sqrt();
        let expected: Vec<f32> = [-1.5, -0.5, 0.5, 1.5]
            .iter()
            .map(|v| (v * k) as f32)
            .collect();
        assert_close(&f32s(&out), &expected, 1e-6);
    }

    #[test]
    fn rms_norm_by_hand() {
        // Row [3, 4]: mean square 12.5, 1/sqrt(12.5) = 0.2828427.
        let x = Tensor::f32(&[2, 2], vec![3., 4., 0., 0.]).unwrap();
        let scale = Tensor::f32(&[2], vec![1., 0.5]).unwrap();
        let out = eval(&Op::RmsNorm { eps: F32(1e-6) }, &[x, scale]).unwrap();
        assert_close(&f32s(&out), &[0.848_528, 0.565_685_4, 0., 0.], 1e-6);
    }

    #[test]
    fn norm_shape_rules() {
        let op = Op::LayerNorm {
            axis: -1,
            eps: F32(1e-12),
        };
        let ok = infer(
            &op,
            &[
                ty(DType::F32, &["batch", "seq", "384"]),
                ty(DType::F32, &["384"]),
                ty(DType::F32, &["384"]),
            ],
        );
        assert_eq!(ok.unwrap().to_string(), "f32[batch, seq, 384]");
        let err = infer(
            &op,
            &[
                ty(DType::F32, &["batch", "seq", "384"]),
                ty(DType::F32, &["383"]),
            ],
        )
        .unwrap_err();
        assert!(
            err.contains("does not broadcast to the normalized dims"),
            "{err}"
        );
        let err = infer(
            &op,
            &[ty(DType::F32, &["seq", "4"]), ty(DType::F32, &["seq", "4"])],
        )
        .unwrap_err();
        assert!(
            err.contains("does not broadcast to the normalized dims"),
            "{err}"
        );
        // Regression (found by the interpreter property test): an empty scale must not
        // broadcast up to a non-empty row.
        let err = infer(&op, &[ty(DType::F32, &["1"]), ty(DType::F32, &["0"])]).unwrap_err();
        assert!(
            err.contains("does not broadcast to the normalized dims"),
            "{err}"
        );
        assert!(infer(
            &Op::RmsNorm { eps: F32(1e-6) },
            &[ty(DType::I64, &["4"]), ty(DType::I64, &["4"])]
        )
        .is_err());
    }
}
