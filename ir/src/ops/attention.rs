//! Fused scaled dot-product attention and the static masks it knows.

use super::{
    broadcasts_to, expect_arity, expect_float, expect_same_dtype, AttrValue, Attrs, EvalCtx,
    TensorType,
};
use crate::dim::{Dim, Shape};
use crate::dtype::{DType, F32};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// A static attention mask, known at compile time. Positions are aligned to the end of the key
/// sequence: query `i` of `sq` sits at absolute position `p = i + sk - sq`, so that decoding one
/// token against a cache of `sk - 1` keys sees all of them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSpec {
    /// Every key is visible.
    Dense,
    /// Key `j` is visible from position `p` iff `j <= p`.
    Causal,
    /// Causal, and only the last `window` keys including `p` itself: `p - window < j <= p`
    /// (the HF `sliding_window` convention).
    SlidingWindow {
        /// Keys visible, including the query's own position.
        window: u32,
    },
    /// Bidirectional band `|p - j| < window`, plus the first `global` positions, which see every
    /// key and are seen by every query (Longformer/BigBird global tokens).
    GlobalLocal {
        /// Number of leading global positions.
        global: u32,
        /// Band half-width, exclusive.
        window: u32,
    },
    /// Visibility by `block x block` tiles: `layout[p / block][j / block]`.
    BlockSparse {
        /// Tile edge in tokens.
        block: u32,
        /// One row per query block, one flag per key block.
        layout: Vec<Vec<bool>>,
    },
}

impl MaskSpec {
    /// Whether key `key` is visible from query position `pos` (already end-aligned), or an
    /// error when a block-sparse layout does not cover the position.
    pub fn allows(&self, pos: i64, key: i64) -> Result<bool, String> {
        Ok(match self {
            MaskSpec::Dense => true,
            MaskSpec::Causal => key <= pos,
            MaskSpec::SlidingWindow { window } => key <= pos && pos < key + i64::from(*window),
            MaskSpec::GlobalLocal { global, window } => {
                let global = i64::from(*global);
                pos < global || key < global || (pos - key).abs() < i64::from(*window)
            }
            MaskSpec::BlockSparse { block, layout } => {
                let tile = |p: i64| usize::try_from(p.div_euclid(i64::from(*block))).ok();
                let (qb, kb) = (tile(pos), tile(key));
                qb.zip(kb)
                    .and_then(|(qb, kb)| layout.get(qb)?.get(kb).copied())
                    .ok_or_else(|| {
                        format!("block_sparse layout has no tile for query {pos}, key {key}")
                    })?
            }
        })
    }

    fn to_attr(&self) -> AttrValue {
        let int = |v: u32| AttrValue::int(i64::from(v));
        match self {
            MaskSpec::Dense => AttrValue::ident("dense"),
            MaskSpec::Causal => AttrValue::ident("causal"),
            MaskSpec::SlidingWindow { window } => AttrValue::Call(
                "sliding_window".into(),
                vec![("window".into(), int(*window))],
            ),
            MaskSpec::GlobalLocal { global, window } => AttrValue::Call(
                "global_local".into(),
                vec![
                    ("global".into(), int(*global)),
                    ("window".into(), int(*window)),
                ],
            ),
            MaskSpec::BlockSparse { block, layout } => {
                let rows = layout
                    .iter()
                    .map(|row| {
                        AttrValue::Str(row.iter().map(|&b| if b { '1' } else { '0' }).collect())
                    })
                    .collect();
                AttrValue::Call(
                    "block_sparse".into(),
                    vec![
                        ("block".into(), int(*block)),
                        ("layout".into(), AttrValue::List(rows)),
                    ],
                )
            }
        }
    }

    fn parse(attrs: &mut Attrs) -> Result<MaskSpec, String> {
        let (kind, mut args) = attrs.call("mask")?;
        let spec = match kind.as_str() {
            "dense" => MaskSpec::Dense,
            "causal" => MaskSpec::Causal,
            "sliding_window" => MaskSpec::SlidingWindow {
                window: args.positive_u32("window")?,
            },
            "global_local" => {
                let global = args.positive_u32("global")?;
                MaskSpec::GlobalLocal {
                    global,
                    window: args.positive_u32("window")?,
                }
            }
            "block_sparse" => {
                let block = args.positive_u32("block")?;
                let layout = args
                    .list("layout")?
                    .into_iter()
                    .map(|row| match row {
                        AttrValue::Str(bits) if bits.chars().all(|c| c == '0' || c == '1') => {
                            Ok(bits.chars().map(|c| c == '1').collect())
                        }
                        other => Err(format!(
                            "block_sparse layout rows are strings of 0 and 1, got `{other}`"
                        )),
                    })
                    .collect::<Result<Vec<Vec<bool>>, String>>()?;
                MaskSpec::BlockSparse { block, layout }
            }
            other => return Err(format!("unknown mask `{other}`")),
        };
        args.finish()?;
        Ok(spec)
    }
}

/// `softmax(scale * q @ k^T + mask) @ v` per batch and head, with the static `mask` spec.
///
/// Operands: `q [b, h, sq, d]`, `k [b, hk, sk, d]`, `v [b, hk, sk, dv]`, and optionally a run-time
/// mask broadcasting to `[b, h, sq, sk]`: bool (true keeps the key) or float (added to the
/// scores). `h` must be a multiple of `hk` (grouped-query attention: head `i` reads key/value head
/// `i / (h / hk)`). A query row with no visible key outputs zeros. Output `[b, h, sq, dv]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attention {
    /// Multiplies the scores before the mask is applied.
    pub scale: F32,
    /// Static mask.
    pub mask: MaskSpec,
    /// Query rows per tile in the tiled kernel.
    pub tile_q: u32,
    /// Keys per tile in the tiled kernel.
    pub tile_k: u32,
}

impl Attention {
    pub(super) fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        vec![
            ("scale", AttrValue::f32(self.scale)),
            ("mask", self.mask.to_attr()),
            ("tile_q", AttrValue::int(i64::from(self.tile_q))),
            ("tile_k", AttrValue::int(i64::from(self.tile_k))),
        ]
    }

    pub(super) fn parse(attrs: &mut Attrs) -> Result<Attention, String> {
        let scale = attrs.f32("scale")?;
        let mask = MaskSpec::parse(attrs)?;
        Ok(Attention {
            scale,
            mask,
            tile_q: attrs.positive_u32("tile_q")?,
            tile_k: attrs.positive_u32("tile_k")?,
        })
    }

    pub(super) fn infer(&self, operands: &[&TensorType]) -> Result<TensorType, String> {
        expect_arity(operands, 3, 4)?;
        self.check_attributes()?;
        let (q, k, v) = (operands[0], operands[1], operands[2]);
        expect_float("attention query", q)?;
        expect_same_dtype(q, k)?;
        expect_same_dtype(q, v)?;
        for (name, t) in [("query", q), ("key", k), ("value", v)] {
            if t.rank() != 4 {
                return Err(format!(
                    "attention {name} must be [batch, heads, seq, head_dim], got {t}"
                ));
            }
        }
        let [b, h, sq, d] = &q.shape.0[..] else {
            unreachable!("rank checked")
        };
        let [kb, hk, sk, kd] = &k.shape.0[..] else {
            unreachable!("rank checked")
        };
        let [vb, vh, vs, dv] = &v.shape.0[..] else {
            unreachable!("rank checked")
        };
        let same = |x: &Dim, y: &Dim, what: &str| {
            if x.equiv(y) {
                Ok(())
            } else {
                Err(format!(
                    "attention {what} differ: {x} vs {y} (q {q}, k {k}, v {v})"
                ))
            }
        };
        same(b, kb, "batch dims")?;
        same(b, vb, "batch dims")?;
        same(d, kd, "query and key head dims")?;
        same(hk, vh, "key and value head counts")?;
        same(sk, vs, "key and value lengths")?;
        if let (Some(h), Some(hk)) = (h.as_const(), hk.as_const()) {
            if hk <= 0 || h.checked_rem(hk) != Some(0) {
                return Err(format!(
                    "query heads {h} are not a multiple of key/value heads {hk}"
                ));
            }
        } else {
            same(h, hk, "symbolic head counts")?;
        }
        if let Some(mask) = operands.get(3) {
            if mask.dtype != DType::Bool {
                expect_same_dtype(q, mask)?;
            }
            let scores = Shape(vec![b.clone(), h.clone(), sq.clone(), sk.clone()]);
            if !broadcasts_to(&mask.shape, &scores) {
                return Err(format!(
                    "attention mask {mask} does not broadcast to the scores {scores}"
                ));
            }
        }
        Ok(TensorType::new(
            q.dtype,
            Shape(vec![b.clone(), h.clone(), sq.clone(), dv.clone()]),
        ))
    }

    /// The invariants the text parser enforces, checked again for graphs built otherwise (JSON,
    /// the builder API).
    fn check_attributes(&self) -> Result<(), String> {
        let positive = match &self.mask {
            MaskSpec::Dense | MaskSpec::Causal => true,
            MaskSpec::SlidingWindow { window } => *window > 0,
            MaskSpec::GlobalLocal { global, window } => *global > 0 && *window > 0,
            MaskSpec::BlockSparse { block, .. } => *block > 0,
        };
        if !positive || self.tile_q == 0 || self.tile_k == 0 {
            return Err("attention mask sizes and tile sizes must be positive".into());
        }
        Ok(())
    }

    pub(super) fn eval(&self, operands: &[&Tensor], ctx: EvalCtx) -> Result<Tensor, String> {
        let (q, k, v) = (operands[0], operands[1], operands[2]);
        let [b, h, sq, d] = q.shape()[..] else {
            unreachable!("rank checked")
        };
        let [_, hk, sk, _] = k.shape()[..] else {
            unreachable!("rank checked")
        };
        let dv = v.shape()[3];
        if hk == 0 || h % hk != 0 {
            return Err(format!(
                "{h} query heads do not split over {hk} key/value heads"
            ));
        }
        let group = h / hk;
        let (qv, kv, vv) = (q.to_f64s(), k.to_f64s(), v.to_f64s());
        let runtime_mask = operands.get(3).map(|m| {
            let full = super::elementwise::broadcast_to(m, &[b, h, sq, sk]);
            (m.dtype() == DType::Bool, full.to_f64s())
        });
        let scale = f64::from(self.scale.0);
        let mut out = Vec::with_capacity(b * h * sq * dv);
        let mut scores = vec![0.0f64; sk];
        let mut visible = vec![false; sk];
        for bi in 0..b {
            for hi in 0..h {
                let kh = hi / group;
                for i in 0..sq {
                    let pos = i as i64 + sk as i64 - sq as i64;
                    let q_row = &qv[((bi * h + hi) * sq + i) * d..][..d];
                    for j in 0..sk {
                        let mut allowed = self.mask.allows(pos, j as i64)?;
                        let k_row = &kv[((bi * hk + kh) * sk + j) * d..][..d];
                        let mut score =
                            scale * q_row.iter().zip(k_row).map(|(a, b)| a * b).sum::<f64>();
                        if let Some((is_bool, values)) = &runtime_mask {
                            let m = values[((bi * h + hi) * sq + i) * sk + j];
                            if *is_bool {
                                allowed &= m != 0.0;
                            } else {
                                score += m;
                            }
                        }
                        visible[j] = allowed;
                        scores[j] = score;
                    }
                    let max = (0..sk)
                        .filter(|&j| visible[j])
                        .map(|j| scores[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = (0..sk)
                        .map(|j| {
                            if visible[j] {
                                (scores[j] - max).exp()
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let sum: f64 = weights.iter().sum();
                    for c in 0..dv {
                        if !visible.iter().any(|&x| x) {
                            out.push(0.0);
                            continue;
                        }
                        let acc: f64 = (0..sk)
                            .map(|j| weights[j] * vv[((bi * hk + kh) * sk + j) * dv + c])
                            .sum();
                        out.push(acc / sum);
                    }
                }
            }
        }
        Ok(Tensor::from_f64s(q.dtype(), ctx.out_shape.to_vec(), out))
    }

    pub(super) fn flops(&self, operands: &[&[usize]]) -> u64 {
        let (q, v) = (operands[0], operands[2]);
        let sk = operands[1].get(2).copied().unwrap_or(0) as u64;
        let heads_rows = super::saturating_product(q[..3].iter().map(|&x| x as u64));
        let per_pair = (q[3] as u64)
            .saturating_add(v[3] as u64)
            .saturating_add(2)
            .saturating_mul(2);
        super::saturating_product([heads_rows, sk, per_pair])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Op;
    use super::*;

    fn attention(mask: MaskSpec, scale: f32) -> Op {
        Op::Attention(Attention {
            scale: F32(scale),
            mask,
            tile_q: 32,
            tile_k: 32,
        })
    }

    #[test]
    fn mask_specs_follow_their_conventions() {
        let allowed = |m: &MaskSpec, p, j| m.allows(p, j).unwrap();
        assert!(allowed(&MaskSpec::Causal, 3, 3) && !allowed(&MaskSpec::Causal, 3, 4));
        // HF sliding window 2: position 5 sees keys 4 and 5.
        let sliding = MaskSpec::SlidingWindow { window: 2 };
        assert!(
            !allowed(&sliding, 5, 3)
                && allowed(&sliding, 5, 4)
                && allowed(&sliding, 5, 5)
                && !allowed(&sliding, 5, 6)
        );
        let gl = MaskSpec::GlobalLocal {
            global: 1,
            window: 2,
        };
        assert!(
            allowed(&gl, 0, 9)
                && allowed(&gl, 9, 0)
                && allowed(&gl, 5, 6)
                && allowed(&gl, 5, 4)
                && !allowed(&gl, 5, 7)
        );
        let bs = MaskSpec::BlockSparse {
            block: 2,
            layout: vec![vec![true, false], vec![false, true]],
        };
        assert!(allowed(&bs, 1, 1) && !allowed(&bs, 1, 2) && allowed(&bs, 3, 2));
        assert!(bs.allows(4, 0).is_err());
    }

    #[test]
    fn single_head_attention_by_hand() {
        // q = [[1, 0]], k = [[1, 0], [0, 1]], v = [[1, 2], [3, 4]], scale 1:
        // scores [1, 0], softmax [e/(e+1), 1/(e+1)] = [0.7310586, 0.2689414];
        // out = [0.7310586 + 3 * 0.2689414, 2 * 0.7310586 + 4 * 0.2689414] = [1.5378828, 2.5378828].
        let q = Tensor::f32(&[1, 1, 1, 2], vec![1., 0.]).unwrap();
        let k = Tensor::f32(&[1, 1, 2, 2], vec![1., 0., 0., 1.]).unwrap();
        let v = Tensor::f32(&[1, 1, 2, 2], vec![1., 2., 3., 4.]).unwrap();
        let out = eval(
            &attention(MaskSpec::Dense, 1.0),
            &[q.clone(), k.clone(), v.clone()],
        )
        .unwrap();
        assert_close(&f32s(&out), &[1.537_882_8, 2.537_882_8], 1e-6);
        // End-aligned causal with one query and two keys: the query is at position 1, sees both.
        let causal = eval(
            &attention(MaskSpec::Causal, 1.0),
            &[q.clone(), k.clone(), v.clone()],
        )
        .unwrap();
        assert_eq!(f32s(&causal), f32s(&out));
        // A bool mask hiding key 0 leaves only v[1].
        let keep = Tensor::bool(&[1, 1, 1, 2], vec![false, true]).unwrap();
        let masked = eval(
            &attention(MaskSpec::Dense, 1.0),
            &[q.clone(), k.clone(), v.clone(), keep],
        )
        .unwrap();
        assert_eq!(f32s(&masked), [3., 4.]);
        // An additive mask of ln 3 on key 1 makes the weights [e/(e+3), 3/(e+3)].
        let add = Tensor::f32(&[1, 1, 1, 2], vec![0., 3f32.ln()]).unwrap();
        let shifted = eval(
            &attention(MaskSpec::Dense, 1.0),
            &[q.clone(), k.clone(), v.clone(), add],
        )
        .unwrap();
        let w0 = std::f32::consts::E / (std::f32::consts::E + 3.0);
        assert_close(
            &f32s(&shifted),
            &[w0 + 3. * (1. - w0), 2. * w0 + 4. * (1. - w0)],
            1e-6,
        );
        // Nothing visible: zeros.
        let none = Tensor::bool(&[1, 1, 1, 2], vec![false, false]).unwrap();
        assert_eq!(
            f32s(&eval(&attention(MaskSpec::Dense, 1.0), &[q, k, v, none]).unwrap()),
            [0., 0.]
        );
    }

    #[test]
    fn causal_prefill_and_grouped_heads() {
        // Two query heads share one kv head; keys are orthogonal so scores are 0 or scale.
        // Causal: row 0 sees only v[0]; row 1 sees v[0], v[1] with equal scores (q1 . k0 = q1 . k1).
        let q = Tensor::f32(&[1, 2, 2, 1], vec![0., 1., 0., 1.]).unwrap();
        let k = Tensor::f32(&[1, 1, 2, 1], vec![1., 1.]).unwrap();
        let v = Tensor::f32(&[1, 1, 2, 1], vec![10., 20.]).unwrap();
        let out = eval(&attention(MaskSpec::Causal, 0.5), &[q, k, v]).unwrap();
        assert_eq!(out.shape(), [1, 2, 2, 1]);
        assert_eq!(f32s(&out), [10., 15., 10., 15.]);
    }

    #[test]
    fn attention_shape_rules() {
        let op = attention(MaskSpec::Causal, 0.125);
        let q = ty(DType::F32, &["batch", "12", "seq", "64"]);
        let kv = ty(DType::F32, &["batch", "4", "seq", "64"]);
        assert_eq!(
            infer(&op, &[q.clone(), kv.clone(), kv.clone()])
                .unwrap()
                .to_string(),
            "f32[batch, 12, seq, 64]"
        );
        let odd = ty(DType::F32, &["batch", "5", "seq", "64"]);
        assert!(infer(&op, &[q.clone(), odd.clone(), odd])
            .unwrap_err()
            .contains("multiple"));
        let mask = ty(DType::Bool, &["batch", "1", "1", "seq"]);
        assert!(infer(&op, &[q.clone(), kv.clone(), kv.clone(), mask]).is_ok());
        let bad_mask = ty(DType::F32, &["batch", "1", "1", "7"]);
        assert!(infer(&op, &[q, kv.clone(), kv, bad_mask]).is_err());
    }
}
