//! Criterion benches of the packed quantized products at decode's shape: one activation row
//! times 4096 × 4096 matrices (the size of a 7B model's attention projections), on the
//! engine's thread team (every core), for each packed kind a GGUF type is read as — Q3_K as
//! its own Q3 tiles (4 bits a weight) and as the Q6 blocks it was read as before (7 bits),
//! Q2_K as its own Q2 tiles (4 bits) and as the Q8_0 requantization before (8.5), side by
//! side. Decode reads every weight once per token, so the bytes a kind reads decide
//! its speed: each iteration multiplies the next of 8 copies of the matrix (128 Mi weights,
//! more than any L3 cache holds), as a decoder steps through its layers. Then 16 rows at
//! once (a prefill's shape, where the kernels' arithmetic counts more than the bytes) for
//! each GGUF type as it is served. Reported as weights/s (weights × rows for the batch).
//!
//!     cargo bench -p ragway-benches --bench qmatmul

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ragway_engine::generate::qmatmul::{PackedMatrix, QActs, QKind};
use ragway_engine::generate::repack::{rewrite_as, target};

fn qmatmul(c: &mut Criterion) {
    let (n, k) = (4096, 4096);
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
    let x: Vec<f32> = (0..k).map(|_| next()).collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let mut acts = QActs::default();
    acts.quantize(&x, 1, k);
    let mut out = vec![0f32; n];
    // A prefill's shape: 16 activation rows share each tile read.
    let xb: Vec<f32> = (0..BATCH * k).map(|_| next()).collect();
    let mut batch = QActs::default();
    batch.quantize(&xb, BATCH, k);
    let mut out_batch = vec![0f32; BATCH * n];
    let mut group = c.benchmark_group("qmatmul_1x4096x4096");
    group.throughput(Throughput::Elements((n * k) as u64));
    group.sample_size(20);
    let mut batched = Vec::new();
    let cases = [
        ("q4_0", GgmlDType::Q4_0, None),
        ("q8_0", GgmlDType::Q8_0, None),
        ("q4_k_as_q4_1", GgmlDType::Q4K, None),
        ("q6_k_as_q6", GgmlDType::Q6K, None),
        ("q3_k_as_q3", GgmlDType::Q3K, None),
        ("q3_k_as_q6", GgmlDType::Q3K, Some(QKind::Q6)),
        ("q2_k_as_q2", GgmlDType::Q2K, None),
        ("q2_k_as_q8_0", GgmlDType::Q2K, Some(QKind::Q8_0)),
    ];
    for (name, dtype, kind) in cases {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let kind = kind.or(target(dtype)).unwrap();
        let values = || q.dequantize(&Device::Cpu).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok();
        let raw = rewrite_as(dtype, kind, &q.data().unwrap(), values).unwrap();
        let copies: Vec<PackedMatrix> = (0..8).map(|_| PackedMatrix::from_ggml(kind, n, k, &raw).unwrap()).collect();
        let bits = copies[0].size_in_bytes() as f64 * 8.0 / (n * k) as f64;
        eprintln!("{name}: {bits:.2} bits a weight read");
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % copies.len();
                copies[i].matmul(&acts, &mut out)
            })
        });
        if dtype != GgmlDType::Q8_0 && (kind == target(dtype).unwrap()) {
            batched.push((name, copies));
        }
    }
    group.finish();
    let mut group = c.benchmark_group(format!("qmatmul_{BATCH}x4096x4096"));
    group.throughput(Throughput::Elements((BATCH * n * k) as u64));
    group.sample_size(10);
    for (name, copies) in &batched {
        let mut i = 0;
        group.bench_function(*name, |b| {
            b.iter(|| {
                i = (i + 1) % copies.len();
                copies[i].matmul(&batch, &mut out_batch)
            })
        });
    }
    group.finish();
}

/// Activation rows of the batched group.
const BATCH: usize = 16;

criterion_group!(benches, qmatmul);
criterion_main!(benches);
