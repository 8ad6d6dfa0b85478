//! Collections of your own vectors on both stores in one run: upsert throughput through the
//! collection API (1,000 documents per write, the index maintained as they arrive), then
//! single-client dense search latency and recall@10 against exact search at several `ef`,
//! for ragway's embedded store and for PostgreSQL + pgvector.
//!
//! With `--load job` the documents go in as one ingestion job over a JSONL file instead
//! (as `ragway ingest` and `POST .../ingest` load them): a PostgreSQL collection that is
//! empty when the job starts is loaded without its HNSW index, built once at the end
//! (`postgres`); `postgres-incremental` seeds the collection with the file's first
//! document first, so the job inserts into the index as it goes, as every write did before.
//!
//! Vectors are clustered (1,000 Gaussian clusters on the unit sphere, `--dim` dimensions),
//! as in `filter-bench`. PostgreSQL is a throwaway server from `RAGWAY_PG_INSTALL` (see
//! `scripts/setup-postgres.sh`) or `--postgres-url`.
//!
//!     cargo run --release -p ragway-benches --bin store-bench -- --n 200000

use clap::Parser;
use ragway_benches::{clustered, median, own_vectors_settings, pct};
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
    /// Stores to run, comma-separated: `embedded`, `postgres`, `postgres-incremental`.
    #[arg(long, default_value = "embedded,postgres")]
    stores: String,
    /// How the documents go in: `upserts` (1,000 per write through the collection API) or
    /// `job` (one ingestion job over a JSONL file).
    #[arg(long, default_value = "upserts")]
    load: String,
    /// PostgreSQL's `maintenance_work_mem` in MiB for the index builds after a bulk load.
    #[arg(long)]
    index_memory_mb: Option<u32>,
    /// Then, on the embedded store: replace every document once, consolidate, and rewrite
    /// the log while a client keeps writing; prints that client's write latencies before
    /// and during the rewrite.
    #[arg(long)]
    upkeep: bool,
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
    let stores: Vec<&str> = args.stores.split(',').map(str::trim).collect();
    if let Some(bad) = stores.iter().find(|s| !matches!(**s, "embedded" | "postgres" | "postgres-incremental")) {
        anyhow::bail!("--stores: unknown store `{bad}` (embedded, postgres, postgres-incremental)");
    }
    if !matches!(args.load.as_str(), "upserts" | "job") {
        anyhow::bail!("--load: `upserts` or `job`, not `{}`", args.load);
    }
    let server = match &args.postgres_url {
        Some(_) => None,
        None if stores.iter().any(|s| s.starts_with("postgres")) => Some(LocalServer::from_env()?),
        None => None,
    };
    let document = |i: usize| DocumentInput {
        id: format!("d{i}"),
        text: format!("chunk {i}"),
        vector: Some(vectors[i].clone()),
        ..Default::default()
    };
    let jsonl = dir.path().join("vectors.jsonl");
    if args.load == "job" {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl)?);
        for i in 0..vectors.len() {
            serde_json::to_writer(&mut f, &document(i))?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let url = args.postgres_url.clone().or_else(|| server.as_ref().map(|s| s.url())).unwrap_or_default();
    let mut rows = Vec::new();
    for &store in &stores {
        let settings = own_vectors_settings("store_bench", dim);
        let c = std::sync::Arc::new(match store {
            "embedded" => Collection::create_with(&dir.path().join("embedded"), settings, None)?,
            _ => {
                let options = PgOptions { index_memory_mb: args.index_memory_mb, ..PgOptions::new(url.clone()) };
                let db = PgDatabase::connect(&options)?;
                let _ = PgStore::drop_collection(&db, "store_bench");
                let pg = PgStore::create(db, settings.clone())?;
                Collection::with_store(&dir.path().join(store), settings, None, Box::new(pg))
            }
        });
        if store == "postgres-incremental" {
            // The job then finds the collection holding a document (the same one, so it is
            // left unchanged): its index is kept and maintained row by row.
            c.upsert(vec![document(0)], false)?;
        }
        let t = Instant::now();
        if args.load == "job" {
            load_job(&c, &jsonl, store)?;
        } else {
            load_upserts(&c, vectors.len(), args.writers, store, &document)?;
        }
        c.commit()?;
        let upsert_s = t.elapsed().as_secs_f64();
        let rate = args.n as f64 / upsert_s;
        match args.load.as_str() {
            "job" => {
                println!("{store:<9} loaded {} vectors in {upsert_s:.1} s by one ingestion job: {rate:.0}/s", args.n)
            }
            _ => println!(
                "{store:<9} upserted {} vectors in {upsert_s:.1} s with {} writers: {rate:.0}/s",
                args.n, args.writers
            ),
        }
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
        let upkeep = if args.upkeep && store == "embedded" { Some(upkeep(&c, &vectors)?) } else { None };
        rows.push(json!({"store": store, "load": args.load, "writers": args.writers, "upsert_s": upsert_s, "upserts_per_s": rate, "searches": searches, "upkeep": upkeep}));
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
    let row = |name: &str| rows.iter().find(|r| r["store"] == name);
    if let (Some(e), Some(p)) = (row("embedded").and_then(at_95), row("postgres").and_then(at_95)) {
        println!(
            "recall@10 >= 0.95: embedded ef {} {:.0} QPS, postgres ef {} {:.0} QPS: postgres/embedded x{:.2}; upserts/s x{:.2}",
            e["ef"],
            e["qps"].as_f64().unwrap_or(0.0),
            p["ef"],
            p["qps"].as_f64().unwrap_or(0.0),
            p["qps"].as_f64().unwrap_or(0.0) / e["qps"].as_f64().unwrap_or(f64::NAN),
            upserts_per_s(&rows, "postgres") / upserts_per_s(&rows, "embedded")
        );
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&json!({"n": args.n, "dim": dim, "results": rows}))?)?;
    }
    Ok(())
}

/// Upserts documents `0..n` into `c`, 1,000 per write, from `writers` clients at once, with
/// the rate every 10 s.
fn load_upserts(
    c: &Collection,
    n: usize,
    writers: usize,
    store: &str,
    document: &(dyn Fn(usize) -> DocumentInput + Sync),
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let t = Instant::now();
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..writers.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let mut last = Instant::now();
                    loop {
                        let first = next.fetch_add(1, Ordering::Relaxed) * 1000;
                        if first >= n {
                            return Ok(());
                        }
                        let batch = first..(first + 1000).min(n);
                        let len = batch.len();
                        c.upsert(batch.map(document).collect(), false)?;
                        let written = done.fetch_add(len, Ordering::Relaxed) + len;
                        if last.elapsed().as_secs() >= 10 {
                            last = Instant::now();
                            let rate = written as f64 / t.elapsed().as_secs_f64();
                            eprintln!("[store-bench] {store}: {written} upserted, {rate:.0}/s");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })
}

/// Loads `jsonl` into `c` by one ingestion job, with its progress every 10 s.
fn load_job(c: &std::sync::Arc<Collection>, jsonl: &std::path::Path, store: &str) -> anyhow::Result<()> {
    use ragway_index::jobs::{JobRegistry, JobState};
    let registry = JobRegistry::default();
    let job = registry.submit(
        c.clone(),
        ragway_index::ingest::Source::Jsonl(jsonl.to_path_buf()),
        Default::default(),
        None,
    )?;
    let mut last = Instant::now();
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if last.elapsed().as_secs() >= 10 {
            last = Instant::now();
            let p = job.view().progress;
            let doing = if p.indexing { "building the index" } else { "writing" };
            eprintln!(
                "[store-bench] {store}: {} written, {:.0}/s, {doing}",
                p.documents_written, p.documents_per_second
            );
        }
    }
    let view = job.view();
    anyhow::ensure!(view.state == JobState::Done, "the job failed: {view:?}");
    Ok(())
}

/// A store's upserts per second in `rows`.
fn upserts_per_s(rows: &[Value], store: &str) -> f64 {
    rows.iter().find(|r| r["store"] == store).and_then(|r| r["upserts_per_s"].as_f64()).unwrap_or(f64::NAN)
}

/// The embedded store's upkeep after every document was replaced once: consolidation, then
/// the log rewrite with a client writing 100 documents at a time beside it (its latencies
/// for 3 s before the rewrite, and during it).
fn upkeep(c: &Collection, vectors: &[Vec<f32>]) -> anyhow::Result<Value> {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    let doc = |i: usize, round: usize| DocumentInput {
        id: format!("d{i}"),
        text: format!("chunk {i} version {round}"),
        vector: Some(vectors[i].clone()),
        ..Default::default()
    };
    let t = Instant::now();
    for (b, batch) in vectors.chunks(1000).enumerate() {
        c.upsert((0..batch.len()).map(|j| doc(b * 1000 + j, 1)).collect(), false)?;
    }
    c.commit()?;
    let replace_s = t.elapsed().as_secs_f64();
    let store = c.embedded().ok_or_else(|| anyhow::anyhow!("not an embedded collection"))?;
    let t = Instant::now();
    while store.needs_consolidation() {
        store.consolidate();
    }
    let consolidate_s = t.elapsed().as_secs_f64();
    let log = store.dir().join("log.wal");
    let log_before = std::fs::metadata(&log)?.len();
    // 0: before the rewrite, 1: during it, 2: stop.
    let phase = AtomicU8::new(0);
    let started = AtomicBool::new(false);
    let (before, during, rewrite_s, under_lock) = std::thread::scope(|s| -> anyhow::Result<_> {
        let writer = s.spawn(|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
            let (mut before, mut during) = (Vec::new(), Vec::new());
            let mut next = 0usize;
            loop {
                let p = phase.load(Ordering::Relaxed);
                if p == 2 {
                    return Ok((before, during));
                }
                let docs = (0..100).map(|j| doc((next + j) % vectors.len(), 2)).collect();
                next += 100;
                let t = Instant::now();
                c.upsert(docs, false)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                started.store(true, Ordering::Relaxed);
                if p == 0 {
                    before.push(ms)
                } else {
                    during.push(ms)
                }
            }
        });
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        phase.store(1, Ordering::Relaxed);
        let t = Instant::now();
        let under_lock = store.rewrite_log();
        let rewrite_s = t.elapsed().as_secs_f64();
        phase.store(2, Ordering::Relaxed);
        let (before, during) = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok((before, during, rewrite_s, under_lock?))
    })?;
    let log_after = std::fs::metadata(&log)?.len();
    println!(
        "embedded  upkeep: replaced {} documents in {replace_s:.1} s, consolidated in {consolidate_s:.1} s; log \
         {log_before} -> {log_after} bytes rewritten in {rewrite_s:.1} s, {under_lock} bytes copied under the writer lock",
        vectors.len()
    );
    for (name, v) in [("before", &before), ("during", &during)] {
        println!(
            "embedded  writes of 100 documents {name} the rewrite: {} writes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    Ok(json!({
        "replace_s": replace_s, "consolidate_s": consolidate_s, "rewrite_s": rewrite_s,
        "log_bytes_before": log_before, "log_bytes_after": log_after, "copied_under_lock": under_lock,
        "write_ms_before": {"n": before.len(), "p50": pct(&before, 0.5), "p99": pct(&before, 0.99), "max": pct(&before, 1.0)},
        "write_ms_during": {"n": during.len(), "p50": pct(&during, 0.5), "p99": pct(&during, 0.99), "max": pct(&during, 1.0)},
    }))
}
