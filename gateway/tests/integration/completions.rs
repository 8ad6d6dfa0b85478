//! `/v1/chat/completions` and `/v1/completions` over real HTTP with the real SmolLM2 GGUF.

use crate::common::{assert_openai_error, client, shared};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// The `data:` payloads of an SSE response.
fn sse_events(path: &str, body: &Value) -> Vec<String> {
    let s = shared();
    let resp = client().post(format!("{}{path}", s.url)).json(body).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    BufReader::new(resp)
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn chat_completion_greedy_matches_llama_cpp() {
    let s = shared();
    let (status, body) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "temperature": 0, "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Name three primary colors."}]}]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], format!("{MODEL}@v1"), "the response names the version that served it");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    // llama.cpp's greedy text for this conversation (tests/data/smollm2_greedy.json, chat_system).
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/data/smollm2_greedy.json"))
            .unwrap(),
    )
    .unwrap();
    let reference = fixture["prompts"].as_array().unwrap().iter().find(|p| p["name"] == "chat_system").unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], reference["n_prompt"]);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    // The same tokens as llama.cpp up to its end of sequence, except that the two may part
    // where llama.cpp's own top two were within `FLIP_MARGIN` (step 5 here, " red" over "\n"
    // by 0.29: the order of float operations, which differs between CPUs' kernels, decides
    // it), as the engine's greedy tests allow.
    const FLIP_MARGIN: f64 = 0.3;
    let pieces: Vec<&str> =
        reference["generated_pieces"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let until_eos = reference["eos_position"].as_u64().unwrap() as usize;
    // `same` pieces of llama.cpp's text, `len` bytes, begin ours.
    let (mut same, mut len) = (0, 0);
    while same < until_eos && text[len..].starts_with(pieces[same]) {
        len += pieces[same].len();
        same += 1;
    }
    if same == until_eos {
        assert_eq!(text, reference["generated_text_until_eos"].as_str().unwrap());
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    } else {
        let margin = reference["steps"][same]["margin"].as_f64().unwrap();
        assert!(
            margin < FLIP_MARGIN,
            "{text:?} parts from llama.cpp's {:?} at step {same}, where llama.cpp's margin was {margin}",
            reference["generated_text_until_eos"]
        );
    }
}

#[test]
fn streamed_chat_has_openai_chunk_shape() {
    let events = sse_events(
        "/v1/chat/completions",
        &json!({"model": MODEL, "temperature": 0, "max_tokens": 6, "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Say hello"}]}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["delta"], json!({}));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[test]
fn text_completion_with_several_prompts_and_token_ids() {
    let s = shared();
    let (status, body) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "temperature": 0, "max_tokens": 4,
                "prompt": ["The capital of France is", "List of prime numbers: 2, 3, 5, 7, 11,"], "n": 2}),
    );
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    assert_eq!(choices[0]["text"], " Paris.\n\n");
    assert_eq!(choices[1]["text"], " Paris.\n\n");
    // llama.cpp's first 4 greedy pieces: " ", "1", "3", ","
    assert_eq!(choices[2]["text"], " 13,");
    assert_eq!(body["usage"]["prompt_tokens"], 5 + 21);
    assert_eq!(body["usage"]["completion_tokens"], 16);
    // Token ids in, the same text out.
    let (_, by_ids) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "temperature": 0, "max_tokens": 4, "prompt": [504, 3575, 282, 4649, 314]}),
    );
    assert_eq!(by_ids["choices"][0]["text"], " Paris.\n\n");
}

#[test]
fn generation_errors_have_openai_shape() {
    let s = shared();
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": "hi", "max_tokens": 9000}));
    let e = assert_openai_error(st, &b, 400);
    assert_eq!(e["code"], "context_length_exceeded");
    let (st, b) = s.post("/v1/chat/completions", &json!({"model": MODEL, "messages": []}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "messages");
    let (st, b) =
        s.post("/v1/chat/completions", &json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "messages[0].role");
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": "hi", "top_p": 0}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "top_p");
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": "hi", "tempreature": 0.5}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "tempreature");
    let (st, b) = s.post("/v1/completions", &json!({"model": "all-MiniLM-L6-v2", "prompt": "hi"}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "model");
    let (st, b) =
        s.post("/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}));
    assert_eq!(assert_openai_error(st, &b, 404)["code"], "model_not_found");
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": [99999999]}));
    assert_openai_error(st, &b, 400);
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let s = shared();
    let resp = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"model": MODEL, "prompt": "Count to a million:", "max_tokens": 5000, "ignore_eos": true, "stream": true}))
        .send()
        .unwrap();
    let mut reader = BufReader::new(resp);
    let mut line = String::new();
    let mut tokens = 0;
    while tokens < 3 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            tokens += 1;
        }
    }
    drop(reader); // closes the connection
                  // The abandoned sequence leaves the batch and frees its cache.
    let t0 = Instant::now();
    loop {
        let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        };
        if value("ragway_generation_running_sequences") == 0.0 && value("ragway_generation_kv_cache_used_tokens") == 0.0
        {
            assert!(
                value("ragway_generation_generated_tokens_total") < 2000.0,
                "generation went on after the disconnect"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the disconnected stream is still generating:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}));
    assert_eq!(st, 200, "{b}");
}

const WEATHER: &str = r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
    "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#;

/// Issue 23: a forced call streams as OpenAI's `tool_calls` deltas — the first with id, type
/// and name, then `arguments` in pieces that join into the schema's JSON — and ends with
/// `finish_reason: "tool_calls"`; the same request unstreamed gives the same call.
#[test]
fn streamed_tool_calls_have_openai_delta_shape() {
    let s = shared();
    let body = json!({
        "model": MODEL, "temperature": 0, "parallel_tool_calls": false,
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": [serde_json::from_str::<Value>(WEATHER).unwrap()], "tool_choice": "required",
    });
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = sse_events("/v1/chat/completions", &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0]["role"], "assistant");
    let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).map(|t| &t[0]).collect();
    assert!(calls.len() > 2, "{events:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert!(calls[1..].iter().all(|c| c.get("id").is_none() && c["function"].get("name").is_none()));
    assert!(deltas.iter().all(|d| d.get("content").is_none_or(|c| c == "")), "no content beside a forced call");
    let args: String = calls.iter().map(|c| c["function"]["arguments"].as_str().unwrap()).collect();
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert!(parsed["city"].is_string() && parsed.as_object().unwrap().len() == 1, "{args}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

    let (st, whole) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{whole}");
    let msg = &whole["choices"][0]["message"];
    assert!(msg["content"].is_null(), "{whole}");
    assert_eq!(msg["tool_calls"][0]["function"]["arguments"].as_str().unwrap(), args);
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    // The grammar's work shows in /metrics: masks computed, tokens forced.
    let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    for name in ["ragway_generation_grammar_masks_total", "ragway_generation_grammar_forced_tokens_total"] {
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(total > 0.0, "{name} in {text}");
    }

    // With `auto` the model answers in text here; its content chunks keep their logprobs.
    let mut auto = streamed.clone();
    auto["tool_choice"] = json!("auto");
    auto["logprobs"] = json!(true);
    auto["max_tokens"] = json!(12);
    let events = sse_events("/v1/chat/completions", &auto);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let with_lp = chunks.iter().filter(|c| c["choices"][0]["logprobs"]["content"].as_array().is_some_and(|a| !a.is_empty())).count();
    assert!(with_lp > 0, "{events:?}");
}

/// Issue 23: `response_format` on `/v1/completions`, and the limits on what a request may
/// bring (schema size, tool count, conflicting options).
#[test]
fn text_completions_take_response_format_and_limits_hold() {
    let s = shared();
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The year the Berlin wall fell:", "temperature": 0,
                "response_format": {"type": "regex", "pattern": "1[0-9]{3}"}}),
    );
    assert_eq!(st, 200, "{b}");
    let text = b["choices"][0]["text"].as_str().unwrap();
    assert!(text.len() == 4 && text.starts_with('1') && text.bytes().all(|c| c.is_ascii_digit()), "{text}");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");

    let huge: serde_json::Map<String, Value> = (0..3000).map(|i| (format!("field_number_{i}"), json!({"type": "string"}))).collect();
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": {"type": "object", "properties": huge}}}}),
    );
    assert!(assert_openai_error(st, &b, 400)["message"].as_str().unwrap().contains("bytes"), "{b}");
    let tools: Vec<Value> = (0..129).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect();
    let (st, b) = s.post("/v1/chat/completions", &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "tools");
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "tools": [serde_json::from_str::<Value>(WEATHER).unwrap()], "response_format": {"type": "json_object"}}),
    );
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "response_format");
    let (st, b) = s.post("/v1/completions", &json!({"model": MODEL, "prompt": "x", "tools": []}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "tools");
}

fn weather_question() -> Value {
    json!([{"role": "user", "content": "What is the weather in Oslo?"}])
}

/// A server running with `--chat-template tests/data/{template}`, and its forced call of
/// `get_weather` for the Oslo question: the response (checked to be 200 and to call
/// `get_weather`) and the call's parsed arguments.
fn forced_weather_call(template: &str) -> (crate::common::Server, Value, Value) {
    let path = format!("{}/tests/data/{template}", env!("CARGO_MANIFEST_DIR"));
    let s = crate::common::Server::start(&["--chat-template", &path]);
    s.wait_ready();
    let weather: Value = serde_json::from_str(WEATHER).unwrap();
    let (st, first) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "temperature": 0, "messages": weather_question(), "tools": [weather],
                "tool_choice": "required", "parallel_tool_calls": false}),
    );
    assert_eq!(st, 200, "{first}");
    let call = &first["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{first}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    (s, first, args)
}

/// Issue 23: a model whose template renders `tools` itself (a Hermes/Qwen-style ChatML
/// template, `tests/data/hermes_tools.jinja`, given with `--chat-template`) gets the tool
/// definitions through it, calls in its `<tool_call>` format, and reads the tool's answer
/// from its own `tool` turn.
#[test]
fn a_template_that_renders_tools_drives_the_round_trip() {
    let (s, first, args) = forced_weather_call("hermes_tools.jinja");
    let (weather, ask): (Value, Value) = (serde_json::from_str(WEATHER).unwrap(), weather_question());
    let call = &first["choices"][0]["message"]["tool_calls"][0];
    assert!(args["city"].is_string(), "{args}");
    // The definitions reached the prompt through the template: more prompt tokens than without tools.
    let (_, plain) = s.post("/v1/chat/completions", &json!({"model": MODEL, "temperature": 0, "messages": ask, "max_tokens": 1}));
    assert!(first["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64().map(|n| n + 40), "{first} {plain}");
    let history = json!([
        ask[0],
        first["choices"][0]["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 4, \"sky\": \"snow\"}"},
    ]);
    let (st, reply) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "temperature": 0, "messages": history, "tools": [weather], "tool_choice": "none", "max_tokens": 60}),
    );
    assert_eq!(st, 200, "{reply}");
    assert!(reply["choices"][0]["message"]["content"].as_str().unwrap().trim().len() > 0, "{reply}");
    assert!(reply["choices"][0]["message"].get("tool_calls").is_none(), "{reply}");
}

/// Issue 23: a Llama-3.x-style template (`tests/data/llama3_tools.jinja`: tools in the system
/// turn, calls as a bare `{"name", "parameters"}` object, results in an `ipython` turn). A
/// forced call is written and read in that format; `auto` compiles its anchored lazy grammar
/// and answers.
#[test]
fn a_llama3_style_template_calls_with_bare_json() {
    let (s, first, args) = forced_weather_call("llama3_tools.jinja");
    let (weather, ask): (Value, Value) = (serde_json::from_str(WEATHER).unwrap(), weather_question());
    assert_eq!(first["choices"][0]["finish_reason"], "tool_calls", "{first}");
    assert!(args["city"].is_string() && args.as_object().unwrap().len() == 1, "{args}");
    let (st, auto) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "temperature": 0, "messages": ask, "tools": [weather], "max_tokens": 40}),
    );
    assert_eq!(st, 200, "{auto}");
    let m = &auto["choices"][0]["message"];
    assert!(m["content"].is_string() || m["tool_calls"].is_array(), "{auto}");
}

/// The lazy grammars of `auto` accept the calls each format writes after its trigger, and
/// refuse calls to unknown functions or with arguments off their schema (compiled with the
/// real SmolLM2 vocabulary).
#[test]
fn auto_mode_lazy_grammars_accept_real_calls_only() {
    use ragway_engine::generate::{Constrainer, GrammarLimits, TextTokenizer};
    use ragway_gateway::service::structured::{ToolFormat, Tools};
    let models = crate::common::models_dir();
    let path = ragway_engine::generate::resolve_generation_model(MODEL, &models).unwrap();
    let tk = TextTokenizer::from_gguf_path(&path).unwrap();
    let c = Constrainer::new(&tk, tk.vocab_size(), GrammarLimits::default()).unwrap();
    let tools: Value = json!([serde_json::from_str::<Value>(WEATHER).unwrap(),
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]);
    let t = Tools::parse(Some(&tools), None, None).unwrap().unwrap();
    let accepts = |format: ToolFormat, rest: &str| {
        let (_, g) = t.lazy_grammar(format).unwrap();
        let mut k = c.compile(&g, "tools").unwrap();
        for id in tk.encode(rest, false).unwrap() {
            if !k.allows(id).unwrap() {
                return false;
            }
            k.accept(id).unwrap();
        }
        tk.stop_ids.iter().any(|&e| k.allows(e).unwrap())
    };
    // After `<tool_call>`.
    assert!(accepts(ToolFormat::Tagged, "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"));
    assert!(accepts(ToolFormat::Tagged, "{\"name\": \"now\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>"));
    assert!(!accepts(ToolFormat::Tagged, "\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"));
    assert!(!accepts(ToolFormat::Tagged, "\n{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Oslo\"}}\n</tool_call>"));
    // After `{"name"` at the start (Llama 3.x).
    assert!(accepts(ToolFormat::Bare, ": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"));
    assert!(accepts(ToolFormat::Bare, ": \"now\", \"parameters\": {}}"));
    assert!(!accepts(ToolFormat::Bare, ": \"get_weather\", \"parameters\": {}}"));
    assert!(!accepts(ToolFormat::Bare, ": \"other\", \"parameters\": {}}"));
}

/// Gemma 3 270M Q4_K_M (`scripts/setup-models.sh --with-gemma3`) as the served generation
/// model: a SentencePiece GGUF with K-quants through the real server. `/tokenize` gives
/// llama.cpp's ids (`engine/tests/data/gemma3_270m.json`), and a greedy completion of the
/// prime-numbers prompt — every one of its 32 steps decided by a logit margin of at least
/// 1.07 in llama.cpp — is llama.cpp's text exactly; streamed, the deltas add up to the same.
#[test]
fn gemma3_gguf_served_end_to_end() {
    let path = crate::common::models_dir().join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/setup-models.sh --with-gemma3", path.display());
    let s = crate::common::Server::start(&[
        "--generation-model",
        path.to_str().unwrap(),
        "--generation-model-id",
        "gemma-3-270m",
    ]);
    s.wait_ready();
    let prompt = "List of prime numbers: 2, 3, 5, 7, 11,";
    let llama_cpp_ids = [
        2, 1613, 529, 8355, 4945, 236787, 236743, 236778, 236764, 236743, 236800, 236764, 236743, 236810, 236764, 236743,
        236832, 236764, 236743, 236770, 236770, 236764,
    ];
    let (st, t) = s.post("/tokenize", &json!({"content": prompt, "with_pieces": true}));
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["model"], "gemma-3-270m");
    assert_eq!(t["tokens"], json!(llama_cpp_ids));
    assert_eq!(t["pieces"][0], "<bos>");
    let (_, d) = s.post("/detokenize", &json!({"tokens": &llama_cpp_ids[1..]}));
    assert_eq!(d["content"], prompt);

    let body = json!({"model": "gemma-3-270m", "prompt": prompt, "max_tokens": 32, "temperature": 0});
    let (st, c) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["choices"][0]["text"], " 13, 17, 19, 23, 29, 31, 37, 41,");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!((c["usage"]["prompt_tokens"].as_u64(), c["usage"]["completion_tokens"].as_u64()), (Some(22), Some(32)));

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = client().post(format!("{}/v1/completions", s.url)).json(&streamed).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text: String = BufReader::new(resp)
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(&d).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, " 13, 17, 19, 23, 29, 31, 37, 41,");
}
