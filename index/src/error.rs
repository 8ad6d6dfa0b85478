//! The index's one error type. The gateway maps each variant to an HTTP status in one place.

use std::path::PathBuf;

pub type Result<T, E = IndexError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A request parameter is invalid; `param` names it.
    #[error("{message}")]
    InvalidRequest { param: Option<String>, message: String },
    #[error("collection `{0}` does not exist")]
    CollectionNotFound(String),
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    #[error("document `{id}` does not exist in collection `{collection}`")]
    DocumentNotFound { collection: String, id: String },
    #[error("job `{0}` does not exist")]
    JobNotFound(String),
    /// Something the server is configured to refuse (e.g. server-side paths).
    #[error("{0}")]
    Forbidden(String),
    /// The data directory is used by another process (single-writer rule).
    #[error("data directory {path} is locked by another ragway process")]
    Locked { path: PathBuf },
    /// The embedding model is busy; retry later.
    #[error("embedding queue is full; retry later")]
    Busy,
    /// The storage engine cannot be reached (a database down or restarting); retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("embedding failed: {0}")]
    Embed(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("keyword index error: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("{0}")]
    Internal(String),
}

impl IndexError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        IndexError::InvalidRequest { param: Some(param.into()), message: message.into() }
    }

    /// True when the caller, not the server, is at fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            IndexError::InvalidRequest { .. }
                | IndexError::CollectionNotFound(_)
                | IndexError::CollectionExists(_)
                | IndexError::DocumentNotFound { .. }
                | IndexError::JobNotFound(_)
                | IndexError::Forbidden(_)
        )
    }
}

impl From<ragway_engine::EngineError> for IndexError {
    fn from(e: ragway_engine::EngineError) -> Self {
        match e {
            ragway_engine::EngineError::QueueFull { .. } => IndexError::Busy,
            other => IndexError::Embed(other.to_string()),
        }
    }
}

impl From<serde_json::Error> for IndexError {
    fn from(e: serde_json::Error) -> Self {
        IndexError::Corrupt(e.to_string())
    }
}
