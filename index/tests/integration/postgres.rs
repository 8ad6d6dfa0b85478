//! The `postgres` store against a real PostgreSQL 18 + pgvector (see `common::PgServer`),
//! with the same expectations as the embedded store where behaviour must match.

use crate::common::*;
use ragway_index::filter::Filter;
use ragway_index::postgres::{PgDatabase, PgOptions, PgStore};
use ragway_index::{Collection, CollectionSettings, DocumentInput, IndexError, SearchMode, SearchRequest};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// A collection without a model: documents and searches bring 8-d vectors.
fn own_settings(name: &str) -> CollectionSettings {
    CollectionSettings { model: None, dimension: 8, ..settings(name) }
}

/// A deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn vector(&mut self) -> Vec<f32> {
        (0..8).map(|_| (self.below(2000) as f32 / 1000.0) - 1.0).collect()
    }
}

/// Metadata with every shape the filter language meets: numbers (integer and not),
/// strings, booleans, nulls, arrays, nested objects, missing keys.
fn metadata(rng: &mut Rng) -> Value {
    let mut m = serde_json::Map::new();
    match rng.below(5) {
        0 => {}
        1 => {
            m.insert("a".into(), Value::Null);
        }
        2 => {
            m.insert("a".into(), json!(["x", "y", "z"][rng.below(3) as usize]));
        }
        3 => {
            m.insert("a".into(), json!([rng.below(4), rng.below(4)]));
        }
        _ => {
            m.insert("a".into(), json!(rng.below(4)));
        }
    }
    if rng.below(3) > 0 {
        m.insert("n".into(), json!(rng.below(100) as f64 / 4.0));
    }
    if rng.below(2) == 0 {
        m.insert("flag".into(), json!(rng.below(2) == 0));
    }
    match rng.below(4) {
        0 => {}
        1 => {
            m.insert("o".into(), json!({"p": rng.below(3)}));
        }
        2 => {
            m.insert("o".into(), json!([{"p": 1}]));
        }
        _ => {
            m.insert("o".into(), json!({"p": {"q": "deep"}}));
        }
    }
    Value::Object(m)
}

/// A random filter over those shapes, `depth` levels of `and`/`or`/`not` at most.
fn filter(rng: &mut Rng, depth: u32) -> Value {
    if depth > 0 && rng.below(3) == 0 {
        return match rng.below(3) {
            0 => json!({"and": (0..rng.below(3) + 1).map(|_| filter(rng, depth - 1)).collect::<Vec<_>>()}),
            1 => json!({"or": (0..rng.below(3) + 1).map(|_| filter(rng, depth - 1)).collect::<Vec<_>>()}),
            _ => json!({"not": filter(rng, depth - 1)}),
        };
    }
    let values = [json!("x"), json!("y"), json!(1), json!(2.0), json!(null), json!(true), json!({"p": 1}), json!(3)];
    let key = ["a", "n", "flag", "o.p", "o.p.q", "o", "_id", "missing"][rng.below(8) as usize];
    let pick = rng.below(values.len() as u64) as usize;
    let v = || values[pick].clone();
    match rng.below(9) {
        0 => json!({"key": key, "eq": v()}),
        1 => json!({"key": key, "ne": v()}),
        2 => json!({"key": key, "in": [v(), values[rng.below(8) as usize].clone()]}),
        3 => json!({"key": key, "nin": [v()]}),
        4 => json!({"key": key, "gte": rng.below(30) as f64 / 2.0}),
        5 => json!({"key": key, "gt": 1, "lt": rng.below(25)}),
        6 => json!({"key": key, "exists": rng.below(2) == 0}),
        7 => json!({"key": "_id", "in": [format!("d{}", rng.below(60)), format!("d{}", rng.below(60))]}),
        _ => json!({"key": key, "eq": format!("d{}", rng.below(60))}),
    }
}

fn own_doc(id: &str, text: &str, metadata: Value, vector: Vec<f32>) -> DocumentInput {
    DocumentInput {
        id: id.into(),
        text: text.into(),
        metadata: Some(metadata),
        vector: Some(vector),
        ..Default::default()
    }
}

#[test]
fn filters_select_in_sql_exactly_what_they_select_in_ragway() {
    let c = create_on(Backend::Postgres, own_settings("filters"));
    let mut rng = Rng(7);
    let docs: Vec<DocumentInput> = (0..60)
        .map(|i| own_doc(&format!("d{i}"), &format!("document {i}"), metadata(&mut rng), rng.vector()))
        .collect();
    let stored: Vec<(String, Value)> = docs.iter().map(|d| (d.id.clone(), d.metadata.clone().unwrap())).collect();
    c.upsert(docs, true).unwrap();
    let query = rng.vector();
    let mut nonempty = 0;
    for round in 0..300 {
        let raw = filter(&mut rng, 2);
        let f = Filter::parse(&raw).unwrap();
        let want: BTreeSet<&str> =
            stored.iter().filter(|(id, m)| f.matches(id, m)).map(|(id, _)| id.as_str()).collect();
        let req = SearchRequest {
            query: String::new(),
            vector: Some(query.clone()),
            mode: SearchMode::Dense,
            top_k: 100,
            filter: Some(f),
            ..Default::default()
        };
        let hits = c.search(&req).unwrap().results;
        let got: BTreeSet<&str> = hits.iter().map(|h| h.document_id.as_str()).collect();
        assert_eq!(got, want, "round {round}: filter {raw}");
        nonempty += usize::from(!want.is_empty() && want.len() < stored.len());
    }
    assert!(nonempty > 60, "the filters must discriminate: {nonempty} of 300 selected some but not all");
}

/// A reader never sees part of a document while a writer keeps replacing it with versions
/// of 2 and 5 chunks (both backends).
fn replacement_is_atomic(backend: Backend) {
    let c = create_on(backend, own_settings("atomic"));
    let near = vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let far: Vec<DocumentInput> = (0..20)
        .map(|i| {
            own_doc(&format!("far{i}"), "far away", json!({}), vec![-1.0, 0.1 * i as f32, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
        })
        .collect();
    c.upsert(far, true).unwrap();
    let version = |v: usize| -> DocumentInput {
        let n = if v % 2 == 0 { 2 } else { 5 };
        let chunks = (0..n)
            .map(|i| ragway_index::ChunkInput {
                text: format!("version {v} chunk {i} of {n}"),
                vector: vec![1.0, 0.01 * i as f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            })
            .collect();
        DocumentInput { id: "doc".into(), chunks: Some(chunks), metadata: Some(json!({"v": v})), ..Default::default() }
    };
    c.upsert(vec![version(0)], true).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for v in 1..60 {
                c.upsert(vec![version(v)], true).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut reads = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || reads < 20 {
            let req =
                SearchRequest { vector: Some(near.clone()), mode: SearchMode::Dense, top_k: 10, ..Default::default() };
            let hits = c.search(&req).unwrap().results;
            let mine: Vec<&str> = hits.iter().filter(|h| h.document_id == "doc").map(|h| h.text.as_str()).collect();
            let versions: BTreeSet<&str> = mine.iter().map(|t| t.split(" chunk").next().unwrap()).collect();
            assert_eq!(versions.len(), 1, "one version at a time: {mine:?}");
            let n: usize = mine[0].rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(mine.len(), n, "all chunks of the version: {mine:?}");
            reads += 1;
        }
    });
}

#[test]
fn replacing_a_document_is_atomic_for_searches() {
    replacement_is_atomic(Backend::Embedded);
}

#[test]
fn replacing_a_document_is_atomic_for_searches_on_postgres() {
    replacement_is_atomic(Backend::Postgres);
}

#[test]
fn the_database_down_is_unavailable_then_recovers_without_a_restart() {
    let c = create_on(Backend::Postgres, own_settings("restart"));
    let pg = c.pg.as_ref().unwrap();
    c.upsert(vec![own_doc("a", "alpha", json!({}), vec![1.0; 8])], true).unwrap();
    let req = SearchRequest { vector: Some(vec![1.0; 8]), mode: SearchMode::Dense, top_k: 1, ..Default::default() };
    assert_eq!(c.search(&req).unwrap().results.len(), 1);

    pg.stop();
    match c.search(&req) {
        Err(IndexError::Unavailable(why)) => assert!(why.contains("PostgreSQL"), "{why}"),
        other => panic!("a search with the database down: {other:?}"),
    }
    match c.upsert(vec![own_doc("b", "beta", json!({}), vec![0.5; 8])], true) {
        Err(IndexError::Unavailable(_)) => {}
        other => panic!("a write with the database down: {other:?}"),
    }

    // Back up (after an immediate stop: crash recovery): the acknowledged write is there and
    // the same collection works again.
    pg.start_again();
    let hits = c.search(&req).unwrap().results;
    assert_eq!(hits[0].document_id, "a");
    c.upsert(vec![own_doc("b", "beta", json!({}), vec![0.5; 8])], true).unwrap();
    assert_eq!(c.info().documents, 2);
    assert_eq!(c.info().storage, "postgres");
}

#[test]
fn bad_addresses_and_refused_logins_are_clear_start_up_errors() {
    let pg = PgServer::start();
    let message = |url: String| match PgDatabase::connect(&PgOptions::new(url)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected"),
    };
    let m = message(format!("postgres://nobody@127.0.0.1:{}/postgres", pg.port));
    assert!(m.contains("28000") && m.contains("nobody"), "{m}");
    let m = message(format!("postgres://postgres@127.0.0.1:{}/nowhere", pg.port));
    assert!(m.contains("3D000") && m.contains("nowhere"), "{m}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let m = message(format!("postgres://postgres@127.0.0.1:{closed}/postgres"));
    assert!(m.contains(&format!("127.0.0.1:{closed}")), "{m}");
    match PgDatabase::connect(&PgOptions::new("not a url at all ://")) {
        Err(IndexError::InvalidRequest { param, .. }) => assert_eq!(param.as_deref(), Some("postgres_url")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_collection_of_a_newer_schema_is_refused_with_a_clear_error() {
    let pg = PgServer::start();
    let db = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    PgStore::create(db.clone(), own_settings("newer")).unwrap();
    assert!(matches!(PgStore::create(db.clone(), own_settings("newer")), Err(IndexError::CollectionExists(_))));
    // Graph settings beyond pgvector's bounds are a clear invalid request, before any DDL.
    let mut wide = own_settings("wide");
    wide.hnsw.ef_construction = 5000;
    match PgStore::create(db.clone(), wide) {
        Err(e @ IndexError::InvalidRequest { .. }) => assert!(e.to_string().contains("pgvector's limits"), "{e}"),
        other => panic!("created with ef_construction 5000: {:?}", other.map(|_| ())),
    }
    assert!(matches!(PgStore::open(db.clone(), "wide"), Err(IndexError::CollectionNotFound(_))));
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    client.execute("UPDATE ragway_collections SET schema_version = 99 WHERE name = 'newer'", &[]).unwrap();
    match PgStore::open(db.clone(), "newer") {
        Err(e) => assert!(e.to_string().contains("schema version 99"), "{e}"),
        Ok(_) => panic!("opened a newer schema"),
    }
    PgStore::drop_collection(&db, "newer").unwrap();
    assert!(matches!(PgStore::open(db, "newer"), Err(IndexError::CollectionNotFound(_))));
}

#[test]
fn collections_in_postgres_are_served_by_the_index_service_across_restarts() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let options = || ragway_index::ServiceOptions {
        commit_interval: std::time::Duration::from_millis(100),
        ingest_root: None,
        snapshot_root: dir.path().join("snapshots"),
        drift: Default::default(),
        postgres: Some(PgOptions::new(pg.url())),
    };
    let create = |name: &str| ragway_index::CreateCollection {
        name: name.into(),
        model: Some(None),
        dimension: Some(8),
        ..Default::default()
    };
    {
        let service =
            ragway_index::IndexService::open(dir.path(), vec![embedder()], "all-MiniLM-L6-v2", options()).unwrap();
        let c = service.create(create("kept")).unwrap();
        assert_eq!(c.info().storage, "postgres");
        c.upsert(vec![own_doc("a", "alpha", json!({"k": 1}), vec![1.0; 8])], true).unwrap();
        c.upsert(vec![own_doc("a", "alpha again", json!({"k": 1}), vec![1.0; 8])], true).unwrap();
        c.compact().unwrap();
        service.create(create("dropped")).unwrap();
        service.delete("dropped").unwrap();
        assert!(service.snapshot("kept", "snap").is_err(), "PostgreSQL collections are backed up by the database");
        service.check_storage().unwrap();
    }
    let service =
        ragway_index::IndexService::open(dir.path(), vec![embedder()], "all-MiniLM-L6-v2", options()).unwrap();
    let names: Vec<String> = service.list().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(names, vec!["kept"]);
    let c: std::sync::Arc<Collection> = service.get("kept").unwrap();
    assert_eq!(c.get("a").unwrap().metadata["k"], 1);
    pg.stop();
    assert!(matches!(service.check_storage(), Err(IndexError::Unavailable(_))));
}

/// Several writers replace the same documents at once, each version with its own number
/// of chunks: every document ends whole, as one writer's version.
fn concurrent_writers_leave_documents_whole(backend: Backend) {
    let tc = create_on(backend, own_settings("writers"));
    let c = &tc.c;
    std::thread::scope(|scope| {
        for w in 0..4u64 {
            scope.spawn(move || {
                let mut rng = Rng(100 + w);
                for round in 0..15 {
                    let docs: Vec<DocumentInput> = (0..12)
                        .map(|d| {
                            let parts = 1 + rng.below(3) as usize;
                            DocumentInput {
                                id: format!("d{d}"),
                                chunks: Some(
                                    (0..parts)
                                        .map(|p| ragway_index::ChunkInput {
                                            text: format!("writer {w} round {round} part {p} of {parts}"),
                                            vector: rng.vector(),
                                        })
                                        .collect(),
                                ),
                                ..Default::default()
                            }
                        })
                        .collect();
                    c.upsert(docs, false).unwrap();
                }
            });
        }
    });
    c.commit().unwrap();
    assert_eq!(c.info().documents, 12);
    let mut chunks = 0;
    for d in 0..12 {
        let doc = c.get(&format!("d{d}")).unwrap();
        let texts: Vec<String> = doc
            .chunks
            .iter()
            .map(|ch| {
                doc.text.chars().skip(ch.char_start as usize).take((ch.char_end - ch.char_start) as usize).collect()
            })
            .collect();
        let (version, parts) = texts[0].split_once(" part ").unwrap();
        let parts: usize = parts.split(" of ").nth(1).unwrap().parse().unwrap();
        assert_eq!(texts.len(), parts, "d{d}: {texts:?}");
        assert!(texts.iter().all(|t| t.starts_with(version)), "d{d} mixes versions: {texts:?}");
        chunks += parts;
    }
    assert_eq!(c.info().chunks, chunks);
}

#[test]
fn concurrent_writers_of_the_same_documents_leave_each_whole() {
    concurrent_writers_leave_documents_whole(Backend::Embedded);
}

#[test]
fn concurrent_writers_of_the_same_documents_leave_each_whole_on_postgres() {
    concurrent_writers_leave_documents_whole(Backend::Postgres);
}

#[test]
fn a_collection_of_schema_version_1_is_migrated_when_opened_through_every_version() {
    let pg = PgServer::start();
    let db = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let store = PgStore::create(db.clone(), own_settings("old")).unwrap();
    let c = Collection::with_store(dir.path(), own_settings("old"), None, Box::new(store));
    let docs: Vec<DocumentInput> = (0..40)
        .map(|i| own_doc(&format!("d{i}"), &format!("old document {i}"), json!({"i": i}), rng.vector()))
        .collect();
    c.upsert(docs, true).unwrap();
    let scores = keyword_scores(&c, "old document 31", 0.0, None);
    drop(c);
    // The tables as version 1 made them.
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let prefix: String =
        client.query_one("SELECT prefix FROM ragway_collections WHERE name = 'old'", &[]).unwrap().get(0);
    let layout = |client: &mut postgres::Client| -> (i32, Option<Vec<String>>, Vec<(String, String)>, i64) {
        let version =
            client.query_one("SELECT schema_version FROM ragway_collections WHERE name = 'old'", &[]).unwrap().get(0);
        let options = client
            .query_one(&format!("SELECT reloptions FROM pg_class WHERE relname = '{prefix}_chunks'"), &[])
            .unwrap()
            .get(0);
        let storage = client
            .query(
                &format!(
                    "SELECT attname::text, attstorage::text FROM pg_attribute
                     WHERE attrelid = '{prefix}_chunks'::regclass AND attname IN ('embedding', 'tsv') ORDER BY attname"
                ),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // The keyword half's tables (version 3) and their indexes.
        let bm25_relations = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_class WHERE relname IN
                     ('{prefix}_terms', '{prefix}_stats', '{prefix}_terms_lexeme', '{prefix}_terms_key')"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        (version, options, storage, bm25_relations)
    };
    let current = layout(&mut client);
    assert_eq!(current.0, ragway_index::postgres::SCHEMA_VERSION);
    client
        .batch_execute(&format!(
            "ALTER TABLE {prefix}_chunks RESET (toast_tuple_target);
             ALTER TABLE {prefix}_chunks ALTER COLUMN embedding SET STORAGE EXTERNAL, ALTER COLUMN tsv SET STORAGE EXTENDED;
             DROP TABLE {prefix}_terms, {prefix}_stats;
             UPDATE ragway_collections SET schema_version = 1 WHERE name = 'old';"
        ))
        .unwrap();
    assert_eq!(layout(&mut client), (1, None, vec![("embedding".into(), "e".into()), ("tsv".into(), "x".into())], 0));
    assert_eq!(current.3, 4);
    // Opened by this ragway: migrated, with what it held.
    let store = PgStore::open(db.clone(), "old").unwrap();
    assert_eq!(layout(&mut client), current);
    assert_eq!(current.1, Some(vec!["toast_tuple_target=8160".to_string()]));
    let c = Collection::with_store(dir.path(), own_settings("old"), None, Box::new(store));
    assert_eq!(c.info().documents, 40);
    assert_eq!(c.get("d7").unwrap().metadata["i"], 7);
    // BM25's postings and counts built from the chunks: the same scores as before.
    assert_eq!(scores.len(), 40);
    assert_eq!(scores.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0, "d31");
    assert_scores(&keyword_scores(&c, "old document 31", 0.0, None), &scores, "after the migration");
    // Opening again changes nothing.
    PgStore::open(db.clone(), "old").unwrap();
    assert_eq!(layout(&mut client), current);
    // Wider vectors than pgvector's HNSW index takes are refused up front.
    let wide = CollectionSettings { dimension: 2001, ..own_settings("wide") };
    assert!(matches!(PgStore::create(db, wide), Err(IndexError::InvalidRequest { .. })));
}

#[test]
fn two_servers_on_one_database_see_each_others_collections() {
    let pg = PgServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let options = |dir: &std::path::Path| ragway_index::ServiceOptions {
        commit_interval: std::time::Duration::from_millis(100),
        ingest_root: None,
        snapshot_root: dir.join("snapshots"),
        drift: Default::default(),
        postgres: Some(PgOptions::new(pg.url())),
    };
    let open = |dir: &std::path::Path| {
        ragway_index::IndexService::open(dir, vec![embedder()], "all-MiniLM-L6-v2", options(dir)).unwrap()
    };
    let (a, b) = (open(dir_a.path()), open(dir_b.path()));
    assert!(b.list().is_empty());
    let create = ragway_index::CreateCollection {
        name: "shared".into(),
        model: Some(None),
        dimension: Some(8),
        ..Default::default()
    };
    let c = a.create(create.clone()).unwrap();
    c.upsert(vec![own_doc("x", "written by a", json!({}), vec![1.0; 8])], true).unwrap();
    // `b` finds it on first use, without a restart, and sees `a`'s writes.
    let seen = b.get("shared").unwrap();
    assert_eq!(seen.get("x").unwrap().text, "written by a");
    seen.upsert(vec![own_doc("y", "written by b", json!({}), vec![0.5; 8])], true).unwrap();
    assert_eq!(c.info().documents, 2);
    assert!(matches!(b.create(create), Err(IndexError::CollectionExists(_))));
    // Dropped by `a`: `b`'s searches say so at once, and `b` stops serving it once it
    // reads the catalog again.
    a.delete("shared").unwrap();
    let search = SearchRequest { vector: Some(vec![1.0; 8]), top_k: 1, mode: SearchMode::Dense, ..Default::default() };
    assert!(matches!(seen.search(&search), Err(IndexError::CollectionNotFound(_))));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(b.list().is_empty());
    assert!(matches!(b.get("shared"), Err(IndexError::CollectionNotFound(_))));
    assert!(!dir_b.path().join("collections/shared").exists(), "its drift state went with it");
}

#[test]
fn searches_on_a_read_replica_see_writes_once_replicated() {
    let pg = PgServer::start();
    let replica = pg.replica().unwrap();
    let options = PgOptions { read_urls: vec![replica.url()], ..PgOptions::new(pg.url()) };
    let db = PgDatabase::connect(&options).unwrap();
    let settings = own_settings("replicated");
    let store = PgStore::create(db, settings.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Collection::with_store(dir.path(), settings, None, Box::new(store));
    c.upsert(vec![own_doc("a", "alpha", json!({}), vec![1.0; 8])], true).unwrap();
    let req = SearchRequest { vector: Some(vec![1.0; 8]), mode: SearchMode::Dense, top_k: 5, ..Default::default() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // Until the replica has replayed the collection's tables, its searches fail.
        if let Ok(r) = c.search(&req) {
            if let [hit] = &r.results[..] {
                assert_eq!(hit.document_id, "a");
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the replica never showed the write");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Searches are the replica's: with the primary down they still answer, while writes
    // are unavailable.
    pg.stop();
    assert_eq!(c.search(&req).unwrap().results.len(), 1);
    assert!(matches!(
        c.upsert(vec![own_doc("b", "beta", json!({}), vec![0.5; 8])], true),
        Err(IndexError::Unavailable(_))
    ));
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    let out = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("the `openssl` command makes this test's certificates");
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tls_as_the_address_asks_with_the_certificate_verified_against_its_root_and_client_certificates() {
    let pg = PgServer::start();
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    // A CA, and a server certificate it signs for `db.internal` and 127.0.0.1 (not for
    // `localhost`).
    openssl(dir, "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=ragway-test-ca");
    openssl(dir, "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=db.internal");
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:db.internal,IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext",
    );
    // The test server's build has no TLS: a rustls front answers for it (see `tlsproxy`).
    let proxy = crate::tlsproxy::TlsProxy::start(pg.port, &dir.join("server.crt"), &dir.join("server.key"));
    let ca = dir.join("ca.crt").display().to_string();
    let at = |host: &str, query: &str| format!("postgres://postgres@{host}:{}/postgres?{query}", proxy.port);
    let connect = |url: String| PgDatabase::connect(&PgOptions::new(url));
    let sessions = || proxy.sessions.load(std::sync::atomic::Ordering::Relaxed);
    // Plain TCP when asked: the front sees a connection without TLS and refuses it.
    assert!(connect(at("127.0.0.1", "sslmode=disable")).is_err());
    assert_eq!((sessions(), proxy.plain.load(std::sync::atomic::Ordering::Relaxed)), (0, 1));
    // Encrypted without checks (require, and prefer: the default), and verified against the
    // CA for the name connected to.
    connect(at("127.0.0.1", "sslmode=require")).unwrap().ping().unwrap();
    connect(at("127.0.0.1", "")).unwrap().ping().unwrap();
    let db = connect(at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap();
    assert!(sessions() >= 3);
    // A certificate for another name: verify-full refuses it, verify-ca takes it.
    let wrong_name =
        connect(at("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap_err().to_string();
    assert!(wrong_name.contains("certificate not valid for name"), "{wrong_name}");
    connect(at("localhost", &format!("sslmode=verify-ca&sslrootcert={ca}"))).unwrap().ping().unwrap();
    // Not signed by a root ragway trusts.
    let unknown = connect(at("127.0.0.1", "sslmode=verify-full&sslrootcert=system")).unwrap_err().to_string();
    assert!(unknown.contains("UnknownIssuer"), "{unknown}");
    let missing = connect(at("127.0.0.1", "sslmode=verify-full")).unwrap_err().to_string();
    assert!(missing.contains("sslrootcert"), "{missing}");
    // Directly to the server (no TLS in its build): the connection says it is plain.
    assert_eq!(connect(pg.url()).unwrap().tls_version().unwrap(), None);

    // A collection's traffic over the verified connection: writes and searches larger than
    // one TLS record.
    let c = Collection::with_store(
        certs.path(),
        own_settings("over-tls"),
        None,
        Box::new(PgStore::create(db, own_settings("over-tls")).unwrap()),
    );
    let mut rng = Rng(7);
    let long = "encrypted words travel in records ".repeat(200);
    let docs: Vec<DocumentInput> =
        (0..60).map(|i| own_doc(&format!("d{i}"), &format!("{i} {long}"), json!({"i": i}), rng.vector())).collect();
    c.upsert(docs, true).unwrap();
    assert_eq!(c.info().documents, 60);
    let hits = c
        .search(&SearchRequest {
            query: "encrypted records".into(),
            top_k: 50,
            mode: SearchMode::Keyword,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(hits.results.len(), 50);
    assert!(hits.results[0].text.len() > 6000);

    // A server that asks for a client certificate signed by its CA: refused without one
    // and with one of another CA, served with `sslcert` and `sslkey`.
    openssl(dir, "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout client.key -out client.csr -subj /CN=postgres");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.ext",
    );
    openssl(dir, "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout other.key -out other.crt -days 2 -subj /CN=postgres");
    let strict = crate::tlsproxy::TlsProxy::start_with(
        pg.port,
        &dir.join("server.crt"),
        &dir.join("server.key"),
        Some(&dir.join("ca.crt")),
    );
    let at = |query: &str| {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={ca}{query}", strict.port)
    };
    let file = |name: &str| dir.join(name).display().to_string();
    let none = connect(at("")).unwrap_err().to_string();
    assert!(none.contains("CertificateRequired"), "no client certificate: {none}");
    let other = format!("&sslcert={}&sslkey={}", file("other.crt"), file("other.key"));
    let refused = connect(at(&other)).unwrap_err().to_string();
    assert!(refused.contains("alert"), "a client certificate of another CA: {refused}");
    let mine = format!("&sslcert={}&sslkey={}", file("client.crt"), file("client.key"));
    connect(at(&mine)).unwrap().ping().unwrap();
    let half = connect(at(&format!("&sslcert={}", file("client.crt")))).unwrap_err().to_string();
    assert!(half.contains("come together"), "{half}");
    let wrong_key = connect(at(&format!("&sslcert={}&sslkey={}", file("client.crt"), file("ca.crt")))).unwrap_err();
    assert!(wrong_key.to_string().contains("sslkey"), "{wrong_key}");
    let mismatch = connect(at(&format!("&sslcert={}&sslkey={}", file("client.crt"), file("other.key")))).unwrap_err();
    assert!(mismatch.to_string().contains("KeyMismatch"), "a key of another certificate: {mismatch}");
}

/// The OID of the (one) collection's index whose name ends in `suffix` and whether it is
/// valid; `None` when there is none.
fn index_named(client: &mut postgres::Client, suffix: &str) -> Option<(u32, bool)> {
    client
        .query_opt(
            "SELECT i.indexrelid::oid, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE right(c.relname, length($1)) = $1",
            &[&suffix],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

/// The collection's HNSW index (OID, valid).
fn dense_index(client: &mut postgres::Client) -> Option<(u32, bool)> {
    index_named(client, "_hnsw")
}

/// The postings' index by lexeme (OID, valid), which bulk loads build at their end too.
fn lexeme_index(client: &mut postgres::Client) -> Option<(u32, bool)> {
    index_named(client, "_terms_lexeme")
}

/// The document the keyword search for `query` ranks first.
fn keyword_first(c: &Collection, query: &str) -> String {
    let req = SearchRequest { query: query.into(), mode: SearchMode::Keyword, top_k: 3, ..Default::default() };
    c.search(&req).unwrap().results[0].document_id.clone()
}

/// Cosine similarity of two vectors.
fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The `k` documents nearest to `q` by exact cosine, best first.
fn exact_top(docs: &[(String, Vec<f32>)], q: &[f32], k: usize) -> Vec<String> {
    let mut scored: Vec<(f32, &String)> = docs.iter().map(|(id, v)| (cosine(v, q), id)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, id)| id.clone()).collect()
}

fn dense_top(c: &Collection, q: &[f32], k: usize) -> Vec<String> {
    let request = SearchRequest { vector: Some(q.to_vec()), top_k: k, mode: SearchMode::Dense, ..Default::default() };
    c.search(&request).unwrap().results.into_iter().map(|r| r.document_id).collect()
}

/// Recall@k of the collection's dense search against exact search over `queries`.
fn dense_recall(c: &Collection, docs: &[(String, Vec<f32>)], queries: &[Vec<f32>], k: usize) -> f64 {
    let found: usize = queries
        .iter()
        .map(|q| {
            let truth = exact_top(docs, q, k);
            dense_top(c, q, k).iter().filter(|id| truth.contains(id)).count()
        })
        .sum();
    found as f64 / (queries.len() * k) as f64
}

/// Own-vector documents `{prefix}0..` with their vectors, written as JSONL to `path`.
fn own_vector_file(path: &std::path::Path, prefix: &str, n: usize, rng: &mut Rng) -> Vec<(String, Vec<f32>)> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let docs: Vec<(String, Vec<f32>)> = (0..n).map(|i| (format!("{prefix}{i}"), rng.vector())).collect();
    for (id, v) in &docs {
        writeln!(f, "{}", json!({"id": id, "text": format!("record {id}"), "vector": v})).unwrap();
    }
    docs
}

fn run_job(c: &std::sync::Arc<Collection>, path: &std::path::Path) -> ragway_index::jobs::JobView {
    use ragway_index::jobs::JobState;
    let registry = ragway_index::jobs::JobRegistry::default();
    let job = registry
        .submit(c.clone(), ragway_index::ingest::Source::Jsonl(path.to_path_buf()), Default::default(), None)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while matches!(job.state(), JobState::Queued | JobState::Running) {
        assert!(std::time::Instant::now() < deadline, "job did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    job.view()
}

#[test]
fn an_ingestion_into_an_empty_collection_builds_its_indexes_once_at_the_end() {
    let pg = PgServer::start();
    let db = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let store = PgStore::create(db, own_settings("bulk")).unwrap();
    let c = std::sync::Arc::new(Collection::with_store(dir.path(), own_settings("bulk"), None, Box::new(store)));
    let (created, valid) = dense_index(&mut client).expect("created with its index");
    assert!(valid);
    let (lexemes_created, valid) = lexeme_index(&mut client).expect("created with the postings' index");
    assert!(valid);
    let mut rng = Rng(23);
    let mut docs = own_vector_file(&dir.path().join("first.jsonl"), "a", 3000, &mut rng);
    let view = run_job(&c, &dir.path().join("first.jsonl"));
    assert_eq!(view.state, ragway_index::jobs::JobState::Done, "{view:?}");
    assert_eq!(view.progress.documents_written, 3000);
    assert!(!view.progress.indexing, "{view:?}");
    // The empty collection was loaded without its indexes, built again at the end.
    let (built, valid) = dense_index(&mut client).expect("the index is built by the job's end");
    assert!(valid);
    assert_ne!(built, created, "the index was kept and maintained row by row");
    let (lexemes, valid) = lexeme_index(&mut client).expect("the postings' index is built by the job's end");
    assert!(valid);
    assert_ne!(lexemes, lexemes_created, "the postings' index was kept and maintained row by row");
    // And the tables vacuumed: every page of the chunks and postings visible to all, so
    // index-only scans read no table pages, and statistics taken.
    for table in ["_chunks", "_terms"] {
        let (pages, visible, tuples): (i32, i32, f32) = client
            .query_one(
                "SELECT relpages, relallvisible, reltuples FROM pg_class WHERE relkind = 'r' AND right(relname, length($1)) = $1",
                &[&table],
            )
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap();
        assert!(pages > 0 && visible == pages, "{table}: {visible} of {pages} pages all-visible");
        assert!(tuples >= 3000.0, "{table}: {tuples} rows in the statistics");
    }
    assert_eq!(keyword_first(&c, "record a1234"), "a1234");
    assert_eq!(c.info().state, "ready");
    let queries: Vec<Vec<f32>> = (0..20).map(|_| rng.vector()).collect();
    let recall = dense_recall(&c, &docs, &queries, 10);
    assert!(recall >= 0.95, "recall@10 {recall}");
    // A collection that holds documents keeps its index through the next load.
    docs.extend(own_vector_file(&dir.path().join("second.jsonl"), "b", 500, &mut rng));
    let view = run_job(&c, &dir.path().join("second.jsonl"));
    assert_eq!(view.state, ragway_index::jobs::JobState::Done, "{view:?}");
    assert_eq!(dense_index(&mut client), Some((built, true)));
    assert_eq!(lexeme_index(&mut client), Some((lexemes, true)));
    assert_eq!(c.info().documents, 3500);
    assert_eq!(keyword_first(&c, "record b321"), "b321");
    let recall = dense_recall(&c, &docs, &queries, 10);
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn a_bulk_load_cut_short_searches_exactly_and_upkeep_builds_the_indexes() {
    let pg = PgServer::start();
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = |db: &std::sync::Arc<PgDatabase>| {
        let store = PgStore::open(db.clone(), "cut").unwrap();
        Collection::with_store(dir.path(), own_settings("cut"), None, Box::new(store))
    };
    let db_a = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    PgStore::create(db_a.clone(), own_settings("cut")).unwrap();
    let a = open(&db_a);
    assert!(lexeme_index(&mut client).is_some());
    assert!(a.begin_bulk_load().unwrap());
    assert_eq!(dense_index(&mut client), None, "a bulk load drops the index");
    assert_eq!(lexeme_index(&mut client), None, "a bulk load drops the postings' index");
    let mut rng = Rng(5);
    let docs: Vec<(String, Vec<f32>)> = (0..1500).map(|i| (format!("d{i}"), rng.vector())).collect();
    for batch in docs.chunks(250) {
        let input = batch.iter().map(|(id, v)| own_doc(id, &format!("record {id}"), json!({}), v.clone())).collect();
        a.upsert(input, true).unwrap();
    }
    // Meanwhile searches rank by exact distances.
    assert_eq!(a.info().state, "rebuilding");
    let queries: Vec<Vec<f32>> = (0..10).map(|_| rng.vector()).collect();
    for q in &queries {
        assert_eq!(dense_top(&a, q, 10), exact_top(&docs, q, 10));
    }
    // And keyword searches scan the postings.
    assert_eq!(keyword_first(&a, "record d1234"), "d1234");
    // Another server leaves the index to the one loading: no build, no second bulk load.
    let db_b = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    let b = open(&db_b);
    b.maintain().unwrap();
    assert_eq!(dense_index(&mut client), None, "built beside a running bulk load");
    assert!(!b.begin_bulk_load().unwrap());
    // The loading server dies (its sessions close, releasing the lock); the other's upkeep
    // builds the index.
    drop(a);
    drop(db_a);
    // Upkeep tries every round until the closed session's lock is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dense_index(&mut client).is_none() {
        assert!(std::time::Instant::now() < deadline, "upkeep never built the index");
        b.maintain().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (_, valid) = dense_index(&mut client).unwrap();
    assert!(valid);
    // Both, before the state says ready.
    assert!(lexeme_index(&mut client).is_some_and(|l| l.1));
    assert_eq!(b.info().state, "ready");
    assert!(dense_recall(&b, &docs, &queries, 10) >= 0.95);
    assert_eq!(keyword_first(&b, "record d77"), "d77");
    // An index a failed concurrent build left invalid is built again (by a server opening
    // the collection afresh, whose upkeep checks at once), each alone.
    let invalidated_is_rebuilt =
        |client: &mut postgres::Client, index: fn(&mut postgres::Client) -> Option<(u32, bool)>| {
            let (before, _) = index(client).unwrap();
            client.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1", &[&before]).unwrap();
            let c = open(&db_b);
            assert_eq!(c.info().state, "rebuilding");
            c.maintain().unwrap();
            let (after, valid) = index(client).unwrap();
            assert!(valid && after != before, "{after} {before}");
            assert_eq!(c.info().state, "ready");
            c
        };
    invalidated_is_rebuilt(&mut client, dense_index);
    let rebuilt = dense_index(&mut client);
    let c = invalidated_is_rebuilt(&mut client, lexeme_index);
    assert_eq!(dense_index(&mut client), rebuilt, "the valid HNSW index is kept");
    assert_eq!(keyword_first(&c, "record d5"), "d5");
}

/// Words that PostgreSQL's and tantivy's English stemmers keep apart and neither drops, so
/// that a word is a lexeme and BM25 can be computed here by counting words.
const WORDS: [&str; 10] =
    ["zebra", "quartz", "violet", "harbor", "maple", "cobalt", "falcon", "nickel", "orchid", "saturn"];

/// `least` to `least + spread - 1` words.
fn words(rng: &mut Rng, least: u64, spread: u64) -> String {
    let n = least + rng.below(spread);
    (0..n).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
}

/// BM25 with tantivy's parameters of each document for `query`, over the text field (title
/// and text) plus `boost` times the title field's own; documents matching no word left out.
fn bm25(docs: &[(String, Option<String>, String)], query: &str, boost: f32) -> Vec<(String, f64)> {
    let (k1, b) = (1.2, 0.75);
    let field = |d: &(String, Option<String>, String), title_only: bool| -> Vec<String> {
        let mut w: Vec<String> = d.1.iter().flat_map(|t| t.split(' ').map(String::from)).collect();
        if !title_only {
            w.extend(d.2.split(' ').map(String::from));
        }
        w
    };
    let n = docs.len() as f64;
    let part = |title_only: bool, term: &str, d: &(String, Option<String>, String)| -> f64 {
        let avg = docs.iter().map(|d| field(d, title_only).len() as f64).sum::<f64>() / n;
        let df = docs.iter().filter(|d| field(d, title_only).iter().any(|w| w == term)).count() as f64;
        let words = field(d, title_only);
        let tf = words.iter().filter(|w| *w == term).count() as f64;
        if tf == 0.0 {
            return 0.0;
        }
        let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
        idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * words.len() as f64 / avg))
    };
    docs.iter()
        .filter(|d| query.split(' ').any(|t| field(d, false).iter().any(|w| w == t)))
        .map(|d| {
            let s = query.split(' ').map(|t| part(false, t, d) + boost as f64 * part(true, t, d)).sum();
            (d.0.clone(), s)
        })
        .collect()
}

fn keyword_scores(c: &Collection, query: &str, boost: f32, filter: Option<Value>) -> Vec<(String, f64)> {
    let req = SearchRequest {
        query: query.into(),
        mode: SearchMode::Keyword,
        top_k: 100,
        title_boost: Some(boost),
        filter: filter.map(|f| Filter::parse(&f).unwrap()),
        ..Default::default()
    };
    let mut hits: Vec<(String, f64)> = c
        .search(&req)
        .unwrap()
        .results
        .into_iter()
        .map(|h| (h.document_id, h.keyword.expect("a keyword hit").score as f64))
        .collect();
    hits.sort_by(|a, b| a.0.cmp(&b.0));
    hits
}

fn assert_scores(got: &[(String, f64)], want: &[(String, f64)], what: &str) {
    let mut want = want.to_vec();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let ids = |v: &[(String, f64)]| v.iter().map(|h| h.0.clone()).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(&want), "{what}: the matching documents");
    for ((id, g), (_, w)) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{what}: `{id}` scores {g}, BM25 {w}");
    }
}

/// The keyword half on PostgreSQL is BM25 with tantivy's parameters, as on the embedded
/// store: the scores of both equal BM25 computed here, with and without a title boost and
/// under a filter (document frequencies over the whole collection), and the postings and
/// counts PostgreSQL keeps stay exact through replacements, deletes and deletes by filter.
#[test]
fn keyword_search_is_bm25_on_both_stores_and_stays_exact_through_writes() {
    let pg = PgServer::start();
    let db = PgDatabase::connect(&PgOptions::new(pg.url())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let on_pg = |name: &str| {
        let store = PgStore::create(db.clone(), own_settings(name)).unwrap();
        Collection::with_store(&dir.path().join(name), own_settings(name), None, Box::new(store))
    };
    let mut rng = Rng(21);
    let doc = |rng: &mut Rng, i: usize| {
        let title = (rng.below(3) > 0).then(|| words(rng, 1, 3));
        (format!("d{i}"), title, words(rng, 2, 12))
    };
    let input = |d: &(String, Option<String>, String), rng: &mut Rng| DocumentInput {
        title: d.1.clone(),
        ..own_doc(&d.0, &d.2, json!({"group": d.0[1..].parse::<u64>().unwrap() % 5}), rng.vector())
    };
    // A history of writes on one collection.
    let history = on_pg("history");
    let mut live: std::collections::BTreeMap<String, (String, Option<String>, String)> = Default::default();
    let first: Vec<_> = (0..60).map(|i| doc(&mut rng, i)).collect();
    history.upsert(first.iter().map(|d| input(d, &mut rng)).collect(), true).unwrap();
    live.extend(first.into_iter().map(|d| (d.0.clone(), d)));
    let replaced: Vec<_> = (0..60).step_by(4).map(|i| doc(&mut rng, i)).collect();
    history.upsert(replaced.iter().map(|d| input(d, &mut rng)).collect(), true).unwrap();
    live.extend(replaced.into_iter().map(|d| (d.0.clone(), d)));
    let gone: Vec<String> = (1..60).step_by(7).map(|i| format!("d{i}")).collect();
    history.delete(&gone, true).unwrap();
    live.retain(|id, _| !gone.contains(id));
    history.delete_where(&Filter::parse(&json!({"key": "group", "eq": 3})).unwrap(), true).unwrap();
    live.retain(|id, _| id[1..].parse::<u64>().unwrap() % 5 != 3);
    let docs: Vec<_> = live.into_values().collect();
    assert_eq!(history.info().documents, docs.len());
    // The same documents written once, in PostgreSQL and in the embedded store.
    let fresh = on_pg("fresh");
    fresh.upsert(docs.iter().map(|d| input(d, &mut rng)).collect(), true).unwrap();
    let embedded = create_on(Backend::Embedded, own_settings("embedded"));
    embedded.upsert(docs.iter().map(|d| input(d, &mut rng)).collect(), true).unwrap();
    let mut checked = 0;
    for round in 0..12 {
        // Some queries repeat a word: BM25 counts it again, on both stores.
        let query = words(&mut rng, 1, 3);
        for boost in [0.0, 1.5] {
            let want = bm25(&docs, &query, boost);
            let what = format!("round {round}, `{query}`, title boost {boost}");
            assert_scores(&keyword_scores(&history, &query, boost, None), &want, &format!("{what}, after the writes"));
            assert_scores(&keyword_scores(&fresh, &query, boost, None), &want, &format!("{what}, written once"));
            assert_scores(&keyword_scores(&embedded, &query, boost, None), &want, &format!("{what}, embedded"));
            let group = json!({"key": "group", "in": [0, 1]});
            let filtered: Vec<_> =
                want.iter().filter(|(id, _)| id[1..].parse::<u64>().unwrap() % 5 < 2).cloned().collect();
            assert_scores(
                &keyword_scores(&history, &query, boost, Some(group)),
                &filtered,
                &format!("{what}, filtered"),
            );
            checked += want.len();
        }
    }
    assert!(checked > 200, "the queries must match documents: {checked} scores checked");
}
