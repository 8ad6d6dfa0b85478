use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    for &(m, k, n) in &[(4096usize, 384usize, 1152usize), (4096, 384, 1536), (4096, 1536, 384)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
        let _ = a.matmul(&b)?;
        let t = Instant::now();
        for _ in 0..5 { let _ = a.matmul(&b)?; }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!("{m}x{k}x{n}: {:.1} ms, {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
    }
    Ok(())
}
