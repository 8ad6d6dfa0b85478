//! The decoder's tokenizer: `tokenizer.json` beside the model when there is one, otherwise
//! rebuilt from the GGUF metadata (`tokenizer.ggml.*`): a byte-level BPE with the
//! pre-tokenizer that llama.cpp uses for the file's `tokenizer.ggml.pre`, or a SentencePiece
//! BPE (scores, byte fallback) as llama.cpp runs `llama`-type vocabularies ([`SentencePiece`],
//! compact). Also the incremental detokenizer used by streaming.

use super::spm::{byte_piece, token_type, SentencePiece};
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::sync::Arc;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's llama-3 pre-tokenizer regex (`llama-bpe`, `llama3`, `smaug-bpe`).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's qwen2 pre-tokenizer regex.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A decoder tokenizer with its special ids. Clones share the vocabulary.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Vocabulary>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether a BOS token starts every prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Tokens that end generation: EOS and the end-of-turn tokens of chat formats.
    pub stop_ids: Vec<u32>,
}

/// The vocabulary and its encoding: a `tokenizers` tokenizer (byte-level BPE from GGUF
/// merges, or any `tokenizer.json`), or a GGUF SentencePiece vocabulary. Held once, behind
/// an `Arc`, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Vocabulary {
    Hf(Tokenizer),
    Spm(SentencePiece),
}

impl TextTokenizer {
    /// From GGUF metadata: `tokenizer.ggml.model = gpt2` (byte-level BPE with merges) or
    /// `llama` (SentencePiece: pieces with scores, byte fallback).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = |k: &str| content.metadata.get(k);
        let err = |m: String| EngineError::Tokenizer(m);
        let model = md("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let tokens = strings(md("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
        let types = token_types(content, tokens.len());
        let mut tk = match model.as_str() {
            "gpt2" => Self::byte_level_bpe(content, &tokens)?,
            "llama" => {
                let spm = Self::sentencepiece(content, &tokens, &types)?;
                return Ok(Self::with_vocabulary(content, Vocabulary::Spm(spm)));
            }
            other => {
                return Err(err(format!(
                    "GGUF tokenizer model `{other}` cannot be rebuilt (`gpt2` byte-level BPE and `llama` SentencePiece only); put the model's tokenizer.json beside the GGUF file"
                )))
            }
        };
        add_marked_tokens(&mut tk, &tokens, &types)?;
        Ok(Self::with_vocabulary(content, Vocabulary::Hf(tk)))
    }

    fn with_vocabulary(content: &Content, vocabulary: Vocabulary) -> Self {
        let (bos_id, eos_id, add_bos) = Self::gguf_specials(content);
        let eot = content.metadata.get("tokenizer.ggml.eot_token_id").and_then(|v| v.to_u32().ok());
        let mut this = Self { inner: Arc::new(vocabulary), bos_id, eos_id, add_bos, stop_ids: Vec::new() };
        this.stop_ids = this.end_of_turn_ids(eot);
        this
    }

    /// The tokenizer of a GGUF file, read from its metadata alone (no weights loaded).
    pub fn from_gguf_path(path: &std::path::Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)?;
        let content = Content::read(&mut f)
            .map_err(|e| EngineError::InvalidModel { path: path.to_path_buf(), reason: format!("GGUF: {e}") })?;
        Self::from_gguf(&content)
    }

    /// `gpt2`: the vocabulary and merges as a byte-level BPE, with the pre-tokenizer that
    /// llama.cpp uses for `tokenizer.ggml.pre`.
    fn byte_level_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer> {
        let md = |k: &str| content.metadata.get(k);
        let err = |m: String| EngineError::Tokenizer(m);
        let merges = strings(md("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| err("a merge is not two space-separated tokens".into()))?;
        let bpe =
            BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(format!("BPE from GGUF: {e}")))?;
        let mut tk = Tokenizer::new(bpe);
        let pre =
            md("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "default".into());
        let byte_level = |regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, true, regex));
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?
                .into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            // llama.cpp: `\p{N}` split into single digits, then the GPT-2 regex.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            "gpt2" | "default" => byte_level(true),
            "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![split(REGEX_LLAMA3)?, byte_level(false)]).into(),
            "qwen2" => Sequence::new(vec![split(REGEX_QWEN2)?, byte_level(false)]).into(),
            other => {
                return Err(err(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2); put the model's tokenizer.json beside the GGUF file"
                )))
            }
        };
        tk.with_pre_tokenizer(Some(pre_tokenizer));
        tk.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        Ok(tk)
    }

    /// `llama`: a SentencePiece BPE as llama.cpp runs it — spaces become `▁` (and one leads
    /// the text when `tokenizer.ggml.add_space_prefix`), the whole text is one sequence, and
    /// adjacent pieces merge while their concatenation is a piece, the highest-scoring result
    /// first; characters no piece covers fall back to `<0xXX>` byte pieces.
    fn sentencepiece(content: &Content, tokens: &[String], types: &[i32]) -> Result<SentencePiece> {
        let md = |k: &str| content.metadata.get(k);
        let scores = sentencepiece_scores(content, tokens.len())?;
        let unk = md("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok());
        let space_prefix = md("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
        SentencePiece::new(tokens, scores, types, unk, space_prefix)
    }

    /// A GGUF SentencePiece vocabulary rebuilt as a `tokenizers` BPE whose merges are every
    /// split of every piece into two pieces, ranked by the piece's score — what a
    /// `tokenizer.json` for the file holds. Serving uses the compact [`SentencePiece`] (the
    /// BPE takes ~9x its memory: 74 MiB for Gemma 3's 262,144 pieces); this one is for tools
    /// and for checking the two against each other.
    pub fn sentencepiece_as_bpe(content: &Content) -> Result<Tokenizer> {
        let md = |k: &str| content.metadata.get(k);
        let err = |m: String| EngineError::Tokenizer(m);
        let tokens = strings(md("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
        let tokens = &tokens[..];
        let scores = sentencepiece_scores(content, tokens.len())?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut merges: Vec<(f32, u32, &str, &str)> = Vec::new();
        for (id, piece) in tokens.iter().enumerate() {
            for (k, _) in piece.char_indices().skip(1) {
                let (a, b) = piece.split_at(k);
                if vocab.contains_key(a) && vocab.contains_key(b) {
                    merges.push((scores[id], id as u32, a, b));
                }
            }
        }
        // Highest score first; a piece reachable by several splits keeps them together.
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, a, b)| (a.to_string(), b.to_string())).collect();
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
        let unk = md("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok());
        if let Some(unk) = unk.and_then(|u| tokens.get(u as usize)) {
            builder = builder.unk_token(unk.clone());
        }
        let bpe = builder.build().map_err(|e| err(format!("SentencePiece BPE from GGUF: {e}")))?;
        let mut tk = Tokenizer::new(bpe);
        let space_prefix = md("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
        let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| err(format!("normalizer: {e}")));
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if space_prefix {
            normalizers.push(Prepend::new("▁".into()).into());
        }
        normalizers.push(replace(" ", "▁")?.into());
        tk.with_normalizer(Some(NormalizerSequence::new(normalizers))).map_err(|e| err(format!("normalizer: {e}")))?;
        let mut decoders: Vec<DecoderWrapper> = vec![replace("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
        if space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tk.with_decoder(Some(DecoderSequence::new(decoders)));
        add_marked_tokens(&mut tk, tokens, &token_types(content, tokens.len()))?;
        Ok(tk)
    }

    /// BOS id, EOS id and whether BOS starts every prompt, from GGUF metadata.
    pub fn gguf_specials(content: &Content) -> (Option<u32>, Option<u32>, bool) {
        let id = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
        let add_bos =
            content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"), add_bos)
    }

    /// From a `tokenizer.json` plus the special ids the model declares.
    pub fn from_file(path: &std::path::Path, bos_id: Option<u32>, eos_id: Option<u32>, add_bos: bool) -> Result<Self> {
        let inner =
            Tokenizer::from_file(path).map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut this = Self { inner: Arc::new(Vocabulary::Hf(inner)), bos_id, eos_id, add_bos, stop_ids: Vec::new() };
        this.stop_ids = this.end_of_turn_ids(None);
        Ok(this)
    }

    fn end_of_turn_ids(&self, eot: Option<u32>) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().chain(eot).collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>"] {
            if let Some(id) = self.token_to_id(name) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The `tokenizers` tokenizer, unless the vocabulary is a GGUF SentencePiece one.
    pub fn hf(&self) -> Option<&Tokenizer> {
        match &*self.inner {
            Vocabulary::Hf(t) => Some(t),
            Vocabulary::Spm(_) => None,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &*self.inner {
            Vocabulary::Hf(t) => t.get_vocab_size(true),
            Vocabulary::Spm(s) => s.len(),
        }
    }

    /// The id of a token by its name in the vocabulary (`<end_of_turn>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &*self.inner {
            Vocabulary::Hf(t) => t.token_to_id(token),
            Vocabulary::Spm(s) => s.id_of(token),
        }
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are parsed as
    /// such. With `add_special`, the BOS token starts the sequence when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        match &*self.inner {
            Vocabulary::Hf(t) => {
                let enc = t.encode_fast(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Vocabulary::Spm(s) => ids.extend(s.encode(text)?),
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_as(ids, true)
    }

    /// Text of `ids` with special tokens written out (`<|im_end|>`).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_as(ids, false)
    }

    fn decode_as(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &*self.inner {
            Vocabulary::Hf(t) => t.decode(ids, skip_special).map_err(|e| EngineError::Tokenizer(e.to_string())),
            Vocabulary::Spm(s) => Ok(s.decode(ids, skip_special)),
        }
    }

    /// The token's own text (special tokens included), for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        self.decode_with_special(&[id]).unwrap_or_default()
    }

    /// The name of token `id` in the vocabulary (`<|im_start|>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &*self.inner {
            Vocabulary::Hf(t) => t.id_to_token(id),
            Vocabulary::Spm(s) => (id < s.len() as u32).then(|| s.piece(id).to_string()),
        }
    }

    /// The bytes each token stands for in generated text, by id: what constrained decoding
    /// matches grammars against. Byte-level vocabularies map their characters back to bytes,
    /// SentencePiece ones turn `▁` into a space and `<0xNN>` into its byte. Special tokens
    /// (control tokens, `<|im_end|>`) are `None`: they are never text.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let tk = match &*self.inner {
            Vocabulary::Hf(t) => t,
            Vocabulary::Spm(s) => return (0..s.len() as u32).map(|id| s.token_bytes(id)).collect(),
        };
        #[derive(PartialEq)]
        enum Kind {
            ByteLevel,
            Pieces,
        }
        fn kind_of(d: &DecoderWrapper) -> Option<Kind> {
            match d {
                DecoderWrapper::ByteLevel(_) => Some(Kind::ByteLevel),
                DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => Some(Kind::Pieces),
                DecoderWrapper::Sequence(s) => s.get_decoders().iter().find_map(kind_of),
                _ => None,
            }
        }
        let kind = tk.get_decoder().and_then(kind_of);
        // GPT-2's byte-to-character table: printable Latin-1 maps to itself, the other bytes to
        // U+0100 onwards in byte order.
        let mut char_to_byte = std::collections::HashMap::with_capacity(256);
        let mut next = 0x100u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('\0')
            };
            char_to_byte.insert(c, b);
        }
        let added = tk.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(a) = added.get(&id) {
                    return (!a.special).then(|| a.content.as_bytes().to_vec());
                }
                let piece = tk.id_to_token(id)?;
                Some(match kind {
                    Some(Kind::ByteLevel) => piece.chars().map(|c| char_to_byte.get(&c).copied()).collect::<Option<_>>()?,
                    Some(Kind::Pieces) => match byte_piece(&piece) {
                        Some(b) => vec![b],
                        None => piece.replace('▁', " ").into_bytes(),
                    },
                    None => piece.into_bytes(),
                })
            })
            .collect()
    }
}

/// Control tokens become special added tokens (matched in text, dropped when decoding),
/// user-defined ones plain added tokens (matched in text, kept).
fn add_marked_tokens(tk: &mut Tokenizer, tokens: &[String], types: &[i32]) -> Result<()> {
    let err = |m: String| EngineError::Tokenizer(m);
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
        .map(|(tok, &t)| AddedToken::from(tok.clone(), t == token_type::CONTROL).normalized(false))
        .collect();
    let (specials, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|a| a.special);
    tk.add_special_tokens(specials).map_err(|e| err(format!("special tokens: {e}")))?;
    tk.add_tokens(plain).map_err(|e| err(format!("added tokens: {e}")))?;
    Ok(())
}

/// GGUF token types, one per token (1, normal, where the file has none).
fn token_types(content: &Content, n: usize) -> Vec<i32> {
    match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => {
            let mut t: Vec<i32> = a.iter().map(|v| v.to_i32().unwrap_or(1)).collect();
            t.resize(n, 1);
            t
        }
        _ => vec![1; n],
    }
}

fn sentencepiece_scores(content: &Content, n: usize) -> Result<Vec<f32>> {
    match content.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(a)) if a.len() == n => Ok(a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect()),
        _ => Err(EngineError::Tokenizer("a SentencePiece GGUF needs `tokenizer.ggml.scores`, one per token".into())),
    }
}

fn strings(v: Option<&Value>, name: &str) -> Result<Vec<String>> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| EngineError::Tokenizer(format!("{name}: {e}"))))
            .collect(),
        _ => Err(EngineError::Tokenizer(format!("GGUF metadata has no `{name}` array"))),
    }
}

/// Turns a growing list of token ids into text deltas without splitting a multi-byte
/// character: a delta is released only when the decoded text no longer ends in U+FFFD (an
/// incomplete UTF-8 sequence), and it is decoded with a few tokens of left context so that
/// byte-level merges and leading spaces come out as in a full decode.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Text released by the last token of `ids` (may be empty while bytes are incomplete).
    pub fn step(&mut self, tk: &TextTokenizer, ids: &[u32]) -> Result<String> {
        self.release(tk, ids, false)
    }

    /// Whatever is still held back when the sequence ends (lossy if the bytes never completed).
    pub fn flush(&mut self, tk: &TextTokenizer, ids: &[u32]) -> Result<String> {
        self.release(tk, ids, true)
    }

    /// The text `ids` add after what was already released; unless `last`, nothing while it
    /// ends in an incomplete UTF-8 sequence.
    fn release(&mut self, tk: &TextTokenizer, ids: &[u32], last: bool) -> Result<String> {
        let prefix = tk.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tk.decode(&ids[self.prefix_offset..])?;
        let complete = last || !full.ends_with('\u{FFFD}');
        if full.len() > prefix.len() && complete && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}
