//! Rotary position embedding.

use super::{broadcasts_to, expect_arity, expect_float, AttrValue, Attrs, EvalCtx, Op, TensorType};
use crate::dim::Shape;
use crate::dtype::F32;
use crate::tensor::Tensor;

pub(super) fn rope_attrs(theta: F32, interleaved: bool) -> Vec<(&'static str, AttrValue)> {
    vec![
        ("theta", AttrValue::f32(theta)),
        ("interleaved", AttrValue::Bool(interleaved)),
    ]
}

pub(super) fn parse_rope(attrs: &mut Attrs) -> Result<Op, String> {
    Ok(Op::Rope {
        theta: attrs.f32("theta")?,
        interleaved: attrs.bool("interleaved")?,
    })
}

/// Operands: `x [b, h, s, d]` (even `d`) and integer positions broadcasting to `[b, s]`.
pub(super) fn infer_rope(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 2, 2)?;
    let (x, positions) = (operands[0], operands[1]);
    expect_float("rope input", x)?;
    if x.rank() != 4 {
        return Err(format!(
            "rope input must be [batch, heads, seq, head_dim], got {x}"
        ));
    }
    if x.shape.0[3].as_const().is_some_and(|d| d % 2 != 0) {
        return Err(format!("rope head_dim must be even, got {x}"));
    }
    if !positions.dtype.is_int() || positions.rank() > 2 {
        return Err(format!(
            "rope positions must be integers of shape [batch, seq] or [seq], got {positions}"
        ));
    }
    let rows = Shape(vec![x.shape.0[0].clone(), x.shape.0[2].clone()]);
    if !broadcasts_to(&positions.shape, &rows) {
        return Err(format!(
            "rope positions {positions} do not broadcast to {rows}"
        ));
    }
    Ok(x.clone())
}

/// Rotates pairs `(x1, x2)` by `pos * theta^(-2i/d)` for pair `i`:
/// `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
pub(super) fn eval_rope(
    operands: &[&Tensor],
    theta: F32,
    interleaved: bool,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let x = operands[0];
    let [b, h, s, d] = x.shape()[..] else {
        unreachable!("rank checked")
    };
    let positions = super::elementwise::broadcast_to(operands[1], &[b, s]).to_i64s();
    let values = x.to_f64s();
    let mut out = values.clone();
    if d % 2 != 0 {
        return Err(format!("rope head_dim must be even, got {d}"));
    }
    let half = d / 2;
    let theta = f64::from(theta.0);
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let pos = positions[bi * s + si] as f64;
                let base = ((bi * h + hi) * s + si) * d;
                for i in 0..half {
                    let angle = pos * theta.powf(-2.0 * i as f64 / d as f64);
                    let (sin, cos) = angle.sin_cos();
                    let (a, b) = if interleaved {
                        (base + 2 * i, base + 2 * i + 1)
                    } else {
                        (base + i, base + i + half)
                    };
                    out[a] = values[a] * cos - values[b] * sin;
                    out[b] = values[b] * cos + values[a] * sin;
                }
            }
        }
    }
    Ok(Tensor::from_f64s(x.dtype(), ctx.out_shape.to_vec(), out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn rope_rotates_pairs_by_hand() {
        // d = 4, theta = 10000: pair 0 has frequency 1, pair 1 has 10000^(-1/2) = 0.01.
        // At position 1 pair 0 rotates by 1 rad, pair 1 by 0.01 rad.
        let x = Tensor::f32(&[1, 1, 1, 4], vec![1., 0., 0., 1.]).unwrap();
        let pos = Tensor::i64(&[1, 1], vec![1]).unwrap();
        let half = eval(
            &Op::Rope {
                theta: F32(10000.0),
                interleaved: false,
            },
            &[x.clone(), pos.clone()],
        )
        .unwrap();
        // rotate_half pairs (0, 2) = (1, 0) and (1, 3) = (0, 1).
        let (s1, c1) = 1f32.sin_cos();
        let (s2, c2) = 0.01f32.sin_cos();
        assert_close(&f32s(&half), &[c1, -s2, s1, c2], 1e-6);
        // Interleaved pairs (0, 1) = (1, 0) and (2, 3) = (0, 1).
        let inter = eval(
            &Op::Rope {
                theta: F32(10000.0),
                interleaved: true,
            },
            &[x, pos],
        )
        .unwrap();
        assert_close(&f32s(&inter), &[c1, s1, -s2, c2], 1e-6);
    }

    #[test]
    fn rope_position_zero_is_identity_and_shapes_are_checked() {
        let x = Tensor::f32(&[1, 2, 1, 2], vec![1., 2., 3., 4.]).unwrap();
        let pos = Tensor::i64(&[1], vec![0]).unwrap();
        let out = eval(
            &Op::Rope {
                theta: F32(10000.0),
                interleaved: false,
            },
            &[x, pos],
        )
        .unwrap();
        assert_eq!(f32s(&out), [1., 2., 3., 4.]);
        let op = Op::Rope {
            theta: F32(1e4),
            interleaved: false,
        };
        assert!(infer(
            &op,
            &[
                ty(DType::F32, &["1", "2", "seq", "3"]),
                ty(DType::I64, &["seq"])
            ]
        )
        .is_err());
        assert!(infer(
            &op,
            &[
                ty(DType::F32, &["1", "2", "seq", "4"]),
                ty(DType::F32, &["seq"])
            ]
        )
        .is_err());
        assert!(infer(
            &op,
            &[
                ty(DType::F32, &["batch", "2", "seq", "4"]),
                ty(DType::I64, &["batch", "seq"])
            ]
        )
        .is_ok());
    }
}
