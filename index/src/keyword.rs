//! The keyword half: BM25 over chunk text and title in a tantivy index on disk.
//!
//! Each chunk is one tantivy document: its key (u64, fast), its document id (raw string,
//! to delete a document's chunks with one term), title and text (English analyzer:
//! lowercase, stop words, Porter stemming). Writes go to the `IndexWriter` as the log is
//! applied; a commit carries the log sequence number it covers as its payload, so that a
//! restart replays exactly the records tantivy has not seen. Searches run on the snapshot of
//! the last commit, tagged with that sequence number (see `collection.rs` for why).

use crate::error::{IndexError, Result};
use crate::topk::TopK;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tantivy::query::{BooleanQuery, BoostQuery, EnableScoring, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STRING};
use tantivy::tokenizer::{Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer};
use tantivy::{doc, DocId, Index, IndexReader, IndexWriter, ReloadPolicy, Score, Searcher, Term};

const ANALYZER: &str = "ragway_en";
const WRITER_MEMORY: usize = 64 << 20;

/// Most analyzed terms a keyword query may have.
pub const MAX_QUERY_TERMS: usize = 1024;

/// A searcher over one commit and the log sequence number that commit covers.
pub struct KeywordSnapshot {
    pub searcher: Searcher,
    pub seq: u64,
}

/// A chunk as the keyword index sees it.
pub struct KeywordChunk<'a> {
    pub key: u64,
    pub doc_id: &'a str,
    pub title: &'a str,
    pub text: &'a str,
}

pub struct KeywordIndex {
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    key: Field,
    doc_id: Field,
    title: Field,
    text: Field,
    /// Highest log sequence number whose operations were handed to the writer.
    pending: AtomicU64,
    snapshot: RwLock<Arc<KeywordSnapshot>>,
}

impl KeywordIndex {
    /// Opens or creates the index in `dir`; returns it with the sequence number of its last
    /// commit (0 for a new index).
    pub fn open(dir: &Path) -> Result<KeywordIndex> {
        std::fs::create_dir_all(dir)?;
        let mut builder = Schema::builder();
        let key = builder.add_u64_field("key", FAST | INDEXED);
        let doc_id = builder.add_text_field("doc_id", STRING);
        let text_options = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default().set_tokenizer(ANALYZER).set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let title = builder.add_text_field("title", text_options.clone());
        let text = builder.add_text_field("text", text_options);
        let schema = builder.build();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(|e| IndexError::Internal(e.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        index.tokenizers().register(ANALYZER, analyzer());
        let writer: IndexWriter = index.writer_with_num_threads(1, WRITER_MEMORY)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        let seq = committed_seq(&index)?;
        let snapshot = RwLock::new(Arc::new(KeywordSnapshot { searcher: reader.searcher(), seq }));
        Ok(KeywordIndex {
            writer: Mutex::new(writer),
            reader,
            key,
            doc_id,
            title,
            text,
            pending: AtomicU64::new(seq),
            snapshot,
        })
    }

    /// Replaces the chunks of `replaced` documents with `chunks`, as log record `seq`.
    pub fn apply(&self, seq: u64, replaced: &[&str], chunks: &[KeywordChunk<'_>]) -> Result<()> {
        let writer = self.writer.lock().expect("keyword writer lock");
        for id in replaced {
            writer.delete_term(Term::from_field_text(self.doc_id, id));
        }
        for c in chunks {
            // The text field carries the title too (BM25 over "title + text", as BEIR's
            // BM25 baselines index it); the title field adds an optional boost on top.
            let body = if c.title.is_empty() { c.text.to_string() } else { format!("{}\n{}", c.title, c.text) };
            writer.add_document(doc!(
                self.key => c.key,
                self.doc_id => c.doc_id,
                self.title => c.title,
                self.text => body,
            ))?;
        }
        self.pending.fetch_max(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Records that log record `seq` needs nothing from this index (so a commit covers it).
    pub fn skip(&self, seq: u64) {
        let _writer = self.writer.lock().expect("keyword writer lock");
        self.pending.fetch_max(seq, Ordering::SeqCst);
    }

    /// Commits what was applied (if anything) and publishes a new snapshot; returns the
    /// sequence number now searchable.
    pub fn commit(&self) -> Result<u64> {
        let mut writer = self.writer.lock().expect("keyword writer lock");
        let seq = self.pending.load(Ordering::SeqCst);
        if seq <= self.snapshot().seq {
            return Ok(self.snapshot().seq);
        }
        let mut prepared = writer.prepare_commit()?;
        prepared.set_payload(&seq.to_string());
        prepared.commit()?;
        drop(writer);
        self.reader.reload()?;
        let snapshot = Arc::new(KeywordSnapshot { searcher: self.reader.searcher(), seq });
        *self.snapshot.write().expect("snapshot lock") = snapshot;
        Ok(seq)
    }

    /// Sequence number of operations handed to the writer, committed or not.
    pub fn pending_seq(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Arc<KeywordSnapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Analyzed terms of a query, in order (duplicates kept, as BM25 sums them).
    pub fn query_terms(&self, query: &str) -> Vec<String> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(query);
        let mut terms = Vec::new();
        while stream.advance() {
            terms.push(stream.token().text.clone());
        }
        terms
    }

    /// BM25 top-`k` of `snapshot` as (key, score): the sum over query terms and both fields,
    /// the title's share multiplied by `title_boost`. `allow` restricts the keys.
    pub fn search(
        &self,
        snapshot: &KeywordSnapshot,
        query: &str,
        k: usize,
        title_boost: f32,
        allow: Option<Arc<dyn Fn(u64) -> bool + Send + Sync>>,
    ) -> Result<Vec<(u64, f32)>> {
        let terms = self.query_terms(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        // Each term is a clause of the boolean query (two with a title boost): bounded.
        check_term_count(terms.len())?;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for t in &terms {
            clauses.push((
                Occur::Should,
                Box::new(TermQuery::new(Term::from_field_text(self.text, t), IndexRecordOption::WithFreqs)),
            ));
            if title_boost > 0.0 {
                let q = TermQuery::new(Term::from_field_text(self.title, t), IndexRecordOption::WithFreqs);
                clauses.push((Occur::Should, Box::new(BoostQuery::new(Box::new(q), title_boost))));
            }
        }
        let query = BooleanQuery::new(clauses);
        let searcher = &snapshot.searcher;
        let weight = query.weight(EnableScoring::enabled_from_searcher(searcher))?;
        // The segments in turn, with one top-k across them: a segment's walk starts from the
        // k-th best score of the segments before it (as Lucene shares its minimum competitive
        // score), where tantivy's TopDocs starts every segment from nothing, so block-max
        // WAND skips little until each segment has filled its own k.
        let mut top = TopK::new(k);
        for (ord, reader) in searcher.segment_readers().iter().enumerate() {
            let segment = u32::try_from(ord).map_err(|_| IndexError::Corrupt("too many segments".into()))?;
            let keys = reader.fast_fields().u64("key")?;
            let alive = reader.alive_bitset();
            weight.for_each_pruning(threshold(&top), reader, &mut |doc, score| {
                if alive.is_some_and(|a| a.is_deleted(doc)) {
                    return threshold(&top);
                }
                // A chunk without a key cannot be returned (nor can one the filter refuses).
                match keys.first(doc) {
                    Some(key) if allow.as_ref().is_none_or(|allow| allow(key)) => {
                        top.push(Hit { score, segment, doc, key });
                    }
                    _ => {}
                }
                threshold(&top)
            })?;
        }
        Ok(top.into_sorted().into_iter().map(|h| (h.key, h.score)).collect())
    }

    /// Documents (chunks) in a snapshot.
    pub fn num_chunks(snapshot: &KeywordSnapshot) -> u64 {
        snapshot.searcher.num_docs()
    }

    /// Every key of a snapshot (for consistency checks).
    pub fn all_keys(&self, snapshot: &KeywordSnapshot) -> Result<Vec<u64>> {
        let mut keys = Vec::new();
        for segment in snapshot.searcher.segment_readers() {
            let column = segment.fast_fields().u64("key")?;
            let alive = segment.alive_bitset();
            for doc in 0..segment.max_doc() {
                if alive.is_none_or(|a| a.is_alive(doc)) {
                    if let Some(k) = column.first(doc) {
                        keys.push(k);
                    }
                }
            }
        }
        keys.sort_unstable();
        Ok(keys)
    }

    /// Waits for merges and releases the writer's files.
    pub fn close(self) -> Result<()> {
        let writer = self.writer.into_inner().expect("keyword writer lock");
        writer.wait_merging_threads()?;
        Ok(())
    }
}

/// Refuses a keyword query of more than [`MAX_QUERY_TERMS`] terms (as this index's
/// analyzer splits it), whichever store answers it: each term costs a posting list's walk.
pub fn check_query_terms(query: &str) -> Result<()> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(query);
    let mut n = 0usize;
    while stream.advance() {
        n += 1;
    }
    check_term_count(n)
}

fn check_term_count(n: usize) -> Result<()> {
    if n > MAX_QUERY_TERMS {
        let message = format!("the query has {n} terms; keyword search takes at most {MAX_QUERY_TERMS}");
        return Err(crate::error::IndexError::invalid("query", message));
    }
    Ok(())
}

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

fn committed_seq(index: &Index) -> Result<u64> {
    let metas = index.load_metas()?;
    Ok(metas.payload.and_then(|p| p.parse().ok()).unwrap_or(0))
}

/// A hit while collecting: by score, then the lower address (segment, document) first, as
/// tantivy's TopDocs breaks ties.
#[derive(Clone, Copy, Debug)]
struct Hit {
    score: Score,
    segment: u32,
    doc: DocId,
    key: u64,
}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&other.score).then_with(|| (other.segment, other.doc).cmp(&(self.segment, self.doc)))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Hit {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Hit {}

/// The score a hit must beat to enter `top`: the k-th best once there are k.
fn threshold(top: &TopK<Hit>) -> Score {
    top.worst_when_full().map_or(Score::MIN, |worst| worst.score)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hits from several segments map to their own segment's keys: each commit below writes
    /// a segment whose keys differ from its documents' positions in it.
    #[test]
    fn hits_from_several_segments_carry_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeywordIndex::open(dir.path()).unwrap();
        for segment in 0..3u64 {
            let ids: Vec<String> = (0..4).map(|i| format!("s{segment}d{i}")).collect();
            let texts: Vec<String> = (0..4)
                .map(|i| {
                    // "walrus" once in every document, "tusk" only in segment 1's third.
                    let extra = if segment == 1 && i == 2 { " tusk tusk" } else { "" };
                    format!("walrus number {} of segment {segment}{extra}", segment * 4 + i)
                })
                .collect();
            let chunks: Vec<KeywordChunk<'_>> = (0..4)
                .map(|i| KeywordChunk {
                    key: 1000 * (segment + 1) + i as u64,
                    doc_id: &ids[i],
                    title: "",
                    text: &texts[i],
                })
                .collect();
            index.apply(segment + 1, &[], &chunks).unwrap();
            index.commit().unwrap();
        }
        let snapshot = index.snapshot();
        assert!(snapshot.searcher.segment_readers().len() > 1, "the test needs several segments");
        let hits = index.search(&snapshot, "tusk", 10, 0.0, None).unwrap();
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![2002]);
        let mut keys: Vec<u64> =
            index.search(&snapshot, "walrus", 100, 0.0, None).unwrap().iter().map(|h| h.0).collect();
        keys.sort_unstable();
        let want: Vec<u64> = (1..=3u64).flat_map(|s| (0..4).map(move |i| 1000 * s + i)).collect();
        assert_eq!(keys, want);
    }

    /// The shared-threshold walk returns what tantivy's own TopDocs collector does (keys and
    /// scores, in order), over several segments with deleted documents, with and without a
    /// filter, at depths below and above the matching count.
    #[test]
    fn the_shared_threshold_walk_returns_tantivys_top_docs() {
        use tantivy::collector::{FilterCollector, TopDocs};
        let dir = tempfile::tempdir().unwrap();
        let index = KeywordIndex::open(dir.path()).unwrap();
        let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"];
        let mut rng = ragway_engine::rng::SplitMix64::new(5);
        let mut key = 0u64;
        for segment in 1..=6u64 {
            let ids: Vec<String> = (0..200).map(|i| format!("s{segment}d{i}")).collect();
            // Zipf-like: low word indexes much more often, lengths 3..40.
            let texts: Vec<String> = (0..200)
                .map(|_| {
                    let n = 3 + rng.below(38);
                    (0..n)
                        .map(|_| {
                            let top = 1 + rng.below(words.len());
                            words[rng.below(top)]
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let chunks: Vec<KeywordChunk<'_>> = (0..200)
                .map(|i| {
                    key += 1;
                    KeywordChunk { key, doc_id: &ids[i], title: "", text: &texts[i] }
                })
                .collect();
            // Every third segment deletes documents of the one before it.
            let gone: Vec<String> =
                if segment % 3 == 0 { (0..60).map(|i| format!("s{}d{i}", segment - 1)).collect() } else { vec![] };
            let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
            index.apply(segment, &gone, &chunks).unwrap();
            index.commit().unwrap();
        }
        let snapshot = index.snapshot();
        assert!(snapshot.searcher.segment_readers().len() > 2, "the test needs several segments");
        let searcher = &snapshot.searcher;
        let keys_of = |hits: Vec<(f32, tantivy::DocAddress)>| -> Vec<(u64, f32)> {
            hits.into_iter()
                .map(|(score, a)| {
                    let column = searcher.segment_reader(a.segment_ord).fast_fields().u64("key").unwrap();
                    (column.first(a.doc_id).unwrap(), score)
                })
                .collect()
        };
        // Keys equal, scores to the last bits: a document's terms are summed in the order the
        // walk meets them, which block-max WAND changes.
        let same = |got: &[(u64, f32)], want: &[(u64, f32)], what: &str| {
            assert_eq!(
                got.iter().map(|h| h.0).collect::<Vec<_>>(),
                want.iter().map(|h| h.0).collect::<Vec<_>>(),
                "{what}"
            );
            for (g, w) in got.iter().zip(want) {
                assert!((g.1 - w.1).abs() <= 1e-5 * w.1.abs(), "{what}: {g:?} {w:?}");
            }
        };
        for query in ["kappa", "sigma lambda", "alpha theta kappa", "beta zeta zeta epsilon sigma", "omega"] {
            let terms = index.query_terms(query);
            let clauses: Vec<(Occur, Box<dyn Query>)> = terms
                .iter()
                .map(|t| {
                    let q = TermQuery::new(Term::from_field_text(index.text, t), IndexRecordOption::WithFreqs);
                    (Occur::Should, Box::new(q) as Box<dyn Query>)
                })
                .collect();
            let reference = BooleanQuery::new(clauses);
            for k in [1, 10, 300, 2000] {
                let want = keys_of(searcher.search(&reference, &TopDocs::with_limit(k).order_by_score()).unwrap());
                let got = index.search(&snapshot, query, k, 0.0, None).unwrap();
                same(&got, &want, &format!("{query:?} at k {k}"));
                let odd: Arc<dyn Fn(u64) -> bool + Send + Sync> = Arc::new(|key| key % 2 == 1);
                let filter = FilterCollector::new(
                    "key".to_string(),
                    |key: u64| key % 2 == 1,
                    TopDocs::with_limit(k).order_by_score(),
                );
                let want = keys_of(searcher.search(&reference, &filter).unwrap());
                let got = index.search(&snapshot, query, k, 0.0, Some(odd)).unwrap();
                same(&got, &want, &format!("{query:?} at k {k}, odd keys"));
            }
        }
    }
}
