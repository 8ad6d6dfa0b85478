//! One thread owns the embedding model; callers talk to it through an async handle.
//!
//! Callers tokenize on their own (blocking-pool) thread, then queue the token ids on a
//! bounded channel. The worker takes the oldest request and every request already waiting
//! behind it up to the token budget, runs them as one set of forward passes (requests share
//! batches), and answers each on its own oneshot. A full queue is refused at once
//! ([`EngineError::QueueFull`]) so that a server can answer 429 instead of piling up work.

use super::{EmbedInput, Embedder, EmbedderOptions, Embedding, Tokenized};
use crate::error::{EngineError, Result};
use crate::generate::scheduler::Histogram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// How to start an embedding worker.
#[derive(Debug, Clone)]
pub struct EmbedWorkerConfig {
    /// Id the model is served under (e.g. `all-MiniLM-L6-v2`).
    pub model_id: String,
    /// Local path or hub repository id (see [`crate::models`]).
    pub source: String,
    pub models_dir: PathBuf,
    pub options: EmbedderOptions,
    /// Requests that may wait for the worker; more are refused.
    pub queue_capacity: usize,
    /// Inputs allowed in one request.
    pub max_inputs_per_request: usize,
}

struct Job {
    inputs: Vec<Tokenized>,
    reply: oneshot::Sender<Result<Vec<Embedding>>>,
    span: tracing::Span,
}

/// Counters of the worker's forward batches (for `/metrics`).
#[derive(Debug)]
pub struct EmbedMetrics {
    pub batches_total: AtomicU64,
    pub inputs_total: AtomicU64,
    pub tokens_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_rejected: AtomicU64,
    /// Inputs per batch.
    pub batch_inputs: Histogram,
    /// Tokens per batch.
    pub batch_tokens: Histogram,
}

const INPUT_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const TOKEN_BOUNDS: &[f64] = &[16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

impl Default for EmbedMetrics {
    fn default() -> Self {
        Self {
            batches_total: AtomicU64::new(0),
            inputs_total: AtomicU64::new(0),
            tokens_total: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            batch_inputs: Histogram::new(INPUT_BOUNDS),
            batch_tokens: Histogram::new(TOKEN_BOUNDS),
        }
    }
}

/// Cheap-to-clone async handle on a running embedding worker.
#[derive(Clone)]
pub struct EmbedHandle {
    tx: mpsc::Sender<Job>,
    embedder: Arc<Embedder>,
    config: Arc<EmbedWorkerConfig>,
    metrics: Arc<EmbedMetrics>,
}

/// Starts embedding workers.
pub struct EmbedWorker;

impl EmbedWorker {
    /// Loads the model on a new thread and returns once it is ready; a load failure is
    /// returned here, not at the first request.
    pub fn spawn(config: EmbedWorkerConfig) -> Result<EmbedHandle> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (tx, rx) = mpsc::channel::<Job>(config.queue_capacity.max(1));
        let thread_config = config.clone();
        let metrics = Arc::new(EmbedMetrics::default());
        let thread_metrics = metrics.clone();
        std::thread::Builder::new().name(format!("embed-{}", config.model_id)).spawn(move || {
            let loaded =
                Embedder::from_source(&thread_config.source, &thread_config.models_dir, thread_config.options.clone())
                    .map(Arc::new);
            match loaded {
                Ok(embedder) => {
                    let _ = ready_tx.send(Ok(embedder.clone()));
                    run(embedder, rx, thread_config.options.max_batch_tokens, &thread_metrics);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        let embedder = ready_rx.recv().map_err(|_| EngineError::WorkerStopped { model: config.model_id.clone() })??;
        Ok(EmbedHandle { tx, embedder, config: Arc::new(config), metrics })
    }
}

fn run(embedder: Arc<Embedder>, mut rx: mpsc::Receiver<Job>, max_batch_tokens: usize, metrics: &EmbedMetrics) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut tokens: usize = jobs[0].inputs.iter().map(|t| t.ids.len()).sum();
        while tokens < max_batch_tokens {
            match rx.try_recv() {
                Ok(job) => {
                    tokens += job.inputs.iter().map(|t| t.ids.len()).sum::<usize>();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Callers that went away (client disconnect) cost nothing.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        // Move (not copy) every request's token ids into one list; remember each one's share.
        let counts: Vec<usize> = jobs.iter().map(|j| j.inputs.len()).collect();
        let all: Vec<Tokenized> = jobs.iter_mut().flat_map(|j| std::mem::take(&mut j.inputs)).collect();
        let span = tracing::info_span!("embed_batch", requests = jobs.len(), inputs = all.len(), tokens);
        let batch_tokens: usize = all.iter().map(|t| t.ids.len()).sum();
        metrics.batches_total.fetch_add(1, Ordering::Relaxed);
        metrics.inputs_total.fetch_add(all.len() as u64, Ordering::Relaxed);
        metrics.tokens_total.fetch_add(batch_tokens as u64, Ordering::Relaxed);
        metrics.batch_inputs.observe(all.len() as f64 / 1e6);
        metrics.batch_tokens.observe(batch_tokens as f64 / 1e6);
        let result = span.in_scope(|| embedder.embed_tokenized(&all));
        match result {
            Ok(mut embeddings) => {
                for (job, count) in jobs.into_iter().zip(counts).rev() {
                    let mine = embeddings.split_off(embeddings.len() - count);
                    let _ = job.span.in_scope(|| job.reply.send(Ok(mine)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedding batch failed");
                let msg = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(EngineError::Internal(msg.clone())));
                }
            }
        }
    }
}

impl EmbedHandle {
    /// Embeds the inputs: validates them, tokenizes off the async workers, queues them for
    /// the model thread and awaits the result (in input order).
    #[tracing::instrument(skip_all, fields(model = %self.config.model_id, inputs = inputs.len()))]
    pub async fn embed(&self, inputs: Vec<EmbedInput>) -> Result<Vec<Embedding>> {
        if inputs.len() > self.config.max_inputs_per_request {
            return Err(EngineError::TooManyInputs { got: inputs.len(), max: self.config.max_inputs_per_request });
        }
        let embedder = self.embedder.clone();
        let tokenized = tokio::task::spawn_blocking(move || embedder.tokenize_checked(&inputs))
            .await
            .map_err(|_| self.stopped())??;
        self.embed_tokenized(tokenized).await
    }

    /// Queues already tokenized inputs (see [`Embedder::tokenize_checked`]).
    pub async fn embed_tokenized(&self, inputs: Vec<Tokenized>) -> Result<Vec<Embedding>> {
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs, reply, span: tracing::Span::current() };
        self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
                EngineError::QueueFull { model: self.config.model_id.clone(), capacity: self.config.queue_capacity }
            }
            mpsc::error::TrySendError::Closed(_) => self.stopped(),
        })?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Convenience for texts: `embed` then the vectors alone.
    pub async fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let inputs = texts.iter().map(|t| EmbedInput::from(*t)).collect();
        Ok(self.embed(inputs).await?.into_iter().map(|e| e.vector).collect())
    }

    fn stopped(&self) -> EngineError {
        EngineError::WorkerStopped { model: self.config.model_id.clone() }
    }

    /// Id the model is served under.
    pub fn model_id(&self) -> &str {
        &self.config.model_id
    }

    /// The loaded model (dimension, tokenizer, limits).
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Requests waiting for the model thread.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The worker's configuration.
    pub fn config(&self) -> &EmbedWorkerConfig {
        &self.config
    }

    /// Batch and request counters.
    pub fn metrics(&self) -> &EmbedMetrics {
        &self.metrics
    }
}
