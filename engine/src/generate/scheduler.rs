//! Continuous batching: one thread owns the decoder and runs a loop of *steps*. Between
//! steps it drops cancelled sequences and admits waiting requests; each step is one forward
//! pass over every running sequence — one new token for those decoding, a chunk of the
//! prompt for those prefilling (chunks are cut so a step stays within the token budget and a
//! long prompt does not stall the others) — after which every sequence that reached its end
//! samples a token and streams it.
//!
//! Memory: the KV cache is counted in tokens against a budget. A request is admitted only if
//! its prompt fits beside the running sequences; when decoding outgrows the budget the most
//! recent sequence is *preempted*: its cache is freed and it waits at the head of the queue,
//! to be prefilled again (prompt + output so far) when memory frees up, its stream unaffected.
//!
//! Waiting requests sit in a bounded queue; when it is full, [`GenerateHandle::submit`]
//! fails at once with [`EngineError::QueueFull`].

use super::constrain::{Constrainer, Constraint, Grammar, GrammarLimits};
use super::device_model::{DeviceLlama, KvSizing, PagedSeq};
use super::model::{KvCache, Llama, LlamaConfig, Scratch, SeqBatch};
use super::paged::PagedKv;
use super::sampling::{random_seed, ModelSampling, Sampler, SamplingParams, TokenLogprob};
use super::tokenizer::{IncrementalDecoder, TextTokenizer};
use super::{ChatTemplate, GenerativeModel};
use crate::error::{EngineError, Result};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;

/// How to start a generation worker.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Id the model is served under.
    pub model_id: String,
    /// GGUF file, model folder, name under `models_dir`, or hub repository.
    pub source: String,
    pub models_dir: PathBuf,
    /// Replaces the model's own chat template.
    pub chat_template: Option<String>,
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Tokens in one forward pass at most (prefill chunks are cut to fit).
    pub max_batch_tokens: usize,
    /// Requests that may wait; more are refused.
    pub max_waiting: usize,
    /// KV cache budget in MiB.
    pub kv_cache_mib: usize,
    /// Tokens generated at most when a request sets no `max_tokens` (fewer when the context
    /// leaves fewer).
    pub default_max_tokens: usize,
    /// Where the decoder runs: `cpu`, `cuda[:N]`, `metal[:N]` or `auto`.
    pub device: String,
    /// Which decoder; `None` picks [`DecoderKind::Native`] on the CPU and
    /// [`DecoderKind::Paged`] elsewhere.
    pub decoder: Option<DecoderKind>,
    /// On a GPU: the share of its memory ragway may fill (weights, activations and the KV
    /// cache, as vLLM's `gpu_memory_utilization`); the KV cache gets what the weights leave.
    /// Elsewhere the KV cache is `kv_cache_mib`.
    pub gpu_memory_fraction: f32,
}

/// The decoder implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderKind {
    /// ragway's own CPU kernels (packed quantized matmuls, f16 KV blocks): CPU only.
    Native,
    /// Candle tensors on any device over a paged KV cache in device memory (the CUDA path;
    /// on the CPU it serves to test that path).
    Paged,
}

/// GPU memory kept free for activations and the allocator beside weights and KV cache.
const GPU_RESERVE_BYTES: usize = 1 << 30;

/// [`GenerateConfig::default_max_tokens`] unless configured.
pub const DEFAULT_MAX_TOKENS: usize = 1024;

impl GenerateConfig {
    pub fn new(model_id: &str, source: &str, models_dir: PathBuf) -> Self {
        Self {
            model_id: model_id.into(),
            source: source.into(),
            models_dir,
            chat_template: None,
            max_running: 16,
            max_batch_tokens: 512,
            max_waiting: 64,
            kv_cache_mib: 2048,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            device: "cpu".into(),
            decoder: None,
            gpu_memory_fraction: 0.9,
        }
    }
}

/// One generation request: `n` sequences from the same prompt.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// `None`: the worker's [`GenerateConfig::default_max_tokens`], or what the context
    /// leaves if that is less.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    pub n: usize,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// The caller's tracing span (its request id): the worker thread logs each sequence's
    /// start, preemption and end inside it.
    pub span: tracing::Span,
    /// A grammar the output must match ([`GenerateHandle::compile`]); each of the `n`
    /// sequences gets its own copy of the state.
    pub constraint: Option<Constraint>,
    /// A grammar that takes over once the output contains a trigger (unused with
    /// `constraint`).
    pub lazy: Option<LazyConstraint>,
}

/// A grammar that starts when the generated text contains `trigger`: the text after the
/// trigger must match it. Tool calls with `tool_choice: auto` use it — the model may answer
/// in text, but a call, once begun with `<tool_call>`, is constrained to parse.
#[derive(Debug, Clone)]
pub struct LazyConstraint {
    pub trigger: String,
    pub constraint: Constraint,
    /// The trigger counts only at the start of the output (after whitespace): Llama-3-style
    /// calls are a bare JSON object that is the whole message.
    pub anchored: bool,
}

impl GenerationRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens: Some(max_tokens),
            sampling,
            stop: Vec::new(),
            n: 1,
            ignore_eos: false,
            span: tracing::Span::current(),
            constraint: None,
            lazy: None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a stream delivers, per sequence (`index` < n).
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A sampled token and the text it released (empty while a multi-byte character or a
    /// possible stop string is incomplete).
    Token { index: usize, token: u32, text: String, logprob: Option<TokenLogprob> },
    /// Text released at the end without a token of its own (held-back bytes).
    Text { index: usize, text: String },
    /// The sequence is over.
    Done { index: usize, finish_reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// The engine failed; the stream ends.
    Error { message: String },
}

/// The receiving end of a request. Dropping it cancels the request.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    pub prompt_tokens: usize,
    pub n: usize,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<GenEvent> {
        self.rx.blocking_recv()
    }
}

/// A fixed-bucket histogram of seconds (Prometheus style, cumulative on export).
#[derive(Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, secs: f64) {
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Per-bucket counts (last: above the largest bound), sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        (
            self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Counters the scheduler keeps up to date (for `/metrics`).
#[derive(Debug)]
pub struct GenMetrics {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub steps: AtomicU64,
    /// Sequences and tokens in the last step.
    pub last_batch_seqs: AtomicUsize,
    pub last_batch_tokens: AtomicUsize,
    pub batch_seqs_total: AtomicU64,
    /// Tokens run through the model (prefill and decode).
    pub forward_tokens_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub preemptions: AtomicU64,
    pub kv_used_tokens: AtomicUsize,
    pub kv_capacity_tokens: AtomicUsize,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Grammar masks computed, and the time spent on them (µs), beside the forward passes.
    pub masks_total: AtomicU64,
    pub mask_micros_total: AtomicU64,
    /// Tokens a grammar forced (appended without sampling, fed in chunks).
    pub forced_tokens_total: AtomicU64,
    /// Steps whose masks took longer than their forward pass (the grammar, not the model,
    /// set the pace).
    pub mask_bound_steps: AtomicU64,
}

impl GenMetrics {
    fn new(kv_capacity: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            steps: AtomicU64::new(0),
            last_batch_seqs: AtomicUsize::new(0),
            last_batch_tokens: AtomicUsize::new(0),
            batch_seqs_total: AtomicU64::new(0),
            forward_tokens_total: AtomicU64::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            generated_tokens_total: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            kv_used_tokens: AtomicUsize::new(0),
            kv_capacity_tokens: AtomicUsize::new(kv_capacity),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(LATENCY_BOUNDS),
            masks_total: AtomicU64::new(0),
            forced_tokens_total: AtomicU64::new(0),
            mask_micros_total: AtomicU64::new(0),
            mask_bound_steps: AtomicU64::new(0),
        }
    }
}

struct Job {
    req: GenerationRequest,
    tx: mpsc::UnboundedSender<GenEvent>,
    received: Instant,
}

/// Cheap-to-clone handle on a running generation worker.
#[derive(Clone)]
pub struct GenerateHandle {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
}

struct Shared {
    config: GenerateConfig,
    tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    model_sampling: ModelSampling,
    model_config: LlamaConfig,
    kv_budget_tokens: usize,
    metrics: GenMetrics,
    /// The grammar compiler over this model's vocabulary, built at the first constrained
    /// request (building the token trie takes a moment and memory unconstrained serving
    /// does not need).
    constrainer: OnceLock<std::result::Result<Arc<Constrainer>, String>>,
}

/// Starts generation workers.
pub struct GenerateWorker;

impl GenerateWorker {
    /// Loads the model on a new thread and returns once it is ready (a load failure is
    /// returned here).
    pub fn spawn(config: GenerateConfig) -> Result<GenerateHandle> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(config.max_waiting.max(1));
        let thread_config = config.clone();
        std::thread::Builder::new().name(format!("generate-{}", config.model_id)).spawn(move || {
            let cfg = thread_config;
            match load_decoder(&cfg) {
                Ok((m, kv_budget_tokens)) => {
                    let mc = m.model.config();
                    let shared = Arc::new(Shared {
                        kv_budget_tokens,
                        metrics: GenMetrics::new(kv_budget_tokens),
                        tokenizer: m.tokenizer.clone(),
                        chat_template: m.chat_template,
                        model_sampling: m.sampling,
                        model_config: mc.clone(),
                        constrainer: OnceLock::new(),
                        config: cfg,
                    });
                    tracing::info!(
                        model = %shared.config.model_id,
                        device = %shared.config.device,
                        kv_cache_tokens = kv_budget_tokens,
                        max_running = shared.config.max_running,
                        "generation worker ready"
                    );
                    let _ = ready_tx.send(Ok(shared.clone()));
                    Scheduler::new(m.model, m.tokenizer, shared, rx).run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        let shared = ready_rx.recv().map_err(|_| EngineError::WorkerStopped { model: config.model_id.clone() })??;
        Ok(GenerateHandle { tx, shared })
    }
}

/// Loads the configured decoder on its device and returns it with the KV budget in tokens.
fn load_decoder(cfg: &GenerateConfig) -> Result<(GenerativeModel<Decoder>, usize)> {
    let device = crate::device::open_device(&cfg.device)?;
    let kind = cfg.decoder.unwrap_or(if device.is_cpu() { DecoderKind::Native } else { DecoderKind::Paged });
    let template = cfg.chat_template.as_deref();
    match kind {
        DecoderKind::Native => {
            if !device.is_cpu() {
                return Err(EngineError::Device(cfg.device.clone(), "the native decoder runs on the CPU only".into()));
            }
            let m = GenerativeModel::load(&cfg.source, &cfg.models_dir, template)?;
            let budget = (cfg.kv_cache_mib << 20) / m.model.config().kv_bytes_per_token();
            Ok((m.map(Decoder::Host), budget))
        }
        DecoderKind::Paged => {
            // Sized once the weights are on the device, so that the GPU's free memory counts
            // them as they are held there.
            let size = |mc: &LlamaConfig, weights: usize| -> Result<KvSizing> {
                let per_token = mc.kv_bytes_per_token().max(1);
                let budget_tokens = match crate::device::device_memory(&device)? {
                    Some((free, total)) => gpu_kv_budget(cfg, free, total, weights, per_token)?,
                    None => (cfg.kv_cache_mib << 20) / per_token,
                };
                Ok(KvSizing { budget_tokens, max_running: cfg.max_running, max_batch_tokens: cfg.max_batch_tokens })
            };
            let m = GenerativeModel::load_on_device_sized(&cfg.source, &cfg.models_dir, template, &device, &size)?;
            let budget = m.model.kv_sizing().budget_tokens;
            Ok((m.map(Decoder::Paged), budget))
        }
    }
}

/// The KV budget in tokens on a GPU with `free` of `total` bytes once the decoder's
/// `weights` are loaded: ragway may fill `gpu_memory_fraction` of `total`; what is already
/// in use (the weights included) and a reserve for activations come off first.
fn gpu_kv_budget(
    cfg: &GenerateConfig,
    free: usize,
    total: usize,
    weights: usize,
    kv_per_token: usize,
) -> Result<usize> {
    let fraction = cfg.gpu_memory_fraction;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(EngineError::Device(
            cfg.device.clone(),
            format!("--gpu-memory-fraction {fraction} is not in (0, 1]"),
        ));
    }
    let allowed = (total as f64 * fraction as f64) as usize;
    let in_use = total.saturating_sub(free);
    let kv = allowed.saturating_sub(in_use).saturating_sub(GPU_RESERVE_BYTES);
    let tokens = kv / kv_per_token;
    if tokens < cfg.max_batch_tokens.max(1) {
        return Err(EngineError::Device(
            cfg.device.clone(),
            format!(
                "out of memory for model {}: {} MiB of weights, {} MiB in use with them and a {} MiB reserve leave \
                 no KV cache within --gpu-memory-fraction {fraction} of {} MiB",
                cfg.model_id,
                weights >> 20,
                in_use >> 20,
                GPU_RESERVE_BYTES >> 20,
                total >> 20
            ),
        ));
    }
    Ok(tokens)
}

/// The decoder a scheduler drives.
pub enum Decoder {
    Host(Llama),
    Paged(DeviceLlama),
}

impl super::DecoderModel for Decoder {
    fn config(&self) -> &LlamaConfig {
        self.config()
    }
}

impl Decoder {
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Decoder::Host(m) => m.config(),
            Decoder::Paged(m) => m.config(),
        }
    }

    fn new_kv(&self) -> SeqKv {
        match self {
            Decoder::Host(m) => SeqKv::Host(KvCache::new(m.config())),
            Decoder::Paged(m) => SeqKv::Paged(m.new_kv()),
        }
    }

    fn forward(&self, items: Vec<(&[u32], &mut SeqKv, bool)>, scratch: &mut Scratch) -> Result<Vec<f32>> {
        match self {
            Decoder::Host(m) => {
                let mut batch = items
                    .into_iter()
                    .map(|(tokens, kv, want_logits)| match kv {
                        SeqKv::Host(cache) => Ok(SeqBatch { tokens, cache, want_logits }),
                        SeqKv::Paged(_) => Err(EngineError::Internal("paged cache on the host decoder".into())),
                    })
                    .collect::<Result<Vec<_>>>()?;
                m.forward(&mut batch, scratch)
            }
            Decoder::Paged(m) => {
                let mut batch = items
                    .into_iter()
                    .map(|(tokens, kv, want_logits)| match kv {
                        SeqKv::Paged(kv) => Ok(PagedSeq { tokens, kv, want_logits }),
                        SeqKv::Host(_) => Err(EngineError::Internal("host cache on the paged decoder".into())),
                    })
                    .collect::<Result<Vec<_>>>()?;
                m.forward(&mut batch)
            }
        }
    }
}

/// A sequence's KV memory on its decoder.
enum SeqKv {
    Host(KvCache),
    Paged(PagedKv),
}

impl SeqKv {
    fn len(&self) -> usize {
        match self {
            SeqKv::Host(c) => c.len(),
            SeqKv::Paged(c) => c.len(),
        }
    }

    fn clear(&mut self) {
        match self {
            SeqKv::Host(c) => c.clear(),
            SeqKv::Paged(c) => c.clear(),
        }
    }

    /// A copy to continue from (paged: shares the blocks, copied on first write).
    fn fork(&self) -> Self {
        match self {
            SeqKv::Host(c) => SeqKv::Host(c.clone()),
            SeqKv::Paged(c) => SeqKv::Paged(c.fork()),
        }
    }
}

impl GenerateHandle {
    pub fn model_id(&self) -> &str {
        &self.shared.config.model_id
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.shared.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.shared.chat_template.as_ref()
    }

    pub fn context_length(&self) -> usize {
        self.shared.model_config.context_length
    }

    /// The sampling values the model recommends (empty when it recommends none).
    pub fn model_sampling(&self) -> ModelSampling {
        self.shared.model_sampling
    }

    /// What a request gets for the sampling fields it leaves unset: the model's
    /// recommendations over [`SamplingParams::server_default`].
    pub fn default_sampling(&self) -> SamplingParams {
        self.shared.model_sampling.resolve()
    }

    pub fn metrics(&self) -> &GenMetrics {
        &self.shared.metrics
    }

    /// The grammar compiler over this model's vocabulary (built on first use).
    pub fn constrainer(&self) -> Result<Arc<Constrainer>> {
        let s = &self.shared;
        s.constrainer
            .get_or_init(|| {
                let started = Instant::now();
                let c = Constrainer::new(&s.tokenizer, s.model_config.vocab, GrammarLimits::default());
                tracing::info!(model = %s.config.model_id, ms = started.elapsed().as_millis() as u64, "grammar engine ready");
                c.map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Internal)
    }

    /// Checks and compiles `grammar` for a request ([`GenerationRequest::constraint`]);
    /// `param` names the request field it came from in errors.
    pub fn compile(&self, grammar: &Grammar, param: &str) -> Result<Constraint> {
        self.constrainer()?.compile(grammar, param)
    }

    pub fn config(&self) -> &GenerateConfig {
        &self.shared.config
    }

    /// Checks the request and queues it. Errors: empty prompt, bad parameters, prompt plus
    /// `max_tokens` beyond the context ([`EngineError::ContextLengthExceeded`]), full queue.
    pub fn submit(&self, mut req: GenerationRequest) -> Result<GenerationStream> {
        let s = &self.shared;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest {
                param: Some("prompt".into()),
                message: "the prompt is empty".into(),
            });
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= s.model_config.vocab) {
            return Err(EngineError::InvalidTokenId { index: 0, token_id: bad, vocab_size: s.model_config.vocab });
        }
        if req.n == 0 || req.n > 16 {
            return Err(EngineError::InvalidRequest {
                param: Some("n".into()),
                message: format!("n must be between 1 and 16, got {}", req.n),
            });
        }
        if req.max_tokens == Some(0) {
            return Err(EngineError::InvalidRequest {
                param: Some("max_tokens".into()),
                message: "max_tokens must be at least 1".into(),
            });
        }
        if req.stop.len() > 4 || req.stop.iter().any(|s| s.is_empty()) {
            return Err(EngineError::InvalidRequest {
                param: Some("stop".into()),
                message: "at most 4 non-empty stop strings".into(),
            });
        }
        req.sampling.validate(s.model_config.vocab)?;
        let prompt_len = req.prompt.len();
        let limit = s.model_config.max_len_within(s.kv_budget_tokens / req.n);
        // What the context leaves after the prompt; compared, never added to, so a
        // `max_tokens` near usize::MAX cannot wrap the check.
        let room = limit.saturating_sub(prompt_len);
        let max_tokens = req.max_tokens.unwrap_or(s.config.default_max_tokens.min(room));
        if max_tokens > room || max_tokens == 0 {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                max_tokens: max_tokens.max(1),
                context: limit,
            });
        }
        req.max_tokens = Some(max_tokens);
        let (tx, rx) = mpsc::unbounded_channel();
        let n = req.n;
        s.metrics.waiting.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { req, tx, received: Instant::now() }) {
            Ok(()) => {
                s.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
                Ok(GenerationStream { rx, prompt_tokens: prompt_len, n })
            }
            Err(e) => {
                s.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                s.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        Err(EngineError::QueueFull { model: s.config.model_id.clone(), capacity: s.config.max_waiting })
                    }
                    TrySendError::Disconnected(_) => {
                        Err(EngineError::WorkerStopped { model: s.config.model_id.clone() })
                    }
                }
            }
        }
    }
}

/// How a token came: sampled, or forced by the grammar (before the last of a run of forced
/// tokens, or the last).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Forced {
    No,
    Before,
    Last,
}

/// One sequence in flight.
struct Seq {
    index: usize,
    /// The request this sequence belongs to.
    group: u64,
    /// Waiting for sequence 0 of its request to finish the prompt, then copies its cache.
    awaits_fork: bool,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    cache: SeqKv,
    sampler: Sampler,
    stop: Arc<Vec<String>>,
    ignore_eos: bool,
    decoder: IncrementalDecoder,
    pending: String,
    tx: mpsc::UnboundedSender<GenEvent>,
    received: Instant,
    last_token_at: Option<Instant>,
    span: tracing::Span,
    constraint: Option<Constraint>,
    lazy: Option<LazyConstraint>,
    /// The end of the decoded text, while a lazy grammar waits for its trigger.
    recent: String,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to feed before the next sample.
    fn to_feed(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Looks for the lazy grammar's trigger in the text so far; once found, the grammar
    /// starts, fed the text after the trigger (a text the grammar refuses leaves the sequence
    /// unconstrained). True when that text already completes the grammar.
    fn watch_trigger(&mut self, tk: &TextTokenizer, delta: &str) -> bool {
        let Some(lazy) = self.lazy.as_ref() else { return false };
        self.recent.push_str(delta);
        if lazy.anchored {
            let head = self.recent.trim_start();
            if !head.starts_with(lazy.trigger.as_str()) {
                if !lazy.trigger.starts_with(head) {
                    // The output began otherwise: it is text, and stays free.
                    self.lazy = None;
                    self.recent.clear();
                }
                return false;
            }
        }
        let Some(at) = self.recent.find(lazy.trigger.as_str()) else {
            // Keep only what could still be the start of the trigger.
            let keep = lazy.trigger.len();
            if self.recent.len() > keep {
                let mut cut = self.recent.len() - keep;
                while !self.recent.is_char_boundary(cut) {
                    cut += 1;
                }
                self.recent.drain(..cut);
            }
            return false;
        };
        let rest = self.recent[at + lazy.trigger.len()..].to_string();
        let mut c = self.lazy.take().expect("checked above").constraint;
        self.recent.clear();
        let fits = rest.is_empty()
            || tk
                .encode(&rest, false)
                .is_ok_and(|ids| ids.iter().all(|&t| c.allows(t).unwrap_or(false) && c.accept(t).is_ok()));
        if !fits {
            return false;
        }
        let done = c.is_finished();
        self.constraint = Some(c);
        done
    }

    /// Adds decoded text; returns what may be sent now and whether a stop string was hit.
    fn push_text(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if self.stop.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        let first = self.stop.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut hold = 0;
        for (i, _) in self.pending.char_indices() {
            let tail = &self.pending[i..];
            if self.stop.iter().any(|s| s.starts_with(tail)) {
                hold = self.pending.len() - i;
                break;
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }
}

struct Scheduler {
    model: Decoder,
    tokenizer: TextTokenizer,
    shared: Arc<Shared>,
    rx: Receiver<Job>,
    running: Vec<Seq>,
    /// Preempted sequences, first to be re-admitted.
    preempted: VecDeque<Seq>,
    /// A job taken from the queue that did not fit yet.
    held: Option<Job>,
    scratch: Scratch,
    closed: bool,
    next_group: u64,
}

impl Scheduler {
    fn new(model: Decoder, tokenizer: TextTokenizer, shared: Arc<Shared>, rx: Receiver<Job>) -> Self {
        Self {
            model,
            tokenizer,
            shared,
            rx,
            running: Vec::new(),
            preempted: VecDeque::new(),
            held: None,
            scratch: Scratch::default(),
            closed: false,
            next_group: 0,
        }
    }

    /// Tokens of KV cache the running sequences hold or are about to hold (siblings waiting to
    /// copy their first sequence's prompt hold nothing yet).
    fn kv_used(&self) -> usize {
        self.kv_after(0)
    }

    /// [`kv_used`](Self::kv_used) once every running sequence has `extra` more tokens. A
    /// sequence costs [`LlamaConfig::kv_tokens`](super::LlamaConfig::kv_tokens) of its length:
    /// sliding-window layers hold only their window.
    fn kv_after(&self, extra: usize) -> usize {
        let cfg = self.model.config();
        self.running.iter().filter(|s| !s.awaits_fork).map(|s| cfg.kv_tokens(s.tokens.len() + extra)).sum()
    }

    fn run(mut self) {
        loop {
            self.running.retain(|s| !s.tx.is_closed());
            self.preempted.retain(|s| !s.tx.is_closed());
            self.admit();
            self.publish();
            if self.running.is_empty() {
                if self.closed && self.held.is_none() && self.preempted.is_empty() {
                    return;
                }
                // Nothing to run: wait for a request.
                match self.rx.recv() {
                    Ok(job) => {
                        self.shared.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                        self.held = Some(job);
                        continue;
                    }
                    Err(_) => {
                        self.closed = true;
                        if self.held.is_none() && self.preempted.is_empty() {
                            return;
                        }
                        continue;
                    }
                }
            }
            self.make_room();
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "generation step failed");
                for s in self.running.drain(..) {
                    let _ = s.tx.send(GenEvent::Error { message: e.to_string() });
                }
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let m = &self.shared.metrics;
        m.running.store(self.running.len(), Ordering::Relaxed);
        m.kv_used_tokens.store(self.kv_used(), Ordering::Relaxed);
    }

    /// Moves waiting work into the running set while sequences and KV memory allow.
    fn admit(&mut self) {
        let max_running = self.shared.config.max_running;
        let budget = self.shared.kv_budget_tokens;
        loop {
            if self.running.len() >= max_running {
                return;
            }
            if let Some(seq) = self.preempted.front() {
                if self.kv_used() + self.model.config().kv_tokens(seq.tokens.len() + 1) > budget
                    && !self.running.is_empty()
                {
                    return;
                }
                let seq = self.preempted.pop_front().expect("front exists");
                self.running.push(seq);
                continue;
            }
            let job = match self.held.take() {
                Some(j) => j,
                None => match self.rx.try_recv() {
                    Ok(j) => {
                        self.shared.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                        j
                    }
                    Err(TryRecvError::Empty) => return,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        return;
                    }
                },
            };
            if job.tx.is_closed() {
                continue;
            }
            let n = job.req.n;
            let need = n * self.model.config().kv_tokens(job.req.prompt.len() + 1);
            if (self.kv_used() + need > budget || self.running.len() + n > max_running) && !self.running.is_empty() {
                self.held = Some(job);
                return;
            }
            self.start(job);
        }
    }

    fn start(&mut self, job: Job) {
        let req = job.req;
        let base_seed = req.sampling.seed.unwrap_or_else(random_seed);
        let stop = Arc::new(req.stop);
        self.shared.metrics.prompt_tokens_total.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        req.span.in_scope(|| {
            tracing::debug!(
                prompt_tokens = req.prompt.len(),
                n = req.n,
                queued_ms = job.received.elapsed().as_millis() as u64,
                "generation started"
            )
        });
        self.next_group += 1;
        for index in 0..req.n {
            self.running.push(Seq {
                index,
                group: self.next_group,
                // Sequences 1..n copy sequence 0's prompt cache instead of prefilling it again.
                awaits_fork: index > 0,
                tokens: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                max_new: req.max_tokens.unwrap_or(1),
                cache: self.model.new_kv(),
                sampler: Sampler::new(req.sampling.clone(), base_seed.wrapping_add(index as u64)),
                stop: stop.clone(),
                ignore_eos: req.ignore_eos,
                decoder: IncrementalDecoder::default(),
                pending: String::new(),
                tx: job.tx.clone(),
                received: job.received,
                last_token_at: None,
                span: req.span.clone(),
                constraint: req.constraint.clone(),
                lazy: if req.constraint.is_none() { req.lazy.clone() } else { None },
                recent: String::new(),
            });
        }
    }

    /// Preempts the most recent sequences while the next step would outgrow the KV budget.
    fn make_room(&mut self) {
        let budget = self.shared.kv_budget_tokens;
        while self.running.len() > 1 && self.kv_after(1) > budget {
            let mut seq = self.running.pop().expect("non-empty");
            seq.cache.clear();
            self.shared.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
            seq.span
                .in_scope(|| tracing::debug!("KV cache full: preempting a sequence of {} tokens", seq.tokens.len()));
            self.preempted.push_front(seq);
        }
    }

    fn step(&mut self) -> Result<()> {
        let max_tokens = self.shared.config.max_batch_tokens.max(1);
        // Decoding sequences first (one token each), then prompt chunks in arrival order.
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        let mut budget = max_tokens;
        for (i, s) in self.running.iter().enumerate() {
            if s.awaits_fork {
                continue;
            }
            if s.to_feed() == 1 {
                plan.push((i, 1));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let feed = s.to_feed();
            if feed > 1 && budget > 0 && !s.awaits_fork {
                let chunk = feed.min(budget);
                plan.push((i, chunk));
                budget -= chunk;
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        plan.sort_unstable();
        let want: Vec<bool> = plan.iter().map(|&(i, c)| self.running[i].to_feed() == c).collect();
        let total_tokens: usize = plan.iter().map(|p| p.1).sum();
        // Constraints leave their sequences for the pass so that their masks can be computed
        // beside it; they are put back before sampling.
        let mut masks_due: Vec<(usize, Constraint)> =
            self.running.iter_mut().enumerate().filter_map(|(i, s)| s.constraint.take().map(|c| (i, c))).collect();
        let logits = {
            let mut slots: Vec<Option<&mut Seq>> = self.running.iter_mut().map(Some).collect();
            let mut batch: Vec<(&[u32], &mut SeqKv, bool)> = Vec::with_capacity(plan.len());
            for (&(i, chunk), &w) in plan.iter().zip(&want) {
                let s = slots[i].take().expect("each sequence planned once");
                let start = s.cache.len();
                batch.push((&s.tokens[start..start + chunk], &mut s.cache, w));
            }
            // The native decoder runs the whole pass on a pool thread: its many parallel loops
            // then fork inside the pool instead of each waking the pool from outside. Grammar
            // masks depend only on the tokens already sampled: they are computed on a thread of
            // their own meanwhile.
            let (model, scratch) = (&self.model, &mut self.scratch);
            let constraints: Vec<&mut Constraint> = masks_due.iter_mut().map(|(_, c)| c).collect();
            if constraints.is_empty() {
                model.forward(batch, scratch)
            } else {
                let (out, mask_time) = std::thread::scope(|sc| {
                    let masks = sc.spawn(move || {
                        let t = Instant::now();
                        for c in constraints {
                            // A failure stays in the constraint and surfaces when it is applied.
                            let _ = c.compute_mask();
                        }
                        t.elapsed()
                    });
                    let t = Instant::now();
                    let out = model.forward(batch, scratch);
                    let forward_time = t.elapsed();
                    let mask_time = masks.join().unwrap_or_default();
                    (out, (mask_time, forward_time))
                });
                let m = &self.shared.metrics;
                m.masks_total.fetch_add(masks_due.len() as u64, Ordering::Relaxed);
                m.mask_micros_total.fetch_add(mask_time.0.as_micros() as u64, Ordering::Relaxed);
                if mask_time.0 > mask_time.1 {
                    m.mask_bound_steps.fetch_add(1, Ordering::Relaxed);
                }
                out
            }
        };
        for (i, c) in masks_due {
            self.running[i].constraint = Some(c);
        }
        let logits = logits?;
        let m = &self.shared.metrics;
        m.steps.fetch_add(1, Ordering::Relaxed);
        m.last_batch_seqs.store(plan.len(), Ordering::Relaxed);
        m.last_batch_tokens.store(total_tokens, Ordering::Relaxed);
        m.batch_seqs_total.fetch_add(plan.len() as u64, Ordering::Relaxed);
        m.forward_tokens_total.fetch_add(total_tokens as u64, Ordering::Relaxed);
        let vocab = self.model.config().vocab;
        let now = Instant::now();
        let mut logits = logits;
        let mut finished = Vec::new();
        let mut row = 0;
        for (&(i, _), &w) in plan.iter().zip(&want) {
            if !w {
                continue;
            }
            let first = &self.running[i];
            if first.index == 0 && first.generated() == 0 {
                // Its prompt is in: siblings copy the cache and sample from the same logits.
                let group = first.group;
                let siblings: Vec<usize> = (0..self.running.len())
                    .filter(|&j| self.running[j].group == group && self.running[j].awaits_fork)
                    .collect();
                for j in siblings {
                    let cache = self.running[i].cache.fork();
                    let s = &mut self.running[j];
                    s.cache = cache;
                    s.awaits_fork = false;
                    let mut own = logits[row * vocab..(row + 1) * vocab].to_vec();
                    if self.emit(j, &mut own, now) {
                        finished.push(j);
                    }
                }
            }
            if self.emit(i, &mut logits[row * vocab..(row + 1) * vocab], now) {
                finished.push(i);
            }
            row += 1;
        }
        finished.sort_unstable();
        finished.dedup();
        for i in finished.into_iter().rev() {
            self.running.remove(i);
        }
        Ok(())
    }

    /// Samples, streams; true when the sequence is over.
    fn emit(&mut self, i: usize, logits: &mut [f32], now: Instant) -> bool {
        let s = &mut self.running[i];
        if let Some(c) = s.constraint.as_mut() {
            if let Err(e) = c.apply(logits) {
                let _ = s.tx.send(GenEvent::Error { message: e.to_string() });
                return true;
            }
        }
        let (id, logprob) = s.sampler.sample(logits, &s.tokens);
        if self.deliver(i, id, logprob, now, Forced::No) {
            return true;
        }
        // Tokens the grammar allows no alternative to are appended without sampling; the
        // next step feeds them in one chunk, as a prompt is fed, instead of one pass each.
        let forced = self.running[i].constraint.as_mut().map(Constraint::take_forced).unwrap_or_default();
        if !forced.is_empty() {
            self.shared.metrics.forced_tokens_total.fetch_add(forced.len() as u64, Ordering::Relaxed);
        }
        let n = forced.len();
        for (k, t) in forced.into_iter().enumerate() {
            // The grammar took them all at once: only after the last may it be complete.
            if self.deliver(i, t, None, now, if k + 1 == n { Forced::Last } else { Forced::Before }) {
                return true;
            }
        }
        false
    }

    /// Appends token `id` (sampled, or `forced` by the grammar, which has then taken it
    /// already) and streams it; true when the sequence is over.
    fn deliver(&mut self, i: usize, id: u32, logprob: Option<TokenLogprob>, now: Instant, forced: Forced) -> bool {
        let tk = &self.tokenizer;
        let m = &self.shared.metrics;
        let s = &mut self.running[i];
        s.tokens.push(id);
        // The grammar has taken its last token: the output is complete.
        let mut grammar_done = false;
        if let Some(c) = s.constraint.as_mut() {
            if forced == Forced::No {
                if let Err(e) = c.accept(id) {
                    let _ = s.tx.send(GenEvent::Error { message: e.to_string() });
                    return true;
                }
            }
            grammar_done = forced != Forced::Before && c.is_finished();
        }
        m.generated_tokens_total.fetch_add(1, Ordering::Relaxed);
        if forced == Forced::No {
            // Forced tokens arrive with the token that released them, not after a wait.
            match s.last_token_at {
                None => m.time_to_first_token.observe(now.duration_since(s.received).as_secs_f64()),
                Some(t) => m.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
            }
            s.last_token_at = Some(now);
        }
        let is_end = !s.ignore_eos && tk.stop_ids.contains(&id);
        let mut finish = None;
        let mut text = String::new();
        if is_end {
            finish = Some(FinishReason::Stop);
        } else {
            let delta = match s.decoder.step(tk, &s.tokens[s.prompt_len..]) {
                Ok(d) => d,
                Err(e) => {
                    let _ = s.tx.send(GenEvent::Error { message: e.to_string() });
                    return true;
                }
            };
            if s.lazy.is_some() && !delta.is_empty() {
                grammar_done |= s.watch_trigger(tk, &delta);
            }
            let (out, stopped) = s.push_text(&delta);
            text = out;
            if stopped || grammar_done {
                finish = Some(FinishReason::Stop);
            }
        }
        // The context bounds every sequence whatever `max_new` says: one that reached it ends
        // here instead of failing the next forward pass (and the batch with it).
        if finish.is_none() && (s.generated() >= s.max_new || s.tokens.len() >= self.shared.model_config.context_length)
        {
            finish = Some(FinishReason::Length);
        }
        let _ = s.tx.send(GenEvent::Token { index: s.index, token: id, text, logprob });
        let Some(reason) = finish else { return false };
        // Release what was held back (incomplete bytes, a partial stop string).
        if reason == FinishReason::Length || is_end || grammar_done {
            let rest =
                s.decoder.flush(tk, &s.tokens[s.prompt_len..s.tokens.len() - usize::from(is_end)]).unwrap_or_default();
            let (mut out, stopped) = s.push_text(&rest);
            if !stopped {
                out.push_str(&std::mem::take(&mut s.pending));
            }
            if !out.is_empty() {
                let _ = s.tx.send(GenEvent::Text { index: s.index, text: out });
            }
        }
        s.span.in_scope(|| {
            tracing::debug!(
                index = s.index,
                prompt_tokens = s.prompt_len,
                completion_tokens = s.generated(),
                finish_reason = reason.as_str(),
                elapsed_ms = s.received.elapsed().as_millis() as u64,
                "sequence finished"
            )
        });
        let _ = s.tx.send(GenEvent::Done {
            index: s.index,
            finish_reason: reason,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated(),
        });
        true
    }
}
