//! # ragway-engine
//!
//! ragway's model engine: candle encoders (BERT family) for embeddings, on CPU (default),
//! CUDA (`cuda` feature) or Metal (`metal`), with the tokenizers, batching and the worker
//! thread that owns each model. No HTTP here: the gateway calls the handles.
//!
//! ```no_run
//! use ragway_engine::embed::{Embedder, EmbedderOptions};
//! use ragway_engine::models::{default_models_dir, DEFAULT_EMBEDDING_MODEL};
//!
//! let embedder = Embedder::from_source(DEFAULT_EMBEDDING_MODEL, &default_models_dir(), EmbedderOptions::default())?;
//! let out = embedder.embed(&["The quick brown fox", "jumps over the lazy dog"])?;
//! assert_eq!(out[0].vector.len(), 384);
//! # Ok::<(), ragway_engine::EngineError>(())
//! ```

pub mod device;
pub mod embed;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod models;
pub mod rng;
pub mod team;

pub use error::{EngineError, Result};
