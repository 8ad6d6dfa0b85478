//! Runs: a dataset through a system under test, one record per sample, a summary with
//! bootstrap intervals and a report.
//!
//! - Samples run on `concurrency` worker threads; progress goes to a shared [`Progress`]
//!   (and a progress bar on a terminal).
//! - Every finished sample is appended to `samples.jsonl` with the hash of the run's
//!   configuration, so an interrupted run resumes where it stopped and a changed
//!   configuration starts over. Failed samples are not cached: a rerun retries them.
//! - At the end `samples.jsonl` is rewritten in dataset order, and `summary.json` and
//!   `report.html` are written.

use crate::answer;
use crate::backend::{Answerer, Hit, RagOutput, Retriever, SearchOptions, System, TextEmbedder};
use crate::datasets::{self, Qa, QaItem};
use crate::judge::{Judge, Verdict};
use crate::retrieval::{query_contribution, EmptyQueries, CUTOFFS};
use crate::stats::{self, Rng};
use anyhow::{anyhow, bail, Context, Result};
use ragway_index::ingest::{IngestOptions, Source};
use ragway_index::jobs::JobState;
use ragway_index::{CreateCollection, IndexService, SearchMode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EvalKind {
    Retrieval,
    Rag,
    Halueval,
}

impl EvalKind {
    /// A kind by its name (`retrieval`, `rag`, `halueval`).
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }

    /// The per-sample metric that orders "worst samples" and defines a flip between runs.
    pub fn primary(self) -> &'static str {
        match self {
            Self::Retrieval => "ndcg@10",
            Self::Rag => "f1",
            Self::Halueval => "accuracy",
        }
    }

    /// A 0/1 per-sample metric: a sample flipped between two runs when it changed.
    pub fn flip_metric(self) -> &'static str {
        match self {
            Self::Retrieval => "hit@10",
            Self::Rag => "exact_match",
            Self::Halueval => "accuracy",
        }
    }
}

/// What a run evaluates and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub kind: EvalKind,
    /// BEIR folder (retrieval) or QA / SQuAD / HaluEval file (rag, halueval).
    pub dataset: PathBuf,
    /// BEIR qrels split.
    #[serde(default = "default_split")]
    pub split: String,
    /// Existing collection to search; default: the dataset's corpus, ingested on first use.
    #[serde(default)]
    pub collection: Option<String>,
    #[serde(default)]
    pub mode: SearchMode,
    /// Retrieved per query (default: 100 for retrieval, the pipeline's for rag).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Retrieval runs: the hybrid fusion (default: the collection's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<ragway_index::fusion::FusionParams>,
    /// Retrieval runs: candidates each half hands to fusion (default: the index's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
    /// RAG template reference (`rag-answer:staging`).
    #[serde(default)]
    pub template: Option<String>,
    /// Generation model (remote runs: the `model` of requests).
    #[serde(default)]
    pub model: Option<String>,
    /// Judge template reference (default `hallucination-judge`).
    #[serde(default)]
    pub judge_template: Option<String>,
    /// Judge-based RAG metrics (faithfulness; context metrics without gold documents).
    #[serde(default = "yes")]
    pub judge: bool,
    /// Only the first `limit` samples.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub empty_queries: EmptyQueries,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
}

fn default_split() -> String {
    "test".into()
}
fn yes() -> bool {
    true
}
fn default_concurrency() -> usize {
    4
}
fn default_bootstrap() -> usize {
    1000
}

impl RunSpec {
    pub fn new(kind: EvalKind, dataset: PathBuf) -> Self {
        serde_json::from_value(json!({"kind": kind, "dataset": dataset})).expect("defaults")
    }
}

/// Live state of a run (read by the progress bar and the API).
#[derive(Default)]
pub struct Progress {
    pub phase: Mutex<String>,
    pub total: AtomicUsize,
    pub done: AtomicUsize,
    pub cached: AtomicUsize,
    pub errors: AtomicUsize,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    /// Where stderr is not a terminal (a CI log, `docker logs`): when the last progress line
    /// was written there instead of a bar.
    lines: Mutex<Option<std::time::Instant>>,
}

/// How often a progress line is written where stderr is not a terminal.
const LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Progress {
    /// With a progress bar on stderr, or a line every 10 s (and at each phase) where stderr
    /// is not a terminal.
    pub fn with_bar() -> Self {
        let p = Self::default();
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            *p.lines.lock().expect("lines") = Some(std::time::Instant::now());
            return p;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg} (eta {eta})")
                .expect("progress template"),
        );
        *p.bar.lock().expect("bar") = Some(bar);
        p
    }

    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock().expect("phase") = phase.to_string();
        if let Some(b) = &*self.bar.lock().expect("bar") {
            b.set_message(phase.to_string());
        }
        self.line(true);
    }

    /// A progress line where stderr is not a terminal: always when `now`, else at most one
    /// per [`LINE_EVERY`].
    fn line(&self, now: bool) {
        let mut last = self.lines.lock().expect("lines");
        let Some(at) = last.as_mut() else { return };
        if !now && at.elapsed() < LINE_EVERY {
            return;
        }
        *at = std::time::Instant::now();
        let v = self.view();
        if v.total > 0 {
            eprintln!("{}: {}/{} ({:.0}%)", v.phase, v.done, v.total, 100.0 * v.done as f64 / v.total as f64);
        } else {
            eprintln!("{}", v.phase);
        }
    }

    fn set_total(&self, total: usize, done: usize) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
        if let Some(b) = &*self.bar.lock().expect("bar") {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
        self.line(false);
    }

    fn tick(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(b) = &*self.bar.lock().expect("bar") {
            b.set_position(d as u64);
        }
        self.line(false);
    }

    fn finish(&self) {
        if let Some(b) = &*self.bar.lock().expect("bar") {
            b.finish_and_clear();
        }
    }

    pub fn view(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: self.phase.lock().expect("phase").clone(),
            total: self.total.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A run's progress at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressSnapshot {
    /// `loading the dataset`, `indexing`, `evaluating`, `summarizing`, `done`, ...
    pub phase: String,
    pub total: usize,
    pub done: usize,
    /// Samples taken from an earlier run's cache.
    pub cached: usize,
    pub errors: usize,
}

fn sha256_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    std::io::copy(&mut f, h)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A collection holding `corpus`: named after the corpus's content, ingested on first use
/// and reused afterwards (a marker records a finished ingestion; an interrupted one is
/// completed, the pipeline skipping documents already written).
pub fn ensure_collection(index: &IndexService, corpus: &Path, progress: &Progress) -> Result<String> {
    let mut h = Sha256::new();
    sha256_file(&mut h, corpus)?;
    if let Some(m) = index.default_embedder() {
        h.update(m.model_id().as_bytes());
    }
    let name = format!("eval-{}", &hex(&h.finalize())[..16]);
    let marker = index.data_dir().join("evals").join("corpora").join(format!("{name}.done"));
    let collection = match index.get(&name) {
        Ok(c) if marker.exists() => {
            tracing::info!(collection = %name, "reusing the collection of this corpus");
            return Ok(c.name().to_string());
        }
        Ok(c) => c,
        Err(ragway_index::IndexError::CollectionNotFound(_)) => index.create(CreateCollection { name: name.clone(), ..Default::default() })?,
        Err(e) => return Err(e.into()),
    };
    progress.set_phase(&format!("ingesting {} into {name}", corpus.display()));
    let job = index.jobs().submit(collection, Source::from_path(corpus), IngestOptions::default(), None)?;
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        let v = job.view();
        progress.set_total(1000, (v.progress.fraction * 1000.0) as usize);
        std::thread::sleep(Duration::from_millis(200));
    }
    let view = job.view();
    if view.state == JobState::Failed {
        bail!("ingesting {} failed: {}", corpus.display(), view.error.unwrap_or_default());
    }
    if !view.errors.is_empty() {
        tracing::warn!(bad = view.errors.len(), "corpus records skipped: {:?}", view.errors.iter().take(5).map(|e| &e.message).collect::<Vec<_>>());
    }
    index.flush()?;
    std::fs::create_dir_all(marker.parent().expect("parent"))?;
    std::fs::write(&marker, serde_json::to_vec(&job.view())?)?;
    Ok(name)
}

/// One sample: its id and inputs; the work produces outputs and metrics.
struct Sample {
    id: String,
    inputs: Value,
}

/// What a run needs besides the spec.
pub struct RunContext<'a> {
    pub system: &'a dyn System,
    pub progress: &'a Progress,
}

/// Runs `spec` into `out` and returns the summary.
pub fn run(spec: &RunSpec, ctx: RunContext<'_>, out: &Path) -> Result<Value> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    ctx.progress.set_phase("loading the dataset");
    let mut h = Sha256::new();
    let (samples, work, extra): Work = match spec.kind {
        EvalKind::Retrieval => retrieval_work(spec, &ctx, &mut h)?,
        EvalKind::Rag => rag_work(spec, &ctx, &mut h, out)?,
        EvalKind::Halueval => halueval_work(spec, &ctx, &mut h)?,
    };
    // The configuration that determines a sample's result (not how many run, nor how fast).
    let mut config = serde_json::to_value(spec)?;
    for k in ["limit", "concurrency", "bootstrap"] {
        config.as_object_mut().expect("object").remove(k);
    }
    config["system"] = ctx.system.describe();
    config["setup"] = extra.clone();
    h.update(ragway_index::collection::canonical_json(&config).as_bytes());
    let config_hash = hex(&h.finalize())[..16].to_string();

    let records = execute(out, &config_hash, &samples, spec.concurrency.max(1), ctx.progress, work.as_ref())?;
    ctx.progress.set_phase("summarizing");
    let errors = ctx.progress.errors.load(Ordering::Relaxed);
    let mut summary = summarize(spec.kind, &records, spec.bootstrap, spec.seed);
    let run_meta = json!({
        "kind": spec.kind,
        "dataset": spec.dataset,
        "config": config,
        "config_hash": config_hash,
        "samples": samples.len(),
        "evaluated": records.len(),
        "cached": ctx.progress.cached.load(Ordering::Relaxed),
        "errors": errors,
        "started_unix": started_unix,
        "duration_s": started.elapsed().as_secs_f64(),
        "ragway_version": env!("CARGO_PKG_VERSION"),
        "empty_queries": if spec.kind == EvalKind::Retrieval { json!(spec.empty_queries.describe()) } else { Value::Null },
    });
    summary["run"] = run_meta;
    let tmp = out.join("summary.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&summary)?)?;
    std::fs::rename(&tmp, out.join("summary.json"))?;
    std::fs::write(out.join("report.html"), crate::report::run_report(&summary, &records))?;
    ctx.progress.set_phase("done");
    ctx.progress.finish();
    if records.is_empty() && errors > 0 {
        bail!("every sample failed ({errors}); see the log");
    }
    Ok(summary)
}

/// Runs the samples not already cached for this configuration, appending each record.
fn execute(out: &Path, config_hash: &str, samples: &[Sample], concurrency: usize, progress: &Progress, work: &SampleFn) -> Result<Vec<Value>> {
    let path = out.join("samples.jsonl");
    let mut cached: HashMap<String, Value> = HashMap::new();
    let mut stale = false;
    if let Ok(f) = std::fs::File::open(&path) {
        for line in std::io::BufReader::new(f).lines() {
            // A line cut short by a crash is simply not a cached result.
            match serde_json::from_str::<Value>(&line?) {
                Ok(v) if v["config"] == config_hash => {
                    if let Some(id) = v["id"].as_str() {
                        cached.insert(id.to_string(), v);
                    }
                }
                _ => stale = true,
            }
        }
    }
    let wanted: HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    cached.retain(|id, _| wanted.contains(id.as_str()));
    if stale {
        // Another configuration's results (or a torn line): keep only this one's.
        let mut f = std::fs::File::create(&path)?;
        for v in cached.values() {
            writeln!(f, "{v}")?;
        }
        f.sync_all()?;
    }
    let pending: Vec<usize> = (0..samples.len()).filter(|&i| !cached.contains_key(&samples[i].id)).collect();
    progress.cached.store(cached.len(), Ordering::Relaxed);
    progress.set_total(samples.len(), cached.len());
    progress.set_phase(if cached.is_empty() { "running".into() } else { format!("resuming ({} cached)", cached.len()) }.as_str());
    let file = Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(&path)?);
    let next = AtomicUsize::new(0);
    let fresh: Mutex<Vec<Value>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency.min(pending.len().max(1)) {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = pending.get(n) else { break };
                let s = &samples[i];
                let t0 = Instant::now();
                match work(i) {
                    Ok(mut rec) => {
                        rec["id"] = json!(s.id);
                        rec["config"] = json!(config_hash);
                        rec["inputs"] = s.inputs.clone();
                        rec["latency_ms"] = json!(t0.elapsed().as_secs_f64() * 1000.0);
                        if let Ok(mut f) = file.lock() {
                            if let Err(e) = writeln!(f, "{rec}").and_then(|_| f.flush()) {
                                tracing::error!("cannot append to {}: {e}", path.display());
                            }
                        }
                        fresh.lock().expect("records").push(rec);
                    }
                    Err(e) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(sample = %s.id, "sample failed: {e:#}");
                    }
                }
                progress.tick();
            });
        }
    });
    file.lock().expect("file").sync_all()?;
    let mut by_id: HashMap<String, Value> = cached;
    for r in fresh.into_inner().expect("records") {
        by_id.insert(r["id"].as_str().unwrap_or_default().to_string(), r);
    }
    let ordered: Vec<Value> = samples.iter().filter_map(|s| by_id.remove(&s.id)).collect();
    // Rewritten in dataset order, atomically.
    let tmp = out.join("samples.jsonl.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for r in &ordered {
            writeln!(f, "{r}")?;
        }
        f.into_inner().map_err(|e| anyhow!("{e}"))?.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(ordered)
}

/// Mean of every per-sample metric over the samples that have it, with its bootstrap 95%
/// interval and count; judge call counts summed.
pub fn summarize(kind: EvalKind, records: &[Value], resamples: usize, seed: u64) -> Value {
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let (mut calls, mut unparseable) = (0u64, 0u64);
    for r in records {
        if let Some(m) = r["metrics"].as_object() {
            for (k, v) in m {
                if let Some(x) = v.as_f64() {
                    values.entry(k.clone()).or_default().push(x);
                }
            }
        }
        calls += r["judge"]["calls"].as_u64().unwrap_or(0);
        unparseable += r["judge"]["unparseable"].as_u64().unwrap_or(0);
    }
    let mut s = Map::new();
    let mut ci = Map::new();
    let mut n = Map::new();
    for (i, (k, xs)) in values.iter().enumerate() {
        s.insert(k.clone(), json!(stats::mean(xs)));
        let (lo, hi) = stats::bootstrap_ci(xs, resamples, seed.wrapping_add(i as u64));
        ci.insert(k.clone(), json!([lo, hi]));
        n.insert(k.clone(), json!(xs.len()));
    }
    s.insert("ci95".into(), Value::Object(ci));
    s.insert("n".into(), json!(records.len()));
    s.insert("n_by_metric".into(), Value::Object(n));
    s.insert("primary".into(), json!(kind.primary()));
    if calls > 0 {
        s.insert("judge".into(), json!({"calls": calls, "unparseable": unparseable, "unparseable_rate": unparseable as f64 / calls as f64}));
    }
    Value::Object(s)
}

// ---------------------------------------------------------------- retrieval

/// The samples, the work on sample `i`, and the setup that joins the configuration hash.
type Work = (Vec<Sample>, Box<SampleFn>, Value);
type SampleFn = dyn Fn(usize) -> Result<Value> + Sync;

fn limit<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(l) = limit {
        v.truncate(l);
    }
    v
}

fn retrieval_work(spec: &RunSpec, ctx: &RunContext<'_>, h: &mut Sha256) -> Result<Work> {
    // Before the corpus is loaded and perhaps ingested (minutes), not at the first search.
    if let Some(f) = &spec.fusion {
        f.validate()?;
    }
    ragway_index::collection::check_candidates(spec.candidates)?;
    let ds = datasets::load_beir(&spec.dataset, &spec.split)?;
    for f in ["queries.jsonl", "corpus.jsonl"] {
        sha256_file(h, &spec.dataset.join(f))?;
    }
    sha256_file(h, &spec.dataset.join("qrels").join(format!("{}.tsv", spec.split)))?;
    let collection = match &spec.collection {
        Some(c) => c.clone(),
        None => ctx.system.collection_for(&ds.corpus, ctx.progress)?,
    };
    let options = SearchOptions { mode: spec.mode, fusion: spec.fusion, candidates: spec.candidates };
    let retriever: Arc<dyn Retriever> = ctx.system.retriever(&collection, options)?;
    let top_k = spec.top_k.unwrap_or(100);
    let queries = limit(ds.queries, spec.limit);
    let samples = queries.iter().map(|q| Sample { id: q.id.clone(), inputs: json!({"query": q.text, "relevant": ds.qrels[&q.id]}) }).collect();
    let qrels = ds.qrels;
    let empty = spec.empty_queries;
    let work = move |i: usize| -> Result<Value> {
        let q = &queries[i];
        let hits: Vec<Hit> = retriever.search(&q.text, top_k)?;
        let run: Vec<(String, f64)> = hits.iter().map(|h| (h.doc_id.clone(), h.score)).collect();
        let metrics = query_contribution(&qrels[&q.id], Some(&run), &CUTOFFS, empty);
        Ok(json!({
            "retrieved": hits.iter().map(|h| json!({"doc_id": h.doc_id, "score": h.score})).collect::<Vec<_>>(),
            "outputs": {"top_score": hits.first().map(|h| h.score)},
            "metrics": metrics.unwrap_or_default(),
            "excluded": metrics_excluded(&run, empty),
        }))
    };
    // The candidates in effect, so that a change of the default is a new configuration.
    let candidates = spec.candidates.unwrap_or_else(|| ragway_index::collection::default_candidates(spec.mode, top_k));
    Ok((samples, Box::new(work), json!({"collection": collection, "top_k": top_k, "candidates": candidates})))
}

fn metrics_excluded(run: &[(String, f64)], empty: EmptyQueries) -> bool {
    run.is_empty() && empty == EmptyQueries::Beir
}

// ---------------------------------------------------------------- rag

/// A statement without the citation markers the pipeline recognizes, whitespace collapsed.
fn without_markers(s: &str) -> String {
    ragway_prompts::rag::remove_citation_markers(s).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// RAGAS context precision over relevance flags in rank order: the mean of precision@k at
/// the relevant ranks (0 when none is relevant).
pub fn context_precision(relevant: &[bool]) -> f64 {
    let (mut hits, mut sum) = (0usize, 0.0);
    for (i, r) in relevant.iter().enumerate() {
        if *r {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    if hits == 0 {
        0.0
    } else {
        sum / hits as f64
    }
}

struct JudgeCount {
    calls: usize,
    unparseable: usize,
}

impl JudgeCount {
    fn ask(&mut self, judge: &Judge, knowledge: &str, question: &str, answer: &str) -> Result<Verdict> {
        self.calls += 1;
        let v = judge.hallucinated(knowledge, question, answer)?.verdict;
        if v == Verdict::Unparseable {
            self.unparseable += 1;
        }
        Ok(v)
    }
}

fn rag_work(spec: &RunSpec, ctx: &RunContext<'_>, h: &mut Sha256, out: &Path) -> Result<Work> {
    let qa: Qa = datasets::load_qa(&spec.dataset)?;
    sha256_file(h, &spec.dataset)?;
    let collection = match &spec.collection {
        Some(c) => c.clone(),
        None => {
            if qa.corpus.is_empty() {
                bail!("{} has no contexts to build a corpus from: name a --collection", spec.dataset.display());
            }
            let corpus = out.join("corpus.jsonl");
            qa.write_corpus(&corpus)?;
            ctx.system.collection_for(&corpus, ctx.progress)?
        }
    };
    let top_k = spec.top_k.unwrap_or(5);
    let answerer: Arc<dyn Answerer> = ctx.system.answerer(&collection, spec.mode, top_k, spec.template.clone(), spec.model.clone())?;
    let judge = if spec.judge { Some(Judge::new(ctx.system.chat()?, ctx.system.registry(), spec.judge_template.clone())) } else { None };
    let embedder: Arc<dyn TextEmbedder> = ctx.system.embedder()?;
    let unanswerable = qa.has_unanswerable;
    let items: Vec<QaItem> = limit(qa.items, spec.limit);
    let samples = items
        .iter()
        .map(|q| Sample { id: q.id.clone(), inputs: json!({"question": q.question, "answers": q.answers, "doc_ids": q.doc_ids}) })
        .collect();
    let candidates = ragway_index::collection::default_candidates(spec.mode, top_k);
    let setup = json!({"collection": collection, "top_k": top_k, "candidates": candidates, "answerer": answerer.describe(), "judge": judge.as_ref().map(Judge::describe), "format": qa.format});
    let work = move |i: usize| -> Result<Value> {
        let item = &items[i];
        let out: RagOutput = answerer.answer(&item.question)?;
        let abstained = out.dont_know || out.abstained;
        let prediction = if unanswerable && abstained { String::new() } else { without_markers(&out.answer) };
        let (em, f1) = answer::score(&prediction, &item.answers);
        let mut m = Map::new();
        m.insert("exact_match".into(), json!(em));
        m.insert("f1".into(), json!(f1));
        if unanswerable {
            let prefix = if item.answers.is_empty() { "no_ans" } else { "has_ans" };
            m.insert(format!("{prefix}_exact_match"), json!(em));
            m.insert(format!("{prefix}_f1"), json!(f1));
        }
        m.insert("dont_know".into(), json!(f64::from(u8::from(abstained))));
        if let Some(g) = out.grounding_score {
            m.insert("grounding".into(), json!(g));
        }
        if let Some(f) = out.flagged {
            m.insert("flagged".into(), json!(f64::from(u8::from(f))));
        }
        let mut judged = JudgeCount { calls: 0, unparseable: 0 };
        let knowledge: String = out.contexts.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join("\n\n");
        // Context precision / recall: by gold documents when the dataset names them.
        let mut seen = HashSet::new();
        let ranked: Vec<&str> = out.contexts.iter().map(|c| c.doc_id.as_str()).filter(|d| seen.insert(*d)).collect();
        if !item.doc_ids.is_empty() {
            let gold: HashSet<&str> = item.doc_ids.iter().map(String::as_str).collect();
            let flags: Vec<bool> = ranked.iter().map(|d| gold.contains(d)).collect();
            m.insert("context_precision".into(), json!(context_precision(&flags)));
            m.insert("context_recall".into(), json!(gold.iter().filter(|g| ranked.contains(g)).count() as f64 / gold.len() as f64));
        } else if let (Some(j), Some(gold)) = (&judge, item.answers.first()) {
            // Judge-based: is the gold answer supported by each passage / by them all?
            let mut flags = Vec::new();
            let mut parsed = true;
            for c in &out.contexts {
                match judged.ask(j, &c.text, &item.question, gold)? {
                    Verdict::Unparseable => parsed = false,
                    v => flags.push(v == Verdict::No),
                }
            }
            if parsed && !out.contexts.is_empty() {
                m.insert("context_precision".into(), json!(context_precision(&flags)));
            }
            match judged.ask(j, &knowledge, &item.question, gold)? {
                Verdict::Unparseable => {}
                v => {
                    m.insert("context_recall".into(), json!(f64::from(u8::from(v == Verdict::No))));
                }
            }
        }
        // Faithfulness: the share of the answer's statements the judge finds supported.
        let mut statements_out = Vec::new();
        if let (Some(j), false) = (&judge, abstained) {
            let (mut supported, mut parsed) = (0usize, 0usize);
            for s in ragway_prompts::rag::sentences(&out.answer).iter().map(|s| without_markers(s)).filter(|s| !s.is_empty()) {
                let v = judged.ask(j, &knowledge, &item.question, &s)?;
                if v != Verdict::Unparseable {
                    parsed += 1;
                    supported += usize::from(v == Verdict::No);
                }
                statements_out.push(json!({"statement": s, "verdict": v}));
            }
            if parsed > 0 {
                m.insert("faithfulness".into(), json!(supported as f64 / parsed as f64));
            }
        }
        // Answer relevancy: question–answer embedding cosine (0 for a non-answer).
        let relevancy = if abstained || out.answer.trim().is_empty() {
            0.0
        } else {
            let v = embedder.embed(&[item.question.clone(), without_markers(&out.answer)])?;
            (ragway_prompts::registry::cosine(&v[0], &v[1]) as f64).max(0.0)
        };
        m.insert("answer_relevancy".into(), json!(relevancy));
        Ok(json!({
            "outputs": {"answer": out.answer, "prediction": prediction, "contexts": out.contexts, "template": out.template,
                        "statements": statements_out, "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens},
            "retrieved": ranked.iter().map(|d| json!({"doc_id": d})).collect::<Vec<_>>(),
            "metrics": m,
            "judge": {"calls": judged.calls, "unparseable": judged.unparseable},
        }))
    };
    Ok((samples, Box::new(work), setup))
}

// ---------------------------------------------------------------- halueval

fn halueval_work(spec: &RunSpec, ctx: &RunContext<'_>, h: &mut Sha256) -> Result<Work> {
    let qa = datasets::load_qa(&spec.dataset)?;
    if qa.format != datasets::QaFormat::HaluEval {
        bail!("{} is not HaluEval QA (lines with knowledge, question, right_answer, hallucinated_answer)", spec.dataset.display());
    }
    sha256_file(h, &spec.dataset)?;
    let judge = Judge::new(ctx.system.chat()?, ctx.system.registry(), spec.judge_template.clone());
    let items: Vec<QaItem> = limit(qa.items, spec.limit);
    let seed = spec.seed;
    // The HaluEval protocol: each item shows the right or the hallucinated answer, drawn
    // at random (seeded per item, so a subset draws the same as the whole).
    // Per item: whether the hallucinated answer is shown, and the answer shown.
    let shown: Vec<(bool, String)> = items
        .iter()
        .map(|q| {
            let hallucinated = Rng::new(seed ^ ragway_prompts::registry::key_of(&q.id)).next_u64() & 1 == 1;
            let answer = if hallucinated { q.hallucinated_answer.clone() } else { q.answers.first().cloned() };
            (hallucinated, answer.unwrap_or_default())
        })
        .collect();
    let samples = items
        .iter()
        .zip(&shown)
        .map(|(q, (hallucinated, answer))| Sample {
            id: q.id.clone(),
            inputs: json!({"question": q.question, "answer": answer, "shown": if *hallucinated { "hallucinated" } else { "right" }}),
        })
        .collect();
    let setup = json!({"judge": judge.describe()});
    let work = move |i: usize| -> Result<Value> {
        let item = &items[i];
        let (hallucinated, answer) = (shown[i].0, &shown[i].1);
        let j = judge.hallucinated(item.knowledge.as_deref().unwrap_or_default(), &item.question, answer)?;
        let mut m = Map::new();
        let b = |x: bool| json!(f64::from(u8::from(x)));
        m.insert("unparseable".into(), b(j.verdict == Verdict::Unparseable));
        if j.verdict != Verdict::Unparseable {
            let says = j.verdict == Verdict::Yes;
            m.insert("accuracy".into(), b(says == hallucinated));
            m.insert("yes_rate".into(), b(says));
            if says {
                m.insert("precision_hallucinated".into(), b(hallucinated));
            }
            if hallucinated {
                m.insert("recall_hallucinated".into(), b(says));
            }
        }
        // HaluEval's own script counts a failed verdict as wrong.
        m.insert("accuracy_all".into(), b(j.verdict != Verdict::Unparseable && (j.verdict == Verdict::Yes) == hallucinated));
        Ok(json!({
            "outputs": {"verdict": j.verdict, "raw": j.raw, "truth": if hallucinated { "yes" } else { "no" }},
            "metrics": m,
            "judge": {"calls": 1, "unparseable": usize::from(j.verdict == Verdict::Unparseable)},
        }))
    };
    Ok((samples, Box::new(work), setup))
}

// ---------------------------------------------------------------- gates

/// `ndcg@10=0.70,faithfulness=0.8` → pairs.
pub fn parse_thresholds(s: &str) -> Result<Vec<(String, f64)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').ok_or_else(|| anyhow!("`{p}`: expected metric=value"))?;
            let v: f64 = v.trim().parse().map_err(|_| anyhow!("`{p}`: `{v}` is not a number"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// The thresholds a summary misses, as messages; an unknown metric is an error.
pub fn check_thresholds(summary: &Value, thresholds: &[(String, f64)]) -> Result<Vec<String>> {
    let mut missed = Vec::new();
    for (k, min) in thresholds {
        let v = summary.get(k).and_then(Value::as_f64).ok_or_else(|| {
            let known: Vec<&String> = summary.as_object().map(|o| o.keys().filter(|k| summary[*k].is_number()).collect()).unwrap_or_default();
            anyhow!("--fail-under names `{k}`, which this run does not report (it has: {})", known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        })?;
        if v < *min {
            missed.push(format!("{k} = {v:.4} < {min}"));
        }
    }
    Ok(missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_precision_by_hand() {
        assert_eq!(context_precision(&[true, false, true]), (1.0 + 2.0 / 3.0) / 2.0);
        assert_eq!(context_precision(&[false, true]), 0.5);
        assert_eq!(context_precision(&[false, false]), 0.0);
        assert_eq!(context_precision(&[]), 0.0);
    }

    #[test]
    fn markers_are_stripped() {
        assert_eq!(without_markers("Delhi [1]. In 1934 [2, 3]."), "Delhi . In 1934 .");
        assert_eq!(without_markers("a [b] c [] d"), "a [b] c [] d");
    }

    #[test]
    fn thresholds() {
        let s = json!({"ndcg@10": 0.69, "f1": 0.9, "ci95": {}});
        let t = parse_thresholds("ndcg@10=0.70, f1=0.8").unwrap();
        assert_eq!(check_thresholds(&s, &t).unwrap(), vec!["ndcg@10 = 0.6900 < 0.7"]);
        assert!(check_thresholds(&s, &parse_thresholds("mrr@10=0.1").unwrap()).unwrap_err().to_string().contains("ndcg@10"));
        assert!(parse_thresholds("ndcg@10").is_err());
        assert!(parse_thresholds("ndcg@10=x").is_err());
    }

    #[test]
    fn summaries_average_what_each_sample_has() {
        let recs = vec![
            json!({"metrics": {"accuracy": 1.0, "unparseable": 0.0}, "judge": {"calls": 1, "unparseable": 0}}),
            json!({"metrics": {"unparseable": 1.0}, "judge": {"calls": 1, "unparseable": 1}}),
            json!({"metrics": {"accuracy": 0.0, "unparseable": 0.0}, "judge": {"calls": 1, "unparseable": 0}}),
        ];
        let s = summarize(EvalKind::Halueval, &recs, 200, 1);
        assert_eq!(s["accuracy"], 0.5);
        assert_eq!(s["n_by_metric"]["accuracy"], 2);
        assert_eq!(s["n"], 3);
        assert!((s["unparseable"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s["judge"]["unparseable"], 1);
    }
}
