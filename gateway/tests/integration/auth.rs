//! API keys, scopes, per-key rate limits, body limits, the in-flight bound, request ids and
//! the Prometheus metrics that count all of it — on a real server with the real models.

use crate::common::{assert_openai_error, client, Server};
use serde_json::{json, Value};

struct Call<'a> {
    s: &'a Server,
    key: Option<&'a str>,
}

impl Call<'_> {
    fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut r = client().request(method, format!("{}{path}", self.s.url));
        if let Some(k) = self.key {
            r = r.bearer_auth(k);
        }
        if let Some(b) = body {
            r = r.json(b);
        }
        let r = r.send().expect("request");
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
    }
    fn get(&self, path: &str) -> (u16, Value) {
        let (s, b, _) = self.send(reqwest::Method::GET, path, None);
        (s, b)
    }
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, b, _) = self.send(reqwest::Method::POST, path, Some(body));
        (s, b)
    }
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn keys_scopes_rate_limits_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        r#"
[[keys]]
key = "sk-admin"
name = "ops"
scopes = ["admin"]

[[keys]]
key = "sk-writer"
name = "loader"
scopes = ["write"]

[[keys]]
key = "sk-reader"
name = "frontend"
scopes = ["read"]

[[keys]]
key = "sk-slow"
name = "slow"
scopes = ["read"]
requests_per_minute = 2

[[keys]]
key = "sk-tokens"
name = "metered"
scopes = ["read"]
tokens_per_minute = 20
"#,
    )
    .unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap(), "--max-body-bytes", "65536"]);
    s.wait_ready();
    let anon = Call { s: &s, key: None };
    let admin = Call { s: &s, key: Some("sk-admin") };
    let writer = Call { s: &s, key: Some("sk-writer") };
    let reader = Call { s: &s, key: Some("sk-reader") };

    // Probes stay open; everything else needs a key.
    assert_eq!(anon.get("/health").0, 200);
    assert_eq!(anon.get("/ready").0, 200);
    let (status, body) = anon.get("/v1/models");
    assert_eq!(assert_openai_error(status, &body, 401)["code"], "invalid_api_key");
    let (status, body) = Call { s: &s, key: Some("sk-wrong") }.get("/v1/models");
    assert_openai_error(status, &body, 401);
    let r = client().get(format!("{}/v1/models", s.url)).header("api-key", "sk-reader").send().unwrap();
    assert_eq!(r.status(), 200, "Azure-style api-key header");

    // Scopes: admin creates, writer writes, reader reads, and not the other way round.
    let (status, body) = reader.post("/v1/collections", &json!({"name": "kb"}));
    let e = assert_openai_error(status, &body, 403);
    assert_eq!(e["code"], "insufficient_scope");
    assert!(e["message"].as_str().unwrap().contains("admin"), "{e}");
    assert_eq!(writer.post("/v1/collections", &json!({"name": "kb"})).0, 403);
    assert_eq!(admin.post("/v1/collections", &json!({"name": "kb"})).0, 201);
    let docs = json!({"documents": [{"id": "d1", "text": "Rust ownership rules prevent data races at compile time."}]});
    assert_eq!(reader.post("/v1/collections/kb/documents", &docs).0, 403);
    let (status, body) = writer.post("/v1/collections/kb/documents", &docs);
    assert_eq!(status, 200, "{body}");
    let (status, body) = reader.post("/v1/collections/kb/search", &json!({"query": "data races"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["document_id"], "d1");
    assert_eq!(reader.get("/v1/collections/kb/documents/d1").0, 200);
    let (status, _, _) = writer.send(reqwest::Method::DELETE, "/v1/collections/kb", None);
    assert_eq!(status, 403);

    // Requests per minute: the third request within the minute is refused with Retry-After.
    let slow = Call { s: &s, key: Some("sk-slow") };
    assert_eq!(slow.get("/v1/models").0, 200);
    assert_eq!(slow.get("/v1/models").0, 200);
    let (status, body, headers) = slow.send(reqwest::Method::GET, "/v1/models", None);
    assert_eq!(assert_openai_error(status, &body, 429)["code"], "rate_limit_exceeded");
    let wait: u32 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    // Tokens per minute: a request may overdraw the budget, the next one waits.
    let metered = Call { s: &s, key: Some("sk-tokens") };
    let input = "a sentence long enough to use more than twenty tokens of the embedding model's vocabulary in one go";
    let (status, body) = metered.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": input}));
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 20);
    let (status, body) = metered.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": "hi"}));
    assert_openai_error(status, &body, 429);

    // Body limit: 413 in OpenAI's shape.
    let big = "word ".repeat(20_000);
    let (status, body) = reader.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": big}));
    assert_openai_error(status, &body, 413);
    // Unparseable JSON: 400 naming the body.
    let r = client()
        .post(format!("{}/v1/embeddings", s.url))
        .bearer_auth("sk-reader")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["param"], "body");

    // Request ids: the client's is echoed, otherwise one is made.
    let r = client().get(format!("{}/health", s.url)).header("x-request-id", "trace-abc-123").send().unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc-123");
    let r = client().get(format!("{}/health", s.url)).send().unwrap();
    assert!(!r.headers()["x-request-id"].is_empty());

    // GraphQL over HTTP: the same keys, errors in GraphQL's shape.
    let gql = |key: Option<&str>, query: &str| {
        let mut r = client().post(format!("{}/graphql", s.url)).json(&json!({"query": query}));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, body) = gql(None, "{ models { id } }");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_api_key");
    let (status, body) = gql(Some("sk-reader"), "{ collections { name chunks } }");
    assert_eq!(status, 200);
    assert_eq!(body["data"]["collections"][0]["name"], "kb", "{body}");
    let (_, body) = gql(Some("sk-reader"), "mutation { deleteCollection(name: \"kb\") }");
    assert_eq!(body["errors"][0]["extensions"]["code"], "insufficient_scope", "{body}");
    assert_eq!(body["errors"][0]["extensions"]["status"], 403);

    // The metrics saw all of it (they need a key once keys are configured).
    assert_eq!(anon.get("/metrics").0, 401);
    let (status, text) = admin.get("/metrics");
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    let ok_models = metric(&text, "ragway_http_requests_total{route=\"/v1/models\",method=\"GET\",status=\"200\"}").unwrap();
    assert!(ok_models >= 3.0, "{text}");
    for reason in ["unauthenticated", "forbidden", "rate_limited", "body_too_large", "invalid_request"] {
        let n = metric(&text, &format!("ragway_requests_rejected_total{{reason=\"{reason}\"}}"));
        assert!(n.is_some_and(|n| n >= 1.0), "no {reason} rejections in:\n{text}");
    }
    assert!(metric(&text, "ragway_http_request_duration_seconds_count{route=\"/v1/collections/{name}/search\",method=\"POST\",status=\"200\"}")
        .is_some_and(|n| n >= 1.0));
    assert!(metric(&text, "ragway_embedding_batch_tokens_count{model=\"all-MiniLM-L6-v2\"}").is_some_and(|n| n >= 2.0));
    assert_eq!(metric(&text, "ragway_index_documents{collection=\"kb\"}"), Some(1.0));
    assert!(metric(&text, "ragway_index_chunks{collection=\"kb\"}").is_some_and(|n| n >= 1.0));
    assert!(text.contains("ragway_generation_time_to_first_token_seconds_bucket"));
    assert!(text.contains("ragway_ingest_jobs{state=\"running\"}"));
}

#[test]
fn official_openai_client_with_keys() {
    let keys = keys_file_with_slow_key();
    let s = Server::start(&["--api-key", "sk-full", "--api-keys-file", keys.path().to_str().unwrap()]);
    s.wait_ready();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_auth.py");
    let out = std::process::Command::new(crate::openai_client::python())
        .arg(script)
        .env("RAGWAY_URL", &s.url)
        .env("RAGWAY_KEY", "sk-full")
        .env("RAGWAY_SLOW_KEY", "sk-one-a-minute")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai auth script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("openai auth client: all checks passed"), "{stdout}");
}

/// A keys file, removed when the returned handle drops.
fn keys_file_with_slow_key() -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), "[[keys]]\nkey = \"sk-one-a-minute\"\nrequests_per_minute = 1\n").unwrap();
    file
}

#[test]
fn closed_probes_and_refusing_to_listen_beyond_loopback_without_keys() {
    let s = Server::start(&["--api-key", "sk-one", "--open-probes", "false"]);
    let anon = Call { s: &s, key: None };
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(anon.get(path).0, 401, "{path}");
    }
    assert_eq!(Call { s: &s, key: Some("sk-one") }.get("/metrics").0, 200);
    assert_eq!(Call { s: &s, key: Some("sk-one") }.get("/health").0, 200);
    drop(s);
    // A scraper on a private network: --open-metrics.
    let s = Server::start(&["--api-key", "sk-one", "--open-metrics", "true"]);
    assert_eq!(Call { s: &s, key: None }.get("/metrics").0, 200);
    assert_eq!(Call { s: &s, key: None }.get("/openapi.json").0, 401);
    drop(s);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("RAGWAY_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-unauthenticated"), "{err}");
}

#[test]
fn a_full_generation_queue_answers_429_at_once() {
    let s = Server::start(&["--max-running-seqs", "1", "--max-waiting-requests", "1"]);
    s.wait_ready();
    let url = format!("{}/v1/completions", s.url);
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "SmolLM2-135M-Instruct", "prompt": format!("Story {i}:"), "max_tokens": 64,
                    "temperature": 0, "ignore_eos": true});
                let r = client().post(url).json(&body).send().unwrap();
                let retry = r.headers().get("retry-after").is_some();
                (r.status().as_u16(), retry, r.json::<Value>().unwrap())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1 && !refused.is_empty(), "{results:?}");
    assert_eq!(ok + refused.len(), 6, "{results:?}");
    for (_, retry, body) in refused {
        assert!(retry);
        assert_eq!(body["error"]["code"], "queue_full");
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    assert!(metric(&text, "ragway_requests_rejected_total{reason=\"queue_full\"}").is_some_and(|n| n >= 1.0), "{text}");
}
