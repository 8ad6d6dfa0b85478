//! Shared server state: settings and the model handles, filled in as models finish loading.

use crate::service::auth::KeyStore;
use crate::config::Settings;
use crate::telemetry::{RagMetrics, RequestMetrics};
use ragway_engine::embed::worker::EmbedHandle;
use ragway_engine::generate::GenerateHandle;
use ragway_index::IndexService;
use ragway_prompts::rag::Pipeline;
use ragway_prompts::Registry;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// State shared by every request.
pub struct AppState {
    pub settings: Settings,
    /// The embedding model, once loaded.
    pub embedder: OnceLock<EmbedHandle>,
    /// The generation model, once loaded.
    pub generator: OnceLock<GenerateHandle>,
    /// The vector store, once its collections are open (after the embedding model).
    pub index: OnceLock<Arc<IndexService>>,
    /// Unix time the server started (the `created` of served models).
    pub started_unix: u64,
    /// API keys (empty: authentication off).
    pub keys: KeyStore,
    /// Request counts, durations and rejections.
    pub requests: RequestMetrics,
    /// Prompt templates: built-in, from the prompts directories, and created through the API.
    pub prompts: Arc<Registry>,
    /// RAG answers by template version, grounding scores, flags.
    pub rag_metrics: RagMetrics,
    /// Evaluation runs started over the API.
    pub evals: crate::service::evals::EvalRuns,
    /// Public model names, their versions and routing.
    pub registry: Arc<crate::models::ModelRegistry>,
    /// Open WebSocket connections and subscriptions per key.
    pub streams: Arc<crate::service::limits::StreamLimits>,
}

impl AppState {
    pub fn new(settings: Settings, keys: KeyStore, prompts: Arc<Registry>, registry: Arc<crate::models::ModelRegistry>) -> Self {
        let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self {
            embedder: OnceLock::new(),
            generator: OnceLock::new(),
            index: OnceLock::new(),
            started_unix,
            keys,
            requests: RequestMetrics::default(),
            prompts,
            rag_metrics: RagMetrics::default(),
            evals: crate::service::evals::EvalRuns::new(
                settings.data_dir.join("evals").join("runs"),
                settings.ingest_root.clone(),
            ),
            registry,
            streams: crate::service::limits::StreamLimits::new(
                settings.ws_max_connections_per_key.max(1),
                settings.ws_max_subscriptions_per_key.max(1),
            ),
            settings,
        }
    }

    /// True once every configured model is loaded.
    pub fn is_ready(&self) -> bool {
        self.embedder.get().is_some() && self.generator.get().is_some() && self.index.get().is_some()
    }
}

impl AppState {
    /// The RAG pipeline over the index (once open) and the template registry.
    pub fn rag(&self) -> Option<Pipeline> {
        let index = self.index.get()?.clone();
        Some(Pipeline::new(index, self.prompts.clone(), self.settings.rag.clone()))
    }
}
