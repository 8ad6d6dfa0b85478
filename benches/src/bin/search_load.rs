//! Search latency over REST on both stores in one run: the `ragway` server with SciFact in
//! its data directory (the embedded store), then a second server with the same corpus in
//! PostgreSQL + pgvector. SciFact's train queries go to `POST /v1/collections/{name}/search`
//! (the server embeds each query) from `c` clients at once, for `--seconds` per level and
//! mode; requests/s, p50 and p99 latency are printed side by side.
//!
//! Both collections come from `retrieval-bench`: its embedded collection
//! (`<work-dir>/scifact-default`) and the `scifact_bench` collection it leaves in the database
//! given by `--postgres-url`.
//!
//!     cargo run --release -p ragway-benches --bin retrieval-bench -- --postgres-url URL
//!     cargo run --release -p ragway-benches --bin search-load -- --postgres-url URL

use clap::Parser;
use ragway_benches::{closed_loop, copy_dir, pct, start_server, workspace_root};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Where `retrieval-bench` keeps its collections.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The PostgreSQL holding `retrieval-bench`'s `scifact_bench` collection.
    #[arg(long)]
    postgres_url: String,
    /// Concurrent clients, comma-separated.
    #[arg(long, default_value = "1,8")]
    concurrency: String,
    /// Seconds of load per level and mode.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Search modes, comma-separated.
    #[arg(long, default_value = "dense,keyword,hybrid")]
    modes: String,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = workspace_root();
    let models = args.models_dir.clone().unwrap_or_else(|| root.join("models"));
    let work = args.work_dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/ragway/bench")
    });
    let queries: Vec<String> = std::fs::read_to_string(root.join("../shared/data/scifact/queries.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!queries.is_empty(), "no SciFact queries");
    let levels: Vec<usize> = args.concurrency.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?;
    let modes: Vec<String> = args.modes.split(',').map(|m| m.trim().to_string()).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;

    let embedded_src = work.join("scifact-default");
    anyhow::ensure!(
        embedded_src.join("settings.json").is_file(),
        "{} missing: run retrieval-bench first",
        embedded_src.display()
    );
    let mut results = Vec::new();
    for store in ["embedded", "postgres"] {
        let data = tempfile::tempdir()?;
        let (name, extra) = if store == "embedded" {
            // A copy: the server owns its data directory.
            copy_dir(&embedded_src, &data.path().join("collections/scifact"))?;
            ("scifact", vec![])
        } else {
            ("scifact_bench", vec!["--postgres-url".to_string(), args.postgres_url.clone()])
        };
        let (_server, url) = start_server(&models, data.path(), &extra)?;
        let info: Value = reqwest::blocking::get(format!("{url}/v1/collections/{name}"))?.json()?;
        anyhow::ensure!(info["storage"] == store, "collection {name} is on {}, not {store}", info["storage"]);
        eprintln!("[search-load] {store}: {} documents, {} chunks", info["documents"], info["chunks"]);
        for mode in &modes {
            for &c in &levels {
                let next = Arc::new(AtomicUsize::new(0));
                let (cl, u, q, m, k) =
                    (client.clone(), url.clone(), Arc::new(queries.clone()), mode.clone(), args.top_k);
                let (lat, wall) = rt.block_on(closed_loop(c, args.seconds, move || {
                    let (cl, u, q, m, next) = (cl.clone(), u.clone(), q.clone(), m.clone(), next.clone());
                    async move {
                        let query = &q[next.fetch_add(1, Ordering::Relaxed) % q.len()];
                        let r = cl
                            .post(format!("{u}/v1/collections/{name}/search"))
                            .json(&json!({"query": query, "mode": m, "top_k": k}))
                            .send()
                            .await?;
                        anyhow::ensure!(r.status() == 200, "status {}: {}", r.status(), r.text().await?);
                        let body: Value = r.json().await?;
                        anyhow::ensure!(body["results"].as_array().is_some_and(|a| !a.is_empty()), "no results");
                        Ok(())
                    }
                }));
                let row = json!({"store": store, "mode": mode, "concurrency": c, "requests": lat.len(),
                    "rps": lat.len() as f64 / wall, "p50_ms": pct(&lat, 0.5) * 1e3, "p99_ms": pct(&lat, 0.99) * 1e3});
                println!(
                    "{store:<9} {mode:<8} c={c:<3} {:>7.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                    row["rps"].as_f64().unwrap_or(0.0),
                    row["p50_ms"].as_f64().unwrap_or(0.0),
                    row["p99_ms"].as_f64().unwrap_or(0.0)
                );
                results.push(row);
            }
        }
    }
    // Side by side: PostgreSQL's latency as a multiple of the embedded store's.
    for mode in &modes {
        for &c in &levels {
            let find = |store: &str| {
                results.iter().find(|r| r["store"] == store && r["mode"] == mode.as_str() && r["concurrency"] == c)
            };
            if let (Some(e), Some(p)) = (find("embedded"), find("postgres")) {
                let ratio = |key: &str| p[key].as_f64().unwrap_or(f64::NAN) / e[key].as_f64().unwrap_or(f64::NAN);
                println!(
                    "postgres/embedded {mode:<8} c={c:<3} p50 x{:.2}  p99 x{:.2}  req/s x{:.2}",
                    ratio("p50_ms"),
                    ratio("p99_ms"),
                    ratio("rps")
                );
            }
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&json!({"top_k": args.top_k, "results": results}))?)?;
    }
    Ok(())
}
