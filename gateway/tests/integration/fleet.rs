//! The model registry with real processes: versions loaded at run time, A/B, canary with
//! automatic rollback, shadow traffic, and upstream pools of other ragway servers (one of them
//! killed mid-test).

use crate::common::{assert_openai_error, client, Server};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const SMOL: &str = "SmolLM2-135M-Instruct";

/// POST with headers; answers status, body, and the version header.
fn post_h(s: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut r = client().post(format!("{}{path}", s.url)).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().expect("request");
    let status = r.status().as_u16();
    let version = r.headers().get("x-ragway-model-version").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, r.json().unwrap_or(Value::Null), version)
}

fn put(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = client().put(format!("{}{path}", s.url)).json(body).send().expect("request");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn chat(model: &str, user: Option<&str>, text: &str) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0.0});
    if let Some(u) = user {
        b["user"] = json!(u);
    }
    b
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn version_of<'a>(describe: &'a Value, v: &str) -> &'a Value {
    describe["versions"].as_array().unwrap().iter().find(|x| x["version"] == v).unwrap_or_else(|| panic!("{v} in {describe}"))
}

/// A port nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

fn metric(s: &Server, line_prefix: &str) -> Option<f64> {
    let text = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    text.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn local_versions_ab_canary_rollback_and_shadow() {
    // Upstreams registered over the API may only reach hosts the operator allows.
    let s = Server::start(&["--upstream-hosts", "127.0.0.1"]);
    s.wait_ready();
    // Versions registered and loaded at run time, no restart.
    for v in ["a", "b"] {
        let (st, d) = s.post("/v1/admin/models", &json!({"name": "chat", "kind": "generation", "version": v, "local": {"model": SMOL}, "description": "SmolLM2 again"}));
        assert_eq!(st, 201, "{d}");
        assert!(["loading", "ready"].contains(&version_of(&d, v)["state"].as_str().unwrap()), "{d}");
    }
    wait_until("both versions loaded", Duration::from_secs(120), || {
        let (_, d) = s.get("/v1/admin/models/chat");
        ["a", "b"].iter().all(|v| version_of(&d, v)["state"] == "ready")
    });
    let (st, e) = s.post("/v1/admin/models", &json!({"name": "chat", "version": "a", "local": {"model": SMOL}}));
    assert_openai_error(st, &e, 409);
    let (st, e) = s.post("/v1/admin/models", &json!({"name": "fresh", "version": "x", "local": {"model": SMOL}}));
    assert_eq!(assert_openai_error(st, &e, 400)["param"], "kind");
    let (st, e) = s.post("/v1/admin/models", &json!({"name": "chat", "version": "c"}));
    assert_openai_error(st, &e, 400);
    let ids: Vec<String> = s.get("/v1/models").1["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    for id in ["chat", "chat@a", "chat@b", "SmolLM2-135M-Instruct@v1", "all-MiniLM-L6-v2"] {
        assert!(ids.contains(&id.to_string()), "{id} not in {ids:?}");
    }

    // A/B: 50/50 by user, sticky.
    let (st, d) = put(&s, "/v1/admin/models/chat/routing", &json!({"policy": "ab", "arms": [{"version": "a", "weight": 1}, {"version": "b", "weight": 1}]}));
    assert_eq!(st, 200, "{d}");
    let mut by_version: HashMap<String, usize> = HashMap::new();
    let mut assigned: HashMap<String, String> = HashMap::new();
    for i in 0..40 {
        let user = format!("user-{i}");
        let (st, body, v) = post_h(&s, "/v1/chat/completions", &chat("chat", Some(&user), "Hi"), &[]);
        assert_eq!(st, 200, "{body}");
        let v = v.expect("version header");
        assert_eq!(body["model"], format!("chat@{v}"));
        *by_version.entry(v.clone()).or_default() += 1;
        assigned.insert(user, v);
    }
    // Binomial(40, 0.5): sd 3.2; 5 sd either side.
    let on_a = by_version.get("a").copied().unwrap_or(0);
    assert!((4..=36).contains(&on_a), "{by_version:?}");
    for (user, v) in assigned.iter().take(5) {
        let (_, _, again) = post_h(&s, "/v1/chat/completions", &chat("chat", Some(user), "Hello again"), &[]);
        assert_eq!(again.as_deref(), Some(v.as_str()), "{user} moved");
    }
    // A pinned version bypasses routing (how an eval runs against one arm).
    let (st, body, v) = post_h(&s, "/v1/chat/completions", &chat("chat@b", None, "Hi"), &[]);
    assert_eq!((st, v.as_deref(), body["model"].as_str()), (200, Some("b"), Some("chat@b")));
    let (st, e) = s.delete("/v1/admin/models/chat/versions/a");
    assert_openai_error(st, &e, 409);

    // Canary with injected errors: a version whose upstream does not exist.
    let (st, d) = s.post("/v1/admin/models", &json!({"name": "chat", "version": "broken", "upstream": {"endpoints": [dead_url()], "retries": 0}}));
    assert_eq!(st, 201, "{d}");
    let routing = json!({"policy": "canary", "stable": "a", "canary": "broken", "share": 0.0, "header": "x-canary",
        "rollback": {"window_s": 60, "min_requests": 3, "max_error_rate": 0.5}});
    let (st, d) = put(&s, "/v1/admin/models/chat/routing", &routing);
    assert_eq!(st, 200, "{d}");
    let (_, _, v) = post_h(&s, "/v1/chat/completions", &chat("chat", None, "Hi"), &[]);
    assert_eq!(v.as_deref(), Some("a"), "share 0: no header, no canary");
    for _ in 0..3 {
        let (st, e, _) = post_h(&s, "/v1/chat/completions", &chat("chat", None, "Hi"), &[("x-canary", "1")]);
        assert_eq!(assert_openai_error(st, &e, 502)["code"], "upstream_error");
    }
    let (_, d) = s.get("/v1/admin/models/chat");
    assert_eq!(d["rolled_back"]["version"], "broken", "{d}");
    assert!(d["rolled_back"]["reason"].as_str().unwrap().contains("error rate 1.000"), "{d}");
    assert_eq!(version_of(&d, "broken")["share"], 0.0);
    let (st, body, v) = post_h(&s, "/v1/chat/completions", &chat("chat", None, "Hi"), &[("x-canary", "1")]);
    assert_eq!((st, v.as_deref()), (200, Some("a")), "after the rollback the canary header lands on stable: {body}");
    assert_eq!(metric(&s, "ragway_model_rollbacks_total{model=\"chat\",version=\"broken\"}"), Some(1.0));
    assert_eq!(metric(&s, "ragway_model_canary_rolled_back{model=\"chat\"}"), Some(1.0));

    // Shadow: every request mirrored to b; answers come from a, unchanged.
    let (st, d) = put(&s, "/v1/admin/models/chat/routing", &json!({"policy": "single", "version": "a", "shadow": {"version": "b", "share": 1.0}}));
    assert_eq!(st, 200, "{d}");
    assert!(d["rolled_back"].is_null(), "new routing clears the rollback");
    let (_, direct, _) = post_h(&s, "/v1/chat/completions", &chat("chat@a", None, "Name a colour."), &[]);
    for _ in 0..3 {
        let (st, body, v) = post_h(&s, "/v1/chat/completions", &chat("chat", None, "Name a colour."), &[]);
        assert_eq!((st, v.as_deref()), (200, Some("a")));
        assert_eq!(body["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    }
    wait_until("three shadow requests recorded", Duration::from_secs(60), || {
        let (_, d) = s.get("/v1/admin/models/chat");
        version_of(&d, "b")["requests"]["shadow"]["ok"] == 3
    });
    assert_eq!(metric(&s, "ragway_model_requests_total{model=\"chat\",version=\"b\",role=\"shadow\",outcome=\"ok\"}"), Some(3.0));

    // Retire b once nothing routes to it: its engine goes, and so does `chat@b`.
    let (st, d) = put(&s, "/v1/admin/models/chat/routing", &json!({"policy": "single", "version": "a"}));
    assert_eq!(st, 200, "{d}");
    let (st, d) = s.delete("/v1/admin/models/chat/versions/b");
    assert_eq!(st, 200, "{d}");
    let (st, e, _) = post_h(&s, "/v1/chat/completions", &chat("chat@b", None, "Hi"), &[]);
    assert_eq!(assert_openai_error(st, &e, 404)["code"], "model_not_found");
    let (st, e) = s.delete("/v1/admin/models/SmolLM2-135M-Instruct/versions/v1");
    assert_openai_error(st, &e, 409);

    // GraphQL: same registry, errors with extensions.code.
    let gql = |q: &str| s.post("/graphql", &json!({"query": q})).1;
    let r = gql(r#"{ modelRegistry(name: "chat") }"#);
    assert_eq!(r["data"]["modelRegistry"]["routing"]["version"], "a", "{r}");
    let r = gql(r#"mutation { setModelRouting(name: "chat", routing: {policy: "single", version: "zz"}) }"#);
    assert_eq!(r["errors"][0]["extensions"]["code"], "invalid_request_error", "{r}");
    assert_eq!(r["errors"][0]["extensions"]["param"], "routing.version", "{r}");
    let r = gql(r#"mutation { retireModelVersion(name: "chat", version: "broken") }"#);
    assert!(r["errors"].is_null(), "{r}");
}

#[test]
fn upstream_pool_balances_retries_and_survives_a_dead_upstream() {
    let b = Server::start(&[]);
    let c = Server::start(&[]);
    b.wait_ready();
    c.wait_ready();
    let dead = dead_url();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ragway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[models]]
name = "chat"
kind = "generation"
[[models.versions]]
version = "remote"
upstream = {{ endpoints = ["{dead}", "{b}", "{c}"], model = "{SMOL}", health_interval_s = 0.3, failure_threshold = 1, cooldown_s = 60 }}

[[models]]
name = "chat-retry"
kind = "generation"
[[models.versions]]
version = "remote"
upstream = {{ endpoints = ["{dead}", "{c}"], model = "{SMOL}", health_interval_s = 3600, failure_threshold = 1, cooldown_s = 60 }}

[[models]]
name = "embed"
kind = "embedding"
[[models.versions]]
version = "remote"
upstream = {{ endpoints = ["{b}"], model = "all-MiniLM-L6-v2", retries = 0 }}
"#,
            b = b.url,
            c = c.url
        ),
    )
    .unwrap();
    let a = Server::start(&["--config", config.to_str().unwrap()]);
    a.wait_ready();

    // Same weights upstream and greedy decoding: the gateway's answer is the upstream's.
    let (_, direct) = b.post("/v1/chat/completions", &chat(SMOL, None, "What is the capital of France?"));
    let want = direct["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    for _ in 0..4 {
        let (st, body, v) = post_h(&a, "/v1/chat/completions", &chat("chat", None, "What is the capital of France?"), &[]);
        assert_eq!(st, 200, "a dead endpoint is retried past: {body}");
        assert_eq!(v.as_deref(), Some("remote"));
        assert_eq!(body["model"], "chat@remote");
        assert_eq!(body["choices"][0]["message"]["content"], want.as_str());
    }
    // Streaming passes through chunk by chunk, relabelled.
    let mut body = chat("chat", None, "What is the capital of France?");
    body["stream"] = json!(true);
    let text = client().post(format!("{}/v1/chat/completions", a.url)).json(&body).send().unwrap().text().unwrap();
    let mut streamed = String::new();
    let mut chunks = 0;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["model"], "chat@remote", "{v}");
        streamed.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        chunks += 1;
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(chunks >= 3, "{text}");
    assert_eq!(streamed, want);
    // Embeddings through the pool equal the upstream's own.
    let input = json!({"model": "embed", "input": "hybrid retrieval"});
    let (st, via) = a.post("/v1/embeddings", &input);
    assert_eq!(st, 200, "{via}");
    assert_eq!(via["model"], "embed@remote");
    let (_, own) = b.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": "hybrid retrieval"}));
    let (x, y) = (via["data"][0]["embedding"].as_array().unwrap(), own["data"][0]["embedding"].as_array().unwrap());
    assert_eq!(x.len(), 384);
    assert!(x.iter().zip(y).all(|(p, q)| (p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-6));

    // The dead endpoint failed its health check: no traffic went to it.
    wait_until("the health check to mark the dead endpoint", Duration::from_secs(10), || {
        let (_, d) = a.get("/v1/admin/models/chat");
        version_of(&d, "remote")["endpoints"][0]["healthy"] == false
    });
    let (_, d) = a.get("/v1/admin/models/chat");
    let eps = version_of(&d, "remote")["endpoints"].as_array().unwrap().clone();
    assert_eq!(eps[0]["requests_ok"], 0, "{d}");
    assert_eq!(eps[1]["requests_ok"].as_u64().unwrap() + eps[2]["requests_ok"].as_u64().unwrap(), 5, "{d}");
    // With no health check yet, a refused connection is retried on the next endpoint and
    // opens the dead one's circuit.
    for _ in 0..3 {
        let (st, body, _) = post_h(&a, "/v1/chat/completions", &chat("chat-retry", None, "What is the capital of France?"), &[]);
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], want.as_str());
    }
    let (_, d) = a.get("/v1/admin/models/chat-retry");
    let eps = version_of(&d, "remote")["endpoints"].as_array().unwrap().clone();
    assert_eq!((eps[0]["requests_failed"].as_u64(), eps[0]["circuit"].as_str()), (Some(1), Some("open")), "{d}");
    assert_eq!(eps[1]["requests_ok"], 3, "{d}");

    // Kill one live upstream mid-test: everything still answers, from the other.
    let mut b = b;
    b.kill9();
    let before_c = version_of(&a.get("/v1/admin/models/chat").1, "remote")["endpoints"][2]["requests_ok"].as_u64().unwrap();
    for _ in 0..4 {
        let (st, body, _) = post_h(&a, "/v1/chat/completions", &chat("chat", None, "What is the capital of France?"), &[]);
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], want.as_str());
    }
    let (_, d) = a.get("/v1/admin/models/chat");
    let eps = version_of(&d, "remote")["endpoints"].as_array().unwrap().clone();
    assert_eq!(eps[2]["requests_ok"].as_u64().unwrap(), before_c + 4, "{d}");
    // The embeddings pool had only the killed upstream: a clear 502, and the server lives on.
    let (st, e) = a.post("/v1/embeddings", &input);
    assert_eq!(assert_openai_error(st, &e, 502)["code"], "upstream_error");
    wait_until("the killed endpoint marked unhealthy", Duration::from_secs(10), || {
        // b is the second endpoint of the version (position 1).
        metric(&a, "ragway_upstream_healthy{model=\"chat\",version=\"remote\",endpoint=\"1\"}") == Some(0.0)
    });
    assert_eq!(a.get("/health").0, 200);
}

/// llama.cpp's own OpenAI-compatible server (llama-cpp-python[server]) as an upstream, when
/// `RAGWAY_LLAMA_SERVER_PYTHON` names a Python that has it (building llama.cpp takes ~20
/// minutes on 2 cores, so CI does not install it; `scripts/test.sh` passes it when present).
#[test]
fn llama_cpp_server_as_upstream() {
    let Some(python) = std::env::var_os("RAGWAY_LLAMA_SERVER_PYTHON") else {
        eprintln!("skipped: RAGWAY_LLAMA_SERVER_PYTHON is not set");
        return;
    };
    let gguf = crate::common::models_dir().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let port = dead_url().rsplit(':').next().unwrap().to_string();
    let mut cmd = std::process::Command::new(python);
    cmd.args(["-m", "llama_cpp.server", "--model"]).arg(&gguf).args(["--port", &port, "--n_ctx", "2048", "--model_alias", "smol"]);
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let child = cmd.spawn().expect("llama_cpp.server");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _ = child.id();
    let guard = Kill(child);
    let upstream = format!("http://127.0.0.1:{port}");
    wait_until("llama.cpp server up", Duration::from_secs(120), || {
        client().get(format!("{upstream}/v1/models")).send().is_ok_and(|r| r.status() == 200)
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ragway.toml");
    std::fs::write(
        &config,
        format!("[[models]]\nname = \"llama\"\nkind = \"generation\"\n[[models.versions]]\nversion = \"cpp\"\nupstream = {{ endpoints = [\"{upstream}\"], model = \"smol\", health_path = \"/v1/models\" }}\n"),
    )
    .unwrap();
    let a = Server::start(&["--config", config.to_str().unwrap()]);
    a.wait_ready();
    let (st, body, v) = post_h(&a, "/v1/chat/completions", &chat("llama", None, "Say hello."), &[]);
    assert_eq!((st, v.as_deref()), (200, Some("cpp")), "{body}");
    assert_eq!(body["model"], "llama@cpp");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{body}");
    let mut req = chat("llama", None, "Say hello.");
    req["stream"] = json!(true);
    let text = client().post(format!("{}/v1/chat/completions", a.url)).json(&req).send().unwrap().text().unwrap();
    assert!(text.contains("\"model\":\"llama@cpp\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    drop(guard);
}
