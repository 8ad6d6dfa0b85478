//! Embedding throughput of ragway against sentence-transformers, in the same run.
//!
//! For each thread count it runs itself as a child process (rayon's pool size is fixed per
//! process) that embeds the 1,000-passage corpus (~176 tokens each) and 1,000 short queries
//! (~10 words), several times, and reports medians. When a Python with
//! sentence-transformers is available (`scripts/setup-reference.sh`), it runs
//! `shared/reference/bench_st.py` on the same passages with the same thread count and prints
//! the ratio ragway / sentence-transformers.
//!
//!     cargo run --release -p ragway-benches --bin embed-bench -- --threads default,1,2

use clap::Parser;
use ragway_benches::{load_jsonl_texts, median, reference_python, run_reference, short_queries, workspace_root};
use ragway_engine::embed::{Embedder, EmbedderOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Models directory holding all-MiniLM-L6-v2.
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// JSONL corpus (`text` per line).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Thread counts, comma-separated; `default` is all cores.
    #[arg(long, default_value = "default,1,2")]
    threads: String,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip the sentence-transformers comparison.
    #[arg(long)]
    no_reference: bool,
    /// Token budget of one forward pass (default: the engine's).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Internal: measure in this process and print one JSON line.
    #[arg(long, hide = true)]
    child: bool,
}

fn measure(embedder: &Embedder, texts: &[&str], runs: usize) -> anyhow::Result<Value> {
    embedder.embed(&texts[..texts.len().min(64)])?; // warm-up
    let mut secs = Vec::new();
    let mut n_tokens = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = embedder.embed(texts)?;
        secs.push(t0.elapsed().as_secs_f64());
        n_tokens = out.iter().map(|e| e.num_tokens).sum();
    }
    let med = median(&secs);
    Ok(json!({
        "n_texts": texts.len(), "n_tokens": n_tokens, "seconds_median": med,
        "seconds_all": secs, "texts_per_s": texts.len() as f64 / med, "tokens_per_s": n_tokens as f64 / med,
    }))
}

fn child(args: &Args, models_dir: &PathBuf, corpus: &PathBuf) -> anyhow::Result<()> {
    let mut options = EmbedderOptions::default();
    if let Some(t) = args.max_batch_tokens {
        options.max_batch_tokens = t;
    }
    let embedder = Embedder::load(&models_dir.join("all-MiniLM-L6-v2"), options)?;
    let passages = load_jsonl_texts(corpus)?;
    let queries = short_queries(&passages);
    let p: Vec<&str> = passages.iter().map(String::as_str).collect();
    let q: Vec<&str> = queries.iter().map(String::as_str).collect();
    let res = json!({
        "threads": rayon_threads(),
        "passages": measure(&embedder, &p, args.runs)?,
        "queries": measure(&embedder, &q, args.runs)?,
    });
    println!("{res}");
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = workspace_root();
    let models_dir = args.models_dir.clone().unwrap_or_else(|| root.join("models"));
    let corpus = args.corpus.clone().unwrap_or_else(|| root.join("benches/data/st_corpus_1000.jsonl"));
    if args.child {
        return child(&args, &models_dir, &corpus);
    }
    let python = if args.no_reference { None } else { reference_python() };
    if python.is_none() && !args.no_reference {
        eprintln!("no reference Python (run scripts/setup-reference.sh): printing ragway's figures alone");
    }
    println!(
        "{:>8} {:>9} {:>14} {:>12} {:>14} {:>14} {:>12} {:>8}",
        "threads", "set", "ragway text/s", "ragway tok/s", "queries/s", "ST text/s", "ST tok/s", "ratio"
    );
    for spec in args.threads.split(',') {
        let n = match spec.trim() {
            "default" => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            s => s.parse()?,
        };
        let out = Command::new(std::env::current_exe()?)
            .args(["--child", "--runs", &args.runs.to_string()])
            .arg("--models-dir")
            .arg(&models_dir)
            .arg("--corpus")
            .arg(&corpus)
            .env("RAYON_NUM_THREADS", n.to_string())
            .output()?;
        if !out.status.success() {
            anyhow::bail!("child failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let ours: Value = serde_json::from_slice(out.stdout.trim_ascii())?;
        let reference = match &python {
            Some(py) => Some(run_reference(
                py,
                "bench_st.py",
                &[
                    "--model".into(),
                    models_dir.join("all-MiniLM-L6-v2").to_string_lossy().into_owned(),
                    "--threads".into(),
                    n.to_string(),
                    "--corpus".into(),
                    corpus.to_string_lossy().into_owned(),
                    "--runs".into(),
                    args.runs.to_string(),
                ],
            )?),
            None => None,
        };
        let p = &ours["passages"];
        let (st_s, st_t, ratio) = match &reference {
            Some(r) => {
                let st_tok = r["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
                (
                    format!("{:.1}", r["sentences_per_s"].as_f64().unwrap_or(f64::NAN)),
                    format!("{st_tok:.0}"),
                    format!("{:.2}x", p["tokens_per_s"].as_f64().unwrap() / st_tok),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>8} {:>9} {:>14.1} {:>12.0} {:>14.1} {:>14} {:>12} {:>8}",
            spec.trim(),
            "passages",
            p["texts_per_s"].as_f64().unwrap(),
            p["tokens_per_s"].as_f64().unwrap(),
            ours["queries"]["texts_per_s"].as_f64().unwrap(),
            st_s,
            st_t,
            ratio
        );
        println!("json {}", json!({"threads": n, "ragway": ours, "sentence_transformers": reference}));
    }
    Ok(())
}
