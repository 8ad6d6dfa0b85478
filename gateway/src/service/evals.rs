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
use ragway_eval::runner::{self, EvalKind, Progress, RunContext, RunSpec};
use serde::Deserialize;
use serde_json::{json, Value};
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

/// `v` with every mention of `root` (as written and canonical) replaced by `<ingest-root>`.
fn hide_root(v: Value, root: Option<&std::path::Path>) -> Value {
    let Some(root) = root else { return v };
    let mut text = v.to_string();
    let canonical = root.canonicalize().ok();
    for r in [Some(root.to_path_buf()), canonical].into_iter().flatten() {
        // As it appears inside a JSON string (backslashes and quotes escaped).
        let quoted = serde_json::to_string(&r.to_string_lossy()).unwrap_or_default();
        let inner = quoted.trim_matches('"');
        if inner.len() > 1 {
            text = text.replace(inner, "<ingest-root>");
        }
    }
    serde_json::from_str(&text).unwrap_or(v)
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
    pub fn start(&self, state: Arc<AppState>, req: StartEval) -> Result<Value, ServiceError> {
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

    fn view(&self, run: &EvalRun) -> Value {
        let (status, error) = match &*run.status.lock().expect("status") {
            Status::Running => ("running", None),
            Status::Succeeded => ("succeeded", None),
            Status::Failed(e) => ("failed", Some(e.clone())),
        };
        let summary = if status == "succeeded" { read_summary(&run.dir) } else { None };
        let view = json!({
            "id": run.id, "object": "eval.run", "kind": run.spec.kind, "status": status, "created": run.created,
            "dataset": run.spec.dataset, "progress": run.progress.view(), "error": error, "summary": summary,
            "report": format!("/v1/evals/{}/report", run.id),
        });
        hide_root(view, self.ingest_root.as_deref())
    }

    /// A run started since this server came up, or a finished one on disk.
    pub fn get(&self, id: &str) -> Option<Value> {
        if let Some(r) = self.runs.lock().expect("runs").get(id).cloned() {
            return Some(self.view(&r));
        }
        if !valid_id(id) {
            return None;
        }
        let summary = read_summary(&self.root.join(id))?;
        let view = json!({
            "id": id, "object": "eval.run", "kind": summary["run"]["kind"], "status": "succeeded",
            "created": summary["run"]["started_unix"], "dataset": summary["run"]["dataset"],
            "progress": {"phase": "done", "total": summary["run"]["samples"], "done": summary["run"]["samples"], "cached": 0, "errors": summary["run"]["errors"]},
            "error": null, "summary": summary, "report": format!("/v1/evals/{id}/report"),
        });
        Some(hide_root(view, self.ingest_root.as_deref()))
    }

    /// Every run: those of this server and those finished on disk, newest first.
    pub fn list(&self) -> Vec<Value> {
        let mut ids: Vec<String> = self.runs.lock().expect("runs").keys().cloned().collect();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !ids.contains(&name) && e.path().join("summary.json").exists() {
                    ids.push(name);
                }
            }
        }
        let mut out: Vec<Value> = ids.iter().filter_map(|id| self.get(id)).collect();
        out.sort_by(|a, b| b["created"].as_u64().cmp(&a["created"].as_u64()).then_with(|| a["id"].as_str().cmp(&b["id"].as_str())));
        out
    }

    /// The report page of a finished run.
    pub fn report(&self, id: &str) -> Option<String> {
        valid_id(id).then(|| std::fs::read_to_string(self.root.join(id).join("report.html")).ok()).flatten()
    }
}

fn read_summary(dir: &std::path::Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).ok()?).ok()
}

/// The error for an unknown run id.
pub fn no_run(id: &str) -> ServiceError {
    let mut e = ServiceError::not_found(id);
    e.message = format!("no finished or running evaluation run `{id}`");
    e.param = Some("id".into());
    e.code = Some("run_not_found");
    e
}
