//! Matrix products: numpy-style `matmul`, and `gemm` with a fused epilogue.

use super::{
    broadcast_shapes, broadcasts_to, expect_arity, expect_float, expect_same_dtype, AttrValue,
    Attrs, EvalCtx, TensorType, UnaryOp,
};
use crate::dim::Shape;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

pub(super) fn infer_matmul(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 2, 2)?;
    let (a, b) = (operands[0], operands[1]);
    expect_float("matmul operand", a)?;
    expect_same_dtype(a, b)?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err("matmul operands must have rank >= 1".into());
    }
    let a_dims = &a.shape.0;
    let b_dims = &b.shape.0;
    let k_a = &a_dims[a_dims.len() - 1];
    let k_b = if b.rank() == 1 {
        &b_dims[0]
    } else {
        &b_dims[b_dims.len() - 2]
    };
    if !k_a.equiv(k_b) {
        return Err(format!(
            "contraction dims differ: {} @ {} ({k_a} vs {k_b})",
            a.shape, b.shape
        ));
    }
    let a_batch = Shape(a_dims[..a_dims.len().saturating_sub(2)].to_vec());
    let b_batch = Shape(b_dims[..b_dims.len().saturating_sub(2)].to_vec());
    let mut out = broadcast_shapes(&a_batch, &b_batch)?.0;
    if a.rank() >= 2 {
        out.push(a_dims[a_dims.len() - 2].clone());
    }
    if b.rank() >= 2 {
        out.push(b_dims[b_dims.len() - 1].clone());
    }
    Ok(TensorType::new(a.dtype, Shape(out)))
}

/// `out[batch, m, n] = sum_k a[batch, m, k] * b[batch, k, n]` with f64 accumulation; `a` and `b`
/// are given as flat f64 values and row-major dims; batch dims broadcast.
fn batched_matmul(a: &Tensor, b: &Tensor, trans_b: bool, out_shape: &[usize]) -> Vec<f64> {
    let promote_a = a.shape().len() == 1;
    let promote_b = b.shape().len() == 1;
    let a_shape: Vec<usize> = if promote_a {
        vec![1, a.shape()[0]]
    } else {
        a.shape().to_vec()
    };
    let b_shape: Vec<usize> = if promote_b {
        if trans_b {
            vec![1, b.shape()[0]]
        } else {
            vec![b.shape()[0], 1]
        }
    } else {
        b.shape().to_vec()
    };
    let (m, k) = (a_shape[a_shape.len() - 2], a_shape[a_shape.len() - 1]);
    let n = if trans_b {
        b_shape[b_shape.len() - 2]
    } else {
        b_shape[b_shape.len() - 1]
    };
    let matrix_axes = usize::from(!promote_a) + usize::from(!promote_b);
    let batch_dims = &out_shape[..out_shape.len() - matrix_axes];
    let a_batch = super::elementwise::broadcast_offsets(&a_shape[..a_shape.len() - 2], batch_dims);
    let b_batch = super::elementwise::broadcast_offsets(&b_shape[..b_shape.len() - 2], batch_dims);
    let (va, vb) = (a.to_f64s(), b.to_f64s());
    let mut out = Vec::with_capacity(a_batch.len() * m * n);
    let mut row = vec![0.0f64; n];
    for (&ab, &bb) in a_batch.iter().zip(&b_batch) {
        let a_base = ab * m * k;
        let b_base = bb * k * n;
        for i in 0..m {
            row.fill(0.0);
            for p in 0..k {
                let a_ip = va[a_base + i * k + p];
                for (j, acc) in row.iter_mut().enumerate() {
                    let b_index = if trans_b { j * k + p } else { p * n + j };
                    *acc += a_ip * vb[b_base + b_index];
                }
            }
            out.extend_from_slice(&row);
        }
    }
    out
}

pub(super) fn eval_matmul(a: &Tensor, b: &Tensor, ctx: EvalCtx) -> Result<Tensor, String> {
    let values = batched_matmul(a, b, false, ctx.out_shape);
    Ok(Tensor::from_f64s(a.dtype(), ctx.out_shape.to_vec(), values))
}

/// Operands `x [..., k]` (rank >= 2), `w_gate [k, n]` and `w_up [k, n]`; the result is
/// `[..., n]`.
pub(super) fn infer_swiglu(operands: &[&TensorType]) -> Result<TensorType, String> {
    expect_arity(operands, 3, 3)?;
    let (x, gate, up) = (operands[0], operands[1], operands[2]);
    if x.rank() < 2 {
        return Err(format!("swiglu input must have rank >= 2, got {x}"));
    }
    if gate.rank() != 2 || !gate.equiv(up) {
        return Err(format!(
            "swiglu weights must be 2-D of one type, got {gate} and {up}"
        ));
    }
    infer_matmul(&[x, gate])
}

/// `silu(x @ w_gate) * (x @ w_up)`.
pub(super) fn eval_swiglu(operands: &[&Tensor], ctx: EvalCtx) -> Result<Tensor, String> {
    let gate = batched_matmul(operands[0], operands[1], false, ctx.out_shape);
    let up = batched_matmul(operands[0], operands[2], false, ctx.out_shape);
    let values = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| UnaryOp::Silu.apply_f64(g) * u)
        .collect();
    Ok(Tensor::from_f64s(
        operands[0].dtype(),
        ctx.out_shape.to_vec(),
        values,
    ))
}

/// Two products, the activation and the gating.
pub(super) fn swiglu_flops(operands: &[&[usize]], out: &[usize]) -> u64 {
    let k = operands[1].first().copied().unwrap_or(1) as u64;
    let out_numel = super::saturating_product(out.iter().map(|&d| d as u64));
    out_numel.saturating_mul(k.saturating_mul(4).saturating_add(6))
}

/// The epilogue of a fused matrix product:
/// `out = activation(a @ b + bias) + residual`, where `b` is a 2-D weight `[k, n]`
/// (`[n, k]` when `trans_b`), `bias` broadcasts against the product and `residual` has the
/// output's shape. Operands: `a, b`, then `bias` if present, then `residual` if present. The
/// default is a plain product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Gemm {
    /// `b` is stored `[n, k]`.
    pub trans_b: bool,
    /// A bias operand follows `b`.
    pub bias: bool,
    /// Elementwise function applied after the bias.
    pub activation: Option<UnaryOp>,
    /// A residual operand is added last.
    pub residual: bool,
}

impl Gemm {
    pub(super) fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        vec![
            ("trans_b", AttrValue::Bool(self.trans_b)),
            ("bias", AttrValue::Bool(self.bias)),
            (
                "activation",
                AttrValue::ident(self.activation.map_or("none", UnaryOp::name)),
            ),
            ("residual", AttrValue::Bool(self.residual)),
        ]
    }

    pub(super) fn parse(attrs: &mut Attrs) -> Result<Gemm, String> {
        let trans_b = attrs.bool("trans_b")?;
        let bias = attrs.bool("bias")?;
        let activation = match attrs.ident("activation")?.as_str() {
            "none" => None,
            name => Some(
                UnaryOp::from_name(name)
                    .filter(|op| op.is_float_fn())
                    .ok_or_else(|| format!("unknown activation `{name}`"))?,
            ),
        };
        Ok(Gemm {
            trans_b,
            bias,
            activation,
            residual: attrs.bool("residual")?,
        })
    }

    fn operand_count(&self) -> usize {
        2 + usize::from(self.bias) + usize::from(self.residual)
    }

    pub(super) fn infer(&self, operands: &[&TensorType]) -> Result<TensorType, String> {
        let count = self.operand_count();
        expect_arity(operands, count, count)?;
        let (a, b) = (operands[0], operands[1]);
        if b.rank() != 2 {
            return Err(format!("gemm weight must be 2-D, got {b}"));
        }
        if a.rank() < 2 {
            return Err(format!("gemm input must have rank >= 2, got {a}"));
        }
        if let Some(activation) = self.activation {
            if !activation.is_float_fn() {
                return Err(format!("`{}` is not a float activation", activation.name()));
            }
        }
        let weight = if self.trans_b {
            TensorType::new(
                b.dtype,
                Shape(vec![b.shape.0[1].clone(), b.shape.0[0].clone()]),
            )
        } else {
            b.clone()
        };
        let product = infer_matmul(&[a, &weight])?;
        let mut next = 2;
        if self.bias {
            let bias = operands[next];
            expect_same_dtype(&product, bias)?;
            if !broadcasts_to(&bias.shape, &product.shape) {
                return Err(format!(
                    "bias {bias} does not broadcast to the product {product}"
                ));
            }
            next += 1;
        }
        if self.residual {
            let residual = operands[next];
            expect_same_dtype(&product, residual)?;
            if !TensorType::new(residual.dtype, product.shape.clone()).equiv(residual) {
                return Err(format!(
                    "residual {residual} must have the product's shape {}",
                    product.shape
                ));
            }
        }
        Ok(product)
    }

    pub(super) fn eval(&self, operands: &[&Tensor], ctx: EvalCtx) -> Result<Tensor, String> {
        let mut values = batched_matmul(operands[0], operands[1], self.trans_b, ctx.out_shape);
        let out_dtype = operands[0].dtype();
        let mut next = 2;
        if self.bias {
            let bias = operands[next];
            let bias_values = bias.to_f64s();
            let offsets = super::elementwise::broadcast_offsets(bias.shape(), ctx.out_shape);
            for (v, &o) in values.iter_mut().zip(&offsets) {
                *v += bias_values[o];
            }
            next += 1;
        }
        if let Some(activation) = self.activation {
            for v in &mut values {
                *v = activation.apply_f64(*v);
            }
        }
        if self.residual {
            for (v, r) in values.iter_mut().zip(operands[next].to_f64s()) {
                *v += r;
            }
        }
        Ok(Tensor::from_f64s(out_dtype, ctx.out_shape.to_vec(), values))
    }

    pub(super) fn flops(&self, operands: &[&[usize]], out: &[usize]) -> u64 {
        let b = operands[1];
        let k = if self.trans_b { b[1] } else { b[0] } as u64;
        let out_numel = super::saturating_product(out.iter().map(|&d| d as u64));
        let epilogue =
            u64::from(self.bias) + u64::from(self.activation.is_some()) + u64::from(self.residual);
        out_numel.saturating_mul(k.saturating_mul(2).saturating_add(epilogue))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Op;
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn matmul_2d_by_hand() {
        // [[1,2],[3,4]] @ [[5,6],[7,8]] = [[19,22],[43,50]]
        let a = Tensor::f32(&[2, 2], vec![1., 2., 3., 4.]).unwrap();
        let b = Tensor::f32(&[2, 2], vec![5., 6., 7., 8.]).unwrap();
        assert_eq!(
            f32s(&eval(&Op::MatMul, &[a, b]).unwrap()),
            [19., 22., 43., 50.]
        );
    }

    #[test]
    fn matmul_broadcasts_batches_and_promotes_vectors() {
        // a: [2, 1, 2] (two 1x2 rows), b: [2, 1] shared: out [2, 1, 1].
        let a = Tensor::f32(&[2, 1, 2], vec![1., 2., 3., 4.]).unwrap();
        let b = Tensor::f32(&[2, 1], vec![10., 100.]).unwrap();
        let out = eval(&Op::MatMul, &[a, b]).unwrap();
        assert_eq!(out.shape(), [2, 1, 1]);
        assert_eq!(f32s(&out), [210., 430.]);
        // Vector @ matrix and matrix @ vector drop the promoted axis.
        let v = Tensor::f32(&[2], vec![1., -1.]).unwrap();
        let m = Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let vm = eval(&Op::MatMul, &[v.clone(), m]).unwrap();
        assert_eq!((vm.shape(), f32s(&vm)), (&[3][..], vec![-3., -3., -3.]));
        let m = Tensor::f32(&[3, 2], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let mv = eval(&Op::MatMul, &[m, v]).unwrap();
        assert_eq!((mv.shape(), f32s(&mv)), (&[3][..], vec![-1., -1., -1.]));
        // Batch broadcasting on both sides: [3, 1, 1, 2] @ [4, 2, 1] -> [3, 4, 1, 1].
        let a = Tensor::f32(&[3, 1, 1, 2], vec![1., 0., 0., 1., 1., 1.]).unwrap();
        let b = Tensor::f32(&[4, 2, 1], vec![1., 2., 3., 4., 5., 6., 7., 8.]).unwrap();
        let out = eval(&Op::MatMul, &[a, b]).unwrap();
        assert_eq!(out.shape(), [3, 4, 1, 1]);
        assert_eq!(
            f32s(&out),
            [1., 3., 5., 7., 2., 4., 6., 8., 3., 7., 11., 15.]
        );
    }

    #[test]
    fn matmul_shape_rules() {
        let out = infer(
            &Op::MatMul,
            &[
                ty(DType::F32, &["batch", "seq", "16"]),
                ty(DType::F32, &["16", "32"]),
            ],
        );
        assert_eq!(out.unwrap().to_string(), "f32[batch, seq, 32]");
        let err = infer(
            &Op::MatMul,
            &[ty(DType::F32, &["2", "3"]), ty(DType::F32, &["4", "5"])],
        )
        .unwrap_err();
        assert!(err.contains("contraction dims differ"), "{err}");
        assert!(infer(
            &Op::MatMul,
            &[ty(DType::I64, &["2", "2"]), ty(DType::I64, &["2", "2"])]
        )
        .is_err());
    }

    #[test]
    fn gemm_epilogue_applies_bias_activation_residual_in_order() {
        let gemm = Op::Gemm(Gemm {
            trans_b: true,
            bias: true,
            activation: Some(UnaryOp::Relu),
            residual: true,
        });
        // a [1, 2] = [1, 2]; b stored [n=2, k=2] = [[1, 1], [1, -1]] -> a @ b^T = [3, -1].
        let a = Tensor::f32(&[1, 2], vec![1., 2.]).unwrap();
        let b = Tensor::f32(&[2, 2], vec![1., 1., 1., -1.]).unwrap();
        let bias = Tensor::f32(&[2], vec![0.5, 0.5]).unwrap();
        let residual = Tensor::f32(&[1, 2], vec![10., 20.]).unwrap();
        let out = eval(&gemm, &[a, b, bias, residual]).unwrap();
        // relu([3.5, -0.5]) + [10, 20] = [13.5, 20].
        assert_eq!(f32s(&out), [13.5, 20.]);
    }

    #[test]
    fn swiglu_gates_the_up_projection_by_silu_of_the_gate() {
        // x [1, 1, 2] = [1, 2]; gate columns give [3, -1], up columns give [2, 0.5].
        let x = Tensor::f32(&[1, 1, 2], vec![1., 2.]).unwrap();
        let gate = Tensor::f32(&[2, 2], vec![1., 1., 1., -1.]).unwrap();
        let up = Tensor::f32(&[2, 2], vec![0., 0.5, 1., 0.]).unwrap();
        let out = eval(&Op::SwiGlu, &[x, gate, up]).unwrap();
        assert_eq!(out.shape(), [1, 1, 2]);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert_close(&f32s(&out), &[silu(3.) * 2., silu(-1.) * 0.5], 1e-6);
        let err = infer(
            &Op::SwiGlu,
            &[
                ty(DType::F32, &["4", "8"]),
                ty(DType::F32, &["8", "2"]),
                ty(DType::F32, &["8", "3"]),
            ],
        )
        .unwrap_err();
        assert!(err.contains("2-D of one type"), "{err}");
    }

    #[test]
    fn gemm_checks_operand_count_and_shapes() {
        let plain = Op::Gemm(Gemm {
            trans_b: false,
            bias: true,
            activation: None,
            residual: false,
        });
        let err = infer(
            &plain,
            &[ty(DType::F32, &["4", "8"]), ty(DType::F32, &["8", "2"])],
        )
        .unwrap_err();
        assert_eq!(err, "expects 3 operands, got 2");
        let err = infer(
            &plain,
            &[
                ty(DType::F32, &["4", "8"]),
                ty(DType::F32, &["8", "2"]),
                ty(DType::F32, &["4", "4", "2"]),
            ],
        )
        .unwrap_err();
        assert!(err.contains("does not broadcast to the product"), "{err}");
    }
}
