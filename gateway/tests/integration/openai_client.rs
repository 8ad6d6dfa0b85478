//! The official `openai` Python package against a real server (tests/openai_embeddings.py).

use crate::common::shared;
use std::path::PathBuf;
use std::process::Command;

/// The Python with `openai` installed: `RAGWAY_TEST_PYTHON`, else the venv that
/// `scripts/test.sh` creates.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RAGWAY_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ragway/pyenv/bin/python");
    assert!(venv.is_file(), "no Python with the openai package: run scripts/test.sh (it creates {})", venv.display());
    venv
}

#[test]
fn official_openai_client_embeddings_and_models() {
    let s = shared();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_embeddings.py");
    let out = Command::new(python())
        .arg(script)
        .env("RAGWAY_URL", &s.url)
        .env(
            "RAGWAY_FIXTURE",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data/embeddings_minilm.json"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client: all checks passed"), "{stdout}");
}

#[test]
fn official_openai_client_chat_and_completions() {
    let s = shared();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_chat.py");
    let out = Command::new(python()).arg(script).env("RAGWAY_URL", &s.url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai chat script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai chat client: all checks passed"), "{stdout}");
}

#[test]
fn official_openai_client_rag_through_extra_body() {
    let s = shared();
    let (st, _) = s.post("/v1/collections", &serde_json::json!({"name": "rag-openai"}));
    assert!(st == 201 || st == 409);
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/halueval_dev_first8.jsonl")).unwrap();
    let docs: Vec<serde_json::Value> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"id": format!("halu-{i}"), "text": v["knowledge"]})
        })
        .collect();
    let (st, b) = s.post("/v1/collections/rag-openai/documents", &serde_json::json!({"documents": docs}));
    assert_eq!(st, 200, "{b}");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_rag.py");
    let out = Command::new(python()).arg(script).env("RAGWAY_URL", &s.url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai rag script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai rag client: all checks passed"), "{stdout}");
}

/// Issue 21: the README's chat example, unchanged but for its base URL, prints the answer the
/// README says it prints and finishes by itself; `/v1/models/{id}` shows the defaults in
/// use; and the server's log, written to a pipe, holds no colour codes.
#[test]
fn official_openai_client_runs_the_readme_example() {
    let s = shared();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_readme.py");
    let out = Command::new(python()).arg(script).env("RAGWAY_URL", &s.url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "README example failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai readme example: all checks passed"), "{stdout}");
    let log = s.log.lock().unwrap();
    assert!(!log.is_empty());
    assert!(log.iter().all(|l| !l.contains('\u{1b}')), "colour codes in a piped log: {:?}", log.iter().find(|l| l.contains('\u{1b}')));
}

/// Runs a Python client script against the shared server; it must print `marker`.
fn run_script(name: &str, marker: &str) {
    let s = shared();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(name);
    let out = Command::new(python()).arg(script).env("RAGWAY_URL", &s.url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(marker), "{stdout}");
}

/// Issue 23: `chat.completions.parse` with Pydantic models, json_object, regex, tools with
/// `required` and a named function, streamed tool-call deltas, a tool round trip.
#[test]
fn official_openai_client_structured_outputs_and_tools() {
    run_script("openai_structured.py", "openai structured: all checks passed");
}

/// Issue 23: LangChain's `bind_tools` and `with_structured_output(method="json_schema")`.
#[test]
fn langchain_bind_tools_and_structured_output() {
    run_script("langchain_tools.py", "langchain: all checks passed");
}
