//! `GET /metrics` in the Prometheus text format: the engine's counters for each loaded model
//! (queue depths, running sequences, batch sizes, tokens, KV cache use, time to first token
//! and inter-token latency histograms).

use crate::state::AppState;
use actix_web::{get, web, HttpResponse};
use ragway_engine::generate::scheduler::Histogram;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, model: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model=\"{model}\"}} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, model: &str, h: &Histogram) {
    let (counts, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, c) in h.bounds.iter().zip(&counts) {
        cumulative += c;
        let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {sum}\n{name}_count{{model=\"{model}\"}} {cumulative}");
}

#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut out = String::new();
    if let Some(e) = state.embedder.get() {
        let id = e.model_id();
        metric(
            &mut out,
            "ragway_embedding_queue_depth",
            "gauge",
            "Embedding requests waiting.",
            id,
            e.queue_depth() as f64,
        );
    }
    if let Some(g) = state.generator.get() {
        let (id, m) = (g.model_id(), g.metrics());
        let gauges = [
            (
                "ragway_generation_waiting_requests",
                "Generation requests waiting to start.",
                m.waiting.load(Relaxed) as f64,
            ),
            ("ragway_generation_running_sequences", "Sequences in the running batch.", m.running.load(Relaxed) as f64),
            (
                "ragway_generation_last_batch_sequences",
                "Sequences in the last forward pass.",
                m.last_batch_seqs.load(Relaxed) as f64,
            ),
            (
                "ragway_generation_last_batch_tokens",
                "Tokens in the last forward pass.",
                m.last_batch_tokens.load(Relaxed) as f64,
            ),
            (
                "ragway_generation_kv_cache_used_tokens",
                "KV cache tokens held by running sequences.",
                m.kv_used_tokens.load(Relaxed) as f64,
            ),
            (
                "ragway_generation_kv_cache_capacity_tokens",
                "KV cache budget in tokens.",
                m.kv_capacity_tokens.load(Relaxed) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            metric(&mut out, name, "gauge", help, id, v);
        }
        let counters = [
            ("ragway_generation_steps_total", "Forward passes run.", m.steps.load(Relaxed)),
            (
                "ragway_generation_batch_sequences_total",
                "Sum of sequences over forward passes.",
                m.batch_seqs_total.load(Relaxed),
            ),
            (
                "ragway_generation_forward_tokens_total",
                "Tokens run through the model.",
                m.forward_tokens_total.load(Relaxed),
            ),
            ("ragway_generation_prompt_tokens_total", "Prompt tokens admitted.", m.prompt_tokens_total.load(Relaxed)),
            ("ragway_generation_generated_tokens_total", "Tokens sampled.", m.generated_tokens_total.load(Relaxed)),
            ("ragway_generation_requests_total", "Generation requests accepted.", m.requests_total.load(Relaxed)),
            (
                "ragway_generation_requests_rejected_total",
                "Generation requests refused (queue full).",
                m.requests_rejected.load(Relaxed),
            ),
            (
                "ragway_generation_preemptions_total",
                "Sequences preempted for KV cache memory.",
                m.preemptions.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            metric(&mut out, name, "counter", help, id, v as f64);
        }
        histogram(
            &mut out,
            "ragway_generation_time_to_first_token_seconds",
            "Time from request to first token.",
            id,
            &m.time_to_first_token,
        );
        histogram(
            &mut out,
            "ragway_generation_inter_token_latency_seconds",
            "Time between tokens of a sequence.",
            id,
            &m.inter_token_latency,
        );
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out)
}
