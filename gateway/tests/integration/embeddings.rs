//! `POST /v1/embeddings` against sentence-transformers' reference vectors.

use crate::common::{assert_openai_error, shared};
use base64::Engine as _;
use serde_json::{json, Value};

fn reference() -> Vec<(String, Vec<f32>, usize)> {
    let v: Value = serde_json::from_str(include_str!("../../../engine/tests/data/embeddings_minilm.json")).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|it| !it["text"].as_str().unwrap().is_empty())
        .map(|it| {
            (
                it["text"].as_str().unwrap().to_string(),
                it["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
                it["num_tokens"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn array_input_matches_reference_in_openai_format() {
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let (status, body) = shared().post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": texts}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "all-MiniLM-L6-v2@v1");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), refs.len());
    for (i, (d, (text, want, _))) in data.iter().zip(&refs).enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let got = floats(&d["embedding"]);
        assert!(max_diff(&got, want) <= 1e-4, "{text}");
    }
    let tokens: usize = refs.iter().map(|r| r.2).sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["total_tokens"], tokens);
}

#[test]
fn string_input_base64_and_token_ids_agree() {
    let s = shared();
    let text = "Hello world";
    let (_, f) = s.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": text}));
    let float = floats(&f["data"][0]["embedding"]);
    assert_eq!(float.len(), 384);
    let (status, b) =
        s.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": text, "encoding_format": "base64"}));
    assert_eq!(status, 200);
    let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded, float);
    // "hello world" in MiniLM's vocabulary, without special tokens.
    let (status, t) = s.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": [7592, 2088]}));
    assert_eq!(status, 200, "{t}");
    assert_eq!(floats(&t["data"][0]["embedding"]), float);
    let (status, t2) = s.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": [[7592, 2088], [7592]]}));
    assert_eq!(status, 200);
    assert_eq!(t2["data"].as_array().unwrap().len(), 2);
    assert_eq!(t2["usage"]["prompt_tokens"], 4 + 3);
}

#[test]
fn long_inputs_are_truncated_and_reported() {
    let long = "retrieval ".repeat(400);
    let r = crate::common::client()
        .post(format!("{}/v1/embeddings", shared().url))
        .json(&json!({"model": "all-MiniLM-L6-v2", "input": [long, "short"]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ragway-truncated-inputs"], "1");
    let body: Value = r.json().unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 256 + 3);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_survives() {
    let s = shared();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"model": "all-MiniLM-L6-v2", "input": []}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": ""}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": 42}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": ["a", 1]}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": [-1]}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": [99999999]}), 400, "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "int8"}), 400, "encoding_format"),
        (json!({"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 128}), 400, "dimensions"),
        (json!({"model": "text-embedding-3-small", "input": "x"}), 404, "model"),
        (json!({"input": "x"}), 400, "body"),
        (json!({"model": "all-MiniLM-L6-v2", "input": "x", "bogus": 1}), 400, "body"),
    ];
    for (body, want, param) in cases {
        let (status, resp) = s.post("/v1/embeddings", &body);
        let e = assert_openai_error(status, &resp, want);
        assert_eq!(e["param"], param, "{body} -> {resp}");
    }
    // Malformed JSON and invalid UTF-8 bytes.
    for raw in [
        &b"{\"model\": \"all-MiniLM-L6-v2\", \"input\": "[..],
        &b"{\"model\":\"all-MiniLM-L6-v2\",\"input\":\"\xff\xfe\"}"[..],
    ] {
        let r = crate::common::client()
            .post(format!("{}/v1/embeddings", s.url))
            .header("content-type", "application/json")
            .body(raw.to_vec())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        assert_openai_error(status, &body, 400);
    }
    let (status, _) = s.get("/health");
    assert_eq!(status, 200);
}
