//! Evaluation runs started over the API (REST and GraphQL): each runs on its own thread
//! against this server's index, RAG pipeline and engine, writes the same files as
//! `ragway eval` under `<data-dir>/evals/runs/<id>`, and is readable while it runs (status,
//! progress) and after (summary, report). A finished run started again under the same id
//! reuses its cached samples.

use crate::service::error::ServiceError;
use crate::app::AppState;
use crate::service::error::StatusCode;
use ragway_eval::backend::InProcess;
use ragway_eval::retrieval::EmptyQueries;
use ragway_eval::runner::{self, EvalKind, Progress, ProgressSnapshot, RunContext, RunSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use crate::service::now;

/// A run request (`POST /v1/evals`, GraphQL `startEvalRun`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartEval {
    /// `retrieval`, `rag` or `halueval`.
    pub kind: String,
    /// A BEIR folder or QA / SQuAD / HaluEval file, relative to the server's ingest root.
    pub dataset: String,
    /// Run id (letters, digits, `-`, `_`); default: a new one. Reusing a finished run's id
    /// resumes it from its cached samples.
    pub name: Option<String>,
    pub split: Option<String>,
    pub collection: Option<String>,
    /// `dense`, `keyword` or `hybrid` (default).
    pub mode: Option<String>,
    pub top_k: Option<usize>,
    /// Retrieval runs: the hybrid fusion, as a search takes it (default: the collection's).
    pub fusion: Option<ragway_index::fusion::FusionParams>,
    /// Retrieval runs: candidates each half hands to fusion (default: the index's).
    pub candidates: Option<usize>,
    pub template: Option<String>,
    pub judge_template: Option<String>,
    /// Judge-based RAG metrics (default true).
    pub judge: Option<bool>,
    pub limit: Option<usize>,
    pub seed: Option<u64>,
    /// `beir` (default) or `trec-c`.
    pub empty_queries: Option<String>,
    /// Samples in flight (1–16, default 2: the run shares the engine with live traffic).
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone)]
enum Status {
    Running,
    Succeeded,
    Failed(String),
}

pub struct EvalRun {
    pub id: String,
    pub spec: RunSpec,
    pub progress: Progress,
    status: Mutex<Status>,
    pub dir: PathBuf,
    pub created: u64,
}

/// The runs of this server.
pub struct EvalRuns {
    root: PathBuf,
    /// The server's ingest root, which run views never show (datasets are named relative
    /// to it, and errors and summaries have it replaced).
    ingest_root: Option<PathBuf>,
    runs: Mutex<BTreeMap<String, Arc<EvalRun>>>,
    next: AtomicU64,
}

/// A run as the API shows it (`GET /v1/evals/{id}`, GraphQL `evalRun`). Paths under the
/// server's ingest root are shown relative to it: the API never reveals server paths.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EvalRunView {
    pub id: String,
    /// `eval.run`
    pub object: String,
    pub kind: EvalKind,
    pub status: RunStatus,
    /// Unix seconds.
    pub created: u64,
    /// The dataset, relative to the ingest root.
    pub dataset: String,
    pub progress: ProgressSnapshot,
    /// Why the run failed (`status: failed`).
    pub error: Option<String>,
    /// The summary of a finished run.
    pub summary: Option<RunSummary>,
    /// The HTML report's path.
    pub report: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
}

/// `summary.json` of a finished run: each metric's mean at the top level (`ndcg@10`, `f1`,
/// `accuracy`, ...) beside the fixed fields below.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// The metric that orders samples and compares runs (`ndcg@10`, `f1`, `accuracy`).
    pub primary: String,
    /// Samples summarized.
    pub n: usize,
    /// Samples that have each metric.
    pub n_by_metric: BTreeMap<String, usize>,
    /// Seeded bootstrap 95% interval of each metric's mean.
    pub ci95: BTreeMap<String, [Option<f64>; 2]>,
    /// The judge's calls, when judge-based metrics ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeCalls>,
    pub run: RunMeta,
    /// Each metric's mean over the samples that have it.
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JudgeCalls {
    pub calls: u64,
    pub unparseable: u64,
    pub unparseable_rate: f64,
}

/// How a run was made.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunMeta {
    pub kind: EvalKind,
    /// The dataset, relative to the ingest root.
    pub dataset: String,
    /// The configuration the run's cache key is the hash of: the run request's settings, the
    /// system under test (models, collection settings) and the dataset setup.
    #[schema(value_type = BTreeMap<String, serde_json::Value>)]
    pub config: serde_json::Map<String, Value>,
    pub config_hash: String,
    pub samples: usize,
    pub evaluated: usize,
    pub cached: usize,
    pub errors: usize,
    pub started_unix: u64,
    pub duration_s: f64,
    pub ragway_version: String,
    /// Retrieval runs: how queries without relevant documents count (`beir` or `trec-c`).
    pub empty_queries: Option<String>,
}

/// `GET /v1/evals`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EvalRunList {
    /// `list`
    pub object: String,
    pub data: Vec<EvalRunView>,
}

/// `path` as the API shows it: relative to `root` when under it (as written or canonical),
/// else its file name only.
fn shown_path(path: &str, root: Option<&std::path::Path>) -> String {
    let p = std::path::Path::new(path);
    if let Some(root) = root {
        let canonical = root.canonicalize().ok();
        for r in [Some(root.to_path_buf()), canonical].into_iter().flatten() {
            if let Ok(rel) = p.strip_prefix(&r) {
                return rel.to_string_lossy().into_owned();
            }
        }
    }
    if p.is_absolute() {
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        path.to_string()
    }
}

/// `message` with every mention of `root` (as written and canonical) replaced by
/// `<ingest-root>` (errors name the files they failed on).
fn hide_root_in(message: &str, root: Option<&std::path::Path>) -> String {
    let Some(root) = root else { return message.to_string() };
    let mut text = message.to_string();
    let canonical = root.canonicalize().ok();
    for r in [canonical, Some(root.to_path_buf())].into_iter().flatten() {
        let r = r.to_string_lossy();
        if r.len() > 1 {
            text = text.replace(r.as_ref(), "<ingest-root>");
        }
    }
    text
}

/// Evaluation runs at once: each spends the engine for minutes beside live traffic.
pub const MAX_RUNNING: usize = 2;

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl EvalRuns {
    pub fn new(root: PathBuf, ingest_root: Option<PathBuf>) -> Self {
        Self { root, ingest_root, runs: Mutex::new(BTreeMap::new()), next: AtomicU64::new(0) }
    }

    fn spec(state: &AppState, req: &StartEval) -> Result<RunSpec, ServiceError> {
        let kind = EvalKind::parse(&req.kind).ok_or_else(|| ServiceError::invalid("kind", "kind must be `retrieval`, `rag` or `halueval`"))?;
        let index = state.index.get().ok_or_else(|| ServiceError::not_ready("index"))?;
        let root = index.options().ingest_root.clone().ok_or_else(|| {
            ServiceError::invalid("dataset", "server-side datasets are disabled: start the server with --ingest-root and put datasets under it")
        })?;
        let dataset = index.resolve_under(&root, &req.dataset, "dataset")?;
        if !dataset.exists() {
            return Err(ServiceError::invalid("dataset", format!("{} does not exist under the ingest root", req.dataset)));
        }
        let mut spec = RunSpec::new(kind, dataset);
        if let Some(s) = &req.split {
            if !ragway_eval::datasets::valid_split(s) {
                return Err(ServiceError::invalid("split", "split must be 1 to 64 letters, digits, `-` or `_` (it names qrels/<split>.tsv)"));
            }
            spec.split = s.clone();
        }
        spec.collection = req.collection.clone();
        if let Some(m) = &req.mode {
            spec.mode = ragway_index::SearchMode::parse(m).ok_or_else(|| ServiceError::invalid("mode", "mode must be `dense`, `keyword` or `hybrid`"))?;
        }
        if req.top_k.is_some_and(|k| k == 0 || k > 1000) {
            return Err(ServiceError::invalid("top_k", "top_k must be between 1 and 1000"));
        }
        spec.top_k = req.top_k;
        if let Some(f) = &req.fusion {
            f.validate()?;
        }
        spec.fusion = req.fusion;
        ragway_index::collection::check_candidates(req.candidates)?;
        spec.candidates = req.candidates;
        spec.template = req.template.clone();
        spec.judge_template = req.judge_template.clone();
        spec.judge = req.judge.unwrap_or(true);
        spec.limit = req.limit;
        spec.seed = req.seed.unwrap_or(0);
        if let Some(e) = &req.empty_queries {
            spec.empty_queries = EmptyQueries::parse(e).ok_or_else(|| ServiceError::invalid("empty_queries", "empty_queries must be `beir` or `trec-c`"))?;
        }
        let c = req.concurrency.unwrap_or(2);
        if !(1..=16).contains(&c) {
            return Err(ServiceError::invalid("concurrency", "concurrency must be between 1 and 16"));
        }
        spec.concurrency = c;
        Ok(spec)
    }

    /// Starts a run on its own thread; its view at once.
    pub fn start(&self, state: Arc<AppState>, req: StartEval) -> Result<EvalRunView, ServiceError> {
        let spec = Self::spec(&state, &req)?;
        if spec.kind != EvalKind::Retrieval && state.generator.get().is_none() {
            return Err(ServiceError::not_ready("generation model"));
        }
        let id = match &req.name {
            Some(n) if !valid_id(n) => return Err(ServiceError::invalid("name", "name must be 1-64 letters, digits, `-` or `_`")),
            Some(n) => n.clone(),
            None => format!("eval-{}-{}", now(), self.next.fetch_add(1, Ordering::Relaxed)),
        };
        let run = Arc::new(EvalRun {
            id: id.clone(),
            spec,
            progress: Progress::default(),
            status: Mutex::new(Status::Running),
            dir: self.root.join(&id),
            created: now(),
        });
        {
            let mut runs = self.runs.lock().expect("runs");
            let running = runs.values().filter(|r| matches!(*r.status.lock().expect("status"), Status::Running)).count();
            if running >= MAX_RUNNING {
                return Err(ServiceError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    kind: "rate_limit_error",
                    code: Some("too_many_eval_runs"),
                    retry_after: Some(60),
                    ..ServiceError::invalid("", format!("{running} evaluation runs are running (at most {MAX_RUNNING}); retry when one ends"))
                });
            }
            if runs.get(&id).is_some_and(|r| matches!(*r.status.lock().expect("status"), Status::Running)) {
                let mut e = ServiceError::invalid("name", format!("run `{id}` is still running"));
                e.status = StatusCode::CONFLICT;
                e.code = Some("run_in_progress");
                return Err(e);
            }
            runs.insert(id.clone(), run.clone());
        }
        let worker = run.clone();
        std::thread::Builder::new()
            .name(format!("eval-{id}"))
            .spawn(move || {
                let outcome = (|| -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                    let system = InProcess {
                        index: state.index.get().cloned().ok_or_else(|| anyhow::anyhow!("the index is not open"))?,
                        generator: state.generator.get().cloned(),
                        registry: state.prompts.clone(),
                        rag: state.settings.rag.clone(),
                        runtime: rt.handle().clone(),
                        judge: None,
                    };
                    runner::run(&worker.spec, RunContext { system: &system, progress: &worker.progress }, &worker.dir)?;
                    Ok(())
                })();
                let status = match outcome {
                    Ok(()) => Status::Succeeded,
                    Err(e) => {
                        tracing::warn!(run = %worker.id, "evaluation run failed: {e:#}");
                        Status::Failed(format!("{e:#}"))
                    }
                };
                *worker.status.lock().expect("status") = status;
            })
            .map_err(|e| ServiceError::internal(format!("cannot start the run: {e}")))?;
        Ok(self.view(&run))
    }

    fn view(&self, run: &EvalRun) -> EvalRunView {
        let (status, error) = match &*run.status.lock().expect("status") {
            Status::Running => (RunStatus::Running, None),
            Status::Succeeded => (RunStatus::Succeeded, None),
            Status::Failed(e) => (RunStatus::Failed, Some(e.clone())),
        };
        let root = self.ingest_root.as_deref();
        EvalRunView {
            id: run.id.clone(),
            object: "eval.run".into(),
            kind: run.spec.kind,
            status,
            created: run.created,
            dataset: shown_path(&run.spec.dataset.to_string_lossy(), root),
            progress: run.progress.view(),
            error: error.map(|e| hide_root_in(&e, root)),
            summary: if status == RunStatus::Succeeded { self.read_summary(&run.dir) } else { None },
            report: format!("/v1/evals/{}/report", run.id),
        }
    }

    /// A finished run's summary with its paths shown as the API shows them.
    fn read_summary(&self, dir: &std::path::Path) -> Option<RunSummary> {
        let mut s: RunSummary = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).ok()?).ok()?;
        let root = self.ingest_root.as_deref();
        s.run.dataset = shown_path(&s.run.dataset, root);
        if let Some(Value::String(d)) = s.run.config.get_mut("dataset") {
            *d = shown_path(d, root);
        }
        Some(s)
    }

    /// A run started since this server came up, or a finished one on disk.
    pub fn get(&self, id: &str) -> Option<EvalRunView> {
        if let Some(r) = self.runs.lock().expect("runs").get(id).cloned() {
            return Some(self.view(&r));
        }
        if !valid_id(id) {
            return None;
        }
        let summary = self.read_summary(&self.root.join(id))?;
        Some(EvalRunView {
            id: id.to_string(),
            object: "eval.run".into(),
            kind: summary.run.kind,
            status: RunStatus::Succeeded,
            created: summary.run.started_unix,
            dataset: summary.run.dataset.clone(),
            progress: ProgressSnapshot {
                phase: "done".into(),
                total: summary.run.samples,
                done: summary.run.samples,
                cached: 0,
                errors: summary.run.errors,
            },
            error: None,
            summary: Some(summary),
            report: format!("/v1/evals/{id}/report"),
        })
    }

    /// Every run: those of this server and those finished on disk, newest first.
    pub fn list(&self) -> Vec<EvalRunView> {
        let mut ids: Vec<String> = self.runs.lock().expect("runs").keys().cloned().collect();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !ids.contains(&name) && e.path().join("summary.json").exists() {
                    ids.push(name);
                }
            }
        }
        let mut out: Vec<EvalRunView> = ids.iter().filter_map(|id| self.get(id)).collect();
        out.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// The report page of a finished run.
    pub fn report(&self, id: &str) -> Option<String> {
        valid_id(id).then(|| std::fs::read_to_string(self.root.join(id).join("report.html")).ok()).flatten()
    }
}

/// The error for an unknown run id.
pub fn no_run(id: &str) -> ServiceError {
    let mut e = ServiceError::not_found(id);
    e.message = format!("no finished or running evaluation run `{id}`");
    e.param = Some("id".into());
    e.code = Some("run_not_found");
    e
}
