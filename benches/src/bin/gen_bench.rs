//! Generation throughput of ragway against llama.cpp (llama-cpp-python), same GGUF, same
//! thread count, same run.
//!
//! Single stream (through the real scheduler): prefill tokens/s of a 512-token prompt and
//! decode tokens/s of 128 greedy tokens right after it (EOS ignored) — what
//! `shared/reference/bench_llamacpp.py` measures for llama.cpp. Concurrency 1, 4, 8, 16:
//! that many requests at once (distinct 32-token prompts, 128 tokens each), aggregate decode
//! tokens/s and time to first token p50/p95. Medians over `--runs`.
//!
//!     cargo run --release -p ragway-benches --bin gen-bench -- --threads 2 [--model gemma-3-270m]

use clap::Parser;
use ragway_benches::{median, reference_python, run_reference, workspace_root};
use ragway_engine::generate::{
    resolve_generation_model, GenEvent, GenerateConfig, GenerateHandle, GenerateWorker, GenerationRequest, SamplingParams,
};
use ragway_engine::models::DEFAULT_GENERATION_MODEL_ID;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Models directory holding SmolLM2-135M-Instruct.
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Threads for ragway and llama.cpp.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,4,8,16")]
    concurrency: String,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip the llama.cpp comparison.
    #[arg(long)]
    no_reference: bool,
    /// The GGUF both run: a file, or a name under the models directory
    /// (e.g. `gemma-3-270m` after `scripts/setup-models.sh --with-gemma3`).
    #[arg(long, default_value = DEFAULT_GENERATION_MODEL_ID)]
    model: String,
}

/// The text bench_llamacpp.py repeats to build its prompt.
const TEXT: &str = "The history of computing is a story of abstraction layered upon abstraction. Early machines were \
programmed by rewiring panels; later, stored programs allowed instructions to live in memory beside \
data. Assembly languages gave names to opcodes, compilers translated structured languages into \
machine code, and operating systems hid the details of devices behind files and processes. ";

fn prompt(handle: &GenerateHandle, n: usize, salt: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = format!("Document {salt}. ");
    loop {
        let ids = handle.tokenizer().encode(&text, true)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        text.push_str(TEXT);
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(prompt, max_tokens, SamplingParams::greedy());
    r.ignore_eos = true;
    r
}

/// Times of each token of one request (relative to submission).
fn token_times(handle: &GenerateHandle, req: GenerationRequest) -> anyhow::Result<Vec<Duration>> {
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

fn single_stream(handle: &GenerateHandle, args: &Args) -> anyhow::Result<Value> {
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for r in 0..args.runs + 1 {
        let p = prompt(handle, args.prompt_tokens, 0)?;
        let times = token_times(handle, request(p, args.gen_tokens + 1))?;
        if r == 0 {
            continue; // warm-up
        }
        let first = times[0].as_secs_f64();
        let last = times[times.len() - 1].as_secs_f64();
        pre.push(args.prompt_tokens as f64 / first);
        dec.push(args.gen_tokens as f64 / (last - first));
    }
    Ok(json!({
        "prefill_tok_s_median": median(&pre), "decode_tok_s_median": median(&dec),
        "prefill_all": pre, "decode_all": dec,
    }))
}

fn concurrent(handle: &GenerateHandle, c: usize, args: &Args) -> anyhow::Result<Value> {
    let (mut agg, mut p50s, mut p95s) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..args.runs {
        let prompts: Vec<Vec<u32>> = (0..c).map(|i| prompt(handle, 32, r * 100 + i)).collect::<anyhow::Result<_>>()?;
        let t0 = Instant::now();
        let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts
                .into_iter()
                .map(|p| s.spawn(move || token_times(handle, request(p, args.gen_tokens))))
                .collect();
            hs.into_iter().map(|h| h.join().expect("client thread")).collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft = Vec::new();
        let mut tokens = 0;
        for res in results {
            let times = res?;
            tokens += times.len();
            ttft.push(times[0].as_secs_f64());
        }
        ttft.sort_by(f64::total_cmp);
        agg.push(tokens as f64 / wall);
        p50s.push(percentile(&ttft, 0.5));
        p95s.push(percentile(&ttft, 0.95));
    }
    Ok(json!({
        "concurrency": c, "aggregate_tok_s_median": median(&agg), "ttft_p50_s": median(&p50s),
        "ttft_p95_s": median(&p95s), "aggregate_all": agg,
    }))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global()?;
    let models_dir = args.models_dir.clone().unwrap_or_else(|| workspace_root().join("models"));
    let gguf = resolve_generation_model(&args.model, &models_dir)?;
    let name = gguf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut config = GenerateConfig::new(&args.model, &gguf.display().to_string(), models_dir.clone());
    config.max_running = 16;
    let handle = GenerateWorker::spawn(config)?;

    let single = single_stream(&handle, &args)?;
    println!("ragway single stream ({} threads): {single}", args.threads);
    let mut conc = Vec::new();
    for c in args.concurrency.split(',').map(|c| c.trim().parse::<usize>()) {
        let v = concurrent(&handle, c?, &args)?;
        println!("ragway concurrency: {v}");
        conc.push(v);
    }

    let reference = if args.no_reference {
        None
    } else if let Some(py) = reference_python() {
        let a = vec![
            "--model".into(),
            gguf.display().to_string(),
            "--threads".into(),
            args.threads.to_string(),
            "--prompt-tokens".into(),
            args.prompt_tokens.to_string(),
            "--gen-tokens".into(),
            args.gen_tokens.to_string(),
            "--runs".into(),
            args.runs.to_string(),
        ];
        match run_reference(&py, "bench_llamacpp.py", &a) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!(
                    "llama.cpp reference not run: {e:#} (scripts/setup-reference.sh --with-llamacpp installs it)"
                );
                None
            }
        }
    } else {
        eprintln!("no reference Python: run scripts/setup-reference.sh --with-llamacpp for the llama.cpp comparison");
        None
    };

    println!("\n== generation, {name}, {} threads (medians of {}) ==", args.threads, args.runs);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (rp, rd) = (f(&single, "prefill_tok_s_median"), f(&single, "decode_tok_s_median"));
    match &reference {
        Some(r) => {
            let (lp, ld) = (f(r, "prefill_tok_s_median"), f(r, "decode_tok_s_median"));
            println!(
                "prefill {} tok: ragway {rp:8.1} tok/s   llama.cpp {lp:8.1} tok/s   ratio {:.2}x",
                args.prompt_tokens,
                rp / lp
            );
            println!(
                "decode  {} tok: ragway {rd:8.1} tok/s   llama.cpp {ld:8.1} tok/s   ratio {:.2}x",
                args.gen_tokens,
                rd / ld
            );
        }
        None => {
            println!("prefill {} tok: ragway {rp:8.1} tok/s", args.prompt_tokens);
            println!("decode  {} tok: ragway {rd:8.1} tok/s", args.gen_tokens);
        }
    }
    let base = conc.first().map(|v| f(v, "aggregate_tok_s_median")).unwrap_or(f64::NAN);
    for v in &conc {
        let a = f(v, "aggregate_tok_s_median");
        println!(
            "concurrency {:>2}: aggregate {a:8.1} tok/s ({:.2}x concurrency 1)   TTFT p50 {:6.3}s p95 {:6.3}s",
            v["concurrency"],
            a / base,
            f(v, "ttft_p50_s"),
            f(v, "ttft_p95_s")
        );
    }
    println!(
        "{}",
        json!({"bench": "gen", "model": name, "threads": args.threads, "single": single, "concurrency": conc, "llamacpp": reference})
    );
    Ok(())
}
