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
//!
//! With `--json-schema builtin` (or a schema file) it measures constrained decoding instead:
//! decode tokens/s with and without the schema, one stream and 8 streams, the mask time per
//! token, and what the same schema costs llama.cpp's grammar sampling in the same run
//! (`benches/scripts/llamacpp_grammar.py`).

use clap::Parser;
use ragway_benches::gen::{greedy_request as request, prompt, token_times};
use ragway_benches::{median, reference_python, run_reference, workspace_root};
use ragway_engine::generate::{
    resolve_generation_model, GenerateConfig, Grammar, GenerateHandle, GenerateWorker, GenerationRequest, SamplingParams,
};
use ragway_engine::models::DEFAULT_GENERATION_MODEL_ID;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
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
    /// Measure constrained decoding with this JSON Schema file (`builtin`: a roster of 40
    /// records, longer than any run).
    #[arg(long)]
    json_schema: Option<String>,
}

/// A schema whose shortest match is far longer than the tokens generated, so that every run
/// decodes the same count under the grammar.
fn builtin_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "team": {"type": "string", "maxLength": 30},
            "members": {
                "type": "array", "minItems": 40, "maxItems": 40,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 24},
                        "age": {"type": "integer", "minimum": 18, "maximum": 99},
                        "role": {"enum": ["engineer", "designer", "manager", "analyst"]},
                        "remote": {"type": "boolean"}
                    },
                    "required": ["name", "age", "role", "remote"]
                }
            }
        },
        "required": ["team", "members"]
    })
}

const STRUCTURED_PROMPT: &str = "Here is our team roster as JSON, with each member's name, age, role and whether they work remotely:\n";

/// Decode tokens/s of `streams` requests at once (aggregate), with or without `schema`.
fn structured_round(handle: &GenerateHandle, args: &Args, streams: usize, schema: Option<&Value>) -> anyhow::Result<f64> {
    let prompt = handle.tokenizer().encode(STRUCTURED_PROMPT, true)?;
    let reqs: Vec<GenerationRequest> = (0..streams)
        .map(|i| {
            let mut r = request(prompt.clone(), args.gen_tokens + 1);
            r.sampling = SamplingParams { temperature: 0.7, seed: Some(i as u64), ..SamplingParams::greedy() };
            if let Some(s) = schema {
                r.constraint = Some(handle.compile(&Grammar::JsonSchema(s.clone()), "schema")?);
            }
            Ok(r)
        })
        .collect::<anyhow::Result<_>>()?;
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = reqs.into_iter().map(|r| sc.spawn(move || token_times(handle, r))).collect();
        hs.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    // Decode only: from the first token of the earliest stream to the last token of all.
    let mut first = f64::INFINITY;
    let mut last: f64 = 0.0;
    let mut tokens = 0;
    for r in results {
        let t = r?;
        anyhow::ensure!(t.len() == args.gen_tokens + 1, "a stream ended after {} tokens", t.len());
        first = first.min(t[0].as_secs_f64());
        last = last.max(t[t.len() - 1].as_secs_f64());
        tokens += t.len() - 1;
    }
    Ok(tokens as f64 / (last - first))
}

fn structured(handle: &GenerateHandle, args: &Args, gguf: &std::path::Path, spec: &str) -> anyhow::Result<()> {
    let schema = if spec == "builtin" { builtin_schema() } else { serde_json::from_str(&std::fs::read_to_string(spec)?)? };
    let t = Instant::now();
    handle.constrainer()?;
    let trie_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    handle.compile(&Grammar::JsonSchema(schema.clone()), "schema")?;
    let compile_s = t.elapsed().as_secs_f64();
    let m = handle.metrics();
    let mut rows = Vec::new();
    for streams in [1usize, 8] {
        let (mut free, mut constrained) = (Vec::new(), Vec::new());
        let (masks0, micros0) = (m.masks_total.load(Relaxed), m.mask_micros_total.load(Relaxed));
        for r in 0..args.runs + 1 {
            let f = structured_round(handle, args, streams, None)?;
            let c = structured_round(handle, args, streams, Some(&schema))?;
            if r > 0 {
                free.push(f);
                constrained.push(c);
            }
        }
        let masks = m.masks_total.load(Relaxed) - masks0;
        let mask_us = (m.mask_micros_total.load(Relaxed) - micros0) as f64 / masks.max(1) as f64;
        let (f, c) = (median(&free), median(&constrained));
        rows.push(json!({"streams": streams, "free_tok_s_median": f, "schema_tok_s_median": c,
            "schema_cost": 1.0 - c / f, "mask_us_per_token": mask_us, "free_all": free, "schema_all": constrained}));
    }
    let reference = match (args.no_reference, reference_python()) {
        (false, Some(py)) => {
            let file = std::env::temp_dir().join(format!("ragway-gen-bench-schema-{}.json", std::process::id()));
            std::fs::write(&file, schema.to_string())?;
            let out = std::process::Command::new(py)
                .arg(workspace_root().join("benches/scripts/llamacpp_grammar.py"))
                .args(["--model", &gguf.display().to_string(), "--schema", &file.display().to_string()])
                .args(["--prompt", STRUCTURED_PROMPT, "--threads", &args.threads.to_string()])
                .args(["--gen-tokens", &args.gen_tokens.to_string(), "--runs", &args.runs.to_string()])
                .output()?;
            let _ = std::fs::remove_file(&file);
            let stdout = String::from_utf8_lossy(&out.stdout);
            match stdout.lines().rev().find(|l| l.starts_with('{')).map(serde_json::from_str::<Value>) {
                Some(Ok(v)) if out.status.success() => Some(v),
                _ => {
                    eprintln!("llama.cpp grammar reference not run: {}", String::from_utf8_lossy(&out.stderr));
                    None
                }
            }
        }
        _ => None,
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("\n== constrained decoding, {}, {} threads, {} tokens (medians of {}) ==", args.model, args.threads, args.gen_tokens, args.runs);
    println!("token trie built in {:.3}s, schema compiled in {:.4}s", trie_s, compile_s);
    for r in &rows {
        println!(
            "ragway {} stream(s): free {:8.1} tok/s   schema {:8.1} tok/s   cost {:5.1}%   {:6.0} µs per mask",
            r["streams"], f(r, "free_tok_s_median"), f(r, "schema_tok_s_median"), 100.0 * f(r, "schema_cost"), f(r, "mask_us_per_token")
        );
    }
    if let Some(r) = &reference {
        println!(
            "llama.cpp 1 stream: free {:8.1} tok/s   schema {:8.1} tok/s   cost {:5.1}%   (GBNF built in {:.4}s)",
            f(r, "free_tok_s_median"), f(r, "schema_tok_s_median"), 100.0 * f(r, "schema_cost"), f(r, "grammar_build_s")
        );
        println!(
            "schema decode, 1 stream: ragway / llama.cpp = {:.2}x",
            f(&rows[0], "schema_tok_s_median") / f(r, "schema_tok_s_median")
        );
    }
    println!("{}", json!({"bench": "gen_structured", "model": args.model, "threads": args.threads, "ragway": rows, "llamacpp": reference}));
    Ok(())
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
    if let Some(spec) = &args.json_schema {
        return structured(&handle, &args, &gguf, spec);
    }

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
