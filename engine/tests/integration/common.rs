use ragway_engine::embed::{Embedder, EmbedderOptions};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The models directory: `RAGWAY_MODELS_DIR`, else the workspace's `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("RAGWAY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

pub fn minilm_dir() -> PathBuf {
    let dir = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no model: run scripts/setup-models.sh first",
        dir.display()
    );
    dir
}

/// One embedder shared by the tests of this binary.
pub fn minilm() -> &'static Embedder {
    static E: OnceLock<Embedder> = OnceLock::new();
    E.get_or_init(|| Embedder::load(&minilm_dir(), EmbedderOptions::default()).expect("load all-MiniLM-L6-v2"))
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `v` less its mean: logits compared by cosine after centering, as a constant shift of every
/// logit changes no probability.
pub fn centered(v: &[f32]) -> Vec<f32> {
    let m = v.iter().sum::<f32>() / v.len() as f32;
    v.iter().map(|x| x - m).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
