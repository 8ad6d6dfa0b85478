//! The model registry's admin operations: register a version, describe a model, set its
//! routing, retire a version.

use crate::app::AppState;
use crate::models::routing::Routing;
use crate::models::upstream::UpstreamSpec;
use crate::models::{LocalSpec, ModelKind, ModelView, VersionSpec};
use crate::service::error::ServiceError;
use serde::Deserialize;
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
