use ragway_engine::kernels;
use std::time::Instant;
fn main() {
    let mut row: Vec<f32> = (0..176).map(|k| ((k * 31) % 101) as f32 / 50.0 - 1.0).collect();
    let n = 100_000;
    let s = Instant::now();
    for _ in 0..n { kernels::softmax_inplace(&mut row); row[3] += 0.1; }
    println!("softmax 176: {:.1} ns/row ({})", s.elapsed().as_secs_f64() * 1e9 / n as f64, row[3]);
    let s = Instant::now();
    let mut acc = 0.0;
    for i in 0..n*176 { acc += kernels::exp(-(i % 1000) as f32 * 0.01); }
    println!("exp: {:.2} ns ({acc})", s.elapsed().as_secs_f64() * 1e9 / (n * 176) as f64);
}
