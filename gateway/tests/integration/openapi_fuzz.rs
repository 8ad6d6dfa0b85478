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
