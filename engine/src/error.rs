//! The engine's error type: user errors (bad input, full queue) and internal errors
//! (model files, candle) are different variants so that a server maps them to 4xx or 5xx.

use std::path::PathBuf;

/// Errors of the engine crate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The caller sent an empty list of inputs.
    #[error("input must not be empty: give at least one text")]
    EmptyInput,
    /// One input of the list is an empty string (or an empty token list).
    #[error("input[{index}] is empty: every text must contain at least one character")]
    EmptyText { index: usize },
    /// Caller bytes that are not valid UTF-8.
    #[error("input[{index}] is not valid UTF-8 (invalid byte at offset {valid_up_to})")]
    InvalidUtf8 { index: usize, valid_up_to: usize },
    /// A token id outside the model's vocabulary.
    #[error("input[{index}] contains token id {token_id}, outside the vocabulary of {vocab_size} tokens")]
    InvalidTokenId { index: usize, token_id: u32, vocab_size: usize },
    /// Too many inputs in one request.
    #[error("too many inputs: {got} given, at most {max} per request")]
    TooManyInputs { got: usize, max: usize },
    /// The model's request queue is full; retry later.
    #[error("the {model} queue is full ({capacity} requests waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    /// The model worker has stopped (it crashed or the engine shut down).
    #[error("the {model} worker is not running")]
    WorkerStopped { model: String },
    /// Model files could not be found locally nor downloaded.
    #[error("model `{model}` not found: {details}")]
    ModelNotFound { model: String, details: String },
    /// A model file is missing or malformed.
    #[error("invalid model files in {}: {reason}", path.display())]
    InvalidModel { path: PathBuf, reason: String },
    /// A device (cuda, metal) that this build or machine does not provide.
    #[error("device `{0}` is not available: {1}")]
    Device(String, String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request parameter out of range or inconsistent; `param` names it.
    #[error("{message}")]
    InvalidRequest { param: Option<String>, message: String },
    /// The prompt plus the tokens to generate do not fit the model's context (or the KV cache).
    #[error(
        "this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens and {max_tokens} more were requested for the completion ({total} in all). Shorten the prompt or lower max_tokens",
        total = prompt_tokens + max_tokens
    )]
    ContextLengthExceeded { prompt_tokens: usize, max_tokens: usize, context: usize },
    /// Tensor computation failure.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A failure inside the engine, reported to every request it affected.
    #[error("internal error: {0}")]
    Internal(String),
    /// File system failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// True for errors caused by the caller's input (a server answers 4xx), false for
    /// internal failures (5xx).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            EngineError::EmptyInput
                | EngineError::EmptyText { .. }
                | EngineError::InvalidUtf8 { .. }
                | EngineError::InvalidTokenId { .. }
                | EngineError::TooManyInputs { .. }
                | EngineError::InvalidRequest { .. }
                | EngineError::ContextLengthExceeded { .. }
        )
    }
}

/// Result alias of the engine crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
