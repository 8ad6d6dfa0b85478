//! The dense half alone: ragway's HNSW graph (`ragway_index::hnsw`, with the index's
//! AVX2/FMA kernels of `ragway_index::simd` as the distance), against exact search and against hnswlib and faiss on the very
//! same vectors in the same run.
//!
//! Data (`--data`):
//! - `scifact` (default): the chunk embeddings of an ingested SciFact collection (run
//!   `retrieval-bench` first), topped up to `--n` with vectors shaped like them (a random
//!   mix of two real vectors plus noise, normalized); queries are the 1,109 SciFact queries'
//!   embeddings.
//! - `normal`: isotropic Gaussian vectors, a pathological case for every HNSW (reported
//!   separately).
//!
//! Reports build time, resident memory, and per `ef`: recall@10 against exact search, QPS
//! on one thread and on all threads. With `--churn F`, then deletes a random fraction `F`
//! of the points, takes them out of the graph without a rebuild (`DenseIndex::consolidate`),
//! inserts the same vectors again under new keys (into the freed slots), and reports what
//! that cost against the build, and recall and QPS after it against before.
//!
//!     cargo run --release -p ragway-benches --bin ann-bench -- --n 100000

use clap::Parser;
use ragway_benches::{reference_python, workspace_root};
use ragway_engine::embed::{Embedder, EmbedderOptions};
use ragway_engine::rng::SplitMix64;
use ragway_index::dense::{exact_search, DenseIndex, Distance, HnswParams, Quantization};
use ragway_index::{ChunkEmbedder, Collection, LocalEmbedder};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value = "scifact")]
    data: String,
    /// Ingested SciFact collection (from retrieval-bench).
    #[arg(long)]
    collection: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    #[arg(long, default_value = "16,32,64,128,256")]
    efs: String,
    #[arg(long)]
    no_reference: bool,
    /// Single-thread passes over the queries per `ef` (the median is reported).
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Quantizations to search with, each on the same build (`none`, `f16`, `int8`).
    #[arg(long, default_value = "none,f16,int8")]
    quantization: String,
    /// The graph's quantization while it is built (`none` or `int8`: an int8 graph's inserts
    /// walk on the codes); the searches then take each of `--quantization` on that graph.
    #[arg(long, default_value = "none")]
    build_quantization: String,
    /// Fraction of the points to delete and insert again after the measurements (0: none).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
}

/// A standard normal from 24-bit uniforms (the data this driver's published runs used).
fn normal(rng: &mut SplitMix64) -> f32 {
    let (u1, u2) = (rng.next_f32().max(1e-7), rng.next_f32());
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn normalize(v: &mut [f32]) {
    Distance::Cosine.prepare(v);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// The top-`k` keys (mapped by `key`) of every query at `ef`, and the median
/// single-thread QPS over `passes` passes.
fn single_thread(
    index: &DenseIndex,
    queries: &[Vec<f32>],
    k: usize,
    ef: usize,
    passes: usize,
    key: impl Fn(u64) -> u64,
) -> (Vec<Vec<u64>>, f64) {
    let mut qps = Vec::new();
    let mut found = Vec::new();
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        found =
            queries.iter().map(|q| index.search(q, k, ef, &|_| true).into_iter().map(|x| key(x.0)).collect()).collect();
        qps.push(queries.len() as f64 / t.elapsed().as_secs_f64());
    }
    qps.sort_by(f64::total_cmp);
    (found, qps[qps.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dim = 384;
    let mut rng = SplitMix64::new(42);
    let (base, queries) = match args.data.as_str() {
        "normal" => {
            let mut gen = |n: usize| -> Vec<Vec<f32>> {
                (0..n)
                    .map(|_| {
                        let mut v: Vec<f32> = (0..dim).map(|_| normal(&mut rng)).collect();
                        normalize(&mut v);
                        v
                    })
                    .collect()
            };
            let base = gen(args.n);
            (base, gen(1000))
        }
        "scifact" => {
            let models = args.models_dir.clone().unwrap_or_else(|| workspace_root().join("models"));
            let embedder = Arc::new(LocalEmbedder {
                model_id: "all-MiniLM-L6-v2".into(),
                embedder: Embedder::load(&models.join("all-MiniLM-L6-v2"), EmbedderOptions::default())?,
            });
            let dir = args.collection.clone().unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ragway/bench/scifact-default")
            });
            let real = Collection::open(&dir, embedder.clone())
                .map_err(|e| anyhow::anyhow!("{}: {e} (run retrieval-bench first)", dir.display()))?
                .export_vectors()?;
            let mut base = real.clone();
            while base.len() < args.n {
                let (i, j) = (rng.next_u64() as usize % real.len(), rng.next_u64() as usize % real.len());
                let a = 0.5 + 0.5 * rng.next_f32();
                let mut v: Vec<f32> =
                    (0..dim).map(|d| a * real[i][d] + (1.0 - a) * real[j][d] + 0.02 * normal(&mut rng)).collect();
                normalize(&mut v);
                base.push(v);
            }
            base.truncate(args.n);
            let text = std::fs::read_to_string(workspace_root().join("../shared/data/scifact/queries.jsonl"))?;
            let queries = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|v| {
                    embedder.embed_query(v["text"].as_str().unwrap_or_default()).map(|mut q| {
                        normalize(&mut q);
                        q
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (base, queries)
        }
        other => anyhow::bail!("unknown --data {other}"),
    };
    let k = 10;
    eprintln!(
        "[ann-bench] {} vectors, {} queries ({}): exact search for the ground truth",
        base.len(),
        queries.len(),
        args.data
    );
    let t = Instant::now();
    let gt: Vec<Vec<u64>> = queries
        .par_iter()
        .map(|q| {
            exact_search(Distance::Cosine, q, base.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), k)
                .into_iter()
                .map(|x| x.0)
                .collect()
        })
        .collect();
    let exact_qps = queries.len() as f64 / t.elapsed().as_secs_f64();

    let build_quant: Quantization = serde_json::from_value(json!(args.build_quantization))
        .map_err(|_| anyhow::anyhow!("unknown --build-quantization {}", args.build_quantization))?;
    let rss0 = rss_bytes();
    let params = HnswParams { m: args.m, ef_construction: args.ef_construction, ef: 64 };
    let t = Instant::now();
    let index = DenseIndex::new(params, build_quant, Distance::Cosine, base[0].len(), base.len());
    let items: Vec<(&[f32], u64)> = base.iter().enumerate().map(|(i, v)| (v.as_slice(), i as u64)).collect();
    let ids = index.insert(&items);
    let build_s = t.elapsed().as_secs_f64();
    let graph_mib = (rss_bytes().saturating_sub(rss0)) as f64 / (1 << 20) as f64;
    eprintln!(
        "[ann-bench] ragway HNSW built in {build_s:.1}s ({} threads, {build_quant:?}), +{graph_mib:.0} MiB resident",
        rayon::current_num_threads()
    );

    let recall = |found: &[Vec<u64>]| -> f64 {
        found.iter().zip(&gt).map(|(f, g)| f.iter().filter(|x| g.contains(x)).count() as f64 / k as f64).sum::<f64>()
            / gt.len() as f64
    };
    let efs: Vec<usize> = args.efs.split(',').map(|e| e.parse()).collect::<Result<_, _>>()?;
    let quants: Vec<Quantization> = args
        .quantization
        .split(',')
        .map(|q| serde_json::from_value(json!(q)).map_err(|_| anyhow::anyhow!("unknown quantization {q}")))
        .collect::<anyhow::Result<_>>()?;
    // One table per quantization, all on the same graph; `rows` (compared with the
    // references below) is the unquantized one, or the first asked for.
    let mut by_quant = serde_json::Map::new();
    let mut rows = Vec::new();
    for &quant in &quants {
        index.set_quantization(quant);
        let code_bytes = quant.words(dim) * 4;
        let mut these = Vec::new();
        for &ef in &efs {
            let (found, median) = single_thread(&index, &queries, k, ef, args.passes, |key| key);
            let t = Instant::now();
            let _: Vec<_> = queries.par_iter().map(|q| index.search(q, k, ef, &|_| true)).collect();
            let all = queries.len() as f64 / t.elapsed().as_secs_f64();
            let r = recall(&found);
            println!(
                "ragway {quant:<5?} ef={ef:<4} recall@10 {r:.4}  QPS 1 thread {median:.0}  all threads {all:.0}  (walk reads {} B a point)",
                if code_bytes > 0 { code_bytes } else { dim * 4 }
            );
            these.push(json!({"ef": ef, "recall": r, "qps_1_thread": median, "qps_all_threads": all}));
        }
        if rows.is_empty() || quant == Quantization::None {
            rows = these.clone();
        }
        by_quant.insert(
            serde_json::to_value(quant)?.as_str().unwrap_or("?").to_string(),
            json!({"code_bytes": code_bytes, "by_ef": these}),
        );
    }
    let mut reference = Value::Null;
    if !args.no_reference {
        if let Some(python) = reference_python() {
            let tmp = tempfile::tempdir()?;
            let write = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
                let p = tmp.path().join(name);
                std::fs::File::create(&p)?.write_all(bytes)?;
                Ok(p)
            };
            let flat = |vs: &[Vec<f32>]| vs.iter().flatten().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let b = write("base.f32", &flat(&base))?;
            let q = write("queries.f32", &flat(&queries))?;
            let g = write("gt.i64", &gt.iter().flatten().flat_map(|x| (*x as i64).to_le_bytes()).collect::<Vec<u8>>())?;
            let out = std::process::Command::new(python)
                .arg(workspace_root().join("benches/scripts/ann_reference.py"))
                .args(["--base", b.to_str().unwrap(), "--queries", q.to_str().unwrap(), "--gt", g.to_str().unwrap()])
                .args([
                    "--dim",
                    "384",
                    "--M",
                    &args.m.to_string(),
                    "--ef-construction",
                    &args.ef_construction.to_string(),
                    "--efs",
                    &args.efs,
                ])
                .args(["--reps", &args.passes.max(1).to_string()])
                .output()?;
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            reference = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap_or(Value::Null);
            for lib in ["hnswlib", "faiss"] {
                if let Some(r) = reference.get(lib) {
                    println!("{lib:<8} build {:.1}s", r["build_s"].as_f64().unwrap_or(0.0));
                    for (i, row) in r["by_ef"].as_array().into_iter().flatten().enumerate() {
                        let qps = row["qps"].as_f64().unwrap_or(0.0);
                        let ratios: Vec<String> = by_quant
                            .iter()
                            .map(|(q, t)| {
                                format!("{q} {:.2}", t["by_ef"][i]["qps_1_thread"].as_f64().unwrap_or(0.0) / qps)
                            })
                            .collect();
                        println!(
                            "{lib:<8} ef={:<4} recall@10 {:.4}  QPS 1 thread {qps:.0}   ragway/{lib} QPS ratio: {}",
                            row["ef"],
                            row["recall"].as_f64().unwrap_or(0.0),
                            ratios.join(", ")
                        );
                    }
                }
            }
        }
    }
    // QPS at the smallest `ef` that reaches each recall target, for every engine.
    let mut at_recall = serde_json::Map::new();
    let mut tables: Vec<(String, Vec<(f64, f64)>)> = by_quant
        .iter()
        .map(|(q, t)| {
            let rows = t["by_ef"].as_array().into_iter().flatten();
            (
                format!("ragway {q}"),
                rows.map(|r| (r["recall"].as_f64().unwrap_or(0.0), r["qps_1_thread"].as_f64().unwrap_or(0.0)))
                    .collect(),
            )
        })
        .collect();
    for lib in ["hnswlib", "faiss"] {
        if let Some(r) = reference.get(lib) {
            let rows = r["by_ef"].as_array().into_iter().flatten();
            tables.push((
                lib.to_string(),
                rows.map(|r| (r["recall"].as_f64().unwrap_or(0.0), r["qps"].as_f64().unwrap_or(0.0))).collect(),
            ));
        }
    }
    for target in [0.90, 0.95, 0.99] {
        let line: Vec<String> = tables
            .iter()
            .map(|(name, rows)| match rows.iter().find(|r| r.0 >= target) {
                Some(r) => {
                    at_recall.insert(format!("{name} @{target}"), json!(r.1));
                    format!("{name} {:.0}", r.1)
                }
                None => format!("{name} -"),
            })
            .collect();
        println!("QPS (1 thread) at the smallest ef with recall@10 >= {target}: {}", line.join(", "));
    }
    let churn = if args.churn > 0.0 {
        index.set_quantization(Quantization::None);
        let n = base.len();
        let count = ((n as f64 * args.churn.min(1.0)) as usize).max(1);
        // A random `count` of the keys (a partial Fisher-Yates shuffle).
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix64::new(7);
        for i in 0..count {
            let j = i + rng.next_u64() as usize % (n - i);
            order.swap(i, j);
        }
        let gone = &order[..count];
        let dead: Vec<u32> = gone.iter().map(|&i| ids[i]).collect();
        let t = Instant::now();
        let done = index.consolidate(&dead);
        let consolidate_s = t.elapsed().as_secs_f64();
        // The same vectors again under new keys: the ground truth keeps its vectors.
        let items: Vec<(&[f32], u64)> = gone.iter().map(|&i| (base[i].as_slice(), (n + i) as u64)).collect();
        let t = Instant::now();
        index.insert(&items);
        let reinsert_s = t.elapsed().as_secs_f64();
        println!(
            "churn: {count} points ({:.0}%) deleted and taken out of the graph in {consolidate_s:.1}s ({} lists rewritten, \
             {} points relinked; the build took {build_s:.1}s, {:.1}x as long), inserted again in {reinsert_s:.1}s; \
             {} slots for {n} points",
            args.churn * 100.0,
            done.lists,
            done.linked,
            build_s / consolidate_s,
            index.len()
        );
        let before = by_quant.get("none").map(|t| t["by_ef"].clone()).unwrap_or(Value::Null);
        let mut after = Vec::new();
        for (i, &ef) in efs.iter().enumerate() {
            // Keys `n + i` are the vectors of keys `i`, inserted again.
            let (found, qps) = single_thread(&index, &queries, k, ef, args.passes, |key| key % n as u64);
            let r = recall(&found);
            println!(
                "churn: ef={ef:<4} recall@10 {r:.4} (before {:.4})  QPS 1 thread {qps:.0} (before {:.0})",
                before[i]["recall"].as_f64().unwrap_or(f64::NAN),
                before[i]["qps_1_thread"].as_f64().unwrap_or(f64::NAN)
            );
            after.push(json!({"ef": ef, "recall": r, "qps_1_thread": qps}));
        }
        json!({"fraction": args.churn, "points": count, "consolidate_s": consolidate_s, "lists_rewritten": done.lists,
               "relinked": done.linked, "reinsert_s": reinsert_s, "slots": index.len(), "by_ef": after})
    } else {
        Value::Null
    };
    println!(
        "{}",
        json!({"bench": "ann", "data": args.data, "churn": churn, "n": base.len(), "queries": queries.len(), "m": args.m,
               "ef_construction": args.ef_construction, "build_s": build_s, "build_quantization": build_quant, "graph_resident_mib": graph_mib,
               "exact_qps_all_threads": exact_qps, "ragway": rows, "ragway_by_quantization": by_quant, "qps_at_recall": at_recall,
               "reference": reference})
    );
    Ok(())
}
