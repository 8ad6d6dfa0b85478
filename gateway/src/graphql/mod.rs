//! The GraphQL API at `/graphql` (async-graphql): GraphiQL on `GET`, queries and mutations on
//! `POST`, subscriptions over WebSocket (graphql-transport-ws, and the older graphql-ws) on
//! the same path.
//!
//! Resolvers build the typed inputs of the service layer (`service::collections`,
//! `service::completions`, ...) and call the same operations the REST handlers call, so both
//! APIs validate alike. Inputs that are free-form JSON on both APIs (collection settings,
//! eval and RAG options) are parsed by the same serde types. Errors carry the REST error's
//! `code` (or `type`), HTTP `status` and `param` in `extensions`.
//!
//! Auth: `POST /graphql` without a valid key is refused whole (401); otherwise every field
//! authorizes its own operation through `require` (the `service::auth::Operation` table),
//! each alias charged once.
//! WebSocket clients send the key as an `Authorization` header or in the `connection_init`
//! payload (`{"Authorization": "Bearer ..."}`), as browsers cannot set headers.

pub mod depth;
pub mod ide;

use crate::http::error::error_response;
use crate::http::middleware::{authorize_unless, caller};
use crate::service::auth::{bearer, Caller, Operation, Principal};
use crate::service::error::ServiceError;
use crate::service::limits::Slot;
use crate::service::collections::{self as collections, index, start_path_ingest, DeleteBody, SearchBody, UpsertBody};
use crate::service::completions::{finish_chat, start_chat, ChatRequest, Common};
use crate::app::AppState;
use actix_web::{guard, web, HttpRequest, HttpResponse};
use async_graphql::futures_util::{Stream, StreamExt};
use async_graphql::{Context, Enum, ErrorExtensions, InputObject, Json, Object, Schema, SimpleObject, Subscription};
use async_graphql_actix_web::{GraphQLResponse, GraphQLSubscription};
use ragway_engine::generate::GenEvent;
use ragway_index::jobs::Job as IndexJob;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// A prompt template in listings.
#[derive(SimpleObject)]
pub struct PromptSummary {
    pub name: String,
    pub description: String,
    pub latest: u32,
    pub versions: Vec<u32>,
    /// `{label: version}`.
    pub labels: Json<Value>,
}

pub type RagwaySchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Builds the schema with the configured depth and complexity limits.
pub fn schema(state: Arc<AppState>) -> RagwaySchema {
    let (depth, complexity) = (state.settings.graphql_max_depth, state.settings.graphql_max_complexity);
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(state)
        .extension(depth::DepthLimit { max: depth })
        .limit_complexity(complexity)
        .finish()
}

/// Registers `/graphql` (GraphiQL, queries and mutations, WebSocket subscriptions).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(ide::asset).service(
        web::resource("/graphql")
            .route(web::post().to(execute))
            .route(web::get().guard(guard::Header("upgrade", "websocket")).to(subscribe))
            .route(web::get().to(graphiql)),
    );
}

async fn graphiql(http: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    authorize_unless(&http, Operation::ApiDocs, state.settings.open_docs)?;
    Ok(HttpResponse::Ok().content_type("text/html; charset=utf-8").body(crate::graphql::ide::page("/graphql")))
}

/// Reads a request body of at most `limit` bytes (413 beyond, counted as it streams, so a
/// body without a length cannot grow past the limit either).
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ServiceError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ServiceError::invalid("body", format!("cannot read the request body: {e}")))?;
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(ServiceError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn execute(
    schema: web::Data<RagwaySchema>,
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    use actix_web::Responder;
    match execute_body(schema, state, &http, payload).await {
        Ok(response) => response.respond_to(&http).map_into_boxed_body(),
        Err(e) => error_response("/graphql", &e),
    }
}

async fn execute_body(
    schema: web::Data<RagwaySchema>,
    state: web::Data<AppState>,
    http: &HttpRequest,
    payload: web::Payload,
) -> Result<GraphQLResponse, ServiceError> {
    // A request without a valid key is refused as a whole (401), before its body is read;
    // with one, each field authorizes its own operation.
    let who = caller(http);
    who.authenticated().map_err(ServiceError::from)?;
    let limit = state.settings.max_body_bytes;
    let body = read_body(payload, limit).await?;
    let content_type = http.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    // Multipart parts are bounded by the same limit as the whole body.
    let options = async_graphql::http::MultipartOptions::default().max_file_size(limit).max_num_files(16);
    let request = async_graphql::http::receive_batch_body(content_type, futures::io::Cursor::new(body.freeze()), options)
        .await
        .map_err(|e| ServiceError::invalid("body", format!("invalid GraphQL request: {e}")))?;
    Ok(schema.execute_batch(request.data(who)).await.into())
}

async fn subscribe(
    schema: web::Data<RagwaySchema>,
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> actix_web::Result<HttpResponse> {
    let state = state.into_inner();
    // A key in the upgrade request's headers is checked now; otherwise at connection_init.
    let from_header = match caller(&http) {
        Caller::Invalid => return Ok(error_response("/graphql", &ServiceError::unauthenticated("Incorrect API key provided."))),
        Caller::Known(p) => Some(p),
        Caller::Missing => None,
    };
    // The connection's slot, taken once the caller is known; the payload wrapper below owns
    // it, so it is given back whenever the connection ends.
    let slot: Arc<std::sync::Mutex<Option<Slot>>> = Arc::default();
    let init_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let init_state = state.clone();
    let (init_slot, init_flag) = (slot.clone(), init_done.clone());
    let on_init = move |payload: Value| async move {
        let caller = match from_header {
            Some(p) => Caller::Known(p),
            None => {
                let field = |name: &str| {
                    payload.as_object().and_then(|o| {
                        o.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(name))
                            .and_then(|(_, v)| v.as_str().map(str::to_string))
                    })
                };
                let key = bearer(field("authorization").as_deref(), field("api-key").or(field("apiKey")).as_deref());
                Caller::identify(&init_state.keys, key.as_deref())
            }
        };
        let principal = caller.authorize(Operation::Subscribe).map_err(|d| gql(d.into()))?;
        let taken = init_state.streams.connection(&principal.name).map_err(gql)?;
        *init_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(taken);
        init_flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut data = async_graphql::Data::default();
        data.insert(Caller::Known(principal));
        Ok(data)
    };
    // A client that never completes connection_init is disconnected after the deadline.
    let deadline = Duration::from_secs(state.settings.ws_init_timeout_secs.max(1));
    let unauthenticated_for_too_long = async move {
        tokio::time::sleep(deadline).await;
        if init_done.load(std::sync::atomic::Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
    };
    let payload = payload.take_until(Box::pin(unauthenticated_for_too_long)).map(move |item| {
        let _owner = &slot;
        item
    });
    GraphQLSubscription::new(Schema::clone(&*schema)).on_connection_init(on_init).start(&http, payload)
}

/// An `ServiceError` as a GraphQL error with the REST code, status and param in `extensions`.
fn gql(e: ServiceError) -> async_graphql::Error {
    let ext = e.graphql_extensions();
    async_graphql::Error::new(e.message).extend_with(|_, out| {
        for (k, v) in ext.as_object().into_iter().flatten() {
            if let Ok(v) = async_graphql::Value::from_json(v.clone()) {
                out.set(k.as_str(), v);
            }
        }
    })
}

fn state<'a>(ctx: &Context<'a>) -> &'a Arc<AppState> {
    ctx.data_unchecked::<Arc<AppState>>()
}

/// The caller, once authorized for `op` (scope and rate limit; see `service::auth`). Every
/// field and every alias is one operation.
fn require(ctx: &Context<'_>, op: Operation) -> async_graphql::Result<Arc<Principal>> {
    let caller = ctx.data_opt::<Caller>().cloned().unwrap_or(Caller::Missing);
    caller.authorize(op).map_err(|d| gql(d.into()))
}

/// A service output as a GraphQL `JSON` value.
fn json_of<T: serde::Serialize>(v: T) -> async_graphql::Result<Json<Value>> {
    serde_json::to_value(v).map(Json).map_err(|e| gql(ServiceError::internal(e.to_string())))
}

/// Parses a free-form JSON input into the service's type (as REST parses its body).
fn body<T: serde::de::DeserializeOwned>(v: Value) -> async_graphql::Result<T> {
    serde_json::from_value(v).map_err(|e| gql(ServiceError::invalid("input", format!("invalid input: {e}"))))
}

#[derive(SimpleObject)]
pub struct Model {
    id: String,
    /// `embedding` or `generation`.
    kind: String,
    created: u64,
    owned_by: String,
    loaded: bool,
}

#[derive(SimpleObject)]
pub struct Collection {
    name: String,
    /// The embedding model; null when documents and searches bring their own vectors.
    model: Option<String>,
    dimension: usize,
    distance: String,
    documents: usize,
    chunks: usize,
    dense_points: usize,
    keyword_chunks: u64,
    disk_bytes: u64,
    memory_bytes: u64,
    /// `ready`, `indexing`, `rebuilding` or `unavailable`.
    state: String,
    /// Where the documents live: `embedded` (the data directory) or `postgres`.
    storage: String,
    created_at: u64,
    /// Every setting (HNSW, chunking, fusion, keyword), as the REST API shows them.
    settings: Json<Value>,
}

impl From<ragway_index::CollectionInfo> for Collection {
    fn from(i: ragway_index::CollectionInfo) -> Self {
        let settings = serde_json::to_value(&i.settings).unwrap_or(Value::Null);
        Self {
            distance: settings["distance"].as_str().unwrap_or_default().to_string(),
            name: i.settings.name,
            model: i.settings.model,
            dimension: i.settings.dimension,
            documents: i.stats.documents,
            chunks: i.stats.chunks,
            dense_points: i.stats.dense_points,
            keyword_chunks: i.stats.keyword_chunks,
            disk_bytes: i.stats.disk_bytes,
            memory_bytes: i.stats.memory_bytes,
            state: i.stats.state.to_string(),
            storage: i.storage.to_string(),
            created_at: i.settings.created_at,
            settings: Json(settings),
        }
    }
}

#[derive(SimpleObject)]
pub struct Chunk {
    chunk_id: String,
    char_start: u32,
    char_end: u32,
    tokens: u32,
}

#[derive(SimpleObject)]
pub struct Document {
    id: String,
    title: Option<String>,
    text: String,
    metadata: Json<Value>,
    chunks: Vec<Chunk>,
}

#[derive(SimpleObject)]
pub struct SearchHit {
    chunk_id: String,
    document_id: String,
    chunk_index: u32,
    text: String,
    title: Option<String>,
    score: f32,
    metadata: Json<Value>,
    char_start: u32,
    char_end: u32,
    /// 1-based rank and score in the dense half (absent when it did not find the chunk).
    dense_rank: Option<usize>,
    dense_score: Option<f32>,
    keyword_rank: Option<usize>,
    keyword_score: Option<f32>,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
pub enum SearchMode {
    Dense,
    Keyword,
    Hybrid,
}

#[derive(SimpleObject)]
pub struct JobProgress {
    documents_read: u64,
    documents_written: u64,
    documents_unchanged: u64,
    documents_failed: u64,
    chunks_written: u64,
    fraction: f64,
    documents_per_second: f64,
    elapsed_seconds: f64,
    eta_seconds: Option<f64>,
    /// True while the collection's dense index is built after a bulk load (PostgreSQL).
    indexing: bool,
}

#[derive(SimpleObject)]
pub struct Job {
    id: String,
    collection: String,
    source: String,
    /// `queued`, `running`, `done` or `failed`.
    state: String,
    created_at: u64,
    progress: JobProgress,
    /// Bad records with their line or file.
    errors: Json<Value>,
    error: Option<String>,
}

impl From<&IndexJob> for Job {
    fn from(j: &IndexJob) -> Self {
        let v = j.view();
        let p = v.progress;
        Self {
            id: v.id,
            collection: v.collection,
            source: v.source,
            state: v.state.as_str().to_string(),
            created_at: v.created_at,
            progress: JobProgress {
                documents_read: p.documents_read,
                documents_written: p.documents_written,
                documents_unchanged: p.documents_unchanged,
                documents_failed: p.documents_failed,
                chunks_written: p.chunks_written,
                fraction: p.fraction,
                documents_per_second: p.documents_per_second,
                elapsed_seconds: p.elapsed_seconds,
                eta_seconds: p.eta_seconds,
                indexing: p.indexing,
            },
            errors: Json(serde_json::to_value(&v.errors).unwrap_or(Value::Null)),
            error: v.error,
        }
    }
}

#[derive(SimpleObject)]
pub struct WriteResult {
    upserted: usize,
    unchanged: usize,
    deleted: usize,
    chunks: usize,
}

impl From<ragway_index::WriteResult> for WriteResult {
    fn from(w: ragway_index::WriteResult) -> Self {
        Self { upserted: w.upserted, unchanged: w.unchanged, deleted: w.deleted, chunks: w.chunks }
    }
}

#[derive(InputObject)]
pub struct DocumentInput {
    id: String,
    /// The text (leave it out with `chunks`).
    #[graphql(default)]
    text: String,
    title: Option<String>,
    metadata: Option<Json<Value>>,
    /// The document's own vector: its text is then one chunk.
    vector: Option<Vec<f32>>,
    /// The document's own chunks, each with its vector.
    chunks: Option<Vec<ChunkInput>>,
}

/// A chunk that brings its own vector.
#[derive(InputObject)]
pub struct ChunkInput {
    text: String,
    vector: Vec<f32>,
}

#[derive(InputObject)]
pub struct MessageInput {
    /// `system`, `user` or `assistant`.
    role: String,
    content: String,
}

/// A chat generation (the same parameters as `POST /v1/chat/completions`).
#[derive(InputObject)]
pub struct GenerateInput {
    /// Generation model id [default: the served generation model].
    model: Option<String>,
    messages: Vec<MessageInput>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    /// As OpenAI's `response_format`: `{"type": "json_schema", "json_schema": {"name",
    /// "schema"}}`, `{"type": "json_object"}`, or ragway's `regex` and `grammar`; the text
    /// then always parses (unless cut by `maxTokens`: finish reason `length`).
    response_format: Option<Json<Value>>,
}

impl GenerateInput {
    fn into_chat_request(self, state: &AppState) -> async_graphql::Result<ChatRequest> {
        Ok(ChatRequest {
            messages: self.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect(),
            common: Common {
                model: self.model.unwrap_or_else(|| state.settings.generation_model_id.clone()),
                max_tokens: self.max_tokens.map(u64::from),
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k.map(i64::from),
                seed: self.seed,
                stop: self.stop.map(|s| json!(s)),
                response_format: self.response_format.map(|j| j.0),
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

#[derive(SimpleObject)]
pub struct Generation {
    text: String,
    finish_reason: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// One event of a streamed generation: text as it is decoded, then a last event with the
/// finish reason and token counts.
#[derive(SimpleObject)]
pub struct GenerationChunk {
    text: String,
    finish_reason: Option<String>,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// The served models: every public name and every pinned `name@version`.
    async fn models(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Model>> {
        require(ctx, Operation::ListModels)?;
        let s = state(ctx);
        Ok(s.registry
            .served()
            .into_iter()
            .map(|(id, kind, loaded)| Model {
                id,
                kind: kind.as_str().into(),
                created: s.started_unix,
                owned_by: "ragway".into(),
                loaded,
            })
            .collect())
    }

    /// The model registry (as `GET /v1/admin/models`): versions, routing, rollbacks,
    /// request counts and upstream endpoints; `name` narrows it to one model.
    async fn model_registry(&self, ctx: &Context<'_>, name: Option<String>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::ListModelVersions)?;
        let s = state(ctx);
        Ok(Json(match name {
            Some(n) => json!(crate::service::models::describe_of(s, &n).map_err(gql)?),
            None => json!(s.registry.list()),
        }))
    }

    /// A collection's query drift (as `GET /v1/collections/{name}/drift`).
    async fn drift(&self, ctx: &Context<'_>, collection: String) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::DriftReport)?;
        Ok(Json(json!(crate::service::drift::report_of(state(ctx), &collection).map_err(gql)?)))
    }

    async fn collections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Collection>> {
        require(ctx, Operation::ListCollections)?;
        Ok(collections::list(state(ctx)).await.map_err(gql)?.into_iter().map(Collection::from).collect())
    }

    async fn collection(&self, ctx: &Context<'_>, name: String) -> async_graphql::Result<Collection> {
        require(ctx, Operation::GetCollection)?;
        Ok(collections::describe(state(ctx), name).await.map_err(gql)?.into())
    }

    async fn document(&self, ctx: &Context<'_>, collection: String, id: String) -> async_graphql::Result<Document> {
        require(ctx, Operation::GetDocument)?;
        let d = collections::document(state(ctx), collection, id).await.map_err(gql)?;
        Ok(Document {
            id: d.id,
            title: d.title,
            text: d.text,
            metadata: Json(d.metadata),
            chunks: d
                .chunks
                .into_iter()
                .map(|c| Chunk { chunk_id: c.chunk_id, char_start: c.char_start, char_end: c.char_end, tokens: c.tokens })
                .collect(),
        })
    }

    /// Hybrid (default), dense or keyword search, with the REST API's JSON filters. `vector`
    /// searches the dense half with your own query vector (required in collections without
    /// a model, where `query` feeds the keyword half). `fusion` is the REST API's object
    /// (`{"method": "dbsf"}`, ...), `candidates` each half's list length.
    #[graphql(complexity = "top_k.unwrap_or(10) as usize * child_complexity")]
    #[allow(clippy::too_many_arguments)]
    async fn search(
        &self,
        ctx: &Context<'_>,
        collection: String,
        query: Option<String>,
        vector: Option<Vec<f32>>,
        top_k: Option<u32>,
        mode: Option<SearchMode>,
        filter: Option<Json<Value>>,
        group_by_document: Option<bool>,
        ef: Option<u32>,
        fusion: Option<Json<Value>>,
        candidates: Option<u32>,
        title_boost: Option<f32>,
    ) -> async_graphql::Result<Vec<SearchHit>> {
        require(ctx, Operation::Search)?;
        let fusion = fusion
            .map(|f| serde_json::from_value::<ragway_index::fusion::FusionParams>(f.0))
            .transpose()
            .map_err(|e| gql(ServiceError::invalid("fusion", format!("fusion: {e}"))))?;
        let input = SearchBody {
            query: query.unwrap_or_default(),
            top_k: top_k.map(|k| k as usize),
            mode: mode.map(|m| match m {
                SearchMode::Dense => ragway_index::SearchMode::Dense,
                SearchMode::Keyword => ragway_index::SearchMode::Keyword,
                SearchMode::Hybrid => ragway_index::SearchMode::Hybrid,
            }),
            filter: filter.map(|f| f.0),
            ef: ef.map(|e| e as usize),
            fusion,
            candidates: candidates.map(|c| c as usize),
            group_by_document: group_by_document.unwrap_or(false),
            vector,
            title_boost,
        };
        let resp = collections::search(state(ctx), collection, input).await.map_err(gql)?;
        Ok(resp
            .results
            .into_iter()
            .map(|h| SearchHit {
                chunk_id: h.chunk_id,
                document_id: h.document_id,
                chunk_index: h.chunk_index,
                text: h.text,
                title: h.title,
                score: h.score,
                metadata: Json(h.metadata),
                char_start: h.char_start,
                char_end: h.char_end,
                dense_rank: h.dense.as_ref().map(|s| s.rank),
                dense_score: h.dense.as_ref().map(|s| s.score),
                keyword_rank: h.keyword.as_ref().map(|s| s.rank),
                keyword_score: h.keyword.as_ref().map(|s| s.score),
            })
            .collect())
    }

    async fn jobs(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Job>> {
        require(ctx, Operation::ListJobs)?;
        let index = index(state(ctx)).map_err(gql)?;
        Ok(index.jobs().list().iter().map(|j| Job::from(j.as_ref())).collect())
    }

    async fn job(&self, ctx: &Context<'_>, id: String) -> async_graphql::Result<Job> {
        require(ctx, Operation::GetJob)?;
        let index = index(state(ctx)).map_err(gql)?;
        let job = index.jobs().get(&id).ok_or_else(|| gql(ragway_index::IndexError::JobNotFound(id).into()))?;
        Ok(Job::from(job.as_ref()))
    }
    /// Prompt templates: name, latest version, versions and labels.
    async fn prompts(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<PromptSummary>> {
        require(ctx, Operation::ListPrompts)?;
        Ok(state(ctx)
            .prompts
            .list()
            .into_iter()
            .map(|p| PromptSummary {
                name: p.name,
                description: p.description,
                latest: p.latest,
                versions: p.versions,
                labels: Json(json!(p.labels)),
            })
            .collect())
    }

    /// One template with every version (header, body, source, origin) and its labels.
    async fn prompt(&self, ctx: &Context<'_>, name: String) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::GetPrompt)?;
        let d = state(ctx).prompts.get(&name).map_err(|e| gql(e.into()))?;
        json_of(d)
    }

    /// Renders `reference` (`name`, `name@3`, `name:label`); `input` takes the fields of
    /// `POST /v1/prompts/{name}/render` (variables, fewshot_mode, fewshot_k, model).
    async fn render_prompt(
        &self,
        ctx: &Context<'_>,
        reference: String,
        input: Option<Json<Value>>,
    ) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::RenderPrompt)?;
        let b: crate::service::prompts::RenderBody = match input {
            Some(i) => body(i.0)?,
            None => Default::default(),
        };
        let out = crate::service::prompts::render_prompt(state(ctx), &reference, b).await.map_err(gql)?;
        json_of(out)
    }

    /// Evaluation runs (as `GET /v1/evals`), newest first: status, progress, summary.
    async fn eval_runs(&self, ctx: &Context<'_>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::ListEvals)?;
        Ok(Json(json!(state(ctx).evals.list())))
    }

    /// One evaluation run (as `GET /v1/evals/{id}`).
    async fn eval_run(&self, ctx: &Context<'_>, id: String) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::GetEval)?;
        Ok(Json(json!(state(ctx).evals.get(&id).ok_or_else(|| gql(crate::service::evals::no_run(&id)))?)))
    }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Creates a collection; `settings` takes the fields of `POST /v1/collections` (model,
    /// distance, hnsw, chunking, fusion, keyword).
    async fn create_collection(
        &self,
        ctx: &Context<'_>,
        name: String,
        settings: Option<Json<Value>>,
    ) -> async_graphql::Result<Collection> {
        require(ctx, Operation::CreateCollection)?;
        let mut v = settings.map(|s| s.0).unwrap_or_else(|| json!({}));
        let Some(o) = v.as_object_mut() else {
            return Err(gql(ServiceError::invalid("settings", "settings must be an object")));
        };
        o.insert("name".into(), json!(name));
        let create: ragway_index::CreateCollection = body(v)?;
        Ok(collections::create(state(ctx), create).await.map_err(gql)?.into())
    }

    async fn delete_collection(&self, ctx: &Context<'_>, name: String) -> async_graphql::Result<bool> {
        require(ctx, Operation::DeleteCollection)?;
        collections::delete_collection(state(ctx), name).await.map_err(gql)?;
        Ok(true)
    }

    /// Upserts documents; answered once they are durable and (with `wait`, default) searchable.
    async fn upsert_documents(
        &self,
        ctx: &Context<'_>,
        collection: String,
        documents: Vec<DocumentInput>,
        wait: Option<bool>,
    ) -> async_graphql::Result<WriteResult> {
        require(ctx, Operation::UpsertDocuments)?;
        let documents = documents
            .into_iter()
            .map(|d| ragway_index::DocumentInput {
                id: d.id,
                text: d.text,
                title: d.title,
                metadata: d.metadata.map(|m| m.0),
                vector: d.vector,
                chunks: d.chunks.map(|cs| cs.into_iter().map(|c| ragway_index::ChunkInput { text: c.text, vector: c.vector }).collect()),
            })
            .collect();
        Ok(collections::upsert(state(ctx), collection, UpsertBody { documents, wait }).await.map_err(gql)?.into())
    }

    /// Deletes documents by id and/or metadata filter.
    async fn delete_documents(
        &self,
        ctx: &Context<'_>,
        collection: String,
        ids: Option<Vec<String>>,
        filter: Option<Json<Value>>,
    ) -> async_graphql::Result<WriteResult> {
        require(ctx, Operation::DeleteDocuments)?;
        let input = DeleteBody { ids, filter: filter.map(|f| f.0) };
        Ok(collections::delete(state(ctx), collection, input).await.map_err(gql)?.into())
    }

    /// Starts an ingestion job over a file or directory under the server's ingest root.
    async fn start_ingestion(
        &self,
        ctx: &Context<'_>,
        collection: String,
        path: String,
        #[graphql(desc = "`skip` (default) or `fail`")] on_error: Option<String>,
    ) -> async_graphql::Result<Job> {
        require(ctx, Operation::Ingest)?;
        let on_error = match on_error.as_deref() {
            None | Some("skip") => ragway_index::ingest::OnError::Skip,
            Some("fail") => ragway_index::ingest::OnError::Fail,
            Some(_) => return Err(gql(ServiceError::invalid("onError", "onError is `skip` or `fail`"))),
        };
        let job = start_path_ingest(state(ctx), &collection, &path, on_error).map_err(gql)?;
        Ok(Job::from(job.as_ref()))
    }

    /// Generates a chat answer (the whole text; subscribe to `generate` for tokens).
    async fn generate(&self, ctx: &Context<'_>, input: GenerateInput) -> async_graphql::Result<Generation> {
        let caller = require(ctx, Operation::Chat)?;
        let s = state(ctx);
        let (chat, shared) = (input.into_chat_request(s)?, s.clone());
        let started = crate::service::limits::blocking(move || start_chat(&shared, chat)).await.map_err(gql)?;
        let mut out = finish_chat(started, Some(&caller)).await.map_err(gql)?;
        let c = out.remove(0);
        Ok(Generation {
            text: c.text,
            finish_reason: c.finish_reason.map(str::to_string),
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
        })
    }
    /// Adds a template version: `source` (the whole file) or `input` (the parts, as in
    /// `POST /v1/prompts`). Answers the version and the template's labels.
    async fn create_prompt_version(
        &self,
        ctx: &Context<'_>,
        source: Option<String>,
        input: Option<Json<Value>>,
    ) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::CreatePromptVersion)?;
        let v = match (source, input) {
            (Some(src), None) => json!({"source": src}),
            (None, Some(i)) => i.0,
            _ => return Err(gql(ServiceError::invalid("source", "give `source` or `input`"))),
        };
        let (out, _) = crate::service::prompts::create_version(state(ctx), v, None).await.map_err(gql)?;
        json_of(out)
    }

    /// Points a label at a version (rollback = moving it back).
    async fn set_prompt_label(
        &self,
        ctx: &Context<'_>,
        name: String,
        label: String,
        version: u32,
    ) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::SetPromptLabel)?;
        let out = crate::service::prompts::move_label(state(ctx), name, label, version).await.map_err(gql)?;
        json_of(out)
    }

    async fn delete_prompt_label(&self, ctx: &Context<'_>, name: String, label: String) -> async_graphql::Result<bool> {
        require(ctx, Operation::DeletePromptLabel)?;
        crate::service::prompts::delete_label(state(ctx), name, label).await.map_err(gql)?;
        Ok(true)
    }

    /// Deletes a template created through the API.
    async fn delete_prompt(&self, ctx: &Context<'_>, name: String) -> async_graphql::Result<bool> {
        require(ctx, Operation::DeletePrompt)?;
        crate::service::prompts::delete(state(ctx), name).await.map_err(gql)?;
        Ok(true)
    }

    /// Starts an evaluation run; `input` takes the fields of `POST /v1/evals` (kind,
    /// dataset, name, split, collection, mode, top_k, template, limit, ...).
    async fn start_eval_run(&self, ctx: &Context<'_>, input: Json<Value>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::StartEval)?;
        let req: crate::service::evals::StartEval = body(input.0)?;
        Ok(Json(json!(state(ctx).evals.start(state(ctx).clone(), req).map_err(gql)?)))
    }

    /// Registers a model version: `input` takes the body of `POST /v1/admin/models` (name,
    /// kind, version, local or upstream, description).
    async fn register_model_version(&self, ctx: &Context<'_>, input: Json<Value>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::RegisterModelVersion)?;
        Ok(Json(json!(crate::service::models::register_from(state(ctx), input.0).map_err(gql)?)))
    }

    /// Sets a model's routing (the body of `PUT /v1/admin/models/{name}/routing`).
    async fn set_model_routing(&self, ctx: &Context<'_>, name: String, routing: Json<Value>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::SetModelRouting)?;
        Ok(Json(json!(crate::service::models::set_routing_from(state(ctx), &name, routing.0).map_err(gql)?)))
    }

    /// Retires a model version no routing uses.
    async fn retire_model_version(&self, ctx: &Context<'_>, name: String, version: String) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::RetireModelVersion)?;
        Ok(Json(json!(crate::service::models::retire_of(state(ctx), &name, &version).map_err(gql)?)))
    }

    /// Makes a collection's drift reference from these queries.
    async fn set_drift_reference(&self, ctx: &Context<'_>, collection: String, queries: Vec<String>) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::SetDriftReference)?;
        Ok(Json(json!(crate::service::drift::set_reference_of(state(ctx), &collection, queries).await.map_err(gql)?)))
    }

    /// Forgets a collection's drift reference; the next live queries make a new one.
    async fn reset_drift_reference(&self, ctx: &Context<'_>, collection: String) -> async_graphql::Result<Json<Value>> {
        require(ctx, Operation::ResetDriftReference)?;
        Ok(Json(json!(crate::service::drift::reset_of(state(ctx), &collection).map_err(gql)?)))
    }

    /// A retrieval-augmented answer: `input` takes the body of `POST /v1/rag` (without
    /// `stream`); answers its JSON (answer, citations, uncited, grounding, template, usage).
    async fn rag(&self, ctx: &Context<'_>, input: Json<Value>) -> async_graphql::Result<Json<Value>> {
        let caller = require(ctx, Operation::Rag)?;
        let s = state(ctx);
        let b = crate::service::rag::parse_body(s, input.0).map_err(gql)?;
        if b.common.stream.unwrap_or(false) {
            return Err(gql(ServiceError::invalid("stream", "stream is not available here; subscribe to `generate` for tokens")));
        }
        json_of(crate::service::rag::answer(s, b, Some(&caller)).await.map_err(gql)?)
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// A chat generation's text as it is decoded; the last event has the finish reason.
    async fn generate(
        &self,
        ctx: &Context<'_>,
        input: GenerateInput,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<GenerationChunk>>> {
        let caller = require(ctx, Operation::Chat)?;
        let s = state(ctx);
        let slot = Arc::new(s.streams.subscription(&caller.name).map_err(gql)?);
        let (chat, shared) = (input.into_chat_request(s)?, s.clone());
        let started = crate::service::limits::blocking(move || start_chat(&shared, chat)).await.map_err(gql)?;
        let prompt_tokens = started.prompt_tokens;
        // Dropping the stream (client gone, subscription stopped) cancels the sequence and
        // gives the subscription slot back.
        Ok(started.events.filter_map(move |(_, ev)| {
            let caller = caller.clone();
            let _slot = slot.clone();
            async move {
                match ev {
                    GenEvent::Token { text, .. } | GenEvent::Text { text, .. } if !text.is_empty() => {
                        Some(Ok(GenerationChunk { text, finish_reason: None, prompt_tokens: None, completion_tokens: None }))
                    }
                    GenEvent::Token { .. } | GenEvent::Text { .. } => None,
                    GenEvent::Done { finish_reason, completion_tokens, .. } => {
                        caller.charge_tokens(prompt_tokens + completion_tokens);
                        Some(Ok(GenerationChunk {
                            text: String::new(),
                            finish_reason: Some(finish_reason.as_str().to_string()),
                            prompt_tokens: Some(prompt_tokens),
                            completion_tokens: Some(completion_tokens),
                        }))
                    }
                    GenEvent::Error { message } => Some(Err(gql(ServiceError::internal(message)))),
                }
            }
        }))
    }

    /// An ingestion job's progress, every `intervalMs` (default 500) until it ends.
    async fn job_progress(
        &self,
        ctx: &Context<'_>,
        id: String,
        interval_ms: Option<u32>,
    ) -> async_graphql::Result<impl Stream<Item = Job>> {
        let caller = require(ctx, Operation::GetJob)?;
        let slot = state(ctx).streams.subscription(&caller.name).map_err(gql)?;
        let index = index(state(ctx)).map_err(gql)?;
        let job = index.jobs().get(&id).ok_or_else(|| gql(ragway_index::IndexError::JobNotFound(id).into()))?;
        let every = Duration::from_millis(interval_ms.unwrap_or(500).clamp(50, 60_000) as u64);
        Ok(async_graphql::futures_util::stream::unfold((job, true, false, slot), move |(job, first, ended, slot)| async move {
            if ended {
                return None;
            }
            if !first {
                tokio::time::sleep(every).await;
            }
            let view = Job::from(job.as_ref());
            let ended = matches!(view.state.as_str(), "done" | "failed");
            Some((view, (job, false, ended, slot)))
        }))
    }
}
