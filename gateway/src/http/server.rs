//! `ragway serve`: binds at once (so `/health` answers while models load), loads the models
//! on their engine threads, and flips `/ready` when they are in. A model that fails to load
//! stops the server with the reason. SIGTERM/SIGINT stop accepting and drain in-flight
//! requests (actix-web's graceful shutdown).

use crate::service::auth::KeyStore;
use crate::config::Settings;
use crate::service::error::ServiceError;
use crate::http::error::json_error;

use crate::models::Target;
use crate::app::AppState;
use actix_web::{middleware, web, App, HttpRequest, HttpServer};
use ragway_engine::embed::worker::{EmbedHandle, EmbedWorker};
use ragway_index::{ChunkEmbedder, IndexService, ServiceOptions};
use ragway_engine::generate::GenerateWorker;
use std::sync::Arc;

async fn unknown_route(req: HttpRequest) -> Result<actix_web::HttpResponse, ServiceError> {
    Err(ServiceError::not_found(req.path()))
}

/// Runs the server until it is stopped.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", settings.data_dir.display()))?;
    // Uploads belong to ingestion jobs of a previous process, which died with it.
    let uploads = settings.data_dir.join("uploads");
    if let Ok(entries) = std::fs::read_dir(&uploads) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                tracing::info!(file = %e.path().display(), "removing an upload left by a previous run");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let embed_config = settings.embed_worker_config()?;
    let keys = KeyStore::load(&settings.api_keys, settings.api_keys_file.as_deref())?;
    if keys.enabled() {
        tracing::info!(keys = keys.len(), "API key authentication on");
    } else if !is_loopback(&settings.host) && !settings.allow_unauthenticated {
        anyhow::bail!(
            "refusing to listen on {} without API keys: configure --api-key / --api-keys-file, \
             or pass --allow-unauthenticated",
            settings.host
        );
    } else {
        tracing::warn!("no API keys configured: authentication is off");
    }
    let prompts = ragway_prompts::Registry::open(&settings.prompts_dirs, Some(settings.data_dir.join("prompts")))
        .map_err(|e| anyhow::anyhow!("cannot load prompt templates: {e}"))?;
    tracing::info!(templates = prompts.list().len(), "prompt templates loaded");
    let registry = crate::models::ModelRegistry::new(
        &settings.generation_model_id,
        &settings.embedding_model_id,
        settings.generate_config(),
        embed_config.clone(),
        &settings.models,
    )?;
    let state = web::Data::new(AppState::new(settings.clone(), keys, Arc::new(prompts), registry));

    let max_body = settings.max_body_bytes;
    let app_state = state.clone();
    let schema = web::Data::new(crate::graphql::schema(state.clone().into_inner()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .app_data(schema.clone())
            .app_data(web::JsonConfig::default().limit(max_body).error_handler(json_error))
            .wrap(middleware::from_fn(crate::http::middleware::gate))
            .wrap(middleware::Logger::new("%r %s %Dms").log_target("ragway::http"))
            .configure(crate::http::configure)
            .configure(crate::graphql::configure)
            .default_service(web::to(unknown_route))
    })
    .workers(settings.http_workers)
    .shutdown_timeout(30)
    .bind((settings.host.as_str(), settings.port))
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", settings.host, settings.port))?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }

    // Collections open (logs, graphs, tables read) while the embedding model loads; they
    // are bound to it, so the index is served once both are in.
    let late = Arc::new(ragway_index::LateEmbedder::new(embed_config.model_id.clone()));
    let loader_state: Arc<AppState> = state.clone().into_inner();
    let arriving = late.clone();
    std::thread::spawn(move || match EmbedWorker::spawn(embed_config) {
        Ok(handle) => {
            tracing::info!(model = %handle.model_id(), dim = handle.embedder().dim(), "embedding model ready");
            let _ = loader_state.embedder.set(handle.clone());
            loader_state.registry.builtin_ready(&loader_state.settings.embedding_model_id, Target::Embed(handle.clone()));
            arriving.arrive(Arc::new(handle));
        }
        Err(e) => {
            tracing::error!("failed to load the embedding model: {e}");
            eprintln!("error: failed to load the embedding model: {e}");
            std::process::exit(1);
        }
    });
    let loader_state: Arc<AppState> = state.clone().into_inner();
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        match open_index_with(&loader_state.settings, late) {
            Ok(index) => {
                tracing::info!(seconds = started.elapsed().as_secs_f32(), "collections open");
                let _ = loader_state.index.set(index);
            }
            Err(e) => {
                tracing::error!("failed to open the index: {e}");
                eprintln!("error: failed to open the index in {}: {e}", loader_state.settings.data_dir.display());
                std::process::exit(1);
            }
        }
    });

    let loader_state: Arc<AppState> = state.clone().into_inner();
    let gen_config = settings.generate_config();
    std::thread::spawn(move || match GenerateWorker::spawn(gen_config) {
        Ok(handle) => {
            tracing::info!(model = %handle.model_id(), context = handle.context_length(), "generation model ready");
            loader_state.registry.builtin_ready(&loader_state.settings.generation_model_id, Target::Generate(handle.clone()));
            let _ = loader_state.generator.set(handle);
        }
        Err(e) => {
            tracing::error!("failed to load the generation model: {e}");
            eprintln!("error: failed to load the generation model: {e}");
            std::process::exit(1);
        }
    });

    server.run().await?;
    if let Some(index) = state.index.get() {
        // Make every acknowledged write searchable before exiting (it is durable anyway).
        if let Err(e) = index.flush() {
            tracing::error!("flushing the index failed: {e}");
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Opens the index service under the data directory with the embedding model.
pub fn open_index(settings: &Settings, embedder: EmbedHandle) -> ragway_index::Result<Arc<IndexService>> {
    open_index_with(settings, Arc::new(embedder))
}

/// Opens the index service with an embedder that may still be loading.
fn open_index_with(settings: &Settings, embedder: Arc<dyn ChunkEmbedder>) -> ragway_index::Result<Arc<IndexService>> {
    let options = ServiceOptions {
        commit_interval: std::time::Duration::from_millis(settings.commit_interval_ms.max(10)),
        ingest_root: settings.ingest_root.clone(),
        snapshot_root: settings.data_dir.join("snapshots"),
        drift: settings.drift.clone(),
        postgres: settings.postgres_url.as_ref().map(|url| ragway_index::postgres::PgOptions {
            read_urls: settings.postgres_read_urls.clone(),
            index_memory_mb: settings.postgres_index_memory_mb,
            ..ragway_index::postgres::PgOptions::new(url.clone())
        }),
    };
    let default_model = embedder.model_id().to_string();
    IndexService::open(&settings.data_dir, vec![embedder], &default_model, options)
}
