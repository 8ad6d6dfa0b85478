//! Collections, documents, search and ingestion jobs: the typed operations both REST and
//! GraphQL call. Index work runs on the service layer's bounded blocking pool; errors map
//! through `ServiceError: From<IndexError>`.

use crate::app::AppState;
use crate::service::error::ServiceError;
use ragway_index::fusion::FusionParams;
use ragway_index::ingest::{IngestOptions, OnError, Source};
use ragway_index::{CollectionInfo, CreateCollection, DocumentInput, DocumentView, Filter, IndexService, SearchMode, SearchRequest, WriteResult};
use serde::Deserialize;
use std::sync::Arc;

pub fn index(state: &AppState) -> Result<Arc<IndexService>, ServiceError> {
    state.index.get().cloned().ok_or_else(|| ServiceError::not_ready("the index"))
}

/// Runs blocking index work off the async workers (on the service layer's bounded pool).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ragway_index::IndexError> + Send + 'static,
) -> Result<T, ServiceError> {
    crate::service::limits::blocking(move || f().map_err(ServiceError::from)).await
}

/// Creates a collection.
pub async fn create(state: &AppState, create: CreateCollection) -> Result<CollectionInfo, ServiceError> {
    let index = index(state)?;
    blocking(move || index.create(create).map(|c| c.info())).await
}

/// Every collection.
pub async fn list(state: &AppState) -> Result<Vec<CollectionInfo>, ServiceError> {
    let index = index(state)?;
    blocking(move || Ok(index.list().iter().map(|c| c.info()).collect())).await
}

/// One collection's info.
pub async fn describe(state: &AppState, name: String) -> Result<CollectionInfo, ServiceError> {
    let index = index(state)?;
    blocking(move || index.get(&name).map(|c| c.info())).await
}

/// Deletes a collection and its files.
pub async fn delete_collection(state: &AppState, name: String) -> Result<(), ServiceError> {
    let index = index(state)?;
    blocking(move || index.delete(&name)).await
}

/// One document and its chunks.
pub async fn document(state: &AppState, name: String, id: String) -> Result<DocumentView, ServiceError> {
    let index = index(state)?;
    blocking(move || index.get(&name)?.get(&id)).await
}

/// Deletes one document; a missing one is an error.
pub async fn delete_document(state: &AppState, name: String, id: String) -> Result<WriteResult, ServiceError> {
    let index = index(state)?;
    blocking(move || {
        let c = index.get(&name)?;
        let r = c.delete(std::slice::from_ref(&id), true)?;
        if r.deleted == 0 {
            return Err(ragway_index::IndexError::DocumentNotFound { collection: name, id });
        }
        Ok(r)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct UpsertBody {
    pub documents: Vec<DocumentInput>,
    /// Answer once the documents are searchable (default); `false`: once durable.
    #[serde(default)]
    pub wait: Option<bool>,
}

/// Batch upsert: answered when the write is durable (and, by default, searchable).
pub async fn upsert(state: &AppState, name: String, body: UpsertBody) -> Result<WriteResult, ServiceError> {
    let index = index(state)?;
    if body.documents.is_empty() {
        return Err(ServiceError::invalid("documents", "`documents` must not be empty"));
    }
    let wait = body.wait.unwrap_or(true);
    blocking(move || index.get(&name)?.upsert(body.documents, wait)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct DeleteBody {
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    #[serde(default)]
    pub filter: Option<serde_json::Value>,
}

/// Delete by ids and/or by metadata filter.
pub async fn delete(state: &AppState, name: String, body: DeleteBody) -> Result<WriteResult, ServiceError> {
    let index = index(state)?;
    let filter = body.filter.as_ref().map(Filter::parse).transpose()?;
    if body.ids.is_none() && filter.is_none() {
        return Err(ServiceError::invalid("ids", "give `ids`, `filter` or both"));
    }
    blocking(move || {
        let c = index.get(&name)?;
        let mut total = WriteResult::default();
        if let Some(ids) = body.ids {
            total.deleted += c.delete(&ids, true)?.deleted;
        }
        if let Some(f) = filter {
            total.deleted += c.delete_where(&f, true)?.deleted;
        }
        Ok(total)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct SearchBody {
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub mode: Option<SearchMode>,
    #[serde(default)]
    pub filter: Option<serde_json::Value>,
    #[serde(default)]
    pub ef: Option<usize>,
    #[serde(default)]
    pub fusion: Option<FusionParams>,
    #[serde(default)]
    pub candidates: Option<usize>,
    #[serde(default)]
    pub group_by_document: bool,
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    #[serde(default)]
    pub title_boost: Option<f32>,
}

/// Validates and runs a search on the blocking pool.
pub async fn search(
    state: &AppState,
    name: String,
    b: SearchBody,
) -> Result<ragway_index::SearchResponse, ServiceError> {
    let index = index(state)?;
    // Sizes are checked by the index itself (`Collection::search`), for every caller.
    let req = SearchRequest {
        query: b.query,
        top_k: b.top_k.unwrap_or(10),
        mode: b.mode.unwrap_or_default(),
        filter: b.filter.as_ref().map(Filter::parse).transpose()?,
        ef: b.ef,
        fusion: b.fusion,
        candidates: b.candidates,
        group_by_document: b.group_by_document,
        vector: b.vector,
        exact_scan_max: None,
        title_boost: b.title_boost,
        skip_drift: false,
    };
    blocking(move || index.get(&name)?.search(&req)).await
}

/// Starts a job over a file or directory under the server's ingest root.
pub fn start_path_ingest(
    state: &AppState,
    collection: &str,
    path: &str,
    on_error: OnError,
) -> Result<Arc<ragway_index::jobs::Job>, ServiceError> {
    let index = index(state)?;
    let collection = index.get(collection)?;
    let source = Source::from_path(&index.ingest_path(path)?);
    Ok(index.jobs().submit(collection, source, IngestOptions { on_error, ..Default::default() }, None)?)
}


#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct IngestPathBody {
    pub path: String,
    #[serde(default)]
    pub on_error: Option<OnError>,
}

/// Where a snapshot was written (relative to `<data-dir>/snapshots`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SnapshotWritten {
    /// Always `snapshot`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub path: String,
}

/// Writes a snapshot of the collection to `<data-dir>/snapshots/<path>`.
pub async fn snapshot(state: &AppState, name: String, path: String) -> Result<SnapshotWritten, ServiceError> {
    let index = index(state)?;
    let shown = path.clone();
    blocking(move || index.snapshot(&name, &path)).await?;
    Ok(SnapshotWritten { object: "snapshot", path: shown })
}

/// Creates collection `name` from a snapshot under `<data-dir>/snapshots`.
pub async fn restore(state: &AppState, name: String, path: String) -> Result<CollectionInfo, ServiceError> {
    let index = index(state)?;
    blocking(move || index.restore(&name, &path).map(|c| c.info())).await
}

/// Rebuilds the graph without deleted points and compacts the log now.
pub async fn compact(state: &AppState, name: String) -> Result<CollectionInfo, ServiceError> {
    let index = index(state)?;
    blocking(move || {
        let c = index.get(&name)?;
        c.compact()?;
        Ok(c.info())
    })
    .await
}
