//! One template version: a TOML header between `+++` lines, then a minijinja body.
//!
//! ```text
//! +++
//! name = "summarize"
//! version = 1
//! kind = "chat"                      # chat: a list of messages; text: one string
//! [variables.text]
//! type = "string"
//! [parameters]
//! temperature = 0.0
//! +++
//! ::system::
//! You write short summaries.
//! ::user::
//! Summarize: {{ text }}
//! ```
//!
//! A chat body is split into messages at lines `::system::`, `::user::`, `::assistant::`;
//! each message renders on its own, so a variable's value can never open a new message. A
//! line `::examples::` places the chosen few-shot examples there as user/assistant pairs.
//! Everything is checked when the template is parsed: the header's fields and types, the
//! body's syntax, and that every variable the body reads is declared (errors name the line).

use crate::error::{PromptError, Result};
use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Instructions one render may execute (minijinja fuel): bounds loops and recursion.
pub const RENDER_FUEL: u64 = 200_000;
/// Bytes one render may produce.
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// Bytes of template source accepted.
pub const MAX_SOURCE_BYTES: usize = 128 * 1024;

const ROLES: [&str; 4] = ["system", "user", "assistant", "examples"];
/// Names the body may use without declaring them: the few-shot examples and minijinja's
/// global functions.
const BUILTIN_NAMES: [&str; 8] = ["examples", "range", "dict", "namespace", "debug", "lipsum", "cycler", "joiner"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    /// The body renders to a list of messages.
    #[default]
    Chat,
    /// The body renders to one string.
    Text,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    #[default]
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
    Any,
}

impl VarType {
    fn accepts(self, v: &Value) -> bool {
        match self {
            VarType::String => v.is_string(),
            VarType::Integer => v.is_i64() || v.is_u64(),
            VarType::Number => v.is_number(),
            VarType::Boolean => v.is_boolean(),
            VarType::Array => v.is_array(),
            VarType::Object => v.is_object(),
            VarType::Any => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            VarType::String => "a string",
            VarType::Integer => "an integer",
            VarType::Number => "a number",
            VarType::Boolean => "a boolean",
            VarType::Array => "an array",
            VarType::Object => "an object",
            VarType::Any => "any value",
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A declared variable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Variable {
    #[serde(rename = "type", default)]
    pub ty: VarType,
    /// Required unless it has a default (default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl Variable {
    pub fn is_required(&self) -> bool {
        self.required.unwrap_or(self.default.is_none())
    }
}

/// Generation settings the template suggests; request fields override them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Parameters {
    fn is_empty(&self) -> bool {
        *self == Parameters::default()
    }
}

/// One few-shot example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FewShotMode {
    /// No examples.
    Zero,
    /// The first `k` examples of the set, in order.
    #[default]
    Fixed,
    /// The `k` examples whose inputs are most similar (embedding cosine) to the input.
    Similar,
}

/// Few-shot examples of a template: a named set (files under `fewshot/`) or inline ones.
/// The body sees the chosen examples as `examples` (a list of `{input, output}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
    #[serde(default)]
    pub mode: FewShotMode,
    #[serde(default = "default_k")]
    pub k: usize,
    /// The variable compared with example inputs in `similar` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

fn default_k() -> usize {
    3
}

/// The header of a template file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    /// Assigned (latest + 1) when a template created through the API leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub kind: TemplateKind,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, Variable>,
    #[serde(default, skip_serializing_if = "Parameters::is_empty")]
    pub parameters: Parameters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewshot: Option<FewShot>,
    /// What the RAG pipeline answers, without generating, when retrieval finds nothing
    /// relevant; also how an abstaining answer is recognized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dont_know: Option<String>,
    /// Labels a file-defined version carries when the registry loads it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// One message section of a chat body (or the whole body of a text template).
#[derive(Debug, Clone, PartialEq)]
struct Section {
    role: Option<&'static str>,
    source: String,
    /// Line of the section's first body line in the source the user wrote (1-based).
    first_line: usize,
}

/// A parsed, validated template version.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub header: Header,
    pub body: String,
    sections: Vec<Section>,
}

/// A chat message produced by rendering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a render produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Rendered {
    Chat { messages: Vec<Message> },
    Text { text: String },
}

impl Rendered {
    /// The messages of a chat render; a text render is one user message.
    pub fn into_messages(self) -> Vec<Message> {
        match self {
            Rendered::Chat { messages } => messages,
            Rendered::Text { text } => vec![Message { role: "user".into(), content: text }],
        }
    }
}

/// Checks a template or label name: letters, digits, `-`, `_`, `.`; 1–64 characters.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PromptError::invalid(
            what,
            format!("invalid {what} `{name}`: use 1-64 letters, digits, `-`, `_` or `.`"),
        ))
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_recursion_limit(64);
    env
}

impl Template {
    /// Parses a template file: `+++`, TOML header, `+++`, body.
    pub fn parse(source: &str) -> Result<Template> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(PromptError::invalid("source", format!("template is larger than {MAX_SOURCE_BYTES} bytes")));
        }
        let source = source.strip_prefix('\u{feff}').unwrap_or(source);
        let mut lines = source.split_inclusive('\n');
        let first = lines.next().unwrap_or_default();
        if first.trim_end() != "+++" {
            return Err(PromptError::at_line(
                "source",
                1,
                "a template starts with a `+++` line, then its TOML header, then `+++` and the body",
            ));
        }
        let header_start = first.len();
        let mut pos = header_start;
        let mut header_end = None;
        for l in lines {
            if l.trim_end() == "+++" {
                header_end = Some((pos, pos + l.len()));
                break;
            }
            pos += l.len();
        }
        let Some((header_end, body_start)) = header_end else {
            return Err(PromptError::at_line("source", 1, "the header's closing `+++` line is missing"));
        };
        let header_text = &source[header_start..header_end];
        let header: Header = toml::from_str(header_text).map_err(|e| {
            let line = e.span().map(|s| line_of(header_text, s.start) + 1).unwrap_or(1);
            PromptError::at_line("source", line, format!("template header (line {line}): {}", e.message()))
        })?;
        let body_line = line_of(source, body_start);
        Template::build(header, source[body_start..].to_string(), body_line)
    }

    /// Builds a template from a header and a body (the API's structured form); lines in
    /// errors count from the body's first line.
    pub fn from_parts(header: Header, body: String) -> Result<Template> {
        if body.len() > MAX_SOURCE_BYTES {
            return Err(PromptError::invalid("template", format!("template is larger than {MAX_SOURCE_BYTES} bytes")));
        }
        Template::build(header, body, 1)
    }

    fn build(header: Header, body: String, body_line: usize) -> Result<Template> {
        check_name("name", &header.name)?;
        let sections = split_sections(header.kind, &body, body_line)?;
        let t = Template { header, body, sections };
        t.check()?;
        Ok(t)
    }

    pub fn name(&self) -> &str {
        &self.header.name
    }

    /// The version (set once the registry accepted it).
    pub fn version(&self) -> u32 {
        self.header.version.unwrap_or(0)
    }

    /// The file text of this version (the registry's storage format).
    pub fn to_source(&self) -> String {
        let header = toml::to_string(&self.header).expect("template headers serialize to TOML");
        format!("+++\n{header}+++\n{}", self.body)
    }

    /// Header-level and body-level checks that need nothing outside the template.
    fn check(&self) -> Result<()> {
        let h = &self.header;
        if h.version == Some(0) {
            return Err(PromptError::invalid("version", "versions start at 1"));
        }
        for (name, v) in &h.variables {
            if !is_identifier(name) {
                return Err(PromptError::invalid(
                    format!("variables.{name}"),
                    format!("variable name `{name}` is not an identifier (letters, digits, `_`)"),
                ));
            }
            if BUILTIN_NAMES.contains(&name.as_str()) {
                return Err(PromptError::invalid(format!("variables.{name}"), format!("`{name}` is reserved")));
            }
            if let Some(d) = &v.default {
                if !v.ty.accepts(d) {
                    return Err(PromptError::invalid(
                        format!("variables.{name}.default"),
                        format!("the default of `{name}` must be {}, got {}", v.ty.name(), json_kind(d)),
                    ));
                }
            }
        }
        let p = &h.parameters;
        if p.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(PromptError::invalid("parameters.temperature", "temperature must be between 0 and 2"));
        }
        if p.top_p.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return Err(PromptError::invalid("parameters.top_p", "top_p must be in (0, 1]"));
        }
        if p.max_tokens == Some(0) {
            return Err(PromptError::invalid("parameters.max_tokens", "max_tokens must be at least 1"));
        }
        if let Some(f) = &h.fewshot {
            if f.k == 0 || f.k > 64 {
                return Err(PromptError::invalid("fewshot.k", "fewshot.k must be between 1 and 64"));
            }
            if f.set.is_some() && !f.examples.is_empty() {
                return Err(PromptError::invalid("fewshot", "give either fewshot.set or fewshot.examples, not both"));
            }
            if f.set.is_none() && f.examples.is_empty() && f.mode != FewShotMode::Zero {
                return Err(PromptError::invalid("fewshot", "fewshot needs a `set` or inline `examples`"));
            }
            if f.mode == FewShotMode::Similar {
                let Some(input) = &f.input else {
                    return Err(PromptError::invalid("fewshot.input", "similar mode needs `input`: the variable compared with example inputs"));
                };
                if h.variables.get(input).is_none_or(|v| !matches!(v.ty, VarType::String | VarType::Any)) {
                    return Err(PromptError::invalid(
                        "fewshot.input",
                        format!("fewshot.input `{input}` must name a declared string variable"),
                    ));
                }
            }
        }
        let env = environment();
        for s in &self.sections {
            let tmpl = env.template_from_str(&s.source).map_err(|e| {
                let line = e.line().map(|l| l + s.first_line - 1).unwrap_or(s.first_line);
                let what = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
                PromptError::at_line("template", line, format!("template syntax error (line {line}): {what}"))
            })?;
            let mut used: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
            used.sort();
            for v in used {
                if h.variables.contains_key(&v) || BUILTIN_NAMES.contains(&v.as_str()) {
                    continue;
                }
                let line = find_word_line(&s.source, &v).map(|l| l + s.first_line - 1).unwrap_or(s.first_line);
                return Err(PromptError::at_line(
                    format!("variables.{v}"),
                    line,
                    format!("the template uses the undeclared variable `{v}` (line {line}); declare it under [variables.{v}]"),
                ));
            }
        }
        Ok(())
    }

    /// Renders with the caller's variables (checked against the declarations) and the
    /// chosen few-shot examples.
    pub fn render(&self, vars: &Map<String, Value>, examples: &[Example]) -> Result<Rendered> {
        let h = &self.header;
        let declared = || h.variables.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        for (k, v) in vars {
            let Some(decl) = h.variables.get(k) else {
                return Err(PromptError::invalid(
                    format!("variables.{k}"),
                    format!("unknown variable `{k}`: {}@{} declares [{}]", h.name, self.version(), declared()),
                ));
            };
            if !(decl.ty.accepts(v) || v.is_null() && !decl.is_required()) {
                return Err(PromptError::invalid(
                    format!("variables.{k}"),
                    format!("variable `{k}` must be {}, got {}", decl.ty.name(), json_kind(v)),
                ));
            }
        }
        let mut ctx = Map::new();
        for (k, decl) in &h.variables {
            let v = match (vars.get(k), &decl.default) {
                (Some(v), _) if !v.is_null() => v.clone(),
                (_, Some(d)) => d.clone(),
                _ if decl.is_required() => {
                    return Err(PromptError::invalid(
                        format!("variables.{k}"),
                        format!("missing variable `{k}` ({}) required by {}@{}", decl.ty.name(), h.name, self.version()),
                    ))
                }
                _ => Value::Null,
            };
            ctx.insert(k.clone(), v);
        }
        ctx.insert("examples".into(), serde_json::to_value(examples).expect("examples serialize"));
        let ctx = minijinja::Value::from(minijinja::value::Serde(&ctx));
        let env = environment();
        let mut total = 0usize;
        let mut messages = Vec::with_capacity(self.sections.len());
        for s in &self.sections {
            if s.role == Some("examples") {
                for ex in examples {
                    total += ex.input.len() + ex.output.len();
                    messages.push((Some("user"), ex.input.trim().to_string()));
                    messages.push((Some("assistant"), ex.output.trim().to_string()));
                }
                continue;
            }
            let tmpl = env.template_from_str(&s.source).map_err(|e| PromptError::invalid("template", e.to_string()))?;
            // Rendered into a writer that refuses bytes past what is left of the budget: a
            // loop producing gigabytes stops at the cap instead of after building them.
            let mut out = Capped { buf: Vec::new(), room: MAX_OUTPUT_BYTES.saturating_sub(total), overflow: false };
            let rendered = tmpl.render_captured_to(&ctx, &mut out).map(drop);
            if out.overflow {
                return Err(PromptError::invalid(
                    "variables",
                    format!("the rendered prompt is larger than {MAX_OUTPUT_BYTES} bytes"),
                ));
            }
            rendered.map_err(|e| {
                let line = e.line().map(|l| l + s.first_line - 1).unwrap_or(s.first_line);
                let detail = match e.kind() {
                    minijinja::ErrorKind::OutOfFuel => {
                        format!("rendering took more than {RENDER_FUEL} steps (a loop over too much data?)")
                    }
                    _ => e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string()),
                };
                PromptError::at_line("variables", line, format!("rendering {}@{} failed at line {line}: {detail}", h.name, self.version()))
            })?;
            let out = String::from_utf8(out.buf).map_err(|_| PromptError::invalid("variables", "the rendered prompt is not UTF-8"))?;
            total += out.len();
            messages.push((s.role, out.trim().to_string()));
        }
        Ok(match h.kind {
            TemplateKind::Text => Rendered::Text { text: messages.pop().map(|m| m.1).unwrap_or_default() },
            TemplateKind::Chat => Rendered::Chat {
                messages: messages
                    .into_iter()
                    .filter(|(_, c)| !c.is_empty())
                    .map(|(r, content)| Message { role: r.unwrap_or("user").to_string(), content })
                    .collect(),
            },
        })
    }
}

/// A render's output with a byte budget: writes past it fail (and abort the render).
struct Capped {
    buf: Vec<u8>,
    room: usize,
    overflow: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.room {
            self.overflow = true;
            return Err(std::io::Error::other("the rendered prompt is over its size limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn find_word_line(source: &str, word: &str) -> Option<usize> {
    source.lines().position(|l| {
        l.match_indices(word).any(|(i, _)| {
            let before = l[..i].chars().next_back();
            let after = l[i + word.len()..].chars().next();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
                && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
    .map(|i| i + 1)
}

fn role_marker(line: &str) -> Option<&'static str> {
    let t = line.trim();
    let inner = t.strip_prefix("::")?.strip_suffix("::")?;
    ROLES.iter().copied().find(|r| *r == inner)
}

fn split_sections(kind: TemplateKind, body: &str, body_line: usize) -> Result<Vec<Section>> {
    let mut sections: Vec<Section> = Vec::new();
    let mut current: Option<Section> = None;
    let mut preamble_line = None;
    for (i, line) in body.split_inclusive('\n').enumerate() {
        let n = body_line + i;
        if let Some(role) = role_marker(line) {
            if kind == TemplateKind::Text {
                return Err(PromptError::at_line(
                    "template",
                    n,
                    format!("`::{role}::` (line {n}) marks a chat message, but this template's kind is \"text\""),
                ));
            }
            sections.extend(current.take());
            if role == "examples" {
                sections.push(Section { role: Some(role), source: String::new(), first_line: n });
                continue;
            }
            current = Some(Section { role: Some(role), source: String::new(), first_line: n + 1 });
            continue;
        }
        match &mut current {
            Some(s) => s.source.push_str(line),
            None if kind == TemplateKind::Chat && sections.last().is_some_and(|s| s.role == Some("examples")) => {
                if !line.trim().is_empty() && preamble_line.is_none() {
                    preamble_line = Some(n);
                }
            }
            None if kind == TemplateKind::Text => {
                current = Some(Section { role: None, source: line.to_string(), first_line: n });
            }
            None => {
                if !line.trim().is_empty() && preamble_line.is_none() {
                    preamble_line = Some(n);
                }
            }
        }
    }
    sections.extend(current);
    if kind == TemplateKind::Chat {
        if let Some(n) = preamble_line {
            return Err(PromptError::at_line(
                "template",
                n,
                format!("chat template text outside a `::system::`/`::user::`/`::assistant::` message (line {n})"),
            ));
        }
        if sections.is_empty() {
            return Err(PromptError::invalid(
                "template",
                "a chat template needs at least one `::user::` (or `::system::`, `::assistant::`) line",
            ));
        }
    }
    if sections.is_empty() {
        sections.push(Section { role: None, source: String::new(), first_line: body_line });
    }
    Ok(sections)
}
