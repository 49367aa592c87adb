//! Rotary position embedding from cos and sin tables.

use super::{broadcasts_to, expect_arity, expect_float, AttrValue, Attrs, EvalCtx, Op, TensorType};
use crate::tensor::Tensor;

pub(super) fn rope_attrs(interleaved: bool) -> Vec<(&'static str, AttrValue)> {
    vec![("interleaved", AttrValue::Bool(interleaved))]
}

pub(super) fn parse_rope(attrs: &mut Attrs) -> Result<Op, String> {
    Ok(Op::Rope {
        interleaved: attrs.bool("interleaved")?,
    })
}

/// Operands: `x [b, h, s, d]` (even `d`), and `cos` and `sin` tables of `x`'s dtype whose last
/// axis is `d` and which broadcast to `x` (typically `[s, d]` or `[b, 1, s, d]`).
pub(super) fn infer_rope(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 3, 3)?;
    let x = operands[0];
    expect_float("rope input", x)?;
    if x.rank() != 4 {
        return Err(format!(
            "rope input must be [batch, heads, seq, head_dim], got {x}"
        ));
    }
    let d = &x.shape.0[3];
    if d.as_const().is_some_and(|d| d % 2 != 0) {
        return Err(format!("rope head_dim must be even, got {x}"));
    }
    for (name, table) in [("cos", operands[1]), ("sin", operands[2])] {
        let last_is_d = table.shape.0.last().is_some_and(|t| t.equiv(d));
        if table.dtype != x.dtype || !last_is_d || !broadcasts_to(&table.shape, &x.shape) {
            return Err(format!(
                "rope {name} table {table} must have {x}'s dtype, end in its head_dim and broadcast to it"
            ));
        }
    }
    Ok(x.clone())
}

/// `x cos + rotate(x) sin`, where `rotate` maps the pair `(x1, x2)` to `(-x2, x1)`: the pairs
/// are `(i, i + d/2)` (HF's `rotate_half`), or `(2i, 2i+1)` when `interleaved` (GPT-J, llama.cpp).
pub(super) fn eval_rope(
    operands: &[&Tensor],
    interleaved: bool,
    ctx: EvalCtx,
) -> Result<Tensor, String> {
    let x = operands[0];
    let d = x.shape()[3];
    if !d.is_multiple_of(2) {
        return Err(format!("rope head_dim must be even, got {d}"));
    }
    let values = x.to_f64s();
    let cos = super::elementwise::broadcast_to(operands[1], x.shape()).to_f64s();
    let sin = super::elementwise::broadcast_to(operands[2], x.shape()).to_f64s();
    let half = d / 2;
    let mut out = vec![0.0; values.len()];
    for row in (0..values.len()).step_by(d.max(1)) {
        for pair in 0..half {
            let (a, b) = if interleaved {
                (row + 2 * pair, row + 2 * pair + 1)
            } else {
                (row + pair, row + pair + half)
            };
            out[a] = values[a] * cos[a] - values[b] * sin[a];
            out[b] = values[b] * cos[b] + values[a] * sin[b];
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
        // Pair 0 rotates by 1 rad, pair 1 by 0.01 rad, in HF's duplicated-halves tables.
        let (s1, c1) = 1f32.sin_cos();
        let (s2, c2) = 0.01f32.sin_cos();
        let x = Tensor::f32(&[1, 1, 1, 4], vec![1., 0., 0., 1.]).unwrap();
        let cos = Tensor::f32(&[1, 4], vec![c1, c2, c1, c2]).unwrap();
        let sin = Tensor::f32(&[1, 4], vec![s1, s2, s1, s2]).unwrap();
        let half = eval(&Op::Rope { interleaved: false }, &[x.clone(), cos, sin]).unwrap();
        // rotate_half pairs (0, 2) = (1, 0) and (1, 3) = (0, 1).
        assert_close(&f32s(&half), &[c1, -s2, s1, c2], 1e-6);
        // Interleaved pairs (0, 1) = (1, 0) and (2, 3) = (0, 1), tables repeated per pair.
        let cos = Tensor::f32(&[1, 4], vec![c1, c1, c2, c2]).unwrap();
        let sin = Tensor::f32(&[1, 4], vec![s1, s1, s2, s2]).unwrap();
        let inter = eval(&Op::Rope { interleaved: true }, &[x, cos, sin]).unwrap();
        assert_close(&f32s(&inter), &[c1, s1, -s2, c2], 1e-6);
    }

    #[test]
    fn rope_tables_must_match_the_head_dim_and_broadcast() {
        let op = Op::Rope { interleaved: false };
        let x = ty(DType::F32, &["batch", "2", "seq", "4"]);
        let table = ty(DType::F32, &["seq", "4"]);
        assert!(infer(&op, &[x.clone(), table.clone(), table.clone()]).is_ok());
        let odd = ty(DType::F32, &["1", "2", "seq", "3"]);
        let odd_table = ty(DType::F32, &["seq", "3"]);
        assert!(infer(&op, &[odd, odd_table.clone(), odd_table]).is_err());
        let narrow = ty(DType::F32, &["seq", "2"]);
        let err = infer(&op, &[x.clone(), narrow, table.clone()]).unwrap_err();
        assert!(err.contains("end in its head_dim"), "{err}");
        let integer = ty(DType::I64, &["seq", "4"]);
        assert!(infer(&op, &[x, table, integer]).is_err());
    }
}
