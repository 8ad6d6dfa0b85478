//! Collections of your own vectors on both stores in one run: upsert throughput through the
//! collection API (1,000 documents per write, the index maintained as they arrive), then
//! single-client dense search latency and recall@10 against exact search at several `ef`,
//! for ragway's embedded store and for PostgreSQL + pgvector.
//!
//! Vectors are clustered (1,000 Gaussian clusters on the unit sphere, `--dim` dimensions),
//! as in `filter-bench`. PostgreSQL is a throwaway server from `RAGWAY_PG_INSTALL` (see
//! `scripts/setup-postgres.sh`) or `--postgres-url`.
//!
//!     cargo run --release -p ragway-benches --bin store-bench -- --n 200000

use clap::Parser;
use ragway_benches::{clustered, median, own_vectors_settings};
use ragway_index::postgres::{LocalServer, PgDatabase, PgOptions, PgStore};
use ragway_index::{Collection, DocumentInput, SearchMode, SearchRequest};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    n: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Clients upserting at once (disjoint batches).
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// `ef` values to search with, comma-separated.
    #[arg(long, default_value = "16,32,64,128,256")]
    efs: String,
    /// An existing PostgreSQL instead of a throwaway server (a collection `store_bench` is
    /// created there, replacing one of that name).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dim = args.dim;
    let (vectors, queries) = clustered(args.n, args.queries, dim);
    let efs: Vec<usize> = args.efs.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    eprintln!("[store-bench] exact top 10 of {} queries over {} vectors", queries.len(), args.n);
    let truth: Vec<HashSet<String>> = queries
        .par_iter()
        .map(|q| {
            let mut scored: Vec<(f32, usize)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i))
                .collect();
            scored.select_nth_unstable_by(10, |a, b| b.0.total_cmp(&a.0));
            scored[..10].iter().map(|(_, i)| format!("d{i}")).collect()
        })
        .collect();

    let dir = tempfile::tempdir()?;
    let server = match &args.postgres_url {
        Some(_) => None,
        None => Some(LocalServer::from_env()?),
    };
    let url = args.postgres_url.clone().unwrap_or_else(|| server.as_ref().expect("server").url());
    let mut rows = Vec::new();
    for store in ["embedded", "postgres"] {
        let settings = own_vectors_settings("store_bench", dim);
        let c = match store {
            "embedded" => Collection::create_with(&dir.path().join("embedded"), settings, None)?,
            _ => {
                let db = PgDatabase::connect(&PgOptions::new(url.clone()))?;
                let _ = PgStore::drop_collection(&db, "store_bench");
                let pg = PgStore::create(db, settings.clone())?;
                Collection::with_store(&dir.path().join("postgres"), settings, None, Box::new(pg))
            }
        };
        let t = Instant::now();
        let batches: Vec<(usize, &[Vec<f32>])> = vectors.chunks(1000).enumerate().collect();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let workers: Vec<_> = (0..args.writers.max(1))
                .map(|_| {
                    scope.spawn(|| -> anyhow::Result<()> {
                        let mut last = Instant::now();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(b, batch)) = batches.get(i) else { return Ok(()) };
                            let docs = batch
                                .iter()
                                .enumerate()
                                .map(|(j, v)| DocumentInput {
                                    id: format!("d{}", b * 1000 + j),
                                    text: format!("chunk {}", b * 1000 + j),
                                    vector: Some(v.clone()),
                                    ..Default::default()
                                })
                                .collect();
                            c.upsert(docs, false)?;
                            let n = done.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed) + batch.len();
                            if last.elapsed().as_secs() >= 10 {
                                last = Instant::now();
                                eprintln!(
                                    "[store-bench] {store}: {n} upserted, {:.0}/s",
                                    n as f64 / t.elapsed().as_secs_f64()
                                );
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            }
            Ok(())
        })?;
        c.commit()?;
        let upsert_s = t.elapsed().as_secs_f64();
        let rate = args.n as f64 / upsert_s;
        println!(
            "{store:<9} upserted {} vectors in {upsert_s:.1} s with {} writers: {rate:.0}/s",
            args.n, args.writers
        );
        let mut searches = Vec::new();
        for &ef in &efs {
            let mut times = Vec::new();
            let mut found = 0usize;
            for (q, want) in queries.iter().zip(&truth) {
                let req = SearchRequest {
                    top_k: 10,
                    mode: SearchMode::Dense,
                    vector: Some(q.clone()),
                    ef: Some(ef),
                    // Ten candidates: the walk's breadth is `ef` alone.
                    candidates: Some(10),
                    skip_drift: true,
                    ..Default::default()
                };
                let t = Instant::now();
                let r = c.search(&req)?;
                times.push(t.elapsed().as_secs_f64());
                found += r.results.iter().filter(|h| want.contains(&h.document_id)).count();
            }
            let recall = found as f64 / (10 * queries.len()) as f64;
            let ms = median(&times) * 1e3;
            println!("{store:<9} ef {ef:<4} recall@10 {recall:.3}  median {ms:.2} ms  {:.0} QPS (1 client)", 1e3 / ms);
            searches.push(json!({"ef": ef, "recall@10": recall, "median_ms": ms, "qps": 1e3 / ms}));
        }
        rows.push(json!({"store": store, "writers": args.writers, "upsert_s": upsert_s, "upserts_per_s": rate, "searches": searches}));
    }
    // Side by side: the fastest setting of each store that reaches recall@10 0.95.
    let at_95 = |row: &Value| {
        row["searches"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["recall@10"].as_f64().unwrap_or(0.0) >= 0.95)
            .max_by(|a, b| a["qps"].as_f64().unwrap_or(0.0).total_cmp(&b["qps"].as_f64().unwrap_or(0.0)))
            .cloned()
    };
    if let (Some(e), Some(p)) = (at_95(&rows[0]), at_95(&rows[1])) {
        println!(
            "recall@10 >= 0.95: embedded ef {} {:.0} QPS, postgres ef {} {:.0} QPS: postgres/embedded x{:.2}; upserts/s x{:.2}",
            e["ef"],
            e["qps"].as_f64().unwrap_or(0.0),
            p["ef"],
            p["qps"].as_f64().unwrap_or(0.0),
            p["qps"].as_f64().unwrap_or(0.0) / e["qps"].as_f64().unwrap_or(f64::NAN),
            rows[1]["upserts_per_s"].as_f64().unwrap_or(0.0) / rows[0]["upserts_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&json!({"n": args.n, "dim": dim, "results": rows}))?)?;
    }
    Ok(())
}
