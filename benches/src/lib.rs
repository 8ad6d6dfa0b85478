//! Shared helpers of ragway's benchmark drivers: corpora, medians, and running the
//! reference implementations from `shared/reference/` in the same run.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Unit vectors in 1,000 Gaussian clusters on the sphere of `dim` dimensions: the shape of
/// real embeddings, seeded, for collections whose documents bring their own vectors.
pub struct Clusters {
    centers: Vec<Vec<f32>>,
    dim: usize,
}

impl Clusters {
    /// Draws the cluster centers from `rng`.
    pub fn new(dim: usize, rng: &mut ragway_engine::rng::SplitMix64) -> Clusters {
        let centers = (0..1000).map(|_| unit((0..dim).map(|_| rng.normal() as f32).collect())).collect();
        Clusters { centers, dim }
    }

    /// A point of a random cluster.
    pub fn point(&self, rng: &mut ragway_engine::rng::SplitMix64) -> Vec<f32> {
        let c = &self.centers[rng.below(self.centers.len())];
        unit(c.iter().map(|x| x + 0.6 * rng.normal() as f32 / (self.dim as f32).sqrt()).collect())
    }
}

/// `v` scaled to unit length.
pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    ragway_index::dense::Distance::Cosine.prepare(&mut v);
    v
}

/// Settings of a collection without an embedding model whose documents bring `dim`-dimension
/// vectors (cosine, default HNSW parameters).
pub fn own_vectors_settings(name: &str, dim: usize) -> ragway_index::CollectionSettings {
    ragway_index::CollectionSettings {
        name: name.into(),
        model: None,
        dimension: dim,
        distance: ragway_index::dense::Distance::Cosine,
        hnsw: Default::default(),
        chunking: Default::default(),
        fusion: Default::default(),
        keyword: Default::default(),
        created_at: 0,
    }
}

/// Texts of a JSONL file with a `text` field per line.
pub fn load_jsonl_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let raw = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            v["text"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("line without text"))
        })
        .collect()
}

/// Short queries (~10 words) made deterministically from the passages: words 3..13 of each.
pub fn short_queries(passages: &[String]) -> Vec<String> {
    passages.iter().map(|p| p.split_whitespace().skip(3).take(10).collect::<Vec<_>>().join(" ")).collect()
}

/// The workspace root (parent of `benches/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Python with the reference packages: `$RAGWAY_REF_PYTHON`, else the venv
/// `$HOME/.cache/ragway/refenv` that `scripts/setup-reference.sh` creates, when present.
pub fn reference_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RAGWAY_REF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/ragway/refenv/bin/python");
    p.is_file().then_some(p)
}

/// The shared reference drivers: `$RAGWAY_REFERENCE_DIR`, else `../shared/reference` beside
/// the workspace.
pub fn reference_dir() -> PathBuf {
    std::env::var_os("RAGWAY_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/reference"))
}

/// Runs a reference driver and parses the JSON line it prints last.
pub fn run_reference(python: &Path, script: &str, args: &[String]) -> anyhow::Result<Value> {
    let script = reference_dir().join(script);
    let out = Command::new(python).arg(&script).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
    Ok(serde_json::from_str(line)?)
}
