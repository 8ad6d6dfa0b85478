//! Drift monitoring of a collection's queries (see `ragway_index::drift`): the report, a
//! reference made from given queries, and forgetting the reference.

use crate::app::AppState;
use crate::service::collections::index;
use crate::service::error::ServiceError;
use ragway_index::drift::DriftReport;
use serde::{Deserialize, Serialize};

/// The body of `PUT /v1/collections/{name}/drift/reference`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftReference {
    /// The queries whose embeddings become the reference distribution.
    pub queries: Vec<String>,
}

/// A collection's drift report (`GET /v1/collections/{name}/drift`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DriftView {
    pub collection: String,
    #[serde(flatten)]
    pub report: DriftReport,
}

/// The collection's drift state: KS, PSI, low-score share, grounding, alert.
pub fn report_of(state: &AppState, collection: &str) -> Result<DriftView, ServiceError> {
    let c = index(state)?.get(collection)?;
    Ok(DriftView { collection: collection.to_string(), report: c.drift().report() })
}

pub async fn set_reference_of(state: &AppState, collection: &str, queries: Vec<String>) -> Result<DriftView, ServiceError> {
    let c = index(state)?.get(collection)?;
    // Embedding the queries blocks: off the HTTP worker.
    crate::service::limits::blocking(move || c.set_drift_reference(&queries).map_err(ServiceError::from)).await?;
    report_of(state, collection)
}

pub fn reset_of(state: &AppState, collection: &str) -> Result<DriftView, ServiceError> {
    index(state)?.get(collection)?.drift().reset();
    report_of(state, collection)
}

