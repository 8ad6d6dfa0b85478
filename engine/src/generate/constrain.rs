//! Constrained decoding: a grammar (JSON Schema, regular expression or Lark grammar) turned
//! into a per-token mask by [llguidance], so that what a sequence generates always parses.
//!
//! A [`Constrainer`] is built once per model from its tokenizer (the bytes of every token in a
//! trie); [`Constrainer::compile`] checks a request's grammar and gives a [`Constraint`], the
//! per-sequence state. The scheduler asks each constrained sequence for its mask while the
//! forward pass runs ([`Constraint::compute_mask`]), applies it to the logits before
//! sampling ([`Constraint::apply`]) and feeds it the sampled token ([`Constraint::accept`]).
//! EOS is allowed exactly when the grammar may end, so a sequence that stops with EOS is
//! complete; one cut by `max_tokens` is not.

use super::tokenizer::TextTokenizer;
use crate::error::{EngineError, Result};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON value valid against this JSON Schema (draft 2020-12 subset llguidance knows).
    JsonSchema(Value),
    /// Text matching this regular expression as a whole.
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start:` rule, `%json {schema}` inside rules).
    Lark(String),
}

/// Bounds on the grammars a request may bring. Compiling and masking cost grows with them;
/// llguidance enforces them while it builds the parser.
#[derive(Debug, Clone, Copy)]
pub struct GrammarLimits {
    /// Bytes of the grammar's source (the schema serialized, the regex, the Lark text).
    pub max_source_bytes: usize,
    /// Symbols in the grammar's productions.
    pub max_grammar_size: usize,
    /// Lexer states the grammar may create (memory).
    pub max_lexer_states: usize,
    /// Earley items and lexer work spent on one token's mask.
    pub step_max_items: usize,
    pub step_lexer_fuel: u64,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        Self {
            max_source_bytes: 64 << 10,
            max_grammar_size: 100_000,
            max_lexer_states: 100_000,
            step_max_items: 50_000,
            step_lexer_fuel: 200_000,
        }
    }
}

/// JSON output settings every schema is compiled with (llguidance's `x-guidance`): one space
/// after `:` and `,`, no other whitespace. Free whitespace lets small models loop on
/// newlines until `max_tokens`. Grammars that embed `%json {...}` put it in their schemas.
pub fn json_layout() -> Value {
    serde_json::json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " })
}

/// Gives every object schema with `properties` and no `additionalProperties` an
/// `additionalProperties: false`, as llama.cpp's schema converter does: output then holds only
/// the declared keys (still valid against the original schema), where small models otherwise
/// invent keys until `max_tokens`. A schema that wants other keys says so.
pub fn close_objects(schema: &mut Value) {
    fn walk(v: &mut Value, depth: usize) {
        if depth > 64 {
            return;
        }
        match v {
            Value::Object(m) => {
                if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                    m.insert("additionalProperties".into(), Value::Bool(false));
                }
                for (k, child) in m.iter_mut() {
                    // `const`, `enum` and `default` hold data, not schemas.
                    if !matches!(k.as_str(), "const" | "enum" | "default" | "examples") {
                        walk(child, depth + 1);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|c| walk(c, depth + 1)),
            _ => {}
        }
    }
    walk(schema, 0);
}

/// The token trie of one tokenizer and the grammar compiler over it.
pub struct Constrainer {
    factory: ParserFactory,
    limits: GrammarLimits,
}

impl std::fmt::Debug for Constrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constrainer").field("vocab", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

/// The trie, and plain tokenization through our own tokenizer (llguidance uses it only for
/// grammar literals it wants to turn into forced tokens).
struct Env {
    trie: TokTrie,
    tokenizer: TextTokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode(s, false).unwrap_or_default())
    }
}

impl Constrainer {
    /// The trie of `tokenizer`'s tokens; `vocab` is the model's logit count (at least the
    /// tokenizer's; ids past the tokenizer are never allowed).
    pub fn new(tokenizer: &TextTokenizer, vocab: usize, limits: GrammarLimits) -> Result<Self> {
        let bytes = tokenizer.token_bytes();
        if vocab < bytes.len() {
            return Err(EngineError::Internal(format!("vocabulary {vocab} below the tokenizer's {}", bytes.len())));
        }
        let eos = tokenizer
            .stop_ids
            .first()
            .copied()
            .or(tokenizer.eos_id)
            .ok_or_else(|| EngineError::Internal("constrained decoding needs an end-of-sequence token".into()))?;
        // Special tokens keep a name the trie cannot match as text (its marker byte first).
        let words: Vec<Vec<u8>> = (0..vocab)
            .map(|i| match bytes.get(i) {
                Some(Some(b)) => b.clone(),
                _ => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(format!("<[{i}]>").as_bytes());
                    w
                }
            })
            .collect();
        let mut info = TokRxInfo::new(vocab as u32, eos);
        info.tok_bos = tokenizer.bos_id;
        let mut trie = TokTrie::from(&info, &words);
        let stops: Vec<u32> = tokenizer.stop_ids.iter().copied().filter(|&t| (t as usize) < vocab).collect();
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(&stops);
        }
        let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| EngineError::Internal(format!("grammar engine: {e}")))?;
        factory.quiet();
        let l = factory.limits_mut();
        *l = ParserLimits {
            max_grammar_size: limits.max_grammar_size,
            max_lexer_states: limits.max_lexer_states,
            step_max_items: limits.step_max_items,
            step_lexer_fuel: limits.step_lexer_fuel,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self { factory, limits })
    }

    /// Compiles `grammar` for one sequence. Errors name what is wrong with it (`param` is the
    /// request field it came from) and are the caller's fault.
    pub fn compile(&self, grammar: &Grammar, param: &str) -> Result<Constraint> {
        let invalid = |message: String| EngineError::InvalidRequest { param: Some(param.to_string()), message };
        let size = match grammar {
            Grammar::JsonSchema(v) => serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX),
            Grammar::Regex(s) | Grammar::Lark(s) => s.len(),
        };
        if size > self.limits.max_source_bytes {
            return Err(invalid(format!(
                "the grammar is {size} bytes; at most {} are accepted",
                self.limits.max_source_bytes
            )));
        }
        let top = match grammar {
            Grammar::JsonSchema(schema) => {
                let Value::Object(map) = schema else {
                    return Err(invalid("a JSON Schema must be an object".into()));
                };
                if map.contains_key("x-guidance") {
                    return Err(invalid("`x-guidance` is not accepted in schemas".into()));
                }
                let mut s = Value::Object(map.clone());
                close_objects(&mut s);
                s["x-guidance"] = json_layout();
                TopLevelGrammar::from_json_schema(s)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        };
        let parser = self.factory.create_parser(top).map_err(|e| invalid(clean_error(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(clean_error(&e)));
        }
        // A grammar that admits nothing is refused now, not after the prompt is prefilled.
        let first = matcher.compute_mask().map_err(|e| invalid(clean_error(&e.to_string())))?;
        if first.is_zero() {
            return Err(invalid("the grammar matches no text".into()));
        }
        Ok(Constraint { matcher, mask: Some(first) })
    }
}

/// llguidance's messages carry internal context after the first line; the first line says
/// what is wrong.
fn clean_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or(e).trim();
    let first: String = first.chars().take(400).collect();
    format!("invalid grammar: {first}")
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token, once computed.
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Computes the next token's mask if it is not known yet (the slow part: run it beside
    /// the forward pass).
    pub fn compute_mask(&mut self) -> Result<()> {
        if self.mask.is_none() {
            let m = self.matcher.compute_mask_or_eos().map_err(|e| EngineError::Internal(format!("grammar: {e}")))?;
            self.mask = Some(m);
        }
        Ok(())
    }

    /// Sets every token the grammar does not allow next to −∞.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        self.compute_mask()?;
        let mask = self.mask.as_ref().expect("computed above");
        if mask.is_zero() {
            return Err(EngineError::Internal("the grammar allows no token here".into()));
        }
        let n = logits.len().min(mask.len());
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in logits.iter_mut().skip(mask.len()) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Whether `token` is allowed next (computing the mask if needed).
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        self.compute_mask()?;
        Ok(self.mask.as_ref().is_some_and(|m| m.is_allowed(token)))
    }

    /// Advances past `token`, which the mask allowed.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| EngineError::Internal(format!("grammar: {e}")))
    }

    /// The tokens the grammar allows no alternative to from here (llguidance's fast-forward
    /// tokens, on token boundaries it knows are safe), taken as if accepted one by one.
    pub fn take_forced(&mut self) -> Vec<u32> {
        self.mask = None;
        self.matcher.consume_ff_tokens()
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_options_are_valid_for_llguidance() {
        let o: llguidance::JsonCompileOptions = serde_json::from_value(json_layout()).unwrap();
        assert!(!o.whitespace_flexible);
        assert_eq!(o.item_separator, ", ");
    }

    #[test]
    fn objects_are_closed_unless_they_say_otherwise() {
        let mut s = serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "object", "properties": {"b": {}}}, "c": {"type": "object", "properties": {}, "additionalProperties": true}},
            "anyOf": [{"properties": {"d": {}}}],
            "const": {"properties": {}}
        });
        close_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["c"]["additionalProperties"], true);
        assert_eq!(s["anyOf"][0]["additionalProperties"], false);
        assert!(s["const"].get("additionalProperties").is_none());
    }

    #[test]
    fn errors_keep_their_first_line() {
        assert_eq!(clean_error("bad thing\nat line 3\n..."), "invalid grammar: bad thing");
    }
}
