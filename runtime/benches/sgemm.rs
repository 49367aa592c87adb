//! The matrix products of MiniLM at 128 tokens: `B` plain (read in place) and packed at compile
//! time into panels, as kiln stores weights; "packed-cold" cycles through enough copies of the
//! packed weight (as a model's many weights do) that each product starts with `B` out of cache.
//! Reports GFLOP/s through criterion's throughput. The `epilogue` group compares a product that
//! finishes its blocks with a bias and GELU (or a bias and a residual add) against the product
//! followed by whole-tensor passes, at MiniLM's 512-token shapes.
//! Run with `cargo bench -p kiln-runtime --bench sgemm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_runtime::vector::kiln_map_gelu;
use kiln_runtime::{kiln_sgemm, kiln_sgemm_packed, pack_b, Epilogue};

fn products(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    for (m, n, k) in [(128, 384, 384), (128, 1536, 384), (128, 384, 1536)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let packed = pack_b(k, n, &b, false);
        let mut out = vec![0f32; m * n];
        let label = format!("{m}x{n}x{k}");
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let [mi, ni, ki] = [m, n, k].map(|v| v as i64);
        group.bench_function(BenchmarkId::new("plain", &label), |bench| {
            // SAFETY: the buffers hold the matrices at these strides.
            bench.iter(|| unsafe {
                kiln_sgemm(
                    mi,
                    ni,
                    ki,
                    a.as_ptr(),
                    ki,
                    b.as_ptr(),
                    ni,
                    out.as_mut_ptr(),
                    ni,
                    std::ptr::null(),
                )
            })
        });
        group.bench_function(BenchmarkId::new("packed", &label), |bench| {
            bench.iter(|| packed_product([mi, ni, ki], &a, &packed, &mut out, std::ptr::null()))
        });
        let copies: Vec<Vec<f32>> = (0..COLD_BYTES / (4 * packed.len()))
            .map(|_| packed.clone())
            .collect();
        let mut next = 0;
        group.bench_function(BenchmarkId::new("packed-cold", &label), |bench| {
            bench.iter(|| {
                next = (next + 1) % copies.len();
                packed_product([mi, ni, ki], &a, &copies[next], &mut out, std::ptr::null())
            })
        });
    }
    group.finish();
}

fn epilogues(c: &mut Criterion) {
    let mut group = c.benchmark_group("epilogue");
    for (m, n, k, gelu) in [(512, 1536, 384, true), (512, 384, 1536, false)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.01 - 0.02).collect();
        let bias: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.1).collect();
        let residual: Vec<f32> = (0..m * n).map(|i| (i % 11) as f32 * 0.1).collect();
        let packed = pack_b(k, n, &b, false);
        let mut out = vec![0f32; m * n];
        let label = format!(
            "{m}x{n}x{k}-{}",
            if gelu { "bias-gelu" } else { "bias-residual" }
        );
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let [mi, ni, ki] = [m, n, k].map(|v| v as i64);
        let epilogue = Epilogue {
            bias: bias.as_ptr(),
            activation: if gelu {
                kiln_runtime::vector::Function::Gelu as i64
            } else {
                0
            },
            residual: if gelu {
                std::ptr::null()
            } else {
                residual.as_ptr()
            },
        };
        group.bench_function(BenchmarkId::new("in-product", &label), |bench| {
            bench.iter(|| packed_product([mi, ni, ki], &a, &packed, &mut out, &epilogue))
        });
        group.bench_function(BenchmarkId::new("separate-passes", &label), |bench| {
            bench.iter(|| {
                packed_product([mi, ni, ki], &a, &packed, &mut out, std::ptr::null());
                for row in out.chunks_exact_mut(n) {
                    row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
                }
                if gelu {
                    // SAFETY: `out` holds m * n f32, mapped in place.
                    unsafe { kiln_map_gelu((m * n) as i64, out.as_ptr(), out.as_mut_ptr()) };
                } else {
                    out.iter_mut().zip(&residual).for_each(|(v, r)| *v += r);
                }
            })
        });
    }
    group.finish();
}

/// `out = a · packed`, then the epilogue unless it is null, through the packed entry point.
fn packed_product(
    [m, n, k]: [i64; 3],
    a: &[f32],
    packed: &[f32],
    out: &mut [f32],
    epilogue: *const Epilogue,
) {
    assert!(a.len() as i64 >= m * k && out.len() as i64 >= m * n);
    // SAFETY: `a` and `out` hold the matrices (checked above) and `packed` holds B packed for k
    // and n (the callers pack it so); the epilogue's operands are sized for m x n.
    unsafe {
        kiln_sgemm_packed(
            m,
            n,
            k,
            a.as_ptr(),
            k,
            packed.as_ptr(),
            out.as_mut_ptr(),
            n,
            epilogue,
        )
    }
}

/// More bytes of packed weights than the caches hold.
const COLD_BYTES: usize = 64 << 20;

criterion_group!(benches, products, epilogues);
criterion_main!(benches);
