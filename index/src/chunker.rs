//! Recursive, token-budgeted chunking.
//!
//! A document is tokenized once with the embedding model's tokenizer. The text is split on
//! the coarsest boundary that makes every piece fit the budget — paragraphs, then lines,
//! then sentences, then words, and as a last resort token boundaries — and the pieces are
//! merged greedily back into chunks of at most `max_tokens` tokens, each new chunk starting
//! with up to `overlap_tokens` tokens of the previous one's tail (whole pieces only).
//!
//! Token counts come from the one tokenization (a token belongs to the piece its first
//! byte is in), so a chunk's token ids are a slice of the document's and are fed to the
//! embedder as they are: no second tokenization, no truncation surprise.

use crate::error::{IndexError, Result};
use tokenizers::Tokenizer;

/// A chunk of a document: byte and character offsets into the document's text (trimmed of
/// surrounding whitespace) and its token ids (no special tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkSpan {
    pub byte_start: usize,
    pub byte_end: usize,
    pub char_start: usize,
    pub char_end: usize,
    pub token_ids: Vec<u32>,
}

/// Splits `text` into chunks of at most `max_tokens` tokens.
pub fn chunk_text(tokenizer: &Tokenizer, text: &str, max_tokens: usize, overlap_tokens: usize) -> Result<Vec<ChunkSpan>> {
    if max_tokens == 0 {
        return Err(IndexError::invalid("chunking.max_tokens", "max_tokens must be at least 1"));
    }
    let enc = tokenizer.encode(text, false).map_err(|e| IndexError::Internal(format!("tokenizer: {e}")))?;
    let ids = enc.get_ids();
    let starts: Vec<usize> = enc.get_offsets().iter().map(|o| o.0).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let doc = Doc { text, starts: &starts };
    let mut atoms = Vec::new();
    doc.split(0, text.len(), 0, max_tokens, &mut atoms);
    // Merge atoms (contiguous byte ranges covering the text) into chunks.
    let counts: Vec<usize> = atoms.iter().map(|&(a, b)| doc.tokens(a, b)).collect();
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < atoms.len() {
        let mut last = first;
        let mut total = counts[first];
        while last + 1 < atoms.len() && total + counts[last + 1] <= max_tokens {
            last += 1;
            total += counts[last];
        }
        let (start, end) = (atoms[first].0, atoms[last].1);
        if let Some(span) = doc.span(start, end, ids) {
            chunks.push(span);
        }
        if last + 1 >= atoms.len() {
            break;
        }
        // Start the next chunk with the longest tail of this one that fits the overlap.
        let mut next = last + 1;
        let mut tail = 0;
        while next > first + 1 && tail + counts[next - 1] <= overlap_tokens {
            next -= 1;
            tail += counts[next];
        }
        first = next;
    }
    Ok(chunks)
}

struct Doc<'a> {
    text: &'a str,
    starts: &'a [usize],
}

impl Doc<'_> {
    /// Tokens whose first byte lies in `[a, b)`.
    fn tokens(&self, a: usize, b: usize) -> usize {
        self.starts.partition_point(|&s| s < b) - self.starts.partition_point(|&s| s < a)
    }

    fn split(&self, a: usize, b: usize, level: usize, max: usize, out: &mut Vec<(usize, usize)>) {
        if self.tokens(a, b) <= max {
            out.push((a, b));
            return;
        }
        if level == 4 {
            // No boundary left: cut at token starts, `max` tokens a piece.
            let first = self.starts.partition_point(|&s| s < a);
            let last = self.starts.partition_point(|&s| s < b);
            let mut cut = a;
            let mut i = first + max;
            while i < last {
                out.push((cut, self.starts[i]));
                cut = self.starts[i];
                i += max;
            }
            out.push((cut, b));
            return;
        }
        let bounds = boundaries(&self.text[a..b], level);
        let mut prev = a;
        for cut in bounds.into_iter().map(|c| a + c).chain(std::iter::once(b)) {
            if cut > prev {
                self.split(prev, cut, level + 1, max, out);
                prev = cut;
            }
        }
    }

    fn span(&self, start: usize, end: usize, ids: &[u32]) -> Option<ChunkSpan> {
        let piece = &self.text[start..end];
        let lead = piece.len() - piece.trim_start().len();
        let trimmed = piece.trim();
        if trimmed.is_empty() {
            return None;
        }
        let byte_start = start + lead;
        let byte_end = byte_start + trimmed.len();
        let first = self.starts.partition_point(|&s| s < byte_start);
        let last = self.starts.partition_point(|&s| s < byte_end);
        if first == last {
            return None;
        }
        let char_start = self.text[..byte_start].chars().count();
        let char_end = char_start + trimmed.chars().count();
        Some(ChunkSpan { byte_start, byte_end, char_start, char_end, token_ids: ids[first..last].to_vec() })
    }
}

/// Byte positions (relative to `s`) just after each separator of `level`:
/// 0 paragraphs (blank lines), 1 lines, 2 sentences, 3 words.
fn boundaries(s: &str, level: usize) -> Vec<usize> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let cut = match level {
            0 => {
                if c == b'\n' {
                    // A newline, optional spaces, another newline: cut after the whole run.
                    let mut j = i + 1;
                    while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t' || bytes[j] == b'\r') {
                        j += 1;
                    }
                    if j < bytes.len() && bytes[j] == b'\n' {
                        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                            j += 1;
                        }
                        Some(j)
                    } else {
                        None
                    }
                } else {
                    None
                }
            }
            1 => (c == b'\n').then_some(i + 1),
            2 => {
                if matches!(c, b'.' | b'!' | b'?') && bytes.get(i + 1).is_some_and(|n| n.is_ascii_whitespace()) {
                    let mut j = i + 1;
                    while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    Some(j)
                } else {
                    None
                }
            }
            _ => {
                if c.is_ascii_whitespace() {
                    let mut j = i + 1;
                    while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    Some(j)
                } else {
                    None
                }
            }
        };
        match cut {
            Some(j) => {
                if j < bytes.len() {
                    out.push(j);
                }
                i = j.max(i + 1);
            }
            None => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whitespace word-level tokenizer: one token per word, built in the test.
    fn words_tokenizer() -> Tokenizer {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null,
          "pre_tokenizer": {"type": "WhitespaceSplit"},
          "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
        }"#;
        Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    #[test]
    fn short_text_is_one_chunk() {
        let t = words_tokenizer();
        let c = chunk_text(&t, "  one two three  ", 10, 2).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].byte_start, c[0].byte_end), (2, 15));
        assert_eq!(c[0].token_ids.len(), 3);
        assert!(chunk_text(&t, "   ", 10, 2).unwrap().is_empty());
    }

    #[test]
    fn prefers_paragraph_then_sentence_boundaries() {
        let t = words_tokenizer();
        let text = "A b c. D e f.\n\nG h i. J k l m n o.";
        let c = chunk_text(&t, text, 6, 0).unwrap();
        let texts: Vec<&str> = c.iter().map(|s| &text[s.byte_start..s.byte_end]).collect();
        assert_eq!(texts, vec!["A b c. D e f.", "G h i.", "J k l m n o."]);
        for s in &c {
            assert!(s.token_ids.len() <= 6);
        }
    }

    #[test]
    fn overlap_repeats_whole_pieces_and_every_token_is_covered() {
        let t = words_tokenizer();
        let text = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let c = chunk_text(&t, &text, 10, 3).unwrap();
        for s in &c {
            assert!(s.token_ids.len() <= 10);
        }
        // Consecutive chunks share exactly 3 words; together they cover the text.
        for pair in c.windows(2) {
            let a: Vec<&str> = text[pair[0].byte_start..pair[0].byte_end].split(' ').collect();
            let b: Vec<&str> = text[pair[1].byte_start..pair[1].byte_end].split(' ').collect();
            assert_eq!(&a[a.len() - 3..], &b[..3]);
        }
        assert_eq!(c[0].byte_start, 0);
        assert_eq!(c.last().unwrap().byte_end, text.len());
    }

    #[test]
    fn char_offsets_count_characters() {
        let t = words_tokenizer();
        let text = "héllo wörld. ünïcode text here.";
        let c = chunk_text(&t, text, 2, 0).unwrap();
        for s in &c {
            let by_chars: String = text.chars().skip(s.char_start).take(s.char_end - s.char_start).collect();
            assert_eq!(by_chars, &text[s.byte_start..s.byte_end]);
        }
    }

    #[test]
    fn a_word_longer_than_the_budget_is_cut_at_tokens() {
        let t = words_tokenizer();
        // One "line" of 7 words and no spaces elsewhere: falls back to token cuts at level 3.
        let c = chunk_text(&t, "a b c d e f g", 3, 0).unwrap();
        let lens: Vec<usize> = c.iter().map(|s| s.token_ids.len()).collect();
        assert_eq!(lens, vec![3, 3, 1]);
    }
}
