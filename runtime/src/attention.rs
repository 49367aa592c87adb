//! Fused scaled dot-product attention: `softmax(scale * q @ k^T + mask) @ v` per batch and
//! head, with grouped key/value heads, a static mask and an optional run-time mask.
//!
//! Work is split into (batch, head, query tile) items over the run's threads. Each item walks
//! the keys in tiles with an online softmax (FlashAttention-2): a running maximum and sum per
//! query row, the accumulators rescaled when the maximum grows, so scores never exist beyond
//! one tile. With one tile covering every key this is the materialized lowering. Key tiles the
//! static mask hides from every row of the item are never visited.

use crate::vector;

/// The static masks of [`AttentionCall::static_mask`] other than dense (0).
const CAUSAL: i64 = 1;
const SLIDING_WINDOW: i64 = 2;
const GLOBAL_LOCAL: i64 = 3;

/// The run-time mask kinds of [`AttentionCall::mask_kind`].
const NO_MASK: i64 = 0;
const KEEP_MASK: i64 = 1;
const ADDITIVE_MASK: i64 = 2;

/// One attention call as generated code lays it out: 8-byte fields in this order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttentionCall {
    /// `[batch, heads, sq, d]`.
    pub q: *const f32,
    /// `[batch, kv_heads, sk, d]`.
    pub k: *const f32,
    /// `[batch, kv_heads, sk, dv]`.
    pub v: *const f32,
    /// `[batch, heads, sq, dv]`.
    pub out: *mut f32,
    /// The run-time mask, or null: bytes (non-zero keeps) or f32 added to the scores.
    pub mask: *const u8,
    /// 0 none, 1 keep (bool bytes), 2 additive (f32).
    pub mask_kind: i64,
    /// Element strides of the mask along batch, head, query and key (0 where it broadcasts).
    pub mask_strides: [i64; 4],
    /// Batch size.
    pub batch: i64,
    /// Query heads.
    pub heads: i64,
    /// Key/value heads; divides `heads`.
    pub kv_heads: i64,
    /// Queries.
    pub sq: i64,
    /// Keys.
    pub sk: i64,
    /// Query/key head dim.
    pub d: i64,
    /// Value head dim.
    pub dv: i64,
    /// Multiplies the scores.
    pub scale: f64,
    /// 0 dense, 1 causal, 2 sliding window, 3 global + local.
    pub static_mask: i64,
    /// The window of masks 2 and 3.
    pub window: i64,
    /// The global tokens of mask 3.
    pub global: i64,
    /// Query rows per item.
    pub tile_q: i64,
    /// Keys per tile; `sk` or more gives the materialized lowering.
    pub tile_k: i64,
}

// SAFETY: the pointers are only read (q, k, v, mask) or written at disjoint rows (out) by the
// items, as the caller's contract promises.
unsafe impl Sync for AttentionCall {}

/// Dims as usize, after the checks the kernel relies on.
struct Dims {
    batch: usize,
    heads: usize,
    group: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
    tile_q: usize,
    tile_k: usize,
}

impl AttentionCall {
    fn dims(&self) -> Option<Dims> {
        let size = |v: i64| usize::try_from(v).ok();
        let kv_heads = size(self.kv_heads).filter(|&h| h > 0)?;
        let heads = size(self.heads)?;
        if heads % kv_heads != 0 {
            return None;
        }
        Some(Dims {
            batch: size(self.batch)?,
            heads,
            group: heads / kv_heads,
            sq: size(self.sq)?,
            sk: size(self.sk)?,
            d: size(self.d)?,
            dv: size(self.dv)?,
            tile_q: size(self.tile_q)?.max(1),
            tile_k: size(self.tile_k)?.max(1),
        })
    }

    /// Whether the static mask lets absolute position `pos` see key `key`.
    fn allows(&self, pos: i64, key: i64) -> bool {
        match self.static_mask {
            CAUSAL => key <= pos,
            SLIDING_WINDOW => key <= pos && pos < key + self.window,
            GLOBAL_LOCAL => {
                pos < self.global || key < self.global || (pos - key).abs() < self.window
            }
            _ => true,
        }
    }

    /// Whether no position in `rows` sees any key in `keys` (only decided for the masks whose
    /// visible keys form one band per row).
    fn hides_tile(&self, rows: (i64, i64), keys: (i64, i64)) -> bool {
        match self.static_mask {
            CAUSAL => keys.0 > rows.1,
            SLIDING_WINDOW => keys.0 > rows.1 || keys.1 + self.window <= rows.0,
            _ => false,
        }
    }

    /// Whether the static mask lets position `pos` see every key in `keys` (decided for the
    /// same masks; a global + local mask is checked key by key).
    fn shows_tile(&self, pos: i64, keys: (i64, i64)) -> bool {
        match self.static_mask {
            CAUSAL => keys.1 <= pos,
            SLIDING_WINDOW => keys.1 <= pos && pos < keys.0 + self.window,
            GLOBAL_LOCAL => false,
            _ => true,
        }
    }
}

/// Computes one attention call.
///
/// # Safety
/// The pointers must address buffers of the dims given (the mask through its strides), `out`
/// not overlapping the others. Returns 0, or 1 when the dims are inconsistent (nothing written).
#[no_mangle]
pub unsafe extern "C" fn kiln_attention(call: *const AttentionCall) -> i64 {
    // SAFETY: the caller passes a valid call description.
    let call = unsafe { &*call };
    let Some(dims) = call.dims() else {
        return 1;
    };
    let q_tiles = dims.sq.div_ceil(dims.tile_q);
    let items = dims.batch * dims.heads * q_tiles;
    let work = dims.batch * dims.heads * dims.sq * dims.sk * (dims.d + dims.dv);
    let dims = &dims;
    crate::vector::split(items, work, &|range| {
        SCRATCH.with_borrow_mut(|scratch| {
            // Items of one head are consecutive: each thread transposes a head's keys once.
            scratch.keys_head = None;
            for item in range {
                // SAFETY: the call's buffers as the caller promised; items write disjoint rows.
                unsafe { run_item(call, dims, item, q_tiles, scratch) };
            }
        })
    });
    0
}

/// Per-thread working memory, grown to the largest call seen and then reused.
struct Scratch {
    /// Accumulators, running maxima and sums, score and product tiles of one item.
    tiles: Vec<f32>,
    /// The keys of one key/value head transposed to `[d, sk]`.
    keys_t: Vec<f32>,
    /// Which head `keys_t` holds in the current call.
    keys_head: Option<usize>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            tiles: Vec::new(),
            keys_t: Vec::new(),
            keys_head: None,
        })
    };
}

unsafe fn run_item(
    call: &AttentionCall,
    dims: &Dims,
    item: usize,
    q_tiles: usize,
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::vector::avx512() {
            // SAFETY: the CPU has AVX-512F; the caller's contract as above.
            return unsafe { item_avx512(call, dims, item, q_tiles, scratch) };
        }
        if crate::vector::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the caller's contract as above.
            return unsafe { item_avx2(call, dims, item, q_tiles, scratch) };
        }
    }
    // SAFETY: as above.
    unsafe { item_body(call, dims, item, q_tiles, scratch) }
}

/// [`item_body`] compiled for more CPU features, so that its loops vectorize for them.
macro_rules! item_with_features {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            call: &AttentionCall,
            dims: &Dims,
            item: usize,
            q_tiles: usize,
            scratch: &mut Scratch,
        ) {
            // SAFETY: as the caller promised.
            unsafe { item_body(call, dims, item, q_tiles, scratch) }
        }
    };
}

item_with_features!(item_avx512, "avx512f,avx2,fma");
item_with_features!(item_avx2, "avx2,fma");

/// One (batch, head, query tile) item with the online softmax over key tiles. Both products of
/// a tile, scores `Q K^T` and the weighted values `P V`, are the runtime's matrix product (on
/// this thread: items are already split over the team).
#[inline(always)]
unsafe fn item_body(
    call: &AttentionCall,
    dims: &Dims,
    item: usize,
    q_tiles: usize,
    scratch: &mut Scratch,
) {
    let Dims {
        heads,
        group,
        sq,
        sk,
        d,
        dv,
        tile_q,
        tile_k,
        ..
    } = *dims;
    let tile_k = tile_k.min(sk.max(1));
    let (bh, qt) = (item / q_tiles, item % q_tiles);
    let (bi, hi) = (bh / heads, bh % heads);
    let kv = bi * (heads / group) + hi / group;
    let rows = qt * tile_q..((qt + 1) * tile_q).min(sq);
    let n_rows = rows.len();
    let offset = sk as i64 - sq as i64;
    let need = tile_q * (2 * dv + 2) + tile_q * tile_k;
    if scratch.tiles.len() < need {
        scratch.tiles.resize(need, 0.0);
    }
    // SAFETY: the keys of head kv, [sk, d].
    let k = unsafe { std::slice::from_raw_parts(call.k.add(kv * sk * d), sk * d) };
    if scratch.keys_head != Some(kv) {
        // Each key tile transposed to [d, width], tile after tile: the right operands of the
        // head's score products. (One [d, sk] matrix would put the rows of long sequences a
        // power of two apart, on the same cache sets.)
        if scratch.keys_t.len() < d * sk {
            scratch.keys_t.resize(d * sk, 0.0);
        }
        for j0 in (0..sk).step_by(tile_k) {
            let width = tile_k.min(sk - j0);
            let block = &mut scratch.keys_t[j0 * d..(j0 + width) * d];
            for (j, key) in k[j0 * d..(j0 + width) * d].chunks_exact(d).enumerate() {
                for (c, &x) in key.iter().enumerate() {
                    block[c * width + j] = x;
                }
            }
        }
        scratch.keys_head = Some(kv);
    }
    let keys_t = &scratch.keys_t[..d * sk];
    let (acc, rest) = scratch.tiles.split_at_mut(tile_q * dv);
    let (weighted, rest) = rest.split_at_mut(tile_q * dv);
    let (running, rest) = rest.split_at_mut(2 * tile_q);
    let (max, sum) = running.split_at_mut(tile_q);
    let scores = &mut rest[..tile_q * tile_k];
    acc[..n_rows * dv].fill(0.0);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    // SAFETY (whole function): offsets stay inside the buffers of the dims given.
    let q = unsafe { call.q.add((bh * sq + rows.start) * d) };
    let v = unsafe { call.v.add(kv * sk * dv) };
    let scale = call.scale as f32;
    let masked = call.static_mask != 0 || call.mask_kind != NO_MASK;
    let first_pos = rows.start as i64 + offset;
    let last_pos = rows.end as i64 - 1 + offset;
    for j0 in (0..sk).step_by(tile_k) {
        let j1 = (j0 + tile_k).min(sk);
        let width = j1 - j0;
        if call.hides_tile((first_pos, last_pos), (j0 as i64, j1 as i64 - 1)) {
            continue;
        }
        let [m, n, kk] = [n_rows, width, d].map(|v| v as i64);
        // SAFETY: the query rows, columns j0.. of the transposed keys and the score tile.
        unsafe {
            crate::kiln_sgemm(
                m,
                n,
                kk,
                q,
                kk,
                keys_t.as_ptr().add(j0 * d),
                n,
                scores.as_mut_ptr(),
                n,
                std::ptr::null(),
            )
        };
        for (r, i) in rows.clone().enumerate() {
            let s = &mut scores[r * width..(r + 1) * width];
            let pos = i as i64 + offset;
            let tile_max =
                if !masked {
                    scale_and_max(s, scale, |_, x| x)
                } else if call.shows_tile(pos, (j0 as i64, j1 as i64 - 1))
                    && call.mask_strides[3] == 1
                {
                    // Only a run-time mask contiguous along the keys: one vectorized pass.
                    let row = call.mask_strides[0] * bi as i64
                        + call.mask_strides[1] * hi as i64
                        + call.mask_strides[2] * i as i64
                        + j0 as i64;
                    match call.mask_kind {
                        KEEP_MASK => {
                            // SAFETY: the mask covers keys j0.. of this row.
                            let keep = unsafe {
                                std::slice::from_raw_parts(call.mask.offset(row as isize), width)
                            };
                            scale_and_max(s, scale, |j, x| {
                                if keep[j] != 0 {
                                    x
                                } else {
                                    f32::NEG_INFINITY
                                }
                            })
                        }
                        ADDITIVE_MASK => {
                            // SAFETY: as above, f32.
                            let bias = unsafe {
                                std::slice::from_raw_parts(
                                    (call.mask as *const f32).offset(row as isize),
                                    width,
                                )
                            };
                            scale_and_max(s, scale, |j, x| x + bias[j])
                        }
                        _ => scale_and_max(s, scale, |_, x| x),
                    }
                } else {
                    s.iter_mut().for_each(|x| *x *= scale);
                    apply_masks(call, s, (bi, hi, i), j0, pos);
                    s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
                };
            if tile_max == f32::NEG_INFINITY {
                s.fill(0.0);
                continue;
            }
            let new_max = max[r].max(tile_max);
            let tile_sum = vector::exp_shifted_in_place(s, new_max);
            if max[r] != new_max && max[r] != f32::NEG_INFINITY {
                let correction = vector::exp(max[r] - new_max);
                sum[r] *= correction;
                acc[r * dv..(r + 1) * dv]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
            max[r] = new_max;
            sum[r] += tile_sum;
        }
        let [m, n, kk] = [n_rows, dv, width].map(|v| v as i64);
        // SAFETY: the probabilities, this tile's value rows and the product tile.
        unsafe {
            crate::kiln_sgemm(
                m,
                n,
                kk,
                scores.as_ptr(),
                kk,
                v.add(j0 * dv),
                n,
                weighted.as_mut_ptr(),
                n,
                std::ptr::null(),
            )
        };
        for (a, &w) in acc[..n_rows * dv].iter_mut().zip(&weighted[..n_rows * dv]) {
            *a += w;
        }
    }
    for (r, i) in rows.enumerate() {
        // SAFETY: row i of this head of the output.
        let out = unsafe { std::slice::from_raw_parts_mut(call.out.add((bh * sq + i) * dv), dv) };
        let row = &acc[r * dv..(r + 1) * dv];
        if sum[r] > 0.0 {
            let inverse = 1.0 / sum[r];
            for (o, &a) in out.iter_mut().zip(row) {
                *o = a * inverse;
            }
        } else {
            out.fill(0.0);
        }
    }
}

/// Sets each score `s[j]` to `mask(j, s[j] * scale)` and returns the largest, in eight
/// independent lanes so the loop vectorizes (NaN scores are not expected: they come only from
/// NaN inputs).
#[inline(always)]
fn scale_and_max(s: &mut [f32], scale: f32, mask: impl Fn(usize, f32) -> f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let whole = s.len() / 8 * 8;
    for (c, chunk) in s[..whole].chunks_exact_mut(8).enumerate() {
        for (l, (x, m)) in chunk.iter_mut().zip(&mut lanes).enumerate() {
            *x = mask(c * 8 + l, *x * scale);
            *m = if *x > *m { *x } else { *m };
        }
    }
    let mut max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (j, x) in s.iter_mut().enumerate().skip(whole) {
        *x = mask(j, *x * scale);
        max = if *x > max { *x } else { max };
    }
    max
}

/// Applies the static and run-time masks to one row of scaled scores (keys `j0..`) of query
/// `(batch, head, i)` at absolute position `pos`: hidden keys become -inf, additive masks add.
#[inline(always)]
fn apply_masks(
    call: &AttentionCall,
    s: &mut [f32],
    (bi, hi, i): (usize, usize, usize),
    j0: usize,
    pos: i64,
) {
    let row = call.mask_strides[0] * bi as i64
        + call.mask_strides[1] * hi as i64
        + call.mask_strides[2] * i as i64;
    for (j, sj) in s.iter_mut().enumerate() {
        let key = (j0 + j) as i64;
        let mut visible = call.allows(pos, key);
        let at = (row + call.mask_strides[3] * key) as isize;
        if call.mask_kind == KEEP_MASK {
            // SAFETY: the mask covers every (b, h, i, j) through its strides.
            visible &= unsafe { *call.mask.offset(at) } != 0;
        } else if call.mask_kind == ADDITIVE_MASK {
            // SAFETY: as above.
            *sj += unsafe { *(call.mask as *const f32).offset(at) };
        }
        if !visible {
            *sj = f32::NEG_INFINITY;
        }
    }
}
