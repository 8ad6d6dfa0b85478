//! `GET /metrics` in the Prometheus text format (names prefixed `ragway_`):
//! - HTTP: requests by route, method and status with a duration histogram; rejected
//!   requests by reason;
//! - embeddings: queue depth, requests, batch size histograms (inputs and tokens);
//! - generation: queue depth, running sequences, batch sizes, tokens prompted and generated,
//!   KV cache use, preemptions, grammar mask counts and time, time to first token and
//!   inter-token latency histograms;
//! - index: documents, chunks, disk and memory per collection; ingestion jobs by state and
//!   the progress of running ones;
//! - model versions: requests by version, routing role and outcome, durations, routing
//!   shares, canary rollbacks, upstream endpoints' health, circuits and load;
//! - drift per collection: KS and PSI statistics, low-score and ungrounded shares, alert.

use crate::app::AppState;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::telemetry::{escape, write_family as family, write_histogram_series};
use actix_web::{get, web, HttpResponse};
use ragway_index::JobState;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

fn model_label(id: &str) -> String {
    format!("model=\"{}\"", escape(id))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String), ApiErrors)
)]
#[get("/metrics")]
pub async fn metrics(http: actix_web::HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, crate::service::error::ServiceError> {
    crate::http::middleware::authorize_unless(&http, crate::service::auth::Operation::Metrics, state.settings.open_metrics)?;
    let state = state.into_inner();
    // Collection info reads the disk: off the async workers.
    let out = crate::service::limits::blocking(move || Ok(render(&state))).await.unwrap_or_default();
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out))
}

fn render(state: &AppState) -> String {
    let mut out = String::new();
    state.requests.render(&mut out);
    state.rag_metrics.render(&mut out);
    state.registry.render(&mut out);
    if let Some(e) = state.embedder.get() {
        let (l, m) = (model_label(e.model_id()), e.metrics());
        family(&mut out, "ragway_embedding_queue_depth", "gauge", "Embedding requests waiting.", &[(l.clone(), e.queue_depth() as f64)]);
        let counters = [
            ("ragway_embedding_requests_total", "Embedding requests queued.", m.requests_total.load(Relaxed)),
            ("ragway_embedding_requests_rejected_total", "Embedding requests refused (queue full).", m.requests_rejected.load(Relaxed)),
            ("ragway_embedding_batches_total", "Forward batches run.", m.batches_total.load(Relaxed)),
            ("ragway_embedding_inputs_total", "Inputs embedded.", m.inputs_total.load(Relaxed)),
            ("ragway_embedding_tokens_total", "Tokens embedded.", m.tokens_total.load(Relaxed)),
        ];
        for (name, help, v) in counters {
            family(&mut out, name, "counter", help, &[(l.clone(), v as f64)]);
        }
        for (name, help, h) in [
            ("ragway_embedding_batch_inputs", "Inputs per forward batch.", &m.batch_inputs),
            ("ragway_embedding_batch_tokens", "Tokens per forward batch.", &m.batch_tokens),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            write_histogram_series(&mut out, name, &l, h);
        }
    }
    if let Some(g) = state.generator.get() {
        let (l, m) = (model_label(g.model_id()), g.metrics());
        let gauges = [
            ("ragway_generation_waiting_requests", "Generation requests waiting to start.", m.waiting.load(Relaxed)),
            ("ragway_generation_running_sequences", "Sequences in the running batch.", m.running.load(Relaxed)),
            ("ragway_generation_last_batch_sequences", "Sequences in the last forward pass.", m.last_batch_seqs.load(Relaxed)),
            ("ragway_generation_last_batch_tokens", "Tokens in the last forward pass.", m.last_batch_tokens.load(Relaxed)),
            ("ragway_generation_kv_cache_used_tokens", "KV cache tokens held by running sequences.", m.kv_used_tokens.load(Relaxed)),
            ("ragway_generation_kv_cache_capacity_tokens", "KV cache budget in tokens.", m.kv_capacity_tokens.load(Relaxed)),
        ];
        for (name, help, v) in gauges {
            family(&mut out, name, "gauge", help, &[(l.clone(), v as f64)]);
        }
        let counters = [
            ("ragway_generation_steps_total", "Forward passes run.", m.steps.load(Relaxed)),
            ("ragway_generation_batch_sequences_total", "Sum of sequences over forward passes.", m.batch_seqs_total.load(Relaxed)),
            ("ragway_generation_forward_tokens_total", "Tokens run through the model.", m.forward_tokens_total.load(Relaxed)),
            ("ragway_generation_prompt_tokens_total", "Prompt tokens admitted.", m.prompt_tokens_total.load(Relaxed)),
            ("ragway_generation_generated_tokens_total", "Tokens sampled.", m.generated_tokens_total.load(Relaxed)),
            ("ragway_generation_requests_total", "Generation requests accepted.", m.requests_total.load(Relaxed)),
            ("ragway_generation_requests_rejected_total", "Generation requests refused (queue full).", m.requests_rejected.load(Relaxed)),
            ("ragway_generation_preemptions_total", "Sequences preempted for KV cache memory.", m.preemptions.load(Relaxed)),
            ("ragway_generation_grammar_masks_total", "Token masks computed for constrained sequences.", m.masks_total.load(Relaxed)),
            ("ragway_generation_grammar_mask_microseconds_total", "Time spent computing token masks (beside the forward passes).", m.mask_micros_total.load(Relaxed)),
            ("ragway_generation_grammar_bound_steps_total", "Steps whose masks took longer than their forward pass.", m.mask_bound_steps.load(Relaxed)),
            ("ragway_generation_grammar_forced_tokens_total", "Tokens a grammar forced (appended without sampling).", m.forced_tokens_total.load(Relaxed)),
        ];
        for (name, help, v) in counters {
            family(&mut out, name, "counter", help, &[(l.clone(), v as f64)]);
        }
        for (name, help, h) in [
            ("ragway_generation_time_to_first_token_seconds", "Time from request to first token.", &m.time_to_first_token),
            ("ragway_generation_inter_token_latency_seconds", "Time between tokens of a sequence.", &m.inter_token_latency),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            write_histogram_series(&mut out, name, &l, h);
        }
    }
    if let Some(index) = state.index.get() {
        let infos: Vec<_> = index.list().iter().map(|c| (c.name().to_string(), c.info())).collect();
        let per = |f: &dyn Fn(&ragway_index::CollectionInfo) -> f64| -> Vec<(String, f64)> {
            infos.iter().map(|(n, i)| (format!("collection=\"{}\"", escape(n)), f(i))).collect()
        };
        family(&mut out, "ragway_index_documents", "gauge", "Documents per collection.", &per(&|i| i.documents as f64));
        family(&mut out, "ragway_index_chunks", "gauge", "Chunks per collection.", &per(&|i| i.chunks as f64));
        family(&mut out, "ragway_index_disk_bytes", "gauge", "Disk used per collection.", &per(&|i| i.disk_bytes as f64));
        family(&mut out, "ragway_index_memory_bytes", "gauge", "Estimated memory per collection.", &per(&|i| i.memory_bytes as f64));
        family(
            &mut out,
            "ragway_index_unsearchable_writes",
            "gauge",
            "Log entries written but not yet searchable, per collection.",
            &per(&|i| i.last_seq.saturating_sub(i.visible_seq) as f64),
        );
        let reports: Vec<(String, ragway_index::drift::DriftReport)> =
            index.list().iter().map(|c| (format!("collection=\"{}\"", escape(c.name())), c.drift().report())).collect();
        let drift = |f: &dyn Fn(&ragway_index::drift::DriftReport) -> Option<f64>| -> Vec<(String, f64)> {
            reports.iter().filter_map(|(l, r)| f(r).map(|v| (l.clone(), v))).collect()
        };
        let ks = |k: Option<ragway_index::drift::Ks>| k.map(|k| k.statistic);
        family(&mut out, "ragway_drift_alert", "gauge", "1 while a collection's query drift crosses a threshold.", &drift(&|r| Some(f64::from(u8::from(r.alert)))));
        family(&mut out, "ragway_drift_window_queries", "gauge", "Live queries in the drift window.", &drift(&|r| Some(r.window_queries as f64)));
        family(&mut out, "ragway_drift_reference_queries", "gauge", "Queries in the drift reference (collected so far while it is being made).", &drift(&|r| Some(r.reference_queries as f64)));
        family(&mut out, "ragway_drift_similarity_ks", "gauge", "KS statistic of nearest-chunk similarity, window vs reference.", &drift(&|r| ks(r.similarity_ks)));
        family(&mut out, "ragway_drift_centroid_ks", "gauge", "KS statistic of similarity to the collection centroid, window vs reference.", &drift(&|r| ks(r.centroid_ks)));
        family(&mut out, "ragway_drift_projection_ks", "gauge", "Largest KS statistic over the random projections, window vs reference.", &drift(&|r| ks(r.projection_ks)));
        family(&mut out, "ragway_drift_length_psi", "gauge", "Population stability index of query token lengths, window vs reference.", &drift(&|r| r.length_psi));
        family(&mut out, "ragway_drift_low_score_share", "gauge", "Share of window queries whose best score is below the relevance threshold.", &drift(&|r| r.low_score_share));
        family(&mut out, "ragway_drift_grounding_flagged_share", "gauge", "Share of recent RAG answers flagged as not grounded.", &drift(&|r| r.grounding_flagged_share));
        let jobs = index.jobs().list();
        let by_state: Vec<(String, f64)> = [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed]
            .into_iter()
            .map(|s| {
                let n = jobs.iter().filter(|j| j.state() == s).count();
                (format!("state=\"{}\"", s.as_str()), n as f64)
            })
            .collect();
        family(&mut out, "ragway_ingest_jobs", "gauge", "Ingestion jobs by state.", &by_state);
        let running: Vec<_> = jobs.iter().filter(|j| j.state() == JobState::Running).map(|j| j.view()).collect();
        let job_samples = |f: &dyn Fn(&ragway_index::ProgressView) -> f64| -> Vec<(String, f64)> {
            running
                .iter()
                .map(|v| (format!("job=\"{}\",collection=\"{}\"", escape(&v.id), escape(&v.collection)), f(&v.progress)))
                .collect()
        };
        family(&mut out, "ragway_ingest_documents_written", "gauge", "Documents written by running jobs.", &job_samples(&|p| p.documents_written as f64));
        family(&mut out, "ragway_ingest_chunks_written", "gauge", "Chunks written by running jobs.", &job_samples(&|p| p.chunks_written as f64));
        family(&mut out, "ragway_ingest_progress_ratio", "gauge", "Share of the input done by running jobs (0 to 1).", &job_samples(&|p| p.fraction));
        family(&mut out, "ragway_ingest_documents_per_second", "gauge", "Rate of running jobs.", &job_samples(&|p| p.documents_per_second));
        family(&mut out, "ragway_ingest_indexing", "gauge", "1 while a running job builds its collection's indexes after a bulk load.", &job_samples(&|p| p.indexing as u8 as f64));
    }
    out
}
