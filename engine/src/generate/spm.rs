//! SentencePiece BPE vocabularies (`tokenizer.ggml.model = llama`) as llama.cpp runs them,
//! held compactly: every piece in one string, a hash table of ids over it, scores and token
//! types in flat arrays. Gemma 3's 262,144 pieces take ~8 MiB this way; the same vocabulary as
//! a `tokenizers` BPE (each piece split into every pair of pieces as merges, 514,847 of them,
//! and a string map each way) took ~74 MiB, 30% of the 241 MiB model file.
//!
//! Encoding: text is cut at control, user-defined and unknown tokens written in it
//! (leftmost-longest); each stretch of plain text gets a leading space when
//! `add_space_prefix`, spaces become `▁`, and its characters merge pairwise while the
//! concatenation of two neighbours is a piece — the highest-scoring merge first, the leftmost
//! among equal scores. Characters no piece covers become their UTF-8 bytes' `<0xXX>` pieces.

use crate::error::{EngineError, Result};
use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use hashbrown::HashTable;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(crate) mod token_type {
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// A SentencePiece vocabulary with llama.cpp's merge order.
pub struct SentencePiece {
    /// Every piece, concatenated; piece `i` is `text[ends[i - 1]..ends[i]]`.
    text: String,
    ends: Vec<u32>,
    scores: Vec<f32>,
    types: Vec<i8>,
    /// Ids, found by their piece's hash.
    index: HashTable<u32>,
    /// Keys are pieces of the fixed vocabulary, so a fast hash is safe: request text only
    /// looks pieces up, it never inserts.
    hasher: rustc_hash::FxBuildHasher,
    /// The id of `<0xXX>` for each byte, where the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    /// Control, user-defined and unknown pieces, matched in text before merging.
    specials: Option<(AhoCorasick, Vec<u32>)>,
    space_prefix: bool,
}

impl std::fmt::Debug for SentencePiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentencePiece").field("pieces", &self.len()).field("space_prefix", &self.space_prefix).finish()
    }
}

/// A candidate merge of the symbol `left` with its right neighbour, `len` bytes together.
/// `rank` orders the queue: the score's bits in total order above the complement of `left`,
/// so that the highest score comes first and the leftmost among equal scores.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    rank: u64,
    right: u32,
    len: u32,
}

impl Bigram {
    fn new(score: f32, left: usize, right: usize, len: usize) -> Self {
        let bits = score.to_bits();
        let ordered = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
        Self { rank: (ordered as u64) << 32 | (u32::MAX - left as u32) as u64, right: right as u32, len: len as u32 }
    }

    fn left(&self) -> usize {
        (u32::MAX - self.rank as u32) as usize
    }
}

/// One symbol of the text being merged: a byte range, linked to its live neighbours (24
/// bytes a character of the request; offsets fit 32 bits, which `merge` checks).
#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    len: u32,
    prev: Option<u32>,
    next: Option<u32>,
}

impl SentencePiece {
    /// From the GGUF vocabulary: pieces, their scores and token types (1, normal, where the
    /// file has none), the unknown token and whether plain text takes a leading space.
    pub fn new(
        pieces: &[String],
        scores: Vec<f32>,
        types: &[i32],
        unk: Option<u32>,
        space_prefix: bool,
    ) -> Result<Self> {
        let err = |m: String| EngineError::Tokenizer(m);
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(err(format!(
                "SentencePiece vocabulary: {} pieces, {} scores, {} token types",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        let total: usize = pieces.iter().map(String::len).sum();
        if total > u32::MAX as usize || pieces.len() > u32::MAX as usize {
            return Err(err("SentencePiece vocabulary larger than 4 GiB".into()));
        }
        let mut text = String::with_capacity(total);
        let mut ends = Vec::with_capacity(pieces.len());
        for p in pieces {
            text.push_str(p);
            ends.push(text.len() as u32);
        }
        let hasher = rustc_hash::FxBuildHasher;
        let piece_of = |i: u32| piece_at(&text, &ends, i as usize);
        let mut index = HashTable::with_capacity(pieces.len());
        for id in 0..pieces.len() as u32 {
            // A piece listed twice resolves to its last id, as in llama.cpp's map.
            let piece = piece_of(id);
            let hash = hasher.hash_one(piece);
            match index.find_mut(hash, |&i| piece_of(i) == piece) {
                Some(slot) => *slot = id,
                None => {
                    index.insert_unique(hash, id, |&i| hasher.hash_one(piece_of(i)));
                }
            }
        }
        let mut this = Self {
            text,
            ends,
            scores,
            types: types.iter().map(|&t| t.clamp(i8::MIN as i32, i8::MAX as i32) as i8).collect(),
            index,
            hasher,
            byte_ids: [None; 256],
            unk: unk.filter(|&u| (u as usize) < pieces.len()),
            specials: None,
            space_prefix,
        };
        for b in 0..=255u8 {
            this.byte_ids[b as usize] = this.id_of(&format!("<0x{b:02X}>"));
        }
        let special: Vec<u32> = (0..this.len() as u32)
            .filter(|&i| {
                let t = this.types[i as usize] as i32;
                !this.piece(i).is_empty()
                    && matches!(t, token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN)
            })
            .collect();
        if !special.is_empty() {
            let ac = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .kind(Some(AhoCorasickKind::ContiguousNFA))
                .build(special.iter().map(|&i| this.piece(i)))
                .map_err(|e| err(format!("special tokens: {e}")))?;
            this.specials = Some((ac, special));
        }
        Ok(this)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The piece of `id` (`▁Paris`, `<0x0A>`); empty past the vocabulary.
    pub fn piece(&self, id: u32) -> &str {
        if (id as usize) < self.len() {
            piece_at(&self.text, &self.ends, id as usize)
        } else {
            ""
        }
    }

    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.types.get(id as usize).map(|&t| t as i32)
    }

    /// The id of a piece.
    pub fn id_of(&self, piece: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(piece);
        self.index.find(hash, |&i| self.piece(i) == piece).copied()
    }

    /// Token ids of `text` (no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let plain = |s: &str, out: &mut Vec<u32>| -> Result<()> {
            if s.is_empty() {
                return Ok(());
            }
            let mut escaped = String::with_capacity(s.len() + 3);
            if self.space_prefix {
                escaped.push('▁');
            }
            escaped.extend(s.chars().map(|c| if c == ' ' { '▁' } else { c }));
            self.merge(&escaped, out)
        };
        let mut at = 0;
        if let Some((ac, ids)) = &self.specials {
            for m in ac.find_iter(text) {
                plain(&text[at..m.start()], &mut out)?;
                out.push(ids[m.pattern().as_usize()]);
                at = m.end();
            }
        }
        plain(&text[at..], &mut out)?;
        Ok(out)
    }

    /// llama.cpp's `llm_tokenizer_spm::tokenize` over one stretch of escaped text.
    fn merge(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if text.len() >= u32::MAX as usize {
            return Err(EngineError::Tokenizer("text of 4 GiB or more".into()));
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            let (start, at) = (start as u32, i as u32);
            symbols.push(Symbol { start, len: c.len_utf8() as u32, prev: at.checked_sub(1), next: None });
            if i > 0 {
                symbols[i - 1].next = Some(at);
            }
        }
        let mut queue = BinaryHeap::new();
        let candidate = |symbols: &[Symbol], left: usize, right: usize| -> Option<Bigram> {
            let (l, r) = (symbols[left], symbols[right]);
            let id = self.id_of(&text[l.start as usize..(r.start + r.len) as usize])?;
            Some(Bigram::new(self.scores[id as usize], left, right, (l.len + r.len) as usize))
        };
        for i in 1..symbols.len() {
            queue.extend(candidate(&symbols, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (left, right) = (b.left(), b.right as usize);
            let (l, r) = (symbols[left], symbols[right]);
            // Stale: one side already merged into another symbol since it was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len || l.next != Some(b.right) {
                continue;
            }
            symbols[left].len += r.len;
            symbols[right].len = 0;
            symbols[left].next = r.next;
            if let Some(n) = r.next {
                symbols[n as usize].prev = Some(left as u32);
            }
            if let Some(p) = symbols[left].prev {
                queue.extend(candidate(&symbols, p as usize, left));
            }
            if let Some(n) = symbols[left].next {
                queue.extend(candidate(&symbols, left, n as usize));
            }
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start as usize..(s.start + s.len) as usize];
            match self.id_of(piece) {
                Some(id) => out.push(id),
                // Only single characters are left unmerged without a piece: their bytes.
                None => {
                    for b in piece.bytes() {
                        match self.byte_ids[b as usize].or(self.unk) {
                            Some(id) => out.push(id),
                            None => {
                                return Err(EngineError::Tokenizer(format!(
                                    "{piece:?} is not in the vocabulary, which has neither byte pieces nor an unknown token"
                                )))
                            }
                        }
                    }
                }
            }
            at = s.next.map(|n| n as usize);
        }
        Ok(())
    }

    /// The text of `ids`: `▁` becomes a space, runs of `<0xXX>` pieces their bytes (each
    /// byte of a run that is not UTF-8 one U+FFFD), one leading space dropped when the
    /// vocabulary adds one; control tokens are left out with `skip_special`. Ids past the
    /// vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut text = String::new();
        let mut run: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<u8>, text: &mut String| {
            match std::str::from_utf8(run) {
                Ok(s) => text.push_str(s),
                Err(_) => text.extend(std::iter::repeat_n('\u{FFFD}', run.len())),
            }
            run.clear();
        };
        for &id in ids {
            if id as usize >= self.len() || (skip_special && self.token_type(id) == Some(token_type::CONTROL)) {
                continue;
            }
            let piece = self.piece(id);
            match byte_piece(piece) {
                Some(b) => run.push(b),
                None => {
                    flush(&mut run, &mut text);
                    text.extend(piece.chars().map(|c| if c == '▁' { ' ' } else { c }));
                }
            }
        }
        flush(&mut run, &mut text);
        if self.space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }

    /// The bytes token `id` adds to generated text; `None` for control, unknown and unused
    /// tokens, which are never text.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let t = self.token_type(id)?;
        if matches!(t, token_type::CONTROL | token_type::UNKNOWN | token_type::UNUSED) {
            return None;
        }
        let piece = self.piece(id);
        Some(match byte_piece(piece) {
            Some(b) => vec![b],
            None => piece.replace('▁', " ").into_bytes(),
        })
    }
}

/// Piece `i` of the concatenated `text` whose pieces end at `ends` (`i` in range).
fn piece_at<'a>(text: &'a str, ends: &[u32], i: usize) -> &'a str {
    &text[if i == 0 { 0 } else { ends[i - 1] as usize }..ends[i] as usize]
}

/// The byte of a `<0xXX>` piece.
pub(crate) fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(space_prefix: bool) -> SentencePiece {
        // id: piece, score, type
        let v: Vec<(&str, f32, i32)> = vec![
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x0A>", 0.0, 6),
            ("<0xC3>", 0.0, 6),
            ("<0xA9>", 0.0, 6),
            ("▁", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -2.0, 1),
            ("c", -2.0, 1),
            ("ab", -3.0, 1),
            ("bc", -1.5, 1),
            ("abc", -4.0, 1),
            ("▁a", -0.5, 1),
            ("<tool>", 0.0, 4),
        ];
        let pieces: Vec<String> = v.iter().map(|x| x.0.to_string()).collect();
        SentencePiece::new(
            &pieces,
            v.iter().map(|x| x.1).collect(),
            &v.iter().map(|x| x.2).collect::<Vec<_>>(),
            Some(0),
            space_prefix,
        )
        .unwrap()
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        let v = vocab(false);
        // "bc" (-1.5) merges before "ab" (-3), then a + bc -> "abc" (-4).
        assert_eq!(v.encode("abc").unwrap(), vec![12]);
        // "abab": ab + ab (equal scores, the left one first), no "abab" piece.
        assert_eq!(v.encode("abab").unwrap(), vec![10, 10]);
        // A space is ▁ and "▁a" merges first.
        assert_eq!(v.encode(" a").unwrap(), vec![13]);
        assert_eq!(vocab(true).encode("a").unwrap(), vec![13]);
    }

    #[test]
    fn bytes_and_unknown_fallback() {
        let v = vocab(false);
        assert_eq!(v.encode("a\né").unwrap(), vec![7, 3, 4, 5]);
        // No byte piece for 'x': the unknown token.
        assert_eq!(v.encode("x").unwrap(), vec![0]);
        assert_eq!(v.decode(&[7, 3, 4, 5], true), "a\né");
        // An incomplete UTF-8 run: one U+FFFD per byte.
        assert_eq!(v.decode(&[7, 4], true), "a\u{FFFD}");
    }

    #[test]
    fn specials_split_text_and_decode_by_type() {
        let v = vocab(true);
        assert_eq!(v.encode("a<s>a<tool>").unwrap(), vec![13, 1, 13, 14]);
        assert_eq!(v.decode(&[1, 13, 14, 2], true), "a<tool>");
        assert_eq!(v.decode(&[1, 13, 2], false), "<s> a</s>");
        assert_eq!(v.token_bytes(1), None);
        assert_eq!(v.token_bytes(13), Some(b" a".to_vec()));
        assert_eq!(v.token_bytes(3), Some(b"\n".to_vec()));
        assert_eq!(v.id_of("bc"), Some(11));
        assert_eq!(v.piece(99), "");
    }

    #[test]
    fn mismatched_arrays_are_refused() {
        let e = SentencePiece::new(&["a".into()], vec![], &[1], None, false).unwrap_err();
        assert!(e.to_string().contains("1 pieces, 0 scores"), "{e}");
    }
}
