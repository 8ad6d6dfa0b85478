//! The model registry's admin operations: register a version, describe a model, set its
//! routing, retire a version.

use crate::app::AppState;
use crate::models::routing::Routing;
use crate::models::upstream::UpstreamSpec;
use crate::models::{LocalSpec, ModelKind, ModelView, VersionSpec};
use crate::service::error::ServiceError;
use ragway_engine::generate::GenerateHandle;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of `POST /v1/admin/models`: a version of a public model name.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVersion {
    /// The public model name (created on its first version).
    pub name: String,
    /// `generation` or `embedding`; required for a new name, checked for an existing one.
    #[serde(default)]
    pub kind: Option<ModelKind>,
    pub version: String,
    /// A model this server loads: a name under the models directory or a hub repository.
    #[serde(default)]
    pub local: Option<LocalSpec>,
    /// Upstream servers that serve the version.
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Registers a version; answers the name's description.
pub fn register(state: &AppState, body: RegisterVersion) -> Result<ModelView, ServiceError> {
    let RegisterVersion { name, kind, version, local, upstream, description } = body;
    let mut spec = VersionSpec { version, local, upstream, description };
    if let Some(local) = spec.local.as_mut() {
        local.confine_to(&state.settings.models_dir)?;
    }
    if let Some(upstream) = spec.upstream.as_ref() {
        upstream.check_hosts(&state.settings.upstream_hosts)?;
    }
    state.registry.register(&name, kind, spec)?;
    describe_of(state, &name)
}

/// Registers a version from a JSON body (GraphQL's free-form input).
pub fn register_from(state: &AppState, body: Value) -> Result<ModelView, ServiceError> {
    let body: RegisterVersion =
        serde_json::from_value(body).map_err(|e| ServiceError::invalid("body", format!("invalid version: {e}")))?;
    register(state, body)
}

/// A public name's versions, routing and state.
pub fn describe_of(state: &AppState, name: &str) -> Result<ModelView, ServiceError> {
    state.registry.describe(name).ok_or_else(|| ServiceError::model_not_found(name))
}

/// Puts a routing policy in force for `name`.
pub fn set_routing(state: &AppState, name: &str, routing: Routing) -> Result<ModelView, ServiceError> {
    state.registry.set_routing(name, routing)?;
    describe_of(state, name)
}

/// [`set_routing`] from a JSON body (GraphQL's free-form input).
pub fn set_routing_from(state: &AppState, name: &str, body: Value) -> Result<ModelView, ServiceError> {
    let routing: Routing =
        serde_json::from_value(body).map_err(|e| ServiceError::invalid("routing", format!("invalid routing: {e}")))?;
    set_routing(state, name, routing)
}

/// Retires a version no routing uses; retiring a name's last version removes the name (the
/// answer then lists no versions).
pub fn retire_of(state: &AppState, name: &str, version: &str) -> Result<ModelView, ServiceError> {
    let before = describe_of(state, name)?;
    state.registry.retire(name, version)?;
    Ok(state
        .registry
        .describe(name)
        .unwrap_or(ModelView { versions: Vec::new(), rolled_back: None, routing: Routing::default(), ..before }))
}

/// What a generation request to a model gets for the fields it leaves unset.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GenerationDefaults {
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// Tokens generated at most when a request sets no `max_tokens` (fewer when the prompt
    /// leaves less of the context).
    pub max_tokens: usize,
    /// Tokens of prompt and output together.
    pub context_length: usize,
    /// The fields above whose value the model file recommends; the others are ragway's.
    pub from_model: Vec<String>,
}

impl GenerationDefaults {
    pub fn of(h: &GenerateHandle) -> Self {
        let d = h.default_sampling();
        let m = h.model_sampling();
        let from_model = serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default();
        Self {
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
            max_tokens: h.config().default_max_tokens.min(h.context_length()),
            context_length: h.context_length(),
            from_model,
        }
    }
}

/// The defaults of the local generation engine a request for `id` without a routing key
/// would reach; `None` for embedding models and upstream-served versions.
pub fn generation_defaults(state: &AppState, id: &str) -> Option<GenerationDefaults> {
    let routed = state.registry.route(id, ModelKind::Generation, None, None, &|_| None).ok()?;
    routed.local_generator("model", "this").ok().map(|h| GenerationDefaults::of(&h))
}
