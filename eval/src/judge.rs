//! The judge: a chat model asked yes/no questions through the `hallucination-judge` prompt
//! (knowledge, question, answer → "Yes" when the answer is hallucinated). Verdicts that
//! cannot be parsed are kept as such: counted and reported, never dropped or scored 0.

use crate::backend::Chat;
use anyhow::Result;
use ragway_prompts::{Message, Registry};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The answer is hallucinated (not supported by the knowledge).
    Yes,
    /// The answer is supported.
    No,
    Unparseable,
}

/// Reads a yes/no verdict. HaluEval's rule: the reply must contain one of "Yes" / "No" and
/// not both; here as whole words, case-insensitive, on the first non-empty line first and
/// then on the whole reply.
pub fn parse_verdict(text: &str) -> Verdict {
    fn scan(s: &str) -> Verdict {
        let words: Vec<String> =
            s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
        let yes = words.iter().any(|w| w == "yes");
        let no = words.iter().any(|w| w == "no");
        match (yes, no) {
            (true, false) => Verdict::Yes,
            (false, true) => Verdict::No,
            _ => Verdict::Unparseable,
        }
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
    match scan(first) {
        Verdict::Unparseable => scan(text),
        v => v,
    }
}

/// One judge call: what it saw and said.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub raw: String,
}

/// A chat model behind the `hallucination-judge` template (any version reference).
pub struct Judge {
    pub chat: Arc<dyn Chat>,
    pub registry: Arc<Registry>,
    pub template: String,
}

impl Judge {
    pub fn new(chat: Arc<dyn Chat>, registry: Arc<Registry>, template: Option<String>) -> Self {
        Self { chat, registry, template: template.unwrap_or_else(|| "hallucination-judge".into()) }
    }

    pub fn messages(&self, knowledge: &str, question: &str, answer: &str) -> Result<(Vec<Message>, usize)> {
        let resolved = self.registry.resolve(&self.template)?;
        let mut vars = Map::new();
        vars.insert("knowledge".into(), Value::String(knowledge.into()));
        vars.insert("question".into(), Value::String(question.into()));
        vars.insert("answer".into(), Value::String(answer.into()));
        let max_tokens = resolved.version.template.header.parameters.max_tokens.unwrap_or(8);
        Ok((self.registry.render(&resolved, &vars, None, None, None)?.into_messages(), max_tokens))
    }

    /// Is `answer` hallucinated given `knowledge`?
    pub fn hallucinated(&self, knowledge: &str, question: &str, answer: &str) -> Result<Judgement> {
        let (messages, max_tokens) = self.messages(knowledge, question, answer)?;
        let raw = self.chat.complete(&messages, max_tokens)?;
        Ok(Judgement { verdict: parse_verdict(&raw), raw })
    }

    pub fn describe(&self) -> Value {
        json!({"template": self.template, "model": self.chat.describe()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(parse_verdict("Yes"), Verdict::Yes);
        assert_eq!(parse_verdict(" no."), Verdict::No);
        assert_eq!(parse_verdict("\nNO, it is supported"), Verdict::No);
        assert_eq!(parse_verdict("Yes\nNo wait"), Verdict::Yes);
        assert_eq!(parse_verdict("Yes or no"), Verdict::Unparseable);
        assert_eq!(parse_verdict("The answer is supported."), Verdict::Unparseable);
        assert_eq!(parse_verdict("Nobody knows"), Verdict::Unparseable);
        assert_eq!(parse_verdict(""), Verdict::Unparseable);
    }
}
