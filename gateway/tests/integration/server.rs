//! Start-up, probes, models listing and failure modes of `ragway serve`.

use crate::common::{assert_openai_error, client, shared, Server};
use std::time::Duration;

#[test]
fn health_answers_and_ready_flips_once_loaded() {
    let s = Server::start(&[]);
    // Models load for a while after the listening line: meanwhile the API answers 503 in
    // OpenAI's shape with Retry-After (never a hang or a 500).
    let r = client()
        .post(format!("{}/v1/collections", s.url))
        .json(&serde_json::json!({"name": "early"}))
        .send()
        .unwrap();
    let early = r.status().as_u16();
    if early == 503 {
        assert!(r.headers().get("retry-after").is_some());
        let body: serde_json::Value = r.json().unwrap();
        assert_openai_error(503, &body, 503);
        assert_eq!(body["error"]["code"], "model_not_ready");
    } else {
        assert_eq!(early, 201, "only 503 (loading) or 201 (loaded) are right");
    }
    let (status, body) = s.get("/health");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    let r = client().get(format!("{}/ready", s.url)).send().unwrap();
    // Either still loading (503 with Retry-After) or already up; never anything else.
    if r.status() == 503 {
        assert!(r.headers().get("retry-after").is_some());
    } else {
        assert_eq!(r.status(), 200);
    }
    s.wait_ready();
    let (status, body) = s.get("/ready");
    assert_eq!(status, 200);
    assert_eq!(body["models"]["all-MiniLM-L6-v2"], true);
    assert_eq!(body["models"]["SmolLM2-135M-Instruct"], true);
}

#[test]
fn lists_the_default_embedding_model() {
    let s = shared();
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"all-MiniLM-L6-v2"), "{body}");
    let (status, m) = s.get("/v1/models/all-MiniLM-L6-v2");
    assert_eq!(status, 200);
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "ragway");
    assert!(m["created"].as_u64().unwrap() > 1_600_000_000);
    let (status, body) = s.get("/v1/models/gpt-4");
    let e = assert_openai_error(status, &body, 404);
    assert_eq!(e["code"], "model_not_found");
}

#[test]
fn unknown_route_is_an_openai_error() {
    let (status, body) = shared().get("/v1/nope");
    assert_openai_error(status, &body, 404);
}

fn exits_with(extra: &[&str], words: &[&str]) {
    let empty = tempfile::tempdir().unwrap();
    let mut s = Server::start_with_models(empty.path(), extra);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = s.try_wait() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "server kept running without its model");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(200));
    let log = s.log.lock().unwrap().join("\n");
    assert!(words.iter().all(|w| log.contains(w)), "{words:?} not in:\n{log}");
}

#[test]
fn missing_model_stops_the_server_with_the_reason() {
    // Only the embedding model is missing (the generation model is given by path).
    let gguf = crate::common::models_dir().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    exits_with(
        &["--embedding-model", "nobody/missing-model", "--generation-model", gguf.to_str().unwrap()],
        &["missing-model", "setup-models.sh"],
    );
    // Only the generation model is missing.
    let minilm = crate::common::models_dir().join("all-MiniLM-L6-v2");
    exits_with(
        &["--embedding-model", minilm.to_str().unwrap(), "--generation-model", "nobody/missing-llm"],
        &["failed to load the generation model", "missing-llm", "setup-models.sh"],
    );
}

/// Runs `ragway serve` with `extra` and returns its stderr once it has exited on its own
/// (within a minute) with a failure status.
fn fails_at_start(extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", data.to_str().unwrap()])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

/// A build without CUDA asked to generate on a GPU stops at start-up and says how to get one;
/// a memory fraction outside (0, 1] is refused before anything loads.
#[test]
fn a_gpu_generation_device_without_cuda_stops_the_server_with_the_reason() {
    let models = crate::common::models_dir();
    let args = ["--models-dir", models.to_str().unwrap()];
    if cfg!(not(feature = "cuda")) {
        let err = fails_at_start(&[&args[..], &["--generation-device", "cuda:0"]].concat());
        assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
    }
    let err = fails_at_start(&[&args[..], &["--gpu-memory-fraction", "1.5"]].concat());
    assert!(err.contains("gpu_memory_fraction") && err.contains("1.5"), "{err}");
}

#[test]
fn config_file_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "port = 1\nnot_a_key = true\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not_a_key"), "{err}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ragway")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--host", "--port", "--models-dir", "--data-dir", "--config", "RAGWAY_PORT"] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn sigterm_finishes_in_flight_streams_flushes_and_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(data.path(), &["--log-format", "json", "--commit-interval-ms", "600000"]);
    s.wait_ready();
    assert_eq!(s.post("/v1/collections", &serde_json::json!({"name": "kb"})).0, 201);
    // Durable but not yet searchable (the commit interval is 10 minutes): the shutdown flush
    // must make it searchable before exit.
    let (status, _) = s.post(
        "/v1/collections/kb/documents",
        &serde_json::json!({"documents": [{"id": "d", "text": "graceful shutdown flushes the index"}], "wait": false}),
    );
    assert_eq!(status, 200);
    let url = format!("{}/v1/completions", s.url);
    let stream = std::thread::spawn(move || {
        let body = serde_json::json!({"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 48,
            "temperature": 0, "ignore_eos": true, "stream": true});
        client().post(url).json(&body).send().unwrap().text().unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    s.terminate();
    let text = stream.join().unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the in-flight stream was cut: {text}");
    let status = s.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.lines().any(|l| l.starts_with('{') && l.contains("\"server stopped\"")), "{log}");
    // The flushed keyword index holds the document without any replay of the log.
    let meta = std::fs::read_to_string(data.path().join("collections/kb/keyword/meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let docs: u64 = meta["segments"].as_array().unwrap().iter().map(|s| s["max_doc"].as_u64().unwrap()).sum();
    assert_eq!(docs, 1, "the shutdown did not commit the keyword index: {meta}");
}
