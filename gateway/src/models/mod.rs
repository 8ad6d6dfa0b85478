//! The model registry: public model names, each with versions and a routing policy.
//!
//! A version is the server's own model (`builtin`, loaded at start), a local model loaded on
//! demand (`local`: a GGUF file, a model folder or a hub repository, on its own engine thread),
//! or a pool of upstream OpenAI-compatible servers (`upstream`). Versions are declared in the
//! config file (`[[models]]`) and registered, routed and retired at run time through the
//! admin API; local models load and unload without a restart (a retired version's engine
//! stops once its last in-flight request ends).
//!
//! A request names a public model (`chat`: the routing policy picks the version) or pins one
//! (`chat@v2`). The response's `model` is `name@version` and the headers `x-ragway-model` /
//! `x-ragway-model-version` say the same; metrics carry `model` and `version` labels.

pub mod routing;
pub mod upstream;

use crate::service::error::ServiceError;
use ragway_engine::embed::worker::{EmbedHandle, EmbedWorker, EmbedWorkerConfig};
use ragway_engine::generate::sampling::random_seed;
use ragway_engine::generate::scheduler::Histogram;
use ragway_engine::generate::{GenerateConfig, GenerateHandle, GenerateWorker};
use ragway_prompts::registry::uniform_from_key;
use routing::{Caller, Role, Routing, Window};
use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use upstream::{Pool, UpstreamSpec};

/// The version name of the server's own models (`--generation-model`, `--embedding-model`).
pub const BUILTIN_VERSION: &str = "v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Generation,
    Embedding,
}

impl ModelKind {
    /// The serde name (`generation`, `embedding`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Generation => "generation",
            ModelKind::Embedding => "embedding",
        }
    }
}

/// One version as declared (config file or `POST /v1/admin/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A model this server loads itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// A .gguf file, a model folder, a name under the models directory, or a hub repository.
    pub model: String,
    /// A Jinja file replacing a generation model's own chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub chat_template: Option<std::path::PathBuf>,
}

/// Where a path that a client names may point: under `root` only, after resolving `..` and
/// symbolic links (a link inside the root that points out of it is refused too).
pub fn confine(root: &std::path::Path, given: &str, param: &str) -> Result<std::path::PathBuf, ServiceError> {
    use std::path::Component;
    let rel = std::path::Path::new(given);
    let outside = || ServiceError::invalid(param, format!("`{given}` must name a file or folder under the models directory"));
    if given.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let root = root.canonicalize().map_err(|_| outside())?;
    let full = root.join(rel).canonicalize().map_err(|_| outside())?;
    if full.starts_with(&root) {
        Ok(full)
    } else {
        Err(outside())
    }
}

impl LocalSpec {
    /// Confines a local version registered over the API to the models directory: its
    /// `chat_template` must be a file under it, and its `model` a name under it or a hub
    /// repository id (`org/name`, fetched into it) — never another path on the server.
    /// (Versions in the config file are the operator's own and are taken as written.)
    pub fn confine_to(&mut self, models_dir: &std::path::Path) -> Result<(), ServiceError> {
        if let Some(t) = &self.chat_template {
            let t = t.to_str().ok_or_else(|| ServiceError::invalid("local.chat_template", "not UTF-8"))?.to_string();
            let path = confine(models_dir, &t, "local.chat_template")?;
            if !path.is_file() {
                return Err(ServiceError::invalid("local.chat_template", format!("`{t}` is not a file")));
            }
            self.chat_template = Some(path);
        }
        match confine(models_dir, &self.model, "local.model") {
            Ok(path) => self.model = path.to_string_lossy().into_owned(),
            Err(e) => {
                let hub_id = self.model.split('/').count() == 2
                    && self.model.split('/').all(|p| {
                        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    });
                // The engine tries a source as a local path first: a hub id must not also
                // name something relative to the server's working directory.
                if !hub_id || std::path::Path::new(&self.model).exists() {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// A public model name as the config file declares it (`[[models]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    pub name: String,
    pub kind: ModelKind,
    pub versions: Vec<VersionSpec>,
    /// Default: the first version alone.
    #[serde(default)]
    pub routing: Option<Routing>,
}

/// What serves a version once it is ready.
#[derive(Clone)]
pub enum Target {
    Generate(GenerateHandle),
    Embed(EmbedHandle),
    Upstream(Arc<Pool>),
}

enum State {
    Loading,
    Ready(Target),
    Failed(String),
}

struct Version {
    spec: VersionSpec,
    backend: &'static str,
    state: State,
    registered_unix: u64,
}

struct RollbackEvent {
    version: String,
    reason: String,
    at_unix: u64,
}

struct Entry {
    kind: ModelKind,
    versions: BTreeMap<String, Version>,
    routing: Routing,
    rolled_back: Option<RollbackEvent>,
    /// Recent outcomes of the canary version.
    canary_window: Window,
}

/// The admin API's view of a public model name (`GET /v1/admin/models/{name}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub kind: ModelKind,
    pub routing: Routing,
    /// The last automatic canary rollback, while its routing is still in force.
    pub rolled_back: Option<RolledBack>,
    pub versions: Vec<VersionView>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolledBack {
    pub version: String,
    /// Which rule fired, with the window's figures.
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    Loading,
    Ready,
    Failed,
}

/// One version of a model name.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionView {
    pub version: String,
    /// `builtin` (the server's own models), `local` or `upstream`.
    pub backend: String,
    pub state: VersionState,
    /// Why loading failed (`state: failed`).
    pub error: Option<String>,
    pub spec: VersionSpec,
    /// Share of the name's traffic the routing sends here, in [0, 1].
    pub share: f64,
    /// Unix seconds.
    pub registered: u64,
    /// Requests by role (`primary`, `arm`, `stable`, `canary`, `shadow`) and outcome (`ok`,
    /// `client_error`, `error`).
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    /// Upstream versions: each endpoint's health and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<upstream::EndpointView>>,
}

/// `GET /v1/admin/models`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: String,
    pub data: Vec<ModelView>,
}

/// A request's routing decision.
pub struct Routed {
    pub name: String,
    pub version: String,
    pub role: Role,
    pub target: Target,
    /// The version the request is mirrored to, and what serves it.
    pub shadow: Option<(String, Target)>,
}

impl Routed {
    /// `name@version`: the `model` of the response.
    pub fn served_as(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The generation engine in this process serving the request; an upstream-served version
    /// is refused on `param`, saying that `what` needs a local model.
    pub fn local_generator(&self, param: &str, what: &str) -> Result<GenerateHandle, ServiceError> {
        match &self.target {
            Target::Generate(h) => Ok(h.clone()),
            _ => Err(ServiceError::invalid(
                param,
                format!("`{}` is served by upstream servers; {what} needs a model loaded in this server", self.served_as()),
            )),
        }
    }
}

/// How a request went, for metrics and the canary's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// 4xx: the caller's fault, not the version's.
    ClientError,
    /// 5xx, upstream failures, timeouts.
    Error,
}

impl Outcome {
    pub fn from_status(status: u16) -> Self {
        match status {
            0..=399 => Outcome::Ok,
            400..=499 => Outcome::ClientError,
            _ => Outcome::Error,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::Error => "error",
        }
    }
}

const DURATION_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

type SeriesKey = (String, String, Role);

/// Prometheus samples gathered by family, so each family's series are written together under
/// its HELP/TYPE however the loops that produce them interleave.
pub struct MetricsText {
    families: Vec<Family>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl MetricsText {
    pub fn new(decl: &[(&'static str, &'static str, &'static str)]) -> Self {
        Self { families: decl.iter().map(|&(name, kind, help)| Family { name, kind, help, samples: Vec::new() }).collect() }
    }

    pub fn add(&mut self, name: &str, labels: &str, value: f64) {
        if let Some(f) = self.families.iter_mut().find(|f| f.name == name) {
            f.samples.push((labels.to_string(), value));
        }
    }

    pub fn render(&self, out: &mut String) {
        for f in &self.families {
            crate::telemetry::write_family(out, f.name, f.kind, f.help, &f.samples);
        }
    }
}

/// See the module docs.
pub struct ModelRegistry {
    entries: RwLock<BTreeMap<String, Entry>>,
    gen_template: GenerateConfig,
    embed_template: EmbedWorkerConfig,
    outcomes: Mutex<BTreeMap<(String, String, Role, Outcome), u64>>,
    durations: Mutex<BTreeMap<SeriesKey, Histogram>>,
    rollbacks: Mutex<BTreeMap<(String, String), u64>>,
    health: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_unix() -> u64 {
    crate::service::now()
}

fn draw() -> f64 {
    uniform_from_key(random_seed())
}

impl ModelRegistry {
    /// The registry with the server's own models (loading) and the declared ones.
    pub fn new(
        builtin_generation: &str,
        builtin_embedding: &str,
        gen_template: GenerateConfig,
        embed_template: EmbedWorkerConfig,
        declared: &[ModelDecl],
    ) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            entries: RwLock::new(BTreeMap::new()),
            gen_template,
            embed_template,
            outcomes: Mutex::default(),
            durations: Mutex::default(),
            rollbacks: Mutex::default(),
            health: Mutex::new(None),
        });
        for (name, kind, what) in [
            (builtin_generation, ModelKind::Generation, "the server's --generation-model"),
            (builtin_embedding, ModelKind::Embedding, "the server's --embedding-model"),
        ] {
            let spec = VersionSpec {
                version: BUILTIN_VERSION.into(),
                local: None,
                upstream: None,
                description: Some(what.into()),
            };
            this.insert(name, kind, spec, "builtin", State::Loading);
        }
        for d in declared {
            for v in &d.versions {
                this.register(&d.name, Some(d.kind), v.clone())
                    .map_err(|e| anyhow::anyhow!("model `{}` in the config: {}", d.name, e.message))?;
            }
            if let Some(r) = &d.routing {
                this.set_routing(&d.name, r.clone())
                    .map_err(|e| anyhow::anyhow!("routing of `{}` in the config: {}", d.name, e.message))?;
            }
        }
        Ok(this)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, name: &str, kind: ModelKind, spec: VersionSpec, backend: &'static str, state: State) {
        let mut entries = self.write();
        let e = entries.entry(name.to_string()).or_insert_with(|| Entry {
            kind,
            versions: BTreeMap::new(),
            routing: Routing::single(&spec.version),
            rolled_back: None,
            canary_window: Window::default(),
        });
        e.versions.insert(spec.version.clone(), Version { spec, backend, state, registered_unix: now_unix() });
    }

    /// The server's own model finished loading.
    pub fn builtin_ready(&self, name: &str, target: Target) {
        self.set_state(name, BUILTIN_VERSION, State::Ready(target));
    }

    fn set_state(&self, name: &str, version: &str, state: State) {
        // A version retired while it loaded stays retired (its engine is dropped here).
        if let Some(v) = self.write().get_mut(name).and_then(|e| e.versions.get_mut(version)) {
            v.state = state;
        }
    }

    /// Adds a version (a new name needs `kind`); local models start loading in the background.
    pub fn register(self: &Arc<Self>, name: &str, kind: Option<ModelKind>, spec: VersionSpec) -> Result<(), ServiceError> {
        if name.is_empty() || name.contains('@') || name.chars().any(char::is_whitespace) {
            return Err(ServiceError::invalid("name", "a model name must be non-empty, without `@` or spaces"));
        }
        if spec.version.is_empty() || spec.version.contains('@') || spec.version.chars().any(char::is_whitespace) {
            return Err(ServiceError::invalid("version", "a version must be non-empty, without `@` or spaces"));
        }
        let existing = self.read().get(name).map(|e| (e.kind, e.versions.contains_key(&spec.version)));
        let kind = match (existing, kind) {
            (Some((_, true)), _) => {
                return Err(ServiceError::conflict("version", format!("`{name}@{}` is already registered", spec.version)))
            }
            (Some((k, _)), Some(want)) if k != want => {
                return Err(ServiceError::invalid("kind", format!("`{name}` is a {} model", k.as_str())))
            }
            (Some((k, _)), _) => k,
            (None, Some(k)) => k,
            (None, None) => return Err(ServiceError::invalid("kind", format!("`{name}` is new: say its `kind`"))),
        };
        match (&spec.local, &spec.upstream) {
            (Some(_), None) => {
                self.insert(name, kind, spec.clone(), "local", State::Loading);
                self.load_local(name, kind, &spec);
            }
            (None, Some(u)) => {
                u.validate().map_err(|(p, m)| ServiceError::invalid(p, m))?;
                let pool = Pool::new(u.clone()).map_err(ServiceError::internal)?;
                self.insert(name, kind, spec, "upstream", State::Ready(Target::Upstream(pool)));
                self.start_health_checks();
            }
            _ => return Err(ServiceError::invalid("version", "a version needs exactly one of `local` and `upstream`")),
        }
        tracing::info!(model = name, "model version registered");
        Ok(())
    }

    fn load_local(self: &Arc<Self>, name: &str, kind: ModelKind, spec: &VersionSpec) {
        let Some(local) = spec.local.clone() else { return };
        let this = Arc::downgrade(self);
        let (name, version) = (name.to_string(), spec.version.clone());
        let served_as = format!("{name}@{version}");
        let mut gen = self.gen_template.clone();
        let mut emb = self.embed_template.clone();
        std::thread::spawn(move || {
            let loaded = match kind {
                ModelKind::Generation => {
                    gen.model_id = served_as.clone();
                    gen.source = local.model.clone();
                    let template = match &local.chat_template {
                        Some(p) => std::fs::read_to_string(p)
                            .map(Some)
                            .map_err(|e| format!("cannot read chat template {}: {e}", p.display())),
                        // The server's --chat-template belongs to its own model.
                        None => Ok(None),
                    };
                    template.and_then(|t| {
                        gen.chat_template = t;
                        GenerateWorker::spawn(gen).map(Target::Generate).map_err(|e| e.to_string())
                    })
                }
                ModelKind::Embedding => {
                    emb.model_id = served_as.clone();
                    emb.source = local.model.clone();
                    EmbedWorker::spawn(emb).map(Target::Embed).map_err(|e| e.to_string())
                }
            };
            let Some(this) = this.upgrade() else { return };
            match loaded {
                Ok(t) => {
                    tracing::info!(model = %served_as, "model version loaded");
                    this.set_state(&name, &version, State::Ready(t));
                }
                Err(e) => {
                    tracing::error!(model = %served_as, "model version failed to load: {e}");
                    this.set_state(&name, &version, State::Failed(e));
                }
            }
        });
    }

    /// Replaces a name's routing policy (and clears a past rollback).
    pub fn set_routing(&self, name: &str, routing: Routing) -> Result<(), ServiceError> {
        let mut entries = self.write();
        let e = entries.get_mut(name).ok_or_else(|| ServiceError::model_not_found(name))?;
        routing.validate(|v| e.versions.contains_key(v)).map_err(|(p, m)| ServiceError::invalid(format!("routing.{p}"), m))?;
        e.routing = routing;
        e.rolled_back = None;
        e.canary_window = Window::default();
        tracing::info!(model = name, "routing changed");
        Ok(())
    }

    /// Removes a version no policy routes to; a name with no version left is gone.
    pub fn retire(&self, name: &str, version: &str) -> Result<(), ServiceError> {
        let mut entries = self.write();
        let e = entries.get_mut(name).ok_or_else(|| ServiceError::model_not_found(name))?;
        let v = e.versions.get(version).ok_or_else(|| ServiceError::model_not_found(&format!("{name}@{version}")))?;
        if v.backend == "builtin" {
            return Err(ServiceError::conflict("version", format!("`{name}@{version}` is the server's own model; it cannot be retired")));
        }
        if e.versions.len() > 1 && e.routing.references().contains(&version) {
            return Err(ServiceError::conflict(
                "version",
                format!("`{name}@{version}` is still routed to; change the routing first"),
            ));
        }
        e.versions.remove(version);
        if e.versions.is_empty() {
            entries.remove(name);
        }
        tracing::info!(model = name, version, "model version retired");
        Ok(())
    }

    /// Picks the version serving a request for `requested` (`name` or `name@version`);
    /// `header` reads one of the request's headers (the canary header), by name.
    pub fn route(
        &self,
        requested: &str,
        kind: ModelKind,
        user: Option<&str>,
        api_key: Option<&str>,
        header: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Routed, ServiceError> {
        let entries = self.read();
        let (name, pinned) = match entries.get_key_value(requested) {
            Some((n, _)) => (n.as_str(), None),
            None => match requested.rsplit_once('@') {
                Some((n, v)) if entries.contains_key(n) => (n, Some(v)),
                _ => return Err(ServiceError::model_not_found(requested)),
            },
        };
        let e = &entries[name];
        if e.kind != kind {
            return Err(ServiceError::invalid(
                "model",
                match e.kind {
                    ModelKind::Embedding => format!("`{requested}` is an embedding model; it cannot generate text"),
                    ModelKind::Generation => format!("`{requested}` is a generation model; it cannot embed"),
                },
            ));
        }
        let canary_header = e
            .routing
            .canary_header()
            .is_some_and(|(h, want)| header(h).is_some_and(|got| want.is_none_or(|w| w == got.trim())));
        let caller = Caller { user, api_key, canary_header };
        let (version, role) = match pinned {
            Some(v) => (v.to_string(), Role::Primary),
            None => e.routing.pick(name, &caller, draw(), e.rolled_back.is_some()),
        };
        let target = |v: &str| -> Result<Target, ServiceError> {
            match e.versions.get(v).map(|x| &x.state) {
                None => Err(ServiceError::model_not_found(&format!("{name}@{v}"))),
                Some(State::Ready(t)) => Ok(t.clone()),
                Some(State::Loading) => Err(ServiceError::not_ready(&format!("{name}@{v}"))),
                Some(State::Failed(m)) => Err(ServiceError::internal(format!("`{name}@{v}` failed to load: {m}"))),
            }
        };
        let chosen = target(&version)?;
        let shadow = if pinned.is_none() {
            e.routing.shadow_for(&version, draw()).and_then(|s| target(s).ok().map(|t| (s.to_string(), t)))
        } else {
            None
        };
        Ok(Routed { name: name.to_string(), version, role, target: chosen, shadow })
    }

    /// Counts a finished request; a canary's requests also feed its rollback window.
    pub fn record(&self, name: &str, version: &str, role: Role, outcome: Outcome, secs: f64) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), version.to_string(), role, outcome))
            .or_insert(0) += 1;
        self.durations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), version.to_string(), role))
            .or_insert_with(|| Histogram::new(DURATION_BOUNDS))
            .observe(secs);
        if role != Role::Canary || outcome == Outcome::ClientError {
            return;
        }
        let mut entries = self.write();
        let Some(e) = entries.get_mut(name) else { return };
        if e.rolled_back.is_some() || e.routing.canary.as_deref() != Some(version) {
            return;
        }
        let now = Instant::now();
        e.canary_window.push(now, outcome == Outcome::Ok, secs);
        let rule = e.routing.rollback.clone().unwrap_or_default();
        let stats = e.canary_window.stats(now, Duration::from_secs_f64(rule.window_s));
        if let Some(reason) = rule.verdict(&stats) {
            tracing::warn!(model = name, version, "canary rolled back: {reason}");
            e.rolled_back = Some(RollbackEvent { version: version.to_string(), reason, at_unix: now_unix() });
            *self
                .rollbacks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((name.to_string(), version.to_string()))
                .or_insert(0) += 1;
        }
    }

    /// `(name, kind, ready)` of every public name and every `name@version` (for /v1/models).
    pub fn served(&self) -> Vec<(String, ModelKind, bool)> {
        let mut out = Vec::new();
        for (name, e) in self.read().iter() {
            let ready = |v: &Version| matches!(v.state, State::Ready(_));
            out.push((name.clone(), e.kind, e.versions.values().any(ready)));
            for (v, x) in &e.versions {
                out.push((format!("{name}@{v}"), e.kind, ready(x)));
            }
        }
        out
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The admin API's view of one name.
    pub fn describe(&self, name: &str) -> Option<ModelView> {
        let entries = self.read();
        let e = entries.get(name)?;
        let counts = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let rolled_back = e.rolled_back.is_some();
        let shares: HashMap<String, f64> = e.routing.shares(rolled_back).into_iter().collect();
        let versions = e
            .versions
            .iter()
            .map(|(v, x)| {
                let (state, error) = match &x.state {
                    State::Loading => (VersionState::Loading, None),
                    State::Ready(_) => (VersionState::Ready, None),
                    State::Failed(m) => (VersionState::Failed, Some(m.clone())),
                };
                let mut requests: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
                for ((n, ver, role, outcome), c) in counts.iter() {
                    if n == name && ver == v {
                        requests.entry(role.as_str().to_string()).or_default().insert(outcome.as_str().to_string(), *c);
                    }
                }
                let endpoints = match &x.state {
                    State::Ready(Target::Upstream(p)) => Some(p.describe()),
                    _ => None,
                };
                VersionView {
                    version: v.clone(),
                    backend: x.backend.to_string(),
                    state,
                    error,
                    spec: x.spec.clone(),
                    share: shares.get(v).copied().unwrap_or(0.0),
                    registered: x.registered_unix,
                    requests,
                    endpoints,
                }
            })
            .collect();
        Some(ModelView {
            name: name.to_string(),
            kind: e.kind,
            routing: e.routing.clone(),
            rolled_back: e.rolled_back.as_ref().map(|r| RolledBack { version: r.version.clone(), reason: r.reason.clone(), at: r.at_unix }),
            versions,
        })
    }

    pub fn list(&self) -> Vec<ModelView> {
        self.names().iter().filter_map(|n| self.describe(n)).collect()
    }

    /// Runs the upstream health checks on one background thread (started with the first pool).
    fn start_health_checks(self: &Arc<Self>) {
        let mut slot = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        *slot = std::thread::Builder::new()
            .name("upstream-health".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                let client = reqwest::Client::new();
                let mut last: HashMap<usize, Instant> = HashMap::new();
                rt.block_on(async move {
                    loop {
                        let Some(this) = weak.upgrade() else { return };
                        let pools: Vec<Arc<Pool>> = this
                            .read()
                            .values()
                            .flat_map(|e| e.versions.values())
                            .filter_map(|v| match &v.state {
                                State::Ready(Target::Upstream(p)) => Some(p.clone()),
                                _ => None,
                            })
                            .collect();
                        drop(this);
                        let now = Instant::now();
                        let due: Vec<Arc<Pool>> = pools
                            .into_iter()
                            .filter(|p| {
                                let key = Arc::as_ptr(p) as usize;
                                let every = Duration::from_secs_f64(p.spec.health_interval_s);
                                // Endpoints start healthy; the first check comes one interval in.
                                let since = *last.entry(key).or_insert(now);
                                let is_due = now.duration_since(since) >= every;
                                if is_due {
                                    last.insert(key, now);
                                }
                                is_due
                            })
                            .collect();
                        futures::future::join_all(due.iter().map(|p| p.check_health(&client))).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            })
            .ok();
    }

    /// Prometheus text of routing, outcomes, durations, rollbacks and upstream endpoints.
    pub fn render(&self, out: &mut String) {
        let mut m = MetricsText::new(&[
            ("ragway_model_requests_total", "counter", "Requests by public model, version, routing role and outcome (ok, client_error, error)."),
            ("ragway_model_routing_share", "gauge", "Configured share of a model's traffic per version (after any rollback)."),
            ("ragway_model_version_ready", "gauge", "1 when a model version is loaded and serving."),
            ("ragway_model_canary_rolled_back", "gauge", "1 when a model's canary was rolled back automatically."),
            ("ragway_model_rollbacks_total", "counter", "Automatic canary rollbacks by model and version."),
            ("ragway_upstream_requests_total", "counter", "Requests sent to upstream endpoints by outcome."),
            ("ragway_upstream_in_flight", "gauge", "Requests in flight per upstream endpoint."),
            ("ragway_upstream_healthy", "gauge", "1 when an upstream endpoint passed its last health check."),
            ("ragway_upstream_circuit_open", "gauge", "1 while an upstream endpoint's circuit is open."),
        ]);
        let label = |n: &str, v: &str| format!("model=\"{}\",version=\"{}\"", crate::telemetry::escape(n), crate::telemetry::escape(v));
        for ((n, v, role, outcome), c) in self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let l = format!("{},role=\"{}\",outcome=\"{}\"", label(n, v), role.as_str(), outcome.as_str());
            m.add("ragway_model_requests_total", &l, *c as f64);
        }
        for ((n, v), c) in self.rollbacks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            m.add("ragway_model_rollbacks_total", &label(n, v), *c as f64);
        }
        for (n, e) in self.read().iter() {
            for (v, share) in e.routing.shares(e.rolled_back.is_some()) {
                m.add("ragway_model_routing_share", &label(n, &v), share);
            }
            m.add("ragway_model_canary_rolled_back", &format!("model=\"{}\"", crate::telemetry::escape(n)), f64::from(u8::from(e.rolled_back.is_some())));
            for (v, x) in &e.versions {
                m.add("ragway_model_version_ready", &label(n, v), f64::from(u8::from(matches!(x.state, State::Ready(_)))));
                if let State::Ready(Target::Upstream(p)) = &x.state {
                    p.render(&label(n, v), &mut m);
                }
            }
        }
        m.render(out);
        let name = "ragway_model_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Request duration by public model, version and routing role (to the response head for streams).");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((n, v, role), h) in self.durations.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            crate::telemetry::write_histogram_series(out, name, &format!("{},role=\"{}\"", label(n, v), role.as_str()), h);
        }
    }
}
