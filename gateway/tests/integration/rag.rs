//! RAG and prompt templates end to end on the shared real server: a small real corpus (the
//! knowledge of the first eight HaluEval QA dev items, `tests/data/`), real MiniLM
//! retrieval, real SmolLM2 answers; `/v1/rag` plain and streaming, chat completions with
//! `rag`, grounding of a forced contradiction, the "don't know" path, and the template API
//! over REST and GraphQL.

use crate::common::{assert_openai_error, client, shared, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;

/// The collection `rag-e2e` with the eight knowledge texts (`halu-0` ... `halu-7`).
pub(crate) fn corpus() -> &'static Server {
    static READY: OnceLock<()> = OnceLock::new();
    let s = shared();
    READY.get_or_init(|| {
        let (st, b) = s.post("/v1/collections", &json!({"name": "rag-e2e"}));
        assert!(st == 201 || st == 409, "{b}");
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/halueval_dev_first8.jsonl")).unwrap();
        let docs: Vec<Value> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let item: Value = serde_json::from_str(l).unwrap();
                json!({"id": format!("halu-{i}"), "text": item["knowledge"], "metadata": {"item": i}})
            })
            .collect();
        let (st, b) = s.post("/v1/collections/rag-e2e/documents", &json!({"documents": docs}));
        assert_eq!(st, 200, "{b}");
    });
    s
}

const OBEROI: &str = "The Oberoi family is part of a hotel company that has a head office in what city?";

#[test]
fn rag_answers_from_the_right_passage_with_citations() {
    let s = corpus();
    let (st, b) = s.post("/v1/rag", &json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3}));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "rag.answer");
    assert_eq!(b["dont_know"], false, "{b}");
    let answer = b["answer"].as_str().unwrap();
    assert!(answer.contains("Delhi"), "{answer}");
    let cited = &b["citations"][0];
    assert_eq!(cited["document_id"], "halu-1", "{b}");
    assert!(cited["chunk_id"].as_str().unwrap().starts_with("halu-1"), "{b}");
    assert!(cited["text"].as_str().unwrap().contains("head office in Delhi"), "{b}");
    assert!(cited["char_end"].as_u64().unwrap() > cited["char_start"].as_u64().unwrap());
    assert!(cited["score"].is_number() && cited["relevance"].as_f64().unwrap() > 0.5, "{b}");
    // Every passage offered is either cited or returned as uncited.
    let offered = b["citations"].as_array().unwrap().len() + b["uncited"].as_array().unwrap().len();
    assert!((1..=3).contains(&offered), "{b}");
    let g = &b["grounding"];
    assert_eq!(g["flagged"], false, "{b}");
    assert!(g["score"].as_f64().unwrap() >= g["threshold"].as_f64().unwrap(), "{b}");
    assert!(!g["sentences"].as_array().unwrap().is_empty());
    assert_eq!(b["template"], json!({"name": "rag-answer", "version": 1, "label": "production"}));
    assert!(b["usage"]["prompt_tokens"].as_u64().unwrap() > 50 && b["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn grounding_flags_an_answer_that_contradicts_the_context() {
    let s = corpus();
    let ask = |answer: &str| {
        let (st, b) = s.post("/v1/rag", &json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3, "answer": answer}));
        assert_eq!(st, 200, "{b}");
        b
    };
    let bad = ask("The Oberoi Group has its head office in Mumbai; Portuguese sailors founded it in 1650 [1].");
    assert_eq!(bad["answer"], "The Oberoi Group has its head office in Mumbai; Portuguese sailors founded it in 1650 [1].");
    assert_eq!(bad["grounding"]["flagged"], true, "{bad}");
    assert!(bad["grounding"]["sentences"][0]["lexical"].as_f64().unwrap() < 0.5, "{bad}");
    assert_eq!(bad["citations"][0]["document_id"], "halu-1", "the marker still maps to its passage: {bad}");
    assert_eq!(bad["citations_inferred"], false);
    let good = ask("The Oberoi Group has its head office in Delhi [1].");
    assert_eq!(good["grounding"]["flagged"], false, "{good}");
    assert!(good["grounding"]["score"].as_f64().unwrap() > bad["grounding"]["score"].as_f64().unwrap());
    // A marker naming no passage is reported, not mapped.
    let odd = ask("Delhi [7].");
    assert_eq!(odd["invalid_citations"], json!([7]), "{odd}");
    // Counted in the metrics, by template version.
    let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    assert!(text.contains("ragway_rag_flagged_total{template=\"rag-answer\",version=\"1\"}"), "{text}");
    assert!(text.contains("ragway_rag_grounding_score_bucket{template=\"rag-answer\",version=\"1\",le=\"0.5\"}"));
}

#[test]
fn off_topic_questions_take_the_dont_know_path() {
    let s = corpus();
    let (st, b) = s.post(
        "/v1/rag",
        &json!({"collection": "rag-e2e", "query": "What is the boiling point of liquid nitrogen in kelvin?"}),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["dont_know"], true, "{b}");
    assert_eq!(b["answer"], "I don't know: the provided documents do not contain the answer.");
    assert_eq!(b["citations"], json!([]));
    assert_eq!(b["usage"]["completion_tokens"], 0, "nothing generated: {b}");
    assert_eq!(b["grounding"]["flagged"], false);
    let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    assert!(text.contains("outcome=\"dont_know\""), "{text}");
}

fn sse_events(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let r = client().post(format!("{}{path}", s.url)).json(body).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().unwrap();
    let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    datas[..datas.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[test]
fn rag_streams_context_tokens_then_citations() {
    let s = corpus();
    let ev = sse_events(s, "/v1/rag", &json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3, "stream": true}));
    assert_eq!(ev[0]["type"], "context", "{ev:?}");
    assert!(ev[0]["passages"].as_array().unwrap().iter().any(|p| p["document_id"] == "halu-1"));
    let tokens: String = ev.iter().filter(|e| e["type"] == "token").map(|e| e["text"].as_str().unwrap()).collect();
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "final", "{last}");
    assert_eq!(last["answer"].as_str().unwrap(), tokens.trim());
    assert_eq!(last["citations"][0]["document_id"], "halu-1", "{last}");
    assert!(last["grounding"]["score"].is_number());
    // The same answer as without streaming (greedy).
    let (_, plain) = s.post("/v1/rag", &json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3}));
    assert_eq!(plain["answer"], last["answer"]);
}

#[test]
fn chat_completions_take_a_rag_object() {
    let s = corpus();
    let body = json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": OBEROI}],
        "rag": {"collection": "rag-e2e", "top_k": 3},
    });
    let (st, b) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "chat.completion");
    assert!(b["choices"][0]["message"]["content"].as_str().unwrap().contains("Delhi"), "{b}");
    assert_eq!(b["rag"]["citations"][0]["document_id"], "halu-1", "{b}");
    assert!(b["rag"]["grounding"]["score"].is_number() && b["rag"].get("answer").is_none());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let ev = sse_events(s, "/v1/chat/completions", &streamed);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = ev.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, b["choices"][0]["message"]["content"].as_str().unwrap());
    let rag = ev.iter().find(|e| e.get("rag").is_some()).expect("a chunk with rag");
    assert_eq!(rag["choices"], json!([]));
    assert_eq!(rag["rag"]["citations"], b["rag"]["citations"]);
    assert!(ev.last().unwrap()["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn rag_requests_are_validated_in_the_api_shape() {
    let s = corpus();
    let cases = [
        (json!({"query": OBEROI}), 400, "collection"),
        (json!({"collection": "rag-e2e"}), 400, "query"),
        (json!({"collection": "nope", "query": OBEROI}), 404, "name"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 0}), 400, "top_k"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "template": "summarize"}), 400, "template"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "template": "rag-answer@9"}), 404, "template"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "temperature": 9}), 400, "temperature"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "rerank": "magic"}), 400, "rerank"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "filter": {"key": "item", "gt": "x"}}), 400, "filter"),
        (json!({"collection": "rag-e2e", "query": OBEROI, "colection": 1}), 400, "colection"),
    ];
    for (body, status, param) in cases {
        let (st, b) = s.post("/v1/rag", &body);
        let e = assert_openai_error(st, &b, status);
        assert!(e["param"].as_str().is_some_and(|p| p.starts_with(param)), "{body} → {b}");
    }
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "rag": {"collection": "rag-e2e", "topk": 3}}),
    );
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "rag.topk");
    // A filter narrows retrieval; MMR reranking runs.
    let (st, b) = s.post(
        "/v1/rag",
        &json!({"collection": "rag-e2e", "query": OBEROI, "answer": "Delhi [1].", "filter": {"key": "item", "eq": 1}, "rerank": {"type": "mmr", "lambda": 0.5}}),
    );
    assert_eq!(st, 200, "{b}");
    let docs: Vec<&Value> = b["citations"].as_array().unwrap().iter().chain(b["uncited"].as_array().unwrap()).map(|p| &p["document_id"]).collect();
    assert_eq!(docs, [&json!("halu-1")]);
}

fn gql(s: &Server, query: &str, variables: Value) -> Value {
    let r = client().post(format!("{}/graphql", s.url)).json(&json!({"query": query, "variables": variables})).send().unwrap();
    r.json().unwrap()
}

#[test]
fn prompt_templates_over_rest_and_graphql() {
    let s = shared();
    let put = |path: &str, body: Value| {
        let r = client().put(format!("{}{path}", s.url)).json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    // The shipped templates are listed.
    let (_, list) = s.get("/v1/prompts");
    let names: Vec<&str> = list["data"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    for n in ["rag-answer", "rag-condense-question", "summarize", "classify", "hallucination-judge"] {
        assert!(names.contains(&n), "{list}");
    }
    // Create from parts: 201, then the same again: 200, other content under v1: 409.
    let v1 = json!({"name": "e2e-greet", "kind": "text", "variables": {"who": {"type": "string"}}, "labels": ["production"], "template": "Hello {{ who }}!"});
    let (st, b) = s.post("/v1/prompts", &v1);
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["version"], 1);
    let mut again = v1.clone();
    again["version"] = json!(1);
    assert_eq!(s.post("/v1/prompts", &again).0, 200);
    let mut other = again.clone();
    other["template"] = json!("Bye {{ who }}");
    let (st, b) = s.post("/v1/prompts", &other);
    assert_eq!(assert_openai_error(st, &b, 409)["code"], "conflict");
    // Validation at creation: the undeclared variable, with its line.
    let (st, b) = s.post(
        "/v1/prompts/e2e-greet/versions",
        &json!({"source": "+++\nname = \"e2e-greet\"\nkind = \"text\"\n[variables.who]\ntype = \"string\"\n+++\nHello {{ who }}\nand {{ whom }}\n"}),
    );
    let e = assert_openai_error(st, &b, 400);
    assert_eq!(e["param"], "variables.whom");
    assert!(e["message"].as_str().unwrap().contains("line 8"), "{e}");
    // v2 via source, labeled staging; render each; move production (and back).
    let (st, b) = s.post(
        "/v1/prompts/e2e-greet/versions",
        &json!({"source": "+++\nname = \"e2e-greet\"\nkind = \"text\"\nlabels = [\"staging\"]\n[variables.who]\ntype = \"string\"\n+++\nGood day, {{ who }}."}),
    );
    assert_eq!((st, &b["version"]), (201, &json!(2)), "{b}");
    let render = |r: &str| s.post(&format!("/v1/prompts/{r}/render"), &json!({"variables": {"who": "Ada"}}));
    assert_eq!(render("e2e-greet").1["text"], "Hello Ada!");
    assert_eq!(render("e2e-greet:staging").1["text"], "Good day, Ada.");
    assert_eq!(render("e2e-greet@1").1["template"], json!({"name": "e2e-greet", "version": 1, "label": null}));
    let (st, b) = s.post("/v1/prompts/e2e-greet/render", &json!({"variables": {"who": 3}}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "variables.who");
    let (st, b) = put("/v1/prompts/e2e-greet/labels/production", json!({"version": 2}));
    assert_eq!(st, 200, "{b}");
    assert_eq!(render("e2e-greet").1["text"], "Good day, Ada.");
    // GraphQL sees the same registry and moves labels through the same code.
    let v = gql(s, "mutation { setPromptLabel(name: \"e2e-greet\", label: \"production\", version: 1) }", json!({}));
    assert_eq!(v["data"]["setPromptLabel"]["version"], 1, "{v}");
    assert_eq!(render("e2e-greet").1["text"], "Hello Ada!");
    let v = gql(s, "{ prompts { name latest versions labels } }", json!({}));
    let mine = v["data"]["prompts"].as_array().unwrap().iter().find(|p| p["name"] == "e2e-greet").cloned().unwrap();
    assert_eq!(mine["versions"], json!([1, 2]));
    assert_eq!(mine["labels"], json!({"production": 1, "staging": 2}));
    let v = gql(s, "mutation { setPromptLabel(name: \"e2e-greet\", label: \"production\", version: 7) }", json!({}));
    assert_eq!(v["errors"][0]["extensions"]["status"], 404, "{v}");
    let (_, d) = s.get("/v1/prompts/e2e-greet");
    assert_eq!(d["versions"].as_array().unwrap().len(), 2);
    assert_eq!(d["versions"][0]["origin"]["kind"], "store");
    assert_eq!(assert_openai_error(s.get("/v1/prompts/nope").0, &s.get("/v1/prompts/nope").1, 404)["code"], "template_not_found");
    // Built-in templates cannot be deleted; API ones can.
    assert_eq!(s.delete("/v1/prompts/summarize").0, 409);
    assert_eq!(s.delete("/v1/prompts/e2e-greet").0, 200);
    assert_eq!(s.get("/v1/prompts/e2e-greet").0, 404);
    // Few-shot by embedding similarity with the real embedding model; the chat prompt too.
    let (st, b) = s.post(
        "/v1/prompts/classify/render",
        &json!({"variables": {"text": "The pizza was cold and the waiter ignored us."}, "fewshot_mode": "similar", "fewshot_k": 2, "model": "SmolLM2-135M-Instruct"}),
    );
    assert_eq!(st, 200, "{b}");
    let msgs = b["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1 + 2 * 2 + 1, "{b}");
    assert_eq!(msgs[3]["content"], "The soup was cold and the waiter was rude.", "nearest example last: {b}");
    assert!(b["prompt"].as_str().unwrap().contains("<|im_start|>user"), "{b}");
    assert!(b["prompt_tokens"].as_u64().unwrap() > 40);
}

#[test]
fn template_split_reports_the_version_it_chose() {
    let s = corpus();
    let src = |v: u32, label: &str| {
        format!(
            "+++\nname = \"e2e-rag\"\nversion = {v}\nkind = \"chat\"\nlabels = [\"{label}\"]\n[variables.question]\ntype = \"string\"\n[variables.passages]\ntype = \"array\"\n[parameters]\nmax_tokens = 8\n+++\n::user::\n{{% for p in passages %}}[{{{{ p.index }}}}] {{{{ p.text }}}}\n{{% endfor %}}Q: {{{{ question }}}}{}\n",
            if v == 2 { " Answer in one word." } else { "" }
        )
    };
    for (v, l) in [(1, "production"), (2, "staging")] {
        let (st, b) = s.post("/v1/prompts", &json!({"source": src(v, l)}));
        assert!(st == 201 || st == 200, "{b}");
    }
    let mut seen = std::collections::BTreeMap::new();
    for user in 0..12 {
        let body = json!({"collection": "rag-e2e", "query": OBEROI, "answer": "Delhi.", "user": format!("u{user}"),
            "template": {"name": "e2e-rag", "split": {"production": 50, "staging": 50}}});
        let (st, b) = s.post("/v1/rag", &body);
        assert_eq!(st, 200, "{b}");
        let v = b["template"]["version"].as_u64().unwrap();
        assert_eq!(b["template"]["label"], if v == 1 { "production" } else { "staging" });
        // The same user always gets the same arm.
        let (_, again) = s.post("/v1/rag", &body);
        assert_eq!(again["template"]["version"], v);
        *seen.entry(v).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "12 users on a 50/50 split all landed on one arm: {seen:?}");
}

/// Issue 23: a RAG answer as JSON with a citations array. `cited_answer` constrains the
/// answer to `{"answer", "citations"}` whose numbers can only be passages offered; `/v1/rag`
/// checks the `answer` and cites the listed passages; a chat completion with `rag` returns
/// the JSON itself as content. A plain JSON Schema works on `/v1/rag` too.
#[test]
fn rag_answers_as_json_with_citations() {
    let s = corpus();
    let body = json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3, "temperature": 0,
                      "response_format": {"type": "cited_answer"}});
    let (st, b) = s.post("/v1/rag", &body);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["finish_reason"], "stop", "{b}");
    assert!(b["answer"].as_str().unwrap().contains("Delhi"), "{b}");
    assert!(b.get("invalid_citations").is_none_or(|v| v == &json!([])), "{b}");
    assert_eq!(b["citations_inferred"], false, "the JSON's citations were used: {b}");
    assert_eq!(b["citations"][0]["document_id"], "halu-1", "{b}");

    let chat = json!({
        "model": "SmolLM2-135M-Instruct", "temperature": 0,
        "messages": [{"role": "user", "content": OBEROI}],
        "rag": {"collection": "rag-e2e", "top_k": 3},
        "response_format": {"type": "cited_answer"},
    });
    let (st, c) = s.post("/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{c}");
    let content: Value = serde_json::from_str(c["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    let offered: Vec<u64> = c["rag"]["citations"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["rag"]["uncited"].as_array().unwrap())
        .map(|p| p["index"].as_u64().unwrap())
        .collect();
    assert!(content["answer"].is_string(), "{content}");
    for n in content["citations"].as_array().unwrap() {
        assert!(offered.contains(&n.as_u64().unwrap()), "{n} was not offered: {c}");
    }

    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]});
    let (st, b) = s.post(
        "/v1/rag",
        &json!({"collection": "rag-e2e", "query": OBEROI, "top_k": 3, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}),
    );
    assert_eq!(st, 200, "{b}");
    let v: Value = serde_json::from_str(b["answer"].as_str().unwrap()).unwrap();
    assert!(v["city"].is_string(), "{b}");
    let (st, b) = s.post("/v1/rag", &json!({"collection": "rag-e2e", "query": OBEROI, "response_format": {"type": "xml"}}));
    assert_eq!(assert_openai_error(st, &b, 400)["param"], "response_format.type");
}
