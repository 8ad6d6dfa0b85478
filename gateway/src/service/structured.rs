//! Structured output and tool calling, between OpenAI's request fields and the engine's
//! grammars:
//!
//! - `response_format` (`json_object`, `json_schema`, and ragway's `regex` and `grammar`)
//!   becomes a [`Grammar`] the output must match.
//! - `tools`, `tool_choice` and `parallel_tool_calls` decide how tools reach the prompt (the
//!   model's own template when it renders `tools`, otherwise a system prompt of ours), which
//!   grammar a forced call follows, and how calls are read back out of the generated text
//!   ([`ToolParser`], the same code for whole responses and streams).
//!
//! Calls are written the way the template expects: `<tool_call>{"name", "arguments"}</tool_call>`
//! (Hermes, Qwen, SmolLM3 and our own prompt) or a bare `{"name", "parameters"}` object
//! (Llama 3.x templates).

use crate::service::error::ServiceError;
use ragway_engine::generate::constrain::{close_objects, json_layout};
use ragway_engine::generate::{ChatMessage, ChatTemplate, Grammar};
use serde_json::{json, Map, Value};

/// Tools per request at most (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
const MAX_NAME: usize = 64;
/// Calls in one constrained turn at most. Small models asked for calls may repeat them
/// until `max_tokens`; the bound ends the turn instead.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// `response_format` → the grammar it asks for (`None`: free text).
pub fn response_format(v: Option<&Value>) -> Result<Option<Grammar>, ServiceError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let p = "response_format";
    let obj = v.as_object().ok_or_else(|| ServiceError::invalid(p, "response_format must be an object"))?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ServiceError::invalid(format!("{p}.type"), "response_format.type must be a string"))?;
    let string = |key: &str| -> Result<String, ServiceError> {
        obj.get(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            ServiceError::invalid(
                format!("{p}.{key}"),
                format!("response_format of type `{kind}` needs a string `{key}`"),
            )
        })
    };
    Ok(match kind {
        "text" => None,
        "json_object" => Some(Grammar::JsonSchema(json!({"type": "object"}))),
        "json_schema" => {
            let js = obj.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                ServiceError::invalid(format!("{p}.json_schema"), "response_format.json_schema must be an object")
            })?;
            if let Some(name) = js.get("name") {
                check_name(name, &format!("{p}.json_schema.name"))?;
            }
            match js.get("schema") {
                Some(s @ Value::Object(_)) => Some(Grammar::JsonSchema(s.clone())),
                // OpenAI: no schema means any JSON value; ragway asks for an object, as
                // `json_object` does, since that is what every client then parses.
                None | Some(Value::Null) => Some(Grammar::JsonSchema(json!({"type": "object"}))),
                Some(_) => {
                    return Err(ServiceError::invalid(
                        format!("{p}.json_schema.schema"),
                        "response_format.json_schema.schema must be a JSON Schema object",
                    ))
                }
            }
        }
        "regex" => Some(Grammar::Regex(string("pattern")?)),
        "grammar" => Some(Grammar::Lark(string("grammar")?)),
        other => {
            return Err(ServiceError::invalid(
                format!("{p}.type"),
                format!("unknown response_format type `{other}` (text, json_object, json_schema, regex, grammar; cited_answer with rag)"),
            ))
        }
    })
}

fn check_name(v: &Value, param: &str) -> Result<String, ServiceError> {
    let name = v.as_str().unwrap_or_default();
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ServiceError::invalid(
            param,
            format!("names are 1 to {MAX_NAME} characters of a-z, A-Z, 0-9, underscores and dashes"),
        ));
    }
    Ok(name.to_string())
}

/// What the caller allows the model to do with its tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's function tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`, as
    /// templates take them.
    pub defs: Value,
    names: Vec<String>,
    params: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// `tools`, `tool_choice`, `parallel_tool_calls`. `None` when there are no tools.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<&Value>,
    ) -> Result<Option<Self>, ServiceError> {
        let list = match tools {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ServiceError::invalid("tools", "tools must be an array")),
        };
        if list.len() > MAX_TOOLS {
            return Err(ServiceError::invalid("tools", format!("at most {MAX_TOOLS} tools")));
        }
        let mut defs = Vec::with_capacity(list.len());
        let mut names: Vec<String> = Vec::with_capacity(list.len());
        let mut params = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let p = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ServiceError::invalid(format!("{p}.type"), "only tools of type `function` are supported"));
            }
            let f = t.get("function").and_then(Value::as_object).ok_or_else(|| {
                ServiceError::invalid(format!("{p}.function"), "a function tool needs a `function` object")
            })?;
            let name = check_name(f.get("name").unwrap_or(&Value::Null), &format!("{p}.function.name"))?;
            if names.contains(&name) {
                return Err(ServiceError::invalid(
                    format!("{p}.function.name"),
                    format!("two tools are named `{name}`"),
                ));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => {
                    return Err(ServiceError::invalid(
                        format!("{p}.function.parameters"),
                        "parameters must be a JSON Schema object",
                    ))
                }
            };
            let mut def = Map::new();
            def.insert("name".into(), Value::from(name.clone()));
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                let d = d.as_str().ok_or_else(|| {
                    ServiceError::invalid(format!("{p}.function.description"), "description must be a string")
                })?;
                def.insert("description".into(), Value::from(d));
            }
            def.insert("parameters".into(), parameters.clone());
            defs.push(json!({"type": "function", "function": def}));
            names.push(name);
            params.push(parameters);
        }
        let choice = match choice {
            None | Some(Value::Null) => {
                if names.is_empty() {
                    ToolChoice::None
                } else {
                    ToolChoice::Auto
                }
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ServiceError::invalid(
                        "tool_choice",
                        format!("tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\"}}}}, got `{other}`"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        ServiceError::invalid("tool_choice", "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")
                    })?;
                if !names.iter().any(|n| n == name) {
                    return Err(ServiceError::invalid("tool_choice", format!("tool_choice names `{name}`, which is not in tools")));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if names.is_empty() {
            if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
                return Err(ServiceError::invalid("tool_choice", "tool_choice requires tools"));
            }
            return Ok(None);
        }
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ServiceError::invalid("parallel_tool_calls", "parallel_tool_calls must be a boolean"))
            }
        };
        Ok(Some(Self { defs: Value::Array(defs), names, params, choice, parallel }))
    }

    /// Whether the model must call (and its output is constrained to calls).
    pub fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// For `required` or a named function: the grammar of one call (or several, when
    /// parallel calls are allowed) whose arguments follow the function's schema.
    pub fn grammar(&self, format: ToolFormat) -> Option<Grammar> {
        let chosen: Vec<usize> = match &self.choice {
            ToolChoice::Required => (0..self.names.len()).collect(),
            ToolChoice::Named(n) => self.names.iter().position(|x| x == n).into_iter().collect(),
            ToolChoice::None | ToolChoice::Auto => return None,
        };
        let schema = self.calls_schema(&chosen, format);
        let call = match format {
            ToolFormat::Tagged => format!("\"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""),
            ToolFormat::Bare => format!("%json {schema}"),
        };
        let start = if self.parallel {
            format!("call (\"\\n\" call){{0,{}}}", MAX_PARALLEL_CALLS - 1)
        } else {
            "call".to_string()
        };
        Some(Grammar::Lark(format!("start: {start}\ncall: {call}\n")))
    }

    /// For `auto` with `<tool_call>` tags: the trigger and the grammar of what follows it —
    /// the rest of the call, and more calls when parallel calls are allowed. The model may
    /// answer in text; a call it begins is constrained to parse and to follow its schema.
    ///
    /// Bare calls (Llama 3.x) have no tag: their trigger is `{"name"` at the start of the
    /// output (the engine anchors it there), and the grammar is the rest of one call object.
    pub fn lazy_grammar(&self, format: ToolFormat) -> Option<(String, Grammar)> {
        if self.choice != ToolChoice::Auto {
            return None;
        }
        if format == ToolFormat::Bare {
            // `{"name"` is written; what follows is `: "f", "parameters": {...}}` for one f.
            let alts: Vec<String> = self
                .names
                .iter()
                .zip(&self.params)
                .map(|(name, params)| {
                    let mut p = params.clone();
                    close_objects(&mut p);
                    p["x-guidance"] = json_layout();
                    format!("\"\\\"{name}\\\"\" WS? \",\" WS? \"\\\"parameters\\\"\" WS? \":\" WS? %json {p}")
                })
                .collect();
            let g = format!(
                "start: WS? \":\" WS? call WS? \"}}\"\ncall: {}\nWS: /[ \\t\\n]{{1,4}}/\n",
                alts.join(" | ")
            );
            return Some(("{\"name\"".to_string(), Grammar::Lark(g)));
        }
        let schema = self.calls_schema(&(0..self.names.len()).collect::<Vec<_>>(), format);
        let (more, more_rule) = if self.parallel {
            (
                format!(" more{{0,{}}}", MAX_PARALLEL_CALLS - 1),
                "more: WS? \"<tool_call>\" WS? call WS? \"</tool_call>\"\n",
            )
        } else {
            (String::new(), "")
        };
        let g = format!(
            "start: WS? call WS? \"</tool_call>\"{more}\n{more_rule}call: %json {schema}\nWS: /[ \\t\\n]{{1,4}}/\n"
        );
        Some((OPEN.to_string(), Grammar::Lark(g)))
    }

    /// One call to any of `chosen`: `{"name": <const>, "arguments": <its schema>}`.
    fn calls_schema(&self, chosen: &[usize], format: ToolFormat) -> Value {
        let key = format.arguments_key();
        let calls: Vec<Value> = chosen
            .iter()
            .map(|&i| {
                let mut params = self.params[i].clone();
                close_objects(&mut params);
                json!({
                    "type": "object",
                    "properties": {"name": {"const": self.names[i]}, key: params},
                    "required": ["name", key],
                    "additionalProperties": false
                })
            })
            .collect();
        let mut schema = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
        schema["x-guidance"] = json_layout();
        schema
    }

    /// Our system prompt for templates that do not render tools.
    fn prompt(&self) -> String {
        let mut s = String::from(
            "You can call functions. To call one, reply with only\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments as JSON>}}\n</tool_call>\n",
        );
        s.push_str(match self.choice {
            ToolChoice::Required | ToolChoice::Named(_) => "You must call a function.\n",
            _ => "If no function is needed, answer normally.\n",
        });
        s.push_str("Functions:\n");
        for d in self.defs.as_array().into_iter().flatten() {
            s.push_str(&serde_json::to_string(&d["function"]).unwrap_or_default());
            s.push('\n');
        }
        s
    }
}

/// How a template has the model write calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    Tagged,
    /// A bare `{"name": ..., "parameters": {...}}` (Llama 3.x).
    Bare,
}

impl ToolFormat {
    /// The format `template` uses, and whether it renders tools itself.
    pub fn of(template: &ChatTemplate) -> (Self, bool) {
        let native = template.renders_tools();
        let src = template.source();
        if native && !src.contains("<tool_call>") && src.contains("parameters") {
            (ToolFormat::Bare, true)
        } else {
            (ToolFormat::Tagged, native)
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Tagged => "arguments",
            ToolFormat::Bare => "parameters",
        }
    }
}

/// The messages a template gets. A template that renders tools gets them as they are (the
/// tool definitions go in `tools`); any other gets our system prompt when tools are on, its
/// past calls written out as `<tool_call>` text and `tool` results as user turns (merged
/// with a neighbouring user turn, since many templates insist on alternation).
pub fn prepare_messages(messages: Vec<ChatMessage>, tools: Option<&Tools>, native: bool) -> Vec<ChatMessage> {
    if native {
        return messages;
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools.filter(|t| t.choice != ToolChoice::None) {
        out.push(ChatMessage::new("system", t.prompt()));
    }
    for m in messages {
        let (role, content) = match m.role.as_str() {
            "tool" => ("user".to_string(), format!("<tool_response>\n{}\n</tool_response>", m.content)),
            "assistant" if m.tool_calls.is_some() => {
                let mut c = m.content.clone();
                for call in m.tool_calls.as_ref().and_then(Value::as_array).into_iter().flatten() {
                    let f = &call["function"];
                    // The layout constrained calls are generated in.
                    let body = format!("{{\"name\": {}, \"arguments\": {}}}", f["name"], f["arguments"]);
                    if !c.is_empty() {
                        c.push('\n');
                    }
                    c.push_str(&format!("<tool_call>\n{body}\n</tool_call>"));
                }
                ("assistant".to_string(), c)
            }
            _ => (m.role.clone(), m.content.clone()),
        };
        match out.last_mut() {
            Some(last) if last.role == role && role != "assistant" => {
                last.content.push_str("\n\n");
                last.content.push_str(&content);
            }
            _ => out.push(ChatMessage::new(role, content)),
        }
    }
    out
}

/// What [`ToolParser`] reads out of generated text.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text for the message's `content`.
    Content(String),
    /// A call begins: its position among the choice's calls, id and function name.
    CallStart { index: usize, id: String, name: String },
    /// More of the current call's `arguments` (JSON text).
    Arguments { index: usize, text: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Outside calls.
    Text,
    /// (Bare) text that is not a call: everything is content.
    Plain,
    /// Inside a call, before its arguments.
    Head,
    /// Streaming the arguments: bracket depth, inside a string, after a backslash.
    Args { depth: u32, in_str: bool, esc: bool, begun: bool },
    /// After the arguments, up to the end of the call.
    Tail,
    /// A call whose head is not in the usual order: read whole, then parsed.
    Whole,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Reads calls out of text as it is generated. Content before, between and after calls
/// flows through (none with a forced call); a call's name is known as soon as its head is
/// complete and its arguments stream as they are written. Text that looked like a call but
/// does not parse comes back as content.
pub struct ToolParser {
    format: ToolFormat,
    forced: bool,
    buf: String,
    pos: usize,
    state: State,
    calls: usize,
    /// A call just closed: whitespace that follows is layout, not content.
    after_call: bool,
}

impl ToolParser {
    pub fn new(format: ToolFormat, forced: bool) -> Self {
        Self { format, forced, buf: String::new(), pos: 0, state: State::Text, calls: 0, after_call: false }
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out, false) {}
        out
    }

    /// The end of the text: what was held back comes out.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        while self.step(&mut out, true) {}
        let rest = &self.buf[self.pos..];
        match self.state {
            State::Text | State::Plain if !self.forced => self.content(&mut out, rest.to_string()),
            State::Head | State::Whole if !self.forced => {
                let open = if self.format == ToolFormat::Tagged { OPEN } else { "" };
                self.content(&mut out, format!("{open}{rest}"));
            }
            _ => {}
        }
        self.pos = self.buf.len();
        out
    }

    fn content(&self, out: &mut Vec<Piece>, s: String) {
        if self.forced || s.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(Piece::Content(c)) => c.push_str(&s),
            _ => out.push(Piece::Content(s)),
        }
    }

    fn start_call(&mut self, out: &mut Vec<Piece>, name: String) {
        out.push(Piece::CallStart { index: self.calls, id: call_id(), name });
        self.calls += 1;
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, out: &mut Vec<Piece>, at_end: bool) -> bool {
        let rest = &self.buf[self.pos..];
        match self.state {
            State::Text => match self.format {
                ToolFormat::Tagged => {
                    // Whitespace between and after calls is layout, not content.
                    if self.after_call {
                        let ws = rest.len() - rest.trim_start().len();
                        self.pos += ws;
                        if ws == rest.len() {
                            return false;
                        }
                        self.after_call = false;
                        return true;
                    }
                    if let Some(k) = rest.find(OPEN) {
                        let before = rest[..k].to_string();
                        self.content(out, before);
                        self.pos += k + OPEN.len();
                        self.state = State::Head;
                        return true;
                    }
                    // Hold back a tail that may grow into `<tool_call>`.
                    let hold = (1..OPEN.len().min(rest.len() + 1))
                        .rev()
                        .find(|&n| rest.is_char_boundary(rest.len() - n) && OPEN.starts_with(&rest[rest.len() - n..]))
                        .unwrap_or(0);
                    let emit = rest[..rest.len() - hold].to_string();
                    self.pos += emit.len();
                    self.content(out, emit);
                    false
                }
                ToolFormat::Bare => {
                    let trimmed = rest.trim_start();
                    let ws = rest.len() - trimmed.len();
                    match trimmed.chars().next() {
                        None => false,
                        Some('{') => {
                            let w = rest[..ws].to_string();
                            if self.calls == 0 {
                                self.content(out, w);
                            }
                            self.pos += ws;
                            self.state = State::Head;
                            true
                        }
                        Some(_) => {
                            self.state = State::Plain;
                            true
                        }
                    }
                }
            },
            State::Plain => {
                let s = rest.to_string();
                self.pos = self.buf.len();
                self.content(out, s);
                false
            }
            State::Head => match call_head(rest) {
                Head::Match { len, name } => {
                    self.pos += len;
                    self.start_call(out, name);
                    self.state = State::Args { depth: 0, in_str: false, esc: false, begun: false };
                    true
                }
                Head::Need if !at_end => false,
                Head::Need | Head::Fail => {
                    self.state = State::Whole;
                    true
                }
            },
            State::Args { mut depth, mut in_str, mut esc, mut begun } => {
                let mut end = None;
                for (i, c) in rest.char_indices() {
                    if in_str {
                        match (esc, c) {
                            (true, _) => esc = false,
                            (false, '\\') => esc = true,
                            (false, '"') => in_str = false,
                            _ => {}
                        }
                        if depth == 0 && !in_str {
                            end = Some(i + c.len_utf8());
                            break;
                        }
                        continue;
                    }
                    match c {
                        '"' => {
                            in_str = true;
                            begun = true;
                        }
                        '{' | '[' => {
                            depth += 1;
                            begun = true;
                        }
                        '}' | ']' if depth == 0 => {
                            // The call object closes: the arguments ended before this.
                            end = Some(i);
                            break;
                        }
                        '}' | ']' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(i + 1);
                                break;
                            }
                        }
                        ',' if depth == 0 && begun => {
                            end = Some(i);
                            break;
                        }
                        c if !c.is_whitespace() => begun = true,
                        _ => {}
                    }
                }
                let n = end.unwrap_or(rest.len());
                let piece = rest[..n].to_string();
                self.pos += n;
                if !piece.is_empty() {
                    let index = self.calls - 1;
                    match out.last_mut() {
                        Some(Piece::Arguments { index: i, text }) if *i == index => text.push_str(&piece),
                        _ => out.push(Piece::Arguments { index, text: piece }),
                    }
                }
                if end.is_some() {
                    self.state = State::Tail;
                    true
                } else {
                    self.state = State::Args { depth, in_str, esc, begun };
                    false
                }
            }
            State::Tail => {
                let close = match self.format {
                    ToolFormat::Tagged => rest.find(CLOSE).map(|k| k + CLOSE.len()),
                    ToolFormat::Bare => rest.find('}').map(|k| k + 1),
                };
                match close {
                    Some(k) => {
                        self.pos += k;
                        self.state = State::Text;
                        self.after_call = true;
                        true
                    }
                    None => false,
                }
            }
            State::Whole => {
                let (body, consumed) = match self.format {
                    ToolFormat::Tagged => match rest.find(CLOSE) {
                        Some(k) => (&rest[..k], k + CLOSE.len()),
                        None => return false,
                    },
                    ToolFormat::Bare => {
                        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                        match it.next() {
                            Some(Ok(_)) => (&rest[..it.byte_offset()], it.byte_offset()),
                            Some(Err(e)) if e.is_eof() => return false,
                            _ => (rest, rest.len()),
                        }
                    }
                };
                let parsed = serde_json::from_str::<Value>(body.trim()).ok().and_then(|v| {
                    let name = v.get("name")?.as_str()?.to_string();
                    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or_else(|| json!({}));
                    Some((name, args))
                });
                let parsed_ok = parsed.is_some();
                match parsed {
                    Some((name, args)) => {
                        let index = self.calls;
                        self.start_call(out, name);
                        out.push(Piece::Arguments { index, text: args.to_string() });
                    }
                    None => {
                        let raw = if self.format == ToolFormat::Tagged {
                            format!("{OPEN}{}", &rest[..consumed])
                        } else {
                            rest[..consumed].to_string()
                        };
                        self.content(out, raw);
                        if self.format == ToolFormat::Bare {
                            self.pos += consumed;
                            self.state = State::Plain;
                            return true;
                        }
                    }
                }
                self.pos += consumed;
                self.state = State::Text;
                self.after_call = parsed_ok;
                true
            }
        }
    }
}

enum Head {
    Match { len: usize, name: String },
    Need,
    Fail,
}

/// `{"name": "NAME", "arguments": ` (or `"parameters": `) at the start of `s` (whitespace
/// between tokens allowed).
fn call_head(s: &str) -> Head {
    let b = s.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Matches `lit` at i; Need when the text ends inside it.
    let lit = |i: &mut usize, lit: &str| -> Option<bool> {
        let l = lit.as_bytes();
        let n = l.len().min(b.len() - *i);
        if b[*i..*i + n] != l[..n] {
            return Some(false);
        }
        if n < l.len() {
            return None;
        }
        *i += l.len();
        Some(true)
    };
    macro_rules! expect {
        ($l:expr) => {
            ws(&mut i);
            match lit(&mut i, $l) {
                Some(true) => {}
                Some(false) => return Head::Fail,
                None => return Head::Need,
            }
        };
    }
    expect!("{");
    expect!("\"name\"");
    expect!(":");
    expect!("\"");
    let start = i;
    while i < b.len() && b[i] != b'"' {
        if b[i] == b'\\' {
            return Head::Fail;
        }
        i += 1;
    }
    if i == b.len() {
        return Head::Need;
    }
    let name = s[start..i].to_string();
    i += 1;
    expect!(",");
    ws(&mut i);
    // Either key, whatever the format: models trained on one write it in the other's.
    match (lit(&mut i.clone(), "\"arguments\""), lit(&mut i.clone(), "\"parameters\"")) {
        (Some(true), _) => i += "\"arguments\"".len(),
        (_, Some(true)) => i += "\"parameters\"".len(),
        (None, _) | (_, None) => return Head::Need,
        _ => return Head::Fail,
    }
    expect!(":");
    ws(&mut i);
    if i == b.len() {
        return Head::Need;
    }
    Head::Match { len: i, name }
}

/// A choice's finish reason once its calls are read: a turn that stopped by itself after
/// calling ends with `tool_calls`.
pub fn finish_reason(reason: &'static str, calls: usize) -> &'static str {
    if calls > 0 && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// An OpenAI-style call id.
pub fn call_id() -> String {
    use ragway_engine::generate::sampling::random_seed;
    format!("call_{:016x}{:08x}", random_seed(), random_seed() as u32)
}

/// A whole choice's text read into content and calls `(id, name, arguments)`.
pub fn split_calls(format: ToolFormat, forced: bool, text: &str) -> (String, Vec<(String, String, String)>) {
    let mut p = ToolParser::new(format, forced);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Content(c) => content.push_str(&c),
            Piece::CallStart { id, name, .. } => {
                calls.push((id, name, String::new()));
            }
            Piece::Arguments { index, text } => {
                if let Some(c) = calls.get_mut(index) {
                    c.2.push_str(&text);
                }
            }
        }
    }
    if !calls.is_empty() {
        content = content.trim().to_string();
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content and calls `(name, arguments)` read from `parts` fed one after another.
    pub(super) fn read_in_pieces(format: ToolFormat, forced: bool, parts: &[&str]) -> (String, Vec<(String, String)>) {
        let mut p = ToolParser::new(format, forced);
        let mut pieces = Vec::new();
        for part in parts {
            pieces.extend(p.push(part));
        }
        pieces.extend(p.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(c) => content.push_str(&c),
                Piece::CallStart { name, .. } => calls.push((name, String::new())),
                Piece::Arguments { index, text } => calls[index].1.push_str(&text),
            }
        }
        (content, calls)
    }

    fn calls_of(format: ToolFormat, forced: bool, text: &str) -> (String, Vec<(String, String)>) {
        let (content, calls) = split_calls(format, forced, text);
        (content, calls.into_iter().map(|(_, n, a)| (n, a)).collect())
    }

    #[test]
    fn tagged_calls_with_text_around() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = calls_of(ToolFormat::Tagged, false, t);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![("get_weather".into(), "{\"city\": \"Paris\", \"unit\": \"c\"}".into()), ("now".into(), "{}".into())]
        );
    }

    #[test]
    fn streaming_in_any_pieces_gives_the_same_calls() {
        let t = "Sure <tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"a \\\"}\\\" b\", \"n\": [1, {\"x\": 2}]}}\n</tool_call> done";
        let whole = calls_of(ToolFormat::Tagged, false, t);
        for size in 1..8 {
            let chars: Vec<char> = t.chars().collect();
            let parts: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            assert_eq!(read_in_pieces(ToolFormat::Tagged, false, &refs), whole, "chunks of {size}");
        }
        assert_eq!(whole.1[0].1, "{\"q\": \"a \\\"}\\\" b\", \"n\": [1, {\"x\": 2}]}");
        assert_eq!(whole.0, "Sure done");
    }

    #[test]
    fn bare_calls_and_plain_answers() {
        let (c, calls) = calls_of(ToolFormat::Bare, false, "{\"name\": \"f\", \"parameters\": {\"a\": 1}}");
        assert_eq!((c.as_str(), calls), ("", vec![("f".to_string(), "{\"a\": 1}".to_string())]));
        let (c, calls) = calls_of(ToolFormat::Bare, false, "The answer is {not a call}.");
        assert_eq!((c.as_str(), calls.len()), ("The answer is {not a call}.", 0));
        // Keys in another order are read whole.
        let (_, calls) = calls_of(ToolFormat::Bare, false, "{\"parameters\": {\"a\": 1}, \"name\": \"f\"}");
        assert_eq!(calls, vec![("f".to_string(), "{\"a\":1}".to_string())]);
    }

    #[test]
    fn spaces_in_text_after_a_call_survive_streaming() {
        // Found by the fuzz test: whitespace was dropped wherever it began a piece.
        let t = "<tool_call>{\"name\": \"g\", \"parameters\": {\"a\": 1}}</tool_call>\n and then some text";
        let whole = calls_of(ToolFormat::Tagged, false, t);
        assert_eq!(whole, ("and then some text".to_string(), vec![("g".to_string(), "{\"a\": 1}".to_string())]));
        let chars: Vec<String> = t.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(read_in_pieces(ToolFormat::Tagged, false, &refs).0, "and then some text");
    }

    #[test]
    fn broken_calls_come_back_as_text() {
        let t = "<tool_call>\nnot json\n</tool_call>";
        let (c, calls) = calls_of(ToolFormat::Tagged, false, t);
        assert_eq!((c.as_str(), calls.len()), (t, 0));
        let (c, calls) = calls_of(ToolFormat::Tagged, false, "a <tool_ca");
        assert_eq!((c.as_str(), calls.len()), ("a <tool_ca", 0));
    }

    #[test]
    fn response_formats_and_their_errors() {
        assert_eq!(response_format(Some(&json!({"type": "text"}))).unwrap(), None);
        assert!(matches!(
            response_format(Some(&json!({"type": "json_object"}))).unwrap(),
            Some(Grammar::JsonSchema(_))
        ));
        let s =
            json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": true}});
        assert_eq!(response_format(Some(&s)).unwrap(), Some(Grammar::JsonSchema(json!({"type": "object"}))));
        assert_eq!(
            response_format(Some(&json!({"type": "regex", "pattern": "a+"}))).unwrap(),
            Some(Grammar::Regex("a+".into()))
        );
        for (bad, param) in [
            (json!({"type": "xml"}), "response_format.type"),
            (json!({"type": "regex"}), "response_format.pattern"),
            (json!({"type": "json_schema"}), "response_format.json_schema"),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}),
                "response_format.json_schema.schema",
            ),
            (json!([]), "response_format"),
        ] {
            let e = response_format(Some(&bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn tools_and_choices() {
        let t = Tools::parse(Some(&weather()), None, None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.grammar(ToolFormat::Tagged).is_none());
        let named = json!({"type": "function", "function": {"name": "now"}});
        let t = Tools::parse(Some(&weather()), Some(&named), Some(&json!(false))).unwrap().unwrap();
        let Some(Grammar::Lark(g)) = t.grammar(ToolFormat::Tagged) else { panic!() };
        assert!(g.starts_with("start: call\n") && g.contains("\"const\":\"now\"") && !g.contains("get_weather"), "{g}");
        for (tools, choice, param) in [
            (json!([{"type": "function", "function": {"name": "a b"}}]), Value::Null, "tools[0].function.name"),
            (json!([{"type": "retrieval"}]), Value::Null, "tools[0].type"),
            (weather(), json!("sometimes"), "tool_choice"),
            (weather(), json!({"type": "function", "function": {"name": "nope"}}), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
            (
                json!([{"type": "function", "function": {"name": "a", "parameters": []}}]),
                Value::Null,
                "tools[0].function.parameters",
            ),
        ] {
            let e = Tools::parse(Some(&tools), Some(&choice), None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param));
        }
        let many = Value::Array(
            (0..129).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect(),
        );
        assert!(Tools::parse(Some(&many), None, None).is_err());
    }

    /// A Hermes/Qwen-style template (tools in the system turn, calls in `<tool_call>` tags)
    /// and a Llama-3.x-style one (bare JSON calls with `parameters`), written the way those
    /// templates read `tools`, `tool_calls` and `tool` turns.
    const HERMES: &str = r#"{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return calls as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls is defined %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

    const LLAMA3: &str = r#"{%- if tools %}Respond with {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}{% endif %}
{%- for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>
{% if m.tool_calls is defined %}{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>
{%- endfor %}"#;

    #[test]
    fn templates_that_render_tools_get_them_natively() {
        let t = Tools::parse(Some(&weather()), Some(&json!("required")), None).unwrap().unwrap();
        let hermes = ChatTemplate::new(HERMES, "", "").unwrap();
        assert_eq!(ToolFormat::of(&hermes), (ToolFormat::Tagged, true));
        let llama = ChatTemplate::new(LLAMA3, "", "").unwrap();
        assert_eq!(ToolFormat::of(&llama), (ToolFormat::Bare, true));
        let plain = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}", "", "").unwrap();
        assert_eq!(ToolFormat::of(&plain), (ToolFormat::Tagged, false));

        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(json!([{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]));
        let mut result = ChatMessage::new("tool", "{\"temp\": 3}");
        result.tool_call_id = Some("c1".into());
        let history = vec![ChatMessage::new("user", "Weather in Oslo?"), call, result];
        let msgs = prepare_messages(history.clone(), Some(&t), true);
        assert_eq!(msgs, history, "a native template gets the messages as they are");
        let out = hermes.render_with_tools(&msgs, Some(&t.defs), true).unwrap();
        let tools_part = &out[out.find("<tools>").unwrap()..out.find("</tools>").unwrap()];
        assert!(tools_part.contains("\"name\": \"get_weather\"") && tools_part.contains("\"name\": \"now\""), "{out}");
        assert!(out.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"), "{out}");
        assert!(out.contains("<tool_response>\n{\"temp\": 3}\n</tool_response>"), "{out}");
        let out = llama.render_with_tools(&msgs, Some(&t.defs), true).unwrap();
        assert!(out.contains("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"), "{out}");
        assert!(out.contains("<|start_header_id|>ipython<|end_header_id|>\n{\"temp\": 3}"), "{out}");
        // The forced grammar follows each format.
        let Some(Grammar::Lark(g)) = t.grammar(ToolFormat::Bare) else { panic!() };
        assert!(g.contains("\"parameters\"") && !g.contains("<tool_call>"), "{g}");
        let Some(Grammar::Lark(g)) = t.grammar(ToolFormat::Tagged) else { panic!() };
        assert!(g.contains("\"arguments\"") && g.contains("<tool_call>"), "{g}");
        // `auto` constrains a call only once it has begun, and only with tags to begin it.
        assert!(t.lazy_grammar(ToolFormat::Tagged).is_none(), "required is constrained from the start");
        let auto = Tools::parse(Some(&weather()), None, Some(&json!(false))).unwrap().unwrap();
        let (trigger, Grammar::Lark(g)) = auto.lazy_grammar(ToolFormat::Tagged).unwrap() else { panic!() };
        assert_eq!(trigger, "<tool_call>");
        assert!(g.starts_with("start: WS? call WS? \"</tool_call>\"\ncall: %json") && !g.contains("more"), "{g}");
        let (trigger, Grammar::Lark(g)) = auto.lazy_grammar(ToolFormat::Bare).unwrap() else { panic!() };
        assert_eq!(trigger, "{\"name\"");
        assert!(g.contains("\"\\\"get_weather\\\"\"") && g.contains("\"\\\"parameters\\\"\""), "{g}");
    }

    #[test]
    fn generic_prompt_writes_history_as_text() {
        let t = Tools::parse(Some(&weather()), None, None).unwrap().unwrap();
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(
            json!([{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
        );
        let mut result = ChatMessage::new("tool", "{\"temp\": 3}");
        result.tool_call_id = Some("c1".into());
        let msgs = prepare_messages(vec![ChatMessage::new("user", "Weather in Oslo?"), call, result], Some(&t), false);
        let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(msgs[0].content.contains("\"name\":\"get_weather\""));
        assert_eq!(
            msgs[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}\n</tool_call>"
        );
        assert_eq!(msgs[3].content, "<tool_response>\n{\"temp\": 3}\n</tool_response>");
    }
}

/// The tool-call parser reads model output, which is as arbitrary as any input: it never
/// panics, and text fed in any pieces reads the same as fed whole.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<tool_call>".to_string()),
            Just("</tool_call>".to_string()),
            Just("<tool_ca".to_string()),
            Just("{\"name\": \"f\", \"arguments\": ".to_string()),
            Just("{\"name\": \"g\", \"parameters\": {\"a\": [1, \"}\"]}}".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            Just("\"\\\"".to_string()),
            Just("\n".to_string()),
            "[a-zé日 ,:\\[\\]]{0,6}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    use super::tests::read_in_pieces as read;

    proptest! {
        #[test]
        fn pieces_read_like_the_whole(t in text(), cut in 1usize..7, bare in any::<bool>(), forced in any::<bool>()) {
            let format = if bare { ToolFormat::Bare } else { ToolFormat::Tagged };
            let chars: Vec<char> = t.chars().collect();
            let parts: Vec<String> = chars.chunks(cut).map(|c| c.iter().collect()).collect();
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let whole = read(format, forced, &[t.as_str()]);
            prop_assert_eq!(read(format, forced, &refs), whole);
        }
    }
}
