//! Constrained decoding with the real SmolLM2 tokenizer and weights: token bytes, masks for
//! JSON Schemas, regular expressions and Lark grammars checked against an independent JSON
//! Schema validator, and constrained sequences batched with unconstrained ones.

use super::common::models_dir;
use proptest::prelude::*;
use ragway_engine::generate::{
    resolve_generation_model, Constrainer, FinishReason, GenEvent, GenerateConfig, GenerateHandle, GenerateWorker,
    GenerationRequest, Grammar, GrammarLimits, SamplingParams, TextTokenizer,
};
use ragway_engine::models::DEFAULT_GENERATION_MODEL_ID;
use ragway_engine::EngineError;
use serde_json::{json, Value};
use std::sync::OnceLock;

fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = resolve_generation_model(DEFAULT_GENERATION_MODEL_ID, &models_dir()).unwrap();
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
        TextTokenizer::from_gguf(&content).unwrap()
    })
}

fn constrainer() -> &'static Constrainer {
    static C: OnceLock<Constrainer> = OnceLock::new();
    C.get_or_init(|| Constrainer::new(tokenizer(), tokenizer().vocab_size(), GrammarLimits::default()).unwrap())
}

fn worker() -> &'static GenerateHandle {
    static H: OnceLock<GenerateHandle> = OnceLock::new();
    H.get_or_init(|| {
        let cfg = GenerateConfig::new(DEFAULT_GENERATION_MODEL_ID, DEFAULT_GENERATION_MODEL_ID, models_dir());
        GenerateWorker::spawn(cfg).expect("start the SmolLM2 worker")
    })
}

/// Feeds `text`'s tokens one at a time; true when every token was allowed and the grammar
/// may end after the last.
fn accepts(g: &Grammar, text: &str) -> bool {
    let tk = tokenizer();
    let mut c = constrainer().compile(g, "test").unwrap();
    for id in tk.encode(text, false).unwrap() {
        if !c.allows(id).unwrap() {
            return false;
        }
        c.accept(id).unwrap();
    }
    tk.stop_ids.iter().any(|&eos| c.allows(eos).unwrap())
}

/// JSON with the separators constrained output uses (`", "`, `": "`), keys in their order.
fn canonical(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), canonical(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// A JSON Schema validator of its own for the keywords these tests use, written from the
/// specification (draft 2020-12), independent of llguidance. (The `jsonschema` crate would
/// turn on serde_json's `float_roundtrip` in every test build, changing how the server under
/// test parses numbers.) Unknown keywords fail loudly rather than pass.
struct Validator(Value);

fn validator(schema: &Value) -> Validator {
    Validator(schema.clone())
}

impl Validator {
    fn is_valid(&self, v: &Value) -> bool {
        valid(&self.0, v)
    }
}

fn valid(s: &Value, v: &Value) -> bool {
    let Some(s) = s.as_object() else { return true };
    s.iter().all(|(k, want)| match k.as_str() {
        "type" => {
            let is = |t: &str| match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "boolean" => v.is_boolean(),
                "null" => v.is_null(),
                "number" => v.is_number(),
                "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
                other => panic!("type {other}"),
            };
            match want {
                Value::String(t) => is(t),
                Value::Array(ts) => ts.iter().any(|t| is(t.as_str().unwrap())),
                _ => panic!("type {want}"),
            }
        }
        "properties" => v.as_object().is_none_or(|o| {
            want.as_object().unwrap().iter().all(|(name, sub)| o.get(name).is_none_or(|x| valid(sub, x)))
        }),
        "required" => v.as_object().is_none_or(|o| want.as_array().unwrap().iter().all(|r| o.contains_key(r.as_str().unwrap()))),
        "additionalProperties" => v.as_object().is_none_or(|o| {
            let props = s.get("properties").and_then(Value::as_object);
            o.iter().all(|(name, x)| props.is_some_and(|p| p.contains_key(name)) || valid_or_bool(want, x))
        }),
        "enum" => want.as_array().unwrap().contains(v),
        "const" => want == v,
        "minLength" => v.as_str().is_none_or(|t| t.chars().count() as u64 >= want.as_u64().unwrap()),
        "maxLength" => v.as_str().is_none_or(|t| t.chars().count() as u64 <= want.as_u64().unwrap()),
        "minimum" => v.as_f64().is_none_or(|x| x >= want.as_f64().unwrap()),
        "maximum" => v.as_f64().is_none_or(|x| x <= want.as_f64().unwrap()),
        "items" => v.as_array().is_none_or(|a| a.iter().all(|x| valid(want, x))),
        "minItems" => v.as_array().is_none_or(|a| a.len() as u64 >= want.as_u64().unwrap()),
        "maxItems" => v.as_array().is_none_or(|a| a.len() as u64 <= want.as_u64().unwrap()),
        "anyOf" => want.as_array().unwrap().iter().any(|sub| valid(sub, v)),
        "format" => v.as_str().is_none_or(|t| match want.as_str().unwrap() {
            "date" => is_date(t),
            other => panic!("format {other}"),
        }),
        other => panic!("the test validator does not know `{other}`"),
    })
}

fn valid_or_bool(s: &Value, v: &Value) -> bool {
    match s {
        Value::Bool(b) => *b,
        other => valid(other, v),
    }
}

/// RFC 3339 full-date: YYYY-MM-DD naming a real day.
fn is_date(t: &str) -> bool {
    let b = t.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| t.get(r).filter(|x| x.bytes().all(|c| c.is_ascii_digit())).and_then(|x| x.parse::<u32>().ok());
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else { return false };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    (1..=12).contains(&m) && d >= 1 && d <= days[m as usize - 1]
}

#[test]
fn the_test_validator_follows_the_specification() {
    let s = json!({"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}, "d": {"type": "string", "format": "date"}},
        "required": ["a"], "additionalProperties": false});
    let v = validator(&s);
    assert!(v.is_valid(&json!({"a": 3})));
    assert!(v.is_valid(&json!({"a": 2.0, "d": "2024-02-29"})));
    assert!(!v.is_valid(&json!({"a": 4})));
    assert!(!v.is_valid(&json!({"a": 1.5})));
    assert!(!v.is_valid(&json!({})));
    assert!(!v.is_valid(&json!({"a": 1, "b": 2})));
    assert!(!v.is_valid(&json!({"a": 1, "d": "2023-02-29"})));
    assert!(!v.is_valid(&json!([1])));
}

#[test]
fn token_bytes_spell_the_text_they_encode() {
    let tk = tokenizer();
    let bytes = tk.token_bytes();
    for text in ["Hello, wörld! {\"a\": [1, 2.5e-3]}", "  indented\n\ttabs", "日本語 and emoji 🦀", "\u{7f}\u{1}"]
    {
        let ids = tk.encode(text, false).unwrap();
        let spelled: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone().expect("text token")).collect();
        assert_eq!(String::from_utf8_lossy(&spelled), text);
    }
    for &s in &tk.stop_ids {
        assert!(bytes[s as usize].is_none(), "stop token {s} must not be text");
    }
}

#[test]
fn masks_follow_a_nested_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
            "where": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"], "additionalProperties": false},
            "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let g = Grammar::JsonSchema(schema);
    assert!(accepts(&g, r#"{"name": "Ada", "age": 36}"#));
    assert!(accepts(
        &g,
        r#"{"name": "Ada", "age": 36, "tags": ["red", "blue"], "where": {"x": 1.5, "y": -2}, "when": "2024-02-29"}"#
    ));
    assert!(accepts(&g, r#"{"name": "Ada", "age": 36, "when": null}"#));
    // Missing required field, out of range, bad enum, too many items, bad date, extra key.
    assert!(!accepts(&g, r#"{"name": "Ada"}"#));
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 151}"#));
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 3, "tags": ["pink"]}"#));
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 3, "tags": ["red", "red", "red", "red"]}"#));
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 3, "when": "2024-13-01"}"#));
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 3, "zzz": 1}"#));
    assert!(!accepts(&g, r#"{"name": "", "age": 3}"#));
    // An unfinished object is a valid prefix but not an end.
    assert!(!accepts(&g, r#"{"name": "Ada", "age": 36"#));
}

#[test]
fn json_object_regex_and_lark() {
    let any = Grammar::JsonSchema(json!({"type": "object"}));
    assert!(accepts(&any, r#"{"a": [1, {"b": null}], "c": "d"}"#));
    assert!(!accepts(&any, "[1, 2]"));
    assert!(!accepts(&any, "hello"));
    let rx = Grammar::Regex(r"\d{3}-[a-z]+".into());
    assert!(accepts(&rx, "123-abc"));
    assert!(!accepts(&rx, "12-abc"));
    assert!(!accepts(&rx, "123-ABC"));
    let lark = Grammar::Lark(
        r#"
        start: answer " because " reason
        answer: "yes" | "no"
        reason: /[a-z ]{1,30}/
    "#
        .into(),
    );
    assert!(accepts(&lark, "yes because it is so"));
    assert!(!accepts(&lark, "maybe because"));
    let tool = Grammar::Lark(
        r#"start: "<tool_call>\n" %json {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]} "\n</tool_call>""#
            .into(),
    );
    assert!(accepts(&tool, "<tool_call>\n{\"city\": \"Paris\"}\n</tool_call>"));
    assert!(!accepts(&tool, "<tool_call>\n{}\n</tool_call>"));
}

#[test]
fn bad_grammars_are_the_callers_error() {
    let c = constrainer();
    for (g, needle) in [
        (Grammar::JsonSchema(json!({"type": "frobnicate"})), "frobnicate"),
        (Grammar::JsonSchema(json!([1])), "must be an object"),
        (Grammar::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})), ""),
        (Grammar::Regex("(unclosed".into()), ""),
        (Grammar::Lark("start: missing_rule".into()), "missing_rule"),
        (Grammar::Regex("a".repeat(70_000)), "bytes"),
    ] {
        match c.compile(&g, "response_format") {
            Err(EngineError::InvalidRequest { param, message }) => {
                assert_eq!(param.as_deref(), Some("response_format"));
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{g:?}: expected a request error, got {other:?}"),
        }
    }
}

/// Values shaped like the schema below (keys in its order), valid or not.
fn person() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        Just(json!("")),
        Just(json!("Ada")),
        Just(json!("Zoë")),
        Just(json!("tab\tq\"x")),
        Just(json!("12345678")),
        Just(json!("123456789")),
        Just(json!(5)),
    ];
    let age = prop_oneof![(-5i64..200).prop_map(Value::from), Just(json!(2.5)), Just(json!("7")), Just(Value::Null)];
    let tags = prop::collection::vec(prop_oneof![Just("red"), Just("green"), Just("blue"), Just("pink")], 0..5)
        .prop_map(|t| json!(t));
    let score = prop_oneof![(-1e6f64..1e6).prop_map(|f| json!(f)), (0i64..10).prop_map(Value::from), Just(json!(true))];
    (prop::option::of(name), prop::option::of(age), prop::option::of(tags), prop::option::of(score), any::<bool>())
        .prop_map(|(n, a, t, s, extra)| {
            let mut o = serde_json::Map::new();
            for (k, v) in [("name", n), ("age", a), ("tags", t), ("score", s)] {
                if let Some(v) = v {
                    o.insert(k.into(), v);
                }
            }
            if extra {
                o.insert("zz".into(), json!(1));
            }
            Value::Object(o)
        })
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "score": {"type": "number"}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    /// Token-by-token acceptance agrees with whole-document validation by an independent
    /// validator, for documents in the constrained output's layout.
    #[test]
    fn incremental_acceptance_equals_whole_document_validation(v in person()) {
        let schema = person_schema();
        let text = canonical(&v);
        prop_assert_eq!(accepts(&Grammar::JsonSchema(schema.clone()), &text), validator(&schema).is_valid(&v), "{}", text);
    }
}

struct Out {
    text: String,
    finish: Option<FinishReason>,
}

fn collect(mut stream: ragway_engine::generate::GenerationStream) -> Out {
    let mut out = Out { text: String::new(), finish: None };
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenEvent::Token { text, .. } | GenEvent::Text { text, .. } => out.text.push_str(&text),
            GenEvent::Done { finish_reason, .. } => {
                out.finish = Some(finish_reason);
                break;
            }
            GenEvent::Error { message } => panic!("engine error: {message}"),
        }
    }
    out
}

fn chat_prompt(h: &GenerateHandle, question: &str) -> Vec<u32> {
    let t = h.chat_template().unwrap();
    let text = t.render(&[ragway_engine::generate::ChatMessage::new("user", question)], true).unwrap();
    h.tokenizer().encode(&text, false).unwrap()
}

fn constrained(
    h: &GenerateHandle,
    question: &str,
    schema: &Value,
    max_tokens: usize,
    sampling: SamplingParams,
) -> GenerationRequest {
    let mut req = GenerationRequest::new(chat_prompt(h, question), max_tokens, sampling);
    req.constraint = Some(h.compile(&Grammar::JsonSchema(schema.clone()), "response_format").unwrap());
    req
}

#[test]
fn constrained_and_unconstrained_sequences_share_a_batch() {
    let h = worker();
    let schema = person_schema();
    let alone_c =
        collect(h.submit(constrained(h, "Describe a person as JSON.", &schema, 80, SamplingParams::greedy())).unwrap());
    let free = || GenerationRequest::new(chat_prompt(h, "Name three colours."), 40, SamplingParams::greedy());
    let alone_u = collect(h.submit(free()).unwrap());
    assert_eq!(alone_c.finish, Some(FinishReason::Stop), "{}", alone_c.text);
    let v: Value = serde_json::from_str(&alone_c.text).unwrap_or_else(|e| panic!("{e}: {}", alone_c.text));
    assert!(validator(&schema).is_valid(&v), "{}", alone_c.text);
    // Together: each gives what it gave alone.
    let streams = vec![
        h.submit(free()).unwrap(),
        h.submit(constrained(h, "Describe a person as JSON.", &schema, 80, SamplingParams::greedy())).unwrap(),
        h.submit(free()).unwrap(),
    ];
    let outs: Vec<Out> = streams.into_iter().map(collect).collect();
    assert_eq!(outs[0].text, alone_u.text);
    assert_eq!(outs[2].text, alone_u.text);
    assert_eq!(outs[1].text, alone_c.text);
    assert!(h.metrics().masks_total.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // The keys after `{` are forced: appended without sampling, fed as one chunk.
    assert!(h.metrics().forced_tokens_total.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn an_unfinishable_schema_ends_with_length() {
    let h = worker();
    let schema =
        json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 500}}, "required": ["s"]});
    let out = collect(h.submit(constrained(h, "Say hi.", &schema, 12, SamplingParams::greedy())).unwrap());
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert!(out.text.starts_with("{\"s\": \""), "{}", out.text);
}

/// A fixed family of schemas, drawn by seed: objects of 1-4 fields whose types, bounds and
/// nesting vary.
fn random_schema(seed: u64) -> Value {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let fields = 1 + next(4);
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for i in 0..fields {
        let f = match next(8) {
            0 => json!({"type": "string", "maxLength": 1 + next(20)}),
            1 => json!({"type": "integer", "minimum": 0, "maximum": 10 + next(1000)}),
            2 => json!({"type": "number"}),
            3 => json!({"type": "boolean"}),
            4 => json!({"enum": ["alpha", "beta", "gamma"]}),
            5 => json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 1 + next(4)}),
            6 => {
                json!({"type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string", "maxLength": 12}}, "required": ["id"]})
            }
            _ => json!({"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}),
        };
        let name = format!("field_{i}");
        if next(3) > 0 {
            required.push(name.clone());
        }
        props.insert(name, f);
    }
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

#[test]
fn two_hundred_seeded_requests_with_random_schemas_are_all_valid() {
    let h = worker();
    let mut stops = 0;
    // Submitted in waves below the queue's bound; each wave runs as one batch.
    for wave in 0..10u64 {
        let jobs: Vec<(Value, ragway_engine::generate::GenerationStream)> = (0..20u64)
            .map(|k| {
                let seed = wave * 20 + k;
                let schema = random_schema(seed);
                let sampling =
                    SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(seed), ..SamplingParams::default() };
                let req = constrained(h, "Fill in the record with plausible values.", &schema, 120, sampling);
                (schema, h.submit(req).unwrap())
            })
            .collect();
        for (schema, stream) in jobs {
            let out = collect(stream);
            if out.finish == Some(FinishReason::Stop) {
                stops += 1;
                let v: Value =
                    serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {} for {schema}", out.text));
                assert!(validator(&schema).is_valid(&v), "{} does not validate against {schema}", out.text);
            }
        }
    }
    // Most finish within 120 tokens; the ones that do not are cut, never wrong.
    eprintln!("random schemas: {stops} of 200 finished with stop, all valid");
    assert!(stops >= 150, "only {stops} of 200 finished");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// Grammars are request bytes: any regex, Lark text or schema compiles or is refused as
    /// the caller's error — never a panic, never an internal error.
    #[test]
    fn any_grammar_text_compiles_or_is_refused(
        text in prop_oneof![
            ".{0,40}",
            "[\\[\\]\\(\\)\\{\\}a-c|*+?\\\\^$.,0-9:\" %]{0,30}",
            "start: [a-z\" |()*+?:/\\n{},0-9%]{0,40}",
        ],
        kind in 0..3usize,
    ) {
        let g = match kind {
            0 => Grammar::Regex(text),
            1 => Grammar::Lark(text),
            _ => Grammar::JsonSchema(serde_json::from_str(&text).unwrap_or_else(|_| json!({"type": "object", "pattern": text}))),
        };
        match constrainer().compile(&g, "response_format") {
            Ok(mut c) => {
                let mut logits = vec![0.0f32; tokenizer().vocab_size()];
                prop_assert!(c.apply(&mut logits).is_ok());
            }
            Err(EngineError::InvalidRequest { .. }) => {}
            Err(e) => prop_assert!(false, "not a request error: {e:?}"),
        }
    }
}

/// A lazy grammar leaves the text free until its trigger appears, then constrains what
/// follows (how `tool_choice: auto` keeps a begun call well-formed). SmolLM2 answers "What
/// is 2+2?" greedily with "The answer to this classic math problem is 4."
#[test]
fn a_lazy_grammar_takes_over_after_its_trigger() {
    let h = worker();
    let ask = || GenerationRequest::new(chat_prompt(h, "What is 2+2?"), 40, SamplingParams::greedy());
    let free = collect(h.submit(ask()).unwrap());
    assert!(free.text.starts_with("The answer"), "{}", free.text);
    let lazy = |trigger: &str, rx: &str| {
        let mut req = ask();
        let constraint = h.compile(&Grammar::Regex(rx.into()), "test").unwrap();
        req.lazy = Some(ragway_engine::generate::LazyConstraint { trigger: trigger.into(), constraint, anchored: false });
        collect(h.submit(req).unwrap())
    };
    // Triggered: "The answer" is free, the rest must be " is <digit>!!".
    let out = lazy("The answer", r" is [0-9]!!");
    let digit = out.text.strip_prefix("The answer is ").and_then(|r| r.strip_suffix("!!"));
    assert!(digit.is_some_and(|d| d.len() == 1 && d.as_bytes()[0].is_ascii_digit()), "{}", out.text);
    assert_eq!(out.finish, Some(FinishReason::Stop));
    // Never triggered: the free text, unchanged.
    let out = lazy("<tool_call>", r"\{\}");
    assert_eq!(out.text, free.text);
    // Anchored: counts only at the very start of the output.
    let anchored = |trigger: &str| {
        let mut req = ask();
        let constraint = h.compile(&Grammar::Regex(r" is [0-9]!!".into()), "test").unwrap();
        req.lazy = Some(ragway_engine::generate::LazyConstraint { trigger: trigger.into(), constraint, anchored: true });
        collect(h.submit(req).unwrap())
    };
    assert!(anchored("The answer").text.starts_with("The answer is "), "at the start: constrained");
    assert_eq!(anchored("answer").text, free.text, "not at the start: free");
}

/// `n` sequences of one request each carry their own copy of the grammar state: every
/// sampled one is valid.
#[test]
fn n_sampled_sequences_each_follow_the_schema() {
    let h = worker();
    let schema = person_schema();
    let sampling = SamplingParams { temperature: 1.0, seed: Some(7), ..SamplingParams::default() };
    let mut req = constrained(h, "Describe a person as JSON.", &schema, 80, sampling);
    req.n = 3;
    let mut stream = h.submit(req).unwrap();
    let mut texts = vec![String::new(); 3];
    let mut done = vec![None; 3];
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenEvent::Token { index, text, .. } | GenEvent::Text { index, text } => texts[index].push_str(&text),
            GenEvent::Done { index, finish_reason, .. } => {
                done[index] = Some(finish_reason);
                if done.iter().all(Option::is_some) {
                    break;
                }
            }
            GenEvent::Error { message } => panic!("{message}"),
        }
    }
    for (t, f) in texts.iter().zip(&done) {
        if *f == Some(FinishReason::Stop) {
            let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t}"));
            assert!(validator(&schema).is_valid(&v), "{t}");
        }
    }
    assert!(done.iter().filter(|f| **f == Some(FinishReason::Stop)).count() >= 2, "{texts:?}");
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "three seeded draws should not all agree: {texts:?}");
}
