//! Bulk ingestion: parse → chunk → embed → write, as a pipeline of threads joined by
//! bounded channels, so that reading, chunking and writing overlap with embedding (the
//! expensive stage) and memory stays bounded whatever the input size.
//!
//! Inputs are streamed: JSONL/NDJSON with `id` (or BEIR's `_id`), `text`, optional `title`
//! and `metadata`; or a directory of `.txt`/`.md` files (id = relative path). Re-running an
//! input changes nothing: documents whose content is unchanged are skipped before they are
//! embedded. Bad records are reported with their line (or file) and skipped, or fail the
//! job, as `on_error` says — never dropped silently.

use crate::collection::{validate_doc, ChunkedDoc, Collection, PreparedDoc};
use crate::error::{IndexError, Result};
use crate::jobs::{Job, RecordError};
use crate::types::DocumentInput;
use rayon::prelude::*;
use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Source {
    /// JSONL / NDJSON / BEIR `corpus.jsonl`.
    Jsonl(PathBuf),
    /// A directory of `.txt` and `.md` files, walked recursively in name order.
    Directory(PathBuf),
}

impl Source {
    /// A directory becomes a `Directory` source, anything else JSONL.
    pub fn from_path(path: &Path) -> Source {
        if path.is_dir() {
            Source::Directory(path.to_path_buf())
        } else {
            Source::Jsonl(path.to_path_buf())
        }
    }

    /// What job views show: the kind and the file or folder name, never the server's path
    /// to it (job views are readable with a `read` key).
    pub fn describe(&self) -> String {
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match self {
            Source::Jsonl(p) => format!("jsonl:{}", name(p)),
            Source::Directory(p) => format!("directory:{}", name(p)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OnError {
    /// Report the bad record and go on.
    #[default]
    Skip,
    /// Stop the job at the first bad record.
    Fail,
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub on_error: OnError,
    /// Chunks embedded per call to the model.
    pub embed_batch: usize,
    /// Documents per parsed batch.
    pub read_batch: usize,
    /// How long a batch's write is retried while the store is unavailable (a database
    /// restarting) before the job fails.
    pub retry_unavailable: Duration,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self { on_error: OnError::Skip, embed_batch: 256, read_batch: 64, retry_unavailable: Duration::from_secs(60) }
    }
}

/// One input record, parsed or not.
enum Item {
    Doc { at: RecordError, doc: DocumentInput },
    Bad(RecordError),
}

#[derive(Deserialize)]
struct JsonRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default, rename = "_id")]
    beir_id: Option<serde_json::Value>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    #[serde(default)]
    chunks: Option<Vec<crate::types::ChunkInput>>,
}

fn parse_line(line: &str) -> std::result::Result<DocumentInput, String> {
    let r: JsonRecord = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let id = match r.id.or(r.beir_id) {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => return Err("`id` must be a string or a number".into()),
        None => return Err("missing `id` (or `_id`)".into()),
    };
    let text = match (r.text, &r.chunks) {
        (Some(t), _) => t,
        (None, Some(_)) => String::new(),
        (None, None) => return Err("missing `text`".into()),
    };
    // BEIR corpora carry `"metadata": {}`; an empty title is no title.
    let metadata = match r.metadata {
        Some(serde_json::Value::Object(m)) if m.is_empty() => None,
        other => other,
    };
    let title = r.title.filter(|t| !t.trim().is_empty());
    Ok(DocumentInput { id, text, title, metadata, vector: r.vector, chunks: r.chunks })
}

/// Reads the source into batches of items; counts bytes for progress.
fn read_source(source: Source, job: &Job, batch: usize, tx: SyncSender<Vec<Item>>) -> Result<()> {
    let progress = &job.progress;
    let mut items = Vec::with_capacity(batch);
    let send = |item: Item, items: &mut Vec<Item>| -> bool {
        items.push(item);
        if items.len() >= batch {
            return tx.send(std::mem::take(items)).is_ok();
        }
        true
    };
    match source {
        Source::Jsonl(path) => {
            let file = std::fs::File::open(&path)?;
            progress.bytes_total.store(file.metadata()?.len(), Ordering::Relaxed);
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let mut buf = Vec::new();
            let mut line_no = 0u64;
            loop {
                if job.cancel.load(Ordering::Relaxed) {
                    break;
                }
                buf.clear();
                // One line is read into memory at most MAX_LINE_BYTES at a time; the rest of
                // an over-long line is skipped, not buffered.
                let n = (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf)?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                let mut consumed = n as u64;
                let too_long = buf.len() > MAX_LINE_BYTES && buf.last() != Some(&b'\n');
                if too_long {
                    consumed += skip_line(&mut reader)?;
                }
                progress.bytes_read.fetch_add(consumed, Ordering::Relaxed);
                let at = RecordError { line: Some(line_no), file: None, message: String::new() };
                let decoded = if too_long { Err(()) } else { std::str::from_utf8(&buf).map_err(|_| ()) };
                let item = match decoded {
                    Err(()) if too_long => Item::Bad(RecordError {
                        message: format!("line is longer than {MAX_LINE_BYTES} bytes"),
                        ..at
                    }),
                    Err(_) => Item::Bad(RecordError { message: "line is not valid UTF-8".into(), ..at }),
                    Ok(text) if text.trim().is_empty() => continue,
                    Ok(text) => match parse_line(text) {
                        Ok(doc) => Item::Doc { at, doc },
                        Err(message) => Item::Bad(RecordError { message, ..at }),
                    },
                };
                progress.documents_read.fetch_add(1, Ordering::Relaxed);
                if !send(item, &mut items) {
                    return Ok(());
                }
            }
        }
        Source::Directory(root) => {
            let mut files = Vec::new();
            walk(&root, &mut files)?;
            files.sort();
            let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
            progress.bytes_total.store(total, Ordering::Relaxed);
            for path in files {
                if job.cancel.load(Ordering::Relaxed) {
                    break;
                }
                let rel = path.strip_prefix(&root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
                let at = RecordError { line: None, file: Some(rel.clone()), message: String::new() };
                let mut bytes = Vec::new();
                let file = std::fs::File::open(&path)?;
                if file.metadata()?.len() > MAX_LINE_BYTES as u64 {
                    let item = Item::Bad(RecordError { message: format!("file is larger than {MAX_LINE_BYTES} bytes"), ..at });
                    progress.documents_read.fetch_add(1, Ordering::Relaxed);
                    if !send(item, &mut items) {
                        return Ok(());
                    }
                    continue;
                }
                file.take(MAX_LINE_BYTES as u64).read_to_end(&mut bytes)?;
                progress.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                progress.documents_read.fetch_add(1, Ordering::Relaxed);
                let item = match String::from_utf8(bytes) {
                    Err(_) => Item::Bad(RecordError { message: "file is not valid UTF-8".into(), ..at }),
                    Ok(text) => {
                        let title = markdown_title(&path, &text);
                        let doc = DocumentInput {
                            id: rel.clone(),
                            text,
                            title,
                            metadata: Some(serde_json::json!({ "path": rel })),
                            ..Default::default()
                        };
                        Item::Doc { at, doc }
                    }
                };
                if !send(item, &mut items) {
                    return Ok(());
                }
            }
        }
    }
    if !items.is_empty() {
        let _ = tx.send(items);
    }
    Ok(())
}

/// Largest JSONL line (one document) and largest text file ingested: 16 MiB.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Deepest directory level and most files a directory source may hold.
const MAX_DEPTH: usize = 32;
const MAX_FILES: usize = 1_000_000;

/// Reads past the rest of the current line; the bytes skipped.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(skipped);
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64 + 1);
            }
            None => {
                let n = available.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
}

/// The `.txt` and `.md` files under `dir`. Symbolic links are not followed (a link to a
/// parent would loop, and one pointing out of the ingest root would escape it); depth and
/// file count are bounded.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    walk_at(dir, out, 0)
}

fn walk_at(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(IndexError::invalid("path", format!("directories nest deeper than {MAX_DEPTH} levels")));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_symlink() {
            continue;
        }
        if kind.is_dir() {
            walk_at(&path, out, depth + 1)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "txt" || e == "md") {
            if out.len() >= MAX_FILES {
                return Err(IndexError::invalid("path", format!("more than {MAX_FILES} files to ingest")));
            }
            out.push(path);
        }
    }
    Ok(())
}

/// A Markdown file's first `# ` heading, else the file name without extension.
fn markdown_title(path: &Path, text: &str) -> Option<String> {
    if path.extension().is_some_and(|e| e == "md") {
        if let Some(h) = text.lines().map(str::trim).find(|l| !l.is_empty()).and_then(|l| l.strip_prefix("# ")) {
            return Some(h.trim().to_string());
        }
    }
    path.file_stem().map(|s| s.to_string_lossy().to_string())
}

/// Runs an ingestion to the end (or to the first bad record with `OnError::Fail`), then
/// makes everything searchable.
pub fn run_ingest(collection: &Collection, source: Source, options: &IngestOptions, job: &Job) -> Result<()> {
    let (read_tx, read_rx) = sync_channel::<Vec<Item>>(4);
    let (chunk_tx, chunk_rx) = sync_channel::<Result<Vec<ChunkedDoc>>>(2);
    let (write_tx, write_rx) = sync_channel::<Vec<PreparedDoc>>(2);
    let read_batch = options.read_batch.max(1);
    let embed_batch = options.embed_batch.max(1);
    let on_error = options.on_error;
    // An empty collection may be loaded with its dense index built once at the end
    // (PostgreSQL); whatever becomes of the load, the index is built before the job ends.
    let bulk = collection.begin_bulk_load().unwrap_or_else(|e| {
        // The writes retry while the store is unavailable, and say why if it stays so.
        tracing::warn!(job = %job.id, error = %e, "could not begin a bulk load; writing with the index kept");
        false
    });
    let loaded = std::thread::scope(|scope| -> Result<()> {
        let reader = scope.spawn(move || read_source(source, job, read_batch, read_tx));
        let chunker = scope.spawn(move || chunk_stage(collection, job, on_error, read_rx, chunk_tx));
        let retry = options.retry_unavailable;
        let writer = scope.spawn(move || write_stage(collection, job, retry, write_rx));
        // Embedding runs here: gather chunked documents until a batch is full.
        let embedded = embed_stage(collection, job, embed_batch, chunk_rx, write_tx);
        let written = writer.join().map_err(|_| IndexError::Internal("ingestion writer panicked".into()))?;
        let chunked = chunker.join().map_err(|_| IndexError::Internal("ingestion chunker panicked".into()))?;
        let read = reader.join().map_err(|_| IndexError::Internal("ingestion reader panicked".into()))?;
        // The first failure in pipeline order explains the others (closed channels).
        read.and(chunked).and(embedded).and(written)
    });
    if bulk {
        job.progress.indexing.store(true, Ordering::Relaxed);
        let indexed = collection.end_bulk_load();
        job.progress.indexing.store(false, Ordering::Relaxed);
        // A load that failed says why; a build that failed leaves the documents stored
        // and searchable by exact distances, and upkeep builds the index later.
        loaded?;
        indexed.map_err(|e| {
            IndexError::Unavailable(format!(
                "the documents are stored, but building the collection's dense index failed (the server retries it): {e}"
            ))
        })?;
    } else {
        loaded?;
    }
    collection.commit()?;
    Ok(())
}

fn chunk_stage(
    collection: &Collection,
    job: &Job,
    on_error: OnError,
    rx: Receiver<Vec<Item>>,
    tx: SyncSender<Result<Vec<ChunkedDoc>>>,
) -> Result<()> {
    let progress = &job.progress;
    for items in rx {
        let mut docs = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Item::Bad(e) => {
                    if on_error == OnError::Fail {
                        let msg = format!("bad record at {}: {}", location(&e), e.message);
                        job.record_error(e);
                        return Err(IndexError::invalid("input", msg));
                    }
                    job.record_error(e);
                }
                Item::Doc { at, doc } => {
                    if let Err(e) = validate_doc(&doc, "record") {
                        let err = RecordError { message: e.to_string(), ..at };
                        if on_error == OnError::Fail {
                            let msg = format!("bad record at {}: {}", location(&err), err.message);
                            job.record_error(err);
                            return Err(IndexError::invalid("input", msg));
                        }
                        job.record_error(err);
                        continue;
                    }
                    docs.push((at, doc));
                }
            }
        }
        // Documents stored with the same content are skipped before chunking and
        // embedding; one look-up per batch.
        let (docs, skipped) = collection.skip_unchanged(docs, |(_, d)| d);
        progress.documents_unchanged.fetch_add(skipped as u64, Ordering::Relaxed);
        let results: Vec<(RecordError, Result<ChunkedDoc>)> =
            docs.into_par_iter().map(|(at, d)| (at, collection.chunk(d))).collect();
        let mut chunked = Vec::with_capacity(results.len());
        let mut fatal = None;
        for (at, r) in results {
            match r {
                Ok(c) => chunked.push(c),
                // A record the collection refuses (say, a vector of the wrong size) is a bad
                // record like any other.
                Err(e @ IndexError::InvalidRequest { .. }) => {
                    let err = RecordError { message: e.to_string(), ..at };
                    if on_error == OnError::Fail {
                        let msg = format!("bad record at {}: {}", location(&err), err.message);
                        job.record_error(err);
                        fatal = Some(IndexError::invalid("input", msg));
                        break;
                    }
                    job.record_error(err);
                }
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        let failed = fatal.is_some();
        let batch = match fatal {
            Some(e) => Err(e),
            None => Ok(chunked),
        };
        if tx.send(batch).is_err() || failed {
            break;
        }
    }
    Ok(())
}

fn embed_stage(
    collection: &Collection,
    job: &Job,
    batch: usize,
    rx: Receiver<Result<Vec<ChunkedDoc>>>,
    tx: SyncSender<Vec<PreparedDoc>>,
) -> Result<()> {
    let mut pending: Vec<ChunkedDoc> = Vec::new();
    let mut pending_chunks = 0;
    let flush = |pending: &mut Vec<ChunkedDoc>| -> Result<bool> {
        let started = Instant::now();
        let prepared = collection.embed(std::mem::take(pending), batch)?;
        job.progress.embed_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(tx.send(prepared).is_ok())
    };
    for docs in rx {
        for d in docs? {
            pending_chunks += d.spans.len();
            pending.push(d);
            if pending_chunks >= batch {
                pending_chunks = 0;
                if !flush(&mut pending)? {
                    return Ok(());
                }
            }
        }
    }
    if !pending.is_empty() {
        flush(&mut pending)?;
    }
    Ok(())
}

fn write_stage(collection: &Collection, job: &Job, retry: Duration, rx: Receiver<Vec<PreparedDoc>>) -> Result<()> {
    let progress = &job.progress;
    let write = |docs: Vec<PreparedDoc>| -> Result<()> {
        let result = collection.write_retrying(docs, retry, |e, wait| {
            progress.write_retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job = %job.id, error = %e, retry_in_ms = wait.as_millis() as u64, "ingestion write failed; retrying");
        })?;
        progress.documents_written.fetch_add(result.upserted as u64, Ordering::Relaxed);
        progress.documents_unchanged.fetch_add(result.unchanged as u64, Ordering::Relaxed);
        progress.chunks_written.fetch_add(result.chunks as u64, Ordering::Relaxed);
        Ok(())
    };
    let writers = collection.store().parallel_writes().max(1);
    if writers == 1 {
        return rx.into_iter().try_for_each(write);
    }
    // Several writers, and still in input order for any one document: a batch that shares
    // a document with a batch being written waits for it, and so do the batches behind it
    // (they are taken in order, one at a time).
    let next = Mutex::new(rx);
    let in_flight: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let done = Condvar::new();
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..writers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let (docs, ids) = {
                            let rx = next.lock().expect("ingestion batches");
                            let Ok(docs) = rx.recv() else { return Ok(()) };
                            let ids: Vec<String> = docs.iter().map(|d| d.chunked.input.id.clone()).collect();
                            let mut busy = in_flight.lock().expect("documents in flight");
                            while ids.iter().any(|id| busy.contains(id)) {
                                busy = done.wait(busy).expect("documents in flight");
                            }
                            busy.extend(ids.iter().cloned());
                            (docs, ids)
                        };
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let result = write(docs);
                        let mut busy = in_flight.lock().expect("documents in flight");
                        for id in &ids {
                            busy.remove(id);
                        }
                        done.notify_all();
                        drop(busy);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return result;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| IndexError::Internal("ingestion writer panicked".into()))?)
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    })
}

fn location(e: &RecordError) -> String {
    match (&e.line, &e.file) {
        (Some(l), _) => format!("line {l}"),
        (None, Some(f)) => format!("file {f}"),
        _ => "unknown position".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_beir_records() {
        let d = parse_line(r#"{"id": "a", "text": "t", "title": "T", "metadata": {"x": 1}}"#).unwrap();
        assert_eq!((d.id.as_str(), d.title.as_deref()), ("a", Some("T")));
        let b = parse_line(r#"{"_id": 4983, "title": "", "text": "abstract", "metadata": {}}"#).unwrap();
        assert_eq!((b.id.as_str(), b.title, b.metadata), ("4983", None, None));
        assert!(parse_line(r#"{"text": "x"}"#).unwrap_err().contains("missing `id`"));
        assert!(parse_line(r#"{"id": "x"}"#).unwrap_err().contains("missing `text`"));
        assert!(parse_line("{not json").unwrap_err().starts_with("invalid JSON"));
        assert!(parse_line(r#"{"id": [1], "text": "x"}"#).is_err());
    }
}
