//! What the index needs from an embedding model: its tokenizer (chunking counts tokens with
//! it) and blocking embedding of token ids. Implemented for the engine's worker handle (the
//! server) and for a bare [`Embedder`] (tools and tests).

use crate::error::{IndexError, Result};
use ragway_engine::embed::worker::EmbedHandle;
use ragway_engine::embed::{EmbedInput, Embedder, Tokenized};
use ragway_engine::EngineError;
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;

pub trait ChunkEmbedder: Send + Sync {
    fn model_id(&self) -> &str;
    fn dim(&self) -> usize;
    fn tokenizer(&self) -> &Tokenizer;
    /// Tokens the model takes without truncation, special tokens excluded.
    fn max_input_tokens(&self) -> usize;
    /// Embeds token-id inputs (special tokens are added); blocks until done.
    fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>>;

    /// Embeds a query text.
    fn embed_query(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.embed_text_batch(&[text.to_string()])?.pop().expect("one input, one vector"))
    }

    /// Embeds texts, each truncated to the model's input limit; blocks until done.
    fn embed_text_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = texts
            .iter()
            .map(|t| {
                let enc = self.tokenizer().encode(t.as_str(), false).map_err(|e| IndexError::Internal(format!("tokenizer: {e}")))?;
                let mut ids = enc.get_ids().to_vec();
                ids.truncate(self.max_input_tokens());
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(ids)
    }
}

fn special_tokens(tokenizer: &Tokenizer) -> usize {
    tokenizer.get_post_processor().map(|p| tokenizers::PostProcessor::added_tokens(p, false)).unwrap_or(0)
}

fn tokenize_ids(embedder: &Embedder, inputs: Vec<Vec<u32>>) -> Result<Vec<Tokenized>> {
    inputs.into_iter().map(|ids| embedder.tokenize(&EmbedInput::Tokens(ids)).map_err(IndexError::from)).collect()
}

impl ChunkEmbedder for EmbedHandle {
    fn model_id(&self) -> &str {
        EmbedHandle::model_id(self)
    }

    fn dim(&self) -> usize {
        self.embedder().dim()
    }

    fn tokenizer(&self) -> &Tokenizer {
        self.embedder().tokenizer()
    }

    fn max_input_tokens(&self) -> usize {
        self.embedder().max_seq_length() - special_tokens(self.embedder().tokenizer())
    }

    fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let tokenized = tokenize_ids(self.embedder(), inputs)?;
        // Bulk work yields to interactive traffic: a full queue is waited out, not failed.
        let mut delay = Duration::from_millis(5);
        loop {
            match futures::executor::block_on(self.embed_tokenized(tokenized.clone())) {
                Ok(out) => return Ok(out.into_iter().map(|e| e.vector).collect()),
                Err(EngineError::QueueFull { .. }) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The model a server is still loading, under the id it will be served as: collections
/// open (their logs, graphs and tables read) while the model loads, and whatever needs the
/// model itself — its dimension, its tokenizer, embedding — waits for it.
pub struct LateEmbedder {
    model_id: String,
    model: std::sync::OnceLock<Arc<dyn ChunkEmbedder>>,
}

impl LateEmbedder {
    pub fn new(model_id: impl Into<String>) -> Self {
        LateEmbedder { model_id: model_id.into(), model: std::sync::OnceLock::new() }
    }

    /// Hands over the loaded model (the first one given stays).
    pub fn arrive(&self, model: Arc<dyn ChunkEmbedder>) {
        let _ = self.model.set(model);
    }

    fn model(&self) -> &dyn ChunkEmbedder {
        self.model.wait().as_ref()
    }
}

impl ChunkEmbedder for LateEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn dim(&self) -> usize {
        self.model().dim()
    }

    fn tokenizer(&self) -> &Tokenizer {
        self.model().tokenizer()
    }

    fn max_input_tokens(&self) -> usize {
        self.model().max_input_tokens()
    }

    fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        self.model().embed_ids(inputs)
    }
}

/// A bare model, run on the calling thread.
pub struct LocalEmbedder {
    pub model_id: String,
    pub embedder: Embedder,
}

impl ChunkEmbedder for LocalEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn dim(&self) -> usize {
        self.embedder.dim()
    }

    fn tokenizer(&self) -> &Tokenizer {
        self.embedder.tokenizer()
    }

    fn max_input_tokens(&self) -> usize {
        self.embedder.max_seq_length() - special_tokens(self.embedder.tokenizer())
    }

    fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let tokenized = tokenize_ids(&self.embedder, inputs)?;
        Ok(self.embedder.embed_tokenized(&tokenized)?.into_iter().map(|e| e.vector).collect())
    }
}
