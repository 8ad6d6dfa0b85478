//! Regression tests for the findings of the security audit of 7f2bd9e (issue 18), each tried
//! as the audit did: on a live server with API keys, as a caller holding a `read` key where
//! the finding was about one. Every test here failed on 7f2bd9e.
//!
//! Findings tested in other crates: 4 and 12 in `prompts/tests/registry.rs`, 5 at the engine
//! in `engine/tests/integration/generate_worker.rs`, 6 in `index/src/wal.rs`, 7 in
//! `index/tests/integration/collection.rs`, 10's dataset side in `eval/src/datasets.rs`.

use crate::common::{client, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

const KEYS: &str = r#"
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
key = "sk-metered"
name = "metered"
scopes = ["read"]
requests_per_minute = 3

[[keys]]
key = "sk-ws"
name = "websocket"
scopes = ["read"]
"#;

/// Body limit of the audit server (the GraphQL body test sends more).
const MAX_BODY: usize = 4 << 20;

/// One keyed server for the findings below (started once: loading models takes seconds).
fn server() -> &'static Server {
    static S: OnceLock<(Server, tempfile::TempDir)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        std::fs::write(&keys, KEYS).unwrap();
        let data = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let s = Server::start(&[
            "--api-keys-file",
            keys.to_str().unwrap(),
            "--max-body-bytes",
            &MAX_BODY.to_string(),
            "--ingest-root",
            data.to_str().unwrap(),
            "--ws-init-timeout-secs",
            "1",
            "--ws-max-connections-per-key",
            "1",
        ]);
        s.wait_ready();
        let (st, body) = call(&s, "POST", "/v1/collections", Some("sk-admin"), Some(&json!({"name": "kb"})));
        assert_eq!(st, 201, "{body}");
        (s, dir)
    })
    .0
}

fn call(s: &Server, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = client().request(method, format!("{}{path}", s.url));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let r = r.send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn collections(s: &Server) -> Vec<String> {
    let (st, body) = call(s, "GET", "/v1/collections", Some("sk-admin"), None);
    assert_eq!(st, 200, "{body}");
    body["data"].as_array().unwrap_or_else(|| panic!("{body}")).iter().map(|c| c["settings"]["name"].as_str().unwrap().to_string()).collect()
}

/// Finding 1: `/v1/%61dmin/models`, `/v1/%63ollections`, ... skipped the scope check, so a
/// read key created and deleted collections, registered models and started evals.
#[test]
fn percent_encoded_paths_do_not_skip_authorization() {
    let s = server();
    let attempts: Vec<(&str, &str, Value)> = vec![
        ("POST", "/v1/%63ollections", json!({"name": "evil"})),
        ("POST", "/v1/collection%73", json!({"name": "evil2"})),
        ("DELETE", "/v1/%63ollections/kb", Value::Null),
        ("DELETE", "/v1/collections/%6bb", Value::Null),
        ("POST", "/v1/%63ollections/kb/documents", json!({"documents": [{"id": "x", "text": "planted"}]})),
        ("POST", "/v1/collections/kb/%73napshot", json!({"path": "stolen"})),
        ("POST", "/v1/%61dmin/models", json!({"name": "m", "kind": "generation", "version": "v9", "local": {"model": "SmolLM2-135M-Instruct"}})),
        ("GET", "/v1/%61dmin/models", Value::Null),
        ("POST", "/v1/%65vals", json!({"kind": "retrieval", "dataset": "scifact_slice", "collection": "kb"})),
        ("PUT", "/v1/collections/kb/drift/%72eference", json!({"queries": ["q"]})),
    ];
    for (method, path, body) in &attempts {
        let (st, resp) = call(s, method, path, Some("sk-reader"), (!body.is_null()).then_some(body));
        assert!(st == 403 || st == 404, "{method} {path} with a read key answered {st}: {resp}");
        if st == 403 {
            assert_eq!(resp["error"]["code"], "insufficient_scope", "{resp}");
        }
    }
    assert_eq!(collections(s), vec!["kb"]);
    let (_, doc) = call(s, "GET", "/v1/collections/kb/documents/x", Some("sk-reader"), None);
    assert_eq!(doc["error"]["code"], "document_not_found", "{doc}");
    // Unknown routes are 404 whoever asks, and unauthenticated callers get 401 on real ones.
    assert_eq!(call(s, "GET", "/v1/nothing-here", None, None).0, 404);
    assert_eq!(call(s, "GET", "/v1/nothing-here", Some("sk-reader"), None).0, 404);
    assert_eq!(call(s, "POST", "/v1/%63ollections", None, Some(&json!({"name": "anon"}))).0, 401);
}

/// Finding 2: a model version's `chat_template` (any path) was read from anywhere on disk.
#[test]
fn registered_model_paths_stay_under_the_models_directory() {
    let s = server();
    for (param, local) in [
        ("local.chat_template", json!({"model": "SmolLM2-135M-Instruct", "chat_template": "/etc/passwd"})),
        ("local.chat_template", json!({"model": "SmolLM2-135M-Instruct", "chat_template": "../../../../etc/passwd"})),
        ("local.model", json!({"model": "/etc"})),
        ("local.model", json!({"model": "../models/../../etc"})),
    ] {
        let body = json!({"name": "escape", "kind": "generation", "version": "v1", "local": local});
        let (st, resp) = call(s, "POST", "/v1/admin/models", Some("sk-admin"), Some(&body));
        assert_eq!(st, 400, "{resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
    }
}

/// Finding 3: upstream URLs could point at loopback or private addresses and their replies
/// were reflected. Without `--upstream-hosts`, no API-registered upstream may be reached.
#[test]
fn upstream_hosts_must_be_allowed_by_configuration() {
    let s = server();
    for endpoint in ["http://127.0.0.1:9", "http://169.254.169.254", "http://[::1]:8080", "http://localhost:22"] {
        let body = json!({"name": "proxy", "kind": "generation", "version": "v1", "upstream": {"endpoints": [endpoint]}});
        let (st, resp) = call(s, "POST", "/v1/admin/models", Some("sk-admin"), Some(&body));
        assert_eq!(st, 403, "{endpoint}: {resp}");
        assert_eq!(resp["error"]["code"], "upstream_host_not_allowed", "{resp}");
    }
    // Durations that would overflow are refused, not a panic.
    let body = json!({"name": "proxy", "kind": "generation", "version": "v1",
        "upstream": {"endpoints": ["http://127.0.0.1:9"], "timeout_s": 1e300}});
    let (st, resp) = call(s, "POST", "/v1/admin/models", Some("sk-admin"), Some(&body));
    assert_eq!(st, 400, "{resp}");
}

/// Finding 5: `max_tokens` near 2^64 wrapped the context check and failed every running
/// sequence. Now it is a 400 for that request alone.
#[test]
fn max_tokens_near_u64_max_fails_only_its_own_request() {
    let s = server();
    let url = s.url.clone();
    let healthy = std::thread::spawn(move || {
        let body = json!({"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 48,
            "temperature": 0, "ignore_eos": true});
        let r = client().post(format!("{url}/v1/completions")).bearer_auth("sk-reader").json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    for max_tokens in [u64::MAX, u64::MAX - 3, 1u64 << 63] {
        let body = json!({"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": max_tokens});
        let (st, resp) = call(s, "POST", "/v1/completions", Some("sk-reader"), Some(&body));
        assert_eq!(st, 400, "{resp}");
        assert_eq!(resp["error"]["code"], "context_length_exceeded", "{resp}");
    }
    let (st, resp) = healthy.join().unwrap();
    assert_eq!(st, 200, "{resp}");
    assert_eq!(resp["choices"][0]["finish_reason"], "length", "{resp}");
    assert_eq!(resp["usage"]["completion_tokens"], 48);
}

/// Finding 8: `/graphql` had no body limit (100 MiB JSON and 64 MiB multipart parts).
#[test]
fn graphql_bodies_are_bounded() {
    let s = server();
    let big = "x".repeat(MAX_BODY + 1024);
    let query = json!({"query": format!("{{ models {{ id }} }} # {big}")});
    let r = client().post(format!("{}/graphql", s.url)).bearer_auth("sk-reader").json(&query).send().unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let body: Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "body_too_large", "{body}");
    // The same through multipart (the GraphQL upload form).
    let boundary = "ragway-audit-boundary";
    let mut form = Vec::new();
    for (name, value) in [("operations", json!({"query": "{ models { id } }"}).to_string()), ("map", "{}".into())] {
        form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes());
    }
    form.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"0\"; filename=\"f.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .bytes(),
    );
    form.extend(std::iter::repeat_n(b'a', MAX_BODY + 1024));
    form.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let r = client()
        .post(format!("{}/graphql", s.url))
        .bearer_auth("sk-reader")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(form)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // A normal query still works.
    let (st, resp) = call(s, "POST", "/graphql", Some("sk-reader"), Some(&json!({"query": "{ models { id } }"})));
    assert_eq!(st, 200, "{resp}");
    assert!(resp["data"]["models"].as_array().is_some_and(|m| !m.is_empty()), "{resp}");
}

/// Finding 9: requests with invented HTTP methods grew `/metrics` without bound.
#[test]
fn invented_methods_do_not_grow_the_metrics() {
    let s = server();
    let size = |s: &Server| call(s, "GET", "/metrics", Some("sk-admin"), None).1.as_str().unwrap().len();
    let before = size(s);
    for i in 0..300 {
        let _ = call(s, &format!("BREW{i}"), "/v1/models", None, None);
    }
    let (st, text) = call(s, "GET", "/metrics", Some("sk-admin"), None);
    assert_eq!(st, 200);
    let text = text.as_str().unwrap();
    assert!(!text.contains("BREW"), "method names became labels");
    assert!(text.len() < before + 4096, "metrics grew from {before} to {} bytes", text.len());
}

/// Finding 10: an eval `split` escaped the ingest root (`../`, absolute paths).
#[test]
fn eval_splits_cannot_escape_the_ingest_root() {
    let s = server();
    for split in ["../../../../etc/passwd", "/etc/passwd", "train/../../x"] {
        let body = json!({"kind": "retrieval", "dataset": "scifact_slice", "collection": "kb", "split": split});
        let (st, resp) = call(s, "POST", "/v1/evals", Some("sk-writer"), Some(&body));
        assert_eq!(st, 400, "{split}: {resp}");
        assert_eq!(resp["error"]["param"], "split", "{resp}");
    }
    // A valid run's view names its dataset under the root, never the server's path.
    let body = json!({"kind": "retrieval", "dataset": "scifact_slice", "collection": "kb", "limit": 2, "name": "audit-run"});
    let (st, resp) = call(s, "POST", "/v1/evals", Some("sk-writer"), Some(&body));
    assert!(st == 200 || st == 201 || st == 202, "{resp}");
    let (st, view) = call(s, "GET", "/v1/evals/audit-run", Some("sk-reader"), None);
    assert_eq!(st, 200, "{view}");
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(!view.to_string().contains(root.to_str().unwrap()), "{view}");
    assert_eq!(view["dataset"], "scifact_slice", "{view}");
    for dataset in ["../../../../etc", "/etc"] {
        let body = json!({"kind": "retrieval", "dataset": dataset, "collection": "kb"});
        let (st, resp) = call(s, "POST", "/v1/evals", Some("sk-writer"), Some(&body));
        assert!(st == 400 || st == 403, "{dataset}: {st} {resp}");
    }
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Finding 11: a 14 MiB chat message peaked at 1.7 GB (tokenized whole on the HTTP worker)
/// and stalled `/health` for 11 s. The text is now bounded before tokenizing.
#[test]
fn a_huge_chat_message_is_refused_before_tokenizing() {
    let s = server();
    let before = peak_rss(s.pid());
    let message = "word ".repeat((MAX_BODY - 4096) / 5);
    let body = json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": message}], "max_tokens": 1});
    let (st, resp) = call(s, "POST", "/v1/chat/completions", Some("sk-reader"), Some(&body));
    assert_eq!(st, 400, "{}", resp.to_string().chars().take(300).collect::<String>());
    assert_eq!(resp["error"]["code"], "context_length_exceeded");
    for path in ["/v1/completions", "/v1/embeddings", "/tokenize"] {
        let body = match path {
            "/v1/embeddings" => json!({"model": "all-MiniLM-L6-v2", "input": message}),
            "/tokenize" => json!({"prompt": message}),
            _ => json!({"model": "SmolLM2-135M-Instruct", "prompt": message, "max_tokens": 1}),
        };
        let (st, _) = call(s, "POST", path, Some("sk-reader"), Some(&body));
        assert_eq!(st, 400, "{path}");
    }
    let grown = peak_rss(s.pid()).saturating_sub(before);
    assert!(grown < 256 << 20, "the server's peak memory grew by {} MB", grown >> 20);
}

/// Finding 13: aliased operations shared one request of the key's rate limit, and keyless
/// WebSocket connections stayed open forever.
#[test]
fn every_graphql_operation_is_charged_and_websockets_are_bounded() {
    let s = server();
    let query = "{ a: models { id } b: models { id } c: models { id } d: models { id } e: models { id } }";
    let (st, resp) = call(s, "POST", "/graphql", Some("sk-metered"), Some(&json!({"query": query})));
    assert_eq!(st, 200, "{resp}");
    let limited = resp["errors"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["extensions"]["code"] == "rate_limit_exceeded").count())
        .unwrap_or(0);
    assert!(limited >= 2, "3 requests a minute, 5 aliased operations: {resp}");

    let connect = || {
        let url = s.url.replace("http://", "ws://") + "/graphql";
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let (socket, _) = tungstenite::connect(req).expect("websocket handshake");
        if let tungstenite::stream::MaybeTlsStream::Plain(t) = socket.get_ref() {
            t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        }
        socket
    };
    // No connection_init: closed by the server after the 1 s deadline (not by our timeout).
    let mut idle = connect();
    let started = Instant::now();
    loop {
        match idle.read() {
            Ok(Message::Close(_)) => break,
            Ok(Message::Ping(p)) => {
                let _ = idle.send(Message::Pong(p));
            }
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("a connection without connection_init was still open after {:?}", started.elapsed())
            }
            Err(_) => break,
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // A wrong key in connection_init is refused.
    let init = |socket: &mut tungstenite::WebSocket<_>, key: &str| -> Value {
        socket.send(Message::text(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {key}")}}).to_string())).unwrap();
        loop {
            match socket.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).unwrap(),
                Ok(Message::Close(f)) => return json!({"type": "closed", "reason": f.map(|f| f.reason.to_string())}),
                Ok(_) => continue,
                Err(_) => return json!({"type": "closed"}),
            }
        }
    };
    let mut bad = connect();
    assert_ne!(init(&mut bad, "sk-nope")["type"], "connection_ack");
    // One connection per key here: the second is refused while the first is open, and
    // allowed again once it closed.
    let mut first = connect();
    assert_eq!(init(&mut first, "sk-ws")["type"], "connection_ack");
    let mut second = connect();
    assert_ne!(init(&mut second, "sk-ws")["type"], "connection_ack");
    drop(second);
    first.close(None).unwrap();
    let _ = first.read();
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect();
        if init(&mut again, "sk-ws")["type"] == "connection_ack" {
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection's slot was never given back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With keys configured, only `/health` and `/ready` are open by default; `/metrics`, the
/// OpenAPI document and GraphiQL need a key. Standard introspection passes the depth limit.
#[test]
fn keyed_servers_close_metrics_docs_and_ide_but_allow_introspection() {
    let s = server();
    for path in ["/metrics", "/openapi.json", "/graphql"] {
        assert_eq!(call(s, "GET", path, None, None).0, 401, "{path}");
        assert_eq!(call(s, "GET", path, Some("sk-reader"), None).0, 200, "{path}");
    }
    assert_eq!(call(s, "GET", "/health", None, None).0, 200);
    assert_eq!(call(s, "GET", "/ready", None, None).0, 200);
    // The IDE's assets come from the binary.
    let r = client().get(format!("{}/graphql/assets/graphiql.min.js", s.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(r.bytes().unwrap().len() > 500_000);
    // graphql-js's introspection query (its TypeRef fragment nests ofType nine levels).
    let mut type_ref = String::from("kind name");
    for _ in 0..9 {
        type_ref = format!("kind name ofType {{ {type_ref} }}");
    }
    let introspection = format!(
        "query IntrospectionQuery {{ __schema {{ queryType {{ name }} mutationType {{ name }} subscriptionType {{ name }}
           types {{ ...FullType }} directives {{ name description locations args {{ ...InputValue }} }} }} }}
         fragment FullType on __Type {{ kind name description fields(includeDeprecated: true) {{ name description
           args {{ ...InputValue }} type {{ ...TypeRef }} isDeprecated deprecationReason }} inputFields {{ ...InputValue }}
           interfaces {{ ...TypeRef }} enumValues(includeDeprecated: true) {{ name description isDeprecated deprecationReason }}
           possibleTypes {{ ...TypeRef }} }}
         fragment InputValue on __InputValue {{ name description type {{ ...TypeRef }} defaultValue }}
         fragment TypeRef on __Type {{ {type_ref} }}"
    );
    let (st, resp) = call(s, "POST", "/graphql", Some("sk-reader"), Some(&json!({"query": introspection})));
    assert_eq!(st, 200);
    assert!(resp.get("errors").is_none_or(Value::is_null), "{}", resp.to_string().chars().take(500).collect::<String>());
    assert!(resp["data"]["__schema"]["types"].as_array().is_some_and(|t| t.len() > 20));
    // An abusive depth stays refused.
    let mut deep = String::from("id");
    for _ in 0..20 {
        deep = format!("collection(name: \"kb\") {{ name }} models {{ {deep} }}");
    }
    let (_, resp) = call(s, "POST", "/graphql", Some("sk-reader"), Some(&json!({"query": format!("{{ {deep} }}")})));
    assert!(resp["errors"][0]["message"].as_str().is_some_and(|m| m.contains("too deep")), "{resp}");
}

/// Low: a non-finite query vector (1e39 is infinite as f32) panicked hnsw_rs (a 500);
/// candidates and ef were unbounded.
#[test]
fn search_vectors_must_be_finite_and_search_sizes_bounded() {
    let s = server();
    let (st, resp) = call(s, "POST", "/v1/collections/kb/documents", Some("sk-writer"),
        Some(&json!({"documents": [{"id": "d", "text": "Wild yeast makes bread rise."}]})));
    assert_eq!(st, 200, "{resp}");
    for (field, value) in [("vector", json!(vec![1e39; 384])), ("vector", json!(vec![-1e39; 384])), ("candidates", json!(1u64 << 40)), ("ef", json!(1u64 << 40))] {
        let mut body = json!({"query": "bread", "mode": "dense", "top_k": 3});
        body[field] = value;
        let (st, resp) = call(s, "POST", "/v1/collections/kb/search", Some("sk-reader"), Some(&body));
        assert_eq!(st, 400, "{field}: {resp}");
        assert_eq!(resp["error"]["param"], field, "{resp}");
    }
    // Query text and keyword terms are bounded too.
    let many_terms: String = (0..2000).map(|i| format!("w{i} ")).collect();
    for query in ["x".repeat(70 << 10), many_terms] {
        let body = json!({"query": query, "mode": "keyword", "top_k": 3});
        let (st, resp) = call(s, "POST", "/v1/collections/kb/search", Some("sk-reader"), Some(&body));
        assert_eq!(st, 400, "{resp}");
        assert_eq!(resp["error"]["param"], "query", "{resp}");
    }
    let (st, resp) = call(s, "POST", "/v1/collections/kb/search", Some("sk-reader"), Some(&json!({"query": "bread", "top_k": 3})));
    assert_eq!(st, 200, "{resp}");
}

/// Low: job views (readable with a read key) showed the server's absolute paths.
#[test]
fn job_views_show_no_server_paths() {
    let s = server();
    let (st, job) = call(s, "POST", "/v1/collections/kb/ingest", Some("sk-writer"), Some(&json!({"path": "scifact_slice/corpus.jsonl"})));
    assert_eq!(st, 202, "{job}");
    let id = job["job_id"].as_str().unwrap().to_string();
    let (st, view) = call(s, "GET", &format!("/v1/jobs/{id}"), Some("sk-reader"), None);
    assert_eq!(st, 200, "{view}");
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(!view.to_string().contains(root.to_str().unwrap()), "{view}");
    assert_eq!(view["source"], "jsonl:corpus.jsonl", "{view}");
}
