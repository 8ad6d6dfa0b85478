//! A collection of your own vectors end to end over REST: the `ragway` server, a collection
//! created with `"model": null`, `--n` documents of clustered `--dim`-dimension vectors
//! upserted through `POST /v1/collections/{name}/documents` by `--writers` clients (1,000 a
//! request), then dense searches by vector at each `--concurrency` level for `--seconds`
//! (requests/s, p50, p99, recall@10 against exact search over the same vectors), then the
//! time from process start to `/ready` after a graceful stop and after `kill -9`.
//!
//! The graph is saved in the background every 50,000 points (or a quarter of the graph), so
//! the upserts measure the index as it is maintained, saves included, and a restart after
//! `kill -9` replays only the log written since the last save.
//!
//!     cargo build --profile ci --bins && target/ci/rest-bench --n 1000000

use clap::Parser;
use ragway_benches::{closed_loop, clustered, pct, start_server, workspace_root};
use ragway_index::dense::{exact_search, Distance};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Documents per upsert request.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Clients upserting at once (disjoint batches).
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Queries (recall@10 is measured on all of them).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Concurrent search clients, comma-separated.
    #[arg(long, default_value = "1,8")]
    concurrency: String,
    /// Seconds of search load per level.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The data directory (a temporary one by default; it must not hold a collection
    /// `rest_bench`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const NAME: &str = "rest_bench";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models = args.models_dir.clone().unwrap_or_else(|| workspace_root().join("models"));
    let tmp = tempfile::tempdir()?;
    let data = args.data_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let levels: Vec<usize> = args.concurrency.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?;
    anyhow::ensure!(args.batch > 0 && args.writers > 0, "--batch and --writers must be positive");

    eprintln!("[rest-bench] {} clustered vectors of {} dimensions, {} queries", args.n, args.dim, args.queries);
    let (vectors, queries) = clustered(args.n, args.queries, args.dim);
    let truth: Vec<Vec<usize>> = queries
        .par_iter()
        .map(|q| {
            exact_search(Distance::Cosine, q, vectors.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 10)
                .into_iter()
                .map(|(i, _)| i as usize)
                .collect()
        })
        .collect();

    let t = Instant::now();
    let (server, url) = start_server(&models, &data, &[])?;
    let empty_ready_s = t.elapsed().as_secs_f64();
    let blocking = reqwest::blocking::Client::builder().timeout(None).build()?;
    let created = blocking
        .post(format!("{url}/v1/collections"))
        .json(&json!({"name": NAME, "model": null, "dimension": args.dim}))
        .send()?;
    anyhow::ensure!(created.status() == 201, "create: {} {}", created.status(), created.text()?);

    // Upserts: each writer takes the next batch until none is left.
    let vectors = Arc::new(vectors);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let batches = args.n.div_ceil(args.batch);
    let t = Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|s| -> anyhow::Result<Vec<f64>> {
        let workers: Vec<_> = (0..args.writers)
            .map(|_| {
                let (vectors, next, done, url, client) =
                    (vectors.clone(), next.clone(), done.clone(), url.clone(), blocking.clone());
                s.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let mut lat = Vec::new();
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= batches {
                            return Ok(lat);
                        }
                        let range = b * args.batch..((b + 1) * args.batch).min(args.n);
                        let docs: Vec<Value> = range
                            .map(|i| json!({"id": format!("d{i}"), "text": format!("document {i}"), "vector": vectors[i]}))
                            .collect();
                        let body = serde_json::to_vec(&json!({"documents": docs}))?;
                        let sent = Instant::now();
                        let r = client
                            .post(format!("{url}/v1/collections/{NAME}/documents"))
                            .header("content-type", "application/json")
                            .body(body)
                            .send()?;
                        anyhow::ensure!(r.status() == 200, "upsert: {} {}", r.status(), r.text()?);
                        lat.push(sent.elapsed().as_secs_f64());
                        let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if finished % (batches / 10).max(1) == 0 {
                            eprintln!("[rest-bench] upserted {} of {} documents", (finished * args.batch).min(args.n), args.n);
                        }
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("writer thread")?);
        }
        Ok(all)
    })?;
    // Everything acknowledged is durable; one waiting write makes it all searchable.
    let r = blocking
        .post(format!("{url}/v1/collections/{NAME}/documents"))
        .json(&json!({"documents": [{"id": "sentinel", "text": "sentinel", "vector": vectors[0]}], "wait": true}))
        .send()?;
    anyhow::ensure!(r.status() == 200, "upsert: {}", r.status());
    let upsert_s = t.elapsed().as_secs_f64();
    let upserts_per_s = args.n as f64 / upsert_s;
    latencies.sort_by(f64::total_cmp);
    println!(
        "upsert: {} documents in {upsert_s:.1} s: {upserts_per_s:.0} documents/s ({} writers, {} a request; request p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms)",
        args.n,
        args.writers,
        args.batch,
        pct(&latencies, 0.5) * 1e3,
        pct(&latencies, 0.99) * 1e3,
        latencies.last().copied().unwrap_or(0.0) * 1e3
    );

    // Recall of what the server answers, then latency under load.
    let hits = |body: &Value| -> Vec<usize> {
        body["results"]
            .as_array()
            .map(|a| a.iter().filter_map(|h| h["document_id"].as_str()?.strip_prefix('d')?.parse().ok()).collect())
            .unwrap_or_default()
    };
    let mut found = 0;
    for (q, t) in queries.iter().zip(&truth) {
        let r: Value = blocking
            .post(format!("{url}/v1/collections/{NAME}/search"))
            .json(&json!({"vector": q, "mode": "dense", "top_k": 10}))
            .send()?
            .json()?;
        found += hits(&r).iter().filter(|h| t.contains(h)).count();
    }
    let recall = found as f64 / (10 * queries.len()) as f64;
    println!("search: recall@10 {recall:.4} (default ef)");
    let rt = tokio::runtime::Runtime::new()?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let queries = Arc::new(queries);
    let mut search = Vec::new();
    for &c in &levels {
        let next = Arc::new(AtomicUsize::new(0));
        let (cl, u, q) = (client.clone(), url.clone(), queries.clone());
        let (lat, wall) = rt.block_on(closed_loop(c, args.seconds, move || {
            let (cl, u, q, next) = (cl.clone(), u.clone(), q.clone(), next.clone());
            async move {
                let query = &q[next.fetch_add(1, Ordering::Relaxed) % q.len()];
                let r = cl
                    .post(format!("{u}/v1/collections/{NAME}/search"))
                    .json(&json!({"vector": query, "mode": "dense", "top_k": 10}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "status {}", r.status());
                let body: Value = r.json().await?;
                anyhow::ensure!(body["results"].as_array().is_some_and(|a| a.len() == 10), "short results");
                Ok(())
            }
        }));
        let row = json!({"concurrency": c, "requests": lat.len(), "rps": lat.len() as f64 / wall,
            "p50_ms": pct(&lat, 0.5) * 1e3, "p99_ms": pct(&lat, 0.99) * 1e3});
        println!(
            "search: c={c:<3} {:>8.1} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            row["rps"].as_f64().unwrap_or(0.0),
            row["p50_ms"].as_f64().unwrap_or(0.0),
            row["p99_ms"].as_f64().unwrap_or(0.0)
        );
        search.push(row);
    }

    // Restarts: after a graceful stop (the graph saved on the way out), then after kill -9
    // with a tail of writes since the last save.
    let mut server = server;
    let t = Instant::now();
    let pid = server.0.id().to_string();
    anyhow::ensure!(std::process::Command::new("kill").args(["-TERM", &pid]).status()?.success(), "kill -TERM");
    server.0.wait()?;
    let stop_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut server, url) = start_server(&models, &data, &[])?;
    let ready_after_stop_s = t.elapsed().as_secs_f64();
    let tail = args.batch.min(args.n);
    let docs: Vec<Value> = (0..tail)
        .map(|i| json!({"id": format!("tail{i}"), "text": format!("tail {i}"), "vector": vectors[i]}))
        .collect();
    let r = blocking.post(format!("{url}/v1/collections/{NAME}/documents")).json(&json!({"documents": docs})).send()?;
    anyhow::ensure!(r.status() == 200, "upsert: {}", r.status());
    server.0.kill()?;
    server.0.wait()?;
    let t = Instant::now();
    let (_server, url) = start_server(&models, &data, &[])?;
    let ready_after_kill_s = t.elapsed().as_secs_f64();
    let info: Value = reqwest::blocking::get(format!("{url}/v1/collections/{NAME}"))?.json()?;
    anyhow::ensure!(
        info["documents"].as_u64() == Some((args.n + 1 + tail) as u64),
        "documents after the restarts: {info}"
    );
    println!(
        "restart: start to /ready {empty_ready_s:.2} s empty; graceful stop {stop_s:.2} s, then {ready_after_stop_s:.2} s; \
         after kill -9 with {tail} documents unsaved {ready_after_kill_s:.2} s"
    );
    let summary = json!({"bench": "rest", "n": args.n, "dim": args.dim, "writers": args.writers, "batch": args.batch,
        "upsert_s": upsert_s, "upserts_per_s": upserts_per_s,
        "upsert_request_p50_ms": pct(&latencies, 0.5) * 1e3, "upsert_request_p99_ms": pct(&latencies, 0.99) * 1e3,
        "upsert_request_max_ms": latencies.last().copied().unwrap_or(0.0) * 1e3,
        "recall_at_10": recall, "search": search, "ready_empty_s": empty_ready_s, "stop_s": stop_s,
        "ready_after_stop_s": ready_after_stop_s, "ready_after_kill_s": ready_after_kill_s});
    println!("{summary}");
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}
