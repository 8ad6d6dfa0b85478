//! Sentence embeddings with BERT-family sentence-transformers models.
//!
//! [`Embedder`] is the synchronous model: it tokenizes like sentence-transformers (the
//! model's `tokenizer.json`, truncated to `max_seq_length`, never padded), runs the packed
//! [`bert::BertEncoder`] over length-sorted batches capped by a token budget, pools and
//! normalizes. [`worker::EmbedWorker`] puts one on its own thread behind a bounded queue.

pub mod bert;
pub mod config;
pub mod worker;

pub use config::{Pooling, SentenceConfig};

use crate::error::{EngineError, Result};
use crate::models::{resolve_model_dir, SENTENCE_TRANSFORMER_FILES};
use bert::{BertEncoder, Threads};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tokenizers::{Encoding, PostProcessor, Token, Tokenizer, TruncationDirection};

/// One input to embed: a text, or token ids of the model's vocabulary (special tokens are
/// added as for a text).
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl From<&str> for EmbedInput {
    fn from(s: &str) -> Self {
        EmbedInput::Text(s.to_string())
    }
}

impl From<String> for EmbedInput {
    fn from(s: String) -> Self {
        EmbedInput::Text(s)
    }
}

/// A tokenized input, as fed to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids, special tokens included, at most `max_seq_length`.
    pub ids: Vec<u32>,
    /// Length the input would have had without truncation (special tokens included).
    pub untruncated_len: usize,
}

impl Tokenized {
    /// Whether the input was cut to `max_seq_length`.
    pub fn truncated(&self) -> bool {
        self.untruncated_len > self.ids.len()
    }
}

/// One embedding with its token accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens fed to the model.
    pub num_tokens: usize,
    /// The input was longer than `max_seq_length` and was truncated.
    pub truncated: bool,
}

/// Options of an [`Embedder`].
#[derive(Debug, Clone)]
pub struct EmbedderOptions {
    pub device: Device,
    /// Cap on the tokens of one forward pass (sum of sequence lengths; there is no padding).
    pub max_batch_tokens: usize,
    /// Cap on the sequences of one forward pass.
    pub max_batch_size: usize,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, max_batch_tokens: 4096, max_batch_size: 256 }
    }
}

/// A loaded sentence-transformers model (see the module docs).
pub struct Embedder {
    tokenizer: Tokenizer,
    encoder: BertEncoder,
    sentence: SentenceConfig,
    options: EmbedderOptions,
    special_tokens: usize,
    dir: PathBuf,
}

impl Embedder {
    /// Resolves `source` (local path, models directory, hub) and loads it.
    pub fn from_source(source: &str, models_dir: &Path, options: EmbedderOptions) -> Result<Self> {
        let dir = resolve_model_dir(source, models_dir, SENTENCE_TRANSFORMER_FILES)?;
        Self::load(&dir, options)
    }

    /// Loads a model from a folder with `config.json`, `model.safetensors`, `tokenizer.json`
    /// and (optionally) the sentence-transformers module files.
    pub fn load(dir: &Path, options: EmbedderOptions) -> Result<Self> {
        let invalid = |reason: String| EngineError::InvalidModel { path: dir.to_path_buf(), reason };
        let config_text = std::fs::read_to_string(dir.join("config.json"))?;
        let config: candle_transformers::models::bert::Config =
            serde_json::from_str(&config_text).map_err(|e| invalid(format!("config.json: {e}")))?;
        let sentence = SentenceConfig::load(dir, config.max_position_embeddings)?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
        // tokenizer.json may carry its own truncation (128 for MiniLM) and fixed padding;
        // sentence-transformers ignores both, and so do we: we truncate to max_seq_length.
        tokenizer.with_truncation(None).map_err(|e| invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        let special_tokens = tokenizer.get_post_processor().map(|p| p.added_tokens(false)).unwrap_or(0);
        if special_tokens >= sentence.max_seq_length {
            return Err(invalid("max_seq_length leaves no room for text".into()));
        }
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is memory-mapped read-only; ragway never writes model files.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &options.device)? };
        let encoder = BertEncoder::load(vb, &config).map_err(|e| invalid(e.to_string()))?;
        tracing::info!(
            model = %dir.display(),
            hidden = config.hidden_size,
            layers = config.num_hidden_layers,
            pooling = ?sentence.pooling,
            normalize = sentence.normalize,
            max_seq_length = sentence.max_seq_length,
            "embedding model loaded"
        );
        Ok(Self { tokenizer, encoder, sentence, options, special_tokens, dir: dir.to_path_buf() })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// Longest input in tokens (special tokens included); longer inputs are truncated.
    pub fn max_seq_length(&self) -> usize {
        self.sentence.max_seq_length
    }

    /// The sentence-transformers settings in use.
    pub fn sentence_config(&self) -> &SentenceConfig {
        &self.sentence
    }

    /// Vocabulary size (valid token ids are below it).
    pub fn vocab_size(&self) -> usize {
        self.encoder.config().vocab_size
    }

    /// The folder the model was loaded from.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The tokenizer (truncation and padding disabled).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes one input, truncating to `max_seq_length` and adding special tokens.
    pub fn tokenize(&self, input: &EmbedInput) -> Result<Tokenized> {
        let raw = match input {
            EmbedInput::Text(t) => {
                self.tokenizer.encode_fast(t.as_str(), false).map_err(|e| EngineError::Tokenizer(e.to_string()))?
            }
            EmbedInput::Tokens(ids) => Encoding::from_tokens(
                ids.iter()
                    .map(|&id| Token::new(id, self.tokenizer.id_to_token(id).unwrap_or_default(), (0, 0)))
                    .collect(),
                0,
            ),
        };
        let untruncated_len = raw.len() + self.special_tokens;
        let mut raw = raw;
        if untruncated_len > self.sentence.max_seq_length {
            raw.truncate(self.sentence.max_seq_length - self.special_tokens, 0, TruncationDirection::Right);
        }
        let enc = self.tokenizer.post_process(raw, None, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Tokenized { ids: enc.get_ids().to_vec(), untruncated_len })
    }

    /// Checks caller input (see [`EngineError`]) and tokenizes it in parallel.
    pub fn tokenize_checked(&self, inputs: &[EmbedInput]) -> Result<Vec<Tokenized>> {
        validate_inputs(inputs, self.vocab_size())?;
        inputs.par_iter().map(|i| self.tokenize(i)).collect()
    }

    /// Embeds texts (no input checks beyond the tokenizer's: an empty text is embedded as
    /// sentence-transformers does, from its special tokens alone).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Embedding>> {
        let tokenized: Vec<Tokenized> =
            texts.par_iter().map(|t| self.tokenize(&EmbedInput::Text((*t).to_string()))).collect::<Result<_>>()?;
        self.embed_tokenized(&tokenized)
    }

    /// Embeds tokenized inputs; results come back in input order.
    pub fn embed_tokenized(&self, inputs: &[Tokenized]) -> Result<Vec<Embedding>> {
        let lens: Vec<usize> = inputs.iter().map(|t| t.ids.len()).collect();
        // On a multi-core CPU, work of more than a few hundred tokens is cut into at least
        // four batches per thread that run in parallel, each with single-threaded matmuls:
        // that uses each core better than splitting every product across threads, and
        // rayon balances the uneven batches. Small work runs as one batch with the
        // products split across threads.
        let total: usize = lens.iter().sum();
        let pool = rayon::current_num_threads();
        let data_parallel = self.options.device.is_cpu() && pool > 1 && total >= 512;
        let (max_tokens, max_seqs) = if data_parallel {
            let parts = pool * 4;
            (
                self.options.max_batch_tokens.min(total.div_ceil(parts)),
                self.options.max_batch_size.min(inputs.len().div_ceil(parts)).max(1),
            )
        } else {
            (self.options.max_batch_tokens, self.options.max_batch_size)
        };
        let batches = plan_batches(&lens, max_tokens, max_seqs);
        let run = |batch: &Vec<usize>, threads: Threads| {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| inputs[i].ids.as_slice()).collect();
            self.embed_batch(&seqs, threads)
        };
        let results: Vec<Vec<Vec<f32>>> = if data_parallel {
            batches.par_iter().map(|b| run(b, Threads::Single)).collect::<Result<_>>()?
        } else {
            batches.iter().map(|b| run(b, Threads::IntraOp)).collect::<Result<_>>()?
        };
        let mut out: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        for (batch, vectors) in batches.iter().zip(results) {
            for (i, v) in batch.iter().zip(vectors) {
                out[*i] = Some(v);
            }
        }
        Ok(inputs
            .iter()
            .zip(out)
            .map(|(t, v)| Embedding {
                vector: v.expect("every input is in exactly one batch"),
                num_tokens: t.ids.len(),
                truncated: t.truncated(),
            })
            .collect())
    }

    /// One forward pass over a packed batch, then pooling and normalization.
    fn embed_batch(&self, seqs: &[&[u32]], threads: Threads) -> Result<Vec<Vec<f32>>> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let hidden = self.encoder.forward(&ids, &lens, threads)?;
        let hidden = hidden.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let h = self.dim();
        let mut start = 0;
        let mut vectors = Vec::with_capacity(seqs.len());
        for &len in &lens {
            let rows = &hidden[start * h..(start + len) * h];
            let mut v = pool(rows, h, self.sentence.pooling);
            if self.sentence.normalize {
                l2_normalize(&mut v);
            }
            vectors.push(v);
            start += len;
        }
        Ok(vectors)
    }
}

/// Rejects what a caller must not send: no inputs, an empty text or token list, token ids
/// outside the vocabulary.
pub fn validate_inputs(inputs: &[EmbedInput], vocab_size: usize) -> Result<()> {
    if inputs.is_empty() {
        return Err(EngineError::EmptyInput);
    }
    for (index, input) in inputs.iter().enumerate() {
        match input {
            EmbedInput::Text(t) if t.is_empty() => return Err(EngineError::EmptyText { index }),
            EmbedInput::Tokens(ids) if ids.is_empty() => return Err(EngineError::EmptyText { index }),
            EmbedInput::Tokens(ids) => {
                if let Some(&token_id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(EngineError::InvalidTokenId { index, token_id, vocab_size });
                }
            }
            EmbedInput::Text(_) => {}
        }
    }
    Ok(())
}

/// Converts caller bytes to an input, rejecting invalid UTF-8 with its position.
pub fn input_from_bytes(index: usize, bytes: Vec<u8>) -> Result<EmbedInput> {
    String::from_utf8(bytes)
        .map(EmbedInput::Text)
        .map_err(|e| EngineError::InvalidUtf8 { index, valid_up_to: e.utf8_error().valid_up_to() })
}

/// Groups input indices into batches: longest first (so lengths within a batch are close),
/// each batch at most `max_tokens` tokens and `max_seqs` sequences. A single input longer
/// than `max_tokens` gets a batch of its own.
pub fn plan_batches(lens: &[usize], max_tokens: usize, max_seqs: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut tokens = 0;
    for i in order {
        if !current.is_empty() && (tokens + lens[i] > max_tokens || current.len() >= max_seqs) {
            batches.push(std::mem::take(&mut current));
            tokens = 0;
        }
        tokens += lens[i];
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn pool(rows: &[f32], h: usize, pooling: Pooling) -> Vec<f32> {
    let n = rows.len() / h;
    match pooling {
        Pooling::Cls => rows[..h].to_vec(),
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let mut v = vec![0f32; h];
            for row in rows.chunks_exact(h) {
                for (a, b) in v.iter_mut().zip(row) {
                    *a += b;
                }
            }
            let div = if pooling == Pooling::Mean { n as f32 } else { (n as f32).sqrt() };
            v.iter_mut().for_each(|a| *a /= div);
            v
        }
        Pooling::Max => {
            let mut v = vec![f32::NEG_INFINITY; h];
            for row in rows.chunks_exact(h) {
                for (a, b) in v.iter_mut().zip(row) {
                    *a = a.max(*b);
                }
            }
            v
        }
    }
}

/// L2 normalization as `torch.nn.functional.normalize` does it (norm clamped at 1e-12).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_cover_all() {
        let lens = [5, 100, 3, 50, 50, 7, 300];
        let b = plan_batches(&lens, 120, 3);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for batch in &b {
            assert!(batch.len() <= 3);
            let t: usize = batch.iter().map(|&i| lens[i]).sum();
            assert!(t <= 120 || batch.len() == 1, "{batch:?}");
        }
        // Longest first: the oversize input stands alone in the first batch.
        assert_eq!(b[0], vec![6]);
    }

    #[test]
    fn pooling_modes() {
        let rows = [1.0, 2.0, 3.0, 6.0];
        assert_eq!(pool(&rows, 2, Pooling::Mean), vec![2.0, 4.0]);
        assert_eq!(pool(&rows, 2, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&rows, 2, Pooling::Max), vec![3.0, 6.0]);
        let s = 2f32.sqrt();
        assert_eq!(pool(&rows, 2, Pooling::MeanSqrtLen), vec![4.0 / s, 8.0 / s]);
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn validation_errors() {
        assert!(matches!(validate_inputs(&[], 10), Err(EngineError::EmptyInput)));
        assert!(matches!(validate_inputs(&["a".into(), "".into()], 10), Err(EngineError::EmptyText { index: 1 })));
        assert!(matches!(
            validate_inputs(&[EmbedInput::Tokens(vec![1, 12])], 10),
            Err(EngineError::InvalidTokenId { index: 0, token_id: 12, vocab_size: 10 })
        ));
        assert!(matches!(
            input_from_bytes(2, vec![b'o', b'k', 0xff]),
            Err(EngineError::InvalidUtf8 { index: 2, valid_up_to: 2 })
        ));
    }
}
