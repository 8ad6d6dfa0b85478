//! Collections, documents, search, ingestion jobs and snapshots (`/v1/collections/...`,
//! `/v1/jobs/...`). Thin: parse, validate the shape, run the index service on the blocking
//! pool, answer. Errors map through `ServiceError: From<IndexError>`.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::http::StatusCode;
use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use futures::StreamExt;
use ragway_index::fusion::FusionParams;
use ragway_index::ingest::{IngestOptions, OnError, Source};
use ragway_index::{CreateCollection, DocumentInput, Filter, IndexService, SearchMode, SearchRequest};
use serde::Deserialize;
use serde_json::json;
use std::io::Write;
use std::sync::Arc;

/// Largest `top_k` of a search.
const MAX_TOP_K: usize = 1000;

pub(crate) fn index(state: &AppState) -> Result<Arc<IndexService>, ServiceError> {
    state.index.get().cloned().ok_or_else(|| ServiceError::not_ready("the index"))
}

/// Runs blocking index work off the async workers (on the service layer's bounded pool).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ragway_index::IndexError> + Send + 'static,
) -> Result<T, ServiceError> {
    crate::service::limits::blocking(move || f().map_err(ServiceError::from)).await
}

#[utoipa::path(
    post,
    path = "/v1/collections",
    tag = "collections",
    request_body = CreateCollection,
    responses((status = 201, description = "created", body = CollectionInfo), (status = 409, description = "name taken", body = ErrorBody), ApiErrors)
)]
#[post("/v1/collections")]
pub async fn create(_: Authorized<op::CreateCollection>, state: web::Data<AppState>, body: web::Json<CreateCollection>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let info = blocking(move || index.create(body.into_inner()).map(|c| c.info())).await?;
    Ok(HttpResponse::Created().json(info))
}

#[utoipa::path(
    get,
    path = "/v1/collections",
    tag = "collections",
    responses((status = 200, description = "every collection", body = CollectionList), ApiErrors)
)]
#[get("/v1/collections")]
pub async fn list(_: Authorized<op::ListCollections>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let data = blocking(move || Ok(index.list().iter().map(|c| c.info()).collect::<Vec<_>>())).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

#[utoipa::path(
    get,
    path = "/v1/collections/{name}",
    tag = "collections",
    params(("name" = String, Path, description = "collection name")),
    responses((status = 200, description = "settings, counts and state", body = CollectionInfo), ApiErrors)
)]
#[get("/v1/collections/{name}")]
pub async fn describe(_: Authorized<op::GetCollection>, state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let name = path.into_inner();
    let info = blocking(move || index.get(&name).map(|c| c.info())).await?;
    Ok(HttpResponse::Ok().json(info))
}

#[utoipa::path(
    delete,
    path = "/v1/collections/{name}",
    tag = "collections",
    params(("name" = String, Path, description = "collection name")),
    responses((status = 200, description = "deleted", body = Deleted), ApiErrors)
)]
#[delete("/v1/collections/{name}")]
pub async fn remove(_: Authorized<op::DeleteCollection>, state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let name = path.into_inner();
    let deleted = name.clone();
    blocking(move || index.delete(&name)).await?;
    Ok(HttpResponse::Ok().json(json!({"id": deleted, "object": "collection", "deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct UpsertBody {
    documents: Vec<DocumentInput>,
    /// Answer once the documents are searchable (default); `false`: once durable.
    #[serde(default)]
    wait: Option<bool>,
}

/// Batch upsert: answered when the write is durable (and, by default, searchable).
pub(crate) async fn run_upsert(state: &AppState, name: String, body: UpsertBody) -> Result<ragway_index::WriteResult, ServiceError> {
    let index = index(state)?;
    if body.documents.is_empty() {
        return Err(ServiceError::invalid("documents", "`documents` must not be empty"));
    }
    let wait = body.wait.unwrap_or(true);
    blocking(move || index.get(&name)?.upsert(body.documents, wait)).await
}

#[utoipa::path(
    post,
    path = "/v1/collections/{name}/documents",
    tag = "documents",
    params(("name" = String, Path, description = "collection name")),
    request_body = UpsertBody,
    responses((status = 200, description = "durable (and searchable unless wait is false)", body = WriteResult), ApiErrors)
)]
#[post("/v1/collections/{name}/documents")]
pub async fn upsert(_: Authorized<op::UpsertDocuments>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<UpsertBody>,) -> Result<HttpResponse, ServiceError> {
    let result = run_upsert(&state, path.into_inner(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(result))
}

#[utoipa::path(
    get,
    path = "/v1/collections/{name}/documents/{id}",
    tag = "documents",
    params(("name" = String, Path, description = "collection name"), ("id" = String, Path, description = "document, job or model id")),
    responses((status = 200, description = "the document and its chunks", body = DocumentView), ApiErrors)
)]
#[get("/v1/collections/{name}/documents/{id:.*}")]
pub async fn get_document(_: Authorized<op::GetDocument>, state: web::Data<AppState>,
    path: web::Path<(String, String)>,) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let (name, id) = path.into_inner();
    let doc = blocking(move || index.get(&name)?.get(&id)).await?;
    Ok(HttpResponse::Ok().json(doc))
}

#[utoipa::path(
    delete,
    path = "/v1/collections/{name}/documents/{id}",
    tag = "documents",
    params(("name" = String, Path, description = "collection name"), ("id" = String, Path, description = "document, job or model id")),
    responses((status = 200, description = "deleted", body = WriteResult), ApiErrors)
)]
#[delete("/v1/collections/{name}/documents/{id:.*}")]
pub async fn delete_document(_: Authorized<op::DeleteDocuments>, state: web::Data<AppState>,
    path: web::Path<(String, String)>,) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let (name, id) = path.into_inner();
    let result = blocking(move || {
        let c = index.get(&name)?;
        let r = c.delete(std::slice::from_ref(&id), true)?;
        if r.deleted == 0 {
            return Err(ragway_index::IndexError::DocumentNotFound { collection: name, id });
        }
        Ok(r)
    })
    .await?;
    Ok(HttpResponse::Ok().json(result))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct DeleteBody {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<serde_json::Value>,
}

/// Delete by ids and/or by metadata filter.
pub(crate) async fn run_delete(state: &AppState, name: String, body: DeleteBody) -> Result<ragway_index::WriteResult, ServiceError> {
    let index = index(state)?;
    let filter = body.filter.as_ref().map(Filter::parse).transpose()?;
    if body.ids.is_none() && filter.is_none() {
        return Err(ServiceError::invalid("ids", "give `ids`, `filter` or both"));
    }
    blocking(move || {
        let c = index.get(&name)?;
        let mut total = ragway_index::WriteResult::default();
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

#[utoipa::path(
    post,
    path = "/v1/collections/{name}/documents/delete",
    tag = "documents",
    params(("name" = String, Path, description = "collection name")),
    request_body = DeleteBody,
    responses((status = 200, description = "deleted", body = WriteResult), ApiErrors)
)]
#[post("/v1/collections/{name}/documents/delete")]
pub async fn delete_documents(_: Authorized<op::DeleteDocuments>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<DeleteBody>,) -> Result<HttpResponse, ServiceError> {
    let result = run_delete(&state, path.into_inner(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(result))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct SearchBody {
    #[serde(default)]
    query: String,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    mode: Option<SearchMode>,
    #[serde(default)]
    filter: Option<serde_json::Value>,
    #[serde(default)]
    ef: Option<usize>,
    #[serde(default)]
    fusion: Option<FusionParams>,
    #[serde(default)]
    candidates: Option<usize>,
    #[serde(default)]
    group_by_document: bool,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    #[serde(default)]
    title_boost: Option<f32>,
}

/// Validates and runs a search on the blocking pool.
pub(crate) async fn run_search(
    state: &AppState,
    name: String,
    b: SearchBody,
) -> Result<ragway_index::SearchResponse, ServiceError> {
    let index = index(state)?;
    let top_k = b.top_k.unwrap_or(10);
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(ServiceError::invalid("top_k", format!("top_k must be between 1 and {MAX_TOP_K}")));
    }
    if b.candidates.is_some_and(|c| c == 0 || c > 10 * MAX_TOP_K) {
        return Err(ServiceError::invalid("candidates", format!("candidates must be between 1 and {}", 10 * MAX_TOP_K)));
    }
    if b.title_boost.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
        return Err(ServiceError::invalid("title_boost", "title_boost must be between 0 and 100"));
    }
    if b.ef.is_some_and(|e| e == 0 || e > 10_000) {
        return Err(ServiceError::invalid("ef", "ef must be between 1 and 10000"));
    }
    let req = SearchRequest {
        query: b.query,
        top_k,
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

#[utoipa::path(
    post,
    path = "/v1/collections/{name}/search",
    tag = "search",
    params(("name" = String, Path, description = "collection name")),
    request_body = SearchBody,
    responses((status = 200, description = "ranked chunks", body = SearchResults), ApiErrors)
)]
#[post("/v1/collections/{name}/search")]
pub async fn search(_: Authorized<op::Search>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<SearchBody>,) -> Result<HttpResponse, ServiceError> {
    let resp = run_search(&state, path.into_inner(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "results": resp.results, "mode": resp.mode, "dense_exact": resp.dense_exact})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestQuery {
    #[serde(default)]
    on_error: Option<OnError>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct IngestPathBody {
    path: String,
    #[serde(default)]
    on_error: Option<OnError>,
}

/// Starts an ingestion job: the body is JSONL / BEIR `corpus.jsonl` (streamed to a file
/// under the data directory, never held in memory), or, with `Content-Type:
/// application/json`, `{"path"}` naming a file or directory under the server's ingest root.
#[utoipa::path(
    post,
    path = "/v1/collections/{name}/ingest",
    tag = "ingestion",
    params(("name" = String, Path, description = "collection name")),
    request_body(content((String = "application/x-ndjson"), (IngestPathBody = "application/json")), description = "JSONL documents (streamed to disk), or {\"path\"} under --ingest-root"),
    responses((status = 202, description = "job started", body = JobStarted), ApiErrors)
)]
#[post("/v1/collections/{name}/ingest")]
pub async fn ingest(_: Authorized<op::Ingest>, state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<IngestQuery>,
    req: HttpRequest,
    mut payload: web::Payload,) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let collection_name = path.into_inner();
    let collection = index.get(&collection_name)?;
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut on_error = query.on_error.unwrap_or_default();
    let (source, cleanup) = if is_json {
        let mut bytes = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ServiceError::invalid("body", format!("cannot read the body: {e}")))?;
            if bytes.len() + chunk.len() > 1 << 20 {
                return Err(ServiceError { status: StatusCode::PAYLOAD_TOO_LARGE, ..ServiceError::invalid("body", "a JSON ingest request is `{\"path\"}`; send documents as JSONL") });
            }
            bytes.extend_from_slice(&chunk);
        }
        let body: IngestPathBody =
            serde_json::from_slice(&bytes).map_err(|e| ServiceError::invalid("body", format!("invalid JSON body: {e}")))?;
        if let Some(o) = body.on_error {
            on_error = o;
        }
        return start_path_ingest(&state, &collection_name, &body.path, on_error)
            .map(|job| HttpResponse::Accepted().json(json!({"job_id": job.id, "object": "ingest_job", "state": job.state()})));
    } else {
        let uploads = state.settings.data_dir.join("uploads");
        std::fs::create_dir_all(&uploads).map_err(|e| ServiceError::internal(format!("cannot create {}: {e}", uploads.display())))?;
        let file_path = uploads.join(format!("upload-{}-{}.jsonl", std::process::id(), UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&file_path).map_err(|e| ServiceError::internal(format!("cannot store the upload: {e}")))?,
        );
        let limit = state.settings.max_upload_bytes;
        let mut total: u64 = 0;
        let fail = |e: ServiceError, p: &std::path::Path| {
            let _ = std::fs::remove_file(p);
            e
        };
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| fail(ServiceError::invalid("body", format!("cannot read the body: {e}")), &file_path))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(fail(
                    ServiceError {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        ..ServiceError::invalid("body", format!("upload exceeds the limit of {limit} bytes"))
                    },
                    &file_path,
                ));
            }
            file.write_all(&chunk).map_err(|e| fail(ServiceError::internal(format!("cannot store the upload: {e}")), &file_path))?;
        }
        file.flush().map_err(|e| fail(ServiceError::internal(format!("cannot store the upload: {e}")), &file_path))?;
        if total == 0 {
            return Err(fail(ServiceError::invalid("body", "the body is empty; send JSONL documents"), &file_path));
        }
        (Source::Jsonl(file_path.clone()), Some(file_path))
    };
    let options = IngestOptions { on_error, ..Default::default() };
    let job = index.jobs().submit(collection, source, options, cleanup)?;
    Ok(HttpResponse::Accepted().json(json!({"job_id": job.id, "object": "ingest_job", "state": job.state()})))
}

/// Starts a job over a file or directory under the server's ingest root.
pub(crate) fn start_path_ingest(
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

static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "ingestion",
    responses((status = 200, description = "every job", body = JobList), ApiErrors)
)]
#[get("/v1/jobs")]
pub async fn list_jobs(_: Authorized<op::ListJobs>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let data: Vec<_> = index.jobs().list().iter().map(|j| j.view()).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "ingestion",
    params(("id" = String, Path, description = "document, job or model id")),
    responses((status = 200, description = "progress and report", body = JobView), ApiErrors)
)]
#[get("/v1/jobs/{id}")]
pub async fn get_job(_: Authorized<op::GetJob>, state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let id = path.into_inner();
    let job = index.jobs().get(&id).ok_or(ragway_index::IndexError::JobNotFound(id))?;
    Ok(HttpResponse::Ok().json(job.view()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct PathBody {
    path: String,
}

/// Writes a snapshot of the collection to `<data-dir>/snapshots/<path>`.
#[utoipa::path(
    post,
    path = "/v1/collections/{name}/snapshot",
    tag = "collections",
    params(("name" = String, Path, description = "collection name")),
    request_body = PathBody,
    responses((status = 201, description = "snapshot written", body = Object), ApiErrors)
)]
#[post("/v1/collections/{name}/snapshot")]
pub async fn snapshot(_: Authorized<op::Snapshot>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PathBody>,) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let name = path.into_inner();
    let rel = body.into_inner().path;
    let shown = rel.clone();
    blocking(move || index.snapshot(&name, &rel)).await?;
    Ok(HttpResponse::Created().json(json!({"object": "snapshot", "path": shown})))
}

/// Creates collection `{name}` from a snapshot under `<data-dir>/snapshots`.
#[utoipa::path(
    post,
    path = "/v1/collections/{name}/restore",
    tag = "collections",
    params(("name" = String, Path, description = "collection name")),
    request_body = PathBody,
    responses((status = 201, description = "collection restored", body = CollectionInfo), ApiErrors)
)]
#[post("/v1/collections/{name}/restore")]
pub async fn restore(_: Authorized<op::Restore>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PathBody>,) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let name = path.into_inner();
    let rel = body.into_inner().path;
    let info = blocking(move || index.restore(&name, &rel).map(|c| c.info())).await?;
    Ok(HttpResponse::Created().json(info))
}

/// Rebuilds the graph without deleted points and compacts the log now.
#[utoipa::path(
    post,
    path = "/v1/collections/{name}/compact",
    tag = "collections",
    params(("name" = String, Path, description = "collection name")),
    responses((status = 200, description = "compacted", body = CollectionInfo), ApiErrors)
)]
#[post("/v1/collections/{name}/compact")]
pub async fn compact(_: Authorized<op::Compact>, state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let index = index(&state)?;
    let name = path.into_inner();
    let info = blocking(move || {
        let c = index.get(&name)?;
        c.compact()?;
        Ok(c.info())
    })
    .await?;
    Ok(HttpResponse::Ok().json(info))
}
