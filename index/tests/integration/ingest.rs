use crate::common::*;
use ragway_index::ingest::{IngestOptions, OnError, Source};
use ragway_index::jobs::{JobRegistry, JobState};
use ragway_index::{SearchMode, SearchRequest};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run(registry: &JobRegistry, c: &Arc<ragway_index::Collection>, source: Source, on_error: OnError) -> ragway_index::jobs::JobView {
    let job = registry.submit(c.clone(), source, IngestOptions { on_error, embed_batch: 32, read_batch: 8, ..Default::default() }, None).unwrap();
    finish(&job)
}

#[test]
fn jsonl_ingestion_reports_bad_lines_and_is_idempotent() {
    jsonl_ingestion(Backend::Embedded);
}

#[test]
fn jsonl_ingestion_reports_bad_lines_and_is_idempotent_on_postgres() {
    jsonl_ingestion(Backend::Postgres);
}

fn jsonl_ingestion(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let tc = create_on(backend, settings("ingest"));
    let c = &tc.c;
    let path = dir.path().join("docs.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..40 {
        match i {
            2 => writeln!(f, "{{not json").unwrap(),
            9 => writeln!(f, r#"{{"id": "no-text"}}"#).unwrap(),
            15 => writeln!(f).unwrap(), // blank lines are skipped, not errors
            _ => writeln!(f, "{}", serde_json::json!({"id": format!("d{i}"), "text": format!("Document {i} covers subject {}.", i % 5), "metadata": {"i": i}})).unwrap(),
        }
    }
    drop(f);
    let registry = JobRegistry::default();
    let view = run(&registry, c, Source::Jsonl(path.clone()), OnError::Skip);
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(view.progress.documents_written, 37);
    assert_eq!(view.progress.documents_failed, 2);
    assert_eq!(view.errors.iter().map(|e| e.line.unwrap()).collect::<Vec<_>>(), vec![3, 10]);
    assert!(view.errors[1].message.contains("missing `text`"));
    assert_eq!(view.progress.fraction, 1.0);
    assert_eq!(c.info().documents, 37);
    let seq = c.info().last_seq;
    // Re-running the same input changes nothing.
    let again = run(&registry, c, Source::Jsonl(path.clone()), OnError::Skip);
    assert_eq!((again.progress.documents_written, again.progress.documents_unchanged), (0, 37));
    assert_eq!(c.info().last_seq, seq);
    // Everything is searchable once the job is done.
    let hits = c.search(&SearchRequest { query: "Document 33".into(), top_k: 1, mode: SearchMode::Keyword, ..Default::default() }).unwrap();
    assert_eq!(hits.results[0].document_id, "d33");
    // With on_error=fail the job stops at the first bad line and says where.
    let c2 = create_on(backend, settings("strict"));
    let failed = run(&registry, &c2.c, Source::Jsonl(path), OnError::Fail);
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.error.as_deref().unwrap().contains("line 3"), "{failed:?}");
    assert_eq!(registry.list().len(), 3);
}

#[test]
fn beir_corpus_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let registry = JobRegistry::default();
    // A slice of BEIR SciFact's corpus.jsonl (`_id`, `title`, `text`, `metadata: {}`).
    let c = Arc::new(create(&dir.path().join("beir"), settings("beir")));
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/scifact_sample.jsonl");
    let view = run(&registry, &c, Source::from_path(&corpus), OnError::Fail);
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(view.progress.documents_written, 40);
    let doc = c.get("4983").unwrap();
    assert!(doc.title.as_deref().unwrap().starts_with("Microstructural development"));
    let hits = c
        .search(&SearchRequest {
            query: "diffusion tensor MRI of white matter in preterm infants".into(),
            top_k: 3,
            group_by_document: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(hits.results[0].document_id, "4983");

    // A directory of Markdown and text files (others ignored), ids are relative paths.
    let files = dir.path().join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::write(files.join("a.md"), "# Heading A\n\nAlpacas graze on high plateaus.").unwrap();
    std::fs::write(files.join("sub/b.txt"), "Bees make honey from nectar.").unwrap();
    std::fs::write(files.join("skip.bin"), [0u8, 159, 146, 150]).unwrap();
    std::fs::write(files.join("bad.txt"), [0xffu8, 0xfe]).unwrap();
    let d = Arc::new(create(&dir.path().join("dir"), settings("dir")));
    let view = run(&registry, &d, Source::from_path(&files), OnError::Skip);
    assert_eq!(view.progress.documents_written, 2, "{view:?}");
    assert_eq!(view.errors[0].file.as_deref(), Some("bad.txt"));
    assert_eq!(d.get("a.md").unwrap().title.as_deref(), Some("Heading A"));
    assert_eq!(d.get("sub/b.txt").unwrap().metadata["path"], "sub/b.txt");
}

/// Low findings: JSONL lines were read whole whatever their length, directory ingestion
/// followed symbolic links (a link to a parent looped forever), and the job queue had no cap.
#[test]
fn long_lines_symlink_loops_and_the_job_queue_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(create(&dir.path().join("c"), settings("bounded")));
    let path = dir.path().join("long.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, r#"{{"id": "a", "text": "short one"}}"#).unwrap();
    let huge = "x".repeat(ragway_index::ingest::MAX_LINE_BYTES + 10);
    writeln!(f, r#"{{"id": "b", "text": "{huge}"}}"#).unwrap();
    writeln!(f, r#"{{"id": "c", "text": "after the long line"}}"#).unwrap();
    drop(f);
    let registry = JobRegistry::default();
    let view = run(&registry, &c, Source::Jsonl(path), OnError::Skip);
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(view.progress.documents_written, 2);
    assert_eq!(view.errors.len(), 1);
    assert_eq!(view.errors[0].line, Some(2));
    assert!(view.errors[0].message.contains("longer than"), "{:?}", view.errors);

    // A directory holding a link to itself and one leading out of it.
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::write(docs.join("sub").join("one.txt"), "The first text file.").unwrap();
    std::os::unix::fs::symlink(&docs, docs.join("sub").join("loop")).unwrap();
    std::fs::write(dir.path().join("outside.txt"), "Outside the ingested directory.").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.txt"), docs.join("escape.txt")).unwrap();
    let view = run(&registry, &c, Source::Directory(docs), OnError::Skip);
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(view.progress.documents_written, 1, "{view:?}");

    // The queue: more pending jobs than the cap are refused at once.
    let slow = dir.path().join("slow.jsonl");
    let mut f = std::fs::File::create(&slow).unwrap();
    for i in 0..400 {
        writeln!(f, "{}", serde_json::json!({"id": format!("s{i}"), "text": format!("Sentence number {i} about nothing in particular.")})).unwrap();
    }
    drop(f);
    let registry = JobRegistry::default();
    let mut refused = 0;
    for _ in 0..ragway_index::jobs::MAX_PENDING_JOBS + 4 {
        match registry.submit(c.clone(), Source::Jsonl(slow.clone()), IngestOptions::default(), None) {
            Ok(_) => {}
            Err(ragway_index::IndexError::Busy) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 4, "{refused} refused");
}

/// A JSONL file of `n` short documents.
fn numbered_docs(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("many.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..n {
        let text = format!("Record {i} is about the {} season and the river {}.", ["wet", "dry", "cold"][i % 3], i % 17);
        writeln!(f, "{}", serde_json::json!({"id": format!("r{i}"), "text": text})).unwrap();
    }
    path
}

/// Waits until the job has written at least `n` documents (or ended).
fn written_at_least(job: &ragway_index::jobs::Job, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while job.view().progress.documents_written < n && matches!(job.state(), JobState::Queued | JobState::Running) {
        assert!(Instant::now() < deadline, "job made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(job: &ragway_index::jobs::Job) -> ragway_index::jobs::JobView {
    let deadline = Instant::now() + Duration::from_secs(300);
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        assert!(Instant::now() < deadline, "job did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    job.view()
}

#[test]
fn an_ingestion_resumes_after_the_database_restarts_and_fails_cleanly_when_it_stays_down() {
    let dir = tempfile::tempdir().unwrap();
    let tc = create_on(Backend::Postgres, settings("restarts"));
    let (c, pg) = (&tc.c, tc.pg.as_ref().unwrap());
    let n = 600;
    let path = numbered_docs(dir.path(), n);
    let registry = JobRegistry::default();
    // Small batches: many writes, so the restart falls between two of them.
    let options = IngestOptions { embed_batch: 8, read_batch: 8, ..Default::default() };
    let job = registry.submit(c.clone(), Source::Jsonl(path.clone()), options, None).unwrap();
    written_at_least(&job, 40);
    pg.stop();
    // Down for longer than the pool waits for a connection (5 s), so a write fails and is
    // retried.
    std::thread::sleep(Duration::from_secs(7));
    pg.start_again();
    let view = finish(&job);
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert!(view.progress.write_retries > 0, "the restart fell after the last write: {view:?}");
    // Every document is stored once; a write whose commit's answer was lost was retried
    // and found unchanged.
    let p = &view.progress;
    assert_eq!(p.documents_written + p.documents_unchanged, n as u64, "{view:?}");
    assert_eq!(c.info().documents, n);
    let hits = c
        .search(&SearchRequest { query: "Record 599".into(), top_k: 1, mode: SearchMode::Keyword, ..Default::default() })
        .unwrap();
    assert_eq!(hits.results[0].document_id, "r599");

    // Down for longer than the job waits: it fails, saying why, and what it reported as
    // written is stored; running it again stores the rest.
    let c2 = create_on(Backend::Postgres, settings("stays-down"));
    let pg2 = c2.pg.as_ref().unwrap();
    let options = IngestOptions {
        embed_batch: 8,
        read_batch: 8,
        retry_unavailable: Duration::from_secs(2),
        ..Default::default()
    };
    let job = registry.submit(c2.c.clone(), Source::Jsonl(path.clone()), options.clone(), None).unwrap();
    written_at_least(&job, 40);
    pg2.stop();
    let failed = finish(&job);
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    let why = failed.error.clone().unwrap();
    assert!(why.contains("unavailable"), "{why}");
    pg2.start_again();
    let stored = c2.c.info().documents as u64;
    assert!(stored >= failed.progress.documents_written && stored < n as u64, "{stored} stored, {failed:?}");
    let again = finish(&registry.submit(c2.c.clone(), Source::Jsonl(path), options, None).unwrap());
    assert_eq!(again.state, JobState::Done, "{again:?}");
    assert_eq!(again.progress.documents_unchanged, stored, "{again:?}");
    assert_eq!(c2.c.info().documents, n);
}

/// Own-vector documents `r0..r{n}` whose text says which pass wrote them.
fn own_vector_lines(f: &mut std::fs::File, n: usize, pass: &str) {
    for i in 0..n {
        let v: Vec<f32> = (0..8).map(|d| ((i * 7 + d) % 11) as f32 + 1.0).collect();
        writeln!(f, "{}", serde_json::json!({"id": format!("r{i}"), "text": format!("{pass} of record {i}"), "vector": v})).unwrap();
    }
}

/// The embedded store taking several writes at once, with writes holding `slow` held up:
/// a later write of the same document would overtake it if the pipeline let it.
struct HeldUp {
    inner: ragway_index::embedded::EmbeddedStore,
    slow: &'static str,
}

impl ragway_index::store::ChunkStore for HeldUp {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn unchanged(&self, docs: &[(&str, u64)]) -> Vec<bool> {
        self.inner.unchanged(docs)
    }
    fn upsert(&self, docs: Vec<ragway_index::store::NewDoc>) -> ragway_index::Result<ragway_index::WriteResult> {
        if docs.iter().any(|d| d.id == self.slow) {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.inner.upsert(docs)
    }
    fn parallel_writes(&self) -> usize {
        4
    }
    fn delete(&self, ids: &[String]) -> ragway_index::Result<ragway_index::WriteResult> {
        self.inner.delete(ids)
    }
    fn delete_by_filter(&self, f: &ragway_index::filter::Filter) -> ragway_index::Result<ragway_index::WriteResult> {
        self.inner.delete_by_filter(f)
    }
    fn get(&self, id: &str) -> ragway_index::Result<Option<ragway_index::DocumentView>> {
        self.inner.get(id)
    }
    fn commit(&self) -> ragway_index::Result<u64> {
        self.inner.commit()
    }
    fn wait_visible(&self, seq: u64) -> ragway_index::Result<()> {
        self.inner.wait_visible(seq)
    }
    fn has_pending(&self) -> bool {
        self.inner.has_pending()
    }
    fn view<'a>(
        &'a self,
        filter: Option<&'a ragway_index::filter::Filter>,
    ) -> ragway_index::Result<Box<dyn ragway_index::store::StoreView + 'a>> {
        self.inner.view(filter)
    }
    fn sample(&self, n: usize) -> ragway_index::Result<Vec<ragway_index::store::SampledChunk>> {
        self.inner.sample(n)
    }
    fn stats(&self) -> ragway_index::store::StoreStats {
        self.inner.stats()
    }
    fn vectors(&self) -> ragway_index::Result<Vec<Vec<f32>>> {
        self.inner.vectors()
    }
    fn snapshot(&self, dest: &std::path::Path) -> ragway_index::Result<()> {
        self.inner.snapshot(dest)
    }
    fn needs_compaction(&self) -> bool {
        self.inner.needs_compaction()
    }
    fn compact(&self) -> ragway_index::Result<()> {
        self.inner.compact()
    }
    fn flush(&self) -> ragway_index::Result<()> {
        self.inner.flush()
    }
    fn close(self: Box<Self>) -> ragway_index::Result<()> {
        Box::new(self.inner).close()
    }
}

#[test]
fn parallel_writers_never_let_a_later_version_of_a_document_be_overtaken() {
    let dir = tempfile::tempdir().unwrap();
    let settings = ragway_index::CollectionSettings { model: None, dimension: 8, ..settings("held") };
    std::fs::create_dir_all(dir.path().join("c")).unwrap();
    let inner = ragway_index::embedded::EmbeddedStore::open(&dir.path().join("c"), settings.clone()).unwrap();
    let c = Arc::new(ragway_index::Collection::with_store(
        &dir.path().join("c"),
        settings,
        None,
        Box::new(HeldUp { inner, slow: "slow" }),
    ));
    // Batches of 2: [slow, hot v0], [hot v1], [hot v2], ... — the first write is held up
    // while the others are free to go.
    let path = dir.path().join("hot.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{}", serde_json::json!({"id": "slow", "text": "slow", "vector": vec![1.0f32; 8]})).unwrap();
    for k in 0..6 {
        writeln!(f, "{}", serde_json::json!({"id": "hot", "text": format!("version {k}"), "vector": vec![1.0f32; 8]})).unwrap();
        writeln!(f, "{}", serde_json::json!({"id": format!("other{k}"), "text": "x", "vector": vec![0.5f32; 8]})).unwrap();
    }
    drop(f);
    let registry = JobRegistry::default();
    let options = IngestOptions { embed_batch: 2, read_batch: 2, ..Default::default() };
    let view = finish(&registry.submit(c.clone(), Source::Jsonl(path), options, None).unwrap());
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(c.get("hot").unwrap().text, "version 5");
    assert_eq!(c.info().documents, 8);
}

#[test]
fn parallel_ingestion_writers_keep_the_input_order_of_each_document() {
    // PostgreSQL takes several writes at once; a document given twice in the input must
    // still end as its later version.
    let dir = tempfile::tempdir().unwrap();
    let settings = ragway_index::CollectionSettings { model: None, dimension: 8, ..settings("order") };
    let tc = create_on(Backend::Postgres, settings);
    assert!(tc.c.store().parallel_writes() > 1);
    let path = dir.path().join("twice.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    own_vector_lines(&mut f, 300, "first");
    own_vector_lines(&mut f, 300, "second");
    // One record given many times in a row, each batch its own write.
    for k in 0..40 {
        writeln!(f, "{}", serde_json::json!({"id": "hot", "text": format!("version {k}"), "vector": vec![1.0f32; 8]})).unwrap();
    }
    drop(f);
    let registry = JobRegistry::default();
    let options = IngestOptions { embed_batch: 4, read_batch: 4, ..Default::default() };
    let view = finish(&registry.submit(tc.c.clone(), Source::Jsonl(path), options, None).unwrap());
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(tc.c.info().documents, 301);
    for i in [0, 1, 150, 299] {
        assert_eq!(tc.c.get(&format!("r{i}")).unwrap().text, format!("second of record {i}"));
    }
    assert_eq!(tc.c.get("hot").unwrap().text, "version 39");
}
