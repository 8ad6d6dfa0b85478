//! Shared helpers of ragway's benchmark drivers: corpora, medians, and running the
//! reference implementations from `shared/reference/` in the same run.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// `n` clustered unit vectors and `queries` more from the same clusters (seed 42).
pub fn clustered(n: usize, queries: usize, dim: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = ragway_engine::rng::SplitMix64::new(42);
    let clusters = Clusters::new(dim, &mut rng);
    let vectors = (0..n).map(|_| clusters.point(&mut rng)).collect();
    let queries = (0..queries).map(|_| clusters.point(&mut rng)).collect();
    (vectors, queries)
}

/// `v` scaled to unit length.
pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    ragway_index::dense::Distance::Cosine.prepare(&mut v);
    v
}

/// Copies a directory with its files and subdirectories (benchmarks copy collections).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
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
        quantization: Default::default(),
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

/// The `p` quantile of a sample (nearest rank); NaN when empty.
pub fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Latencies (s) of every request completed in `seconds` by `c` clients looping on `call`.
pub async fn closed_loop<F, Fut>(c: usize, seconds: f64, call: F) -> (Vec<f64>, f64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    call().await.expect("request failed");
                    lat.push(t.elapsed().as_secs_f64());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    (all, t0.elapsed().as_secs_f64())
}

/// A server process, killed when dropped.
pub struct ServerProcess(pub std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `ragway` binary beside the running one on a free port with these models and
/// data directory (and `extra` arguments); returns once `/ready` answers 200.
pub fn start_server(models: &Path, data: &Path, extra: &[String]) -> anyhow::Result<(ServerProcess, String)> {
    let exe = std::env::current_exe()?.with_file_name("ragway");
    anyhow::ensure!(exe.is_file(), "{} not found: build it with `cargo build --release --bins`", exe.display());
    let mut child = Command::new(&exe)
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .arg("--models-dir")
        .arg(models)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn,ragway_gateway::http::server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow::anyhow!("the server did not start"))?;
    let server = ServerProcess(child);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if reqwest::blocking::get(format!("{url}/ready")).is_ok_and(|r| r.status() == 200) {
            return Ok((server, url));
        }
        anyhow::ensure!(Instant::now() < deadline, "the server never became ready");
        // Short: `rest-bench` measures the time to ready with it.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Generation drivers shared by `gen-bench` and `gpu-bench`: prompts of an exact token
/// count and the arrival time of each streamed token.
pub mod gen {
    use ragway_engine::generate::{GenEvent, GenerateHandle, GenerationRequest, SamplingParams};
    use std::time::{Duration, Instant};

    /// The text bench_llamacpp.py repeats to build its prompt.
    pub const TEXT: &str = "The history of computing is a story of abstraction layered upon abstraction. Early machines were \
programmed by rewiring panels; later, stored programs allowed instructions to live in memory beside \
data. Assembly languages gave names to opcodes, compilers translated structured languages into \
machine code, and operating systems hid the details of devices behind files and processes. ";

    /// `n` tokens of "Document {salt}." followed by [`TEXT`] repeated.
    pub fn prompt(handle: &GenerateHandle, n: usize, salt: usize) -> anyhow::Result<Vec<u32>> {
        let mut text = format!("Document {salt}. ");
        loop {
            let ids = handle.tokenizer().encode(&text, true)?;
            if ids.len() >= n {
                return Ok(ids[..n].to_vec());
            }
            text.push_str(TEXT);
        }
    }

    /// A greedy request that generates exactly `max_tokens` (EOS ignored).
    pub fn greedy_request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
        let mut r = GenerationRequest::new(prompt, max_tokens, SamplingParams::greedy());
        r.ignore_eos = true;
        r
    }

    /// Times of each token of one request (relative to submission).
    pub fn token_times(handle: &GenerateHandle, req: GenerationRequest) -> anyhow::Result<Vec<Duration>> {
        let t0 = Instant::now();
        let mut stream = handle.submit(req)?;
        let mut times = Vec::new();
        while let Some(ev) = stream.blocking_next() {
            match ev {
                GenEvent::Token { .. } => times.push(t0.elapsed()),
                GenEvent::Error { message } => anyhow::bail!(message),
                GenEvent::Done { .. } => break,
                GenEvent::Text { .. } => {}
            }
        }
        Ok(times)
    }
}
