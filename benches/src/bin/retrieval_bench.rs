//! Retrieval quality and ingestion speed on BEIR SciFact (train split), end to end through
//! ragway's index: the corpus is ingested by the real pipeline (chunk → embed → log →
//! HNSW + tantivy), then every train query is searched dense, keyword and hybrid (several
//! fusions), and nDCG@10 / recall@100 are computed as pytrec_eval does — and, when the
//! reference Python has pytrec_eval, also by pytrec_eval itself on the same runs.
//!
//! Ingestion overhead: the end-to-end ingestion time against the embedder alone on the
//! same chunk inputs, in the same run. Memory: resident memory of a process that opens the
//! ingested collection, per million chunks.
//!
//! With `--postgres` (a throwaway server from `RAGWAY_PG_INSTALL`) or `--postgres-url URL`,
//! the corpus is also ingested into a collection in PostgreSQL + pgvector and every
//! configuration runs there too, printed beside the embedded store's figures.
//!
//!     cargo run --release -p ragway-benches --bin retrieval-bench -- [--max-tokens default,128] [--postgres]

use clap::Parser;
use ragway_benches::{copy_dir, reference_python, workspace_root};
use ragway_engine::embed::{Embedder, EmbedderOptions};
use ragway_eval::retrieval::{load_qrels, mean_ndcg_recall, Run};
use ragway_index::fusion::{FusionMethod, FusionParams};
use ragway_index::ingest::{IngestOptions, Source};
use ragway_index::jobs::{JobRegistry, JobState};
use ragway_index::{ChunkEmbedder, Collection, CollectionSettings, LocalEmbedder, SearchMode, SearchRequest};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/train.tsv).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where ingested collections are kept between runs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Chunk token budgets to compare, comma-separated (`default` = the model's maximum).
    #[arg(long, default_value = "default")]
    max_tokens: String,
    /// Ingest again even if a collection from an earlier run exists.
    #[arg(long)]
    reingest: bool,
    /// Also run on PostgreSQL + pgvector: a throwaway server from `RAGWAY_PG_INSTALL`.
    #[arg(long)]
    postgres: bool,
    /// Also run on this PostgreSQL (a collection `scifact_bench` is created there, replacing
    /// one of that name).
    #[arg(long)]
    postgres_url: Option<String>,
    /// With `--postgres-url`: search the collection an earlier run left there instead of
    /// ingesting again.
    #[arg(long)]
    postgres_reuse: bool,
    /// Only the configurations whose names start with one of these (`;`-separated).
    #[arg(long)]
    only: Option<String>,
    /// Internal: open the collection in this folder and print resident memory as JSON.
    #[arg(long, hide = true)]
    memory_of: Option<PathBuf>,
    /// Also search copies of each collection with these quantizations (`f16`, `int8`;
    /// comma-separated): the copy's graph is rebuilt from its log with codes on first open.
    #[arg(long)]
    quantization: Option<String>,
    /// The dense half's search breadth in every configuration (default: the collection's);
    /// a large one approaches exact search, to tell the graph's misses from the ranking's.
    #[arg(long)]
    ef: Option<usize>,
    /// Candidates each half hands to fusion.
    #[arg(long, default_value_t = 300)]
    candidates: usize,
    /// Results per query (recall@100 needs 100; nDCG@10 is the same from 10 up, except
    /// for what a deeper search changes).
    #[arg(long, default_value_t = 100)]
    top_k: usize,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models = args.models_dir.clone().unwrap_or_else(|| workspace_root().join("models"));
    let embedder = Arc::new(LocalEmbedder {
        model_id: "all-MiniLM-L6-v2".into(),
        embedder: Embedder::load(&models.join("all-MiniLM-L6-v2"), EmbedderOptions::default())?,
    });
    if let Some(dir) = &args.memory_of {
        // SAFETY: malloc_trim only returns free heap pages to the OS.
        unsafe { libc::malloc_trim(0) };
        let before = rss_bytes();
        let c = Collection::open(dir, embedder.clone())?;
        // Replay's transient buffers are freed; count what the collection keeps.
        unsafe { libc::malloc_trim(0) };
        let after = rss_bytes();
        let info = c.info();
        println!(
            "{}",
            json!({"rss_delta_bytes": after.saturating_sub(before), "chunks": info.chunks, "estimate_bytes": info.memory_bytes})
        );
        return Ok(());
    }
    let data = args.data.clone().unwrap_or_else(|| workspace_root().join("../shared/data/scifact"));
    let work = args.work_dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/ragway/bench")
    });
    std::fs::create_dir_all(&work)?;
    let qrels = load_qrels(&data.join("qrels/train.tsv"))?;
    let queries: Vec<(String, String)> = std::fs::read_to_string(data.join("queries.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (v["_id"].as_str().unwrap_or_default().to_string(), v["text"].as_str().unwrap_or_default().to_string())
        })
        .filter(|(id, _)| qrels.contains_key(id))
        .collect();
    eprintln!("[retrieval-bench] {} train queries with judgements", queries.len());
    let t0 = Instant::now();
    let query_vectors: Vec<Vec<f32>> =
        queries.iter().map(|(_, q)| embedder.embed_query(q)).collect::<Result<_, _>>()?;
    eprintln!("[retrieval-bench] queries embedded in {:.1}s", t0.elapsed().as_secs_f64());

    let breadth = Breadth { ef: args.ef, candidates: args.candidates, top_k: args.top_k };
    let mut report = Vec::new();
    for budget in args.max_tokens.split(',') {
        let max_tokens = if budget == "default" { None } else { Some(budget.parse::<usize>()?) };
        let dir = work.join(format!("scifact-{budget}"));
        let mut ingest = Value::Null;
        if args.reingest || !dir.join("settings.json").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            ingest = ingest_corpus(&dir, &data.join("corpus.jsonl"), max_tokens, embedder.clone())?;
        }
        let memory = memory_child(&dir)?;
        let c = Collection::open(&dir, embedder.clone())?;
        // Saved as `ragway ingest` saves it (a no-op when it was): every later run maps this
        // one graph, where a graph built again on each open, by parallel inserts, differs a
        // little from run to run.
        c.save_graph()?;
        let info = c.info();
        eprintln!("[retrieval-bench] chunks≤{budget}: {} documents, {} chunks", info.documents, info.chunks);
        // Every config's nDCG@10 and recall@100 on `c`, printed under `label`.
        let measure = |c: &Collection, only: Option<&str>, label: &str, runs: &str| -> anyhow::Result<Vec<Value>> {
            let mut rows = Vec::new();
            for (name, mode, fusion, title_boost) in configs(only) {
                let t = Instant::now();
                let run = run_queries(c, &queries, &query_vectors, mode, fusion, title_boost, breadth)?;
                let qps = queries.len() as f64 / t.elapsed().as_secs_f64();
                let (ndcg, recall, n) = mean_ndcg_recall(&qrels, &run, 10, 100);
                println!("{label:<20} {name:<34} nDCG@10 {ndcg:.4}  recall@100 {recall:.4}  ({n} queries, {qps:.0}/s)");
                rows.push(json!({"config": name, "ndcg@10": ndcg, "recall@100": recall, "queries": n, "qps": qps}));
                if let Some(dir) = std::env::var_os("RAGWAY_BENCH_RUNS") {
                    write_trec(&Path::new(&dir).join(format!("{runs}-{name}.trec")), &run)?;
                }
            }
            Ok(rows)
        };
        let rows = measure(&c, args.only.as_deref(), &format!("chunks<={budget}"), budget)?;
        report.push(json!({"max_tokens": budget, "storage": "embedded", "documents": info.documents, "chunks": info.chunks, "ingest": ingest, "memory": memory, "results": rows}));
        drop(c);
        for quant in args.quantization.iter().flat_map(|q| q.split(',')).filter(|q| *q != "none") {
            let copy = work.join(format!("scifact-{budget}-{quant}"));
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(&dir, &copy)?;
            let mut settings: Value = serde_json::from_str(&std::fs::read_to_string(copy.join("settings.json"))?)?;
            settings["quantization"] = json!(quant);
            std::fs::write(copy.join("settings.json"), serde_json::to_vec_pretty(&settings)?)?;
            let c = Collection::open(&copy, embedder.clone())?;
            let rows = measure(&c, Some("dense;default"), &format!("chunks<={budget} {quant}"), &format!("{budget}-{quant}"))?;
            report.push(json!({"max_tokens": budget, "storage": "embedded", "quantization": quant, "results": rows}));
        }
    }
    if args.postgres || args.postgres_url.is_some() {
        let embedded = report.first().cloned().unwrap_or(Value::Null);
        report.push(postgres_pass(&args, &work, &data, &queries, &query_vectors, &qrels, embedder.clone(), &embedded)?);
    }
    if let (Some(python), Some(runs)) = (reference_python(), std::env::var_os("RAGWAY_BENCH_RUNS")) {
        // Cross-check the metric code with pytrec_eval itself on the written runs.
        let out = std::process::Command::new(python)
            .arg(workspace_root().join("benches/scripts/pytrec_check.py"))
            .arg(data.join("qrels/train.tsv"))
            .arg(&runs)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    println!("{}", json!({"bench": "retrieval_scifact_train", "runs": report}));
    Ok(())
}

type Config = (String, SearchMode, Option<FusionParams>, Option<f32>);

fn configs(only: Option<&str>) -> Vec<Config> {
    let mut all = all_configs();
    if let Some(only) = only {
        let prefixes: Vec<&str> = only.split(';').map(str::trim).collect();
        all.retain(|(name, ..)| prefixes.iter().any(|p| name.starts_with(p)));
    }
    all
}

fn all_configs() -> Vec<Config> {
    let rrf = |k: f32, d: f32, w: f32| FusionParams {
        method: FusionMethod::Rrf,
        rrf_k: k,
        dense_weight: d,
        keyword_weight: w,
    };
    let convex =
        |d: f32| FusionParams { method: FusionMethod::Convex, rrf_k: 60.0, dense_weight: d, keyword_weight: 1.0 - d };
    let mut out: Vec<Config> = vec![
        ("dense".into(), SearchMode::Dense, None, None),
        ("default (collection settings)".into(), SearchMode::Hybrid, None, None),
    ];
    for tb in [0.0, 0.2, 0.5] {
        out.push((format!("keyword(title_boost={tb})"), SearchMode::Keyword, None, Some(tb)));
    }
    for tb in [0.0, 0.2] {
        for k in [2.0, 5.0, 10.0, 60.0] {
            out.push((format!("rrf(k={k},title_boost={tb})"), SearchMode::Hybrid, Some(rrf(k, 1.0, 1.0)), Some(tb)));
        }
        for (d, w) in [(1.0, 0.8), (0.8, 1.0)] {
            out.push((
                format!("rrf(k=5,w={d}/{w},title_boost={tb})"),
                SearchMode::Hybrid,
                Some(rrf(5.0, d, w)),
                Some(tb),
            ));
        }
        for d in [0.4, 0.5, 0.6] {
            out.push((format!("convex(dense={d},title_boost={tb})"), SearchMode::Hybrid, Some(convex(d)), Some(tb)));
        }
        for d in [0.4, 0.5, 0.6] {
            let dbsf = FusionParams { method: FusionMethod::Dbsf, ..convex(d) };
            out.push((format!("dbsf(dense={d},title_boost={tb})"), SearchMode::Hybrid, Some(dbsf), Some(tb)));
        }
    }
    out
}

/// How wide each search looks: the dense walk's breadth, each half's candidates, and the
/// results asked for.
#[derive(Clone, Copy)]
struct Breadth {
    ef: Option<usize>,
    candidates: usize,
    top_k: usize,
}

fn run_queries(
    c: &Collection,
    queries: &[(String, String)],
    vectors: &[Vec<f32>],
    mode: SearchMode,
    fusion: Option<FusionParams>,
    title_boost: Option<f32>,
    breadth: Breadth,
) -> anyhow::Result<Run> {
    let results: Vec<(String, Vec<(String, f64)>)> = queries
        .par_iter()
        .zip(vectors)
        .map(|((id, q), v)| {
            let req = SearchRequest {
                query: q.clone(),
                top_k: breadth.top_k,
                mode,
                fusion,
                title_boost,
                candidates: Some(breadth.candidates),
                group_by_document: true,
                vector: Some(v.clone()),
                ef: breadth.ef,
                ..Default::default()
            };
            let hits = c.search(&req)?;
            Ok((id.clone(), hits.results.into_iter().map(|h| (h.document_id, h.score as f64)).collect()))
        })
        .collect::<Result<_, ragway_index::IndexError>>()?;
    Ok(results.into_iter().collect::<HashMap<_, _>>())
}

fn write_trec(path: &Path, run: &Run) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().expect("parent"))?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (q, docs) in run {
        for (i, (d, s)) in docs.iter().enumerate() {
            writeln!(f, "{q} Q0 {d} {} {s:.9} ragway", i + 1)?;
        }
    }
    Ok(())
}

fn memory_child(dir: &Path) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe).arg("--memory-of").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(Value::Null);
    let chunks = v["chunks"].as_f64().unwrap_or(0.0);
    if chunks > 0.0 {
        let per_million = v["rss_delta_bytes"].as_f64().unwrap_or(0.0) / chunks * 1e6;
        eprintln!(
            "[retrieval-bench] memory: {:.0} MiB per million chunks (resident, measured)",
            per_million / (1 << 20) as f64
        );
        return Ok(json!({"measured": v, "rss_mib_per_million_chunks": per_million / (1 << 20) as f64}));
    }
    Ok(v)
}

/// The same corpus and configurations on PostgreSQL + pgvector (default chunking), each
/// figure printed beside the embedded store's.
#[allow(clippy::too_many_arguments)]
fn postgres_pass(
    args: &Args,
    work: &Path,
    data: &Path,
    queries: &[(String, String)],
    vectors: &[Vec<f32>],
    qrels: &ragway_eval::retrieval::Qrels,
    embedder: Arc<LocalEmbedder>,
    embedded: &Value,
) -> anyhow::Result<Value> {
    use ragway_index::postgres::{LocalServer, PgDatabase, PgOptions, PgStore};
    let server = match &args.postgres_url {
        Some(_) => None,
        None => Some(LocalServer::from_env()?),
    };
    let url = args.postgres_url.clone().unwrap_or_else(|| server.as_ref().expect("server").url());
    let db = PgDatabase::connect(&PgOptions::new(url))?;
    let mut settings = scifact_settings(None);
    settings.name = "scifact_bench".into();
    let dir = work.join("scifact-postgres");
    let reused = match args.postgres_reuse {
        true => PgStore::open(db.clone(), &settings.name).ok(),
        false => None,
    };
    let (c, ingest) = match reused {
        Some(store) => {
            std::fs::create_dir_all(&dir)?;
            (Arc::new(Collection::with_store(&dir, settings, Some(embedder.clone()), Box::new(store))), Value::Null)
        }
        None => {
            let _ = PgStore::drop_collection(&db, &settings.name);
            let store = PgStore::create(db, settings.clone())?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let c = Arc::new(Collection::with_store(&dir, settings, Some(embedder.clone()), Box::new(store)));
            let ingest = ingest_into(c.clone(), &data.join("corpus.jsonl"), embedder)?;
            (c, ingest)
        }
    };
    let before: HashMap<String, f64> = embedded["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["config"].as_str().unwrap_or_default().to_string(), r["ndcg@10"].as_f64().unwrap_or(0.0)))
        .collect();
    let mut rows = Vec::new();
    let breadth = Breadth { ef: None, candidates: args.candidates, top_k: args.top_k };
    for (name, mode, fusion, title_boost) in configs(args.only.as_deref()) {
        let t = Instant::now();
        let run = run_queries(&c, queries, vectors, mode, fusion, title_boost, breadth)?;
        let qps = queries.len() as f64 / t.elapsed().as_secs_f64();
        let (ndcg, recall, n) = mean_ndcg_recall(qrels, &run, 10, 100);
        let diff = before.get(&name).map_or(f64::NAN, |b| ndcg - b);
        println!("postgres         {name:<34} nDCG@10 {ndcg:.4}  recall@100 {recall:.4}  ({n} queries, {qps:.0}/s)  vs embedded {diff:+.4}");
        rows.push(json!({"config": name, "ndcg@10": ndcg, "recall@100": recall, "queries": n, "qps": qps, "ndcg_minus_embedded": diff}));
    }
    let info = c.info();
    Ok(json!({"max_tokens": "default", "storage": "postgres", "documents": info.documents, "chunks": info.chunks,
              "disk_bytes": info.disk_bytes, "ingest": ingest, "results": rows}))
}

fn scifact_settings(max_tokens: Option<usize>) -> CollectionSettings {
    let mut settings = CollectionSettings {
        name: "scifact".into(),
        model: Some("all-MiniLM-L6-v2".into()),
        dimension: 384,
        distance: Default::default(),
        hnsw: Default::default(),
        quantization: Default::default(),
        chunking: Default::default(),
        fusion: Default::default(),
        keyword: Default::default(),
        created_at: 0,
    };
    settings.chunking.max_tokens = max_tokens;
    settings
}

fn ingest_corpus(
    dir: &Path,
    corpus: &Path,
    max_tokens: Option<usize>,
    embedder: Arc<LocalEmbedder>,
) -> anyhow::Result<Value> {
    let c = Arc::new(Collection::create(dir, scifact_settings(max_tokens), embedder.clone())?);
    ingest_into(c, corpus, embedder)
}

/// Ingests the corpus with an ingestion job, then times the embedder alone on the same
/// chunk inputs.
fn ingest_into(c: Arc<Collection>, corpus: &Path, embedder: Arc<LocalEmbedder>) -> anyhow::Result<Value> {
    let registry = JobRegistry::default();
    let t0 = Instant::now();
    let job = registry.submit(c.clone(), Source::Jsonl(corpus.to_path_buf()), IngestOptions::default(), None)?;
    let mut last = Instant::now();
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if last.elapsed().as_secs() >= 10 {
            let v = job.view();
            eprintln!(
                "[retrieval-bench] ingest {:.0}%  {} docs  {:.1} chunks/s  eta {:.0}s",
                v.progress.fraction * 100.0,
                v.progress.documents_written,
                v.progress.chunks_per_second,
                v.progress.eta_seconds.unwrap_or(0.0)
            );
            last = Instant::now();
        }
    }
    let ingest_s = t0.elapsed().as_secs_f64();
    let view = job.view();
    anyhow::ensure!(view.state == JobState::Done, "ingestion failed: {:?}", view.error);
    // The embedder alone on the same chunk inputs, same batch size.
    let docs: Vec<ragway_index::DocumentInput> = std::fs::read_to_string(corpus)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| ragway_index::DocumentInput {
            id: v["_id"].as_str().unwrap_or_default().into(),
            text: v["text"].as_str().unwrap_or_default().into(),
            title: v["title"].as_str().filter(|t| !t.is_empty()).map(String::from),
            ..Default::default()
        })
        .collect();
    let inputs: Vec<Vec<u32>> = docs
        .into_iter()
        .map(|d| c.chunk(d))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flat_map(|d| d.embed_inputs)
        .collect();
    let n_chunks = inputs.len();
    let t1 = Instant::now();
    for part in inputs.chunks(256) {
        embedder.embed_ids(part.to_vec())?;
    }
    let embed_s = t1.elapsed().as_secs_f64();
    let overhead = ingest_s / embed_s - 1.0;
    eprintln!(
        "[retrieval-bench] ingested {} docs / {n_chunks} chunks in {ingest_s:.1}s; embedder alone {embed_s:.1}s; overhead {:.1}%",
        view.progress.documents_written,
        overhead * 100.0
    );
    Ok(json!({"documents": view.progress.documents_written, "chunks": n_chunks, "ingest_seconds": ingest_s,
              "embed_only_seconds": embed_s, "overhead": overhead, "docs_per_second": view.progress.documents_written as f64 / ingest_s}))
}
