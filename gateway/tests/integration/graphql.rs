//! GraphQL over HTTP (queries, mutations, errors, limits) and over WebSocket
//! (graphql-transport-ws subscriptions: a generation's tokens, an ingestion job's progress),
//! plus `/tokenize` and `/detokenize`, against the shared real server.

use crate::common::{client, shared, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

fn gql(s: &Server, query: &str, variables: Value) -> Value {
    let r = client().post(format!("{}/graphql", s.url)).json(&json!({"query": query, "variables": variables})).send().unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

fn data(v: &Value) -> &Value {
    assert!(v.get("errors").is_none_or(Value::is_null), "{v}");
    &v["data"]
}

fn first_error(v: &Value) -> &Value {
    let e = &v["errors"][0];
    assert!(e["message"].is_string(), "{v}");
    e
}

/// A graphql-transport-ws client: connection_init, subscribe, then messages until complete.
struct Ws {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
}

impl Ws {
    fn connect(s: &Server, init: Value) -> Ws {
        let url = s.url.replace("http://", "ws://") + "/graphql";
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let (mut socket, resp) = tungstenite::connect(req).expect("websocket handshake");
        assert_eq!(resp.headers()["sec-websocket-protocol"], "graphql-transport-ws");
        if let tungstenite::stream::MaybeTlsStream::Plain(t) = socket.get_ref() {
            t.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        }
        socket.send(Message::text(json!({"type": "connection_init", "payload": init}).to_string())).unwrap();
        let ack = Self::read(&mut socket);
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        Ws { socket }
    }

    fn read(socket: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>) -> Value {
        loop {
            match socket.read().expect("websocket read") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ping" {
                        socket.send(Message::text(json!({"type": "pong"}).to_string())).unwrap();
                        continue;
                    }
                    return v;
                }
                Message::Ping(p) => {
                    socket.send(Message::Pong(p)).unwrap();
                }
                other => panic!("unexpected websocket message {other:?}"),
            }
        }
    }

    /// Subscribes and collects every `next` payload until `complete`.
    fn subscribe(&mut self, id: &str, query: &str, variables: Value) -> Vec<Value> {
        let msg = json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": variables}});
        self.socket.send(Message::text(msg.to_string())).unwrap();
        let mut out = Vec::new();
        loop {
            let v = Self::read(&mut self.socket);
            match v["type"].as_str() {
                Some("next") => {
                    assert_eq!(v["id"], id);
                    out.push(v["payload"].clone());
                }
                Some("complete") => return out,
                Some("error") => panic!("subscription error: {v}"),
                _ => panic!("unexpected message {v}"),
            }
        }
    }
}

#[test]
fn graphiql_queries_mutations_errors_and_limits() {
    let s = shared();
    let page = client().get(format!("{}/graphql", s.url)).send().unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().unwrap().to_lowercase().contains("graphiql"));

    let v = gql(s, "{ models { id kind loaded } }", json!({}));
    let ids: Vec<&str> = data(&v)["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    // Public names and their pinned versions.
    assert_eq!(ids, ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct@v1", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2@v1"]);

    let v = gql(
        s,
        "mutation($s: JSON) { createCollection(name: \"gqlkb\", settings: $s) { name dimension distance documents } }",
        json!({"s": {"distance": "cosine"}}),
    );
    assert_eq!(data(&v)["createCollection"], json!({"name": "gqlkb", "dimension": 384, "distance": "cosine", "documents": 0}));
    let docs = json!([
        {"id": "a", "title": "Photosynthesis", "text": "Plants turn sunlight, water and carbon dioxide into glucose.", "metadata": {"topic": "bio", "year": 2020}},
        {"id": "b", "title": "Volcanoes", "text": "Magma rises through the crust and erupts as lava.", "metadata": {"topic": "geo", "year": 2021}},
        {"id": "c", "title": "Enzymes", "text": "Enzymes are proteins that speed up chemical reactions in cells.", "metadata": {"topic": "bio", "year": 2022}},
    ]);
    let v = gql(
        s,
        "mutation($d: [DocumentInput!]!) { upsertDocuments(collection: \"gqlkb\", documents: $d) { upserted chunks } }",
        json!({"d": docs}),
    );
    assert_eq!(data(&v)["upsertDocuments"]["upserted"], 3);

    let v = gql(s, "{ collection(name: \"gqlkb\") { documents chunks state } }", json!({}));
    assert_eq!(data(&v)["collection"]["documents"], 3);

    let q = "query($f: JSON) { search(collection: \"gqlkb\", query: \"how do plants make sugar\", topK: 2, filter: $f) \
             { documentId score denseRank keywordRank metadata } }";
    let v = gql(s, q, json!({"f": null}));
    let hits = data(&v)["search"].as_array().unwrap();
    assert_eq!(hits[0]["documentId"], "a", "{v}");
    assert_eq!(hits.len(), 2);
    // The same filter language as REST: only geology may come back.
    let v = gql(s, q, json!({"f": {"key": "topic", "eq": "geo"}}));
    let hits = data(&v)["search"].as_array().unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["documentId"], "b");
    assert_eq!(hits[0]["metadata"]["year"], 2021);
    // And REST agrees on the ranking.
    let (_, rest) = s.post("/v1/collections/gqlkb/search", &json!({"query": "how do plants make sugar", "top_k": 2}));
    assert_eq!(rest["results"][0]["document_id"], "a");
    // Per-search fusion, depth and title boost, as REST takes them, give REST's scores.
    let q = "query($f: JSON) { search(collection: \"gqlkb\", query: \"how do plants make sugar\", topK: 3, \
             fusion: $f, candidates: 60, titleBoost: 0.5) { documentId score } }";
    for fusion in [json!({"method": "rrf", "rrf_k": 10}), json!({"method": "dbsf", "dense_weight": 0.7, "keyword_weight": 0.3})] {
        let v = gql(s, q, json!({"f": fusion}));
        let hits = data(&v)["search"].as_array().unwrap().clone();
        let body = json!({"query": "how do plants make sugar", "top_k": 3, "fusion": fusion, "candidates": 60, "title_boost": 0.5});
        let (_, rest) = s.post("/v1/collections/gqlkb/search", &body);
        let rest: Vec<(Value, f64)> =
            rest["results"].as_array().unwrap().iter().map(|h| (h["document_id"].clone(), h["score"].as_f64().unwrap())).collect();
        let got: Vec<(Value, f64)> = hits.iter().map(|h| (h["documentId"].clone(), h["score"].as_f64().unwrap())).collect();
        assert_eq!(got.len(), rest.len(), "{v}");
        for (g, r) in got.iter().zip(&rest) {
            assert!(g.0 == r.0 && (g.1 - r.1).abs() < 1e-6, "GraphQL {got:?} REST {rest:?}");
        }
    }
    let v = gql(s, q, json!({"f": {"method": "rrf", "rrf_k": -1}}));
    assert_eq!(first_error(&v)["extensions"]["param"], "fusion.rrf_k", "{v}");
    let v = gql(s, q, json!({"f": {"method": "borda"}}));
    let e = first_error(&v);
    assert_eq!((e["extensions"]["status"].clone(), e["extensions"]["param"].clone()), (json!(400), json!("fusion")), "{v}");

    let v = gql(s, "{ document(collection: \"gqlkb\", id: \"c\") { title metadata chunks { chunkId } } }", json!({}));
    assert_eq!(data(&v)["document"]["title"], "Enzymes");

    let v = gql(s, "mutation { deleteDocuments(collection: \"gqlkb\", filter: {key: \"topic\", eq: \"bio\"}) { deleted } }", json!({}));
    assert_eq!(data(&v)["deleteDocuments"]["deleted"], 2, "{v}");

    // Errors carry the REST code, status and param.
    let v = gql(s, "{ collection(name: \"nope\") { name } }", json!({}));
    let e = first_error(&v);
    assert_eq!(e["extensions"]["code"], "collection_not_found");
    assert_eq!(e["extensions"]["status"], 404);
    let v = gql(s, "{ search(collection: \"gqlkb\", query: \"x\", topK: 0) { score } }", json!({}));
    let e = first_error(&v);
    assert_eq!(e["extensions"]["status"], 400);
    assert_eq!(e["extensions"]["param"], "top_k");
    let v = gql(s, "mutation { generate(input: {model: \"gpt-4\", messages: [{role: \"user\", content: \"hi\"}]}) { text } }", json!({}));
    assert_eq!(first_error(&v)["extensions"]["code"], "model_not_found");

    // Depth and complexity limits.
    // Ordinary queries keep the depth limit (introspection has its own, larger one).
    let deep = "{ collections { a { b { c { d { e { f { g { h { i { j { k { l { m } } } } } } } } } } } } } }";
    let v = gql(s, deep, json!({}));
    assert!(first_error(&v)["message"].as_str().unwrap().to_lowercase().contains("too deep"), "{v}");
    let mut intro = String::from("name");
    for _ in 0..30 {
        intro = format!("ofType {{ {intro} }}");
    }
    let v = gql(s, &format!("{{ __schema {{ types {{ {intro} }} }} }}"), json!({}));
    assert!(first_error(&v)["message"].as_str().unwrap().contains("introspection query is nested too deep"), "{v}");
    let wide = "{ search(collection: \"gqlkb\", query: \"x\", topK: 1000) { chunkId documentId text score metadata } }";
    let v = gql(s, wide, json!({}));
    assert!(first_error(&v)["message"].as_str().unwrap().to_lowercase().contains("complex"), "{v}");

    let v = gql(s, "mutation { deleteCollection(name: \"gqlkb\") }", json!({}));
    assert_eq!(data(&v)["deleteCollection"], true);
}

#[test]
fn subscriptions_stream_generation_tokens_and_job_progress() {
    let s = shared();
    let input = json!({"messages": [{"role": "user", "content": "Name three colors."}], "maxTokens": 24, "temperature": 0.0});
    let v = gql(
        s,
        "mutation($i: GenerateInput!) { generate(input: $i) { text finishReason promptTokens completionTokens } }",
        json!({"i": input}),
    );
    let whole = data(&v)["generate"].clone();
    assert!(whole["completionTokens"].as_u64().unwrap() > 0);

    // Issue 23: a response format makes the text parse as the schema says; a bad one is a
    // request error naming the field.
    let schema = json!({"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["colors"]});
    let typed = json!({"messages": [{"role": "user", "content": "Name three colors."}], "maxTokens": 60, "temperature": 0.0,
        "responseFormat": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}});
    let v = gql(s, "mutation($i: GenerateInput!) { generate(input: $i) { text finishReason } }", json!({"i": typed}));
    let g = &data(&v)["generate"];
    assert_eq!(g["finishReason"], "stop", "{v}");
    let parsed: Value = serde_json::from_str(g["text"].as_str().unwrap()).unwrap();
    assert!(parsed["colors"].as_array().is_some_and(|a| !a.is_empty() && a.len() <= 3), "{parsed}");
    let mut bad = typed.clone();
    bad["responseFormat"] = json!({"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "nonsense"}}});
    let v = gql(s, "mutation($i: GenerateInput!) { generate(input: $i) { text } }", json!({"i": bad}));
    let e = first_error(&v);
    assert_eq!(e["extensions"]["code"], "invalid_request_error", "{v}");
    assert_eq!(e["extensions"]["param"], "response_format", "{v}");

    let mut ws = Ws::connect(s, json!({}));
    let events = ws.subscribe(
        "gen1",
        "subscription($i: GenerateInput!) { generate(input: $i) { text finishReason completionTokens } }",
        json!({"i": input}),
    );
    assert!(events.len() >= 3, "tokens arrive one event at a time: {events:?}");
    let streamed: String = events.iter().map(|e| e["data"]["generate"]["text"].as_str().unwrap()).collect();
    // Greedy decoding: the stream spells exactly what the mutation returned.
    assert_eq!(streamed, whole["text"].as_str().unwrap());
    let last = &events.last().unwrap()["data"]["generate"];
    assert_eq!(last["finishReason"], whole["finishReason"]);
    assert_eq!(last["completionTokens"], whole["completionTokens"]);

    // An ingestion job (uploaded over REST) followed over the socket until it is done.
    assert_eq!(s.post("/v1/collections", &json!({"name": "gqljobs"})).0, 201);
    let jsonl: String = (0..40).map(|i| json!({"id": format!("doc{i}"), "text": format!("Document number {i} talks about topic {}.", i % 7)}).to_string() + "\n").collect();
    let r = client().post(format!("{}/v1/collections/gqljobs/ingest", s.url)).body(jsonl).send().unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().unwrap();
    let id = job["job_id"].as_str().unwrap();
    let t0 = Instant::now();
    let updates = ws.subscribe(
        "job1",
        "subscription($id: String!) { jobProgress(id: $id, intervalMs: 50) { id state progress { documentsWritten fraction } } }",
        json!({"id": id}),
    );
    assert!(t0.elapsed() < Duration::from_secs(120));
    let last = &updates.last().unwrap()["data"]["jobProgress"];
    assert_eq!(last["state"], "done", "{updates:?}");
    assert_eq!(last["progress"]["documentsWritten"], 40);
    assert_eq!(last["progress"]["fraction"], 1.0);
    s.delete("/v1/collections/gqljobs");
}

#[test]
fn tokenize_and_detokenize_both_models() {
    let s = shared();
    let (status, t) = s.post("/tokenize", &json!({"prompt": "Hello world", "with_pieces": true}));
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["model"], "SmolLM2-135M-Instruct");
    let ids: Vec<u64> = t["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    // SmolLM2's tokenizer (llama.cpp agrees): "Hello" 19556, " world" 905.
    assert_eq!(ids, [19556, 905]);
    assert_eq!(t["count"], 2);
    assert_eq!(t["pieces"], json!(["Hello", " world"]));
    assert!(t["max_model_len"].as_u64().unwrap() >= 2048);
    let (_, d) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(d["prompt"], "Hello world");
    assert_eq!(d["content"], "Hello world");

    // Chat messages render through the model's template first.
    let (_, t) = s.post("/tokenize", &json!({"messages": [{"role": "user", "content": "Hi"}]}));
    let (_, d) = s.post("/detokenize", &json!({"tokens": t["tokens"]}));
    let text = d["prompt"].as_str().unwrap();
    assert!(text.contains("<|im_start|>user\nHi<|im_end|>") && text.ends_with("<|im_start|>assistant\n"), "{text}");

    // The embedding model: BERT's [CLS] ... [SEP] with add_special_tokens.
    let (_, t) = s.post("/tokenize", &json!({"model": "all-MiniLM-L6-v2", "content": "hello world"}));
    assert_eq!(t["tokens"], json!([101, 7592, 2088, 102]));
    assert_eq!(t["max_model_len"], 256);

    let (status, e) = s.post("/detokenize", &json!({"tokens": [1, 99999999]}));
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "tokens[1]");
    let (status, _) = s.post("/tokenize", &json!({"model": "nope", "prompt": "x"}));
    assert_eq!(status, 404);
    let (status, e) = s.post("/tokenize", &json!({"prompt": "x", "content": "y"}));
    assert_eq!(status, 400, "{e}");
}
