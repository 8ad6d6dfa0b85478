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
