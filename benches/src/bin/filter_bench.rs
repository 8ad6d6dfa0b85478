//! Filtered dense search through a real collection (log, tantivy and graph on disk): recall@10
//! against exact search over the matching chunks, and median latency, at filter selectivities
//! from 0.1% to 100%, for the planner's choice and for each plan forced (exact scan over the
//! matching chunks; filtered graph walk).
//!
//! Vectors are clustered (1,000 Gaussian clusters on the unit sphere, `--dim` dimensions),
//! brought by the documents themselves (`model: null`), so no embedding model is needed. Each
//! chunk carries `bucket = i % 1000`; a filter `bucket < b` matches a `b / 1000` share,
//! independent of where the vectors lie.
//!
//!     cargo run --release -p ragway-benches --bin filter-bench -- --n 100000

use clap::Parser;
use ragway_benches::{clustered, own_vectors_settings};
use ragway_index::filter::Filter;
use ragway_index::{Collection, DocumentInput, SearchMode, SearchRequest};
use serde_json::json;
use std::collections::HashSet;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Matching buckets out of 1,000 (the filter's selectivity in per mille).
    #[arg(long, default_value = "1,5,10,20,50,100,300,1000")]
    buckets: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dim = args.dim;
    let (vectors, queries) = clustered(args.n, args.queries, dim);

    let dir = tempfile::tempdir()?;
    let c = Collection::create_with(&dir.path().join("filtered"), own_vectors_settings("filtered", dim), None)?;
    let t = Instant::now();
    for (start, batch) in vectors.chunks(1000).enumerate().map(|(b, v)| (b * 1000, v)) {
        let docs = batch
            .iter()
            .enumerate()
            .map(|(j, v)| DocumentInput {
                id: format!("d{}", start + j),
                text: format!("chunk {}", start + j),
                metadata: Some(json!({"bucket": (start + j) % 1000})),
                vector: Some(v.clone()),
                ..Default::default()
            })
            .collect();
        c.upsert(docs, false)?;
    }
    c.commit()?;
    eprintln!("[filter-bench] {} vectors of {dim} dimensions ingested in {:.1} s", args.n, t.elapsed().as_secs_f64());

    println!("| matching | plan | recall@10 | median ms | exact scans |");
    println!("|---:|---|---:|---:|---:|");
    for b in args.buckets.split(',').map(|s| s.trim().parse::<usize>()) {
        let b = b?;
        let filter = Filter::parse(&json!({"key": "bucket", "lt": b}))?;
        // Ground truth: exact top 10 over the matching vectors.
        let truth: Vec<HashSet<String>> = queries
            .iter()
            .map(|q| {
                let mut scored: Vec<(f32, usize)> = vectors
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 1000 < b)
                    .map(|(i, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                scored.iter().take(10).map(|(_, i)| format!("d{i}")).collect()
            })
            .collect();
        for (plan, exact_scan_max) in [("planner", None), ("exact", Some(usize::MAX)), ("graph", Some(0))] {
            let mut times = Vec::new();
            let (mut found, mut exact) = (0usize, 0usize);
            for (q, want) in queries.iter().zip(&truth) {
                let req = SearchRequest {
                    top_k: 10,
                    mode: SearchMode::Dense,
                    filter: Some(filter.clone()),
                    vector: Some(q.clone()),
                    exact_scan_max,
                    skip_drift: true,
                    ..Default::default()
                };
                let t = Instant::now();
                let r = c.search(&req)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                exact += usize::from(r.dense_exact);
                found += r.results.iter().filter(|h| want.contains(&h.document_id)).count();
            }
            times.sort_by(f64::total_cmp);
            let recall = found as f64 / (10 * queries.len()) as f64;
            println!(
                "| {:.1}% ({}) | {plan} | {recall:.3} | {:.2} | {exact}/{} |",
                b as f64 / 10.0,
                args.n * b / 1000,
                times[times.len() / 2],
                queries.len()
            );
        }
    }
    Ok(())
}
