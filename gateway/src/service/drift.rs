//! Drift monitoring of a collection's queries (see `ragway_index::drift`): the report, a
//! reference made from given queries, and forgetting the reference.

use crate::app::AppState;
use crate::service::collections::index;
use crate::service::error::ServiceError;
use serde::Deserialize;
use serde_json::{json, Value};

/// The body of `PUT /v1/collections/{name}/drift/reference`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftReference {
    /// The queries whose embeddings become the reference distribution.
    pub queries: Vec<String>,
}

/// The collection's drift state: KS, PSI, low-score share, grounding, alert.
pub fn report_of(state: &AppState, collection: &str) -> Result<Value, ServiceError> {
    let c = index(state)?.get(collection)?;
    let mut v = json!(c.drift().report());
    v["collection"] = json!(collection);
    Ok(v)
}

pub async fn set_reference_of(state: &AppState, collection: &str, queries: Vec<String>) -> Result<Value, ServiceError> {
    let c = index(state)?.get(collection)?;
    // Embedding the queries blocks: off the HTTP worker.
    crate::service::limits::blocking(move || c.set_drift_reference(&queries).map_err(ServiceError::from)).await?;
    report_of(state, collection)
}

pub fn reset_of(state: &AppState, collection: &str) -> Result<Value, ServiceError> {
    index(state)?.get(collection)?.drift().reset();
    report_of(state, collection)
}

