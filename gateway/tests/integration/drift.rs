//! Drift monitoring with a synthetic shift: SciFact claims against a SciFact corpus keep the
//! drift statistics low; trivia questions from HaluEval raise them past the thresholds.

use crate::common::{assert_openai_error, client, Server};
use serde_json::{json, Value};

fn data() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/drift_queries.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn search_all(s: &Server, queries: &[Value]) {
    for q in queries {
        let (st, r) = s.post("/v1/collections/sci/search", &json!({"query": q, "top_k": 3}));
        assert_eq!(st, 200, "{r}");
    }
}

#[test]
fn drift_stays_low_in_domain_and_alerts_on_shifted_traffic() {
    let s = Server::start(&["--drift-window", "100", "--drift-baseline", "200"]);
    s.wait_ready();
    let (st, r) = s.post("/v1/collections", &json!({"name": "sci"}));
    assert_eq!(st, 201, "{r}");
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/scifact_slice/corpus.jsonl")).unwrap();
    let docs: Vec<Value> = corpus
        .lines()
        .map(|l| {
            let d: Value = serde_json::from_str(l).unwrap();
            json!({"id": d["_id"], "title": d["title"], "text": d["text"]})
        })
        .collect();
    for batch in docs.chunks(50) {
        let (st, r) = s.post("/v1/collections/sci/documents", &json!({"documents": batch}));
        assert_eq!(st, 200, "{r}");
    }
    let (_, r) = s.get("/v1/collections/sci/drift");
    assert_eq!((r["state"].as_str(), r["reference_queries"].as_u64()), (Some("collecting_reference"), Some(0)), "{r}");

    let d = data();
    let in_domain = d["in_domain"].as_array().unwrap();
    let off_domain = d["off_domain"].as_array().unwrap();
    // The first 200 live queries become the reference; the next 100 fill the window.
    search_all(&s, &in_domain[..200]);
    let (_, r) = s.get("/v1/collections/sci/drift");
    assert_eq!((r["reference_source"].as_str(), r["reference_queries"].as_u64()), (Some("live"), Some(200)), "{r}");
    let (_, info) = s.get("/v1/collections/sci");
    assert_eq!(r["profile"]["chunks_sampled"], info["chunks"], "{r}");
    search_all(&s, &in_domain[200..300]);
    let (_, r) = s.get("/v1/collections/sci/drift");
    eprintln!("in-domain window: {r}");
    assert_eq!(r["state"], "ok", "{r}");
    assert_eq!(r["alert"], false);
    assert!(r["similarity_ks"]["statistic"].as_f64().unwrap() < 0.3, "{r}");
    let in_low = r["low_score_share"].as_f64().unwrap();

    // Off-domain traffic replaces the window.
    search_all(&s, &off_domain[..100]);
    let (_, r) = s.get("/v1/collections/sci/drift");
    eprintln!("off-domain window: {r}");
    assert_eq!((r["state"].as_str(), r["alert"].as_bool()), (Some("drift"), Some(true)), "{r}");
    assert!(r["similarity_ks"]["statistic"].as_f64().unwrap() >= 0.3, "{r}");
    assert!(r["similarity_ks"]["p_value"].as_f64().unwrap() < 0.01, "{r}");
    assert!(r["low_score_share"].as_f64().unwrap() > in_low + 0.2, "{r}");
    assert!(r["reasons"].as_array().unwrap().iter().any(|x| x.as_str().unwrap().contains("nearest-chunk similarity")), "{r}");
    assert!(r["mean_similarity"].as_f64().unwrap() < r["reference_mean_similarity"].as_f64().unwrap());
    let metrics = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    assert!(metrics.contains("ragway_drift_alert{collection=\"sci\"} 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("ragway_drift_similarity_ks{collection=\"sci\"} 0.")), "{metrics}");

    // A reference from supplied queries replaces the live one; a reset forgets it.
    let r = client()
        .put(format!("{}/v1/collections/sci/drift/reference", s.url))
        .json(&json!({"queries": in_domain[..20]}))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!((r["reference_source"].as_str(), r["reference_queries"].as_u64(), r["window_queries"].as_u64()), (Some("queries"), Some(20), Some(0)), "{r}");
    let r = client().put(format!("{}/v1/collections/sci/drift/reference", s.url)).json(&json!({"queries": []})).send().unwrap();
    let status = r.status().as_u16();
    assert_openai_error(status, &r.json().unwrap(), 400);
    let gql = s.post("/graphql", &json!({"query": "{ drift(collection: \"sci\") }"})).1;
    assert_eq!(gql["data"]["drift"]["reference_source"], "queries", "{gql}");
    let (st, r) = s.delete("/v1/collections/sci/drift/reference");
    assert_eq!((st, r["state"].as_str()), (200, Some("collecting_reference")), "{r}");
    let (st, e) = s.get("/v1/collections/nope/drift");
    assert_openai_error(st, &e, 404);
}
