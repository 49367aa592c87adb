//! Rotary position embedding from cos and sin tables: `out = x cos + rotate(x) sin`, where
//! `rotate` maps each pair `(x1, x2)` to `(-x2, x1)`, with the arithmetic of the decomposed
//! graph (a product by each table, then a sum), so the result has the same bits.

/// One rope call as generated code lays it out: 8-byte fields in this order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RopeCall {
    /// `[batch, heads, seq, head_dim]`, contiguous.
    pub x: *const f32,
    /// The cos table; its last axis is `head_dim`, contiguous.
    pub cos: *const f32,
    /// The sin table, laid out as `cos`.
    pub sin: *const f32,
    /// Like `x`; does not overlap the operands.
    pub out: *mut f32,
    /// Batch size.
    pub batch: i64,
    /// Heads.
    pub heads: i64,
    /// Positions.
    pub seq: i64,
    /// Head dim, even.
    pub head_dim: i64,
    /// Element strides of the cos table along batch, head and position (0 where it broadcasts).
    pub cos_strides: [i64; 3],
    /// The same for the sin table.
    pub sin_strides: [i64; 3],
    /// Non-zero: the pairs are `(2i, 2i+1)`; zero: `(i, i + head_dim/2)`.
    pub interleaved: i64,
}

/// Applies one rope call.
///
/// # Safety
/// `call` must point to a [`RopeCall`] whose pointers address buffers of those shapes and
/// strides, `out` overlapping none of them. Negative or odd sizes do nothing.
#[no_mangle]
pub unsafe extern "C" fn kiln_rope(call: *const RopeCall) {
    // SAFETY: the caller's contract.
    let call = unsafe { *call };
    let sizes = [call.batch, call.heads, call.seq, call.head_dim].map(usize::try_from);
    let [Ok(batch), Ok(heads), Ok(seq), Ok(d)] = sizes else {
        return;
    };
    if d % 2 != 0 || batch * heads * seq * d == 0 {
        return;
    }
    let (x, cos, sin, out) = (
        call.x as usize,
        call.cos as usize,
        call.sin as usize,
        call.out as usize,
    );
    crate::vector::split(batch * heads, batch * heads * seq * d, &|rows| {
        for row in rows {
            let (b, h) = (row / heads, row % heads);
            for s in 0..seq {
                let table = |strides: [i64; 3]| {
                    (b as i64 * strides[0] + h as i64 * strides[1] + s as i64 * strides[2]) as isize
                };
                let at = (row * seq + s) * d;
                // SAFETY: row (b, h, s) of x and out and the tables' rows for it exist (the
                // caller's contract); out overlaps none of the others.
                let (x, cos, sin, out) = unsafe {
                    (
                        std::slice::from_raw_parts((x as *const f32).add(at), d),
                        std::slice::from_raw_parts(
                            (cos as *const f32).offset(table(call.cos_strides)),
                            d,
                        ),
                        std::slice::from_raw_parts(
                            (sin as *const f32).offset(table(call.sin_strides)),
                            d,
                        ),
                        std::slice::from_raw_parts_mut((out as *mut f32).add(at), d),
                    )
                };
                if call.interleaved != 0 {
                    rotate_interleaved(x, cos, sin, out);
                } else {
                    rotate_halves(x, cos, sin, out);
                }
            }
        }
    });
}

/// HF's `x * cos + rotate_half(x) * sin`, `rotate_half(x) = concat(-x2, x1)`.
fn rotate_halves(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (cos1, cos2) = cos.split_at(half);
    let (sin1, sin2) = sin.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = x1[i] * cos1[i] + -x2[i] * sin1[i];
        out2[i] = x2[i] * cos2[i] + x1[i] * sin2[i];
    }
}

/// The same on the pairs `(2i, 2i+1)`.
fn rotate_interleaved(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    for i in (0..x.len()).step_by(2) {
        out[i] = x[i] * cos[i] + -x[i + 1] * sin[i];
        out[i + 1] = x[i + 1] * cos[i + 1] + x[i] * sin[i + 1];
    }
}
