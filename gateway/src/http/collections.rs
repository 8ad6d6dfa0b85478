//! Collections, documents, search, ingestion jobs and snapshots (`/v1/collections/...`,
//! `/v1/jobs/...`): the REST shapes over `service::collections`. The one piece of work done
//! here is streaming a JSONL upload to disk.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::http::StatusCode;
use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use futures::StreamExt;
use crate::service::collections::{self as svc, index, DeleteBody, IngestPathBody, SearchBody, UpsertBody};
use ragway_index::ingest::{IngestOptions, OnError, Source};
use ragway_index::CreateCollection;
use serde::Deserialize;
use serde_json::json;
use std::io::Write;

#[utoipa::path(
    post,
    path = "/v1/collections",
    tag = "collections",
    request_body = CreateCollection,
    responses((status = 201, description = "created", body = CollectionInfo), (status = 409, description = "name taken", body = ErrorBody), ApiErrors)
)]
#[post("/v1/collections")]
pub async fn create(_: Authorized<op::CreateCollection>, state: web::Data<AppState>, body: web::Json<CreateCollection>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Created().json(svc::create(&state, body.into_inner()).await?))
}

#[utoipa::path(
    get,
    path = "/v1/collections",
    tag = "collections",
    responses((status = 200, description = "every collection", body = CollectionList), ApiErrors)
)]
#[get("/v1/collections")]
pub async fn list(_: Authorized<op::ListCollections>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    let data = svc::list(&state).await?;
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
    Ok(HttpResponse::Ok().json(svc::describe(&state, path.into_inner()).await?))
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
    let name = path.into_inner();
    svc::delete_collection(&state, name.clone()).await?;
    let deleted = name;
    Ok(HttpResponse::Ok().json(json!({"id": deleted, "object": "collection", "deleted": true})))
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
    let result = svc::upsert(&state, path.into_inner(), body.into_inner()).await?;
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
    let (name, id) = path.into_inner();
    Ok(HttpResponse::Ok().json(svc::document(&state, name, id).await?))
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
    let (name, id) = path.into_inner();
    Ok(HttpResponse::Ok().json(svc::delete_document(&state, name, id).await?))
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
    let result = svc::delete(&state, path.into_inner(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(result))
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
    let resp = svc::search(&state, path.into_inner(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "results": resp.results, "mode": resp.mode, "dense_exact": resp.dense_exact})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestQuery {
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
        return svc::start_path_ingest(&state, &collection_name, &body.path, on_error)
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
    responses((status = 201, description = "snapshot written", body = svc::SnapshotWritten), ApiErrors)
)]
#[post("/v1/collections/{name}/snapshot")]
pub async fn snapshot(_: Authorized<op::Snapshot>, state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PathBody>,) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Created().json(svc::snapshot(&state, path.into_inner(), body.into_inner().path).await?))
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
    Ok(HttpResponse::Created().json(svc::restore(&state, path.into_inner(), body.into_inner().path).await?))
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
    Ok(HttpResponse::Ok().json(svc::compact(&state, path.into_inner()).await?))
}
