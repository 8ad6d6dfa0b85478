use ragway_engine::kernels;
use std::time::Instant;
fn main() {
    let (t, h, i) = (4224usize, 384usize, 1536usize);
    let lens = vec![176usize; 24];
    let qkv: Vec<f32> = (0..t * 3 * h).map(|k| ((k * 7919) % 997) as f32 / 997.0 - 0.5).collect();
    let bias = vec![0.01f32; 3 * h];
    let s = Instant::now();
    let mut qkv = qkv;
    let ctx = kernels::packed_attention(&mut qkv, &bias, &lens, 12, 32, 0.17);
    println!("attention: {:.1} ms ({})", s.elapsed().as_secs_f64() * 1e3, ctx[5]);
    let mut x: Vec<f32> = (0..t * i).map(|k| ((k * 31) % 101) as f32 / 50.0 - 1.0).collect();
    let b = vec![0.1f32; i];
    let s = Instant::now();
    kernels::bias_gelu_inplace(&mut x, &b);
    println!("gelu: {:.1} ms ({})", s.elapsed().as_secs_f64() * 1e3, x[7]);
    let y: Vec<f32> = (0..t * h).map(|k| ((k * 31) % 101) as f32 / 50.0 - 1.0).collect();
    let g = vec![1.0f32; h];
    let s = Instant::now();
    let o = kernels::add_layer_norm(&y, Some(&g), Some(&y), &g, &g, 1e-12);
    println!("ln: {:.1} ms ({})", s.elapsed().as_secs_f64() * 1e3, o[3]);
}
