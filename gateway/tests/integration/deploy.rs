//! The deployment files: the compose file and Prometheus configuration validate offline
//! (`scripts/check-deploy.sh`), and every metric the Grafana dashboard and the alert rules
//! query exists in the `/metrics` of a real server that has served traffic.

use crate::common::client;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// Metric names in a query text (`ragway_...`), as their family names.
fn families(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ragway_") {
        let start = i + at;
        let end = start + text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len() - start);
        // Not part of a longer identifier, nor a quoted label value.
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b'"') {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn deployment_files_validate_offline() {
    let out = std::process::Command::new("bash").arg(repo("scripts/check-deploy.sh")).output().expect("run check-deploy.sh");
    assert!(
        out.status.success(),
        "check-deploy.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dashboard_and_alerts_query_metrics_that_exist() {
    // Traffic through every part the panels watch: RAG (rag-e2e), chat, embeddings.
    let s = crate::rag::corpus();
    let (st, b) = s.post("/v1/rag", &json!({"collection": "rag-e2e", "query": "Which magazine was started first?", "top_k": 2, "max_tokens": 16}));
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.post("/v1/chat/completions", &json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}));
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": ["hello"]}));
    assert_eq!(st, 200, "{b}");
    let metrics = client().get(format!("{}/metrics", s.url)).send().unwrap().text().unwrap();
    let exposed: BTreeSet<String> = metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/dashboards/ragway.json")).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    let mut panels = 0;
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            queried.extend(families(t["expr"].as_str().unwrap()));
        }
        panels += usize::from(p["type"] == "timeseries");
    }
    assert!(panels >= 12, "the dashboard lost panels");
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    queried.extend(families(&alerts));
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(missing.is_empty(), "queried but not in /metrics: {missing:?}\nexposed: {exposed:?}");
    // The histograms the latency panels read have series after this traffic.
    for h in ["ragway_http_request_duration_seconds_bucket", "ragway_generation_time_to_first_token_seconds_bucket", "ragway_rag_grounding_score_bucket"] {
        assert!(metrics.lines().any(|l| l.starts_with(h)), "{h} has no series");
    }
}

#[test]
fn metric_names_are_extracted_as_families() {
    let f = families("histogram_quantile(0.5, sum by (le) (rate(ragway_x_seconds_bucket[5m]))) / ragway_y_total{a=\"ragway_not\"}");
    assert_eq!(f.into_iter().collect::<Vec<_>>(), vec!["ragway_x_seconds", "ragway_y_total"]);
}
