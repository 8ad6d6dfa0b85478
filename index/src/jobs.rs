//! Ingestion jobs: ids, state, progress (documents, chunks, rate, ETA), bad records and a
//! final report. Jobs run one at a time, in submission order, on a runner thread.

use crate::error::IndexError;
use crate::collection::Collection;
use crate::ingest::{run_ingest, IngestOptions, Source};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Bad records kept in a job's report (all of them are counted).
pub const MAX_REPORTED_ERRORS: usize = 1000;
/// Ingestion jobs queued or running at once; more are refused (429) until some finish.
pub const MAX_PENDING_JOBS: usize = 16;
/// Finished jobs kept for reading back.
pub const MAX_KEPT_JOBS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
}

/// A record that could not be ingested, and where it was.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordError {
    /// 1-based line of a JSONL input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// File of a directory input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub message: String,
}

/// Counters the pipeline updates as it goes.
#[derive(Debug, Default)]
pub struct Progress {
    pub documents_read: AtomicU64,
    pub documents_written: AtomicU64,
    pub documents_unchanged: AtomicU64,
    pub documents_failed: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Seconds spent waiting for the embedding model (for the overhead figure).
    pub embed_micros: AtomicU64,
    /// Writes retried because the store was unavailable.
    pub write_retries: AtomicU64,
    /// Whether the collection's dense index is being built after a bulk load.
    pub indexing: AtomicBool,
}

pub struct Job {
    pub id: String,
    pub collection: String,
    pub source: String,
    pub progress: Arc<Progress>,
    state: Mutex<(JobState, Option<String>)>,
    errors: Mutex<Vec<RecordError>>,
    created_at: u64,
    started: OnceLock<Instant>,
    finished: OnceLock<f64>,
    pub cancel: AtomicBool,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressView {
    pub documents_read: u64,
    pub documents_written: u64,
    pub documents_unchanged: u64,
    pub documents_failed: u64,
    pub chunks_written: u64,
    pub bytes_read: u64,
    pub bytes_total: u64,
    /// Share of the input read, 0 to 1.
    pub fraction: f64,
    pub documents_per_second: f64,
    pub chunks_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: Option<f64>,
    pub embed_seconds: f64,
    /// Writes retried because the store was unavailable (a database restarting).
    pub write_retries: u64,
    /// True while the collection's dense index is built after the job loaded an empty
    /// collection in bulk (PostgreSQL collections); the documents are written by then.
    pub indexing: bool,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobView {
    pub id: String,
    pub object: &'static str,
    pub collection: String,
    pub source: String,
    pub state: JobState,
    pub created_at: u64,
    pub progress: ProgressView,
    /// Bad records (the first [`MAX_REPORTED_ERRORS`]); `progress.documents_failed` counts all.
    pub errors: Vec<RecordError>,
    /// Why the job failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Job {
    pub fn state(&self) -> JobState {
        self.state.lock().expect("job state").0
    }

    pub(crate) fn set_state(&self, state: JobState, error: Option<String>) {
        if state == JobState::Running {
            let _ = self.started.set(Instant::now());
        }
        if matches!(state, JobState::Done | JobState::Failed) {
            let _ = self.finished.set(self.started.get().map_or(0.0, |s| s.elapsed().as_secs_f64()));
        }
        *self.state.lock().expect("job state") = (state, error);
    }

    pub(crate) fn record_error(&self, e: RecordError) {
        self.progress.documents_failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().expect("job errors");
        if errors.len() < MAX_REPORTED_ERRORS {
            errors.push(e);
        }
    }

    pub fn view(&self) -> JobView {
        let (state, error) = self.state.lock().expect("job state").clone();
        let p = &self.progress;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let elapsed = self.finished.get().copied().unwrap_or_else(|| self.started.get().map_or(0.0, |s| s.elapsed().as_secs_f64()));
        let (read, total) = (get(&p.bytes_read), get(&p.bytes_total));
        let done_docs = get(&p.documents_written) + get(&p.documents_unchanged) + get(&p.documents_failed);
        // Bytes read run ahead of documents written by the pipeline's buffers: scale the
        // share of input read by the share of read documents that are done.
        let fraction = if state == JobState::Done {
            1.0
        } else if total > 0 {
            let docs_read = get(&p.documents_read).max(1) as f64;
            ((read as f64 / total as f64) * (done_docs as f64 / docs_read).min(1.0)).min(1.0)
        } else {
            0.0
        };
        let rate = |n: u64| if elapsed > 0.0 { n as f64 / elapsed } else { 0.0 };
        let eta = (state == JobState::Running && fraction > 0.0).then(|| elapsed * (1.0 - fraction) / fraction);
        JobView {
            id: self.id.clone(),
            object: "ingest_job",
            collection: self.collection.clone(),
            source: self.source.clone(),
            state,
            created_at: self.created_at,
            progress: ProgressView {
                documents_read: get(&p.documents_read),
                documents_written: get(&p.documents_written),
                documents_unchanged: get(&p.documents_unchanged),
                documents_failed: get(&p.documents_failed),
                chunks_written: get(&p.chunks_written),
                bytes_read: read,
                bytes_total: total,
                fraction,
                documents_per_second: rate(done_docs),
                chunks_per_second: rate(get(&p.chunks_written)),
                elapsed_seconds: elapsed,
                eta_seconds: eta,
                embed_seconds: get(&p.embed_micros) as f64 / 1e6,
                write_retries: get(&p.write_retries),
                indexing: p.indexing.load(Ordering::Relaxed),
            },
            errors: self.errors.lock().expect("job errors").clone(),
            error,
        }
    }
}

struct Queued {
    job: Arc<Job>,
    collection: Arc<Collection>,
    source: Source,
    options: IngestOptions,
    /// A temporary upload to delete when the job ends.
    cleanup: Option<PathBuf>,
}

/// The jobs of a service.
#[derive(Default)]
pub struct JobRegistry {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    next: AtomicU64,
    runner: OnceLock<Mutex<mpsc::Sender<Queued>>>,
}

impl JobRegistry {
    /// Queues an ingestion of `source` into `collection`. [`IndexError::Busy`] when
    /// [`MAX_PENDING_JOBS`] are already queued or running (the upload, if any, is removed).
    pub fn submit(
        &self,
        collection: Arc<Collection>,
        source: Source,
        options: IngestOptions,
        cleanup: Option<PathBuf>,
    ) -> Result<Arc<Job>, IndexError> {
        {
            let mut jobs = self.jobs.lock().expect("jobs");
            let pending = jobs.values().filter(|j| matches!(j.state(), JobState::Queued | JobState::Running)).count();
            if pending >= MAX_PENDING_JOBS {
                drop(jobs);
                if let Some(p) = cleanup {
                    let _ = std::fs::remove_file(p);
                }
                return Err(IndexError::Busy);
            }
            // Finished jobs are kept for reading back, the newest MAX_KEPT_JOBS of them.
            let mut finished: Vec<(u64, String)> = jobs
                .values()
                .filter(|j| matches!(j.state(), JobState::Done | JobState::Failed))
                .map(|j| (j.created_at, j.id.clone()))
                .collect();
            if finished.len() >= MAX_KEPT_JOBS {
                finished.sort();
                for (_, id) in finished.iter().take(finished.len() + 1 - MAX_KEPT_JOBS) {
                    jobs.remove(id);
                }
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let created_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let job = Arc::new(Job {
            id: format!("job-{created_at:x}-{n}"),
            collection: collection.name().to_string(),
            source: source.describe(),
            progress: Arc::new(Progress::default()),
            state: Mutex::new((JobState::Queued, None)),
            errors: Mutex::new(Vec::new()),
            created_at,
            started: OnceLock::new(),
            finished: OnceLock::new(),
            cancel: AtomicBool::new(false),
        });
        self.jobs.lock().expect("jobs").insert(job.id.clone(), job.clone());
        let runner = self.runner.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Queued>();
            std::thread::Builder::new()
                .name("ingest-jobs".into())
                .spawn(move || {
                    for q in rx {
                        run_job(q);
                    }
                })
                .expect("spawn the ingestion runner");
            Mutex::new(tx)
        });
        let queued = Queued { job: job.clone(), collection, source, options, cleanup };
        if let Err(mpsc::SendError(q)) = runner.lock().expect("runner").send(queued) {
            q.job.set_state(JobState::Failed, Some("the ingestion runner stopped".into()));
        }
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs").get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut all: Vec<_> = self.jobs.lock().expect("jobs").values().cloned().collect();
        all.sort_by_key(|j| (j.created_at, j.id.clone()));
        all
    }
}

fn run_job(q: Queued) {
    q.job.set_state(JobState::Running, None);
    let result = run_ingest(&q.collection, q.source, &q.options, &q.job);
    match result {
        Ok(()) => q.job.set_state(JobState::Done, None),
        Err(e) => {
            tracing::warn!(job = %q.job.id, error = %e, "ingestion job failed");
            q.job.set_state(JobState::Failed, Some(e.to_string()));
        }
    }
    if let Some(path) = q.cleanup {
        let _ = std::fs::remove_file(path);
    }
}
