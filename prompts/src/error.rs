//! One error type for the registry and the RAG pipeline; the gateway maps it to HTTP.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PromptError {
    /// Bad template source or render input: 400, naming the field (`variables.question`,
    /// `template`, `source`) and, where known, the line of the template file.
    #[error("{message}")]
    Invalid { param: String, message: String, line: Option<usize> },
    /// Unknown template, version, label, few-shot set or collection: 404.
    #[error("{0}")]
    NotFound(String),
    /// A version that exists with other content, or a write to a file-defined template: 409.
    #[error("{0}")]
    Conflict(String),
    /// The retrieval half failed.
    #[error(transparent)]
    Index(#[from] ragway_index::IndexError),
    /// The model failed (queue full, context too long, ...).
    #[error(transparent)]
    Engine(#[from] ragway_engine::EngineError),
    #[error("prompt store: {0}")]
    Io(String),
}

impl PromptError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        PromptError::Invalid { param: param.into(), message: message.into(), line: None }
    }

    pub fn at_line(param: impl Into<String>, line: usize, message: impl Into<String>) -> Self {
        PromptError::Invalid { param: param.into(), message: message.into(), line: Some(line) }
    }
}

impl From<std::io::Error> for PromptError {
    fn from(e: std::io::Error) -> Self {
        PromptError::Io(e.to_string())
    }
}

pub type Result<T, E = PromptError> = std::result::Result<T, E>;
