//! Fused attention, tiled (online softmax over 64-key tiles) against materialized (one tile
//! holding every key), one batch and 12 heads, sequences 128 to 4096, head dims 32 and 64, on
//! one thread (the run's team is not entered). The lowering rule in codegen
//! (`MATERIALIZED_MAX_KEYS`) is set from these numbers.
//! Run with `cargo bench -p kiln-runtime --bench attention`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_runtime::{kiln_attention, AttentionCall};

const HEADS: usize = 12;

fn call(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    seq: usize,
    d: usize,
    tile_k: usize,
) -> AttentionCall {
    AttentionCall {
        q: q.as_ptr(),
        k: k.as_ptr(),
        v: v.as_ptr(),
        out: out.as_mut_ptr(),
        mask: std::ptr::null(),
        mask_kind: 0,
        mask_strides: [0; 4],
        batch: 1,
        heads: HEADS as i64,
        kv_heads: HEADS as i64,
        sq: seq as i64,
        sk: seq as i64,
        d: d as i64,
        dv: d as i64,
        scale: (d as f64).powf(-0.5),
        static_mask: 0,
        window: 0,
        global: 0,
        tile_q: 32,
        tile_k: tile_k as i64,
    }
}

fn lowerings(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for d in [32, 64] {
        for seq in [128, 256, 512, 1024, 2048, 4096] {
            let len = HEADS * seq * d;
            let q: Vec<f32> = (0..len)
                .map(|i| ((i * 7) % 13) as f32 * 0.05 - 0.3)
                .collect();
            let k: Vec<f32> = (0..len)
                .map(|i| ((i * 5) % 11) as f32 * 0.05 - 0.25)
                .collect();
            let v: Vec<f32> = (0..len).map(|i| ((i * 3) % 17) as f32 * 0.1).collect();
            let mut out = vec![0f32; len];
            group.throughput(Throughput::Elements((HEADS * seq * seq * 4 * d) as u64));
            for (name, tile_k) in [("tiled", 64), ("materialized", seq)] {
                let id = BenchmarkId::new(format!("{name}-d{d}"), seq);
                group.bench_function(id, |bench| {
                    let description = call(&q, &k, &v, &mut out, seq, d, tile_k);
                    // SAFETY: the buffers hold [1, 12, seq, d] each.
                    bench.iter(|| unsafe { kiln_attention(&description) })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, lowerings);
criterion_main!(benches);
