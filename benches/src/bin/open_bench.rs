//! What a restart costs: the time from `Collection::open` to a collection that answers, with
//! the page cache warm and with the collection's files dropped from it, and the resident
//! memory per chunk once open.
//!
//! The collection holds `--n` documents of one chunk each that bring their own vectors
//! (`model: null`, clustered unit vectors of `--dim` dimensions) and SciFact abstracts as
//! their text (cycled), with a `bucket` metadata field. It is written through the public API,
//! closed gracefully (so the derived data is saved), then opened in a fresh child process per
//! measurement, so that the resident memory is the open collection's alone.
//!
//!     cargo run --release -p ragway-benches --bin open-bench -- --n 100000

use clap::Parser;
use ragway_benches::{median, own_vectors_settings, unit, workspace_root, Clusters};
use ragway_engine::rng::SplitMix64 as Rng;
use ragway_index::{Collection, DocumentInput, SearchMode, SearchRequest};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Opens per page-cache state (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where to build the collection (a temporary directory when absent); an existing
    /// collection there is reused as is.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The collection's quantization (`none`, `f16`, `int8`).
    #[arg(long, default_value = "none")]
    quantization: String,
    /// Opens the collection in `--dir`, writes one more document and closes it, so that
    /// its graph and table are saved again in this build's formats; then measures.
    #[arg(long)]
    resave: bool,
    /// Internal: open the collection at this path, print one JSON line, exit.
    #[arg(long, hide = true)]
    open_only: Option<PathBuf>,
    /// With `--open-only`: drop the collection's files from the page cache first.
    #[arg(long, hide = true)]
    cold: bool,
}

/// Resident memory: (anonymous, file-backed) bytes. File-backed pages are the mapped
/// files' page cache, shared and dropped under memory pressure.
fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Evicts a directory's files from the page cache (clean pages; no privileges needed).
fn drop_cache(dir: &Path) {
    for p in files(dir) {
        if let Ok(f) = std::fs::File::open(&p) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor; the call only advises the kernel.
            unsafe {
                libc::fdatasync(f.as_raw_fd());
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Single-thread dense searches per second over `queries` (after one warm-up pass).
fn qps(c: &Collection, queries: &[Vec<f32>]) -> anyhow::Result<f64> {
    let search = |q: &Vec<f32>| {
        c.search(&SearchRequest {
            top_k: 10,
            mode: SearchMode::Dense,
            vector: Some(q.clone()),
            skip_drift: true,
            ..Default::default()
        })
    };
    for q in queries {
        search(q)?;
    }
    let t = Instant::now();
    for q in queries {
        search(q)?;
    }
    Ok(queries.len() as f64 / t.elapsed().as_secs_f64())
}

/// Query vectors: random unit vectors near random stored ones' clusters (seeded).
fn queries(dim: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(7);
    (0..2000).map(|_| unit((0..dim).map(|_| rng.normal() as f32).collect())).collect()
}

fn open_only(dir: &Path, cold: bool) -> anyhow::Result<()> {
    if cold {
        drop_cache(dir);
    }
    let rss0 = rss_bytes();
    let t = Instant::now();
    let c = Collection::open_embedded_by(dir, None)?;
    let dim = c.settings().dimension;
    // The first search proves the collection answers (and pays any lazy loading).
    let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    let r = c.search(&SearchRequest {
        top_k: 10,
        mode: SearchMode::Dense,
        vector: Some(q),
        skip_drift: true,
        ..Default::default()
    })?;
    let open_s = t.elapsed().as_secs_f64();
    let now = rss_bytes();
    let (rss, rss_file) = (now.0.saturating_sub(rss0.0), now.1.saturating_sub(rss0.1));
    let stats = c.open_stats();
    let (loaded, inserted) = (stats.graph_loaded, stats.graph_inserted);
    let qps = if cold { None } else { Some(qps(&c, &queries(dim))?) };
    // After the searches: what they brought in (vectors read from the page cache).
    let now = rss_bytes();
    let rss_searched = (now.0 + now.1).saturating_sub(rss0.0 + rss0.1);
    println!(
        "{}",
        json!({"open_s": open_s, "rss_bytes": rss, "rss_file_bytes": rss_file, "hits": r.results.len(), "graph_loaded": loaded,
               "graph_inserted": inserted, "table_loaded": stats.table_loaded, "log_records": stats.log_records,
               "graph_and_keyword_ms": stats.graph_ms, "table_ms": stats.table_ms, "total_ms": stats.total_ms,
               "qps": qps, "rss_after_searches": rss_searched})
    );
    Ok(())
}

fn build(dir: &Path, n: usize, dim: usize, quantization: &str) -> anyhow::Result<()> {
    let corpus = std::fs::read_to_string(workspace_root().join("../shared/data/scifact/corpus.jsonl"))?;
    let texts: Vec<(String, String)> = corpus
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| (d["title"].as_str().unwrap_or("").to_string(), d["text"].as_str().unwrap_or("").to_string()))
        .collect();
    anyhow::ensure!(!texts.is_empty(), "no SciFact texts");
    let mut rng = Rng::new(42);
    let clusters = Clusters::new(dim, &mut rng);
    let settings = ragway_index::CollectionSettings {
        quantization: serde_json::from_value(json!(quantization))
            .map_err(|_| anyhow::anyhow!("unknown quantization {quantization}"))?,
        ..own_vectors_settings("open", dim)
    };
    let c = Collection::create_with(dir, settings, None)?;
    let t = Instant::now();
    let batch = 1000;
    for start in (0..n).step_by(batch) {
        let docs = (start..(start + batch).min(n))
            .map(|i| {
                let (title, text) = &texts[i % texts.len()];
                let v = clusters.point(&mut rng);
                DocumentInput {
                    id: format!("d{i}"),
                    title: Some(title.clone()),
                    text: text.clone(),
                    metadata: Some(json!({"bucket": i % 1000})),
                    vector: Some(v),
                    ..Default::default()
                }
            })
            .collect();
        c.upsert(docs, false)?;
        if start % 50_000 == 0 && start > 0 {
            eprintln!("[open-bench] {start} documents written ({:.0} s)", t.elapsed().as_secs_f64());
        }
    }
    c.commit()?;
    let write_s = t.elapsed().as_secs_f64();
    eprintln!("[open-bench] single-thread QPS as built (in memory): {:.0}", qps(&c, &queries(dim))?);
    let t = Instant::now();
    c.close()?;
    eprintln!("[open-bench] {n} documents written in {write_s:.1} s, closed in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.open_only {
        return open_only(dir, args.cold);
    }
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().join("open"));
    if !dir.join("settings.json").exists() {
        build(&dir, args.n, args.dim, &args.quantization)?;
    } else if args.resave {
        let c = Collection::open_embedded_by(&dir, None)?;
        let dim = c.settings().dimension;
        let doc = DocumentInput {
            id: "resaved".into(),
            // A new version every time (an unchanged document is skipped, and nothing saved).
            text: format!(
                "One more document, so that closing saves the graph and the table again ({:?}).",
                std::time::SystemTime::now()
            ),
            vector: Some((0..dim).map(|i| if i == 1 { 1.0 } else { 0.0 }).collect()),
            ..Default::default()
        };
        c.upsert(vec![doc], true)?;
        let t = Instant::now();
        c.close()?;
        eprintln!("[open-bench] saved again in {:.1} s", t.elapsed().as_secs_f64());
    }
    let sizes: Vec<(String, u64)> = {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for p in files(&dir) {
            let rel = p.strip_prefix(&dir).unwrap_or(&p);
            let top = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
            *by.entry(top).or_default() += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        by.into_iter().collect()
    };
    let exe = std::env::current_exe()?;
    let mut report = json!({"n": args.n, "dim": args.dim, "quantization": args.quantization, "files_bytes": sizes});
    println!("| page cache | open (median s) | resident MiB (anonymous + file) | bytes per chunk (anonymous + file) | graph points loaded / inserted | table loaded / log records read | QPS after open | bytes per chunk after the searches (both) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for cold in [false, true] {
        let mut runs = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let mut cmd = Command::new(&exe);
            cmd.arg("--open-only").arg(&dir);
            if cold {
                cmd.arg("--cold");
            }
            let out = cmd.output()?;
            anyhow::ensure!(out.status.success(), "open failed: {}", String::from_utf8_lossy(&out.stderr));
            let line = String::from_utf8_lossy(&out.stdout);
            runs.push(serde_json::from_str::<Value>(line.trim())?);
        }
        let open_s = median(&runs.iter().map(|r| r["open_s"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let rss = median(&runs.iter().map(|r| r["rss_bytes"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let rss_file =
            median(&runs.iter().map(|r| r["rss_file_bytes"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let state = if cold { "dropped" } else { "warm" };
        println!(
            "| {state} | {open_s:.2} | {:.0} + {:.0} | {:.0} + {:.0} | {} / {} | {} / {} | {} | {:.0} |",
            rss / (1 << 20) as f64,
            rss_file / (1 << 20) as f64,
            rss / args.n as f64,
            rss_file / args.n as f64,
            runs[0]["graph_loaded"],
            runs[0]["graph_inserted"],
            runs[0]["table_loaded"],
            runs[0]["log_records"],
            runs[0]["qps"].as_f64().map_or("-".to_string(), |q| format!("{q:.0}")),
            runs[0]["rss_after_searches"].as_f64().unwrap_or(f64::NAN) / args.n as f64
        );
        report[state] = json!({"open_s": open_s, "rss_bytes": rss, "rss_file_bytes": rss_file, "runs": runs});
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
