//! Load on the gateway with the default models, and the same load on the engine in-process,
//! in one run: the difference is what HTTP, JSON, auth, metrics and SSE cost.
//!
//! - `/v1/embeddings` with a short input (one ~10-word sentence): requests/s, p50 and p99
//!   latency at each concurrency, for `--seconds` per level.
//! - Streaming `/v1/chat/completions` (`max_tokens` tokens each, EOS ignored): time to first
//!   token p50/p99, per-stream and aggregate tokens/s, each client sending `--chat-rounds`
//!   requests back to back.
//!
//! In-process, the same inputs go to the same engine workers (`EmbedHandle::embed`,
//! `GenerateHandle::submit`) from the same number of concurrent tasks. The server is the
//! `ragway` binary beside this one (`cargo build --release --bins`), started on a free port.
//!
//!     cargo run --release -p ragway-benches --bin load-bench -- --concurrency 1,8,32,64

use clap::Parser;
use futures::StreamExt;
use ragway_benches::{closed_loop, median, pct, start_server, workspace_root};
use ragway_engine::embed::worker::{EmbedHandle, EmbedWorker, EmbedWorkerConfig};
use ragway_engine::embed::{EmbedInput, EmbedderOptions};
use ragway_engine::generate::chat::ChatMessage;
use ragway_engine::generate::sampling::SamplingParams;
use ragway_engine::generate::{GenEvent, GenerateConfig, GenerateHandle, GenerateWorker, GenerationRequest};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Concurrent clients, comma-separated.
    #[arg(long, default_value = "1,8,32,64")]
    concurrency: String,
    /// Seconds of embedding load per level.
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Tokens generated per chat request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Chat requests each client sends, back to back.
    #[arg(long, default_value_t = 2)]
    chat_rounds: usize,
    /// Skip the chat part (embeddings only).
    #[arg(long)]
    no_chat: bool,
}

const SENTENCE: &str = "How do enzymes lower the activation energy of chemical reactions";
const QUESTION: &str = "Write a short story about a lighthouse keeper.";

/// One streamed generation: (time to first token, tokens, total time).
type StreamStat = (f64, usize, f64);

async fn chat_load<F, Fut>(c: usize, rounds: usize, call: F) -> (Vec<StreamStat>, f64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<StreamStat>> + Send,
{
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..rounds {
                    out.push(call().await.expect("stream failed"));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    (all, t0.elapsed().as_secs_f64())
}

fn summarize_embed(lat: &[f64], wall: f64) -> Value {
    json!({"requests": lat.len(), "rps": lat.len() as f64 / wall, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3})
}

fn summarize_chat(stats: &[StreamStat], wall: f64) -> Value {
    let ttft: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let per_stream: Vec<f64> =
        stats.iter().filter(|s| s.1 > 1).map(|s| (s.1 - 1) as f64 / (s.2 - s.0).max(1e-9)).collect();
    let tokens: usize = stats.iter().map(|s| s.1).sum();
    json!({"streams": stats.len(), "ttft_p50_ms": pct(&ttft, 0.5) * 1e3, "ttft_p99_ms": pct(&ttft, 0.99) * 1e3,
        "stream_tok_s_median": median(&per_stream), "aggregate_tok_s": tokens as f64 / wall})
}


async fn http_chat(client: reqwest::Client, url: String, max_tokens: usize) -> anyhow::Result<StreamStat> {
    let body = json!({"model": "SmolLM2-135M-Instruct", "stream": true, "max_tokens": max_tokens, "ignore_eos": true,
        "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]});
    let t0 = Instant::now();
    let resp = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let mut stream = resp.bytes_stream();
    let (mut first, mut tokens, mut buf) = (None, 0usize, String::new());
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            // One chunk per decoded token (the role chunk and the finish chunk carry none).
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty()) {
                tokens += 1;
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            }
        }
    }
    Ok((first.unwrap_or(f64::NAN), tokens, t0.elapsed().as_secs_f64()))
}

async fn engine_chat(h: GenerateHandle, prompt: Arc<Vec<u32>>, max_tokens: usize) -> anyhow::Result<StreamStat> {
    let mut req = GenerationRequest::new(prompt.to_vec(), max_tokens, SamplingParams::greedy());
    req.ignore_eos = true;
    let t0 = Instant::now();
    let mut s = h.submit(req)?;
    let (mut first, mut tokens) = (None, 0usize);
    while let Some(ev) = s.next().await {
        match ev {
            GenEvent::Token { text, .. } => {
                if !text.is_empty() {
                    tokens += 1;
                    first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                }
            }
            GenEvent::Done { .. } => break,
            GenEvent::Error { message } => anyhow::bail!(message),
            GenEvent::Text { .. } => {}
        }
    }
    Ok((first.unwrap_or(f64::NAN), tokens, t0.elapsed().as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models = args.models_dir.clone().unwrap_or_else(|| workspace_root().join("models"));
    let levels: Vec<usize> = args.concurrency.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!("[load-bench] {threads} threads; concurrency {levels:?}");

    // In-process: the engine workers the server would run, with the server's defaults.
    let (engine_embed, engine_chat_results) = {
        let embed = EmbedWorker::spawn(EmbedWorkerConfig {
            model_id: "all-MiniLM-L6-v2".into(),
            source: "sentence-transformers/all-MiniLM-L6-v2".into(),
            models_dir: models.clone(),
            options: EmbedderOptions { max_batch_tokens: 4096, ..Default::default() },
            queue_capacity: 256,
            max_inputs_per_request: 2048,
        })?;
        let mut embed_results = Vec::new();
        for &c in &levels {
            let h: EmbedHandle = embed.clone();
            let (lat, wall) = rt.block_on(closed_loop(c, args.seconds, move || {
                let h = h.clone();
                async move {
                    h.embed(vec![EmbedInput::Text(SENTENCE.into())]).await?;
                    Ok(())
                }
            }));
            let s = summarize_embed(&lat, wall);
            eprintln!("[load-bench] in-process embeddings c={c}: {s}");
            embed_results.push(s);
        }
        drop(embed);
        let mut chat_results = Vec::new();
        if !args.no_chat {
            let gen = GenerateWorker::spawn(GenerateConfig::new(
                "SmolLM2-135M-Instruct",
                "SmolLM2-135M-Instruct",
                models.clone(),
            ))?;
            let rendered = gen
                .chat_template()
                .ok_or_else(|| anyhow::anyhow!("no chat template"))?
                .render(&[ChatMessage::new("user", QUESTION)], true)?;
            let prompt = Arc::new(gen.tokenizer().encode(&rendered, false)?);
            for &c in &levels {
                let (h, p, mt) = (gen.clone(), prompt.clone(), args.max_tokens);
                let (stats, wall) = rt.block_on(chat_load(c, args.chat_rounds, move || engine_chat(h.clone(), p.clone(), mt)));
                let s = summarize_chat(&stats, wall);
                eprintln!("[load-bench] in-process chat c={c}: {s}");
                chat_results.push(s);
            }
        }
        (embed_results, chat_results)
    };

    // Over HTTP: the real server on the same machine.
    let data = tempfile::tempdir()?;
    let (_server, url) = start_server(&models, data.path(), &[])?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let mut rows = Vec::new();
    for (i, &c) in levels.iter().enumerate() {
        let (cl, u) = (client.clone(), url.clone());
        let (lat, wall) = rt.block_on(closed_loop(c, args.seconds, move || {
            let (cl, u) = (cl.clone(), u.clone());
            async move {
                let r = cl
                    .post(format!("{u}/v1/embeddings"))
                    .json(&json!({"model": "all-MiniLM-L6-v2", "input": SENTENCE}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "status {}", r.status());
                r.bytes().await?;
                Ok(())
            }
        }));
        let http = summarize_embed(&lat, wall);
        let engine = &engine_embed[i];
        let ratio = http["rps"].as_f64().unwrap_or(0.0) / engine["rps"].as_f64().unwrap_or(f64::NAN);
        println!(
            "embeddings c={c:<3} HTTP {:>7.1} req/s p50 {:>7.2} ms p99 {:>7.2} ms | in-process {:>7.1} req/s p50 {:>7.2} ms p99 {:>7.2} ms | HTTP/in-process {:.2}x",
            http["rps"].as_f64().unwrap_or(0.0), http["p50_ms"].as_f64().unwrap_or(0.0), http["p99_ms"].as_f64().unwrap_or(0.0),
            engine["rps"].as_f64().unwrap_or(0.0), engine["p50_ms"].as_f64().unwrap_or(0.0), engine["p99_ms"].as_f64().unwrap_or(0.0),
            ratio
        );
        rows.push(json!({"kind": "embeddings", "concurrency": c, "http": http, "in_process": engine}));
    }
    if !args.no_chat {
        for (i, &c) in levels.iter().enumerate() {
            let (cl, u, mt) = (client.clone(), url.clone(), args.max_tokens);
            let (stats, wall) = rt.block_on(chat_load(c, args.chat_rounds, move || http_chat(cl.clone(), u.clone(), mt)));
            let http = summarize_chat(&stats, wall);
            let engine = &engine_chat_results[i];
            let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "chat stream c={c:<3} HTTP TTFT p50 {:>7.1} ms p99 {:>7.1} ms, {:>6.1} tok/s/stream, {:>6.1} tok/s total | in-process TTFT p50 {:>7.1} ms p99 {:>7.1} ms, {:>6.1} tok/s/stream, {:>6.1} tok/s total | HTTP/in-process {:.2}x",
                f(&http, "ttft_p50_ms"), f(&http, "ttft_p99_ms"), f(&http, "stream_tok_s_median"), f(&http, "aggregate_tok_s"),
                f(engine, "ttft_p50_ms"), f(engine, "ttft_p99_ms"), f(engine, "stream_tok_s_median"), f(engine, "aggregate_tok_s"),
                f(&http, "aggregate_tok_s") / f(engine, "aggregate_tok_s")
            );
            rows.push(json!({"kind": "chat_stream", "concurrency": c, "max_tokens": args.max_tokens, "http": http, "in_process": engine}));
        }
    }
    println!("{}", json!({"bench": "load", "threads": threads, "rows": rows}));
    Ok(())
}
