//! `ragway serve` configuration: one struct that is at once the CLI flags, the `RAGWAY_*`
//! environment variables and the optional TOML file (`--config`). Precedence: flag or
//! environment variable, then the file, then the default. Unknown keys in the file are errors.

use clap::Args;
use ragway_engine::models::{DEFAULT_EMBEDDING_MODEL, DEFAULT_EMBEDDING_MODEL_ID, DEFAULT_GENERATION_MODEL_ID};
use serde::Deserialize;
use std::path::PathBuf;

/// Options of `ragway serve` (every flag also reads `RAGWAY_<NAME>` and the `--config` file).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these options (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RAGWAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "RAGWAY_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "RAGWAY_PORT")]
    pub port: Option<u16>,
    /// Folder of local models [default: ./models].
    #[arg(long, env = "RAGWAY_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Folder of the embedded index and other state [default: ./data].
    #[arg(long, env = "RAGWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Compute device of the embedder, and of the decoder unless `--generation-device` says
    /// otherwise: cpu, cuda[:N], metal[:N] or auto [default: cpu].
    #[arg(long, env = "RAGWAY_DEVICE")]
    pub device: Option<String>,
    /// Compute device of the generation model: cpu or cuda[:N] [default: `--device`].
    #[arg(long, env = "RAGWAY_GENERATION_DEVICE")]
    pub generation_device: Option<String>,
    /// On a GPU, the share of its memory the decoder may fill with weights, activations and
    /// the KV cache (the KV cache gets the rest; `--kv-cache-mib` applies on the CPU)
    /// [default: 0.9].
    #[arg(long, env = "RAGWAY_GPU_MEMORY_FRACTION")]
    pub gpu_memory_fraction: Option<f32>,
    /// Embedding model: local folder or Hugging Face repository id
    /// [default: sentence-transformers/all-MiniLM-L6-v2].
    #[arg(long, env = "RAGWAY_EMBEDDING_MODEL")]
    pub embedding_model: Option<String>,
    /// Id the embedding model is served under [default: all-MiniLM-L6-v2].
    #[arg(long, env = "RAGWAY_EMBEDDING_MODEL_ID")]
    pub embedding_model_id: Option<String>,
    /// Embedding requests that may wait for the model; more get 429 [default: 256].
    #[arg(long, env = "RAGWAY_EMBED_QUEUE")]
    pub embed_queue: Option<usize>,
    /// Inputs allowed in one embeddings request [default: 2048].
    #[arg(long, env = "RAGWAY_MAX_EMBED_INPUTS")]
    pub max_embed_inputs: Option<usize>,
    /// Tokens of one embedding forward pass [default: 4096].
    #[arg(long, env = "RAGWAY_EMBED_BATCH_TOKENS")]
    pub embed_batch_tokens: Option<usize>,
    /// Generation model: a .gguf file, a model folder (GGUF, or config.json + safetensors), a
    /// name under the models directory, or a Hugging Face repository [default:
    /// SmolLM2-135M-Instruct].
    #[arg(long, env = "RAGWAY_GENERATION_MODEL")]
    pub generation_model: Option<String>,
    /// Id the generation model is served under [default: SmolLM2-135M-Instruct].
    #[arg(long, env = "RAGWAY_GENERATION_MODEL_ID")]
    pub generation_model_id: Option<String>,
    /// Jinja file that replaces the generation model's own chat template.
    #[arg(long, env = "RAGWAY_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Sequences decoded together at most [default: 16].
    #[arg(long, env = "RAGWAY_MAX_RUNNING_SEQS")]
    pub max_running_seqs: Option<usize>,
    /// Generation requests that may wait; more get 429 [default: 64].
    #[arg(long, env = "RAGWAY_MAX_WAITING_REQUESTS")]
    pub max_waiting_requests: Option<usize>,
    /// Tokens of one generation forward pass; longer prompts are prefilled in chunks
    /// [default: 512].
    #[arg(long, env = "RAGWAY_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Memory for the generation KV cache, MiB [default: 2048].
    #[arg(long, env = "RAGWAY_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<usize>,
    /// Tokens generated at most when a request sets no `max_tokens` (fewer when the prompt
    /// leaves less of the context) [default: 1024].
    #[arg(long, env = "RAGWAY_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<usize>,
    /// Largest request body in bytes [default: 16777216].
    #[arg(long, env = "RAGWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Directory server-side ingestion paths must lie under (`POST .../ingest` with
    /// `{"path"}`); unset: server-side paths are refused.
    #[arg(long, env = "RAGWAY_INGEST_ROOT")]
    pub ingest_root: Option<PathBuf>,
    /// PostgreSQL with pgvector for new collections (`postgres://user:password@host:port/db`);
    /// unset: collections live in the embedded store under the data directory.
    #[arg(long, env = "RAGWAY_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// Read replicas of that database that searches may use (repeatable, or a comma-separated
    /// list, as the variable takes; `--postgres-read-urls` is the same flag).
    #[arg(
        long = "postgres-read-url",
        visible_alias = "postgres-read-urls",
        env = "RAGWAY_POSTGRES_READ_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub postgres_read_urls: Vec<String>,
    /// `maintenance_work_mem` in MiB for the dense index builds ragway starts in PostgreSQL
    /// (after an ingestion job loads an empty collection); unset: the server's setting.
    /// pgvector builds fast while the graph fits in it.
    #[arg(long, env = "RAGWAY_POSTGRES_INDEX_MEMORY_MB", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub postgres_index_memory_mb: Option<u32>,
    /// Milliseconds between commits of writes nobody waits for (ingestion jobs) [default: 1000].
    #[arg(long, env = "RAGWAY_COMMIT_INTERVAL_MS")]
    pub commit_interval_ms: Option<u64>,
    /// Largest upload to `POST .../ingest`, in bytes [default: 4 GiB].
    #[arg(long, env = "RAGWAY_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<u64>,
    /// HTTP worker threads [default: number of cores].
    #[arg(long, env = "RAGWAY_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// An API key with every scope (repeatable; the variable takes a comma-separated list).
    /// With no key at all, authentication is off.
    #[arg(long = "api-key", env = "RAGWAY_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// TOML file of `[[keys]]` with `key` (or `key_sha256`), `name`, `scopes` (read, write,
    /// admin), `requests_per_minute`, `tokens_per_minute`.
    #[arg(long, env = "RAGWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Leave /health and /ready open when keys are configured [default: true].
    #[arg(long, env = "RAGWAY_OPEN_PROBES", action = clap::ArgAction::Set)]
    pub open_probes: Option<bool>,
    /// Leave /metrics open when keys are configured (a scraper on a private network)
    /// [default: false: it needs a `read` key].
    #[arg(long, env = "RAGWAY_OPEN_METRICS", action = clap::ArgAction::Set)]
    pub open_metrics: Option<bool>,
    /// Leave /openapi.json and the GraphiQL page open when keys are configured
    /// [default: false: they need a `read` key].
    #[arg(long, env = "RAGWAY_OPEN_DOCS", action = clap::ArgAction::Set)]
    pub open_docs: Option<bool>,
    /// Hosts (`host` or `host:port`) that upstream model versions registered over the admin
    /// API may reach; none by default (versions in the config file are not restricted).
    #[arg(long, env = "RAGWAY_UPSTREAM_HOSTS", value_delimiter = ',')]
    #[serde(default)]
    pub upstream_hosts: Vec<String>,
    /// Concurrent GraphQL WebSocket connections per API key [default: 8].
    #[arg(long, env = "RAGWAY_WS_MAX_CONNECTIONS_PER_KEY")]
    pub ws_max_connections_per_key: Option<usize>,
    /// Concurrent GraphQL subscriptions per API key [default: 16].
    #[arg(long, env = "RAGWAY_WS_MAX_SUBSCRIPTIONS_PER_KEY")]
    pub ws_max_subscriptions_per_key: Option<usize>,
    /// Seconds a WebSocket client has to complete `connection_init` [default: 10].
    #[arg(long, env = "RAGWAY_WS_INIT_TIMEOUT_SECS")]
    pub ws_init_timeout_secs: Option<u64>,
    /// Allow listening beyond loopback with no API key configured [default: false].
    #[arg(long, env = "RAGWAY_ALLOW_UNAUTHENTICATED", num_args = 0..=1, default_missing_value = "true")]
    pub allow_unauthenticated: Option<bool>,
    /// Largest GraphQL query depth [default: 12].
    #[arg(long, env = "RAGWAY_GRAPHQL_MAX_DEPTH")]
    pub graphql_max_depth: Option<usize>,
    /// Largest GraphQL query complexity (fields counted, lists by their limit) [default: 2000].
    #[arg(long, env = "RAGWAY_GRAPHQL_MAX_COMPLEXITY")]
    pub graphql_max_complexity: Option<usize>,
    /// Directories of prompt templates (`*.prompt`) and few-shot sets (`fewshot/*.jsonl`),
    /// loaded after the built-in templates; repeat the flag or separate with commas.
    /// Templates created through the API are kept under `<data-dir>/prompts`.
    #[arg(long = "prompts-dir", env = "RAGWAY_PROMPTS_DIRS", value_delimiter = ',')]
    #[serde(default)]
    pub prompts_dirs: Vec<PathBuf>,
    /// Template RAG answers with when a request names none [default: rag-answer].
    #[arg(long, env = "RAGWAY_RAG_TEMPLATE")]
    pub rag_template: Option<String>,
    /// Passages whose query cosine is below this are not offered to the model; with none
    /// left, RAG answers with the template's "don't know" [default: 0.3].
    #[arg(long, env = "RAGWAY_RAG_MIN_RELEVANCE")]
    pub rag_min_relevance: Option<f32>,
    /// RAG answers whose grounding score is below this are flagged [default: 0.7].
    #[arg(long, env = "RAGWAY_RAG_GROUNDING_THRESHOLD")]
    pub rag_grounding_threshold: Option<f32>,
    /// Token budget of the context passages of a RAG prompt [default: 2048].
    #[arg(long, env = "RAGWAY_RAG_CONTEXT_TOKENS")]
    pub rag_context_tokens: Option<usize>,
    /// Model names with versions and routing (config file only: `[[models]]` tables; see
    /// the README's "Model versions and rollout").
    #[arg(skip)]
    #[serde(default)]
    pub models: Vec<crate::models::ModelDecl>,
    /// Queries kept in each collection's drift window [default: 500].
    #[arg(long, env = "RAGWAY_DRIFT_WINDOW")]
    pub drift_window: Option<usize>,
    /// Queries that form a collection's drift reference when none was set [default: 200].
    #[arg(long, env = "RAGWAY_DRIFT_BASELINE")]
    pub drift_baseline: Option<usize>,
}

/// Resolved settings of the server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub models_dir: PathBuf,
    pub data_dir: PathBuf,
    pub device: String,
    pub generation_device: String,
    pub gpu_memory_fraction: f32,
    pub embedding_model: String,
    pub embedding_model_id: String,
    pub embed_queue: usize,
    pub max_embed_inputs: usize,
    pub embed_batch_tokens: usize,
    pub generation_model: String,
    pub generation_model_id: String,
    pub chat_template: Option<String>,
    pub max_running_seqs: usize,
    pub max_waiting_requests: usize,
    pub max_batch_tokens: usize,
    pub kv_cache_mib: usize,
    pub default_max_tokens: usize,
    pub max_body_bytes: usize,
    pub http_workers: usize,
    pub ingest_root: Option<PathBuf>,
    pub postgres_url: Option<String>,
    pub postgres_read_urls: Vec<String>,
    pub postgres_index_memory_mb: Option<u32>,
    pub commit_interval_ms: u64,
    pub max_upload_bytes: u64,
    pub api_keys: Vec<String>,
    pub api_keys_file: Option<PathBuf>,
    pub open_probes: bool,
    pub open_metrics: bool,
    pub open_docs: bool,
    pub upstream_hosts: Vec<String>,
    pub ws_max_connections_per_key: usize,
    pub ws_max_subscriptions_per_key: usize,
    pub ws_init_timeout_secs: u64,
    pub allow_unauthenticated: bool,
    pub graphql_max_depth: usize,
    pub graphql_max_complexity: usize,
    pub prompts_dirs: Vec<PathBuf>,
    pub rag: ragway_prompts::rag::RagConfig,
    pub models: Vec<crate::models::ModelDecl>,
    pub drift: ragway_index::drift::DriftConfig,
}

impl Settings {
    /// The embedding worker these settings describe (opens the device: a bad one fails here).
    pub fn embed_worker_config(&self) -> anyhow::Result<ragway_engine::embed::worker::EmbedWorkerConfig> {
        let device = ragway_engine::device::open_device(&self.device)?;
        Ok(ragway_engine::embed::worker::EmbedWorkerConfig {
            model_id: self.embedding_model_id.clone(),
            source: self.embedding_model.clone(),
            models_dir: self.models_dir.clone(),
            options: ragway_engine::embed::EmbedderOptions { device, max_batch_tokens: self.embed_batch_tokens, ..Default::default() },
            queue_capacity: self.embed_queue,
            max_inputs_per_request: self.max_embed_inputs,
        })
    }

    /// The generation worker these settings describe.
    pub fn generate_config(&self) -> ragway_engine::generate::GenerateConfig {
        ragway_engine::generate::GenerateConfig {
            model_id: self.generation_model_id.clone(),
            source: self.generation_model.clone(),
            models_dir: self.models_dir.clone(),
            chat_template: self.chat_template.clone(),
            max_running: self.max_running_seqs,
            max_batch_tokens: self.max_batch_tokens,
            max_waiting: self.max_waiting_requests,
            kv_cache_mib: self.kv_cache_mib,
            default_max_tokens: self.default_max_tokens,
            device: self.generation_device.clone(),
            decoder: None,
            gpu_memory_fraction: self.gpu_memory_fraction,
        }
    }
}

impl ServeArgs {
    /// Merges flags/environment with the config file and the defaults.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
                toml::from_str::<ServeArgs>(&text)
                    .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                self.$field.clone().or(file.$field.clone()).unwrap_or_else(|| $default)
            };
        }
        let settings = Settings {
            host: pick!(host, "127.0.0.1".to_string()),
            port: pick!(port, 8080),
            models_dir: pick!(models_dir, ragway_engine::models::default_models_dir()),
            data_dir: pick!(data_dir, PathBuf::from("data")),
            device: pick!(device, "cpu".to_string()),
            generation_device: self
                .generation_device
                .clone()
                .or(file.generation_device.clone())
                .or(self.device.clone())
                .or(file.device.clone())
                .unwrap_or_else(|| "cpu".to_string()),
            gpu_memory_fraction: pick!(gpu_memory_fraction, 0.9),
            embedding_model: pick!(embedding_model, DEFAULT_EMBEDDING_MODEL.to_string()),
            embedding_model_id: pick!(embedding_model_id, DEFAULT_EMBEDDING_MODEL_ID.to_string()),
            embed_queue: pick!(embed_queue, 256),
            max_embed_inputs: pick!(max_embed_inputs, 2048),
            embed_batch_tokens: pick!(embed_batch_tokens, 4096),
            generation_model: pick!(generation_model, DEFAULT_GENERATION_MODEL_ID.to_string()),
            generation_model_id: pick!(generation_model_id, DEFAULT_GENERATION_MODEL_ID.to_string()),
            chat_template: match self.chat_template.clone().or(file.chat_template.clone()) {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("cannot read chat template {}: {e}", path.display()))?,
                ),
                None => None,
            },
            max_running_seqs: pick!(max_running_seqs, 16),
            max_waiting_requests: pick!(max_waiting_requests, 64),
            max_batch_tokens: pick!(max_batch_tokens, 512),
            kv_cache_mib: pick!(kv_cache_mib, 2048),
            default_max_tokens: pick!(default_max_tokens, ragway_engine::generate::DEFAULT_MAX_TOKENS),
            max_body_bytes: pick!(max_body_bytes, 16 * 1024 * 1024),
            http_workers: pick!(http_workers, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
            ingest_root: self.ingest_root.clone().or(file.ingest_root.clone()),
            // Empty (an unset variable passed through, as docker-compose does): none.
            postgres_url: self.postgres_url.clone().or(file.postgres_url.clone()).filter(|u| !u.trim().is_empty()),
            postgres_read_urls: if self.postgres_read_urls.is_empty() {
                file.postgres_read_urls.clone()
            } else {
                self.postgres_read_urls.clone()
            },
            postgres_index_memory_mb: self.postgres_index_memory_mb.or(file.postgres_index_memory_mb),
            commit_interval_ms: pick!(commit_interval_ms, 1000),
            max_upload_bytes: pick!(max_upload_bytes, 4 << 30),
            api_keys: if self.api_keys.is_empty() { file.api_keys.clone() } else { self.api_keys.clone() },
            api_keys_file: self.api_keys_file.clone().or(file.api_keys_file.clone()),
            open_probes: pick!(open_probes, true),
            open_metrics: pick!(open_metrics, false),
            open_docs: pick!(open_docs, false),
            upstream_hosts: if self.upstream_hosts.is_empty() { file.upstream_hosts.clone() } else { self.upstream_hosts.clone() },
            ws_max_connections_per_key: pick!(ws_max_connections_per_key, 8),
            ws_max_subscriptions_per_key: pick!(ws_max_subscriptions_per_key, 16),
            ws_init_timeout_secs: pick!(ws_init_timeout_secs, 10).min(3600),
            allow_unauthenticated: pick!(allow_unauthenticated, false),
            graphql_max_depth: pick!(graphql_max_depth, 12),
            graphql_max_complexity: pick!(graphql_max_complexity, 2000),
            prompts_dirs: if self.prompts_dirs.is_empty() { file.prompts_dirs.clone() } else { self.prompts_dirs.clone() },
            models: if self.models.is_empty() { file.models.clone() } else { self.models.clone() },
            drift: ragway_index::drift::DriftConfig {
                window: pick!(drift_window, 500).max(10),
                baseline: pick!(drift_baseline, 200).max(10),
                ..Default::default()
            },
            rag: {
                let d = ragway_prompts::rag::RagConfig::default();
                ragway_prompts::rag::RagConfig {
                    template: pick!(rag_template, d.template.clone()),
                    min_relevance: pick!(rag_min_relevance, d.min_relevance),
                    grounding_threshold: pick!(rag_grounding_threshold, d.grounding_threshold),
                    context_tokens: pick!(rag_context_tokens, d.context_tokens),
                    ..d
                }
            },
        };
        if !(-1.0..=1.0).contains(&settings.rag.min_relevance) || !(0.0..=1.0).contains(&settings.rag.grounding_threshold) {
            anyhow::bail!("rag_min_relevance must be in [-1, 1] and rag_grounding_threshold in [0, 1]");
        }
        if !(settings.gpu_memory_fraction > 0.0 && settings.gpu_memory_fraction <= 1.0) {
            anyhow::bail!("gpu_memory_fraction must be in (0, 1], not {}", settings.gpu_memory_fraction);
        }
        if let Some(mb) = settings.postgres_index_memory_mb.filter(|mb| !(1..=1_048_576).contains(mb)) {
            anyhow::bail!("postgres_index_memory_mb must be from 1 to 1048576 (MiB), not {mb}");
        }
        if settings.embed_queue == 0 || settings.max_embed_inputs == 0 || settings.embed_batch_tokens == 0 {
            anyhow::bail!("embed_queue, max_embed_inputs and embed_batch_tokens must be positive");
        }
        if settings.max_running_seqs == 0
            || settings.max_waiting_requests == 0
            || settings.max_batch_tokens == 0
            || settings.kv_cache_mib == 0
            || settings.default_max_tokens == 0
        {
            anyhow::bail!(
                "max_running_seqs, max_waiting_requests, max_batch_tokens, kv_cache_mib and default_max_tokens must be positive"
            );
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The serve flags as the command line parses them.
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("ragway.toml");
        std::fs::write(&path, "port = 9000\nhost = \"0.0.0.0\"\nembed_queue = 7\n").unwrap();
        let args = ServeArgs { config: Some(path.clone()), port: Some(9100), ..Default::default() };
        let s = args.resolve().unwrap();
        assert_eq!(s.port, 9100);
        assert_eq!(s.host, "0.0.0.0");
        assert_eq!(s.embed_queue, 7);
        assert_eq!(s.embedding_model_id, "all-MiniLM-L6-v2");
    }

    #[test]
    fn the_postgres_index_memory_is_bounded_from_the_file_as_from_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ragway.toml");
        std::fs::write(&path, "postgres_index_memory_mb = 2048\n").unwrap();
        let s = ServeArgs { config: Some(path.clone()), ..Default::default() }.resolve().unwrap();
        assert_eq!(s.postgres_index_memory_mb, Some(2048));
        for bad in ["0", "2000000"] {
            std::fs::write(&path, format!("postgres_index_memory_mb = {bad}\n")).unwrap();
            let err = ServeArgs { config: Some(path.clone()), ..Default::default() }.resolve().unwrap_err();
            assert!(err.to_string().contains("postgres_index_memory_mb"), "{err}");
        }
        let flag = |v: &str| {
            Flags::try_parse_from(["ragway", "--postgres-index-memory-mb", v]).map(|f| f.serve.postgres_index_memory_mb)
        };
        assert_eq!(flag("512").unwrap(), Some(512));
        assert!(flag("0").is_err() && flag("2000000").is_err() && flag("-1").is_err());
    }

    #[test]
    fn read_replicas_are_listed_by_either_flag_repeated_or_comma_separated() {
        let urls = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("ragway").chain(args.iter().copied())).unwrap().serve.postgres_read_urls
        };
        let (a, b) = ("postgres://r1/db", "postgres://r2/db");
        let both = vec![a.to_string(), b.to_string()];
        assert_eq!(urls(&["--postgres-read-url", a, "--postgres-read-url", b]), both);
        assert_eq!(urls(&["--postgres-read-urls", &format!("{a},{b}")]), both);
        assert_eq!(urls(&["--postgres-read-urls", a, "--postgres-read-url", b]), both);
        assert!(urls(&[]).is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("ragway.toml");
        std::fs::write(&path, "prot = 9000\n").unwrap();
        let err = ServeArgs { config: Some(path), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn the_readme_model_config_parses_and_validates() {
        let readme = include_str!("../../README.md");
        let start = readme.find("# ragway.toml (--config)").expect("README example");
        let toml_text = &readme[start..start + readme[start..].find("```").unwrap()];
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("ragway.toml");
        std::fs::write(&path, toml_text).unwrap();
        let s = ServeArgs { config: Some(path), ..Default::default() }.resolve().unwrap();
        assert_eq!(s.models.len(), 1);
        let m = &s.models[0];
        assert_eq!((m.name.as_str(), m.kind, m.versions.len()), ("chat", crate::models::ModelKind::Generation, 2));
        let r = m.routing.as_ref().unwrap();
        r.validate(|v| m.versions.iter().any(|x| x.version == v)).unwrap();
        assert_eq!(r.rollback.as_ref().unwrap().max_p95_ms, Some(5000.0));
        m.versions[1].upstream.as_ref().unwrap().validate().unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[models]]\nname = \"x\"\nkind = \"generation\"\nversions = []\nweights = 1\n").unwrap();
        let err = ServeArgs { config: Some(bad), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("weights"), "{err}");
    }
}
