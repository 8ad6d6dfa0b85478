//! A schema-driven fuzz pass: every operation of the served `/openapi.json` is called with
//! bodies derived from its own request schema — empty, unknown fields, wrong JSON types,
//! each property given a value of the wrong type — and must answer a 4xx in the API's own
//! error shape, never a 5xx, and the server must stay up.

use crate::common::{client, Server};
use serde_json::{json, Map, Value};

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// A value of a different JSON type than the schema asks for.
fn wrong_value(doc: &Value, schema: &Value) -> Value {
    let s = resolve(doc, schema);
    let ty = s["type"].as_str().or_else(|| s["type"].as_array().and_then(|a| a.iter().find_map(Value::as_str)));
    match ty {
        Some("string") => json!(12345),
        Some("integer") | Some("number") => json!("not a number"),
        Some("boolean") => json!("yes"),
        Some("array") => json!({"not": "an array"}),
        Some("object") => json!(7),
        _ => json!([[[]]]),
    }
}

fn bodies(doc: &Value, schema: &Value) -> Vec<Value> {
    let s = resolve(doc, schema);
    let mut out = vec![json!({}), json!([]), json!("text"), json!(null), json!({"surely_unknown_field": 1})];
    if let Some(props) = s["properties"].as_object() {
        for (name, p) in props {
            let mut m = Map::new();
            m.insert(name.clone(), wrong_value(doc, p));
            out.push(Value::Object(m));
        }
    }
    out
}

#[test]
fn every_operation_refuses_bad_bodies_with_4xx_in_shape() {
    let s = Server::start(&[]);
    s.wait_ready();
    assert_eq!(s.post("/v1/collections", &json!({"name": "fuzz"})).0, 201);
    let doc: Value = client().get(format!("{}/openapi.json", s.url)).send().unwrap().json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    // Every schema the document refers to is in it (a type added to an API struct but not
    // to the document's list leaves a dangling reference).
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20, "{} references", all.len());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling reference {r}");
    }
    let paths = doc["paths"].as_object().unwrap();
    let mut calls = 0;
    // Deletes last, so the other operations meet an existing collection.
    let mut ops: Vec<(String, String, Value)> = paths
        .iter()
        .flat_map(|(p, item)| item.as_object().unwrap().iter().map(move |(m, op)| (p.clone(), m.clone(), op.clone())))
        .collect();
    assert!(ops.len() >= 25, "{} operations", ops.len());
    ops.sort_by_key(|(_, m, _)| m == "delete");
    for (path, method, op) in ops {
        let url = format!("{}{}", s.url, path.replace("{name}", "fuzz").replace("{id}", "no-such-id"));
        let schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
        let cases = if schema.is_null() { vec![Value::Null] } else { bodies(&doc, &schema) };
        for body in cases {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut r = client().request(m, &url);
            if !schema.is_null() {
                r = r.header("content-type", "application/json").body(body.to_string());
            }
            let resp = r.send().unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"));
            let status = resp.status().as_u16();
            let text = resp.text().unwrap_or_default();
            calls += 1;
            assert!(status < 500, "{method} {path} with {body} → {status}: {text}");
            if status >= 400 && path.starts_with("/v1") {
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
                assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{method} {path}: {text}");
            }
        }
    }
    assert!(calls > 100, "{calls} calls");
    assert_eq!(s.get("/health").0, 200);
}

/// The scope each documented operation needs (the service layer's `Operation` table, as the
/// API promises it). An operation missing here fails the test: a new route must be placed.
const SCOPES: &[(&str, &str, &str)] = &[
    ("get", "/v1/models", "read"),
    ("get", "/v1/models/{id}", "read"),
    ("post", "/v1/chat/completions", "read"),
    ("post", "/v1/completions", "read"),
    ("post", "/v1/embeddings", "read"),
    ("post", "/tokenize", "read"),
    ("post", "/detokenize", "read"),
    ("post", "/v1/rag", "read"),
    ("get", "/v1/collections", "read"),
    ("post", "/v1/collections", "admin"),
    ("get", "/v1/collections/{name}", "read"),
    ("delete", "/v1/collections/{name}", "admin"),
    ("post", "/v1/collections/{name}/documents", "write"),
    ("get", "/v1/collections/{name}/documents/{id}", "read"),
    ("delete", "/v1/collections/{name}/documents/{id}", "write"),
    ("post", "/v1/collections/{name}/documents/delete", "write"),
    ("post", "/v1/collections/{name}/search", "read"),
    ("post", "/v1/collections/{name}/ingest", "write"),
    ("post", "/v1/collections/{name}/snapshot", "admin"),
    ("post", "/v1/collections/{name}/restore", "admin"),
    ("post", "/v1/collections/{name}/compact", "admin"),
    ("get", "/v1/collections/{name}/drift", "read"),
    ("put", "/v1/collections/{name}/drift/reference", "admin"),
    ("delete", "/v1/collections/{name}/drift/reference", "admin"),
    ("get", "/v1/jobs", "read"),
    ("get", "/v1/jobs/{id}", "read"),
    ("get", "/v1/prompts", "read"),
    ("post", "/v1/prompts", "write"),
    ("get", "/v1/prompts/{name}", "read"),
    ("delete", "/v1/prompts/{name}", "write"),
    ("post", "/v1/prompts/{name}/versions", "write"),
    ("put", "/v1/prompts/{name}/labels/{label}", "write"),
    ("delete", "/v1/prompts/{name}/labels/{label}", "write"),
    ("post", "/v1/prompts/{name}/render", "read"),
    ("post", "/v1/evals", "write"),
    ("get", "/v1/evals", "read"),
    ("get", "/v1/evals/{id}", "read"),
    ("get", "/v1/evals/{id}/report", "read"),
    ("get", "/v1/admin/models", "admin"),
    ("post", "/v1/admin/models", "admin"),
    ("get", "/v1/admin/models/{name}", "admin"),
    ("put", "/v1/admin/models/{name}/routing", "admin"),
    ("delete", "/v1/admin/models/{name}/versions/{version}", "admin"),
    ("get", "/metrics", "read"),
    ("get", "/openapi.json", "read"),
    ("get", "/health", "open"),
    ("get", "/ready", "open"),
];

#[test]
fn every_operation_answers_only_the_scopes_it_allows() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nkey = \"sk-r\"\nscopes = [\"read\"]\n[[keys]]\nkey = \"sk-w\"\nscopes = [\"write\"]\n\
         [[keys]]\nkey = \"sk-a\"\nscopes = [\"admin\"]\n",
    )
    .unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    s.wait_ready();
    let send = |method: &str, url: &str, key: Option<&str>, body: Option<&Value>| -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let mut r = client().request(m, url);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b.to_string());
        }
        let resp = r.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    assert_eq!(send("post", &format!("{}/v1/collections", s.url), Some("sk-a"), Some(&json!({"name": "fuzz"}))).0, 201);
    let (st, text) = send("get", &format!("{}/openapi.json", s.url), Some("sk-r"), None);
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut ops: Vec<(String, String, Value)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| item.as_object().unwrap().iter().map(move |(m, op)| (p.clone(), m.clone(), op.clone())))
        .collect();
    ops.sort_by_key(|(_, m, _)| m == "delete");
    let rank = |scope: &str| ["open", "read", "write", "admin"].iter().position(|s| *s == scope).unwrap();
    let keys = [(None, "open"), (Some("sk-r"), "read"), (Some("sk-w"), "write"), (Some("sk-a"), "admin")];
    let mut checked = 0;
    for (path, method, op) in ops {
        let needed = SCOPES
            .iter()
            .find(|(m, p, _)| *m == method && *p == path)
            .unwrap_or_else(|| panic!("{method} {path} is not in SCOPES: decide which scope it needs"))
            .2;
        let url = format!(
            "{}{}",
            s.url,
            path.replace("{name}", "fuzz").replace("{id}", "no-such-id").replace("{label}", "l").replace("{version}", "v")
        );
        let schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
        let cases = if schema.is_null() { vec![None] } else { bodies(&doc, &schema).into_iter().map(Some).collect() };
        for (key, held) in keys {
            for body in &cases {
                let (status, text) = send(&method, &url, key, body.as_ref());
                checked += 1;
                assert!(status < 500, "{method} {path} as {held} → {status}: {text}");
                if rank(held) < rank(needed) {
                    // Refused before the body is looked at, whatever it holds.
                    let want = if key.is_none() { 401 } else { 403 };
                    assert_eq!(status, want, "{method} {path} as {held} with {body:?}: {text}");
                } else {
                    assert!(status != 401 && status != 403, "{method} {path} as {held} → {status}: {text}");
                }
            }
        }
    }
    assert!(checked > 300, "{checked} calls");
    assert_eq!(send("get", &format!("{}/health", s.url), None, None).0, 200);
}
