//! Chat templates: the model's own Jinja template (`tokenizer.chat_template` in GGUF or in
//! `tokenizer_config.json`), or one given by configuration, rendered with minijinja the way
//! Hugging Face's `apply_chat_template` does: `trim_blocks` and `lstrip_blocks`, Python string
//! methods (`.strip()`, `.startswith()`...), `raise_exception`, `bos_token`/`eos_token` and
//! `add_generation_prompt`.

use crate::error::{EngineError, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat message. The optional fields are absent from the template's view unless set,
/// as Hugging Face templates test them with `is defined`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments": {...}}}]`, arguments as an object (what templates expect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None, name: None }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Internal(format!("template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for a "today is" line; UTC date only, without a time zone database.
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            fmt.replace("%Y", &format!("{y:04}")).replace("%m", &format!("{m:02}")).replace("%d", &format!("{d:02}"))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| EngineError::InvalidModel {
            path: "chat_template".into(),
            reason: format!("chat template: {e:#}"),
        })?;
        Ok(Self { env, source: source.to_string(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders a `tools` list itself (Qwen, Hermes, Llama 3.x, SmolLM3
    /// templates do; plain ChatML ones do not).
    pub fn renders_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// [`render`](Self::render) with the request's tool definitions (OpenAI's
    /// `[{"type": "function", "function": {...}}]`) as the template's `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest {
                param: Some("messages".into()),
                message: "messages must not be empty".into(),
            });
        }
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::Internal(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| EngineError::InvalidRequest {
            param: Some("messages".into()),
            message: format!("the chat template rejected the messages: {}", e.detail().unwrap_or(&e.to_string())),
        })
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            r#"{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
{{ bos_token }}{{ m.role.upper() }}: {{ m.content.strip() }}{% if m.content.strip().startswith('Hi') %}!{% endif %}{{ '\n' }}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"#,
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render(&[ChatMessage::new("user", "  Hi there  ")], true).unwrap();
        // trim_blocks drops the newlines after the block tags; the expression line keeps its own.
        assert_eq!(out, "<s>USER: Hi there!\n\nASSISTANT:");
        let err = t.render(&[ChatMessage::new("tool", "x")], false).unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(ChatTemplate::new("{% for m in messages %}", "", "").is_err());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
    }
}
